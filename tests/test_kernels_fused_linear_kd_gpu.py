"""The Pallas GPU (Triton) fused-linear KD / CE kernels (``impl="pallas_gpu"``) in interpret mode
against the float64 reference, at the tolerances of tests/kernel_tolerances.py; the impl decision
of ``--kernels auto`` / ``impl=None`` per platform; and the kernels lowered to Triton for an H100
on this CPU-only host (the GPU's description patched in: shapes, tile sizes and every primitive must
have a Triton lowering; compiling to PTX and running needs the GPU, bench/device_check.sh).

Run: ``PYTHONSAFEPATH=1 python -m pytest -q -n 0 tests/test_kernels_fused_linear_kd_gpu.py``
(jax 0.12.1 here; docs/gpu.md has the jax 0.11.2 command).
"""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from salt.kernels import _common
from salt.kernels import fused_linear_kd_gpu as G
from salt.kernels.fused_linear_kd import FusedKDBlockSizes, analytic_flops, fused_linear_kd_loss
from salt.reference import losses as ref
from kernel_tolerances import BF16_TOL, F32_TOL, assert_close
from matmul_count import matmul_flops
from test_kernels_fused_linear_kd import RAGGED, SMALL_BLOCKS, _loss_and_grads, check, check_ce, make_case

GPU = "pallas_gpu"
# backward chunks of 16 rows: 37 rows = 3 chunks (the last one padded), as on a GPU at large N
CHUNKED = FusedKDBlockSizes(block_tokens=16, block_vocab=128, chunk_vocab=128, gpu_chunk_tokens=16)


@pytest.mark.slow
@pytest.mark.parametrize("block_sizes", [SMALL_BLOCKS, CHUNKED], ids=["one-chunk", "chunks16"])
def test_ragged_float32(block_sizes):
    """Ragged tokens, vocab and hidden sizes (24 and 16 padded to the 16-wide ``tl.dot`` steps),
    masked, omega in {0, 0.667, 1}; 3 vocabulary splits merged (37 rows = 3 blocks of 16)."""
    check(GPU, make_case(*RAGGED, seed=1), (0.0, 0.667, 1.0), 0.25, F32_TOL, block_sizes=block_sizes,
          interpret=True)


def test_uneven_vocabulary_splits(monkeypatch):
    """Two splits of 3 vocabulary blocks over 5 (V = 600): the second split re-reads its last
    block past V (a static trip count) and must mask it out of the statistics."""
    monkeypatch.setattr(G, "TARGET_PROGRAMS", 2)  # one row block of 16: two splits
    check(GPU, make_case(16, 600, 24, 16, seed=10), (0.667,), 0.25, F32_TOL, interpret=True)


@pytest.mark.slow
@pytest.mark.parametrize("rho", [1.0, 4.0])
def test_rho_values(rho):
    check(GPU, make_case(21, 200, 16, 8, seed=2), (0.667, 1.0), rho, F32_TOL, interpret=True)


def test_bfloat16_inputs():
    case = make_case(30, 260, 32, 16, seed=3, dtype=ml_dtypes.bfloat16)
    check(GPU, tuple(jnp.asarray(a) for a in case[:4]) + case[4:], (0.667,), 0.25, BF16_TOL, interpret=True)


def test_logits_of_magnitude_1e4():
    """As test_kernels_fused_linear_kd.test_logits_of_magnitude_1e4: the split merge must not
    lose the precision of the online statistics either."""
    case = make_case(19, 150, 16, 8, seed=4, scale=1e7)
    check(GPU, case, (0.667,), 0.25, F32_TOL, interpret=True)


@pytest.fixture
def ce_interpreted(monkeypatch):
    """check_ce interprets impl "pallas" only: interpret the GPU kernel too."""
    import test_kernels_fused_linear_kd as base

    real = base._ce_and_grads
    monkeypatch.setattr(base, "_ce_and_grads", lambda impl, bs, interpret: real(impl, bs, interpret or impl == GPU))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cross_entropy_ragged(dtype, ce_interpreted):
    if dtype == "float32":
        check_ce(GPU, make_case(*RAGGED, seed=7), F32_TOL, block_sizes=CHUNKED)
    else:
        case = make_case(30, 260, 32, 16, seed=8, dtype=ml_dtypes.bfloat16)
        check_ce(GPU, tuple(jnp.asarray(a) for a in case[:4]) + case[4:], BF16_TOL)


