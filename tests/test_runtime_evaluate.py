"""Held-out metrics, teacher buckets, `salt eval`."""
import numpy as np
import pytest

from salt.runtime import evaluate as E


def _stats(ids, loss_sum, correct, T=4):
    ids = np.asarray(ids, np.int64)
    return {"window_ids": ids, "loss_sum": np.asarray(loss_sum, np.float64),
            "correct": np.asarray(correct, np.int64), "n_tokens": np.full(ids.size, T, np.int64)}


def test_summarize_token_weighted_metrics():
    s = _stats([0, 1, 2], [4.0, 8.0, 0.0], [1, 2, 4])
    m = E.summarize(s)
    assert m["accuracy"] == pytest.approx(7 / 12)
    assert m["log_ppl"] == pytest.approx(12 / 12)
    assert m["n_windows"] == 3 and m["n_tokens"] == 12
    assert "buckets" not in m


def test_buckets_are_teacher_loss_tertiles_with_id_ties():
    # teacher mean losses: id 10 -> 0.5, 11 -> 0.25, 12 -> 0.5 (tie with 10), 13 -> 2, 14 -> 1, 15 -> 3, 16 -> 0
    teacher = _stats([10, 11, 12, 13, 14, 15, 16], [2, 1, 2, 8, 4, 12, 0], [0] * 7)
    np.testing.assert_array_equal(E.bucket_order(teacher), [16, 11, 10, 12, 14, 13, 15])
    b = E.buckets(teacher)
    np.testing.assert_array_equal(b["easy"], [16, 11, 10])   # array_split: 3, 2, 2
    np.testing.assert_array_equal(b["medium"], [12, 14])
    np.testing.assert_array_equal(b["hard"], [13, 15])
    # A model's stats in a different window order; the buckets follow the ids.
    model = _stats([16, 15, 14, 13, 12, 11, 10], [4, 8, 12, 16, 20, 24, 28], [4, 3, 2, 1, 0, 0, 0])
    m = E.summarize(model, teacher)
    easy = m["buckets"]["easy"]  # ids 16, 11, 10 -> loss 4 + 24 + 28, correct 4 + 0 + 0
    assert easy["log_ppl"] == pytest.approx(56 / 12) and easy["accuracy"] == pytest.approx(4 / 12)
    hard = m["buckets"]["hard"]  # ids 13, 15 -> loss 16 + 8, correct 1 + 3
    assert hard["log_ppl"] == pytest.approx(24 / 8) and hard["accuracy"] == pytest.approx(4 / 8)
    # overall is unchanged by bucketing
    assert m["log_ppl"] == pytest.approx(E.summarize(model)["log_ppl"])


def test_summarize_rejects_mismatched_windows():
    teacher = _stats([0, 1, 2, 3], [1, 2, 3, 4], [0] * 4)
    with pytest.raises(ValueError, match="missing"):
        E.summarize(_stats([0, 1, 2], [1, 1, 1], [0] * 3), teacher)
    with pytest.raises(ValueError, match="at least 3"):
        E.buckets(_stats([0, 1], [1, 1], [0, 0]))


def test_format_table_lists_buckets():
    teacher = _stats([0, 1, 2], [1, 2, 3], [1, 2, 3])
    text = E.format_table([("m", E.summarize(teacher, teacher))])
    assert "easy acc" in text and "hard lppl" in text
    assert "50.00" in text  # overall accuracy 6/12
