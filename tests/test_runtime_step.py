"""The compiled train step (salt.runtime.train.step): fused-linear losses against the full-logits
``naive`` path (one device and an 8-device mesh, f32 and bf16), gradient accumulation against the
whole batch, no ``[tokens, vocab]`` buffer in either compiled step (CPU xla; TPU AOT), the
persistent compilation cache across processes, and ``--runtime`` device selection."""
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from salt.kernels import tpu_aot
from salt.reference.config import flatten_params, get_preset
from salt.runtime.model import transformer as model, sharding
from salt.runtime.train import optim
from salt.runtime.train import step as step_mod
from salt.runtime.train.config import TrainConfig, TrainError, runtime_devices
from kernel_tolerances import BF16_TOL, F32_TOL

REPO = pathlib.Path(__file__).resolve().parent.parent
VOCAB, B, T = 300, 8, 12
STUDENT = get_preset("tiny-student").replace(vocab_size=VOCAB)
TEACHER = get_preset("tiny-teacher").replace(vocab_size=VOCAB)
HYPER = step_mod.hyperparameters(TrainConfig(preset="tiny-student", data="-", out="-", teacher="-",
                                             kd_steps=10, steps=10, batch=B, seq_len=T, lr=1e-2,
                                             warmup=0))
GRAD_REL_TOL = 1e-4  # float32 gradients (relative to the largest entry), as the model tests


def _rel(a, ref):
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(a - ref)) / max(np.max(np.abs(ref)), 1e-30))


@pytest.fixture(scope="module")
def inputs():
    params = model.init_params_jax(STUDENT, 0)
    t_params = model.init_params_jax(TEACHER, 1)
    windows = np.random.default_rng(0).integers(0, VOCAB, (B, T + 1)).astype(np.int32)
    return params, t_params, windows


def _grads(inputs, teacher, *, kernels, mesh_spec=None, dtype="float32", grad_accum=1, vocab_chunks=None,
           jaxpr=False):
    """(grads, metrics) of one step's loss, on a mesh when ``mesh_spec`` is given (``jaxpr``: the
    traced program's text instead)."""
    params, t_params, windows = inputs
    mesh = None if mesh_spec is None else sharding.make_mesh(mesh_spec)
    fn = step_mod.make_grad_fn(STUDENT, teacher, rho=0.25, dtype=dtype, kernels=kernels, mesh=mesh,
                               grad_accum=grad_accum, vocab_chunks=vocab_chunks)
    t_arg = t_params if teacher is not None else None
    w = jnp.asarray(windows)
    if mesh is not None:
        params = sharding.shard_params(params, STUDENT, mesh)
        t_arg = None if t_arg is None else sharding.shard_params(t_arg, TEACHER, mesh)
        w = jax.device_put(w, sharding.batch_sharding(mesh))
    if jaxpr:
        return str(jax.make_jaxpr(fn)(params, t_arg, w, jnp.int32(1), HYPER))
    return jax.jit(fn)(params, t_arg, w, jnp.int32(1), HYPER)


def _compare(got, want, tol, what):
    (g_got, m_got), (g_want, m_want) = got, want
    assert set(m_got) == set(m_want), what
    for key in m_want:
        np.testing.assert_allclose(float(m_got[key]), float(m_want[key]), rtol=tol, atol=tol,
                                   err_msg=f"{what}: metric {key}")
    g_got, g_want = flatten_params(g_got), flatten_params(g_want)
    for key in g_want:
        assert _rel(g_got[key], g_want[key]) < max(tol, GRAD_REL_TOL), f"{what}: grad {key}"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["kd", "standard"])
def test_fused_step_matches_full_logits_on_one_device_and_on_a_mesh(inputs, kind):
    """xla (fused-linear, no logits) on 1 device and on 8 devices (data=4 x model=2: the kernels
    under shard_map, the embeddings' gradient summed over the mesh) against the naive full-logits
    step: metrics (loss, ce, kd, kl, accuracy) and gradients."""
    teacher = TEACHER if kind == "kd" else None
    want = _grads(inputs, teacher, kernels="naive")
    assert set(want[1]) >= ({"loss", "ce", "accuracy", "omega"} | ({"kd", "kl"} if teacher else set()))
    _compare(_grads(inputs, teacher, kernels="xla"), want, F32_TOL, "xla, 1 device")
    _compare(_grads(inputs, teacher, kernels="xla", mesh_spec="data=4,model=2"), want, F32_TOL,
             "xla, data=4,model=2")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["kd", "standard"])
def test_vocab_chunks_select_the_vocabulary_parallel_loss_in_the_step(inputs, kind):
    """``vocab_chunks`` (``salt train --vocab-chunks``) on a data=8 mesh: the step's loss takes the
    vocabulary-parallel path (its all_to_all exchange; without it these small embeddings are
    replicated) and matches the full-logits step, for a chunk count that leaves a ragged last chunk."""
    teacher = TEACHER if kind == "kd" else None
    assert "all_to_all" in _grads(inputs, teacher, kernels="xla", mesh_spec="data=8", vocab_chunks=3, jaxpr=True)
    assert "all_to_all" not in _grads(inputs, teacher, kernels="xla", mesh_spec="data=8", jaxpr=True)
    _compare(_grads(inputs, teacher, kernels="xla", mesh_spec="data=8", vocab_chunks=3),
             _grads(inputs, teacher, kernels="naive"), F32_TOL, "xla, data=8, 3 vocabulary chunks")


