"""salt.kernels.fused_linear_kd_loss against the float64 reference (salt.reference.losses applied
to float64 logits ``h @ E.T``), with gradients for the student hidden states and embedding.

Pallas kernels run in interpret mode (one case under the TPU interpreter with race detection).
Fixed tolerances: float32 inputs 1e-5 relative (absolute floor 1e-5), bfloat16 inputs 2e-2.
"""
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from salt.kernels._common import VMEM_BUDGET_BYTES, choose_blocks
from salt.kernels.fused_linear_kd import FusedKDBlockSizes, fused_linear_ce_loss, fused_linear_kd_loss
from salt.kernels.fused_linear_kd.tpu import tile_sizes, vmem_estimate
from salt.reference import losses as ref
from salt.reference import score as ref_score
from kernel_tolerances import BF16_TOL, F32_TOL, assert_close
from matmul_count import matmul_flops

SMALL_BLOCKS = FusedKDBlockSizes(block_tokens=16, block_vocab=128, chunk_vocab=128)


@functools.lru_cache(maxsize=None)
def _loss_and_grads(impl, rho, block_sizes, interpret):
    def objective(hs, es, ht, et, omega, y, mask, w):
        loss, parts = fused_linear_kd_loss(hs, es, ht, et, y, omega, rho, mask, impl=impl, interpret=interpret,
                                           block_sizes=block_sizes, return_parts=True)
        return jnp.sum(w * loss), (loss, parts)

    return jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2, 3, 4), has_aux=True))


def make_case(n, vocab, d_s, d_t, seed, scale=1.0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    arrays = [rng.normal(size=shape) / np.sqrt(shape[1]) * np.sqrt(scale) * 3.0
              for shape in ((n, d_s), (vocab, d_s), (n, d_t), (vocab, d_t))]
    hs, es, ht, et = (a.astype(dtype) for a in arrays)
    y = rng.integers(0, vocab, size=n).astype(np.int32)
    mask = rng.random(n) > 0.25
    return hs, es, ht, et, y, mask


def check(impl, case, omegas, rho, tol, block_sizes=SMALL_BLOCKS, interpret=None):
    hs, es, ht, et, y, mask = case
    if interpret is None:
        interpret = impl == "pallas"
    fn = _loss_and_grads(impl, rho, block_sizes, interpret)
    w = np.random.default_rng(11).uniform(0.5, 1.5, size=y.shape).astype(np.float32)
    hs64, es64, ht64, et64 = (np.asarray(a, dtype=np.float64) for a in (hs, es, ht, et))
    s64, t64 = hs64 @ es64.T, ht64 @ et64.T
    for omega in omegas:
        (_, (loss, parts)), grads = fn(hs, es, ht, et, jnp.float32(omega), y, mask, w)
        d_hs, d_es, d_ht, d_et, d_omega = grads
        expected = ref.loss_parts(s64, t64, y, omega, rho, mask)
        assert_close(loss, expected["loss"], tol, f"loss (omega={omega})")
        for name in ("ce", "kd", "kl"):
            assert_close(parts[name], expected[name], tol, f"{name} (omega={omega})")
        check_ranks(parts, s64, y, mask)
        g_logits = ref.kd_loss_grad(s64, t64, y, omega, rho, mask) * w[:, None]
        assert d_hs.dtype == hs.dtype and d_es.dtype == es.dtype
        assert_close(d_hs, g_logits @ es64, tol, f"d student_hidden (omega={omega})")
        assert_close(d_es, g_logits.T @ hs64, tol, f"d student_embedding (omega={omega})")
        assert not np.asarray(d_ht, np.float64).any() and not np.asarray(d_et, np.float64).any(), \
            "gradient leaked into the teacher"
        assert_close(d_omega, np.sum(w * (expected["kd"] - expected["ce"])), tol * float(np.sum(w)),
                     "d omega")


def check_ranks(parts, s64, y, mask):
    """``correct`` = (argmax == label) and ``n_greater`` (logits strictly above the label's) against
    float64 logits; the top-k memberships they imply against salt.reference.score."""
    keep = np.asarray(mask, bool)
    correct = np.asarray(parts["correct"])
    n_greater = np.asarray(parts["n_greater"])
    np.testing.assert_array_equal(correct[keep], (np.argmax(s64, axis=1) == y)[keep].astype(np.float32))
    s_y = np.take_along_axis(s64, y[:, None].clip(0, s64.shape[1] - 1), axis=1)
    np.testing.assert_array_equal(n_greater[keep], np.sum(s64 > s_y, axis=1)[keep])
    assert not correct[~keep].any() and not n_greater[~keep].any()
    for k in (1, 5):
        _, in_topk = ref_score.token_costs(s64[keep][None], y[keep][None], k)
        np.testing.assert_array_equal(n_greater[keep] < k, in_topk[0], err_msg=f"top-{k}")


@functools.lru_cache(maxsize=None)
def _ce_and_grads(impl, block_sizes, interpret):
    def objective(hs, es, y, mask, w):
        loss, parts = fused_linear_ce_loss(hs, es, y, mask, impl=impl, interpret=interpret,
                                           block_sizes=block_sizes, return_parts=True)
        return jnp.sum(w * loss), (loss, parts)

    return jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))


