"""UL2 mixture (salt.data.ul2): per-objective masks and targets, the 6:2:1:1 mixture, determinism,
and the tokenizer's reserved sentinels."""
import numpy as np
import pytest

from salt.data import ul2

SENTINELS = np.arange(4, 104)  # ids 4..103, as a tokenizer prepared with --sentinels 100 has them
PAD = 0


def _example(window, objective, **kw):
    return ul2.example(np.asarray(window), objective, sentinels=SENTINELS, pad_id=PAD, **kw)


def test_causal_is_the_plain_window():
    w = np.arange(200, 217)
    tokens, prefix, mask = _example(w, "causal")
    np.testing.assert_array_equal(tokens, w)
    assert prefix == 0 and mask.shape == (16,) and mask.all()


def test_span_corruption_hand_made_case():
    # T1 = 8 at rate 0.5 / mean span 32: 6 source tokens, 3 of them noise, one span; the kept
    # text comes first, so the layout is fully determined.
    assert ul2.span_layout(8, ul2.SPANS["span50"], 100) == (6, 3, 1)
    tokens, prefix, mask = _example(np.arange(10, 18), "span50")
    np.testing.assert_array_equal(tokens, [10, 11, 12, 4, 4, 13, 14, 15])
    assert prefix == 4  # "10 11 12 <extra_id_0>" is the bidirectional prefix
    # tokens[i + 1] is a target for i = 3..6: "<extra_id_0> 13 14 15"
    np.testing.assert_array_equal(mask, [False, False, False, True, True, True, True])


def test_prefix_lm_targets_only_after_the_prefix():
    T = 128
    lengths = []
    for slot in range(2000):
        tokens, prefix, mask = _example(np.arange(T + 1), "prefix", seed=3, step=1, slot=slot)
        np.testing.assert_array_equal(tokens, np.arange(T + 1))
        assert 1 <= prefix <= T // 2
        np.testing.assert_array_equal(np.flatnonzero(mask), np.arange(prefix - 1, T))
        lengths.append(prefix)
    assert abs(np.mean(lengths) - T / 4) < 1.0  # mean prefix length T/4 (s.e. ~0.4)


@pytest.mark.parametrize("objective", ["span15", "span50"])
def test_span_corruption_reconstructs_the_source(objective):
    spec = ul2.SPANS[objective]
    T1 = 257
    n, noise, spans = ul2.span_layout(T1, spec, SENTINELS.size)
    assert 0 <= T1 - (n + 2 * spans) <= 3  # the packed window is (nearly) full
    rates, lengths = [], []
    for slot in range(50):
        w = np.arange(1000, 1000 + T1)
        tokens, a, mask = _example(w, objective, seed=1, step=2, slot=slot)
        corrupted, rest = tokens[:a], tokens[a:]
        b = spans + noise  # one sentinel per span + the noise tokens
        target, pad = rest[:b], rest[b:]
        assert (pad == PAD).all()
        # scored positions are exactly those whose next token lies in the targets
        np.testing.assert_array_equal(np.flatnonzero(mask), np.arange(a - 1, a + b - 1))
        assert (np.flatnonzero(mask) + 1 >= a).all()  # nothing visible in the prefix is predicted
        # undo the corruption: each sentinel in the input is replaced by its span
        starts = np.flatnonzero(np.isin(target, SENTINELS))
        assert list(target[starts]) == list(SENTINELS[:spans])
        pieces = np.split(target, starts[1:])
        spans_text = {int(p[0]): p[1:] for p in pieces}
        rebuilt = np.concatenate([spans_text[int(t)] if t in spans_text else [t] for t in corrupted])
        np.testing.assert_array_equal(rebuilt, w[:n])
        rates.append(noise / n)
        lengths.append(np.mean([p.size - 1 for p in pieces]))
    assert abs(np.mean(rates) - spec.rate) < 0.01
    assert abs(np.mean(lengths) - spec.mean_span) < 0.15 * spec.mean_span


def test_mixture_ratio_over_ten_thousand_windows():
    counts = np.zeros(4)
    for step in range(10_000 // 32 + 1):
        ids = ul2.objective_ids(seed=7, step=step, global_batch=32)
        counts += np.bincount(ids, minlength=4)
    share = counts / counts.sum()
    np.testing.assert_allclose(share, np.array(ul2.MIXTURE) / 10, atol=0.01)
    assert counts.sum() >= 10_000


def test_deterministic_per_seed_step_and_slot_and_local_shares_agree():
    rng = np.random.default_rng(0)
    windows = rng.integers(104, 4096, size=(8, 65))
    full = ul2.batch(windows, seed=5, step=11, sentinels=SENTINELS, pad_id=PAD)
    again = ul2.batch(windows, seed=5, step=11, sentinels=SENTINELS, pad_id=PAD)
    for x, y in zip(full, again):
        np.testing.assert_array_equal(x, y)
    other = ul2.batch(windows, seed=5, step=12, sentinels=SENTINELS, pad_id=PAD)
    assert not all(np.array_equal(x, y) for x, y in zip(full, other))
    # a process holding windows 4..7 of the global batch gets the same examples
    half = ul2.batch(windows[4:], seed=5, step=11, sentinels=SENTINELS, pad_id=PAD, first_slot=4,
                     global_batch=8)
    for x, y in zip(full, half):
        np.testing.assert_array_equal(x[4:], y)


def test_span_corruption_without_sentinels_is_a_clear_error():
    with pytest.raises(ul2.UL2Error, match="--sentinels"):
        ul2.example(np.arange(20), "span15", sentinels=[], pad_id=PAD)
    # the other objectives need none
    ul2.example(np.arange(20), "prefix", sentinels=[], pad_id=PAD)


def test_tokenizer_reserves_sentinels_that_text_never_encodes_to(tmp_path):
    from salt.data.tokenizer import load_processor, sentinel_ids, train_tokenizer
    from tiny_corpus import make_tiny_corpus

    docs = [p.read_text() for p in sorted(make_tiny_corpus(tmp_path / "src", n_docs=10).iterdir())]
    sp = load_processor(train_tokenizer(docs, 300, sentinels=8))
    ids = sentinel_ids(sp)
    assert ids == list(range(4, 12))
    text = "kalo <extra_id_0> mine"
    encoded = sp.encode(text)
    assert not set(encoded) & set(ids) and sp.decode(encoded) == text
    assert sentinel_ids(load_processor(train_tokenizer(docs, 300))) == []
