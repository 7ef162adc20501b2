"""The UL2 mixture of denoising objectives for a decoder-only model (docs/design.md §7).

Each training window of ``T1 = T + 1`` tokens is turned into one example of the same length by
one of four objectives, mixed 6:2:1:1:

* ``causal``  — next-token prediction over the whole window (no prefix);
* ``prefix``  — prefix LM: a prefix of mean length ``T / 4`` is attended bidirectionally and
  only the tokens after it are targets;
* ``span15``  — span corruption, 15% of the tokens in spans of mean length 3;
* ``span50``  — span corruption, 50% of the tokens in spans of mean length 32.

Span corruption is packed as ``[corrupted input][targets][pad]``: the corrupted input is the
text with every noise span replaced by one sentinel (bidirectional prefix); the targets are,
for each span in order, its sentinel followed by the span's tokens (T5's convention). The
packed length is ``n + 2·spans ≤ T1`` for ``n`` source tokens; the rest is padding.

An example is ``(tokens_T1, prefix_len, target_mask_T)``: the model reads ``tokens[:-1]`` with
a bidirectional prefix of ``prefix_len`` positions and is scored (CE and KD alike) where
``target_mask`` is set, i.e. where ``tokens[i + 1]`` is a target. For the prefix objectives
the first scored position is ``prefix_len - 1`` (it predicts the first target token and sees
only the prefix), so no prefix token is ever predicted from a position that can see it.

Everything is a function of ``(seed, step, slot)`` — ``slot`` being the window's place in the
global batch — so resumed runs see exactly the same examples. The objective of each window is
drawn without replacement from blocks of ten global slots holding the 6:2:1:1 multiset, so the
mixture is exact over every aligned block of ten windows.
"""
from __future__ import annotations

import dataclasses

import numpy as np

OBJECTIVES = ("causal", "prefix", "span15", "span50")
MIXTURE = (6, 2, 1, 1)                   # causal : prefix : span15 : span50
_BLOCK = np.repeat(np.arange(len(OBJECTIVES)), MIXTURE)  # the ten objectives of a block
_SALT = 0x0512  # separates this module's random streams from the loader's


@dataclasses.dataclass(frozen=True)
class SpanCorruption:
    rate: float          # fraction of the source tokens that are corrupted
    mean_span: float     # mean noise-span length


SPANS = {"span15": SpanCorruption(0.15, 3.0), "span50": SpanCorruption(0.50, 32.0)}


class UL2Error(ValueError):
    """The data or the tokenizer cannot serve the UL2 objective (a user error)."""


