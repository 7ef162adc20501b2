"""salt.kernels.topk_kd against the float64 reference (salt.reference.losses.topk_kd_loss and
topk_kd_loss_grad applied to float64 logits ``h @ E.T``): loss, parts, the top-k set, gradients.

Ragged shapes (37 tokens, vocab 300 in chunks of 128, token chunks of 5 rows), exact ties across a
chunk boundary, k = 1 and k = V; float32 inputs 1e-5, bfloat16 inputs 2e-2 (tests/kernel_tolerances.py).
The teacher's top-k Pallas kernel (salt.kernels.topk_pallas) runs in interpret mode on 16 x 128
tiles (37 = 2 x 16 + 5 rows, 300 = 2 x 128 + 44 columns).
"""
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from salt.kernels.fused_linear_kd import FusedKDBlockSizes
from salt.kernels.topk_kd import (TopKBlockSizes, fused_linear_topk_kd_loss, teacher_topk,
                                   topk_kd_loss_from_teacher_topk)
from salt.kernels.topk_pallas import TopKKernelBlockSizes, tile_sizes
from salt.reference import losses as ref
from kernel_tolerances import BF16_TOL, F32_TOL, assert_close

N, V, D_S, D_T = 37, 300, 24, 16
RHO = 0.25
KERNEL_BLOCKS = TopKKernelBlockSizes(block_tokens=16, block_vocab=128)


def logits64(h, e):
    """float64 ``h @ e.T`` summed in the same order for every entry, so that identical embedding
    rows give exactly tied logits (a BLAS matmul may sum edge columns in another order: 1-ulp
    differences that break the ties the tests construct)."""
    h, e = np.asarray(h, np.float64), np.asarray(e, np.float64)
    return (h[:, None, :] * e[None, :, :]).sum(axis=-1)


def blocks(k, rows=5):
    """Vocab chunks of 128 (ragged: 300 = 2 x 128 + a shifted last chunk), token chunks of ``rows``,
    16 x 128 tiles for the top-k kernel."""
    return TopKBlockSizes(chunk_vocab=128, gather_bytes=rows * 4 * k * D_S,
                          ce=FusedKDBlockSizes(block_tokens=16, block_vocab=128, chunk_vocab=128),
                          topk=KERNEL_BLOCKS)


def make_case(seed, dtype=np.float32, ties=False):
    rng = np.random.default_rng(seed)
    hs, es, ht, et = (rng.normal(size=shape) / np.sqrt(shape[1]) * 3.0
                      for shape in ((N, D_S), (V, D_S), (N, D_T), (V, D_T)))
    if ties:  # identical teacher rows -> exactly tied teacher logits, inside and across chunks
        for a, b in ((3, 200), (3, 299), (10, 11), (127, 128), (0, 250)):
            et[b] = et[a]
        ht[:, :] = np.abs(ht)  # the five tied rows 3, 10, 11, 200, 299 are the top ones
        et[[3, 200, 299, 10, 11]] = np.abs(et[3]) + 0.5
    hs, es, ht, et = (a.astype(dtype) for a in (hs, es, ht, et))
    y = rng.integers(0, V, size=N).astype(np.int32)
    mask = rng.random(N) > 0.25
    return hs, es, ht, et, y, mask


@functools.lru_cache(maxsize=None)
def _fn(impl, k, block_sizes):
    def objective(hs, es, ht, et, omega, y, mask, w):
        loss, parts = fused_linear_topk_kd_loss(hs, es, ht, et, y, omega, RHO, k, mask, impl=impl,
                                                interpret=impl == "pallas", block_sizes=block_sizes,
                                                return_parts=True)
        return jnp.sum(w * loss), (loss, parts)

    return jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2, 3, 4), has_aux=True))