def test_vocab_chunks_validation():
    base = dict(preset="tiny-student", data="-", out="-", teacher="-", kd_steps=2, steps=4, mesh="data=8")
    TrainConfig(**base, vocab_chunks=3).validate()
    TrainConfig(**dict(base, mesh="data=4,model=1"), vocab_chunks=1).validate()
    for changes, message in (({"vocab_chunks": 0}, "integer >= 1"), ({"vocab_chunks": True}, "integer >= 1"),
                             ({"vocab_chunks": 2.0}, "integer >= 1"),
                             ({"vocab_chunks": 2, "kd_topk": 4}, "no top-k KD"),
                             ({"vocab_chunks": 2, "mesh": "data=4,model=2"}, "data-only mesh"),
                             ({"vocab_chunks": 2, "runtime": "reference"}, "reference runtime")):
        with pytest.raises(TrainError, match=f"vocab_chunks=.*{message}"):
            TrainConfig(**{**base, **changes}).validate()
    assert "vocab_chunks" in TrainConfig.RESUMABLE_CHANGES  # a chunk count changes float rounding only


@pytest.mark.slow
def test_fused_step_bfloat16(inputs):
    """bf16 compute: the fused path against the naive path in bf16 (same bf16 hidden states and
    embeddings), within the bf16 kernel tolerance."""
    want = _grads(inputs, TEACHER, kernels="naive", dtype="bfloat16")
    _compare(_grads(inputs, TEACHER, kernels="xla", dtype="bfloat16"), want, BF16_TOL, "xla bf16")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["kd", "standard"])
def test_grad_accumulation_equals_the_whole_batch(inputs, kind):
    """K = 4 microbatches (and, for KD, K = 2 on data=4): the same metrics, gradients and, after
    one AdamW step, the same parameters as K = 1, up to float rounding (AdamW's first step is
    ~lr·sign(g), so the parameters are compared to 1e-3 of the step size)."""
    teacher = TEACHER if kind == "kd" else None
    want = _grads(inputs, teacher, kernels="xla")
    _compare(_grads(inputs, teacher, kernels="xla", grad_accum=4), want, F32_TOL, "K=4")
    if kind == "kd":
        _compare(_grads(inputs, teacher, kernels="xla", grad_accum=2, mesh_spec="data=4"), want, F32_TOL,
                 "K=2, data=4")
    params, t_params, windows = inputs
    opt_state = optim.make_direction("adamw").init(params)
    after = {}
    for k in (1, 4):
        fn = step_mod.make_step_fn(STUDENT, teacher, "adamw", kernels="xla", grad_accum=k)
        after[k] = jax.jit(fn)(params, opt_state, t_params if teacher else None, jnp.asarray(windows),
                               jnp.int32(1), HYPER)
    p1, p4 = flatten_params(after[1][0]), flatten_params(after[4][0])
    for key in p1:
        np.testing.assert_allclose(np.asarray(p4[key]), np.asarray(p1[key]), rtol=0,
                                   atol=1e-3 * float(HYPER["lr"]), err_msg=key)
    np.testing.assert_allclose(float(after[4][2]["loss"]), float(after[1][2]["loss"]), rtol=F32_TOL)


def test_grad_accum_must_divide_the_batch():
    with pytest.raises(TrainError, match="grad_accum"):
        TrainConfig(preset="tiny-student", data="-", out="-", batch=6, grad_accum=4).validate()


# ----------------------------------------------------------------------------- memory

BIG_VOCAB, BIG_T = 16384, 64  # [B*T, V] float32 = 32 MiB; the tiny models' params are ~1 MiB


def _abstract_step(teacher, kernels, mesh, vocab=BIG_VOCAB, seq_len=BIG_T, batch=B, dtype="float32"):
    student, t_config = STUDENT.replace(vocab_size=vocab), TEACHER.replace(vocab_size=vocab)
    params_abs = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        model.abstract_params(student), sharding.param_shardings(student, mesh))
    t_abs = None if teacher is None else jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        model.abstract_params(t_config), sharding.param_shardings(t_config, mesh))
    opt_abs = step_mod.opt_state_abstract("adafactor", params_abs, mesh)
    windows_abs = jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32, sharding=sharding.batch_sharding(mesh))
    fn = step_mod.make_step_fn(student, None if teacher is None else t_config, "adafactor", kernels=kernels,
                               mesh=mesh, dtype=dtype)
    return step_mod.compile_step(fn, params_abs, opt_abs, t_abs, windows_abs, mesh=mesh)


