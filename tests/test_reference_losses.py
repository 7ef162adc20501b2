"""Reference losses: values against independent extended-precision formulas, finite-difference
gradients in float64, magnitudes 1e4, masks, top-k semantics, and every bad-input error."""
import ml_dtypes
import numpy as np
import pytest

from salt.reference.losses import (
    ce_loss, ce_loss_grad, kd_loss, kd_loss_grad, kl_monitor, log_softmax, loss_parts,
    mean_over_mask, topk_indices, topk_kd_loss, topk_kd_loss_grad)

OMEGAS = (0.0, 0.667, 1.0)
RHOS = (0.05, 0.25, 1.0, 4.0)
LD = np.longdouble  # 80-bit extended on x86: ~3 more decimal digits than float64


def _batch(seed, shape=(2, 3), vocab=11, scale=3.0):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=shape + (vocab,)) * scale
    t = rng.normal(size=shape + (vocab,)) * scale
    y = rng.integers(0, vocab, size=shape)
    return s, t, y


# ----------------------------------------------------------------------------- independent formulas

def _lse_ld(x):
    x = np.asarray(x, dtype=LD)
    m = x.max(axis=-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))[..., 0]


def _softmax_ld(x):
    x = np.asarray(x, dtype=LD)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _kd_ld(s, t, y, omega, rho):
    """The docs/design.md §2 formula written literally: lse(s) - [(1-w) s_y + w sum Q s]."""
    s = np.asarray(s, dtype=LD)
    q = _softmax_ld(LD(rho) * np.asarray(t, dtype=LD))
    s_y = np.take_along_axis(s, y[..., None], axis=-1)[..., 0]
    return _lse_ld(s) - ((1 - LD(omega)) * s_y + LD(omega) * (q * s).sum(axis=-1))


def _grad_ld(s, t, y, omega, rho):
    p = _softmax_ld(s)
    q = _softmax_ld(LD(rho) * np.asarray(t, dtype=LD))
    onehot = np.eye(s.shape[-1], dtype=LD)[y]
    return p - (1 - LD(omega)) * onehot - LD(omega) * q


def _central_difference(f, s, h=1e-5):
    """d f(s)[position] / d s[position, v] for every entry (f returns per-position values)."""
    grad = np.zeros_like(s)
    for index in np.ndindex(s.shape):
        plus, minus = s.copy(), s.copy()
        plus[index] += h
        minus[index] -= h
        grad[index] = (f(plus)[index[:-1]] - f(minus)[index[:-1]]) / (2 * h)
    return grad


# ----------------------------------------------------------------------------- values

@pytest.mark.parametrize("omega", OMEGAS)
@pytest.mark.parametrize("rho", RHOS)
def test_kd_loss_matches_extended_precision(omega, rho):
    s, t, y = _batch(1)
    got = kd_loss(s, t, y, omega, rho)
    assert got.dtype == np.float64 and got.shape == y.shape
    np.testing.assert_allclose(got, _kd_ld(s, t, y, omega, rho).astype(np.float64), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("omega", OMEGAS)
@pytest.mark.parametrize("rho", (0.05, 0.25, 4.0))
def test_kd_loss_and_grad_at_magnitude_1e4(omega, rho):
    s, t, y = _batch(2, scale=1e4)
    s[0, 0, 3] = s[0, 0].max() + 5e3  # a very confident row
    y[0, 0] = 3
    loss = kd_loss(s, t, y, omega, rho)
    grad = kd_loss_grad(s, t, y, omega, rho)
    assert np.isfinite(loss).all() and np.isfinite(grad).all()
    want = _kd_ld(s, t, y, omega, rho).astype(np.float64)
    # the literal formula cancels ~1e4-sized terms: its own error is ~1e4 * 1e-19
    np.testing.assert_allclose(loss, want, rtol=1e-13, atol=1e-11)
    np.testing.assert_allclose(grad, _grad_ld(s, t, y, omega, rho).astype(np.float64), rtol=0, atol=1e-15)


def test_float32_and_bfloat16_inputs_are_computed_in_float64():
    s, t, y = _batch(3, scale=1e4)
    for dtype in (np.float32, ml_dtypes.bfloat16):
        s_low, t_low = s.astype(dtype), t.astype(dtype)
        got = kd_loss(s_low, t_low, y, 0.667, 0.25)
        assert got.dtype == np.float64
        want = _kd_ld(s_low.astype(np.float64), t_low.astype(np.float64), y, 0.667, 0.25).astype(np.float64)
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-11)


