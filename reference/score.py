"""Reference data-selection score of SALT_DS (paper eq. 11, docs/design.md §4).

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

Two implementations of the same function: :func:`selection_score` (Numba, parallel over tokens,
ONE pass over V per token: an online max / sum-exp, at the granularity of L1-sized blocks, and the
count of strictly larger logits in the same sweep; float64 accumulation; see the kernel's
comments) and :func:`selection_score_numpy` (plain vectorised NumPy, for cross-checking; processes
the batch in chunks of sequences to bound memory). Both compute

    ``c = log1p(sum_{v != v*} exp(t_v - m)) + (m - t_x)``,  ``m = t_{v*} = max_v t_v``,

which is relatively accurate even when ``c`` is tiny or the logits are of magnitude 1e4. Accepted
logits dtypes: float64, float32, float16 and ml_dtypes' bfloat16 (the last two are widened to
float32 exactly, in chunks); any other NumPy float (other byte order, extended precision) is
converted to float64, in chunks.
"""
from __future__ import annotations

import numbers

import numba
import numpy as np
from llvmlite import ir as llvm_ir
from numba import types
from numba.extending import intrinsic

from salt.reference.losses import as_mask, check_k, cut_vocab

__all__ = ["selection_score", "selection_score_numpy", "token_costs", "token_costs_numpy",
           "top_m_indices", "SCORE_MODES"]

SCORE_MODES = ("zero", "exclude")

# ml_dtypes floats report dtype.kind 'V'; they widen exactly to float32.
_NARROW_FLOAT_NAMES = frozenset({"bfloat16", "float16"})
_CHUNK_ELEMENTS = 1 << 25  # Numba: non-native logits converted per chunk (128 MB as float32)
_NUMPY_CHUNK_ELEMENTS = 1 << 24  # NumPy: logits per chunk (at least one sequence); ~5 float64 temporaries


# ----------------------------------------------------------------------------- validation

def _validate(teacher_logits, targets, k, mode, mask, vocab=None):
    """Return (logits [B,T,V] ndarray, targets int64 [B,T] (0 where masked), k, valid [B,T]);
    ``vocab``: the logits cut to their first ``vocab`` columns (a view; padded columns dropped)."""
    logits = np.asarray(teacher_logits)
    if logits.dtype.name not in _NARROW_FLOAT_NAMES and logits.dtype.kind != "f":
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


def _raise_non_finite(bad_BxT: np.ndarray) -> None:
    if bad_BxT.any():
        where = tuple(int(i) for i in np.argwhere(bad_BxT)[0])
        raise ValueError(
            f"teacher_logits has non-finite values (nan/inf) at unmasked position {where}")


