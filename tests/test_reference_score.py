"""Reference selection score (eq. 11): the NumPy reference and its Numba twin agree, an independent per-token formula,
ties, k = 1 / k = V, magnitudes 1e4, both modes, masks, dtypes, the vectorised exp, bad input."""
import ml_dtypes
import numpy as np
import pytest

from salt.reference import score_numba as score_module
from salt.reference.score import selection_score, token_costs, top_m_indices
from salt.reference.score_numba import selection_score_numba, token_costs_numba

LD = np.longdouble
MODES = ("zero", "exclude")


def _independent_score(logits, targets, k, mode, mask=None):
    """Eq. 11 written literally, per token, in extended precision, with np.median."""
    logits = np.asarray(logits, dtype=np.float64)
    batch, length, _ = logits.shape
    mask = np.ones((batch, length), bool) if mask is None else mask
    scores = []
    for b in range(batch):
        values = []
        for i in range(length):
            if not mask[b, i]:
                continue
            row = logits[b, i].astype(LD)
            target = row[targets[b, i]]
            lse = row.max() + np.log(np.exp(row - row.max()).sum())
            in_topk = int((row > target).sum()) < k
            if in_topk:
                values.append(float(lse - target))
            elif mode == "zero":
                values.append(0.0)
        scores.append(float(np.median(values)) if values else -np.inf)
    return np.array(scores)


def _assert_agree(a, b, rtol=1e-12, atol=0.0):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == np.float64 and a.shape == b.shape
    np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b))
    np.testing.assert_array_equal(a[~np.isfinite(a)], b[~np.isfinite(b)])
    np.testing.assert_allclose(a[np.isfinite(a)], b[np.isfinite(b)], rtol=rtol, atol=atol)


def _random(seed, batch=4, length=7, vocab=300, scale=3.0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((batch, length, vocab)) * scale).astype(dtype)
    targets = rng.integers(0, vocab, size=(batch, length))
    # make some targets the argmax so that top-k membership varies
    best = logits.astype(np.float64).argmax(axis=-1)
    pick = rng.random((batch, length)) < 0.4
    return logits, np.where(pick, best, targets)


# ----------------------------------------------------------------------------- agreement

@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", (1, 2, 10, 300))
@pytest.mark.parametrize("dtype", (np.float32, np.float64))
def test_numba_numpy_and_independent_agree(mode, k, dtype):
    logits, targets = _random(1, dtype=dtype)
    got = selection_score_numba(logits, targets, k, mode)
    _assert_agree(got, selection_score(logits, targets, k, mode))
    _assert_agree(got, _independent_score(logits, targets, k, mode), rtol=1e-13)


@pytest.mark.parametrize("mode", MODES)
def test_ties_count_in_favour_of_membership(mode):
    # integer logits in a small range: many ties, including with the target
    rng = np.random.default_rng(2)
    logits = rng.integers(-3, 4, size=(5, 9, 40)).astype(np.float32)
    targets = rng.integers(0, 40, size=(5, 9))
    for k in (1, 3, 40):
        got = selection_score_numba(logits, targets, k, mode)
        _assert_agree(got, selection_score(logits, targets, k, mode))
        _assert_agree(got, _independent_score(logits, targets, k, mode), rtol=1e-13)
    # explicit: target tied with the max is in the top-1 even though 3 entries share the max
    row = np.array([[[5.0, 1.0, 5.0, 5.0]]])
    costs, in_topk = token_costs_numba(row, np.array([[3]]), 1)
    assert in_topk[0, 0] and costs[0, 0] == pytest.approx(np.log(3 + np.exp(-4.0)), rel=1e-15)
    _, in_topk = token_costs_numba(row, np.array([[1]]), 3)
    assert not in_topk[0, 0]  # three entries strictly larger
    _, in_topk = token_costs_numba(row, np.array([[1]]), 4)
    assert in_topk[0, 0]


@pytest.mark.parametrize("mode", MODES)
def test_magnitude_1e4(mode):
    logits, targets = _random(3, vocab=200, scale=1e4, dtype=np.float64)
    for k in (1, 5, 200):
        got = selection_score_numba(logits, targets, k, mode)
        assert not np.isnan(got).any()
        _assert_agree(got, selection_score(logits, targets, k, mode))
        # the literal lse - t_x cancels 1e4-sized terms: its own error is ~1e4 * 1e-19
        _assert_agree(got, _independent_score(logits, targets, k, mode), rtol=1e-12, atol=1e-14)