def test_confident_prediction_loss_is_relatively_accurate():
    s = np.array([[0.0, -40.0, -45.0]])  # ce = log(1 + e^-40 + e^-45) ~ 4.25e-18
    want = np.log1p(np.exp(LD(-40)) + np.exp(LD(-45)))
    got = ce_loss(s, np.array([0]))[0]
    assert got == pytest.approx(float(want), rel=1e-14)
    assert kd_loss(s, s, np.array([0]), 0.667, 1.0)[0] > 0


def test_special_cases_of_omega_and_parts():
    s, t, y = _batch(4)
    np.testing.assert_array_equal(kd_loss(s, t, y, 0.0, 0.25), ce_loss(s, y))
    np.testing.assert_array_equal(kd_loss_grad(s, t, y, 0.0, 0.25), ce_loss_grad(s, y))
    parts = loss_parts(s, t, y, 0.667, 0.25)
    np.testing.assert_allclose(parts["loss"], 0.333 * parts["ce"] + 0.667 * parts["kd"], rtol=1e-15)
    np.testing.assert_allclose(parts["kl"], parts["kd"] - parts["teacher_entropy"], rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(kl_monitor(s, t, 0.25), parts["kl"])
    assert (parts["kl"] >= 0).all()
    np.testing.assert_allclose(kl_monitor(s, s, 1.0), 0.0, atol=1e-14)  # KL(P||P) = 0
    np.testing.assert_allclose(kd_loss(s, t, y, 1.0, 0.25), parts["kd"], rtol=1e-15)


def test_kl_matches_extended_precision():
    s, t, _ = _batch(5, scale=30.0)
    q = _softmax_ld(LD(0.25) * t)
    p = _softmax_ld(s)
    want = (q * (np.log(q) - np.log(p))).sum(axis=-1).astype(np.float64)
    np.testing.assert_allclose(kl_monitor(s, t, 0.25), want, rtol=1e-12, atol=1e-14)


def test_log_softmax_matches_extended_precision():
    x = np.random.default_rng(6).normal(size=(4, 9)) * 1e3
    want = (np.asarray(x, LD) - _lse_ld(x)[..., None]).astype(np.float64)
    np.testing.assert_allclose(log_softmax(x), want, rtol=1e-14, atol=1e-12)


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("omega", OMEGAS)
@pytest.mark.parametrize("rho", (0.05, 0.25, 4.0))
def test_kd_grad_finite_difference(omega, rho):
    s, t, y = _batch(7, shape=(2, 2), vocab=6)
    fd = _central_difference(lambda x: kd_loss(x, t, y, omega, rho), s)
    np.testing.assert_allclose(kd_loss_grad(s, t, y, omega, rho), fd, rtol=0, atol=1e-8)


def test_ce_grad_finite_difference():
    s, _, y = _batch(8, shape=(3,), vocab=7)
    fd = _central_difference(lambda x: ce_loss(x, y), s)
    np.testing.assert_allclose(ce_loss_grad(s, y), fd, rtol=0, atol=1e-8)


@pytest.mark.parametrize("omega", OMEGAS)
@pytest.mark.parametrize("k", (1, 3, 6))
def test_topk_grad_finite_difference(omega, k):
    s, t, y = _batch(9, shape=(2, 2), vocab=6)
    fd = _central_difference(lambda x: topk_kd_loss(x, t, y, omega, 0.25, k), s)
    np.testing.assert_allclose(topk_kd_loss_grad(s, t, y, omega, 0.25, k), fd, rtol=0, atol=1e-8)


def test_grad_rows_sum_to_zero_and_mean_gradient():
    s, t, y = _batch(10)
    grad = kd_loss_grad(s, t, y, 0.667, 0.25)
    np.testing.assert_allclose(grad.sum(axis=-1), 0.0, atol=1e-15)
    mask = np.array([[1, 0, 1], [1, 1, 0]], dtype=bool)
    # gradient of the masked mean = per-position gradient / number of valid positions
    fd = _central_difference(
        lambda x: np.full(y.shape, mean_over_mask(kd_loss(x, t, y, 0.667, 0.25, mask), mask)), s)
    np.testing.assert_allclose(kd_loss_grad(s, t, y, 0.667, 0.25, mask) / mask.sum(), fd, atol=1e-9)


# ----------------------------------------------------------------------------- masks

def test_masked_positions_are_exactly_zero_and_never_read():
    s, t, y = _batch(11)
    mask = np.array([[True, False, True], [False, True, True]])
    s_bad, t_bad, y_bad = s.copy(), t.copy(), y.copy()
    s_bad[~mask] = np.nan  # garbage at masked positions must not leak
    t_bad[~mask] = np.inf
    y_bad[~mask] = -1      # padding label
    for fn in (lambda: kd_loss(s_bad, t_bad, y_bad, 0.667, 0.25, mask),
               lambda: topk_kd_loss(s_bad, t_bad, y_bad, 0.667, 0.25, 4, mask)):
        values = fn()
        assert (values[~mask] == 0.0).all() and np.isfinite(values).all()
    np.testing.assert_array_equal(
        kd_loss(s_bad, t_bad, y_bad, 0.667, 0.25, mask)[mask], kd_loss(s, t, y, 0.667, 0.25)[mask])
    for grad in (kd_loss_grad(s_bad, t_bad, y_bad, 0.667, 0.25, mask),
                 topk_kd_loss_grad(s_bad, t_bad, y_bad, 0.667, 0.25, 4, mask),
                 ce_loss_grad(s_bad, y_bad, mask)):
        assert (grad[~mask] == 0.0).all() and np.isfinite(grad).all()
    assert (kl_monitor(s_bad, t_bad, 0.25, mask.astype(np.int32))[~mask] == 0.0).all()
    assert (ce_loss(s_bad, y_bad, mask)[~mask] == 0.0).all()


def test_mean_over_mask():
    values = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert mean_over_mask(values) == 3.5
    assert mean_over_mask(values, np.array([[1, 0, 1], [0, 0, 1]])) == pytest.approx(10 / 3, rel=1e-15)
    with pytest.raises(ValueError, match="mask"):
        mean_over_mask(values, np.zeros((2, 3), dtype=bool))


# ----------------------------------------------------------------------------- top-k

def _topk_kd_loop(s, t, y, omega, rho, k):
    """Straightforward per-position top-k loss from eq. 13-14 (sorted() with index tie-break)."""
    out = np.zeros(y.shape)
    for index in np.ndindex(y.shape):
        sv, tv = s[index].astype(LD), t[index].astype(LD)
        top = sorted(range(len(tv)), key=lambda v: (-tv[v], v))[:k]
        log_p_top = sv[top] - _lse_ld(sv[top])
        q_top = _softmax_ld(LD(rho) * tv[top])
        ce = _lse_ld(sv) - sv[y[index]]
        out[index] = float((1 - LD(omega)) * ce + LD(omega) * -(q_top * log_p_top).sum())
    return out


@pytest.mark.parametrize("k", (1, 2, 5, 11))
@pytest.mark.parametrize("omega", OMEGAS)
def test_topk_matches_loop(k, omega):
    s, t, y = _batch(12)
    np.testing.assert_allclose(topk_kd_loss(s, t, y, omega, 0.25, k), _topk_kd_loop(s, t, y, omega, 0.25, k),
                               rtol=1e-13, atol=1e-14)


def test_topk_special_cases():
    s, t, y = _batch(13)
    np.testing.assert_allclose(topk_kd_loss(s, t, y, 0.667, 0.25, 11), kd_loss(s, t, y, 0.667, 0.25),
                               rtol=1e-14)
    np.testing.assert_allclose(topk_kd_loss_grad(s, t, y, 0.667, 0.25, 11),
                               kd_loss_grad(s, t, y, 0.667, 0.25),
                               atol=1e-15)
    np.testing.assert_array_equal(topk_kd_loss(s, t, y, 0.0, 0.25, 3), ce_loss(s, y))
    # k = 1: Q^T and P^T are both the one-hot of the teacher's argmax: the KD term is 0
    np.testing.assert_allclose(topk_kd_loss(s, t, y, 1.0, 0.25, 1), 0.0, atol=0)


def test_topk_ties_prefer_lower_index():
    t = np.array([[1.0, 3.0, 2.0, 3.0, 2.0, 2.0]])
    np.testing.assert_array_equal(topk_indices(t, 1), [[1]])
    np.testing.assert_array_equal(topk_indices(t, 2), [[1, 3]])
    np.testing.assert_array_equal(topk_indices(t, 4), [[1, 3, 2, 4]])
    s = np.random.default_rng(14).normal(size=(1, 6))
    y = np.array([0])
    np.testing.assert_allclose(topk_kd_loss(s, t, y, 0.667, 0.25, 3), _topk_kd_loop(s, t, y, 0.667, 0.25, 3),
                               rtol=1e-13)
    grad = topk_kd_loss_grad(s, t, y, 1.0, 0.25, 3)
    assert (grad[0, [0, 4, 5]] == 0).all() and (grad[0, [1, 2, 3]] != 0).all()


def test_topk_at_magnitude_1e4():
    s, t, y = _batch(15, scale=1e4)
    for rho in (0.05, 4.0):
        loss = topk_kd_loss(s, t, y, 0.667, rho, 4)
        grad = topk_kd_loss_grad(s, t, y, 0.667, rho, 4)
        assert np.isfinite(loss).all() and np.isfinite(grad).all()
        np.testing.assert_allclose(loss, _topk_kd_loop(s, t, y, 0.667, rho, 4), rtol=1e-13, atol=1e-11)


# ----------------------------------------------------------------------------- bad input

def _call_all(s, t, y, omega=0.667, rho=0.25, k=2, mask=None):
    yield lambda: kd_loss(s, t, y, omega, rho, mask)
    yield lambda: kd_loss_grad(s, t, y, omega, rho, mask)
    yield lambda: topk_kd_loss(s, t, y, omega, rho, k, mask)
    yield lambda: topk_kd_loss_grad(s, t, y, omega, rho, k, mask)


@pytest.mark.parametrize("omega", (-0.01, 1.01, float("nan"), float("inf"), "0.5", True))
def test_bad_omega(omega):
    s, t, y = _batch(16)
    for fn in _call_all(s, t, y, omega=omega):
        with pytest.raises(ValueError, match="omega"):
            fn()


@pytest.mark.parametrize("rho", (0.0, -0.25, float("nan"), float("inf"), None))
def test_bad_rho(rho):
    s, t, y = _batch(17)
    for fn in list(_call_all(s, t, y, rho=rho)) + [lambda: kl_monitor(s, t, rho)]:
        with pytest.raises(ValueError, match="rho"):
            fn()


@pytest.mark.parametrize("k", (0, -1, 12, 2.0, True))
def test_bad_k(k):
    s, t, y = _batch(18)
    for fn in (lambda: topk_kd_loss(s, t, y, 0.5, 0.25, k), lambda: topk_kd_loss_grad(s, t, y, 0.5, 0.25, k),
               lambda: topk_indices(t, k)):
        with pytest.raises(ValueError, match="k"):
            fn()


@pytest.mark.parametrize("label", (-1, 11, 10**9))
def test_label_out_of_vocab(label):
    s, t, y = _batch(19)
    y[1, 2] = label
    for fn in list(_call_all(s, t, y)) + [lambda: ce_loss(s, y), lambda: ce_loss_grad(s, y)]:
        with pytest.raises(ValueError, match=rf"labels.*{label}"):
            fn()


def test_shape_and_vocab_mismatch():
    s, t, y = _batch(20)
    for fn in _call_all(s, t[..., :10], y):
        with pytest.raises(ValueError, match="vocabulary size 10"):
            fn()
    for fn in _call_all(s, t[:1], y):
        with pytest.raises(ValueError, match="teacher_logits shape"):
            fn()
    for fn in list(_call_all(s, t, y[:, :2])) + [lambda: ce_loss(s, y[:, :2])]:
        with pytest.raises(ValueError, match="labels must have shape"):
            fn()
    for fn in _call_all(s, t, y, mask=np.ones((2, 2), bool)):
        with pytest.raises(ValueError, match="mask must have shape"):
            fn()
    with pytest.raises(ValueError, match="mask must contain only 0/1"):
        kd_loss(s, t, y, 0.5, 0.25, np.full(y.shape, 2))
    with pytest.raises(ValueError, match="labels must be an integer"):
        kd_loss(s, t, y.astype(float), 0.5, 0.25)
    with pytest.raises(ValueError, match="student_logits must be a real floating"):
        kd_loss(s.astype(complex), t, y, 0.5, 0.25)
    with pytest.raises(ValueError, match="student_logits must have shape"):
        ce_loss(np.float64(1.0), np.int64(0))


def test_non_finite_logits_at_unmasked_positions():
    s, t, y = _batch(21)
    s_nan = s.copy()
    s_nan[0, 1, 4] = np.nan
    with pytest.raises(ValueError, match=r"student_logits has non-finite.*\(0, 1\)"):
        kd_loss(s_nan, t, y, 0.5, 0.25)
    t_inf = t.copy()
    t_inf[1, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"teacher_logits has non-finite.*\(1, 0\)"):
        kd_loss_grad(s, t_inf, y, 0.5, 0.25)


def test_rho_times_teacher_logits_overflow_is_an_error_not_nan():
    # rho = 1e305 is legal (> 0) but rho * 1e4 overflows float64: a clear error, never a NaN loss.
    s, t, y = _batch(22, scale=1e4)
    for fn in list(_call_all(s, t, y, rho=1e305)) + [lambda: kl_monitor(s, t, 1e305)]:
        with pytest.raises(ValueError, match=r"rho \* teacher_logits overflows.*\(0, 0\)"):
            fn()
    mask = np.zeros(y.shape, bool)  # masked positions are never read
    mask[0, 0] = True
    t_small = t.copy()
    t_small[0, 0] = 1e-303
    for fn in list(_call_all(s, t_small, y, rho=1e305, mask=mask)) + [
            lambda: kl_monitor(s, t_small, 1e305, mask)]:
        assert np.isfinite(fn()).all()


# ----------------------------------------------------------------------------- padded vocabularies

def _pad(x, extra, seed):
    """``x`` with ``extra`` columns of large logits appended (they would dominate if not dropped)."""
    rows = 40.0 + np.random.default_rng(seed).normal(size=x.shape[:-1] + (extra,))
    return np.concatenate([x, rows], axis=-1)


def test_padded_vocabularies_give_the_unpadded_values_and_zero_gradient_there():
    """Student logits padded by 3 columns, teacher's by 5 (different padded sizes, one tokenizer):
    with ``vocab`` every loss, part and top-k set equals the unpadded one, and the padded columns
    get zero gradient; without it the different widths are refused."""
    s, t, y = _batch(21)
    V = s.shape[-1]
    sp, tp = _pad(s, 3, 1), _pad(t, 5, 2)
    mask = np.array([[1, 0, 1], [1, 1, 1]], dtype=bool)
    for omega, rho in ((0.667, 0.25), (1.0, 1.0)):
        args, padded = (s, t, y, omega, rho), (sp, tp, y, omega, rho)
        np.testing.assert_array_equal(kd_loss(*padded, mask, vocab=V), kd_loss(*args, mask))
        for key, value in loss_parts(*padded, vocab=V).items():
            np.testing.assert_array_equal(value, loss_parts(*args)[key], err_msg=key)
        grad = kd_loss_grad(*padded, mask, vocab=V)
        assert grad.shape == sp.shape and not grad[..., V:].any()
        np.testing.assert_array_equal(grad[..., :V], kd_loss_grad(*args, mask))
        for k in (1, 4, V):
            np.testing.assert_array_equal(topk_kd_loss(*padded, k, vocab=V), topk_kd_loss(*args, k))
            grad = topk_kd_loss_grad(*padded, k, vocab=V)
            assert grad.shape == sp.shape and not grad[..., V:].any()
            np.testing.assert_array_equal(grad[..., :V], topk_kd_loss_grad(*args, k))
        np.testing.assert_array_equal(kl_monitor(sp, tp, rho, vocab=V), kl_monitor(s, t, rho))
    np.testing.assert_array_equal(topk_indices(tp, 4, vocab=V), topk_indices(t, 4))
    np.testing.assert_array_equal(ce_loss(sp, y, vocab=V), ce_loss(s, y))
    grad = ce_loss_grad(sp, y, vocab=V)
    assert not grad[..., V:].any()
    np.testing.assert_array_equal(grad[..., :V], ce_loss_grad(s, y))
    assert (ce_loss(sp, y) > ce_loss(s, y) + 10).all()  # the padding matters when not dropped
    with pytest.raises(ValueError, match="vocabulary size"):
        kd_loss(sp, tp, y, 0.5, 1.0)


@pytest.mark.parametrize("vocab", [0, 12, 3.0, True])
def test_bad_vocab(vocab):
    s, t, y = _batch(22)
    with pytest.raises(ValueError, match="vocab must be an integer in \\[1, 11\\]"):
        kd_loss(s, t, y, 0.5, 1.0, vocab=vocab)


def test_label_beyond_the_tokenizer_vocabulary_is_refused():
    s, t, y = _batch(23)
    y[0, 0] = 9
    with pytest.raises(ValueError, match="labels must be in \\[0, V=9\\)"):
        kd_loss(s, t, y, 0.5, 1.0, vocab=9)