def reference_parts(s64, t64, y, omega, k, mask):
    """float64 loss, ce, kd_T, kl (on the top-k set) and the per-row logits gradient."""
    loss = ref.topk_kd_loss(s64, t64, y, omega, RHO, k, mask)
    ce = ref.ce_loss(s64, y, mask)
    kd = ref.topk_kd_loss(s64, t64, y, 1.0, RHO, k, mask)
    index = ref.topk_indices(t64, k)
    log_p = ref.log_softmax(np.take_along_axis(s64, index, axis=1))
    log_q = ref.log_softmax(RHO * np.take_along_axis(t64, index, axis=1))
    kl = np.where(mask, (np.exp(log_q) * (log_q - log_p)).sum(axis=1), 0.0)
    grad = ref.topk_kd_loss_grad(s64, t64, y, omega, RHO, k, mask)
    return {"loss": loss, "ce": ce, "kd": kd, "kl": kl}, grad


def check(impl, case, k, tol, omegas=(0.0, 0.667, 1.0), rows=5):
    hs, es, ht, et, y, mask = case
    fn = _fn(impl, k, blocks(k, rows))
    w = np.random.default_rng(11).uniform(0.5, 1.5, size=N).astype(np.float32)
    hs64, es64 = (np.asarray(a, dtype=np.float64) for a in (hs, es))
    s64, t64 = logits64(hs, es), logits64(ht, et)
    for omega in omegas:
        (_, (loss, parts)), (d_hs, d_es, d_ht, d_et, d_omega) = fn(hs, es, ht, et, jnp.float32(omega), y,
                                                                   mask, w)
        expected, grad = reference_parts(s64, t64, y, omega, k, mask)
        what = f"{impl} k={k} omega={omega}"
        assert_close(loss, expected["loss"], tol, f"loss ({what})")
        for name in ("ce", "kd", "kl"):
            assert_close(parts[name], expected[name], tol, f"{name} ({what})")
        np.testing.assert_array_equal(np.asarray(parts["correct"])[mask],
                                      (np.argmax(s64, axis=1) == y)[mask].astype(np.float32))
        g_logits = grad * w[:, None]
        assert d_hs.dtype == hs.dtype and d_es.dtype == es.dtype
        assert_close(d_hs, g_logits @ es64, tol, f"d student_hidden ({what})")
        assert_close(d_es, g_logits.T @ hs64, tol, f"d student_embedding ({what})")
        assert not np.asarray(d_ht, np.float64).any() and not np.asarray(d_et, np.float64).any(), \
            "gradient leaked into the teacher"
        assert_close(d_omega, np.sum(w * (expected["kd"] - expected["ce"])), tol * float(np.sum(w)),
                     f"d omega ({what})")


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["xla", "naive"])
@pytest.mark.parametrize("k", [1, 7, V])
def test_float32_matches_reference(impl, k):
    check(impl, make_case(0), k, F32_TOL)


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 7])
def test_pallas_kernels_interpret(k):
    """impl="pallas" (interpret mode): the teacher's top-k kernel and the CE kernels, loss, parts and
    gradients (under jax.grad of the whole loss) against the float64 reference."""
    check("pallas", make_case(1), k, F32_TOL, omegas=(0.667,))


@pytest.mark.parametrize("impl", ["xla", "naive"])
def test_bfloat16_matches_reference(impl):
    check(impl, make_case(2, dtype=ml_dtypes.bfloat16), 7, BF16_TOL, omegas=(0.667,))


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2, 4, 6, 9])
def test_ties_go_to_the_lower_id(k):
    """Exactly tied teacher logits inside a chunk and across chunk boundaries: the chunked top-k set
    equals the reference's (ties to the lower id) in order, and the loss follows."""
    hs, es, ht, et, y, mask = make_case(3, ties=True)
    t64 = logits64(ht, et)
    assert (t64[:, 3] == t64[:, 299]).all() and (t64[:, 10] == t64[:, 11]).all()  # exact ties
    want = ref.topk_indices(t64, k)
    assert (np.argmax(t64, axis=1) == 3).sum() > 10, "the case must put the tied ids on top"
    for impl, chunk in (("naive", 128), ("xla", 128), ("xla", 7), ("xla", V), ("pallas", 0)):
        top, ids = jax.jit(functools.partial(teacher_topk, k=k, impl=impl, chunk_vocab=chunk or 128,
                                             interpret=True, block_sizes=KERNEL_BLOCKS))(ht, et)
        np.testing.assert_array_equal(np.asarray(ids), want, err_msg=f"{impl} chunk={chunk}")
        assert_close(top, np.take_along_axis(t64, want, axis=1), F32_TOL, f"{impl} values")
    check("xla", (hs, es, ht, et, y, mask), k, F32_TOL, omegas=(0.667,), rows=37)