def test_rows_spanning_blocks_and_rising_maxima():
    """V over several kernel blocks; sorted rows force the new-max path in every block."""
    vocab = 3 * score_module._BLOCK + 17
    logits, targets = _random(4, batch=3, length=4, vocab=vocab)
    logits[0, 0] = np.sort(logits[0, 0])             # ascending: a new max in every block
    logits[0, 1] = np.sort(logits[0, 1])[::-1]       # descending
    logits[1, 2] = np.linspace(-50, 50, vocab, dtype=np.float32)
    logits[2, 3, -1] = 1e4                           # the max is the very last logit
    for mode in MODES:
        for k in (1, 7, vocab):
            _assert_agree(selection_score_numba(logits, targets, k, mode),
                          selection_score(logits, targets, k, mode))
    costs, _ = token_costs_numba(logits, targets, 1)
    want = _independent_score(logits[:, :, :], targets, vocab, "zero")
    _assert_agree(np.median(costs, axis=1), want, rtol=1e-13)


def test_uniform_logits_analytic():
    logits = np.full((2, 5, 64), 0.25, dtype=np.float32)
    targets = np.arange(10).reshape(2, 5)
    for mode in MODES:
        np.testing.assert_allclose(selection_score_numba(logits, targets, 1, mode), np.log(64), rtol=1e-15)


def test_confident_token_cost_is_relatively_accurate():
    row = np.zeros((1, 1, 50))
    row[0, 0, 7] = 40.0  # c = log1p(49 e^-40) ~ 2.1e-16, below float64 resolution of 1 + c
    costs, _ = token_costs_numba(row, np.array([[7]]), 1)
    want = float(np.log1p(LD(49) * np.exp(LD(-40))))
    assert costs[0, 0] == pytest.approx(want, rel=1e-14)
    costs_np, _ = token_costs(row, np.array([[7]]), 1)
    assert costs_np[0, 0] == pytest.approx(want, rel=1e-14)


# ----------------------------------------------------------------------------- median and modes

def test_median_conventions_and_modes():
    # row 0: costs of 4 tokens with two outside the top-1 -> zero mode median of [0, 0, c1, c2]
    vocab = 4
    logits = np.array([[[2.0, 0.0, 0.0, 0.0],    # target 0: in top-1, c = log(e^2 + 3) - 2
                        [2.0, 0.0, 0.0, 0.0],    # target 1: not in top-1
                        [0.0, 0.0, 0.0, 5.0],    # target 3: in top-1
                        [0.0, 0.0, 0.0, 5.0]]])  # target 0: not in top-1
    targets = np.array([[0, 1, 3, 0]])
    c0 = np.log(np.exp(2.0) + 3) - 2
    c2 = np.log(np.exp(5.0) + 3) - 5
    zero = selection_score_numba(logits, targets, 1, "zero")
    assert zero[0] == pytest.approx(np.median([c0, 0.0, c2, 0.0]), rel=1e-15)  # (0 + min(c0,c2)) / 2
    exclude = selection_score_numba(logits, targets, 1, "exclude")
    assert exclude[0] == pytest.approx((c0 + c2) / 2, rel=1e-15)
    assert selection_score_numba(logits, targets, vocab, "zero")[0] == pytest.approx(
        np.median(token_costs(logits, targets, vocab)[0][0]), rel=1e-15)
    _assert_agree(zero, selection_score(logits, targets, 1, "zero"))
    _assert_agree(exclude, selection_score(logits, targets, 1, "exclude"))


def test_empty_sequences_score_minus_inf():
    logits, targets = _random(5, batch=3, length=6, vocab=50)
    mask = np.ones((3, 6), bool)
    mask[1] = False  # fully padded sequence
    for fn in (selection_score_numba, selection_score):
        for mode in MODES:
            out = fn(logits, targets, 3, mode, mask=mask)
            assert out[1] == -np.inf and np.isfinite(out[[0, 2]]).all()
    # exclude mode with no target in the top-1 at all
    targets_low = logits.astype(np.float64).argmin(axis=-1)
    for fn in (selection_score_numba, selection_score):
        np.testing.assert_array_equal(fn(logits, targets_low, 1, "exclude"), -np.inf)
        np.testing.assert_array_equal(fn(logits, targets_low, 1, "zero"), 0.0)


