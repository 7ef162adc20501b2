"""Reference data-selection score of SALT_DS (paper eq. 11, docs/design.md §4): plain NumPy.

For a sequence scored by the teacher (an early SLM checkpoint), per target position ``i`` with
teacher logits ``t_i`` (length V) predicting target token ``x_i``:

* ``c_i = -log softmax(t_i)[x_i]``                    (the teacher's per-token CE, float64)
* ``x_i`` is in the top-k iff FEWER than ``k`` vocabulary entries have a logit STRICTLY larger
  than ``t_i[x_i]`` (ties count in favour of membership; no sort is needed);
* mode ``"zero"`` (default, eq. 11): tokens outside the top-k contribute ``c_i = 0`` to the median;
  mode ``"exclude"``: they are dropped before the median;
* ``score = median_i c_i`` with numpy's convention (mean of the two middle values for an even
  count), over the sequence's valid positions (``mask``; padding is never counted).

A sequence with NO value left to take the median of (all positions masked, or in ``"exclude"``
mode no target in the top-k) gets the score ``-inf``: it ranks below every scored sequence and
never produces a NaN that would poison a sort.

The cost is computed as ``c = log1p(sum_{v != v*} exp(t_v - m)) + (m - t_x)`` with
``m = t_{v*} = max_v t_v``, which stays relatively accurate when ``c`` is tiny or the logits are
of magnitude 1e4. This module is the readable reference (vectorised over a chunk of sequences at
a time, to bound memory); :mod:`salt.reference.score_numba` is its fast CPU twin (one pass over V
per token, parallel over tokens), tested against it. Accepted logits dtypes: float64, float32,
float16 and ml_dtypes' bfloat16 (widened to float64 per chunk here).
"""
from __future__ import annotations

import numbers

import numpy as np

from salt.reference.losses import as_mask, check_k, cut_vocab

__all__ = ["selection_score", "token_costs", "top_m_indices", "SCORE_MODES"]

SCORE_MODES = ("zero", "exclude")

# ml_dtypes floats report dtype.kind 'V'; they widen exactly to float32.
NARROW_FLOAT_NAMES = frozenset({"bfloat16", "float16"})
_CHUNK_ELEMENTS = 1 << 24  # logits per chunk (at least one sequence); ~5 float64 temporaries


# ----------------------------------------------------------------------------- validation

def validate(teacher_logits, targets, k, mode, mask, vocab=None):
    """Return (logits [B,T,V] ndarray, targets int64 [B,T] (0 where masked), k, valid [B,T]);
    ``vocab``: the logits cut to their first ``vocab`` columns (a view; padded columns dropped)."""
    logits = np.asarray(teacher_logits)
    if logits.dtype.name not in NARROW_FLOAT_NAMES and logits.dtype.kind != "f":
        raise ValueError(
            f"teacher_logits must be float64/float32/float16/bfloat16, got dtype {logits.dtype}")
    if logits.ndim != 3 or logits.shape[-1] < 1:
        raise ValueError(f"teacher_logits must have shape [B, T, V] with V >= 1, got {logits.shape}")
    logits = cut_vocab("teacher_logits", logits, vocab)
    batch, length, vocab_size = logits.shape
    if mode not in SCORE_MODES:
        raise ValueError(f"mode must be one of {SCORE_MODES}, got {mode!r}")
    k = check_k(k, vocab_size)
    tokens = np.asarray(targets)
    if tokens.dtype.kind not in "iu":
        raise ValueError(f"targets must be an integer array, got dtype {tokens.dtype}")
    if tokens.shape != (batch, length):
        raise ValueError(
            f"targets must have shape [B, T] = {(batch, length)} to match teacher_logits "
            f"{logits.shape}, got {tokens.shape}")
    valid = as_mask(mask, (batch, length))
    bad = valid & ((tokens < 0) | (tokens >= vocab_size))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"targets must be in [0, V={vocab_size}) at unmasked positions, got {int(tokens[where])} "
            f"at index {where}")
    safe_tokens = np.where(valid, tokens, 0).astype(np.int64)
    return logits, safe_tokens, k, valid


