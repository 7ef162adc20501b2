"""salt.kernels.kd_loss (kernels/logits_kd.py) against the float64 reference and its golden file.

Pallas kernels run in interpret mode on the CPU (one case also under the TPU interpreter with race
detection).  Tolerances are fixed: float32 inputs 1e-5 relative (absolute floor 1e-5), bfloat16
inputs 2e-2.  Every checked array must be finite.
"""
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from salt.kernels.logits_kd import KDBlockSizes, default_impl, kd_loss
from salt.reference import losses as ref
from kernel_tolerances import BF16_TOL, F32_TOL, assert_close

# small tiles so that the tiny test shapes are ragged in tokens and vocabulary
SMALL_BLOCKS = KDBlockSizes(block_tokens=16, block_vocab=128, chunk_vocab=128)


@functools.lru_cache(maxsize=None)
def _loss_and_grads(impl, rho, block_sizes, interpret):
    """jit(value_and_grad) of sum(w * loss) w.r.t. (student, teacher, omega); omega is traced."""

    def objective(s, t, omega, y, mask, w):
        loss, parts = kd_loss(s, t, y, omega, rho, mask, impl=impl, interpret=interpret,
                              block_sizes=block_sizes, return_parts=True)
        return jnp.sum(w * loss), (loss, parts)

    return jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True))


def run(impl, s, t, y, omega, rho, mask, w, block_sizes=SMALL_BLOCKS, interpret=None):
    if interpret is None:
        interpret = impl == "pallas"
    fn = _loss_and_grads(impl, rho, block_sizes, interpret)
    (_, (loss, parts)), (g_s, g_t, g_omega) = fn(s, t, jnp.float32(omega), y, mask, w)
    return loss, parts, g_s, g_t, g_omega


def check_against_reference(impl, s, t, y, omega, rho, mask, tol, **kw):
    """Forward (loss, ce, kd, kl) and gradients (student, teacher = 0, omega) vs float64."""
    rng = np.random.default_rng(7)
    w = rng.uniform(0.5, 1.5, size=y.shape).astype(np.float32)
    loss, parts, g_s, g_t, g_omega = run(impl, s, t, y, omega, rho, mask, w, **kw)
    s64 = np.asarray(s, dtype=np.float64)
    t64 = np.asarray(t, dtype=np.float64)
    expected = ref.loss_parts(s64, t64, y, omega, rho, mask)
    assert loss.dtype == jnp.float32 and loss.shape == y.shape
    assert_close(loss, expected["loss"], tol, "loss")
    for name in ("ce", "kd", "kl"):
        assert_close(parts[name], expected[name], tol, name)
    grad = ref.kd_loss_grad(s64, t64, y, omega, rho, mask) * w[..., None]
    assert g_s.dtype == s.dtype
    assert_close(g_s, grad, tol, "d loss / d student_logits")
    assert not np.asarray(g_t, dtype=np.float64).any(), "gradient leaked into the teacher"
    d_omega = np.sum(w * (expected["kd"] - expected["ce"]))
    assert_close(g_omega, d_omega, tol * max(1.0, float(np.sum(w))), "d loss / d omega")


def random_case(shape, vocab, scale, seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    s = (rng.normal(size=shape + (vocab,)) * scale).astype(dtype)
    t = (rng.normal(size=shape + (vocab,)) * scale).astype(dtype)
    y = rng.integers(0, vocab, size=shape).astype(np.int32)
    mask = rng.random(shape) > 0.25
    return s, t, y, mask


# ----------------------------------------------------------------------------- golden file

@pytest.fixture
def golden(golden_dir):
    with np.load(golden_dir / "losses.npz", allow_pickle=False) as data:
        return dict(data)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["xla", "naive"])