def test_mask_excludes_padding_and_is_never_read():
    logits, targets = _random(6, batch=3, length=8, vocab=60)
    mask = np.random.default_rng(6).random((3, 8)) < 0.6
    mask[:, 0] = True
    garbage_logits, garbage_targets = logits.copy(), targets.copy()
    garbage_logits[~mask] = np.nan
    garbage_targets[~mask] = -1
    for mode in MODES:
        want = _independent_score(logits, targets, 4, mode, mask)
        for fn in (selection_score_numba, selection_score):
            _assert_agree(fn(garbage_logits, garbage_targets, 4, mode, mask=mask), want, rtol=1e-13)
            _assert_agree(fn(garbage_logits, garbage_targets, 4, mode, mask=mask.astype(np.int8)), want,
                          rtol=1e-13)


# ----------------------------------------------------------------------------- dtypes, chunks

@pytest.mark.parametrize("dtype", (ml_dtypes.bfloat16, np.float16))
def test_narrow_float_inputs(dtype, monkeypatch):
    logits, targets = _random(7, batch=5, length=3, vocab=70, dtype=np.float32)
    narrow = logits.astype(dtype)
    want = _independent_score(narrow.astype(np.float64), targets, 3, "zero")
    monkeypatch.setattr(score_module, "_CHUNK_ELEMENTS", 2 * 3 * 70)  # several chunks
    _assert_agree(selection_score_numba(narrow, targets, 3), want, rtol=1e-13)
    _assert_agree(selection_score(narrow, targets, 3, chunk_elements=3 * 70), want, rtol=1e-13)


@pytest.mark.parametrize("dtype", (np.dtype(">f8"), np.longdouble))
def test_wide_non_native_floats_are_not_narrowed_to_float32(dtype):
    # float64 in the other byte order, or extended precision, must be scored as float64.
    logits, targets = _random(13, batch=3, length=5, vocab=70, dtype=np.float64)
    want_costs = token_costs(logits, targets, 3)[0]
    assert (want_costs > 0).all()
    for costs in (token_costs_numba, token_costs):
        np.testing.assert_allclose(costs(logits.astype(dtype), targets, 3)[0], want_costs, rtol=1e-13)
    want = selection_score(logits, targets, 3, "exclude")
    assert (want > 0).all()
    for fn in BOTH:
        _assert_agree(fn(logits.astype(dtype), targets, 3, "exclude"), want, rtol=1e-13)


def test_numpy_chunking_does_not_change_results():
    logits, targets = _random(8, batch=7, length=5, vocab=40)
    full = selection_score(logits, targets, 2, "exclude", chunk_elements=10**9)
    chunked = selection_score(logits, targets, 2, "exclude", chunk_elements=1)
    np.testing.assert_array_equal(chunked, full)


def test_exp_kernel_accuracy():
    @score_module.numba.njit
    def apply(d, out):
        for i in range(d.size):
            out[i] = score_module._exp_nonpositive(d[i])

    rng = np.random.default_rng(9)
    d = np.concatenate([-rng.random(20000) * 708, -rng.random(2000) * 1e-6, [0.0, -0.0, -1e-300]])
    out = np.empty_like(d)
    apply(d, out)
    want = np.exp(d)
    assert np.max(np.abs(out - want) / want) <= 2 * np.finfo(np.float64).eps
    assert out[-3] == 1.0
    tail = np.array([-708.5, -720.0, -744.0, -745.2, -746.0, -800.0, -np.inf])
    out_tail = np.empty_like(tail)
    apply(tail, out_tail)
    np.testing.assert_allclose(out_tail, np.exp(tail), rtol=0, atol=2 * 5e-324)
    assert out_tail[-1] == 0.0


# ----------------------------------------------------------------------------- selection

def test_top_m_indices():
    scores = np.array([0.5, 2.0, -np.inf, 2.0, 1.0, 0.5])
    np.testing.assert_array_equal(top_m_indices(scores, 4), [1, 3, 4, 0])
    np.testing.assert_array_equal(top_m_indices(scores, 6), [1, 3, 4, 0, 5, 2])
    assert top_m_indices(scores, 0).size == 0
    with pytest.raises(ValueError, match="m must be"):
        top_m_indices(scores, 7)
    with pytest.raises(ValueError, match="NaN"):
        top_m_indices(np.array([1.0, np.nan]), 1)


