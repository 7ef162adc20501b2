"""``salt plan``: the trainer's steps AOT-compiled for a TPU topology (tiny presets on v5e:2x2),
the batch search, the analytic FLOPs, the roofline, the report and the command's errors."""
import json

import jax
import jax.numpy as jnp
import pytest
from click.testing import CliRunner

from salt.cli.main import cli
from salt.kernels import tpu_aot
from salt.reference.config import get_preset
from salt.runtime.model import transformer as model
from salt.runtime.experiments import plan
from matmul_count import matmul_flops

needs_libtpu = pytest.mark.skipif(not tpu_aot.libtpu_available(), reason="libtpu is not installed")
TINY = dict(topology="v5e:2x2", student="tiny-student", teacher="tiny-teacher", batch=8, seq_len=32)


# ----------------------------------------------------------------------------- batch search
def _linear(fixed, per_example):
    return lambda b: fixed + per_example * b


@pytest.mark.parametrize("start", [1, 2, 100, 2675, 2676, 5000])
def test_search_finds_the_exact_boundary_of_a_linear_memory(start):
    measure = _linear(1000, 37)  # fits up to (100000 - 1000) // 37 = 2675
    calls = []
    r = plan.search_max_batch(lambda b: calls.append(b) or measure(b), {start: measure(start)},
                              capacity=100_000, max_compiles=12)
    assert (r["fits"], r["does_not_fit"], r["exact"]) == (2675, 2676, True)
    assert r["search_compiles"] == len(calls) <= 7 and start not in calls
    assert [c["per_chip_batch"] for c in r["compiled"]] == sorted(set(calls) | {start})
    assert all(c["fits"] == (c["total_bytes"] <= 100_000) for c in r["compiled"])


@pytest.mark.parametrize("measure, want", [
    (lambda b: None if b > 500 else 1000 + 37 * b, 500),           # the compiler refuses past 500
    (lambda b: 1000 + 37 * b + (0 if b < 300 else 50_000), 1324),  # a jump in the middle
    (lambda b: 1000 + b * b, 314),                                 # not linear at all
])
def test_search_is_exact_where_the_line_misleads(measure, want):
    r = plan.search_max_batch(measure, {100: measure(100)}, capacity=100_000, max_compiles=20)
    assert (r["fits"], r["does_not_fit"], r["exact"]) == (want, want + 1, True)


def test_search_when_nothing_fits_and_when_the_budget_runs_out():
    r = plan.search_max_batch(lambda b: 200_000, {8: 200_000}, capacity=100_000, max_compiles=20)
    assert (r["fits"], r["does_not_fit"], r["exact"]) == (None, 1, True)
    r = plan.search_max_batch(_linear(1000, 37), {8: 1296}, capacity=100_000, max_compiles=2)
    assert r["search_compiles"] == 2 and not r["exact"] and r["does_not_fit"] is None
    assert 8 < r["fits"] <= 2675  # the largest batch that compiled and fitted, never a guess
    assert "search budget of 2 compiles spent" in plan._found(r)


# ----------------------------------------------------------------------------- FLOPs, roofline
@pytest.mark.parametrize("student, teacher", [("tiny-student", "tiny-teacher"),
                                              ("small-student", "small-teacher")])
def test_step_flops_are_the_matmuls_of_the_traced_step(student, teacher):
    """Counted independently: the matmul flops of the traced programs (tests/matmul_count.py), the
    student's gradient step with and without remat (loss = Σ logits: the 3-forward convention of the
    model count, the LM head included) plus the teacher's forward."""
    s, t = (get_preset(name).replace(vocab_size=96) for name in (student, teacher))
    batch, seq_len = 2, 12
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)

    def traced(config, fn):
        return matmul_flops(fn, model.abstract_params(config), tokens)

    def step(remat):
        return traced(s, jax.grad(lambda p, x: model.forward(p, x, s, remat=remat).sum()))

    teacher_fwd = traced(t, lambda p, x: model.forward(p, x, t))
    assert plan.step_flops(s, t, batch, seq_len, remat=False) == {
        "model": step(False) + teacher_fwd, "executed": step(False) + teacher_fwd, "teacher_forward": teacher_fwd}
    f = plan.step_flops(s, t, batch, seq_len, remat=True)
    assert f["executed"] == step(True) + teacher_fwd and f["model"] == step(False) + teacher_fwd
    assert plan.step_flops(s, None, batch, seq_len, remat=False)["teacher_forward"] == 0.0