@pytest.mark.parametrize("case", ["v37", "v1000"])
def test_golden_grid(golden, case, impl):
    """All (omega, rho) pairs of the golden file, float32 inputs, ragged chunks (V=37 by 16)."""
    s = golden[f"{case}/student_logits"].astype(np.float32)
    t = golden[f"{case}/teacher_logits"].astype(np.float32)
    y, mask = golden[f"{case}/labels"], golden[f"{case}/mask"]
    blocks = KDBlockSizes(16, 128, chunk_vocab=16 if s.shape[-1] < 100 else 128)
    for i, (omega, rho) in enumerate(zip(golden[f"{case}/omegas"], golden[f"{case}/rhos"])):
        w = np.ones(y.shape, np.float32)
        loss, parts, g_s, _, _ = run(impl, s, t, y, float(omega), float(rho), mask, w, block_sizes=blocks)
        assert_close(loss, golden[f"{case}/kd_loss"][i], F32_TOL, f"{case} loss #{i}")
        assert_close(parts["kl"], golden[f"{case}/kl"][i], F32_TOL, f"{case} kl #{i}")
        assert_close(g_s, golden[f"{case}/kd_grad"][i], F32_TOL, f"{case} grad #{i}")
        mean = np.sum(np.asarray(loss, np.float64)) / mask.sum()
        assert_close(mean, golden[f"{case}/kd_mean_loss"][i], F32_TOL, f"{case} mean #{i}")


def test_golden_v1000_pallas(golden):
    """Pallas (interpret) on the golden V=1000 case: 8 vocab blocks, the last one ragged."""
    s = golden["v1000/student_logits"].astype(np.float32)
    t = golden["v1000/teacher_logits"].astype(np.float32)
    y, mask = golden["v1000/labels"], golden["v1000/mask"]
    for i, (omega, rho) in enumerate(zip(golden["v1000/omegas"], golden["v1000/rhos"])):
        if rho != 0.25:  # one compile (omega is traced); the other rhos are covered below
            continue
        w = np.ones(y.shape, np.float32)
        loss, _, g_s, _, _ = run("pallas", s, t, y, float(omega), 0.25, mask, w,
                                 block_sizes=KDBlockSizes(8, 128))
        assert_close(loss, golden["v1000/kd_loss"][i], F32_TOL, f"loss #{i}")
        assert_close(g_s, golden["v1000/kd_grad"][i], F32_TOL, f"grad #{i}")


# ----------------------------------------------------------------------------- random cases

@pytest.mark.parametrize("impl", ["xla", "naive", "pallas"])
def test_ragged_float32(impl):
    """39 tokens x 300 vocab (blocks 16 x 128, xla chunks of 128): ragged in both, with a mask."""
    s, t, y, mask = random_case((3, 13), 300, 3.0, seed=1)
    for omega in ((0.0, 0.667, 1.0) if impl != "pallas" else (0.667,)):
        check_against_reference(impl, s, t, y, omega, 0.25, mask, F32_TOL)


@pytest.mark.parametrize("impl, rho", [("xla", 1.0), ("xla", 4.0), ("pallas", 4.0)])
def test_rho_values(impl, rho):
    s, t, y, mask = random_case((21,), 200, 2.0, seed=2)
    for omega in (0.0, 0.667, 1.0):  # omega is traced: one compile per rho
        check_against_reference(impl, s, t, y, omega, rho, mask, F32_TOL)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_bfloat16_inputs(impl):
    s, t, y, mask = random_case((2, 11), 260, 3.0, seed=3, dtype=ml_dtypes.bfloat16)
    check_against_reference(impl, jnp.asarray(s), jnp.asarray(t), y, 0.667, 0.25, mask, BF16_TOL)


@pytest.mark.parametrize("impl", ["xla", "naive", "pallas"])
def test_logits_of_magnitude_1e4(impl):
    """Logits ~1e4 (f32 spacing 1e-3 there): one row all-equal (loss = log V), one row where the
    student's max is the label, and random rows; float32 inputs, still 1e-5 relative."""
    s, t, y, mask = random_case((9,), 150, 1e4, seed=4)
    s[0] = 1e4                      # all equal: ce = log V exactly
    s[1, y[1]] = s[1].max() + 5.0   # confident and right: small loss on top of 1e4 logits
    t[1] = s[1]
    mask[:2] = True
    for omega in ((0.0, 0.667, 1.0) if impl != "pallas" else (0.667,)):
        check_against_reference(impl, s, t, y, omega, 0.25, mask, F32_TOL)