def test_masked_rows_may_hold_garbage():
    hs, es, ht, et, y, mask = make_case(*RAGGED, seed=5)
    mask[:] = True
    mask[[3, 17]] = False
    hs[3] = np.nan
    ht[17] = np.inf
    y[3], y[17] = -1, 10**6
    fn = _loss_and_grads(GPU, 0.25, CHUNKED, True)
    (_, (loss, _)), (d_hs, d_es, _, _, d_omega) = fn(hs, es, ht, et, jnp.float32(0.667), y, mask,
                                                      np.ones(len(y), np.float32))
    for name, value in (("loss", loss), ("d_hs", d_hs), ("d_es", d_es), ("d_omega", d_omega)):
        assert np.isfinite(np.asarray(value)).all(), name
    assert not np.asarray(loss)[[3, 17]].any() and not np.asarray(d_hs)[[3, 17]].any()
    keep = mask
    s64 = hs[keep].astype(np.float64) @ es.astype(np.float64).T
    t64 = ht[keep].astype(np.float64) @ et.astype(np.float64).T
    assert_close(np.asarray(loss)[keep], ref.kd_loss(s64, t64, y[keep], 0.667, 0.25), F32_TOL, "loss")
    g = ref.kd_loss_grad(s64, t64, y[keep], 0.667, 0.25)
    assert_close(d_es, g.T @ hs[keep].astype(np.float64), F32_TOL, "d_es")


def test_analytic_flops_count_the_traced_matmuls():
    """Two logit passes (the forward kernel, the backward dS kernel) and the two gradient
    matmuls, counted from the traced program (kernel grids and the kernels' static loops
    multiplied through).  Shapes divisible by the tiles (a kernel computes whole tiles)."""
    from salt.kernels.logits_kd import bwd_flops, fwd_flops

    n, vocab, d_s, d_t = 64, 512, 32, 16
    blocks = FusedKDBlockSizes(block_tokens=32, block_vocab=128, chunk_vocab=128)
    S = jax.ShapeDtypeStruct

    def fwd_bwd(hs, es, ht, et, y):
        loss = lambda a, b: fused_linear_kd_loss(a, b, ht, et, y, 0.5, 0.25, impl=GPU,  # noqa: E731
                                                 interpret=True, block_sizes=blocks).sum()
        return jax.value_and_grad(loss, argnums=(0, 1))(hs, es)

    traced = matmul_flops(fwd_bwd, S((n, d_s), jnp.float32), S((vocab, d_s), jnp.float32),
                          S((n, d_t), jnp.float32), S((vocab, d_t), jnp.float32), S((n,), jnp.int32))
    elementwise = fwd_flops(n, vocab) + bwd_flops(n, vocab)
    assert analytic_flops(n, vocab, d_s, d_t, schedule=GPU) - elementwise == traced


def test_impl_decision_per_platform():
    """``impl=None`` / ``--kernels auto``: Pallas on TPU and GPU, xla elsewhere; "pallas" on a GPU
    is the GPU kernel for the fused-linear losses and the xla path for operations without one."""
    assert _common.default_impl("cpu") == "xla"
    assert _common.default_impl("tpu") == _common.default_impl("gpu") == "pallas"
    assert _common.resolve_impl(None, gpu_kernel=True, platform="gpu") == GPU
    assert _common.resolve_impl("pallas", gpu_kernel=False, platform="gpu") == "xla"
    assert _common.resolve_impl("pallas", gpu_kernel=True, platform="tpu") == "pallas"
    assert _common.resolve_impl("pallas", gpu_kernel=True, platform="cpu") == "pallas"  # interpret / TPU AOT
    assert _common.resolve_impl(GPU, gpu_kernel=True, platform="cpu") == GPU
    with pytest.raises(ValueError, match="impl"):
        _common.resolve_impl(GPU, gpu_kernel=False, platform="gpu")