def check_ce(impl, case, tol, block_sizes=SMALL_BLOCKS):
    hs, es, _, _, y, mask = case
    fn = _ce_and_grads(impl, block_sizes, impl == "pallas")
    w = np.random.default_rng(12).uniform(0.5, 1.5, size=y.shape).astype(np.float32)
    hs64, es64 = (np.asarray(a, dtype=np.float64) for a in (hs, es))
    s64 = hs64 @ es64.T
    (_, (loss, parts)), (d_hs, d_es) = fn(hs, es, y, mask, w)
    expected = ref.ce_loss(s64, y, mask)
    assert_close(loss, expected, tol, "ce loss")
    assert_close(parts["ce"], expected, tol, "ce part")
    assert set(parts) == {"ce", "correct", "n_greater"}
    check_ranks(parts, s64, y, mask)
    g_logits = ref.ce_loss_grad(s64, y, mask) * w[:, None]
    assert d_hs.dtype == hs.dtype and d_es.dtype == es.dtype
    assert_close(d_hs, g_logits @ es64, tol, "d hidden")
    assert_close(d_es, g_logits.T @ hs64, tol, "d embedding")


# 37 tokens x 300 vocab, D_s=24 != D_t=16 with blocks 16 x 128 (xla chunks 128): ragged in tokens
# and vocab.  The float32 cases share this shape (and rho), so each impl compiles once for them.
RAGGED = (37, 300, 24, 16)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["xla", "naive", "pallas"])
def test_ragged_float32(impl):
    """Ragged in tokens and vocab, masked, omega in {0, 0.667, 1}."""
    case = make_case(*RAGGED, seed=1)
    check(impl, case, (0.0, 0.667, 1.0), 0.25, F32_TOL)  # omega is traced: one compile


@pytest.mark.slow
@pytest.mark.parametrize("impl, rho", [("xla", 1.0), ("xla", 4.0), ("pallas", 4.0)])
def test_rho_values(impl, rho):
    check(impl, make_case(21, 200, 16, 8, seed=2), (0.667, 1.0), rho, F32_TOL)


@pytest.mark.parametrize("impl", ["xla", "naive", "pallas"])
def test_bfloat16_inputs(impl):
    case = make_case(30, 260, 32, 16, seed=3, dtype=ml_dtypes.bfloat16)
    check(impl, tuple(jnp.asarray(a) for a in case[:4]) + case[4:], (0.667,), 0.25, BF16_TOL)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_logits_of_magnitude_1e4(impl):
    """Hidden states/embeddings scaled so that the logits are large (standard deviation ~2e7, so
    at least 1e4): the online statistics must neither overflow nor lose the loss's precision.
    (Softmaxes of such rows are nearly one-hot.  Logits ~1e4 with a non-trivial softmax cannot
    meet 1e-5 in float32 here: the f32 matmul's rounding of a 1e4 logit is ~1e-3, which shows in
    P; kd_loss's own 1e4 test, on exact logits, covers that precision of the shared statistics.)"""
    case = make_case(19, 150, 16, 8, seed=4, scale=1e7)
    hs, es = (a.astype(np.float64) for a in case[:2])
    assert np.abs(hs @ es.T).std() > 1e4
    check(impl, case, (0.667,), 0.25, F32_TOL)


# the xla path in row blocks: 37 = 2 x 16 + 5 (the last block padded), 37 = 3 x 13 - 2, one block
ROW_BLOCKS = [FusedKDBlockSizes(chunk_vocab=128, xla_block_tokens=b) for b in (16, 13, None)]


@pytest.mark.slow
@pytest.mark.parametrize("block_sizes", ROW_BLOCKS, ids=["rows16", "rows13", "rows-all"])
def test_xla_row_blocks(block_sizes):
    """The xla path's row blocks (``xla_block_tokens``), ragged and padded: KD and CE loss, parts and
    gradients against the float64 reference, as in one block."""
    case = make_case(*RAGGED, seed=21)
    check("xla", case, (0.0, 0.667), 0.25, F32_TOL, block_sizes=block_sizes)
    check_ce("xla", case, F32_TOL, block_sizes=block_sizes)