def _sequence_chunks(logits_BxTxV: np.ndarray):
    """Yield (start, stop, chunk) with chunk a native float32/float64 C-contiguous view or copy.

    Narrow floats (float16, bfloat16) are widened to float32 exactly; other float dtypes
    (float64 in the other byte order, extended precision) become float64, never float32.
    """
    batch, length, vocab_size = logits_BxTxV.shape
    dtype = logits_BxTxV.dtype
    if dtype in (np.dtype(np.float32), np.dtype(np.float64)):
        yield 0, batch, np.ascontiguousarray(logits_BxTxV)
        return
    wide = np.float32 if dtype.name in _NARROW_FLOAT_NAMES else np.float64
    step = max(1, _CHUNK_ELEMENTS // max(1, length * vocab_size))
    for start in range(0, batch, step):
        stop = min(batch, start + step)
        yield start, stop, np.ascontiguousarray(logits_BxTxV[start:stop], dtype=wide)


# ----------------------------------------------------------------------------- Numba

# The per-token pass is organised in blocks of _BLOCK logits (4-8 KB, L1-resident), an online
# max / sum-exp at block granularity: a branch-free sweep of the block (vectorised by LLVM: exp,
# compares, counts) assumes the running max ``m`` still holds; if the block has a logit above
# ``m`` (rare after the first blocks: ~log(V / _BLOCK) times per row for random logits), the sum
# is rescaled to the block's max and the same (cached) block is swept again. Each logit is read
# from memory once: one pass over V, no sort. LLVM does not vectorise calls to libm's exp, so the
# sweep uses _exp_nonpositive below (accurate to ~1 ulp).
_BLOCK = 1024
_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # Cody-Waite split of ln 2: n * _LN2_HI is exact for |n| < 2**21
_LN2_LO = 1.90821492927058770002e-10
_INV_FACTORIAL = tuple(1.0 / float(np.prod(np.arange(1, i + 1, dtype=np.float64))) for i in range(14))
(_C2, _C3, _C4, _C5, _C6, _C7, _C8, _C9, _C10, _C11, _C12, _C13) = _INV_FACTORIAL[2:]


@intrinsic
def _int64_bits_as_float64(typingctx, bits):
    """Reinterpret the bits of an int64 as a float64 (LLVM bitcast; vectorisable)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvm_ir.DoubleType())
    return types.float64(types.int64), codegen


@numba.njit(cache=True)
def _exp_nonpositive(d):
    """exp(d) for d <= 0 (d > 0 is treated as 0), within ~1 ulp, branch-free so it vectorises.

    d = n ln2 + r with |r| <= ln2/2 (Cody-Waite), exp(r) by its degree-13 Taylor polynomial
    (truncation < 5e-18), times 2**n applied as two exact power-of-two factors (so results in the
    subnormal range round once, and exp(d) = 0 for d < -746, including d = -inf).
    """
    d = min(max(d, -746.0), 0.0)
    n_float = np.floor(d * _LOG2E + 0.5)
    r = (d - n_float * _LN2_HI) - n_float * _LN2_LO
    p = _C13
    p = p * r + _C12
    p = p * r + _C11
    p = p * r + _C10
    p = p * r + _C9
    p = p * r + _C8
    p = p * r + _C7
    p = p * r + _C6
    p = p * r + _C5
    p = p * r + _C4
    p = p * r + _C3
    p = p * r + _C2
    p = p * r + 1.0
    p = p * r + 1.0
    n = np.int64(n_float)
    half = n >> 1
    return (p * _int64_bits_as_float64((half + 1023) << 52)
            * _int64_bits_as_float64((n - half + 1023) << 52))


@numba.njit(cache=True, fastmath={"contract"})
def _sweep_block(block_B, running_max, target_logit, exp_below_B):
    """Branch-free pass over one block of logits assuming running_max is still the max.

    Writes exp(t_v - running_max) for t_v < running_max (else 0) into exp_below_B, plus NaN for
    any non-finite t_v (so a nan/inf can never vanish); returns the counts
    (t_v == running_max, t_v > running_max, t_v > target_logit).
    """
    n_at_max = 0
    n_above = 0
    n_greater = 0
    for v in range(block_B.size):
        value = np.float64(block_B[v])
        e = _exp_nonpositive(value - running_max)
        exp_below_B[v] = (e if value < running_max else 0.0) + (value - value)
        n_at_max += value == running_max
        n_above += value > running_max
        n_greater += value > target_logit
    return n_at_max, n_above, n_greater


@numba.njit(cache=True, fastmath={"reassoc", "nsz"})
def _sum_block(values_B, count):
    """Sum of values_B[:count] (reassociation allowed so that it vectorises; NaN propagates)."""
    total = 0.0
    for v in range(count):
        total += values_B[v]
    return total


@numba.njit(cache=True)
def _block_max(block_B):
    """Largest value of the block as float64 (NaN entries are skipped; they are caught elsewhere)."""
    block_max = -np.inf
    for v in range(block_B.size):
        value = np.float64(block_B[v])
        if value > block_max:
            block_max = value
    return block_max


@numba.njit(parallel=True, cache=True, nogil=True)
def _token_costs_kernel(logits_NxV, targets_N, valid_N, k, costs_N, in_topk_N, bad_N):
    """Per token: online max + sum of exp below the max + count strictly above t_x, one pass."""
    n_tokens, vocab_size = logits_NxV.shape
    for n in numba.prange(n_tokens):
        costs_N[n] = 0.0
        in_topk_N[n] = False
        bad_N[n] = False
        if not valid_N[n]:
            continue
        row_V = logits_NxV[n]
        target_logit = np.float64(row_V[targets_N[n]])
        exp_below_B = np.empty(_BLOCK, dtype=np.float64)
        running_max = _block_max(row_V[:min(vocab_size, _BLOCK)])
        sum_below = 0.0   # sum of exp(t_v - running_max) over t_v < running_max
        n_at_max = 0      # how many t_v == running_max
        n_greater = 0     # how many t_v > target_logit
        for start in range(0, vocab_size, _BLOCK):
            block_B = row_V[start:min(vocab_size, start + _BLOCK)]
            block_at_max, block_above, block_greater = _sweep_block(
                block_B, running_max, target_logit, exp_below_B)
            if block_above > 0:  # a new running max: rescale the sum, redo the block
                new_max = _block_max(block_B)
                sum_below = (sum_below + n_at_max) * np.exp(running_max - new_max)
                n_at_max = 0
                running_max = new_max
                block_at_max, block_above, block_greater = _sweep_block(
                    block_B, running_max, target_logit, exp_below_B)
            sum_below += _sum_block(exp_below_B, block_B.size)
            n_at_max += block_at_max
            n_greater += block_greater
        if not (np.isfinite(running_max) and np.isfinite(target_logit) and np.isfinite(sum_below)):
            bad_N[n] = True
            continue
        costs_N[n] = np.log1p(sum_below + (n_at_max - 1)) + (running_max - target_logit)
        in_topk_N[n] = n_greater < k


@numba.njit(parallel=True, cache=True, nogil=True)
def _median_rows_kernel(values_BxT, keep_BxT, out_B):
    """numpy-median of the kept values of each row; -inf for a row with nothing kept."""
    batch, length = values_BxT.shape
    for b in numba.prange(batch):
        kept = np.empty(length, dtype=np.float64)
        count = 0
        for i in range(length):
            if keep_BxT[b, i]:
                kept[count] = values_BxT[b, i]
                count += 1
        if count == 0:
            out_B[b] = -np.inf
            continue
        ordered = np.sort(kept[:count])
        half = count // 2
        if count % 2 == 1:
            out_B[b] = ordered[half]
        else:
            out_B[b] = (ordered[half - 1] + ordered[half]) / 2.0


def token_costs(teacher_logits, targets, k, mask=None, *, vocab=None):
    """Per-token ``(c_BxT, in_topk_BxT)`` (Numba): the teacher's CE of each target and its top-k
    membership (fewer than k logits strictly larger). Both 0/False at masked positions.
    ``vocab``: only the first ``vocab`` columns count (a padded vocabulary's extra columns never do)."""
    logits, tokens, k, valid = _validate(teacher_logits, targets, k, "zero", mask, vocab)
    batch, length, vocab_size = logits.shape
    costs = np.zeros((batch, length), dtype=np.float64)
    in_topk = np.zeros((batch, length), dtype=bool)
    bad = np.zeros((batch, length), dtype=bool)
    for start, stop, chunk in _sequence_chunks(logits):
        rows = (stop - start) * length
        _token_costs_kernel(chunk.reshape(rows, vocab_size), tokens[start:stop].reshape(rows),
                            valid[start:stop].reshape(rows), k, costs[start:stop].reshape(rows),
                            in_topk[start:stop].reshape(rows), bad[start:stop].reshape(rows))
    _raise_non_finite(bad)
    return costs, in_topk


def _median_scores(costs_BxT, in_topk_BxT, valid_BxT, mode):
    if mode == "zero":
        values, keep = np.where(in_topk_BxT, costs_BxT, 0.0), valid_BxT
    else:
        values, keep = costs_BxT, valid_BxT & in_topk_BxT
    out = np.empty(costs_BxT.shape[0], dtype=np.float64)
    _median_rows_kernel(np.ascontiguousarray(values), np.ascontiguousarray(keep), out)
    return out


def selection_score(teacher_logits, targets, k, mode="zero", mask=None, *, vocab=None) -> np.ndarray:
    """Eq. 11 score of each sequence (Numba): float64 ``[B]``.

    ``teacher_logits``: ``[B, T, V]`` (``teacher_logits[b, i]`` predicts ``targets[b, i]``);
    ``targets``: ``[B, T]`` int; ``k`` in [1, V]; ``mode``: ``"zero"`` or ``"exclude"``;
    ``mask``: optional ``[B, T]`` bool, False at padded positions (never counted); ``vocab``: as
    :func:`token_costs`. See the module docstring for the exact definition (median convention, ties, ``-inf``).
    """
    _, _, _, valid = _validate(teacher_logits, targets, k, mode, mask, vocab)
    costs, in_topk = token_costs(teacher_logits, targets, k, mask, vocab=vocab)
    return _median_scores(costs, in_topk, valid, mode)


# ----------------------------------------------------------------------------- NumPy

def token_costs_numpy(teacher_logits, targets, k, mask=None, chunk_elements=_NUMPY_CHUNK_ELEMENTS, *,
                      vocab=None):
    """Plain-NumPy :func:`token_costs` (vectorised over a chunk of sequences at a time)."""
    logits, tokens, k, valid = _validate(teacher_logits, targets, k, "zero", mask, vocab)
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
    _raise_non_finite(bad)
    return costs, in_topk


def selection_score_numpy(teacher_logits, targets, k, mode="zero", mask=None,
                          chunk_elements=_NUMPY_CHUNK_ELEMENTS, *, vocab=None) -> np.ndarray:
    """Plain-NumPy :func:`selection_score` (same arguments, same result), for cross-checking.

    ``chunk_elements`` bounds the logits widened to float64 at once (memory ~ 8 bytes x that x a
    few temporaries).
    """
    _, _, _, valid = _validate(teacher_logits, targets, k, mode, mask, vocab)
    costs, in_topk = token_costs_numpy(teacher_logits, targets, k, mask, chunk_elements, vocab=vocab)
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
