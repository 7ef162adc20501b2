"""The JAX trainer at tiny sizes: BASELINE / SALT / RKD / SALT_DS behaviour, metrics,
checkpoint contents, the non-finite-loss stop, bad input, and the NumPy reference runtime."""
import json
import math
import os

import jax
import numpy as np
import pytest

from salt.runtime.model import checkpoint
from salt.runtime.train.trainer import NonFiniteLoss, TrainConfig, TrainError, train
from tiny_corpus import make_tiny_corpus

SEQ, BATCH = 16, 8
# one KD transition for every KD test, so the compiled KD step is shared (the schedule's
# constants are runtime arguments of the step)
LINEAR = dict(transition="linear", kd_steps1=1)




@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny token store and a 2-step tiny-teacher run on it."""
    from salt.data import prepare
    root = tmp_path_factory.mktemp("train")
    prepare(root / "data", [make_tiny_corpus(root / "src", n_docs=30, words=200)], vocab_size=300, val_fraction=0.2,
            progress=False)
    teacher = train(TrainConfig(preset="tiny-teacher", data=str(root / "data"),
                                out=str(root / "teacher"), steps=2, batch=BATCH, seq_len=SEQ,
                                optimizer="adamw", lr=1e-2), progress=False)
    return {"root": root, "data": str(root / "data"), "teacher": str(root / "teacher"),
            "teacher_summary": teacher}


def _cfg(tiny, out, **kw):
    base = dict(preset="tiny-student", data=tiny["data"], out=str(tiny["root"] / out),
                steps=4, batch=BATCH, seq_len=SEQ, optimizer="adamw", lr=3e-3, final_lr=3e-4)
    base.update(kw)
    return TrainConfig(**base)


def _metrics(run_dir):
    with open(f"{run_dir}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_teacher_baseline_run(tiny):
    summary = tiny["teacher_summary"]
    assert summary["last_step"] == 2 and not summary["interrupted"]
    rows = _metrics(tiny["teacher"])
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["phase"] == "standard" and r["omega"] == 0.0 and r["kd"] is None for r in rows)
    for key in ("loss", "ce", "lr", "accuracy", "grad_norm", "tokens_per_s"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert rows[0]["loss"] == rows[0]["ce"]
    meta = checkpoint.read_meta(tiny["teacher"])
    assert meta["step"] == 2 and meta["teacher"] is None
    assert meta["config"]["vocab_size"] == 300  # the preset's vocabulary replaced by the data's
    assert meta["loader_state"]["step"] == 2


@pytest.mark.slow
def test_salt_run_phases_teacher_identity_and_checkpoints(tiny):
    out = tiny["root"] / "salt"
    summary = train(_cfg(tiny, "salt", teacher=tiny["teacher"], kd_steps=2, steps=4, **LINEAR),
                    progress=False)
    rows = _metrics(out)
    assert [r["phase"] for r in rows] == ["kd", "kd", "standard", "standard"]
    # ω from the schedule inside the compiled step: linear from n_kd1=1 to 0 at n_kd=2
    assert rows[0]["omega"] == pytest.approx(0.667, abs=1e-7)
    assert rows[1]["omega"] == 0.0 and rows[2]["omega"] == 0.0
    assert rows[0]["kd"] is not None and rows[0]["kl"] >= 0
    assert rows[0]["loss"] == pytest.approx((1 - 0.667) * rows[0]["ce"] + 0.667 * rows[0]["kd"], rel=1e-5)
    assert rows[2]["kd"] is None
    # checkpoints: n_kd (the early evaluation point) and the end; no teacher weights inside
    assert checkpoint.all_steps(out) == [2, 4]
    meta = checkpoint.read_meta(out, 4)
    assert meta["teacher"]["step"] == 2 and meta["teacher"]["config"]["name"] == "tiny-teacher"
    config, params, _ = checkpoint.load_params(out)
    assert config.name == "tiny-student"
    assert params["layers"]["wq"].shape[0] == 2  # student's 2 layers, not the teacher's 1
    assert summary["kd_step_s"] > 0 and summary["standard_step_s"] > 0


@pytest.mark.slow
def test_salt_ds_draws_kd_batches_from_the_subset(tiny, monkeypatch):
    from salt.data import Loader
    seen = []
    original = Loader.batch

    def recording_batch(self, step):
        # the tiny teacher's layer matrices are [1, 16, 16]; the student's [2, 16, 16]
        teacher_alive = any(a.shape == (1, 16, 16) for a in jax.live_arrays())
        seen.append((step, len(self.pool), teacher_alive))
        return original(self, step)

    monkeypatch.setattr(Loader, "batch", recording_batch)
    subset = np.arange(3, 40, 3, dtype=np.int64)
    path = tiny["root"] / "selection.npy"
    np.save(path, subset)
    train(_cfg(tiny, "salt_ds", teacher=tiny["teacher"], kd_steps=2, steps=3, subset=str(path),
               **LINEAR), progress=False)
    full = Loader(tiny["data"], seq_len=SEQ, global_batch=BATCH).num_windows
    # KD phase from the subset with the teacher loaded; the standard phase from the full data,
    # the teacher's parameters already freed
    assert seen == [(0, len(subset), True), (1, len(subset), True), (2, full, False)]


@pytest.mark.slow
def test_rkd_runs_only_kd_steps(tiny):
    train(_cfg(tiny, "rkd", teacher=tiny["teacher"], kd_steps=3, steps=3, transition="linear",
               kd_steps1=3), progress=False)
    rows = _metrics(tiny["root"] / "rkd")
    assert [r["phase"] for r in rows] == ["kd", "kd", "kd"]
    assert all(r["omega"] == pytest.approx(0.667) for r in rows)


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny):
    out = tiny["root"] / "nan"
    with pytest.raises(NonFiniteLoss, match=r"step [0-9]+") as info:
        train(_cfg(tiny, "nan", steps=6, lr=1e30, final_lr=1e30, clip=0.0, checkpoint_every=1),
              progress=False)
    bad = info.value.step
    assert bad >= 2 and info.value.last_checkpoint == bad - 1
    assert checkpoint.latest_step(out) == bad - 1
    assert max(r["step"] for r in _metrics(out)) == bad - 1


@pytest.mark.parametrize("changes, message", [
    (dict(kd_steps=5, steps=4, teacher="x"), "kd_steps=5 is larger than steps=4"),
    (dict(omega=1.5, kd_steps=1, teacher="x"), "omega"),
    (dict(rho=0.0, kd_steps=1, teacher="x"), "rho"),
    (dict(kd_steps=2), "needs a teacher"),
    (dict(preset="no-such"), "unknown preset"),
    (dict(transition="linear", kd_steps=2, teacher="x"), "kd_steps1"),
    (dict(mesh="data=two"), "mesh"),
    (dict(subset="sel.npy"), "only applies to the KD phase"),
])
def test_bad_config_is_rejected_before_any_output(tiny, changes, message):
    cfg = _cfg(tiny, "bad", **changes)
    with pytest.raises(TrainError, match=message):
        train(cfg, progress=False)
    assert not (tiny["root"] / "bad").exists()


def test_bad_paths_are_rejected(tiny, tmp_path):
    with pytest.raises(TrainError, match="does not exist"):
        train(_cfg(tiny, "x1", data=str(tmp_path / "missing")), progress=False)
    with pytest.raises(TrainError, match="no checkpoint found|does not exist"):
        train(_cfg(tiny, "x2", teacher=str(tmp_path / "none"), kd_steps=1), progress=False)
    with pytest.raises(TrainError, match="subset file"):
        train(_cfg(tiny, "x3", teacher=tiny["teacher"], kd_steps=1, subset=str(tmp_path / "s.npy")),
              progress=False)
    assert not (tiny["root"] / "x1").exists() and not (tiny["root"] / "x2").exists()
    # the batch must split over the data axis
    with pytest.raises(TrainError, match="not divisible"):
        train(_cfg(tiny, "x4", batch=6, mesh="data=4"), progress=False)


@pytest.mark.slow
def test_teacher_with_another_tokenizer_is_refused(tiny, tmp_path):
    config, params, meta = checkpoint.load_params(tiny["teacher"])
    meta = dict(meta, tokenizer_sha256="0" * 64)
    checkpoint.save(tmp_path / "foreign", 2, params, {"count": np.zeros((), np.int32)}, meta)
    with pytest.raises(TrainError, match="tokenizer sha256"):
        train(_cfg(tiny, "mismatch", teacher=str(tmp_path / "foreign"), kd_steps=1), progress=False)
    meta["tokenizer_sha256"] = checkpoint.read_meta(tiny["teacher"])["tokenizer_sha256"]
    meta["config"] = dict(meta["config"], vocab_size=299)
    small = jax.tree.map(np.asarray, params)
    small["embed"] = small["embed"][:299]
    checkpoint.save(tmp_path / "vocab", 2, small, {"count": np.zeros((), np.int32)}, meta)
    with pytest.raises(TrainError, match="vocab_size=299"):
        train(_cfg(tiny, "mismatch", teacher=str(tmp_path / "vocab"), kd_steps=1), progress=False)
    assert not (tiny["root"] / "mismatch").exists()


def test_existing_run_needs_resume_and_same_config(tiny):
    run = tiny["teacher"]
    before = sorted(p.name for p in (tiny["root"] / "teacher").rglob("*"))
    with pytest.raises(TrainError, match="already exists"):
        train(TrainConfig(preset="tiny-teacher", data=tiny["data"], out=run, steps=2, batch=BATCH,
                          seq_len=SEQ, optimizer="adamw", lr=1e-2), progress=False)
    with pytest.raises(TrainError, match="different configuration.*lr"):
        train(TrainConfig(preset="tiny-teacher", data=tiny["data"], out=run, steps=2, batch=BATCH,
                          seq_len=SEQ, optimizer="adamw", lr=5e-2, resume=True), progress=False)
    assert sorted(p.name for p in (tiny["root"] / "teacher").rglob("*")) == before
    # resuming a finished run with the same configuration trains nothing more
    summary = train(TrainConfig(preset="tiny-teacher", data=tiny["data"], out=run, steps=2,
                                batch=BATCH, seq_len=SEQ, optimizer="adamw", lr=1e-2, resume=True),
                    progress=False)
    assert summary["start_step"] == 2 and summary["last_step"] == 2
    assert len(_metrics(run)) == 2


@pytest.mark.slow
def test_reference_runtime_matches_jax_with_adamw(tiny):
    """N steps of the NumPy reference trainer and of the JAX trainer (SALT, AdamW, clipping,
    warm-up + cosine) give the same losses within 1e-4."""
    kw = dict(teacher=tiny["teacher"], kd_steps=3, steps=5, warmup=1, weight_decay=1e-4, clip=0.5,
              **LINEAR)
    train(_cfg(tiny, "ref_jax", **kw), progress=False)
    train(_cfg(tiny, "ref_np", runtime="reference", **kw), progress=False)
    jax_rows, ref_rows = _metrics(tiny["root"] / "ref_jax"), _metrics(tiny["root"] / "ref_np")
    assert [r["phase"] for r in ref_rows] == [r["phase"] for r in jax_rows]
    for a, b in zip(jax_rows, ref_rows):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4), a["step"]
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-5)
        assert a["omega"] == pytest.approx(b["omega"], abs=1e-7)
    _, p_jax, _ = checkpoint.load_params(tiny["root"] / "ref_jax")
    _, p_ref, meta = checkpoint.load_params(tiny["root"] / "ref_np")
    assert meta["runtime"] == "reference"
    for a, b in zip(jax.tree.leaves(p_jax), jax.tree.leaves(p_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


@pytest.mark.slow
def test_bench_step_reports_both_steps(tiny):
    """`salt bench step` machinery at tiny sizes (the figures themselves come from the CLI)."""
    from salt.bench.step import format_report, run_benchmark
    # the shapes and settings of the KD tests above, so the compiled steps are shared
    r = run_benchmark("tiny-student", "tiny-teacher", vocab=300, batch=BATCH, seq_len=SEQ,
                      optimizer="adamw", transition="linear", iters=1, warmup=0, matmul_n=128,
                      gradients=True, progress=False)
    assert r["standard_step_s"] > 0 and r["kd_step_s"] > 0 and r["standard_grad_s"] > 0 and r["kd_grad_s"] > 0
    assert "gradient computations alone" in format_report(r)
    assert r["predicted_ratio"] == pytest.approx(
        1 + r["teacher_forward_flops"] / r["student_train_flops"])
    assert r["kd_temp_bytes"] is None or r["kd_temp_bytes"] >= 0
    assert "KD/standard time ratio" in format_report(r)
    pr = r["paired_ratio"]  # one iteration: the ratio of the two times, no standard error
    assert pr["n"] == 1 and pr["mean"] == r["kd_step_s"] / r["standard_step_s"] and math.isnan(pr["se"])
    assert r["cpu_cores"] == len(os.sched_getaffinity(0))


def test_bench_step_paired_ratio_and_cores_errors():
    import click

    from salt.bench.step import paired_ratio, restrict_cores
    p = paired_ratio([2.0, 3.0, 4.0], [1.0, 2.0, 2.0])
    assert p["mean"] == pytest.approx((2 + 1.5 + 2) / 3) and p["n"] == 3
    assert p["se"] == pytest.approx(np.std([2, 1.5, 2], ddof=1) / 3 ** 0.5)
    with pytest.raises(click.BadParameter, match="may use"):
        restrict_cores(len(os.sched_getaffinity(0)) + 1)
    jax.devices()  # the backend is up: too late to pin the process
    with pytest.raises(click.UsageError, match="before JAX starts"):
        restrict_cores(1)


@pytest.mark.slow
def test_bench_step_cores_pins_the_cli_process():
    """`salt bench step --cores 1` pins the process before JAX starts (XLA then sees one core)."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "salt.cli.main", "bench", "step", "--student", "tiny-student",
                          "--teacher", "tiny-teacher", "--vocab", "300", "--batch", "2", "--seq-len", "8",
                          "--iters", "1", "--warmup", "0", "--no-compare", "--cores", "1", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["cpu_cores"] == 1