@pytest.mark.parametrize("impl", ["xla", "naive", "pallas"])
def test_masked_rows_may_hold_garbage(impl):
    hs, es, ht, et, y, mask = make_case(*RAGGED, seed=5)
    mask[:] = True
    mask[[3, 17]] = False
    hs[3] = np.nan
    ht[17] = np.inf
    y[3], y[17] = -1, 10**6
    blocks = [SMALL_BLOCKS] + (ROW_BLOCKS[:1] if impl == "xla" else [])  # garbage rows inside a row block too
    for block_sizes in blocks:
        fn = _loss_and_grads(impl, 0.25, block_sizes, impl == "pallas")
        (_, (loss, _)), (d_hs, d_es, _, _, d_omega) = fn(hs, es, ht, et, jnp.float32(0.667), y, mask,
                                                          np.ones(len(y), np.float32))
        for name, value in (("loss", loss), ("d_hs", d_hs), ("d_es", d_es), ("d_omega", d_omega)):
            assert np.isfinite(np.asarray(value)).all(), (name, block_sizes)
        assert not np.asarray(loss)[[3, 17]].any() and not np.asarray(d_hs)[[3, 17]].any()
        keep = mask
        s64 = hs[keep].astype(np.float64) @ es.astype(np.float64).T
        t64 = ht[keep].astype(np.float64) @ et.astype(np.float64).T
        assert_close(np.asarray(loss)[keep], ref.kd_loss(s64, t64, y[keep], 0.667, 0.25), F32_TOL, "loss")
        g = ref.kd_loss_grad(s64, t64, y[keep], 0.667, 0.25)
        assert_close(d_es, g.T @ hs[keep].astype(np.float64), F32_TOL, "d_es")


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["xla", "naive", "pallas"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cross_entropy_ragged(impl, dtype):
    """fused_linear_ce_loss (the standard step's, score's and eval's loss): ragged tokens and
    vocab, masked, f32 and bf16 inputs; loss, gradients, accuracy and ranks vs the reference."""
    if dtype == "float32":
        check_ce(impl, make_case(*RAGGED, seed=7), F32_TOL)
    else:
        case = make_case(30, 260, 32, 16, seed=8, dtype=ml_dtypes.bfloat16)
        check_ce(impl, tuple(jnp.asarray(a) for a in case[:4]) + case[4:], BF16_TOL)


def test_ranks_with_ties_and_first_argmax():
    """Equal embedding rows give tied logits: ``correct`` follows the FIRST maximum (as argmax),
    ``n_greater`` counts only strictly greater logits, across vocab blocks."""
    hs, es, _, _, y, _ = make_case(16, 300, 8, 8, seed=9)
    es /= np.linalg.norm(es, axis=1, keepdims=True)  # unit rows: h = E[3] makes column 3 the maximum
    es[250] = es[3]            # column 250 ties column 3 (different vocab blocks of 128)
    hs[:] = es[3] * 4.0
    y[:8], y[8:] = 3, 250
    for impl in ("xla", "naive", "pallas"):
        _, parts = fused_linear_ce_loss(hs, es, y, impl=impl, interpret=True, block_sizes=SMALL_BLOCKS,
                                        return_parts=True)
        np.testing.assert_array_equal(np.asarray(parts["correct"]), [1.0] * 8 + [0.0] * 8, err_msg=impl)
        np.testing.assert_array_equal(np.asarray(parts["n_greater"]), 0.0, err_msg=impl)


def test_tpu_interpreter_race_detection():
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret

    params = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")
    check("pallas", make_case(20, 200, 16, 8, seed=6), (0.667,), 0.25, F32_TOL, interpret=params)
    assert tpu_interpret.races is not None and not tpu_interpret.races.races_found


@pytest.mark.parametrize("impl", ["pallas", "xla", "naive"])
def test_analytic_flops_count_the_traced_matmuls(impl):
    """``analytic_flops`` minus its elementwise estimate equals the matmul flops of the traced
    forward + backward (dot_generals walked through the xla scans and the Pallas grids): 3 logit
    passes for pallas (forward + two backward kernels), 2 for xla, 1 for naive, plus the two
    gradient matmuls.  Shapes divisible by the blocks (a Pallas grid computes whole blocks)."""
    from salt.kernels import fused_linear_kd as F
    from salt.kernels.logits_kd import bwd_flops, fwd_flops

    n, vocab, d_s, d_t = 64, 512, 32, 16
    blocks = FusedKDBlockSizes(block_tokens=32, block_vocab=128, chunk_vocab=128)
    S = jax.ShapeDtypeStruct

    def fwd_bwd(hs, es, ht, et, y):
        loss = lambda a, b: fused_linear_kd_loss(a, b, ht, et, y, 0.5, 0.25, impl=impl,  # noqa: E731
                                                 interpret=True, block_sizes=blocks).sum()
        return jax.value_and_grad(loss, argnums=(0, 1))(hs, es)

    traced = matmul_flops(fwd_bwd, S((n, d_s), jnp.float32), S((vocab, d_s), jnp.float32),
                          S((n, d_t), jnp.float32), S((vocab, d_t), jnp.float32), S((n,), jnp.int32))
    elementwise = fwd_flops(n, vocab) + (2 if impl == "pallas" else 1) * bwd_flops(n, vocab)
    assert F.analytic_flops(n, vocab, d_s, d_t, schedule=impl) - elementwise == traced


def test_the_one_block_choice_rule():
    """salt.kernels._common.choose_blocks, which every Pallas TPU loss kernel's default tiles come from."""
    options = dict(token_options=(64, 32), vocab_options=(256, 128))
    at_most = lambda area: lambda bt, bv: 0 if bt * bv <= area else VMEM_BUDGET_BYTES + 1  # noqa: E731
    assert choose_blocks(4096, 4096, **options) == (64, 256)                       # all fit: the largest
    assert choose_blocks(4096, 4096, **options, vmem_bytes=at_most(64 * 128), prefer="tokens") == (64, 128)
    assert choose_blocks(4096, 4096, **options, vmem_bytes=at_most(64 * 128), prefer="vocab") == (32, 256)
    assert choose_blocks(4096, 4096, **options, vmem_bytes=at_most(0)) == (32, 128)  # none fits: smallest
    assert choose_blocks(4096, 4096, **options, vmem_bytes=at_most(0), none_fit="largest") == (64, 256)
    assert choose_blocks(20, 200, **options) == (32, 256)        # capped at N, V rounded up to whole tiles
    assert choose_blocks(20, 200, 16, 128, **options) == (16, 128)                # given sizes are kept


def test_default_block_choice_fits_budget_and_prefers_token_rows():
    for d_s, d_t, itemsize in ((1024, 1024, 2), (4096, 1024, 2), (4096, 1024, 4), (256, 128, 4)):
        bt, bv = tile_sizes(8192, 256000, d_s, d_t, itemsize, FusedKDBlockSizes())
        assert bt % 16 == 0 and bv % 128 == 0
        assert vmem_estimate(bt, bv, d_s, d_t, itemsize) <= VMEM_BUDGET_BYTES
    assert tile_sizes(40, 300, 64, 32, 4, FusedKDBlockSizes()) == (48, 384)  # capped to the problem
    assert tile_sizes(8192, 256000, 64, 32, 4, FusedKDBlockSizes(block_tokens=32)) == (32, 512)


@pytest.mark.parametrize("kwargs, match", [
    (dict(impl="triton"), "impl"),
    (dict(rho=-1.0), "rho"),
    (dict(omega=-0.1), "omega"),
    (dict(student_embedding=np.zeros((10, 5), np.float32)), "disagree on D_s"),
    (dict(teacher_embedding=np.zeros((10, 3), np.float32)), "disagree on D_t"),
    (dict(teacher_hidden=np.zeros((7, 4), np.float32)), "tokens"),
    (dict(teacher_embedding=np.zeros((11, 4), np.float32)), "vocab"),
    (dict(student_hidden=np.zeros((6,), np.float32)), "2-D"),
    (dict(labels=np.zeros(5, np.int32)), "labels shape"),
    (dict(mask=np.ones(5, bool)), "mask shape"),
    (dict(block_sizes=(16, 128)), "FusedKDBlockSizes"),
])
def test_bad_input(kwargs, match):
    args = dict(student_hidden=np.zeros((6, 8), np.float32), student_embedding=np.zeros((10, 8), np.float32),
                teacher_hidden=np.zeros((6, 4), np.float32), teacher_embedding=np.zeros((10, 4), np.float32),
                labels=np.zeros(6, np.int32), omega=0.5, rho=0.25, mask=None)
    extra = {k: kwargs.pop(k) for k in ("impl", "block_sizes") if k in kwargs}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fused_linear_kd_loss(**args, **extra)


@pytest.mark.parametrize("fields, match", [
    (dict(block_tokens=20), "block_tokens"), (dict(block_vocab=64), "block_vocab"),
    (dict(chunk_vocab=-1), "chunk_vocab"), (dict(xla_block_tokens=0), "xla_block_tokens"),
    (dict(xla_block_tokens=True), "xla_block_tokens")])
def test_bad_block_sizes(fields, match):
    with pytest.raises(ValueError, match=match):
        FusedKDBlockSizes(**fields)