def test_k_equal_v_is_full_vocabulary_kd():
    """k = V: the top-k loss is the full-vocabulary KD loss (reference loss_parts)."""
    hs, es, ht, et, y, mask = make_case(4)
    loss = fused_linear_topk_kd_loss(hs, es, ht, et, y, 0.667, RHO, V, mask, impl="xla",
                                     block_sizes=blocks(V))
    s64 = logits64(hs, es)
    t64 = logits64(ht, et)
    assert_close(loss, ref.kd_loss(s64, t64, y, 0.667, RHO, mask), F32_TOL, "k = V vs full KD")


def test_masked_rows_may_hold_garbage():
    hs, es, ht, et, y, mask = make_case(5)
    hs, ht, y = hs.copy(), ht.copy(), y.copy()
    hs[~mask], ht[~mask], y[~mask] = np.nan, np.inf, -7
    for impl in ("xla", "naive"):
        (_, (loss, _)), grads = _fn(impl, 7, blocks(7))(hs, es, ht, et, jnp.float32(0.5), y, mask,
                                                        np.ones(N, np.float32))
        assert np.isfinite(np.asarray(loss)).all() and not np.asarray(loss)[~mask].any()
        for g in grads[:2]:
            assert np.isfinite(np.asarray(g)).all(), impl


def test_bad_arguments():
    hs, es, ht, et, y, mask = make_case(6)
    for k in (0, V + 1, 2.0, True):
        with pytest.raises(ValueError, match="k must be an integer"):
            fused_linear_topk_kd_loss(hs, es, ht, et, y, 0.5, RHO, k)
    with pytest.raises(ValueError, match="vocab"):
        fused_linear_topk_kd_loss(hs, es, ht, et[:-1], y, 0.5, RHO, 3)
    with pytest.raises(ValueError, match="block_sizes"):
        fused_linear_topk_kd_loss(hs, es, ht, et, y, 0.5, RHO, 3, block_sizes=FusedKDBlockSizes())
    with pytest.raises(ValueError, match="chunk_vocab"):
        TopKBlockSizes(chunk_vocab=0)


def test_from_teacher_topk_and_lse():
    """The loss from a given top-k set (a teacher cache's) equals the loss from the teacher's hidden
    states; the scan's full-vocabulary lse(t) equals the float64 reference."""
    hs, es, ht, et, y, mask = make_case(7)
    t64 = logits64(ht, et)
    lse64 = np.log(np.exp(t64 - t64.max(axis=1, keepdims=True)).sum(axis=1)) + t64.max(axis=1)
    for impl in ("xla", "naive"):
        top, ids, lse = teacher_topk(ht, et, 7, impl=impl, chunk_vocab=128, with_lse=True)
        assert_close(lse, lse64, F32_TOL, f"lse ({impl})")
        want = fused_linear_topk_kd_loss(hs, es, ht, et, y, 0.667, RHO, 7, mask, impl=impl, block_sizes=blocks(7),
                                         return_parts=True)
        got = topk_kd_loss_from_teacher_topk(hs, es, top.astype(jnp.bfloat16).astype(jnp.float32), ids, y, 0.667,
                                             RHO, mask, impl=impl, block_sizes=blocks(7), return_parts=True)
        np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=BF16_TOL, atol=BF16_TOL)
        exact = topk_kd_loss_from_teacher_topk(hs, es, top, ids, y, 0.667, RHO, mask, impl=impl,
                                               block_sizes=blocks(7))
        np.testing.assert_allclose(np.asarray(exact), np.asarray(want[0]), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- the top-k kernel

def _kernel_topk(ht, et, k, block_sizes=KERNEL_BLOCKS, with_lse=True):
    return jax.jit(functools.partial(teacher_topk, k=k, impl="pallas", interpret=True, with_lse=with_lse,
                                     block_sizes=block_sizes))(ht, et)


def _lse64(t64):
    m = t64.max(axis=1)
    return np.log(np.exp(t64 - m[:, None]).sum(axis=1)) + m


@pytest.mark.slow
@pytest.mark.parametrize("k, block_sizes", [(1, KERNEL_BLOCKS), (7, KERNEL_BLOCKS), (V, KERNEL_BLOCKS),
                                            (7, TopKKernelBlockSizes(32, 256)), (130, TopKKernelBlockSizes())])
def test_topk_kernel_float32(k, block_sizes):
    """Kernel (interpret) vs the float64 reference and the xla scan: ids exactly equal (no near-ties
    in this case), values within 1e-5 of float64 and equal to the scan's, lse within 1e-5.  Ragged
    N and V; k = 1, k = V, k > 128 (two set lanes blocks); default blocks (one 48 x 384 tile)."""
    _, _, ht, et, _, _ = make_case(8)
    t64 = logits64(ht, et)
    want = ref.topk_indices(t64, k)
    top, ids, lse = _kernel_topk(ht, et, k, block_sizes)
    assert top.shape == ids.shape == (N, k) and top.dtype == jnp.float32 and ids.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(ids), want)
    assert_close(top, np.take_along_axis(t64, want, axis=1), F32_TOL, "kernel values")
    assert_close(lse, _lse64(t64), F32_TOL, "kernel lse")
    x_top, x_ids, x_lse = teacher_topk(ht, et, k, impl="xla", chunk_vocab=128, with_lse=True)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(x_ids))
    np.testing.assert_allclose(np.asarray(top), np.asarray(x_top), rtol=1e-6, atol=1e-6)


