"""The vocabulary-parallel loss (salt.kernels.vocab_parallel through runtime/model/losses.py token_parts on
a data=8 mesh of CPU devices, tests/conftest.py) against the float64 reference and against the
single-device fused path: loss, parts, gradients for the hidden states, the student embedding and
omega (the teacher gets none), CE and KD, float32 and bfloat16, ragged vocabularies and chunk
counts.  Fixed tolerances (tests/kernel_tolerances.py)."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from salt.kernels import tpu_aot, vocab_parallel
from salt.reference import losses as ref
from salt.runtime.model import losses, sharding
from kernel_tolerances import BF16_TOL, F32_TOL, assert_close

B, T, D, D_T = 8, 7, 16, 8
OMEGA, RHO = 0.667, 0.25


@functools.lru_cache(maxsize=None)
def _mesh():
    return sharding.make_mesh("data=8")


@functools.lru_cache(maxsize=None)
def _fn(kd, mesh, vocab_chunks):
    def objective(h, e, th, te, omega, y, w):
        teacher = (th, te) if kd else None
        parts = losses.token_parts(h, e, y, teacher=teacher, omega=omega, rho=RHO, mesh=mesh,
                                   vocab_chunks=vocab_chunks)
        return jnp.sum(w * parts["loss"]), parts

    return jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2, 3, 4), has_aux=True))


def _case(vocab, dtype, seed=0):
    rng = np.random.default_rng(seed)
    h, e, th, te = (rng.normal(size=s) / np.sqrt(s[-1]) * 3.0 for s in
                    ((B, T, D), (vocab, D), (B, T, D_T), (vocab, D_T)))
    y = rng.integers(0, vocab, size=(B, T)).astype(np.int32)
    w = rng.uniform(0.5, 1.5, size=(B, T)).astype(np.float32)
    return tuple(jnp.asarray(a, dtype) for a in (h, e, th, te)) + (y, w)


def _run(kd, case, mesh, vocab_chunks=None):
    h, e, th, te, y, w = case
    (_, parts), grads = _fn(kd, mesh, vocab_chunks)(h, e, th, te, jnp.float32(OMEGA), y, w)
    return {k: np.asarray(v, np.float64) for k, v in parts.items()}, [np.asarray(g, np.float64) for g in grads]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kd", [True, False], ids=["kd", "ce"])
@pytest.mark.parametrize("vocab,vocab_chunks", [(301, 1), (301, 3), (301, 40), (64, 2)])
def test_vocab_parallel_matches_reference_and_single_device(kd, dtype, vocab, vocab_chunks):
    """V = 301 over 8 chips: one chunk, 3 chunks (the last one cut), 38 chunks of 8 rows; V = 64: 2
    chunks of 32 rows, no padding.  float64 reference from the inputs' values; the single-device
    fused (xla) path at the same tolerance; ranks exactly as the single-device path."""
    tol = F32_TOL if dtype == "float32" else BF16_TOL
    case = _case(vocab, dtype, seed=vocab + (vocab_chunks or 0))
    got, got_g = _run(kd, case, _mesh(), vocab_chunks)
    want, want_g = _run(kd, case, None)
    h, e, th, te, y, w = (np.asarray(a, np.float64) for a in case)
    s64 = (h.reshape(B * T, D) @ e.T)
    t64 = th.reshape(B * T, D_T) @ te.T
    y_n, w_n = y.reshape(-1).astype(np.int64), w.reshape(-1)
    if kd:
        expected = ref.loss_parts(s64, t64, y_n, OMEGA, RHO)
        g_logits = ref.kd_loss_grad(s64, t64, y_n, OMEGA, RHO) * w_n[:, None]
        names = ("loss", "ce", "kd", "kl")
    else:
        expected = {"ce": ref.ce_loss(s64, y_n)}
        expected["loss"] = expected["ce"]
        g_logits = ref.ce_loss_grad(s64, y_n) * w_n[:, None]
        names = ("loss", "ce")
    for name in names:
        assert_close(got[name].reshape(-1), expected[name], tol, f"{name} vs float64")
        assert_close(got[name], want[name], tol, f"{name} vs single device")
    for name in ("correct", "n_greater"):
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    if dtype == "float32":  # the ranks of float64 logits (bf16 logits may reorder near-ties)
        s_y = np.take_along_axis(s64, y_n[:, None], axis=1)
        np.testing.assert_array_equal(got["n_greater"].reshape(-1), np.sum(s64 > s_y, axis=1))
        np.testing.assert_array_equal(got["correct"].reshape(-1), np.argmax(s64, axis=1) == y_n)
    d_h, d_e, d_th, d_te, d_omega = got_g
    assert_close(d_h.reshape(B * T, D), g_logits @ e, tol, "d hidden vs float64")
    assert_close(d_e, g_logits.T @ h.reshape(B * T, D), tol, "d embedding vs float64")
    for a, b, name in zip(got_g, want_g, ("d hidden", "d embedding", "", "", "d omega")):
        if name:
            assert_close(a, b, tol * (np.sum(w_n) if name == "d omega" else 1.0), f"{name} vs single device")
    assert not d_th.any() and not d_te.any(), "gradient leaked into the teacher"


def test_chunk_layout_covers_the_vocabulary_with_the_last_chunk_cut():
    for vocab, n, chunks in [(301, 8, None), (301, 8, 3), (301, 8, 40), (256000, 256, None), (7, 8, 5)]:
        C, c = vocab_parallel.chunk_layout(vocab, n, chunks)
        assert (C - 1) * n * c < vocab <= C * n * c, (vocab, n, chunks, C, c)
    assert vocab_parallel.chunk_layout(256000, 256, None) == (32, 32)
    with pytest.raises(ValueError, match="vocab_chunks"):
        vocab_parallel.chunk_layout(301, 8, 0)


def _full_rows_shapes(hlo_text, vocab, width):
    """HLO shapes with ``width`` columns and at least ``vocab / 2`` rows (a whole-vocabulary
    embedding or gradient on one chip; a chip's own rows are ``vocab / n``)."""
    shapes = set(re.findall(r"\b[a-z]+[0-9]*\[([0-9,]+)\]", hlo_text))
    return sorted(s for s in shapes if (d := list(map(int, s.split(","))))[-1] == width
                  and np.prod(d[:-1]) >= vocab // 2)


@pytest.mark.parametrize("kd", [True, False], ids=["kd", "ce"])
def test_no_chip_holds_a_whole_embedding(kd):
    """Compiled for 8 CPU devices at V = 16384 with 8 chunks: the replicated-embedding path holds
    [V, D] (and its gradient) per device, the vocabulary-parallel path at most a [2048, D] chunk."""
    vocab, d = 16384, 64
    h = jax.ShapeDtypeStruct((B, T, d), jnp.float32)
    y = jax.ShapeDtypeStruct((B, T), jnp.int32)

    def compiled(vocab_chunks, mesh_spec):
        mesh = sharding.make_mesh(mesh_spec)
        e = jax.ShapeDtypeStruct((vocab, d), jnp.float32, sharding=jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(None, "data")))

        def f(h, e, y):
            parts = losses.token_parts(h, e, y, teacher=(h, e) if kd else None, omega=0.5, rho=RHO, mesh=mesh,
                                       vocab_chunks=vocab_chunks)
            return jnp.sum(parts["loss"])

        return jax.jit(jax.grad(f, argnums=(0, 1))).lower(h, e, y).compile().as_text()

    assert _full_rows_shapes(compiled(None, "data=4,model=2"), vocab, d)  # the check sees them there
    text = compiled(8, "data=8")
    assert "all-to-all" in text
    assert _full_rows_shapes(text, vocab, d) == []


def test_token_parts_chooses_the_vocabulary_parallel_path():
    """By default on a data-only mesh for embeddings of at least VOCAB_PARALLEL_MIN_BYTES, or when
    ``vocab_chunks`` is given; the replicated path for small embeddings, a model axis or top-k KD."""
    def exchanges(vocab, mesh_spec="data=8", vocab_chunks=None, kd_topk=None):
        mesh = sharding.make_mesh(mesh_spec)
        h = jax.ShapeDtypeStruct((B, T, 16), jnp.float32)
        e = jax.ShapeDtypeStruct((vocab, 16), jnp.float32)
        teacher = None if kd_topk is None else (h, e)
        jaxpr = jax.make_jaxpr(lambda h, e, y: losses.token_parts(
            h, e, y, teacher=teacher, mesh=mesh, vocab_chunks=vocab_chunks, kd_topk=kd_topk)["loss"])(
            h, e, jax.ShapeDtypeStruct((B, T), jnp.int32))
        return "all_to_all" in str(jaxpr)

    big = losses.VOCAB_PARALLEL_MIN_BYTES // (16 * 4)
    assert exchanges(big) and exchanges(300, vocab_chunks=2)
    assert not exchanges(big - 8) and not exchanges(big, "data=4,model=2") and not exchanges(big, kd_topk=4)


@pytest.mark.tpu_aot
@pytest.mark.skipif(not tpu_aot.libtpu_available(), reason="libtpu is not installed")
@pytest.mark.parametrize("kd", [True, False], ids=["kd", "ce"])
def test_tpu_aot_vocabulary_parallel_pallas_compiles(kd):
    """The vocabulary-parallel loss with the Pallas kernels per chunk, forward + backward, compiled
    by Mosaic for v5e:2x2 (data=4, bf16, V = 7900: 6 chunks of 1320 rows, the last one cut to 1300): no chip holds a
    whole embedding."""
    vocab, d, chunks = 7900, 256, 6
    mesh = sharding.make_mesh("data=4", devices=tpu_aot.topology_devices("v5e:2x2"))
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    h = jax.ShapeDtypeStruct((8, 64, d), jnp.bfloat16, sharding=batch)
    e = jax.ShapeDtypeStruct((vocab, d), jnp.bfloat16, sharding=split)
    y = jax.ShapeDtypeStruct((8, 64), jnp.int32, sharding=batch)

    def f(h, e, y):
        parts = losses.token_parts(h, e, y, teacher=(h, e) if kd else None, omega=0.5, rho=RHO, impl="pallas",
                                   mesh=mesh, vocab_chunks=chunks)
        return jnp.sum(parts["loss"])

    text = jax.jit(jax.grad(f, argnums=(0, 1))).lower(h, e, y).compile().as_text()
    assert "all-to-all" in text and "tpu_custom_call" in text
    assert _full_rows_shapes(text, vocab, d) == []
