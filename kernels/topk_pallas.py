"""The teacher's top-k of top-k KD (paper eq. 13-14) as a fused-linear Pallas TPU kernel:
``teacher_topk_pallas(ht_NxD, et_VxD, k)`` -> the k largest logits (``[N, Z]``, ``Z`` = k) of ``h_t·E_tᵀ`` per row
(float32, descending), their ids (int32; exactly k, ties to the LOWER id, as ``lax.top_k`` and
:func:`salt.reference.losses.topk_indices`) and optionally the full-vocabulary ``lse`` ``[N]``,
without a ``[tokens, vocab]`` buffer.

Kernel: grid (token blocks ``"parallel"``, vocabulary blocks ``"arbitrary"``, innermost).  Each
step forms the float32 logits tile ``h_t[bt] · E_t[bv]ᵀ`` on the MXU (f32 or bf16 inputs, f32
accumulation) and

* folds it into the online row max / sum-exp of the lse (lane-dense ``[bt, 128]`` scratch, as
  :mod:`salt.kernels.fused_linear_kd`);
* merges it into a running top-k held in VMEM scratch as an UNSORTED set of k (value, id) lanes
  (``[bt, kp]``, ``kp`` = k rounded up to 128 lanes; the extra lanes hold ``+inf`` so they are
  never the set's minimum).  The tile is first filtered against each row's current k-th value
  (its set minimum): only entries strictly above it stay candidates (an equal one loses the tie:
  every id in the set is lower).  If no row of the block has a candidate, the step is skipped
  (``pl.when``).  Otherwise a ``while_loop`` runs rounds until no row has a candidate above its
  minimum; one round, per row: take the best candidate (max value, then lowest id) out of the
  tile, find the set's worst entry (min value, then highest id) and replace it if the candidate
  is strictly greater.  Within a tile the candidates come out in (value desc, id asc) order, so
  a set entry equal to a candidate always has the lower id and the strict test is the tie rule.
* on the last vocabulary step, sorts the set: k rounds of "row max -> record value and the lowest
  id attaining it -> mask that entry".

Columns past V (ragged vocabulary; the padded embedding rows may hold garbage) are ``-inf`` in
both the lse and the candidates, rows past N never become candidates (their outputs are dropped);
ids ride in float32 (exact below 2**24) so every reduction is a float reduction.

Cost per ``[bt, bv]`` tile: MXU ``2·bt·bv·D`` flops.  VPU/EUP, always: the mask, the filter and
the lse update, about 10 elementwise ops + 1 exp per logit (the same order as the fused KD
forward).  Per merge round: about 8 ops per tile element plus about 10 per set lane, i.e.
``~(8·bv + 10·kp)·bt``; the rounds of a tile are the most insertions any row of the block needs.
For logits in random id order, row r of tile j expects about ``k/j`` insertions, so the first
tiles need ~k rounds and later ones still a few (the max over bt rows), and with bt = 256 a tile
is almost never skipped; at D = 1024, bv = 512, k = 64 that is about 2048 MXU flops versus
~10 + rounds·10 VPU ops per logit, and v5e's MXU does roughly 30-50x the VPU's ops per cycle,
so from ~3-5 rounds per tile on, the merge, not the matmul, bounds the kernel.  Real LM
vocabularies are roughly frequency-ordered (the top-k sits mostly at low ids), which makes late
tiles cheap; none of this is measured here (no TPU in the test set-up: the tests run the kernel
in interpret mode and compile it for v5e ahead of time).

The pure-JAX twin is the ``lax.scan`` in :func:`salt.kernels.topk_kd.teacher_topk`
(``impl="xla"``); kernel, block sizes and VMEM estimate live here together, in the style of JAX's
``pallas/ops/tpu`` modules.  No gradient: the inputs are put under ``stop_gradient``.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from salt.kernels._common import (LANES, NT, SUBLANES, check_block, choose_blocks, from_lanes,
                                  load_row, round_up, row_scratch, row_spec, store_row)
from salt.kernels._online import lse_step

_NEG_INF = float("-inf")
_POS_INF = float("inf")
_BIG_ID = float(2 ** 30)  # above every id (float32-exact ids are < 2**24)

_TOKEN_BLOCKS = (256, 128, 64, 32, 16)
_VOCAB_BLOCKS = (512, 256, 128)


@dataclasses.dataclass(frozen=True)
class TopKKernelBlockSizes:
    """``block_tokens`` x ``block_vocab`` tiles of the top-k kernel (multiples of 8 and 128: the TPU
    tiling, :func:`salt.kernels._common.check_block`); ``None`` fields are chosen so :func:`vmem_estimate` fits
    :data:`salt.kernels._common.VMEM_BUDGET_BYTES` (v5e's 16 MiB scoped default)."""

    block_tokens: int | None = None
    block_vocab: int | None = None

    def __post_init__(self):
        check_block("block_tokens", self.block_tokens, SUBLANES)
        check_block("block_vocab", self.block_vocab, LANES)


def set_lanes(k: int) -> int:
    """Lanes of the running set: k rounded up to a multiple of :data:`LANES`."""
    return round_up(k, LANES)


def vmem_estimate(bt, bv, d, itemsize, k):
    """Rough VMEM bytes: double-buffered ``h_t``/``E_t`` blocks, ~6 ``[bt, bv]`` f32 temporaries
    plus the candidate scratch, the set's value/id scratch and the double-buffered value/id output
    blocks (``[bt, kp]`` each) and the lane-dense row statistics."""
    kp = set_lanes(k)
    inputs = 2 * (bt + bv) * d * itemsize
    tiles = 7 * bt * bv * 4
    topk = (2 + 2 * 2) * bt * kp * 4
    rows = (2 + 2) * bt * LANES * 4
    return inputs + tiles + topk + rows


def tile_sizes(n, vocab, d, itemsize, k, block_sizes: TopKKernelBlockSizes):
    """(block_tokens, block_vocab): the given ones, else :func:`salt.kernels._common.choose_blocks`
    over the options below (ties: more vocab, which keeps the max-over-rows merge rounds per tile
    low) with :func:`vmem_estimate`."""
    return choose_blocks(n, vocab, block_sizes.block_tokens, block_sizes.block_vocab,
                         token_options=_TOKEN_BLOCKS, vocab_options=_VOCAB_BLOCKS, prefer="vocab",
                         vmem_bytes=lambda bt, bv: vmem_estimate(bt, bv, d, itemsize, k))


def _kernel(ht_ref, et_ref, top_ref, ids_ref, lse_ref, val_s, id_s, cand_s, m_s, l_s, *, k, n_tokens,
            vocab, block_tokens, block_vocab):
    i, j = pl.program_id(0), pl.program_id(1)
    bt, kp = val_s.shape
    lane_f = lax.broadcasted_iota(jnp.int32, (bt, kp), 1).astype(jnp.float32)

    @pl.when(j == 0)
    def _init():
        val_s[...] = jnp.where(lane_f < k, _NEG_INF, _POS_INF)  # lanes >= k: never the minimum
        id_s[...] = -1.0 - lane_f  # distinct placeholder ids
        store_row(m_s, jnp.full((bt, 1), _NEG_INF, jnp.float32))
        store_row(l_s, jnp.zeros((bt, 1), jnp.float32))

    t = lax.dot_general(ht_ref[...], et_ref[...], NT, preferred_element_type=jnp.float32)
    cols = j * block_vocab + lax.broadcasted_iota(jnp.int32, t.shape, 1)
    rows = i * block_tokens + lax.broadcasted_iota(jnp.int32, t.shape, 0)
    t = jnp.where(cols < vocab, t, _NEG_INF)  # padded embedding rows may hold garbage

    m_new, l_new = lse_step(load_row(m_s), load_row(l_s), t)
    store_row(m_s, m_new)
    store_row(l_s, l_new)

    kth = jnp.min(val_s[...], axis=1, keepdims=True)
    cand = jnp.where((rows < n_tokens) & (t > kth), t, _NEG_INF)
    any_cand = jnp.max(cand) > _NEG_INF

    @pl.when(any_cand)
    def _merge():
        cand_s[...] = cand
        cols_f = cols.astype(jnp.float32)

        def round_(_):
            c = cand_s[...]
            c_max = jnp.max(c, axis=1, keepdims=True)
            c_id = jnp.min(jnp.where(c == c_max, cols_f, _BIG_ID), axis=1, keepdims=True)
            c = jnp.where(cols_f == c_id, _NEG_INF, c)
            cand_s[...] = c
            v, ids = val_s[...], id_s[...]
            w_min = jnp.min(v, axis=1, keepdims=True)
            w_id = jnp.max(jnp.where(v == w_min, ids, -_BIG_ID), axis=1, keepdims=True)
            hit = (ids == w_id) & (c_max > w_min)
            v = jnp.where(hit, c_max, v)
            val_s[...] = v
            id_s[...] = jnp.where(hit, c_id, ids)
            more = jnp.max(c, axis=1, keepdims=True) > jnp.min(v, axis=1, keepdims=True)
            return jnp.max(more.astype(jnp.int32)) > 0

        lax.while_loop(lambda go: go, round_, jnp.bool_(True))

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        val_s[...] = jnp.where(lane_f < k, val_s[...], _NEG_INF)
        top_ref[...] = jnp.zeros(top_ref.shape, jnp.float32)
        ids_ref[...] = jnp.zeros(ids_ref.shape, jnp.int32)

        def extract(r, _):
            v, ids = val_s[...], id_s[...]
            best = jnp.max(v, axis=1, keepdims=True)
            best_id = jnp.min(jnp.where(v == best, ids, _BIG_ID), axis=1, keepdims=True)
            val_s[...] = jnp.where((v == best) & (ids == best_id), _NEG_INF, v)
            at_r = lane_f == r.astype(jnp.float32)
            top_ref[...] = jnp.where(at_r, best, top_ref[...])
            ids_ref[...] = jnp.where(at_r, best_id.astype(jnp.int32), ids_ref[...])
            return 0

        lax.fori_loop(0, k, extract, 0)
        store_row(lse_ref, m_s[...][:, :1] + jnp.log(l_s[...][:, :1]))


def teacher_topk_pallas(ht_NxD, et_VxD, k, *, with_lse=False, block_sizes=None, interpret=False):
    """``(t_NxZ float32, ids_NxZ int32[, lse_N float32])`` from the kernel (module docstring).
    ``k`` an int in [1, V] (checked by the caller); ``block_sizes`` a :class:`TopKKernelBlockSizes`.
    The outputs carry no gradient."""
    block_sizes = TopKKernelBlockSizes() if block_sizes is None else block_sizes
    if not isinstance(block_sizes, TopKKernelBlockSizes):
        raise ValueError(f"block_sizes must be a TopKKernelBlockSizes, got {type(block_sizes).__name__}")
    ht_NxD, et_VxD = lax.stop_gradient(ht_NxD), lax.stop_gradient(et_VxD)
    (n, d), vocab = ht_NxD.shape, et_VxD.shape[0]
    itemsize = max(ht_NxD.dtype.itemsize, et_VxD.dtype.itemsize)
    bt, bv = tile_sizes(n, vocab, d, itemsize, k, block_sizes)
    kp = set_lanes(k)
    n_tok_blocks = pl.cdiv(n, bt)
    row_block = pl.BlockSpec((bt, kp), lambda i, j: (i, 0))
    top, ids, lse = pl.pallas_call(
        functools.partial(_kernel, k=k, n_tokens=n, vocab=vocab, block_tokens=bt, block_vocab=bv),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0, grid=(n_tok_blocks, pl.cdiv(vocab, bv)),
            in_specs=[pl.BlockSpec((bt, d), lambda i, j: (i, 0)), pl.BlockSpec((bv, d), lambda i, j: (j, 0))],
            out_specs=[row_block, row_block, row_spec(bt)],
            scratch_shapes=[pltpu.VMEM((bt, kp), jnp.float32), pltpu.VMEM((bt, kp), jnp.float32),
                            pltpu.VMEM((bt, bv), jnp.float32), *row_scratch(bt, 2)]),
        out_shape=[jax.ShapeDtypeStruct((n, kp), jnp.float32), jax.ShapeDtypeStruct((n, kp), jnp.int32),
                   jax.ShapeDtypeStruct((n, LANES), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(
            flops=int(2 * n * vocab * d), transcendentals=int(n * vocab),
            bytes_accessed=int(ht_NxD.size * ht_NxD.dtype.itemsize
                               + n_tok_blocks * et_VxD.size * et_VxD.dtype.itemsize + 4 * (2 * kp + LANES) * n)),
        interpret=interpret,
        name="teacher_topk",
    )(ht_NxD, et_VxD)
    top, ids = top[:, :k], ids[:, :k]
    return (top, ids, from_lanes(lse)) if with_lse else (top, ids)