def raise_non_finite(bad_BxT: np.ndarray) -> None:
    if bad_BxT.any():
        where = tuple(int(i) for i in np.argwhere(bad_BxT)[0])
        raise ValueError(
            f"teacher_logits has non-finite values (nan/inf) at unmasked position {where}")


# ----------------------------------------------------------------------------- the score

def token_costs(teacher_logits, targets, k, mask=None, chunk_elements=_CHUNK_ELEMENTS, *, vocab=None):
    """Per-token ``(c_BxT, in_topk_BxT)``: the teacher's CE of each target and its top-k
    membership (fewer than k logits strictly larger). Both 0/False at masked positions.
    ``vocab``: only the first ``vocab`` columns count (a padded vocabulary's extra columns never do);
    ``chunk_elements`` bounds the logits widened to float64 at once."""
    logits, tokens, k, valid = validate(teacher_logits, targets, k, "zero", mask, vocab)
    batch, length, vocab_size = logits.shape
    costs = np.zeros((batch, length), dtype=np.float64)
    in_topk = np.zeros((batch, length), dtype=bool)
    bad = np.zeros((batch, length), dtype=bool)
    step = max(1, chunk_elements // max(1, length * vocab_size))
    with np.errstate(invalid="ignore", over="ignore"):
        for start in range(0, batch, step):
            stop = min(batch, start + step)
            x = logits[start:stop].astype(np.float64)                        # [b, T, V]
            target_logit = np.take_along_axis(x, tokens[start:stop, :, None], axis=-1)[..., 0]
            n_greater = (x > target_logit[..., None]).sum(axis=-1)
            x_max = x.max(axis=-1)
            at_max = x == x_max[..., None]
            exp_below = np.where(at_max, 0.0, np.exp(x - x_max[..., None]))
            rest = exp_below.sum(axis=-1) + (at_max.sum(axis=-1) - 1)
            ok = np.isfinite(x).all(axis=-1)
            chunk_valid = valid[start:stop]
            bad[start:stop] = chunk_valid & ~ok
            keep = chunk_valid & ok
            costs[start:stop] = np.where(keep, np.log1p(rest) + (x_max - target_logit), 0.0)
            in_topk[start:stop] = keep & (n_greater < k)
    raise_non_finite(bad)
    return costs, in_topk


def selection_score(teacher_logits, targets, k, mode="zero", mask=None, chunk_elements=_CHUNK_ELEMENTS, *,
                    vocab=None) -> np.ndarray:
    """Eq. 11 score of each sequence: float64 ``[B]``.

    ``teacher_logits``: ``[B, T, V]`` (``teacher_logits[b, i]`` predicts ``targets[b, i]``);
    ``targets``: ``[B, T]`` int; ``k`` in [1, V]; ``mode``: ``"zero"`` or ``"exclude"``;
    ``mask``: optional ``[B, T]`` bool, False at padded positions (never counted); ``vocab``,
    ``chunk_elements``: as :func:`token_costs`. The module docstring has the exact definition.
    """
    _, _, _, valid = validate(teacher_logits, targets, k, mode, mask, vocab)
    costs, in_topk = token_costs(teacher_logits, targets, k, mask, chunk_elements, vocab=vocab)
    if mode == "zero":
        values, keep = np.where(in_topk, costs, 0.0), valid
    else:
        values, keep = costs, valid & in_topk
    scores = np.full(costs.shape[0], -np.inf)
    has_value = keep.any(axis=1)
    if has_value.any():
        kept = np.where(keep[has_value], values[has_value], np.nan)
        scores[has_value] = np.nanmedian(kept, axis=1)
    return scores


# ----------------------------------------------------------------------------- selection

def top_m_indices(scores, m: int) -> np.ndarray:
    """Indices of the ``m`` highest scores, ties broken by the lower index (docs/design.md §4).

    ``scores``: 1-D float (``-inf`` allowed, NaN rejected). Returns int64 ``[m]``, best first.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError(f"scores contain NaN at index {int(np.argmax(np.isnan(scores)))}")
    if isinstance(m, (bool, np.bool_)) or not isinstance(m, numbers.Integral) or not 0 <= m <= scores.size:
        raise ValueError(f"m must be an integer in [0, {scores.size}], got {m!r}")
    order = np.lexsort((np.arange(scores.size), -scores))
    return order[:int(m)].astype(np.int64)
