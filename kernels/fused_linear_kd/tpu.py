"""The ``"pallas"`` implementation of the fused-linear KD / CE loss on the TPU (Mosaic): forward grid
(token blocks, vocab blocks; vocab ``"arbitrary"``) with VMEM scratch for the running statistics;
backward = two kernels that both recompute the logit tiles: (a) grid (token blocks, vocab blocks;
vocab "arbitrary") accumulating ``d h_s`` in a ``[bt, D_s]`` f32 scratch; (b) grid (vocab blocks,
token blocks; tokens "arbitrary") accumulating ``d E_s`` in a ``[bv, D_s]`` f32 scratch (for f32
outputs both accumulate in the resident output block instead).  Default block sizes:
:func:`tile_sizes`.  Ragged N and V by masking: columns past V get ``-inf`` logits and their
(padded) embedding rows are zeroed; rows past N are zeroed.  bf16 inputs are multiplied on the MXU
with f32 accumulation; ``dS`` is cast to the embedding dtype for the gradient matmuls."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from salt.kernels import _online
from salt.kernels._common import (LANES, NT, bind, choose_blocks, from_lanes, load_row, row_outputs,
                                  row_scratch, row_spec, to_lanes)
from salt.kernels.fused_linear_kd.common import (FusedKDBlockSizes, analytic_flops, dims, grad_matmul_flops,
                                                 label_logit, logits_flops)

# Lane-dense row operands a kernel holds at most (labels, label logits, the backward's row inputs,
# or the forward's statistics and carries), for :func:`vmem_estimate`.
_ROW_OPERANDS = 8


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
    raises the flops per embedding byte read; none fitting: the largest) with :func:`vmem_estimate`."""
    return choose_blocks(n, vocab, block_sizes.block_tokens, block_sizes.block_vocab,
                         token_options=_TOKEN_BLOCKS, vocab_options=_VOCAB_BLOCKS, prefer="tokens",
                         none_fit="largest", vmem_bytes=lambda bt, bv: vmem_estimate(bt, bv, d_s, d_t, itemsize))


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


def _blocks_for(hs, es, teacher, block_sizes):
    n, vocab, d_s, d_t = dims(hs, es, teacher)
    return tile_sizes(n, vocab, d_s, d_t, max(hs.dtype.itemsize, es.dtype.itemsize), block_sizes)


def stats(hs, es, teacher, y, rho, block_sizes, interpret, theta=None):
    n, vocab, d_s, d_t = dims(hs, es, teacher)
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


def grads(hs, es, teacher, y, rows, rho, block_sizes, interpret, f32_out=False):
    n, vocab, d_s, d_t = dims(hs, es, teacher)
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