def _rng(seed: int, step: int, slot: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([_SALT, int(seed), int(step), int(slot), int(stream)])


def objective_ids(seed: int, step: int, global_batch: int) -> np.ndarray:
    """int64 ``[global_batch]``: index into :data:`OBJECTIVES` of each window of 0-based ``step``."""
    g = int(step) * int(global_batch) + np.arange(int(global_batch), dtype=np.int64)
    block, pos = np.divmod(g, _BLOCK.size)
    out = np.empty(global_batch, np.int64)
    for b in np.unique(block):
        perm = np.random.default_rng([_SALT, int(seed), int(b)]).permutation(_BLOCK)
        sel = block == b
        out[sel] = perm[pos[sel]]
    return out


def _causal(window_T1: np.ndarray):
    T = window_T1.size - 1
    return window_T1.copy(), 0, np.ones(T, bool)


def _prefix(window_T1: np.ndarray, rng: np.random.Generator):
    T = window_T1.size - 1
    # prefix length uniform on [1, T // 2]: mean about T / 4, and targets always remain
    p = int(rng.integers(1, max(1, T // 2) + 1))
    mask = np.arange(T) >= p - 1
    return window_T1.copy(), p, mask


def _segment(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """``parts`` positive lengths summing to ``total`` (a uniformly random composition)."""
    if parts == 1:
        return np.array([total], np.int64)
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]])).astype(np.int64)


def span_layout(T1: int, spec: SpanCorruption, max_spans: int) -> tuple[int, int, int]:
    """``(n, noise, spans)``: source tokens, noise tokens and spans for a packed length ``T1``.

    The largest ``n`` with ``n + 2·spans(n) <= T1`` (at least one kept and one noise token).
    """
    def counts(n):
        noise = min(max(1, int(round(n * spec.rate))), n - 1)
        spans = min(max(1, int(round(noise / spec.mean_span))), noise, n - noise, max_spans)
        return noise, spans

    n = int(T1 / (1.0 + 2.0 * spec.rate / spec.mean_span)) + 2
    while n > 2:
        noise, spans = counts(n)
        if n + 2 * spans <= T1:
            return n, noise, spans
        n -= 1
    raise UL2Error(f"a window of {T1} tokens is too short for span corruption")


def _span(window_T1: np.ndarray, spec: SpanCorruption, sentinels: np.ndarray, pad_id: int,
          rng: np.random.Generator):
    T1 = window_T1.size
    n, noise, spans = span_layout(T1, spec, sentinels.size)
    src = window_T1[:n]
    noise_len = _segment(noise, spans, rng)
    keep_len = _segment(n - noise, spans, rng)  # each span is preceded by kept text
    inputs, targets = [], []
    pos = 0
    for s in range(spans):
        inputs.append(src[pos:pos + keep_len[s]])
        pos += keep_len[s]
        inputs.append(sentinels[s:s + 1])
        targets.append(sentinels[s:s + 1])
        targets.append(src[pos:pos + noise_len[s]])
        pos += noise_len[s]
    corrupted = np.concatenate(inputs)
    target = np.concatenate(targets)
    a, b = corrupted.size, target.size
    out = np.full(T1, pad_id, dtype=window_T1.dtype)
    out[:a], out[a:a + b] = corrupted, target
    i = np.arange(T1 - 1)
    mask = (i >= a - 1) & (i <= a + b - 2)   # tokens[i + 1] lies in the targets
    return out, a, mask


def example(window_T1, objective: str, *, sentinels, pad_id: int, seed: int = 0, step: int = 0,
            slot: int = 0):
    """One UL2 example ``(tokens_T1, prefix_len, target_mask_T)`` of a window (see module doc)."""
    window_T1 = np.asarray(window_T1)
    if window_T1.ndim != 1 or window_T1.size < 3:
        raise UL2Error(f"a UL2 window needs at least 3 tokens, got shape {window_T1.shape}")
    rng = _rng(seed, step, slot, OBJECTIVES.index(objective))
    if objective == "causal":
        return _causal(window_T1)
    if objective == "prefix":
        return _prefix(window_T1, rng)
    sentinels = np.asarray(sentinels, dtype=window_T1.dtype)
    if sentinels.size == 0:
        raise UL2Error("span corruption needs sentinel ids: prepare the data with "
                       "`salt data prepare --sentinels N` (the tokenizer reserves them)")
    return _span(window_T1, SPANS[objective], sentinels, pad_id, rng)


def batch(windows_BxT1, *, seed: int, step: int, sentinels, pad_id: int, first_slot: int = 0,
          global_batch: int | None = None):
    """UL2 examples of a (local) batch of 0-based ``step``: ``(tokens_BxT1, prefix_len_B,
    target_mask_BxT, objective_B)``.

    ``first_slot``: the global slot of the first local window (a process's share starts there);
    ``global_batch``: the global batch size (default: this batch's size).
    """
    windows_BxT1 = np.asarray(windows_BxT1)
    if windows_BxT1.ndim != 2:
        raise UL2Error(f"windows must be [B, T+1], got shape {windows_BxT1.shape}")
    B, T1 = windows_BxT1.shape
    gb = B if global_batch is None else int(global_batch)
    objective_B = objective_ids(seed, step, gb)[first_slot:first_slot + B]
    tokens = np.empty_like(windows_BxT1)
    prefix_B = np.zeros(B, np.int32)
    mask = np.zeros((B, T1 - 1), bool)
    for b in range(B):
        tokens[b], prefix_B[b], mask[b] = example(
            windows_BxT1[b], OBJECTIVES[objective_B[b]], sentinels=sentinels, pad_id=pad_id,
            seed=seed, step=step, slot=first_slot + b)
    return tokens, prefix_B, mask, objective_B
