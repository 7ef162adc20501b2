"""Fused-linear KD loss: the KD loss of :mod:`salt.kernels.logits_kd` from final hidden states and
tied embedding matrices, without ever writing the ``[tokens, vocab]`` logits.

``s = student_hidden @ student_embedding.T`` (``[N, D_s] x [V, D_s]``) and
``t = teacher_hidden @ teacher_embedding.T`` (``[N, D_t] x [V, D_t]``, ``D_t != D_s`` in general)
are formed tile by tile and folded into the same online row statistics
as the logits kernel (:mod:`salt.kernels.logits_kd`, docs/design.md §2 maths).

Gradients (``custom_vjp`` on the per-row loss): with ``dS = g·(P − (1−ω)·onehot − ω·Q)`` recomputed
tile by tile, ``d student_hidden = dS @ E_s`` and ``d student_embedding = dSᵀ @ h_s`` (and
``d omega``).  The teacher hidden states and embedding get ZERO cotangents (no gradient flows to
the teacher).

Implementations:

* ``"pallas"`` (TPU/Mosaic): forward grid (token blocks, vocab blocks; vocab ``"arbitrary"``)
  with VMEM scratch for the running statistics.  Backward = two kernels that both recompute the
  logit tiles: (a) grid (token blocks, vocab blocks; vocab "arbitrary") accumulating ``d h_s`` in a
  ``[bt, D_s]`` f32 scratch; (b) grid (vocab blocks, token blocks; tokens "arbitrary")
  accumulating ``d E_s`` in a ``[bv, D_s]`` f32 scratch (for f32 outputs both accumulate in the
  resident output block instead).  Default block sizes come from :func:`tile_sizes`.  Ragged N
and V by masking: columns past V
  get ``-inf`` logits and their (padded) embedding rows are zeroed; rows past N are zeroed.
  bf16 inputs are multiplied on the MXU with f32 accumulation; ``dS`` is cast to the embedding
  dtype for the gradient matmuls.
* ``"pallas_gpu"`` (GPU/Triton, :mod:`salt.kernels.fused_linear_kd_gpu`): the forward statistics
  in one kernel; the backward writes ``dS`` per chunk of token rows from a second kernel and leaves
  the two gradient matmuls to XLA (docs/gpu.md).
* ``"xla"``: ``lax.scan`` over vocabulary chunks (forward: statistics; backward: recompute the
  chunk's logits, accumulate ``d h_s`` in the carry and add the chunk's ``d E_s`` rows in place).
* ``"naive"``: full logits + :func:`salt.kernels.logits_kd.loss_naive`, autodiff.

:func:`fused_linear_ce_loss` is the same family without a teacher (the standard step, ``salt
score``, ``salt eval``): the teacher's matmul, statistics and ``Q`` term are left out.

Why one module of ~500 lines: as in JAX's own Pallas ops, the kernels, their pure-JAX chunked
twin, the naive path, the custom_vjp and the frozen block sizes of one operation live together
so they are read and tested side by side.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from salt.kernels import _online
from salt.kernels import fused_linear_kd_gpu as _gpu
from salt.kernels._checks import check_labels_mask, check_omega, check_rho, float_input
from salt.kernels._common import (GPU_IMPL, LANES, NT, SUBLANES, bind, check_block, choose_blocks,
                                  from_lanes, load_row, resolve_impl, row_outputs, row_scratch, row_spec,
                                  to_lanes)
from salt.kernels.logits_kd import loss_naive

# Lane-dense row operands a kernel holds at most (labels, label logits, the backward's row inputs,
# or the forward's statistics and carries), for :func:`vmem_estimate`.
_ROW_OPERANDS = 8


@dataclasses.dataclass(frozen=True)
class FusedKDBlockSizes:
    """``block_tokens`` x ``block_vocab`` Pallas tiles (multiples of 8 and 128: the TPU tiling,
    :func:`salt.kernels._common.check_block`; 16 rows fill bfloat16's packed tiles);
    ``chunk_vocab``: vocab columns per step of the ``xla`` scan; ``xla_block_tokens``: rows per
    block of the ``xla`` path (the vocabulary scan runs block by block, so its ``[rows,
    chunk_vocab]`` float32 tiles stay small; None: all rows at once).  ``None`` Pallas fields are
    chosen from the hidden sizes and dtype so the kernels fit :data:`VMEM_BUDGET_BYTES` (TPU) or by
    :func:`salt.kernels.fused_linear_kd_gpu.choose_gpu_blocks` (GPU; given ones must then be powers
    of two >= 16).  ``gpu_chunk_tokens``: token rows per ``dS`` chunk of the GPU backward (None:
    as many as keep it under :data:`salt.kernels.fused_linear_kd_gpu.GRAD_CHUNK_BYTES`)."""

    block_tokens: int | None = None
    block_vocab: int | None = None
    chunk_vocab: int = 1024
    xla_block_tokens: int | None = 2048
    gpu_chunk_tokens: int | None = None

    def __post_init__(self):
        check_block("block_tokens", self.block_tokens, SUBLANES)
        check_block("block_vocab", self.block_vocab, LANES)
        if not (isinstance(self.chunk_vocab, int) and self.chunk_vocab > 0):
            raise ValueError(f"chunk_vocab must be a positive integer, got {self.chunk_vocab!r}")
        if self.xla_block_tokens is not None and not (
                isinstance(self.xla_block_tokens, int) and not isinstance(self.xla_block_tokens, bool)
                and self.xla_block_tokens > 0):
            raise ValueError(f"xla_block_tokens must be a positive integer or None, got {self.xla_block_tokens!r}")
        if self.gpu_chunk_tokens is not None and not (
                isinstance(self.gpu_chunk_tokens, int) and not isinstance(self.gpu_chunk_tokens, bool)
                and self.gpu_chunk_tokens > 0):
            raise ValueError(f"gpu_chunk_tokens must be a positive integer or None, got {self.gpu_chunk_tokens!r}")


def vmem_estimate(bt, bv, d_s, d_t, itemsize):
    """Rough VMEM bytes of the largest of the three kernels: double-buffered input blocks, the
    double-buffered gradient output block plus its f32 accumulator (none when the output is
    f32: it accumulates in place), ``[bt, bv]`` f32 temporaries and the lane-padded row vectors."""
    inputs = 2 * (bt + bv) * (d_s + d_t) * itemsize
    rows = 2 * _ROW_OPERANDS * bt * LANES * 4
    temps = 10 * bt * bv * 4
    acc_per_row = d_s * (4 if itemsize != 4 else 0) + 2 * d_s * itemsize
    return inputs + rows + temps + max(bt, bv) * acc_per_row


_TOKEN_BLOCKS = (512, 256, 128, 64, 32, 16)
_VOCAB_BLOCKS = (512, 256, 128)


def tile_sizes(n, vocab, d_s, d_t, itemsize, block_sizes: FusedKDBlockSizes):
    """(block_tokens, block_vocab) of the Pallas TPU kernels: the given ones, else
    :func:`salt.kernels._common.choose_blocks` over the options below (ties: more tokens, which
    raises the flops per embedding byte read) with :func:`vmem_estimate`."""
    return choose_blocks(n, vocab, block_sizes.block_tokens, block_sizes.block_vocab,
                         token_options=_TOKEN_BLOCKS, vocab_options=_VOCAB_BLOCKS, prefer="tokens",
                         vmem_bytes=lambda bt, bv: vmem_estimate(bt, bv, d_s, d_t, itemsize))


def logits_flops(n, vocab, d_s, d_t):
    """Flops of forming both logit matrices once: ``2·N·V·(D_s + D_t)``."""
    return 2 * n * vocab * (d_s + d_t)


def grad_matmul_flops(n, vocab, d_s):
    """Flops of ``dS @ E_s`` and ``dSᵀ @ h_s``: ``4·N·V·D_s``."""
    return 4 * n * vocab * d_s


def analytic_flops(n, vocab, d_s, d_t, *, backward=True, schedule="pallas"):
    """Flops of forward (+ backward) per schedule.  ``"pallas"``: forward forms the logits once;
    each of the two backward kernels recomputes them (3 logit passes in all) and does one gradient
    matmul.  ``"xla"`` and ``"pallas_gpu"``: the backward recomputes them once (2 passes).
    ``"naive"``: one pass.  Plus ~20 (forward) and ~10 (per backward pass) elementwise flops per
    logit pair."""
    passes = {"pallas": 3, "xla": 2, "pallas_gpu": 2, "naive": 1}[schedule]
    fwd = logits_flops(n, vocab, d_s, d_t) + _online.fwd_flops(n, vocab)
    if not backward:
        return fwd
    bwd_elementwise = (2 if schedule == "pallas" else 1) * _online.bwd_flops(n, vocab)
    return (fwd + (passes - 1) * logits_flops(n, vocab, d_s, d_t) + grad_matmul_flops(n, vocab, d_s)
            + bwd_elementwise)


# ----------------------------------------------------------------------------------------------
# naive
# ----------------------------------------------------------------------------------------------

def _loss_naive(hs, es, teacher, y, omega, rho):
    s = jnp.dot(hs, es.T, preferred_element_type=jnp.float32)
    t = None if teacher is None else jnp.dot(teacher[0], teacher[1].T, preferred_element_type=jnp.float32)
    return loss_naive(s, t, y, omega, rho)


# ----------------------------------------------------------------------------------------------
# xla
# ----------------------------------------------------------------------------------------------

def label_logit(hs, es, y):
    """``θ_n = h_n · E[y_n]`` in float32 (the threshold of the ``n_gt`` count)."""
    es_y = jnp.take(es, y, axis=0, mode="clip")
    return jnp.sum(hs.astype(jnp.float32) * es_y.astype(jnp.float32), axis=1)


def _chunk_logits(hs, es, teacher, j, chunk, vocab, rho):
    start = jnp.minimum(j * chunk, vocab - chunk)
    es_c = lax.dynamic_slice_in_dim(es, start, chunk, axis=0)
    s_c = lax.dot_general(hs, es_c, NT, preferred_element_type=jnp.float32)
    rt_c = None
    if teacher is not None:
        ht, et = teacher
        et_c = lax.dynamic_slice_in_dim(et, start, chunk, axis=0)
        rt_c = rho * lax.dot_general(ht, et_c, NT, preferred_element_type=jnp.float32)
    cols_1xC = start + lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
    return start, es_c, s_c, rt_c, cols_1xC, cols_1xC >= j * chunk


def _row_blocks(n, block):
    """``(blocks, padding)`` of ``n`` rows in blocks of ``block`` (None when one block holds them)."""
    if block is None or n <= block:
        return None, 0
    blocks = -(-n // block)
    return blocks, blocks * block - n


def _blocked(x, blocks, pad):
    """``[n, ...]`` -> ``[blocks, n_block, ...]`` with ``pad`` zero rows at the end."""
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(blocks, -1, *x.shape[1:])


def _stats_xla(hs, es, teacher, y, rho, chunk, theta=None, block=None):
    """Row statistics, the rows in blocks of ``block`` (``lax.map``; padded rows dropped)."""
    blocks, pad = _row_blocks(hs.shape[0], block)
    if blocks is None:
        return _stats_xla_rows(hs, es, teacher, y, rho, chunk, theta)
    theta = label_logit(hs, es, y) if theta is None else theta
    rows = (hs, y, theta) + (() if teacher is None else (teacher[0],))
    xs = [_blocked(a, blocks, pad) for a in rows]

    def one(x):
        h, yb, tb, *t = x
        return _stats_xla_rows(h, es, None if teacher is None else (t[0], teacher[1]), yb, rho, chunk, tb)

    out = lax.map(one, xs)
    return {k: v.reshape(-1)[:hs.shape[0]] for k, v in out.items()}


def _stats_xla_rows(hs, es, teacher, y, rho, chunk, theta=None):
    n, vocab = hs.shape[0], es.shape[0]
    chunk, n_chunks = _online.chunk_plan(vocab, chunk)
    theta = label_logit(hs, es, y) if theta is None else theta
    y_Nx1, theta_Nx1 = y[:, None], theta[:, None]

    def body(carry, j):
        _, _, s_c, rt_c, cols, valid = _chunk_logits(hs, es, teacher, j, chunk, vocab, rho)
        return _online.stats_update(carry, s_c, rt_c, valid, cols, y_Nx1, theta_Nx1), None

    carry, _ = lax.scan(body, _online.stats_init((n, 1), teacher=teacher is not None), jnp.arange(n_chunks))
    return {k: v[:, 0] for k, v in _online.stats_finish(carry).items()}


def _grad_blocked(grad_rows_fn, hs, es, teacher, y, rows, f32_out=False, block=None):
    """``(d hs, d es)``, the rows in blocks of ``block`` (a ``lax.scan`` carrying ``d es``; padded
    rows have zero coefficients and zero hidden states, so they add nothing).  ``grad_rows_fn(hs,
    es, teacher, y, rows, des)``: one block's float32 ``(d hs, des + its d es)`` (the xla scan or
    the GPU kernel)."""
    blocks, pad = _row_blocks(hs.shape[0], block)
    des = jnp.zeros(es.shape, jnp.float32)
    if blocks is None:
        dhs, des = grad_rows_fn(hs, es, teacher, y, rows, des)
    else:
        xs = ([_blocked(a, blocks, pad) for a in (hs, y)], {k: _blocked(v, blocks, pad) for k, v in rows.items()},
              [] if teacher is None else [_blocked(teacher[0], blocks, pad)])

        def body(des, x):
            (h, yb), rb, t = x
            dh, des = grad_rows_fn(h, es, None if teacher is None else (t[0], teacher[1]), yb, rb, des)
            return des, dh

        des, dhs = lax.scan(body, des, xs)
        dhs = dhs.reshape(-1, hs.shape[1])[:hs.shape[0]]
    if f32_out:
        return dhs, des
    return dhs.astype(hs.dtype), des.astype(es.dtype)


def _grad_xla_rows(hs, es, teacher, y, rows, des_VxD, *, rho, chunk):
    vocab = es.shape[0]
    chunk, n_chunks = _online.chunk_plan(vocab, chunk)
    rows = {k: v[:, None] for k, v in rows.items()}
    y_Nx1 = y[:, None]
    hs_clean = jnp.where(rows["g_p"] != 0.0, hs, jnp.zeros_like(hs))  # masked rows may hold garbage

    def body(carry, j):
        dhs_NxD, des_VxD = carry
        start, es_c, s_c, rt_c, cols, valid = _chunk_logits(hs, es, teacher, j, chunk, vocab, rho)
        ds_NxC = _online.grad_tile(s_c, rt_c, cols == y_Nx1, rows)
        ds_NxC = jnp.where(valid, ds_NxC, 0.0).astype(es.dtype)
        dhs_NxD = dhs_NxD + jnp.dot(ds_NxC, es_c, preferred_element_type=jnp.float32)
        des_CxD = lax.dot_general(ds_NxC, hs_clean, (((0,), (0,)), ((), ())),
                                  preferred_element_type=jnp.float32)
        old = lax.dynamic_slice_in_dim(des_VxD, start, chunk, axis=0)
        des_VxD = lax.dynamic_update_slice_in_dim(des_VxD, old + des_CxD, start, axis=0)
        return (dhs_NxD, des_VxD), None

    init = (jnp.zeros(hs.shape, jnp.float32), des_VxD)
    (dhs, des), _ = lax.scan(body, init, jnp.arange(n_chunks))
    return dhs, des


# ----------------------------------------------------------------------------------------------
# pallas (TPU / Mosaic)
# ----------------------------------------------------------------------------------------------

def _matrix_names(teacher: bool) -> tuple:
    return ("hs", "es", "ht", "et") if teacher else ("hs", "es")


def _logit_tiles(ins, rho):
    s = lax.dot_general(ins["hs"][...], ins["es"][...], NT, preferred_element_type=jnp.float32)
    if "ht" not in ins:
        return s, None
    rt = rho * lax.dot_general(ins["ht"][...], ins["et"][...], NT, preferred_element_type=jnp.float32)
    return s, rt


def _fwd_kernel(*refs, teacher, rho, vocab, block_vocab):
    ins, outs, acc = bind(refs, _matrix_names(teacher) + ("y", "theta"), _online.stat_names(teacher),
                              _online.carry_names(teacher))
    s, rt = _logit_tiles(ins, rho)
    _online.stats_kernel_step(s, rt, ins, outs, acc, vocab=vocab, block_vocab=block_vocab)


def _grad_logits_tile(ins, rows, *, rho, row0, col0, n_tokens, vocab):
    """dS tile with rows >= N and columns >= V zeroed."""
    s, rt = _logit_tiles(ins, rho)
    cols = col0 + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    row_ids = row0 + lax.broadcasted_iota(jnp.int32, s.shape, 0)
    ds = _online.grad_tile(s, rt, cols == load_row(ins["y"]), {k: load_row(r) for k, r in rows.items()})
    return jnp.where((cols < vocab) & (row_ids < n_tokens), ds, 0.0)


def _bwd_hidden_kernel(*refs, teacher, row_names, acc_scratch, rho, n_tokens, vocab, block_tokens,
                       block_vocab):
    ins, rows, outs, scratch = bind(refs, _matrix_names(teacher) + ("y",), row_names, ("dhs",),
                                        ("acc",) if acc_scratch else ())
    acc = scratch.get("acc", outs["dhs"])  # f32 output: accumulate in the resident output block
    i, j = pl.program_id(0), pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        acc[...] = jnp.zeros(acc.shape, jnp.float32)

    ds = _grad_logits_tile(ins, rows, rho=rho, row0=i * block_tokens, col0=j * block_vocab,
                           n_tokens=n_tokens, vocab=vocab)
    es = ins["es"][...]
    es_rows = j * block_vocab + lax.broadcasted_iota(jnp.int32, (es.shape[0], 1), 0)
    es = jnp.where(es_rows < vocab, es, jnp.zeros_like(es))  # padded embedding rows -> 0
    acc[...] += jnp.dot(ds.astype(es.dtype), es, preferred_element_type=jnp.float32)

    if acc_scratch:
        @pl.when(j == pl.num_programs(1) - 1)
        def _finish():
            outs["dhs"][...] = acc[...].astype(outs["dhs"].dtype)


def _bwd_embed_kernel(*refs, teacher, row_names, acc_scratch, rho, n_tokens, vocab, block_tokens,
                      block_vocab):
    ins, rows, outs, scratch = bind(refs, _matrix_names(teacher) + ("y",), row_names, ("des",),
                                        ("acc",) if acc_scratch else ())
    acc = scratch.get("acc", outs["des"])  # f32 output: accumulate in the resident output block
    j, i = pl.program_id(0), pl.program_id(1)  # grid (vocab blocks, token blocks)

    @pl.when(i == 0)
    def _init():
        acc[...] = jnp.zeros(acc.shape, jnp.float32)

    ds = _grad_logits_tile(ins, rows, rho=rho, row0=i * block_tokens, col0=j * block_vocab,
                           n_tokens=n_tokens, vocab=vocab)
    hs = ins["hs"][...]
    hs_rows = i * block_tokens + lax.broadcasted_iota(jnp.int32, (hs.shape[0], 1), 0)
    keep = (hs_rows < n_tokens) & _online.nonzero(load_row(rows["g_p"]))  # padded rows, zero-cotangent (masked) rows
    hs = jnp.where(keep, hs, jnp.zeros_like(hs))
    acc[...] += jnp.dot(ds.T.astype(hs.dtype), hs, preferred_element_type=jnp.float32)

    if acc_scratch:
        @pl.when(i == pl.num_programs(1) - 1)
        def _finish():
            outs["des"][...] = acc[...].astype(outs["des"].dtype)


def _acc_scratch(shape, out_dtype):
    """An f32 accumulator, unless the output itself is f32 (then it accumulates in place)."""
    return [] if jnp.dtype(out_dtype) == jnp.float32 else [pltpu.VMEM(shape, jnp.float32)]


def _nbytes(*arrays):
    return sum(a.size * a.dtype.itemsize for a in arrays)


def _specs(bt, bv, d_s, d_t, token_axis):
    """Block specs for (hs, es[, ht, et]) and a per-row spec; ``token_axis`` is the grid axis that
    walks token blocks (0 for the (tokens, vocab) grids, 1 for the (vocab, tokens) grid)."""
    if token_axis == 0:
        tok = lambda i, j: (i, 0)  # noqa: E731
        voc = lambda i, j: (j, 0)  # noqa: E731
    else:
        tok = lambda j, i: (i, 0)  # noqa: E731
        voc = lambda j, i: (j, 0)  # noqa: E731
    mats = [pl.BlockSpec((bt, d_s), tok), pl.BlockSpec((bv, d_s), voc)]
    if d_t:
        mats += [pl.BlockSpec((bt, d_t), tok), pl.BlockSpec((bv, d_t), voc)]
    return mats, row_spec(bt, token_axis)


def _dims(hs, es, teacher):
    return hs.shape[0], es.shape[0], hs.shape[1], 0 if teacher is None else teacher[0].shape[1]


def _blocks_for(hs, es, teacher, block_sizes):
    n, vocab, d_s, d_t = _dims(hs, es, teacher)
    return tile_sizes(n, vocab, d_s, d_t, max(hs.dtype.itemsize, es.dtype.itemsize), block_sizes)


def _stats_pallas(hs, es, teacher, y, rho, block_sizes, interpret, theta=None):
    n, vocab, d_s, d_t = _dims(hs, es, teacher)
    bt, bv = _blocks_for(hs, es, teacher, block_sizes)
    mats, rspec = _specs(bt, bv, d_s, d_t, token_axis=0)
    n_tok_blocks = pl.cdiv(n, bt)
    has_teacher = teacher is not None
    names = _online.stat_names(has_teacher)
    embeddings = (es,) if teacher is None else (es, teacher[1])
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, teacher=has_teacher, rho=rho, vocab=vocab, block_vocab=bv),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0, grid=(n_tok_blocks, pl.cdiv(vocab, bv)),
            in_specs=mats + [rspec, rspec], out_specs=[rspec] * len(names),
            scratch_shapes=row_scratch(bt, len(_online.carry_names(has_teacher)))),
        out_shape=row_outputs(n, len(names)),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(
            flops=int(analytic_flops(n, vocab, d_s, d_t, backward=False)),
            transcendentals=int((2 if has_teacher else 1) * n * vocab),
            bytes_accessed=int(_nbytes(hs, *(teacher or ())[:1]) + n_tok_blocks * _nbytes(*embeddings)
                               + 4 * LANES * (2 + len(names)) * n)),
        interpret=interpret,
        name="fused_linear_kd_fwd" if has_teacher else "fused_linear_ce_fwd",
    )(hs, es, *(teacher or ()), to_lanes(y), to_lanes(label_logit(hs, es, y) if theta is None else theta))
    return {k: from_lanes(o) for k, o in zip(names, outs)}


def _grad_pallas(hs, es, teacher, y, rows, rho, block_sizes, interpret, f32_out=False):
    n, vocab, d_s, d_t = _dims(hs, es, teacher)
    bt, bv = _blocks_for(hs, es, teacher, block_sizes)
    n_tok_blocks, n_voc_blocks = pl.cdiv(n, bt), pl.cdiv(vocab, bv)
    row_names, row_operands = _online.ordered_rows(rows)
    operands = (hs, es, *(teacher or ()), to_lanes(y), *row_operands)
    has_teacher = teacher is not None
    one_kernel_flops = int(logits_flops(n, vocab, d_s, d_t) + grad_matmul_flops(n, vocab, d_s) // 2
                           + _online.bwd_flops(n, vocab))
    hidden_bytes = _nbytes(hs, *(teacher or ())[:1])
    embed_bytes = _nbytes(es, *(teacher or ())[1:])
    prefix = "fused_linear_kd" if has_teacher else "fused_linear_ce"
    row_bytes = 4 * LANES * (1 + len(row_names)) * n  # the lane-dense label and row operands

    def call(kernel, grid, token_axis, out_spec, out, acc_shape, bytes_accessed, name):
        mats, rspec = _specs(bt, bv, d_s, d_t, token_axis=token_axis)
        scratch = _acc_scratch(acc_shape, out.dtype)
        return pl.pallas_call(
            functools.partial(kernel, teacher=has_teacher, row_names=row_names, acc_scratch=bool(scratch),
                              rho=rho, n_tokens=n, vocab=vocab, block_tokens=bt, block_vocab=bv),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=0, grid=grid, in_specs=mats + [rspec] * (1 + len(row_names)),
                out_specs=out_spec, scratch_shapes=scratch),
            out_shape=jax.ShapeDtypeStruct(out.shape, out.dtype),
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
            cost_estimate=pl.CostEstimate(flops=one_kernel_flops,
                                          transcendentals=int((2 if has_teacher else 1) * n * vocab),
                                          bytes_accessed=int(bytes_accessed)),
            interpret=interpret,
            name=name,
        )(*operands)

    # f32 outputs (``f32_out``) accumulate in the resident output block
    dhs_out, des_out = (jax.ShapeDtypeStruct(x.shape, jnp.float32 if f32_out else x.dtype) for x in (hs, es))
    dhs = call(_bwd_hidden_kernel, (n_tok_blocks, n_voc_blocks), 0,
               pl.BlockSpec((bt, d_s), lambda i, j: (i, 0)), dhs_out, (bt, d_s),
               _nbytes(hs) + hidden_bytes + n_tok_blocks * embed_bytes + row_bytes, prefix + "_bwd_hidden")
    des = call(_bwd_embed_kernel, (n_voc_blocks, n_tok_blocks), 1,
               pl.BlockSpec((bv, d_s), lambda j, i: (j, 0)), des_out, (bv, d_s),
               _nbytes(es) + embed_bytes + n_voc_blocks * (hidden_bytes + row_bytes), prefix + "_bwd_embedding")
    return dhs, des


# ----------------------------------------------------------------------------------------------
# custom_vjp core (``teacher`` is ``(ht, et)`` or None: the cross-entropy alone)
# ----------------------------------------------------------------------------------------------

def row_stats(hs, es, teacher, y, rho, cfg, theta=None):
    """The online row statistics (:mod:`salt.kernels._online`) of the rows ``hs`` against the
    vocabulary ``es`` (``teacher``: ``(ht, et)`` or None; ``cfg``: ``(impl, FusedKDBlockSizes,
    interpret)``; ``theta``: the label logits when given, else ``h_n · E[y_n]``).  With
    :func:`row_grads`, the building block :mod:`salt.kernels.vocab_parallel` runs per chunk."""
    impl, block_sizes, interpret = cfg
    if impl == "xla":
        return _stats_xla(hs, es, teacher, y, rho, block_sizes.chunk_vocab, theta, block_sizes.xla_block_tokens)
    if impl == GPU_IMPL:
        theta = label_logit(hs, es, y) if theta is None else theta
        return _gpu.stats(hs, es, teacher, y, theta, rho, _gpu_blocks(hs, es, teacher, block_sizes), interpret)
    return _stats_pallas(hs, es, teacher, y, rho, block_sizes, interpret, theta)


def row_grads(hs, es, teacher, y, rows, rho, cfg, f32_out=False):
    """``(d hs, d es)`` from the rows of :func:`salt.kernels._online.grad_rows` (``f32_out``:
    float32 gradients, else in the inputs' dtypes); arguments as :func:`row_stats`."""
    impl, block_sizes, interpret = cfg
    if impl == "xla":
        return _grad_blocked(functools.partial(_grad_xla_rows, rho=rho, chunk=block_sizes.chunk_vocab),
                             hs, es, teacher, y, rows, f32_out, block_sizes.xla_block_tokens)
    if impl == GPU_IMPL:
        blk = _gpu_blocks(hs, es, teacher, block_sizes)
        return _grad_blocked(functools.partial(_gpu.grad_rows_block, rho=rho, blk=blk, interpret=interpret),
                             hs, es, teacher, y, rows, f32_out, blk.chunk)
    return _grad_pallas(hs, es, teacher, y, rows, rho, block_sizes, interpret, f32_out)


def _gpu_blocks(hs, es, teacher, block_sizes):
    n, vocab, d_s, d_t = _dims(hs, es, teacher)
    return _gpu.choose_gpu_blocks(n, vocab, d_s, d_t, max(hs.dtype.itemsize, es.dtype.itemsize),
                                  block_sizes.block_tokens, block_sizes.block_vocab, block_sizes.gpu_chunk_tokens)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _loss_core(hs, es, teacher, y, omega, rho, cfg):
    return _online.loss_and_parts(row_stats(hs, es, teacher, y, rho, cfg), y, omega)


def _loss_core_fwd(hs, es, teacher, y, omega, rho, cfg):
    stats = row_stats(hs, es, teacher, y, rho, cfg)
    return _online.loss_and_parts(stats, y, omega), (hs, es, teacher, y, omega, stats)


def _loss_core_bwd(rho, cfg, res, cotangents):
    hs, es, teacher, y, omega, stats = res
    g = cotangents[0]  # the parts are monitoring values: their cotangents are ignored
    dhs, des = row_grads(hs, es, teacher, y, _online.grad_rows(stats, g, omega), rho, cfg)
    if teacher is None:
        return dhs, des, None, None, jnp.zeros_like(omega)
    # No gradient flows to the teacher: its cotangents are zero by definition.
    return (dhs, des, jax.tree.map(jnp.zeros_like, teacher), None, _online.omega_cotangent(g, stats, omega))


_loss_core.defvjp(_loss_core_fwd, _loss_core_bwd)


# ----------------------------------------------------------------------------------------------
# public entry points
# ----------------------------------------------------------------------------------------------

def _check_matrices(**arrays):
    arrays = {k: float_input(k, v) for k, v in arrays.items()}
    for name, x in arrays.items():
        if x.ndim != 2 or 0 in x.shape:
            raise ValueError(f"{name} must be a non-empty 2-D array, got shape {x.shape}")
    return arrays


def _check_pair(hidden, embedding, who):
    if hidden.shape[1] != embedding.shape[1]:
        raise ValueError(f"{who}_hidden {hidden.shape} and {who}_embedding {embedding.shape} disagree on "
                         f"D_{who[0]}")


def _run(hs, es, teacher, labels, mask, omega, rho, impl, interpret, block_sizes, return_parts):
    labels, valid = check_labels_mask(labels, mask, (hs.shape[0],))
    impl = resolve_impl(impl, gpu_kernel=True)
    block_sizes = FusedKDBlockSizes() if block_sizes is None else block_sizes
    if not isinstance(block_sizes, FusedKDBlockSizes):
        raise ValueError(f"block_sizes must be a FusedKDBlockSizes, got {type(block_sizes).__name__}")
    if impl == "naive":
        keep_Nx1 = valid[:, None]  # masked rows may hold garbage: zero them
        if teacher is not None:
            teacher = (lax.stop_gradient(jnp.where(keep_Nx1, teacher[0], 0)), lax.stop_gradient(teacher[1]))
        outputs = _loss_naive(jnp.where(keep_Nx1, hs, 0), es, teacher, labels, omega, rho)
    else:
        outputs = _loss_core(hs, es, teacher, labels, omega, rho, (impl, block_sizes, interpret))
    return _online.finish_output(outputs, valid, return_parts)


def fused_linear_kd_loss(student_hidden, student_embedding, teacher_hidden, teacher_embedding, labels,
                         omega, rho, mask=None, *, impl=None, interpret=False, block_sizes=None,
                         return_parts=False):
    """Per-token KD loss ``(1−ω)·ce + ω·kd`` (docs/design.md §2) with logits ``h @ E.T`` never stored.

    Args:
      student_hidden: ``[N, D_s]``; student_embedding: ``[V, D_s]`` (tied LM head).
      teacher_hidden: ``[N, D_t]``; teacher_embedding: ``[V, D_t]``.
      labels: int ``[N]`` in ``[0, V)`` where ``mask`` is true.  (Flatten ``B*T`` first.)
      omega: weight in [0, 1], Python number or (traced) scalar; rho: Python number > 0 (static).
      mask: optional ``[N]``; masked tokens give loss 0 and no gradient.
      impl: "pallas" | "pallas_gpu" | "xla" | "naive" (None: "pallas" on a TPU or a GPU, else "xla";
        "pallas" is the TPU kernel, on a GPU the GPU kernel "pallas_gpu": see
        :func:`salt.kernels._common.resolve_impl`); interpret: for the Pallas kernels.
      block_sizes: :class:`FusedKDBlockSizes`; return_parts: also ``{"ce", "kd", "kl", "correct",
        "n_greater"}`` (see :func:`salt.kernels.logits_kd.kd_loss`; monitoring values, no gradient).

    Returns float32 ``[N]`` (and the parts dict).  Gradients flow to ``student_hidden``,
    ``student_embedding`` (and ``omega``); the teacher's arrays get ZERO cotangents.
    """
    a = _check_matrices(student_hidden=student_hidden, student_embedding=student_embedding,
                        teacher_hidden=teacher_hidden, teacher_embedding=teacher_embedding)
    hs, es = a["student_hidden"], a["student_embedding"]
    ht, et = a["teacher_hidden"], a["teacher_embedding"]
    _check_pair(hs, es, "student")
    _check_pair(ht, et, "teacher")
    if hs.shape[0] != ht.shape[0]:
        raise ValueError(f"student_hidden has {hs.shape[0]} tokens, teacher_hidden {ht.shape[0]}")
    if es.shape[0] != et.shape[0]:
        raise ValueError(f"student_embedding has vocab {es.shape[0]}, teacher_embedding {et.shape[0]}")
    omega = jnp.asarray(check_omega(omega), jnp.float32)
    return _run(hs, es, (ht, et), labels, mask, omega, check_rho(rho), impl, interpret, block_sizes,
                return_parts)


def fused_linear_ce_loss(hidden, embedding, labels, mask=None, *, impl=None, interpret=False,
                         block_sizes=None, return_parts=False):
    """Per-token cross-entropy ``lse(s) − s_y`` with logits ``s = hidden @ embedding.T`` never stored:
    the same kernels as :func:`fused_linear_kd_loss` without the teacher's matmul and statistics.

    ``hidden``: ``[N, D]``; ``embedding``: ``[V, D]``; ``labels``/``mask``/``impl``/``interpret``/
    ``block_sizes`` as there.  ``return_parts``: also ``{"ce", "correct", "n_greater"}`` (the label
    is in the top-k iff ``n_greater < k``).  Gradients flow to ``hidden`` and ``embedding``.
    """
    a = _check_matrices(student_hidden=hidden, student_embedding=embedding)
    hs, es = a["student_hidden"], a["student_embedding"]
    _check_pair(hs, es, "student")
    return _run(hs, es, None, labels, mask, jnp.float32(0.0), 1.0, impl, interpret, block_sizes, return_parts)
