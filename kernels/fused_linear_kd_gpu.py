"""Pallas GPU kernels (Triton lowering) of the fused-linear KD / CE loss of
:mod:`salt.kernels.fused_linear_kd` (``impl="pallas_gpu"``; ``"pallas"`` and ``--kernels auto`` pick it
on a GPU, see :func:`salt.kernels._common.resolve_impl`).  docs/gpu.md explains the design.

Forward (``_stats_kernel``): grid ``(token blocks, vocabulary splits)``.  A program owns ``bt`` rows
and one contiguous range of vocabulary blocks; it walks them in a loop, forms each ``[bt, bv]``
logit tile of the student (and ρ·teacher) with an inner loop over the hidden size in ``bk``-wide
slices (``tl.dot``, float32 accumulation) and folds it into the online row statistics of
:func:`salt.kernels._online.stats_update` (the same code as the TPU kernel and the xla scan).
Its finished statistics are written per split and merged across splits by
:func:`salt.kernels._online.merge_stats` (a few ``[N]`` vectors; the splits only exist to give
the GPU enough programs when ``N / bt`` is below its SM count).  No ``[N, V]`` array exists.

Backward (``_dlogits_kernel``): per chunk of token rows, grid ``(row blocks, vocabulary blocks)``
recomputes the logit tiles the same way and writes ``dS = g·(P − (1−ω)·onehot − ω·Q)``
(:func:`salt.kernels._online.grad_tile`) for the chunk in the embedding's dtype; the two
gradient matmuls ``dS @ E_s`` and ``dSᵀ @ h_s`` are then plain XLA dots (cuBLAS).  Why not fused as
on the TPU: a ``[bt, D_s]`` float32 accumulator of ``d h_s`` is 1 MiB at ``bt = 64, D_s = 4096``,
four times an H100 SM's shared memory, and splitting ``D_s`` instead recomputes every logit tile
``D_s / bd`` times (or, with atomics, adds ~``N·V·D_s / bv`` floats through L2).  The chunk bounds the
``dS`` buffer (:data:`GRAD_CHUNK_BYTES`).

Triton needs power-of-two tile shapes: ``bt``, ``bv``, ``bk`` are powers of two (>= 16, the
``tl.dot`` minimum) and the operands are zero-padded to whole tiles when ``N``, ``V`` or a hidden size
is not a multiple (no copy at the benchmark shapes); padded vocabulary columns are masked out of
the statistics and ``dS``, padded rows are dropped.  ``interpret=True`` runs the same kernels in
Pallas' interpreter on the CPU (the tests).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from salt.kernels import _online
from salt.kernels._common import NT, bind, round_up


# dS chunk budget of the backward: rows per chunk = the most whole token blocks whose
# ``[rows, V]`` dS (embedding dtype) fits (Liger's shape in bf16: 8192 rows, one chunk).
GRAD_CHUNK_BYTES = 2 * 2**30
# Forward programs wanted (token blocks x vocabulary splits): about two per SM of an H100/H200.
TARGET_PROGRAMS = 256
MAX_SPLITS = 16
# Triton's smallest ``tl.dot`` tile side: every tile dimension is a power of two at least this.
MIN_TILE = 16


@dataclasses.dataclass(frozen=True)
class GPUBlocks:
    """Tile sizes of the GPU kernels: ``bt`` rows, ``bv`` vocabulary columns, ``bk`` hidden
    columns per ``tl.dot`` step; ``chunk`` token rows per backward ``dS`` chunk; Triton's
    ``num_warps`` and ``num_stages`` (software pipelining of the hidden-size loop)."""

    bt: int
    bv: int
    bk: int
    chunk: int
    num_warps: int = 8
    num_stages: int = 3


def _pow2(x: int) -> bool:
    return x >= 1 and x & (x - 1) == 0


def choose_gpu_blocks(n, vocab, d_s, d_t, itemsize, block_tokens=None, block_vocab=None,
                      chunk_tokens=None) -> GPUBlocks:
    """Default tiles: ``bt = 128`` rows (each embedding tile read from L2 once per ``bt`` rows: at
    Liger's shape ``bt = 64`` would move ~270 GB through L2 in the forward), ``bv = 128``,
    ``bk = 64`` (bf16) or 32 (float32) — a 128x128 float32 accumulator and 32 KiB of operand tiles
    per pipeline stage; capped to the problem.  Given ``block_tokens``/``block_vocab`` must be
    powers of two >= 16."""
    for name, value in (("block_tokens", block_tokens), ("block_vocab", block_vocab)):
        if value is not None and not (_pow2(value) and value >= MIN_TILE):
            raise ValueError(f"impl 'pallas_gpu' needs {name} a power of two >= {MIN_TILE} (Triton tiles), "
                             f"got {value}")
    cap = lambda x: max(MIN_TILE, pl.next_power_of_2(x))  # noqa: E731
    bt = min(block_tokens or 128, cap(n))
    bv = min(block_vocab or 128, cap(vocab))
    bk = min(64 if itemsize <= 2 else 32, cap(min(d_s, d_t) if d_t else d_s))
    v_pad = round_up(vocab, bv)
    if chunk_tokens is None:
        chunk = max(bt, GRAD_CHUNK_BYTES // (v_pad * itemsize) // bt * bt)
    else:
        chunk = round_up(chunk_tokens, bt)
    # Triton addresses an array with 32-bit offsets up to 2**32 elements: keep dS below 2**31
    chunk = min(chunk, max(bt, (2**31 - 1) // v_pad // bt * bt))
    return GPUBlocks(bt, bv, bk, min(chunk, round_up(n, bt)))


def _pad_to(x, axis, multiple):
    """``x`` zero-padded along ``axis`` to a multiple of ``multiple`` (``x`` itself when aligned)."""
    extra = round_up(x.shape[axis], multiple) - x.shape[axis]
    if extra == 0:
        return x
    pads = [(0, 0)] * x.ndim
    pads[axis] = (0, extra)
    return jnp.pad(x, pads)


def _tile_logits(refs, rows, j, blk: GPUBlocks, rho, d_pads):
    """The float32 ``[bt, bv]`` tiles ``s`` and ``ρ·t`` (None without a teacher) of row block
    ``rows`` and vocabulary block ``j``: one ``tl.dot`` per ``bk`` hidden columns."""
    cols = pl.ds(j * blk.bv, blk.bv)

    def matmul(h_ref, e_ref, d):
        def step(k, acc):
            ks = pl.ds(k * blk.bk, blk.bk)
            return acc + lax.dot_general(h_ref[rows, ks], e_ref[cols, ks], NT, preferred_element_type=jnp.float32)
        return lax.fori_loop(0, d // blk.bk, step, jnp.zeros((blk.bt, blk.bv), jnp.float32))

    s = matmul(refs["hs"], refs["es"], d_pads[0])
    if "ht" not in refs:
        return s, None
    return s, rho * matmul(refs["ht"], refs["et"], d_pads[1])


def _column_ids(j, bv):
    return j * bv + jnp.arange(bv, dtype=jnp.int32)[None, :]


def _load_col(ref, rows, bt):
    """A ``[bt]`` slice of a per-row vector as a ``[bt, 1]`` column."""
    return ref[rows].reshape(bt, 1)


def _stats_kernel(*refs, teacher, rho, vocab, blk: GPUBlocks, d_pads, blocks_per_split, n_rows):
    names = ("hs", "es", "ht", "et") if teacher else ("hs", "es")
    ins, outs = bind(refs, names + ("y", "theta"), _split_stat_names(teacher))
    i, split = pl.program_id(0), pl.program_id(1)
    rows = pl.ds(i * blk.bt, blk.bt)
    y, theta = _load_col(ins["y"], rows, blk.bt), _load_col(ins["theta"], rows, blk.bt)
    last_block = pl.cdiv(vocab, blk.bv) - 1

    def step(jj, carry):  # a static trip count; the last split's blocks past V are re-read and masked
        j = split * blocks_per_split + jj
        s, rt = _tile_logits(ins, rows, jnp.minimum(j, last_block), blk, rho, d_pads)
        cols = _column_ids(j, blk.bv)
        return _online.stats_update(carry, s, rt, cols < vocab, cols, y, theta)

    carry = lax.fori_loop(0, blocks_per_split, step, _online.stats_init((blk.bt, 1), teacher=teacher))
    stats = _online.stats_finish(carry)
    out_rows = pl.ds(split * n_rows + i * blk.bt, blk.bt)
    for name in _split_stat_names(teacher):
        outs[name][out_rows] = stats[name].reshape(blk.bt)


def _split_stat_names(teacher):
    """The statistics the forward kernel writes per split (``d_y`` is set after the merge)."""
    return tuple(k for k in _online.stat_names(teacher) if k != "d_y")


def _padded_operands(hs, es, teacher, blk: GPUBlocks, n_pad):
    """The matrices zero-padded to whole tiles, and the padded hidden sizes."""
    mats = [_pad_to(_pad_to(hs, 0, n_pad), 1, blk.bk), _pad_to(_pad_to(es, 0, blk.bv), 1, blk.bk)]
    if teacher is not None:
        mats += [_pad_to(_pad_to(teacher[0], 0, n_pad), 1, blk.bk), _pad_to(_pad_to(teacher[1], 0, blk.bv), 1, blk.bk)]
    return mats, (mats[0].shape[1], mats[2].shape[1] if teacher is not None else 0)


def _params(blk: GPUBlocks):
    return plgpu.CompilerParams(num_warps=blk.num_warps, num_stages=blk.num_stages)


def stats(hs, es, teacher, y, theta, rho, blk: GPUBlocks, interpret):
    """Row statistics (the dict of :func:`salt.kernels._online.stat_names`), ``d_y = m_s − θ``."""
    n, vocab = hs.shape[0], es.shape[0]
    n_pad = round_up(n, blk.bt)
    row_blocks, vocab_blocks = n_pad // blk.bt, pl.cdiv(vocab, blk.bv)
    splits = max(1, min(vocab_blocks, MAX_SPLITS, TARGET_PROGRAMS // row_blocks))
    per_split = pl.cdiv(vocab_blocks, splits)
    splits = pl.cdiv(vocab_blocks, per_split)  # no empty split
    mats, d_pads = _padded_operands(hs, es, teacher, blk, n_pad)
    names = _split_stat_names(teacher is not None)
    outs = pl.pallas_call(
        functools.partial(_stats_kernel, teacher=teacher is not None, rho=rho, vocab=vocab, blk=blk,
                          d_pads=d_pads, blocks_per_split=per_split, n_rows=n_pad),
        grid=(row_blocks, splits),
        out_shape=[jax.ShapeDtypeStruct((splits * n_pad,), jnp.float32)] * len(names),
        compiler_params=_params(blk),
        interpret=interpret,
        name="fused_linear_kd_fwd_gpu" if teacher is not None else "fused_linear_ce_fwd_gpu",
    )(*mats, _pad_to(y, 0, n_pad), _pad_to(theta.astype(jnp.float32), 0, n_pad))
    per_split_stats = [{k: o.reshape(splits, n_pad)[p, :n] for k, o in zip(names, outs)} for p in range(splits)]
    merged = functools.reduce(_online.merge_stats, per_split_stats)
    return dict(merged, d_y=merged["m_s"] - theta)


def _dlogits_kernel(*refs, teacher, row_names, rho, vocab, blk: GPUBlocks, d_pads):
    names = ("hs", "es", "ht", "et") if teacher else ("hs", "es")
    ins, rows_in, outs = bind(refs, names + ("y",), row_names, ("ds",))
    i, j = pl.program_id(0), pl.program_id(1)
    rows = pl.ds(i * blk.bt, blk.bt)
    s, rt = _tile_logits(ins, rows, j, blk, rho, d_pads)
    cols = _column_ids(j, blk.bv)
    row_values = {k: _load_col(r, rows, blk.bt) for k, r in rows_in.items()}
    ds = _online.grad_tile(s, rt, cols == _load_col(ins["y"], rows, blk.bt), row_values)
    # padded rows have g_p = 0 (grad_tile gives 0); padded columns are cut here
    outs["ds"][rows, pl.ds(j * blk.bv, blk.bv)] = jnp.where(cols < vocab, ds, 0.0).astype(outs["ds"].dtype)


def dlogits(hs, es, teacher, y, rows, rho, blk: GPUBlocks, interpret):
    """``dS`` ``[N, V]`` in the student embedding's dtype for rows ``hs`` (one backward chunk;
    ``rows``: the ``[N]`` vectors of :func:`salt.kernels._online.grad_rows`)."""
    n, vocab = hs.shape[0], es.shape[0]
    n_pad = round_up(n, blk.bt)
    mats, d_pads = _padded_operands(hs, es, teacher, blk, n_pad)
    row_names = tuple(k for k in _online.ROW_ORDER if k in rows)
    row_ops = [_pad_to(rows[k].astype(jnp.float32), 0, n_pad) for k in row_names]  # padded rows: g_p = 0
    ds = pl.pallas_call(
        functools.partial(_dlogits_kernel, teacher=teacher is not None, row_names=row_names, rho=rho,
                          vocab=vocab, blk=blk, d_pads=d_pads),
        grid=(n_pad // blk.bt, pl.cdiv(vocab, blk.bv)),
        out_shape=jax.ShapeDtypeStruct((n_pad, mats[1].shape[0]), es.dtype),
        compiler_params=_params(blk),
        interpret=interpret,
        name="fused_linear_kd_dlogits_gpu" if teacher is not None else "fused_linear_ce_dlogits_gpu",
    )(*mats, _pad_to(y, 0, n_pad), *row_ops)
    return ds[:n, :vocab] if ds.shape != (n, vocab) else ds


def grad_rows_block(hs, es, teacher, y, rows, des_VxD, *, rho, blk: GPUBlocks, interpret):
    """One backward chunk: ``(d hs`` float32, ``des_VxD + dSᵀ @ hs)`` with ``dS`` from
    :func:`dlogits` and the two gradient matmuls in XLA (float32 accumulation)."""
    ds = dlogits(hs, es, teacher, y, rows, rho, blk, interpret)
    hs_clean = jnp.where(rows["g_p"][:, None] != 0.0, hs, jnp.zeros_like(hs))  # masked rows may hold garbage
    dhs = jnp.dot(ds, es, preferred_element_type=jnp.float32)
    des = lax.dot_general(ds, hs_clean, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return dhs, des_VxD + des