@pytest.mark.parametrize("impl", ["xla", "naive", "pallas"])
def test_masked_rows_may_hold_garbage(impl):
    """Masked positions: NaN/inf logits and out-of-range labels give loss 0 and zero gradient."""
    s, t, y, mask = random_case((17,), 140, 3.0, seed=5)
    mask[:] = True
    mask[[2, 9]] = False
    s[2] = np.nan
    t[9] = np.inf
    y[2], y[9] = -1, 10**6
    w = np.ones(y.shape, np.float32)
    loss, parts, g_s, _, g_omega = run(impl, s, t, y, 0.667, 0.25, mask, w)
    assert np.isfinite(np.asarray(loss)).all() and np.isfinite(np.asarray(g_s)).all()
    assert np.isfinite(float(g_omega))
    assert not np.asarray(loss)[[2, 9]].any() and not np.asarray(g_s)[[2, 9]].any()
    assert all(not np.asarray(p)[[2, 9]].any() for p in parts.values())
    keep = mask
    expected = ref.kd_loss(s[keep], t[keep], y[keep], 0.667, 0.25)
    assert_close(np.asarray(loss)[keep], expected, F32_TOL, "unmasked loss")


def test_tpu_interpreter_race_detection():
    """The TPU interpreter (simulated VMEM/DMA, uninitialised memory = NaN, race detector)."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret

    params = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")
    s, t, y, mask = random_case((20,), 200, 3.0, seed=6)
    check_against_reference("pallas", s, t, y, 0.667, 0.25, mask, F32_TOL, interpret=params)
    assert tpu_interpret.races is not None and not tpu_interpret.races.races_found


# ----------------------------------------------------------------------------- interface

def test_default_impl_is_xla_on_cpu():
    assert default_impl() == "xla"


def test_traced_omega_matches_python_omega():
    s, t, y, mask = random_case((4, 5), 64, 2.0, seed=8)
    f = jax.jit(lambda omega: kd_loss(s, t, y, omega, 0.25, mask))
    traced = np.asarray(f(jnp.float32(0.667)))
    eager = np.asarray(kd_loss(s, t, y, 0.667, 0.25, mask))
    np.testing.assert_allclose(traced, eager, rtol=1e-6, atol=1e-6)  # same maths, other fusion


def test_default_blocks_and_no_mask():
    s, t, y, _ = random_case((5, 7), 300, 2.0, seed=9)
    loss = kd_loss(s, t, y, 0.5, 1.0, impl="xla")
    assert_close(loss, ref.kd_loss(s, t, y, 0.5, 1.0), F32_TOL, "loss")


@pytest.mark.parametrize("kwargs, match", [
    (dict(impl="cuda"), "impl"),
    (dict(rho=0.0), "rho"),
    (dict(rho=jnp.float32(0.25)), "rho"),
    (dict(omega=1.5), "omega"),
    (dict(omega=jnp.ones(2)), "omega"),
    (dict(teacher_logits=np.zeros((3, 9), np.float32)), "teacher_logits shape"),
    (dict(labels=np.zeros(4, np.int32)), "labels shape"),
    (dict(labels=np.zeros(3, np.float32)), "labels must be integers"),
    (dict(mask=np.ones(4, bool)), "mask shape"),
    (dict(student_logits=np.zeros((3, 8), np.int32)), "student_logits must be a floating"),
    (dict(block_sizes="big"), "block_sizes"),
])
def test_bad_input(kwargs, match):
    args = dict(student_logits=np.zeros((3, 8), np.float32), teacher_logits=np.zeros((3, 8), np.float32),
                labels=np.zeros(3, np.int32), omega=0.5, rho=0.25, mask=None)
    extra = {k: kwargs.pop(k) for k in ("impl", "block_sizes") if k in kwargs}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        kd_loss(**args, **extra)


@pytest.mark.parametrize("fields, match", [
    (dict(block_tokens=12), "block_tokens"), (dict(block_vocab=100), "block_vocab"),
    (dict(chunk_vocab=0), "chunk_vocab")])
def test_bad_block_sizes(fields, match):
    with pytest.raises(ValueError, match=match):
        KDBlockSizes(**fields)
