"""Loader: window definition, pure (seed, step) order, resume, process split, subset/exclude."""
import random

import numpy as np
import pytest

from salt.data import Loader, TokenStore, prepare, validation_batches

SEQ = 15  # windows of 16 tokens


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = random.Random(1)
    words = ["".join(rng.choice("abcdefghij klmnop\n") for _ in range(rng.randint(3, 12)))
             for _ in range(300)]
    src = tmp_path_factory.mktemp("src")
    for i in range(60):
        (src / f"d{i:02d}.txt").write_text(" ".join(rng.choices(words, k=rng.randint(20, 120))))
    out = tmp_path_factory.mktemp("store") / "s"
    prepare(out, [src], vocab_size=320, val_fraction=0.15, progress=False, workers=1)
    return TokenStore(out)


def loader(store, **kw):
    kw.setdefault("seq_len", SEQ)
    kw.setdefault("global_batch", 8)
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return Loader(store, **kw)


def test_windows_are_consecutive_slices_of_the_stream(store):
    L = loader(store)
    tokens = np.asarray(store.tokens("train"))
    n = len(tokens) // (SEQ + 1)
    assert L.total_windows == n == L.num_windows > 50
    np.testing.assert_array_equal(L.pool, np.arange(n))
    ids = np.array([0, n - 1, 7, 7])
    w = L.windows(ids)
    assert w.dtype == np.int32 and w.shape == (4, SEQ + 1)
    for row, i in zip(w, ids):
        np.testing.assert_array_equal(row, tokens[i * (SEQ + 1):(i + 1) * (SEQ + 1)])
    with pytest.raises(ValueError, match=f"ids: window id {n} is out of range"):
        L.windows([n])
    # The store path works as well as a TokenStore.
    np.testing.assert_array_equal(Loader(store.path, seq_len=SEQ, global_batch=8, process_index=0,
                                         process_count=1).batch(3), L.batch(3))


