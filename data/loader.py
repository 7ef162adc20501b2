"""Deterministic, resumable batches of training windows from a token store.

Windows: the split's flat token stream is cut into consecutive windows of ``seq_len + 1``
tokens; window ``i`` is ``tokens[i*(seq_len+1) : (i+1)*(seq_len+1)]`` (the tail that does
not fill a window is unused). Window ids always refer to the full split, so ids scored,
selected or excluded through one Loader are valid for any other with the same ``seq_len``.

Order: the *pool* is the sorted set of usable window ids (all, or ``subset``, minus
``exclude``). Global sample ``g = step * global_batch + j`` (``j < global_batch``) is
``pool[perm_e[g mod P]]`` with ``e = g // P``, ``P = len(pool)`` and ``perm_e`` the
permutation ``np.random.default_rng([seed, e]).permutation(P)``. The batch of a step is a
pure function of ``(seed, step, pool)``: resuming at step ``s`` gives exactly the batch an
uninterrupted run sees, and the state to checkpoint is just ``(seed, step)`` (plus the
pool fingerprint, to check that the resumed run uses the same pool). Epochs wrap around
inside a batch when the pool size is not a multiple of the batch.

Processes: each process takes its contiguous share ``[pi * B/pc, (pi+1) * B/pc)`` of the
global batch, so the processes' batches are disjoint and together form the global batch.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np

from salt.data.store import SPLITS, TokenStore, open_store

_PERMUTATION_CACHE_SIZE = 3


def _as_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _windows_view(store: TokenStore, split: str, seq_len: int) -> np.ndarray:
    """2-D read-only view [num_windows, seq_len + 1] of the split's memmap (no copy)."""
    tokens = store.tokens(split)
    width = seq_len + 1
    n = len(tokens) // width
    if len(tokens) == 0:
        raise ValueError(f"split {split!r} of {store.path} is empty (prepared with val_fraction="
                         f"{store.metadata.get('val_fraction')!r})")
    if n == 0:
        raise ValueError(f"seq_len={seq_len} is too large for split {split!r} of {store.path}: "
                         f"it holds {len(tokens):,} tokens, fewer than one window of "
                         f"seq_len + 1 = {width}")
    return tokens[: n * width].reshape(n, width)


def _check_ids(name: str, ids, num_windows: int) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of window ids, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer window ids, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= num_windows:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name}: window id {bad} is out of range [0, {num_windows}) "
                         f"for this split and seq_len")
    return arr


