"""JAX selection score (eq. 11) against the reference, selection, pool, resumable job, CLI."""
import numpy as np
import pytest

from salt.reference.score import selection_score
from salt.runtime import score as S


def _logits_with_ties(rng, B, T, V):
    logits = rng.normal(size=(B, T, V)).astype(np.float32)
    # Quantise half the rows so that ties with the target's logit occur.
    logits[: B // 2] = np.round(logits[: B // 2] * 2) / 2
    return logits


@pytest.mark.parametrize("mode", ["zero", "exclude"])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_token_terms_and_median_equal_reference(mode, k):
    import jax.numpy as jnp

    rng = np.random.default_rng(k)
    B, T, V = 6, 7, 24  # odd T: plain middle; also test even T below
    for T in (7, 8):
        logits = _logits_with_ties(rng, B, T, V)
        targets = rng.integers(0, V, size=(B, T))
        ce, in_topk = S.token_terms(jnp.asarray(logits), jnp.asarray(targets), k)
        got = S.window_medians(np.asarray(ce), np.asarray(in_topk), mode)
        want = selection_score(logits.astype(np.float64), targets, k, mode=mode)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert got.dtype == np.float64


def test_topk_membership_counts_strictly_greater():
    import jax.numpy as jnp

    # target logit 1.0 tied with two others; one strictly greater (2.0).
    logits = np.array([[[2.0, 1.0, 1.0, 1.0, 0.0]]], np.float32)
    targets = np.array([[2]])
    for k, member in ((1, False), (2, True), (5, True)):
        _, in_topk = S.token_terms(jnp.asarray(logits), jnp.asarray(targets), k)
        assert bool(np.asarray(in_topk)[0, 0]) is member


def test_exclude_mode_without_topk_scores_minus_inf():
    ce = np.array([[1.0, 2.0], [3.0, 4.0]])
    keep = np.array([[False, False], [True, False]])
    np.testing.assert_array_equal(S.window_medians(ce, keep, "exclude"), [-np.inf, 3.0])
    np.testing.assert_array_equal(S.window_medians(ce, keep, "zero"), [0.0, 1.5])
    with pytest.raises(ValueError, match="topk mode"):
        S.window_medians(ce, keep, "drop")


def test_select_top_m_ties_by_window_id():
    ids = np.array([7, 3, 9, 1, 5], np.int64)
    scores = np.array([1.0, 2.0, 1.0, -np.inf, 2.0])
    np.testing.assert_array_equal(S.select_top_m(ids, scores, 4), [3, 5, 7, 9])
    np.testing.assert_array_equal(S.select_top_m(ids, scores, 5), [3, 5, 7, 9, 1])
    with pytest.raises(ValueError, match="exceeds"):
        S.select_top_m(ids, scores, 6)
    with pytest.raises(ValueError, match="positive"):
        S.select_top_m(ids, scores, 0)
    with pytest.raises(ValueError, match="NaN"):
        S.select_top_m(ids, np.array([1.0, np.nan, 0, 0, 0]), 2)


def test_overlapping_windows_maps_token_ranges():
    # same length: identity (clipped to range)
    np.testing.assert_array_equal(S.overlapping_windows(np.array([3, 1, 1, 50]), 8, 8, 10), [1, 3])
    # seen windows of 4 tokens (T=3) vs candidates of 6 tokens (T=5):
    # seen id 1 covers tokens [4, 8) -> candidates 0 [0,6) and 1 [6,12); seen id 3 covers [12,16) -> 2.
    np.testing.assert_array_equal(S.overlapping_windows(np.array([1, 3]), 3, 5, 10), [0, 1, 2])
    # brute force on random inputs
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = rng.integers(1, 9, size=2)
        seen = rng.choice(30, size=5, replace=False)
        n = 25
        got = S.overlapping_windows(seen, a, b, n)
        covered = set()
        for s in seen:
            covered.update(range(s * (a + 1), (s + 1) * (a + 1)))
        want = [i for i in range(n) if covered & set(range(i * (b + 1), (i + 1) * (b + 1)))]
        np.testing.assert_array_equal(got, want)


def test_save_and_load_helpers_are_atomic_and_pickle_free(tmp_path):
    out = tmp_path / "ids.npy"
    S.save_npy_atomic(out, np.arange(5, dtype=np.int64))
    np.testing.assert_array_equal(S.load_window_ids(out), np.arange(5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.npy"]  # no temp left behind
    with pytest.raises(ValueError, match="does not exist"):
        S.load_window_ids(tmp_path / "missing.npy")
    bad = tmp_path / "bad.npy"
    np.save(bad, np.array([0.5, 1.5]))
    with pytest.raises(ValueError, match="integer"):
        S.load_window_ids(bad)
    with pytest.raises(ValueError, match="not a SALT scores file"):
        S.save_npz_atomic(tmp_path / "x.npz", a=np.zeros(2))
        S.load_scores(tmp_path / "x.npz")


def test_teacher_forward_scores_equal_reference_on_teacher_logits():
    """The jitted teacher-forward + terms path (what `salt score` runs) vs the reference score
    on the same model's logits, both modes, sharded over the 8 fake devices."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from salt.reference.config import get_preset
    from salt.runtime import model

    config = get_preset("tiny-teacher")
    params = model.init_params(config, seed=3)
    rng = np.random.default_rng(0)
    windows = rng.integers(0, config.vocab_size, size=(8, 13)).astype(np.int32)
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    sharded = jax.device_put(jnp.asarray(windows), NamedSharding(mesh, P("data")))
    logits = np.asarray(model.forward(params, jnp.asarray(windows[:, :-1]), config), np.float64)
    for k in (1, 10):
        ce, in_topk = S.make_token_terms_fn(config, k)(params, sharded)
        for mode in ("zero", "exclude"):
            got = S.window_medians(np.asarray(ce), np.asarray(in_topk), mode)
            want = selection_score(logits, windows[:, 1:], k, mode=mode)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