def test_runtime_auto_uses_the_kernels_decision():
    from salt.runtime.train.config import resolve_kernels

    assert resolve_kernels("auto", "gpu") == "pallas" and resolve_kernels("auto", "cpu") == "xla"
    assert resolve_kernels("auto", "tpu") == "pallas"


@pytest.mark.parametrize("fields", [dict(block_tokens=24), dict(block_vocab=384)])
def test_gpu_tiles_must_be_powers_of_two(fields):
    case = make_case(20, 200, 16, 8, seed=6)
    with pytest.raises(ValueError, match="power of two"):
        fused_linear_kd_loss(*case[:5], 0.5, 0.25, impl=GPU, interpret=True,
                             block_sizes=FusedKDBlockSizes(**fields))


def test_default_gpu_blocks_at_the_benchmark_shapes():
    """Liger's shape and the paper's: no padding copies (V a multiple of bv), one dS chunk at Liger's
    shape in bf16, and chunks of whole token blocks under the byte budget."""
    for n, vocab, d_s, d_t in ((8192, 128256, 4096, 4096), (8192, 256000, 1024, 1024)):
        blk = G.choose_gpu_blocks(n, vocab, d_s, d_t, 2)
        assert vocab % blk.bv == 0 and d_s % blk.bk == 0 and d_t % blk.bk == 0 and n % blk.bt == 0
        assert blk.chunk % blk.bt == 0 and blk.chunk * vocab * 2 <= G.GRAD_CHUNK_BYTES
    assert G.choose_gpu_blocks(8192, 128256, 4096, 4096, 2).chunk == 8192


def _h100_lowering(monkeypatch):
    """Let the Triton lowering run here: it asks the local GPU for its compute capability."""
    try:
        import jax._src.pallas.triton.pallas_call_registration as reg
    except ImportError:
        pytest.skip("this jax has no Pallas Triton lowering")
    gpu_info = getattr(reg, "gpu_info_lib", None)
    if gpu_info is None or not hasattr(gpu_info, "get_gpu_info_from_version"):
        pytest.skip("this jax's Triton lowering has no GpuInfo hook to patch")
    info = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
    monkeypatch.setattr(gpu_info, "get_gpu_info", lambda: info)


@pytest.mark.parametrize("dtype, teacher", [("bfloat16", True), ("float32", True), ("bfloat16", False)])
def test_kernels_lower_to_triton_for_an_h100(monkeypatch, dtype, teacher):
    """Both kernels (forward statistics, backward dS) at default tiles lower to a Triton module."""
    _h100_lowering(monkeypatch)
    S = jax.ShapeDtypeStruct
    n, vocab, d_s, d_t = 256, 1000, 192, 128  # ragged vocab, hidden sizes multiples of bk
    dt = jnp.dtype(dtype)
    blk = G.choose_gpu_blocks(n, vocab, d_s, d_t if teacher else 0, dt.itemsize)
    mats = (S((n, d_s), dt), S((vocab, d_s), dt)) + ((S((n, d_t), dt), S((vocab, d_t), dt)) if teacher else ())
    vec = (S((n,), jnp.int32), S((n,), jnp.float32))

    def fwd(*a):
        t = (a[2], a[3]) if teacher else None
        return G.stats(a[0], a[1], t, a[-2], a[-1], 0.25, blk, False)

    def bwd(*a):
        t = (a[2], a[3]) if teacher else None
        rows = {k: a[-1] for k in ("m_s", "log_l_s", "g_p", "g_y") + (("m_t", "log_l_t", "g_q") if teacher else ())}
        return G.dlogits(a[0], a[1], t, a[-2], rows, 0.25, blk, False)

    for fn in (fwd, bwd):
        text = jax.jit(fn).trace(*mats, *vec).lower(lowering_platforms=("cuda",)).as_text()
        assert "__gpu$xla.gpu.triton" in text, fn.__name__