# ----------------------------------------------------------------------------- bad input

BOTH = (selection_score_numba, selection_score)


@pytest.mark.parametrize("fn", BOTH)
def test_bad_k_and_mode(fn):
    logits, targets = _random(10, vocab=30)
    for k in (0, -1, 31, 2.0, True):
        with pytest.raises(ValueError, match="k must"):
            fn(logits, targets, k)
    with pytest.raises(ValueError, match="mode"):
        fn(logits, targets, 3, "median")


@pytest.mark.parametrize("fn", BOTH)
def test_bad_targets_and_shapes(fn):
    logits, targets = _random(11, vocab=30)
    bad = targets.copy()
    bad[2, 3] = 30
    with pytest.raises(ValueError, match=r"targets must be in \[0, V=30\).*30 at index \(2, 3\)"):
        fn(logits, bad, 3)
    bad[2, 3] = -1
    with pytest.raises(ValueError, match="-1"):
        fn(logits, bad, 3)
    mask = np.ones(targets.shape, bool)
    mask[2, 3] = False
    fn(logits, bad, 3, mask=mask)  # fine when masked
    with pytest.raises(ValueError, match="targets must have shape"):
        fn(logits, targets[:, :3], 3)
    with pytest.raises(ValueError, match="targets must be an integer"):
        fn(logits, targets.astype(np.float32), 3)
    with pytest.raises(ValueError, match=r"teacher_logits must have shape \[B, T, V\]"):
        fn(logits[0], targets[0], 3)
    with pytest.raises(ValueError, match="teacher_logits must be"):
        fn(logits.astype(np.int32), targets, 3)
    with pytest.raises(ValueError, match="mask must have shape"):
        fn(logits, targets, 3, mask=mask[:2])
    with pytest.raises(ValueError, match=r"mask must contain only 0/1.*3 at index \(0, 0\)"):
        fn(logits, targets, 3, mask=np.full(targets.shape, 3))


@pytest.mark.parametrize("fn", BOTH)
@pytest.mark.parametrize("value", (np.nan, np.inf, -np.inf))
def test_non_finite_logits_rejected(fn, value):
    logits, targets = _random(12, vocab=30, dtype=np.float64)
    logits[1, 4, 7] = value
    with pytest.raises(ValueError, match=r"non-finite.*\(1, 4\)"):
        fn(logits, targets, 3)
    logits_t = logits.copy()
    logits_t[1, 4, 7] = 0.0
    logits_t[0, 2, targets[0, 2]] = value
    with pytest.raises(ValueError, match=r"non-finite.*\(0, 2\)"):
        fn(logits_t, targets, 3)


@pytest.mark.parametrize("mode", MODES)
def test_padded_vocabulary_scores_like_the_unpadded_one(mode):
    """Teacher logits padded by 13 columns of large values: with ``vocab`` the per-token costs,
    top-k membership and scores (Numba and NumPy) equal the unpadded ones; without it they move."""
    logits, targets = _random(31)
    rng = np.random.default_rng(32)
    padded = np.concatenate([logits, (30 + rng.standard_normal(logits.shape[:2] + (13,))).astype(logits.dtype)],
                            axis=-1)
    V = logits.shape[-1]
    want = selection_score_numba(logits, targets, 10, mode)
    np.testing.assert_array_equal(selection_score_numba(padded, targets, 10, mode, vocab=V), want)
    np.testing.assert_array_equal(selection_score(padded, targets, 10, mode, vocab=V),
                                  selection_score(logits, targets, 10, mode))
    for got, ref in zip(token_costs_numba(padded, targets, 10, vocab=V), token_costs_numba(logits, targets, 10)):
        np.testing.assert_array_equal(got, ref)
    for got, ref in zip(token_costs(padded, targets, 10, vocab=V), token_costs(logits, targets, 10)):
        np.testing.assert_array_equal(got, ref)
    assert not np.allclose(selection_score_numba(padded, targets, 10, mode), want)
    with pytest.raises(ValueError, match="vocab must be an integer"):
        selection_score_numba(padded, targets, 10, mode, vocab=V + 14)
