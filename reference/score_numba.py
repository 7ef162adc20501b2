"""The Numba twin of :mod:`salt.reference.score` (paper eq. 11): the same ``token_costs`` and
``selection_score``, tested against the NumPy reference, fast enough to score real corpora on a
CPU (``salt bench score`` compares the two).

ONE pass over V per token, parallel over tokens: an online max / sum-exp at the granularity of
L1-sized blocks, and the count of strictly larger logits in the same sweep; float64 accumulation
(see the kernel's comments). Narrow floats (float16, bfloat16) are widened to float32 exactly, in
chunks; other float dtypes to float64.
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir as llvm_ir
from numba import types
from numba.extending import intrinsic

from salt.reference.score import NARROW_FLOAT_NAMES, raise_non_finite, validate

__all__ = ["selection_score_numba", "token_costs_numba"]

_CHUNK_ELEMENTS = 1 << 25  # non-native logits converted per chunk (128 MB as float32)


# ----------------------------------------------------------------------------- chunks

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
    wide = np.float32 if dtype.name in NARROW_FLOAT_NAMES else np.float64
    step = max(1, _CHUNK_ELEMENTS // max(1, length * vocab_size))
    for start in range(0, batch, step):
        stop = min(batch, start + step)
        yield start, stop, np.ascontiguousarray(logits_BxTxV[start:stop], dtype=wide)


# ----------------------------------------------------------------------------- kernels

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


def token_costs_numba(teacher_logits, targets, k, mask=None, *, vocab=None):
    """Per-token ``(c_BxT, in_topk_BxT)`` (Numba): the teacher's CE of each target and its top-k
    membership (fewer than k logits strictly larger). Both 0/False at masked positions.
    ``vocab``: only the first ``vocab`` columns count (a padded vocabulary's extra columns never do)."""
    logits, tokens, k, valid = validate(teacher_logits, targets, k, "zero", mask, vocab)
    batch, length, vocab_size = logits.shape
    costs = np.zeros((batch, length), dtype=np.float64)
    in_topk = np.zeros((batch, length), dtype=bool)
    bad = np.zeros((batch, length), dtype=bool)
    for start, stop, chunk in _sequence_chunks(logits):
        rows = (stop - start) * length
        _token_costs_kernel(chunk.reshape(rows, vocab_size), tokens[start:stop].reshape(rows),
                            valid[start:stop].reshape(rows), k, costs[start:stop].reshape(rows),
                            in_topk[start:stop].reshape(rows), bad[start:stop].reshape(rows))
    raise_non_finite(bad)
    return costs, in_topk


def _median_scores(costs_BxT, in_topk_BxT, valid_BxT, mode):
    if mode == "zero":
        values, keep = np.where(in_topk_BxT, costs_BxT, 0.0), valid_BxT
    else:
        values, keep = costs_BxT, valid_BxT & in_topk_BxT
    out = np.empty(costs_BxT.shape[0], dtype=np.float64)
    _median_rows_kernel(np.ascontiguousarray(values), np.ascontiguousarray(keep), out)
    return out


def selection_score_numba(teacher_logits, targets, k, mode="zero", mask=None, *, vocab=None) -> np.ndarray:
    """Eq. 11 score of each sequence (Numba): float64 ``[B]``.

    ``teacher_logits``: ``[B, T, V]`` (``teacher_logits[b, i]`` predicts ``targets[b, i]``);
    ``targets``: ``[B, T]`` int; ``k`` in [1, V]; ``mode``: ``"zero"`` or ``"exclude"``;
    ``mask``: optional ``[B, T]`` bool, False at padded positions (never counted); ``vocab``: as
    :func:`token_costs`. See the module docstring for the exact definition (median convention, ties, ``-inf``).
    """
    _, _, _, valid = validate(teacher_logits, targets, k, mode, mask, vocab)
    costs, in_topk = token_costs_numba(teacher_logits, targets, k, mask, vocab=vocab)
    return _median_scores(costs, in_topk, valid, mode)