def test_topk_kernel_bfloat16():
    """bf16 inputs (f32 accumulation): the returned values are the float64 logits (of the bf16
    inputs) at the returned ids and the float64 top-k values, within the bf16 tolerance; the ids are
    distinct; lse within the bf16 tolerance."""
    _, _, ht, et, _, _ = make_case(9, dtype=ml_dtypes.bfloat16)
    t64 = logits64(ht, et)
    top, ids, lse = _kernel_topk(ht, et, 7)
    ids = np.asarray(ids)
    assert all(len(set(row)) == 7 for row in ids)
    assert_close(top, np.take_along_axis(t64, ids, axis=1), BF16_TOL, "values at the ids")
    assert_close(top, -np.sort(-t64, axis=1)[:, :7], BF16_TOL, "top values")
    assert_close(lse, _lse64(t64), BF16_TOL, "lse")


def test_topk_kernel_no_gradient():
    """jax.grad through the pallas path: zero teacher cotangents (the kernel's inputs are under
    stop_gradient).  (Interpret mode fills the block padding past N and V with NaN, so the ragged
    cases above also check that the padding never reaches the outputs.)"""
    _, _, ht, et, _, _ = make_case(10)
    grads = jax.grad(lambda a, b: _kernel_topk(a, b, 5)[0].sum(), argnums=(0, 1))(ht, et)
    assert not any(np.asarray(g).any() for g in grads)


def test_pallas_without_interpret_off_tpu_is_the_scan():
    """impl="pallas" lowered for CPU without interpret: the xla scan (lax.platform_dependent)."""
    _, _, ht, et, _, _ = make_case(11)
    got = jax.jit(functools.partial(teacher_topk, k=7, impl="pallas", chunk_vocab=128, with_lse=True))(ht, et)
    want = teacher_topk(ht, et, 7, impl="xla", chunk_vocab=128, with_lse=True)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_topk_kernel_block_sizes():
    for bad in ({"block_tokens": 12}, {"block_vocab": 100}, {"block_tokens": 0}, {"block_vocab": True}):
        with pytest.raises(ValueError, match="multiple"):
            TopKKernelBlockSizes(**bad)
    with pytest.raises(ValueError, match="topk"):
        TopKBlockSizes(topk=FusedKDBlockSizes())
    assert tile_sizes(37, 300, 16, 4, 7, TopKKernelBlockSizes()) == (48, 384)  # capped to the problem
    assert tile_sizes(2560, 256000, 1024, 2, 64, TopKKernelBlockSizes()) == (256, 512)
    assert tile_sizes(2560, 256000, 4096, 4, 64, TopKKernelBlockSizes()) == (128, 256)