class Loader:
    """Batches of windows for training; see the module docstring for the exact order."""

    def __init__(self, store_or_dir, *, seq_len: int, global_batch: int, seed: int = 0,
                 split: str = "train", subset=None, exclude=None,
                 process_index: int | None = None, process_count: int | None = None):
        self.store = open_store(store_or_dir)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.split = split
        self.seq_len = _as_int("seq_len", seq_len, 1)
        self.global_batch = _as_int("global_batch", global_batch, 1)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        if process_index is None or process_count is None:
            default_index, default_count = _jax_process()
            process_index = default_index if process_index is None else process_index
            process_count = default_count if process_count is None else process_count
        self.process_count = _as_int("process_count", process_count, 1)
        self.process_index = _as_int("process_index", process_index, 0)
        if self.process_index >= self.process_count:
            raise ValueError(f"process_index={self.process_index} must be < process_count={self.process_count}")
        if self.global_batch % self.process_count:
            raise ValueError(f"global_batch={self.global_batch} is not divisible by "
                             f"process_count={self.process_count}")
        self.local_batch = self.global_batch // self.process_count

        self._view = _windows_view(self.store, split, self.seq_len)
        self.total_windows = self._view.shape[0]
        if self.total_windows == 0:
            raise ValueError(f"seq_len={self.seq_len}: split {split!r} of {self.store.path} has "
                             f"{self.store.num_tokens(split)} tokens, fewer than one window of seq_len + 1 "
                             f"= {self.seq_len + 1}; use a smaller --seq-len")
        if subset is None:
            pool = np.arange(self.total_windows, dtype=np.int64)
        else:
            subset = _check_ids("subset", subset, self.total_windows)
            pool = np.unique(subset)
            if len(pool) != len(subset):
                raise ValueError(f"subset holds {len(subset) - len(pool)} duplicate window ids; "
                                 "a selection must list each window once")
        if exclude is not None:
            exclude = _check_ids("exclude", exclude, self.total_windows)
            pool = pool[~np.isin(pool, exclude)]
        if len(pool) == 0:
            raise ValueError(f"empty pool: no windows left in split {split!r} of {self.store.path} "
                             f"after subset/exclude ({self.total_windows} windows of "
                             f"{self.seq_len + 1} tokens in the split)")
        pool.flags.writeable = False
        self.pool = pool
        self.pool_sha256 = hashlib.sha256(pool.astype("<i8").tobytes()).hexdigest()
        self._permutations: dict[int, np.ndarray] = {}

    @property
    def num_windows(self) -> int:
        """Number of windows in the pool (after subset/exclude)."""
        return len(self.pool)

    @property
    def steps_per_epoch(self) -> float:
        return len(self.pool) / self.global_batch

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = self._permutations.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.pool))
            if len(self._permutations) >= _PERMUTATION_CACHE_SIZE:
                self._permutations.pop(next(iter(self._permutations)))
            self._permutations[epoch] = perm
        return perm

    def _check_step(self, step) -> int:
        return _as_int("step", step, 0)

    def epoch(self, step: int) -> int:
        """Epoch of the first sample of ``step``."""
        return self._check_step(step) * self.global_batch // len(self.pool)

    def window_ids(self, step: int) -> np.ndarray:
        """int64 [global_batch]: the window ids of 0-based ``step`` (all processes)."""
        step = self._check_step(step)
        n = len(self.pool)
        g = step * self.global_batch + np.arange(self.global_batch, dtype=np.int64)
        epochs, positions = np.divmod(g, n)
        out = np.empty(self.global_batch, np.int64)
        for e in np.unique(epochs):
            mask = epochs == e
            out[mask] = self.pool[self._permutation(int(e))[positions[mask]]]
        return out

    def local_window_ids(self, step: int) -> np.ndarray:
        """int64 [local_batch]: this process's contiguous share of ``window_ids(step)``."""
        start = self.process_index * self.local_batch
        return self.window_ids(step)[start:start + self.local_batch]

    def windows(self, ids) -> np.ndarray:
        """int32 [n, seq_len + 1]: the tokens of the given window ids."""
        ids = _check_ids("ids", ids, self.total_windows)
        windows = self._view[ids].astype(np.int32)
        self.store.check_ids(windows, self.split, f"window {int(ids[np.argmax(windows.max(axis=1))])} of"
                             if windows.size else "")
        return windows

    def batch(self, step: int) -> np.ndarray:
        """int32 [local_batch, seq_len + 1]: this process's windows for ``step``."""
        return self.windows(self.local_window_ids(step))

    def state(self, step: int) -> dict:
        """The (tiny) state to checkpoint: resuming needs only ``step`` with the same settings."""
        step = self._check_step(step)
        g = step * self.global_batch
        return {"seed": self.seed, "step": step, "epoch": g // len(self.pool),
                "position_in_epoch": g % len(self.pool), "split": self.split,
                "seq_len": self.seq_len, "global_batch": self.global_batch,
                "pool_size": len(self.pool), "pool_sha256": self.pool_sha256,
                "tokenizer_sha256": self.store.tokenizer_sha256}

    def check_state(self, state: dict) -> int:
        """Check a checkpointed ``state`` matches this loader; returns the step to resume at."""
        mine = self.state(0)
        for key in ("seed", "split", "seq_len", "global_batch", "pool_size", "pool_sha256",
                    "tokenizer_sha256"):
            if state.get(key) != mine[key]:
                raise ValueError(f"loader state mismatch on {key!r}: checkpoint has {state.get(key)!r}, "
                                 f"this loader has {mine[key]!r}")
        return self._check_step(state.get("step"))

    def __iter__(self) -> Iterator[np.ndarray]:
        step = 0
        while True:
            yield self.batch(step)
            step += 1


def validation_batches(store_or_dir, *, seq_len: int, batch_size: int, max_windows: int | None = None,
                       split: str = "val") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(window_ids int64 [b], tokens int32 [b, seq_len + 1])`` over the held-out split.

    Windows in id order 0, 1, ...; at most ``max_windows`` of them; the last batch may be
    smaller than ``batch_size``.
    """
    store = open_store(store_or_dir)
    seq_len = _as_int("seq_len", seq_len, 1)
    batch_size = _as_int("batch_size", batch_size, 1)
    view = _windows_view(store, split, seq_len)
    n = view.shape[0]
    if max_windows is not None:
        n = min(n, _as_int("max_windows", max_windows, 1))
    return _iter_validation(view, n, batch_size)


def _iter_validation(view: np.ndarray, n: int, batch_size: int):
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        yield np.arange(start, stop, dtype=np.int64), np.asarray(view[start:stop], dtype=np.int32)


def _jax_process() -> tuple[int, int]:
    try:
        import jax
    except ImportError:
        return 0, 1
    return jax.process_index(), jax.process_count()