def _tokens_by_vocab_shapes(compiled, tokens, vocab):
    """HLO buffer shapes holding tokens x vocab elements ([N, V] or [B, T, V] / [T, B, V]...)."""
    shapes = set(re.findall(r"\b[a-z]+[0-9]*\[([0-9,]+)\]", compiled.as_text()))
    return sorted(s for s in shapes
                  if vocab in map(int, s.split(",")) and np.prod(list(map(int, s.split(",")))) >= tokens * vocab)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["kd", "standard"])
def test_cpu_steps_hold_no_tokens_by_vocab_buffer(kind):
    """Compiled on the CPU at V = 16384 (a [tokens, vocab] f32 buffer = 32 MiB would dominate):
    the naive step holds such buffers, the fused (xla) step neither in its HLO nor in its
    temporaries."""
    mesh = sharding.make_mesh("data=1")
    teacher = TEACHER if kind == "kd" else None
    tokens, one_buffer = B * BIG_T, B * BIG_T * BIG_VOCAB * 4
    naive = _abstract_step(teacher, "naive", mesh)
    fused = _abstract_step(teacher, "xla", mesh)
    assert _tokens_by_vocab_shapes(naive, tokens, BIG_VOCAB)  # the check sees them when they are there
    assert naive.memory_analysis().temp_size_in_bytes >= one_buffer
    assert _tokens_by_vocab_shapes(fused, tokens, BIG_VOCAB) == []
    temp = fused.memory_analysis().temp_size_in_bytes
    # (what remains: the scan's [tokens, 1024-column chunk] f32 tiles, the [V, D] f32 embedding
    # gradient, parameters and optimizer temporaries; measured 9.3 MB standard, 15.7 MB KD)
    assert temp < 0.5 * one_buffer, f"fused {kind} step: {temp} temporary bytes"


@pytest.mark.tpu_aot
@pytest.mark.skipif(not tpu_aot.libtpu_available(), reason="libtpu is not installed")
@pytest.mark.parametrize("kind", ["kd", "standard"])
def test_tpu_aot_steps_hold_no_tokens_by_vocab_buffer(kind):
    """Both steps with the Pallas kernels, AOT-compiled for v5e:2x2 (data=4), bf16, V = 32768 per
    chip's 2 x 128 tokens: no [tokens, vocab] buffer shape and temporaries below a quarter of one
    bf16 [tokens, vocab] array."""
    vocab, seq_len, batch = 32768, 128, 8
    mesh = sharding.make_mesh("data=4", devices=tpu_aot.topology_devices("v5e:2x2"))
    compiled = _abstract_step(TEACHER if kind == "kd" else None, "pallas", mesh, vocab=vocab, seq_len=seq_len,
                              batch=batch, dtype="bfloat16")
    tokens_per_chip = batch // 4 * seq_len
    assert _tokens_by_vocab_shapes(compiled, tokens_per_chip, vocab) == []
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 0.25 * tokens_per_chip * vocab * 2, f"{kind}: {temp} temporary bytes per chip"


# ----------------------------------------------------------------------------- compile cache

_CACHE_SCRIPT = textwrap.dedent("""
    import sys, time
    import jax
    from jax._src import monitoring
    hits = []
    monitoring.register_event_listener(lambda event, **kw: hits.append(event)
                                       if event == "/jax/compilation_cache/cache_hits" else None)
    from salt.reference.config import get_preset
    from salt.runtime.model import sharding, transformer as model
    from salt.runtime.train import step as step_mod
    from salt.runtime.train.config import TrainConfig
    cfg = TrainConfig(preset="tiny-student", data="-", out="-", batch=4, seq_len=8, compile_cache=sys.argv[1])
    student = get_preset("tiny-student").replace(vocab_size=300)
    mesh = sharding.make_mesh("data=1")
    params = step_mod.abstract_of(sharding.shard_params(model.init_params_jax(student, 0), student, mesh))
    opt = step_mod.opt_state_abstract(cfg.optimizer, params, mesh)
    windows = jax.ShapeDtypeStruct((4, 9), jax.numpy.int32, sharding=sharding.batch_sharding(mesh))
    step_mod.compiled_step(student, None, cfg, mesh, params, opt, None, windows)
    print("HITS", len(hits))
""")


def _run_cache_script(cache_dir):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    out = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT, str(cache_dir)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    return int(re.search(r"HITS (\d+)", out.stdout).group(1))


@pytest.mark.slow
def test_persistent_compile_cache_is_hit_by_a_second_process(tmp_path):
    cache = tmp_path / "jax-cache"
    assert _run_cache_script(cache) == 0
    assert any(cache.iterdir()), "the first process wrote nothing to the cache"
    assert _run_cache_script(cache) >= 1


# ----------------------------------------------------------------------------- --runtime

def test_runtime_selects_the_platform_devices():
    assert runtime_devices("cpu") == jax.devices("cpu")
    assert runtime_devices("jax") == jax.devices()
    with pytest.raises(TrainError, match=r"no TPU devices.*found: 8 cpu devices.*salt plan"):
        runtime_devices("tpu")
    with pytest.raises(TrainError, match=r"no GPU devices.*found: 8 cpu devices"):
        runtime_devices("gpu")