def test_teacher_forward_is_a_small_overhead_at_the_paper_sizes():
    # the teacher (44 x 1024, 4 kv heads) forward against the student's (92 x 1024) step
    s, t = get_preset("paper-2.8b"), get_preset("paper-1.5b")
    f = plan.step_flops(s, t, 2048, 1280, remat=True)
    overhead = f["teacher_forward"] / (f["model"] - f["teacher_forward"])  # over the student's step
    assert 0.10 < overhead < 0.20


def test_roofline_is_the_slower_of_compute_and_hbm():
    chip = plan.CHIPS["TPU v5 lite"]
    r = plan.roofline(197e12, 1.0, chip)
    assert r["step_s"] == pytest.approx(1.0) and r["bound"] == "compute"
    r = plan.roofline(1.0, 819e9 * 2, chip)
    assert r["step_s"] == pytest.approx(2.0) and r["bound"] == "memory"


def test_chip_table_covers_v5e_v5p_v6e_with_sources():
    names = {c.name for c in plan.CHIPS.values()}
    assert {"v5e", "v5p", "v6e"} <= names
    for c in plan.CHIPS.values():
        assert c.source.startswith("https://cloud.google.com/tpu/docs/")
        assert 0.9 * c.hbm_bytes < c.allocatable_bytes <= 1.01 * c.hbm_bytes


# ----------------------------------------------------------------------------- real compiles
@pytest.fixture(scope="module")
def tiny_plan():
    if not tpu_aot.libtpu_available():
        pytest.skip("libtpu is not installed")
    return plan.plan(**TINY, max_search_compiles=1)


@pytest.mark.slow
@pytest.mark.tpu_aot
@needs_libtpu
def test_tiny_plan_on_v5e(tiny_plan):
    r = tiny_plan
    assert r["chips"] == 4 and r["mesh"] == {"data": 4, "model": 1} and r["per_chip_batch"] == 2
    assert r["chip"]["name"] == "v5e" and r["kernels"] == "pallas" and r["remat"]
    s, t = get_preset("tiny-student"), get_preset("tiny-teacher")
    for kind, teacher in (("standard", None), ("kd", t)):
        step = r["steps"][kind]
        mem = step["memory"]
        assert step["error"] is None and step["compile_s"] > 0 and step["fits"]
        assert mem["arguments"] > 0 and mem["outputs"] > 0 and mem["temporaries"] >= 0
        assert mem["aliased"] > 0  # params and optimizer state are donated
        assert mem["total"] == (mem["arguments"] + mem["temporaries"] + mem["outputs"]
                                - mem["aliased"] + mem["code"])
        assert step["flops"] == plan.step_flops(s, teacher, 8, 32, remat=True)
        assert step["flops_per_chip"]["model"] == pytest.approx(step["flops"]["model"] / 4)
        search = step["max_per_chip_batch"]
        assert search["search_compiles"] == 1 and search["fits"] > 2  # tiny: far from full
        assert [c["per_chip_batch"] for c in search["compiled"]][0] == 2
    # the KD step holds the teacher's parameters as an extra argument
    assert r["steps"]["kd"]["memory"]["arguments"] > r["steps"]["standard"]["memory"]["arguments"]
    o = r["kd_overhead"]
    assert o["paper_measured"] == 0.12 and o["rule_of_thumb"] == 0.125
    std_f, kd_f = r["steps"]["standard"]["flops"], r["steps"]["kd"]["flops"]
    assert o["model_flops"] == pytest.approx(kd_f["model"] / std_f["model"] - 1)
    text = plan.format_plan(r)
    for needle in ("v5e:2x2: 4 x TPU v5 lite", "standard step", "kd step", "KD step overhead",
                   "https://cloud.google.com/tpu/docs/v5e"):
        assert needle in text
    json.dumps(r)  # the --json form