def test_order_is_a_pure_function_of_seed_and_step(store):
    a, b = loader(store, seed=3), loader(store, seed=3)
    # Resume: a fresh loader asked for step 17 gives what a run that went through 0..16 sees.
    run = [a.batch(s) for s in range(25)]
    np.testing.assert_array_equal(b.batch(17), run[17])
    np.testing.assert_array_equal(b.window_ids(24), a.window_ids(24))
    np.testing.assert_array_equal(loader(store, seed=3).batch(0), run[0])
    assert not np.array_equal(loader(store, seed=4).window_ids(0), a.window_ids(0))
    state = a.state(17)
    assert {"seed": 3, "step": 17, "epoch": 17 * 8 // a.num_windows}.items() <= state.items()
    assert b.check_state(state) == 17
    with pytest.raises(ValueError, match="mismatch on 'seed'"):
        loader(store, seed=4).check_state(state)


def test_each_epoch_is_a_permutation_with_wrap_around(store):
    L = loader(store, global_batch=7, seed=2)
    P = L.num_windows
    steps = (3 * P) // 7 + 2
    stream = np.concatenate([L.window_ids(s) for s in range(steps)])
    for e in range(3):
        epoch_ids = stream[e * P:(e + 1) * P]
        np.testing.assert_array_equal(np.sort(epoch_ids), L.pool)
        expected = L.pool[np.random.default_rng([2, e]).permutation(P)]
        np.testing.assert_array_equal(epoch_ids, expected)
    assert L.epoch(steps - 1) == (steps - 1) * 7 // P


def test_process_split_is_disjoint_and_complete(store):
    full = loader(store, global_batch=12, seed=9)
    for step in (0, 5, 40):
        parts = [loader(store, global_batch=12, seed=9, process_index=i, process_count=3)
                 for i in range(3)]
        batches = [p.batch(step) for p in parts]
        assert all(b.shape == (4, SEQ + 1) for b in batches)
        np.testing.assert_array_equal(np.concatenate(batches), full.batch(step))
        ids = [p.local_window_ids(step) for p in parts]
        np.testing.assert_array_equal(np.concatenate(ids), full.window_ids(step))
    with pytest.raises(ValueError, match="global_batch=10 is not divisible by process_count=3"):
        loader(store, global_batch=10, process_count=3)
    with pytest.raises(ValueError, match="process_index=3 must be < process_count=3"):
        loader(store, global_batch=12, process_index=3, process_count=3)


def test_subset_and_exclude(store):
    full = loader(store)
    n = full.total_windows
    subset = np.array([n - 1, 3, 10, 4, 20, 11])
    sub = loader(store, subset=subset, exclude=[4, 0])
    np.testing.assert_array_equal(sub.pool, [3, 10, 11, 20, n - 1])
    assert sub.num_windows == 5
    seen = np.concatenate([sub.window_ids(s) for s in range(10)])
    assert set(seen.tolist()) == {3, 10, 11, 20, n - 1}
    # Ids keep meaning the full split's windows.
    np.testing.assert_array_equal(sub.windows([10]), full.windows([10]))
    ex = loader(store, exclude=np.arange(0, n, 2))
    np.testing.assert_array_equal(ex.pool, np.arange(1, n, 2))
    with pytest.raises(ValueError, match=f"subset: window id {n} is out of range"):
        loader(store, subset=[n])
    with pytest.raises(ValueError, match="exclude: window id -1 is out of range"):
        loader(store, exclude=[-1])
    with pytest.raises(ValueError, match="duplicate window ids"):
        loader(store, subset=[1, 1, 2])
    with pytest.raises(ValueError, match="empty pool"):
        loader(store, subset=[1, 2], exclude=[1, 2])
    with pytest.raises(ValueError, match="empty pool"):
        loader(store, subset=np.zeros(0, np.int64))


def test_bad_arguments(store):
    n_tokens = len(store.tokens("train"))
    with pytest.raises(ValueError, match=f"seq_len={n_tokens} is too large for split 'train'"):
        loader(store, seq_len=n_tokens)
    with pytest.raises(ValueError, match="seq_len must be an integer >= 1"):
        loader(store, seq_len=0)
    with pytest.raises(ValueError, match="global_batch must be an integer >= 1"):
        loader(store, global_batch=0)
    with pytest.raises(ValueError, match="split must be one of"):
        loader(store, split="test")
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        loader(store).batch(-1)
    # A global batch larger than the pool is fine: it wraps into the next epoch.
    small = loader(store, subset=[1, 2, 3], global_batch=8)
    assert sorted(set(small.window_ids(0).tolist())) == [1, 2, 3]


def test_validation_batches_fixed_order(store):
    val = np.asarray(store.tokens("val"))
    n = len(val) // (SEQ + 1)
    batches = list(validation_batches(store, seq_len=SEQ, batch_size=4))
    ids = np.concatenate([b[0] for b in batches])
    np.testing.assert_array_equal(ids, np.arange(n))
    assert all(len(b[0]) == 4 for b in batches[:-1]) and 1 <= len(batches[-1][0]) <= 4
    tokens = np.concatenate([b[1] for b in batches])
    assert tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens, val[: n * (SEQ + 1)].reshape(n, SEQ + 1))
    limited = list(validation_batches(store.path, seq_len=SEQ, batch_size=3, max_windows=5))
    assert [len(b[0]) for b in limited] == [3, 2]
    # Same windows through a Loader on the val split.
    np.testing.assert_array_equal(loader(store, split="val").windows([0, 1, 2]), batches[0][1][:3])
    with pytest.raises(ValueError, match="too large for split 'val'"):
        validation_batches(store, seq_len=len(val), batch_size=2)


def test_process_defaults_come_from_jax(store):
    jax = pytest.importorskip("jax")
    L = Loader(store, seq_len=SEQ, global_batch=8)
    assert (L.process_index, L.process_count) == (jax.process_index(), jax.process_count())
    assert L.local_batch == 8 // jax.process_count()


def test_empty_validation_split_is_explained(tmp_path):
    src = tmp_path / "doc.txt"
    src.write_text("some text to tokenize, " * 50)
    prepare(tmp_path / "s", [src], val_fraction=0.0, progress=False, workers=1)
    with pytest.raises(ValueError, match=r"split 'val' of .* is empty \(prepared with val_fraction=0.0\)"):
        validation_batches(tmp_path / "s", seq_len=8, batch_size=2)