@pytest.mark.slow
@pytest.mark.tpu_aot
@needs_libtpu
def test_cli_plan_json_and_table(tiny_plan):
    """The command (same shapes as the fixture, so the compiled steps are reused)."""
    args = ["plan", "--topology", "v5e:2x2", "--student", "tiny-student", "--teacher",
            "tiny-teacher", "--batch", "8", "--seq-len", "32"]
    out = CliRunner().invoke(cli, args + ["--no-search", "--json"])
    assert out.exit_code == 0, out.output
    r = json.loads(out.stdout)
    assert r["steps"]["kd"]["memory"] == tiny_plan["steps"]["kd"]["memory"]
    assert "max_per_chip_batch" not in r["steps"]["kd"]
    out = CliRunner().invoke(cli, args + ["--no-search"])
    assert out.exit_code == 0 and "not searched" in out.stdout


@pytest.mark.slow
@pytest.mark.tpu_aot
@needs_libtpu
def test_plan_with_vocab_chunks_compiles_the_vocabulary_parallel_steps():
    """--vocab-chunks reaches the compiled steps (the tiny embeddings would otherwise be replicated):
    both steps compile for v5e:2x2 with the vocabulary-parallel Pallas loss, and the report says so."""
    r = plan.plan(**TINY, vocab_chunks=2, search=False)
    assert r["vocab_chunks"] == 2 and all(s["error"] is None for s in r["steps"].values())
    assert "vocabulary-parallel loss in 2 chunks" in plan.format_plan(r)
    s, t = get_preset("tiny-student"), get_preset("tiny-teacher")
    cfg = plan.train_config(s, t, batch=8, seq_len=32, mesh_spec="data=-1,model=1", optimizer="adafactor",
                            dtype="bfloat16", kernels="pallas", remat=True, vocab_chunks=2)
    compiled, _ = plan.compile_step(s, t, cfg, plan.topology_mesh("v5e:2x2", "data=-1,model=1"), 8)
    assert "all-to-all" in compiled.as_text()  # the vocabulary-parallel exchange
    with pytest.raises(plan.PlanError, match="vocab_chunks.*data-only mesh"):
        plan.plan(**dict(TINY, mesh="data=2,model=2"), vocab_chunks=2, search=False)


def test_compiler_out_of_memory_is_a_result_not_a_crash(monkeypatch):
    import jax

    def refuse(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, ...")
    monkeypatch.setattr(plan, "compile_step", refuse)
    r = plan._compile_and_measure(None, None, None, None, 8)
    assert r["memory"] is None and r["error"].startswith("RESOURCE_EXHAUSTED")

    def broken(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")
    monkeypatch.setattr(plan, "compile_step", broken)
    with pytest.raises(jax.errors.JaxRuntimeError):
        plan._compile_and_measure(None, None, None, None, 8)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.tpu_aot
@needs_libtpu
@pytest.mark.parametrize("override, message", [
    ({"topology": "v5e:3x5"}, "--topology"),  # not a v5e slice (libtpu 0.0.5x builds v5e:1x1)
    ({"topology": "v9z:2x2"}, "--topology"),
    ({"student": "no-such-model"}, "--student"),
    ({"batch": 6}, "multiple of the mesh's data axis (4)"),
    ({"mesh": "data=8"}, "--mesh"),
    ({"teacher": "small-teacher"}, "vocab_size"),
])
def test_bad_input_is_a_clear_error(override, message):
    with pytest.raises(plan.PlanError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan.plan(**dict(TINY, **override), search=False)


def test_cli_errors_name_the_argument():
    out = CliRunner().invoke(cli, ["plan", "--topology", "v5e:2x2", "--student", "nope",
                                   "--batch", "8", "--seq-len", "32"])
    assert out.exit_code != 0 and "--student" in out.output and "Traceback" not in out.output


def test_grad_accum_is_offered_only_when_the_trainer_has_it():
    from salt.cli import plan as cli_plan
    out = CliRunner().invoke(cli, ["plan", "--help"])
    assert out.exit_code == 0
    assert ("--grad-accum" in out.output) == cli_plan.HAS_GRAD_ACCUM
    if not cli_plan.HAS_GRAD_ACCUM:
        with pytest.raises(plan.PlanError, match="--grad-accum"):
            plan.train_config(get_preset("tiny-student"), None, batch=8, seq_len=32, mesh_spec="data=1",
                              optimizer="adafactor", dtype="bfloat16", kernels="pallas", remat=True,
                              grad_accum=2)
