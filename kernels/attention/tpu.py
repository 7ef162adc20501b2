"""The ``"pallas"`` implementation of multi-query attention: TPU (Mosaic) kernels.  Forward and dq
kernels: grid ``(B, G * head_blocks, q_blocks, k_blocks)``, the k axis ``"arbitrary"`` with VMEM
scratch for the running max, sum and accumulator; dk/dv kernel: grid ``(B, G, k_blocks,
head_blocks, q_blocks)`` reducing over the group's heads and the query blocks.  Fully masked blocks
are skipped in compute (``pl.when``) and in the DMA (the block index is clamped to the last/first
needed block, so the pipeline does not fetch a new block).  The per-example prefix length arrives
by scalar prefetch.  Ragged ``T`` is padded to the block size and masked.  Layout: see the
package docstring.

Why ~480 lines in one module: the three kernels (forward, dq, dk/dv) share the config, the
``[B, T, heads·K]`` layout, the head slices and the clamped block-index maps, and each
``pallas_call``'s wiring is read next to its kernel body, as in JAX's own flash attention."""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from salt.kernels._common import LANES, NT, SUBLANES, round_up
from salt.kernels.attention.common import (MASK_VALUE, block_visible, kv_block_index, q_block_index,
                                           visible_mask)


@dataclasses.dataclass(frozen=True)
class PallasConfig:
    seq_len: int
    head_dim: int  # as laid out in HBM (padded to a multiple of 128 on the TPU)
    block_q: int
    block_k: int
    block_h: int
    block_q_bwd: int
    block_k_bwd: int
    scale: float
    interpret: object  # False or a pltpu.InterpretParams (hashable)
    count_blocks: bool = False  # debug: also return how many blocks each grid row computed


def _pick_block_h(R, block_q, max_rows, block_h):
    if block_h is not None:
        if R % block_h:
            raise ValueError(f"AttentionBlockSizes.block_h={block_h} must divide the group size "
                             f"H // G = {R}")
        return block_h
    return max(d for d in range(1, R + 1) if R % d == 0 and (d == 1 or d * block_q <= max_rows))


def make_config(T, R, scale, bs, interpret, count_blocks=False, head_dim=128):
    if interpret is True:
        interpret = pltpu.InterpretParams()
    granule = SUBLANES if interpret else LANES
    if not interpret:
        for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
            value = getattr(bs, name)
            if value is not None and value % LANES:
                raise ValueError(f"AttentionBlockSizes.{name}={value} must be a multiple of "
                                 f"{LANES} for the TPU kernels")
    t_min = round_up(T, granule)

    def fit(block):
        block = min(block, t_min)
        if not interpret:  # on the TPU, halve a block while that reduces the padded length
            while (block % (2 * granule) == 0
                   and round_up(T, block // 2) < round_up(T, block)):
                block //= 2
        return block

    bq, bk = fit(bs.block_q), fit(bs.block_k)
    bqb, bkb = fit(bs.block_q_bwd or bs.block_q), fit(bs.block_k_bwd or bs.block_k)
    bh = _pick_block_h(R, max(bq, bqb), bs.max_rows, bs.block_h)
    # Heads sit side by side in the lane dimension ([B, T, heads * hd]); on the TPU a head's
    # lane slice must be 128-aligned, so other head sizes are zero-padded (scores unchanged).
    hd = head_dim if interpret or head_dim % LANES == 0 else round_up(head_dim, LANES)
    cfg = PallasConfig(T, hd, bq, bk, bh, bqb, bkb, scale, interpret or False, count_blocks)
    return cfg, round_up(T, math.lcm(bq, bk, bqb, bkb))


def layout(x, t_pad, head_dim):
    """``[B, T, heads, K]`` (``heads``: ``H`` or ``G``) -> zero-padded ``[B, t_pad, heads·head_dim]``
    (a free reshape when nothing pads)."""
    B, T, heads, K = x.shape
    x = jnp.pad(x, ((0, 0), (0, t_pad - T), (0, 0), (0, head_dim - K)))
    return x.reshape(B, t_pad, heads * head_dim)


def attention(q, k, v, prefix_B, scale, bs, interpret):
    B, T, H, hd = q.shape
    G = k.shape[2]
    cfg, t_pad = make_config(T, H // G, scale, bs, interpret, head_dim=hd)
    q2, k2, v2 = (layout(x, t_pad, cfg.head_dim) for x in (q, k, v))
    out = flash(q2, k2, v2, prefix_B, cfg)
    return out.reshape(B, t_pad, H, cfg.head_dim)[:, :T, :, :hd]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def flash(q2, k2, v2, prefix_B, cfg):
    return pallas_forward(q2, k2, v2, prefix_B, cfg)[0]


def _flash_fwd(q2, k2, v2, prefix_B, cfg):
    o2, lse = pallas_forward(q2, k2, v2, prefix_B, cfg)[:2]
    return o2, (q2, k2, v2, prefix_B, o2, lse)


def _row_dot_kernel(do_ref, o_ref, di_ref, *, cfg):
    hd = cfg.head_dim
    for h in range(di_ref.shape[0]):
        prod = _head(do_ref, h, hd).astype(jnp.float32) * _head(o_ref, h, hd).astype(jnp.float32)
        col = jnp.sum(prod, axis=1, keepdims=True)  # [bq, 1]
        di_ref[h] = jnp.broadcast_to(col, (col.shape[0], LANES)).T[:1, :]  # -> [1, bq]


def row_dot(do2, o2, cfg):
    """di = rowsum(do * o) per query head: [B, Tp, H·K] x2 -> [B, H, 1, Tp] float32.

    A small Pallas kernel: in XLA the per-head reduction over a lane slice of [B, Tp, H·K]
    costs a relayout copy of a float32 [B, Tp, H·K] array."""
    hd, bq, bh = cfg.head_dim, cfg.block_q_bwd, cfg.block_h
    B, t_pad, width = do2.shape
    H = width // hd
    spec = pl.BlockSpec((None, bq, bh * hd), lambda b, hb, qi: (b, qi, hb))
    return pl.pallas_call(
        functools.partial(_row_dot_kernel, cfg=cfg),
        grid=(B, H // bh, t_pad // bq),
        in_specs=[spec, spec],
        out_specs=pl.BlockSpec((None, bh, 1, bq), lambda b, hb, qi: (b, hb, 0, qi)),
        out_shape=jax.ShapeDtypeStruct((B, H, 1, t_pad), jnp.float32),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=cfg.interpret,
        name="mqa_flash_row_dot",
    )(do2, o2)


def _flash_bwd(cfg, res, do2):
    q2, k2, v2, prefix_B, o2, lse = res
    di = row_dot(do2, o2, cfg)
    dq = pallas_dq(q2, k2, v2, do2, lse, di, prefix_B, cfg)[0]
    dk, dv = pallas_dkv(q2, k2, v2, do2, lse, di, prefix_B, cfg)[:2]
    return dq, dk, dv, None


flash.defvjp(_flash_fwd, _flash_bwd)


def _count_spec_and_shape(grid_rows, index_map):
    """Debug output: a (SUBLANES, LANES) int32 tile per grid row, incremented per computed block."""
    spec = pl.BlockSpec((None, None, None, SUBLANES, LANES), index_map)
    return spec, jax.ShapeDtypeStruct((*grid_rows, SUBLANES, LANES), jnp.int32)


def _head(ref, h, head_dim):
    """Static lane slice of head h from a [rows, heads·K] block (128-aligned on the TPU)."""
    return ref[:, h * head_dim:(h + 1) * head_dim]


def _fwd_kernel(prefix_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *rest, cfg, block_q, block_k):
    if cfg.count_blocks:
        count_ref, m_ref, l_ref, acc_ref = rest
    else:
        count_ref, (m_ref, l_ref, acc_ref) = None, rest

    b, qi, kj = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    prefix = prefix_ref[b]
    hd, bh = cfg.head_dim, cfg.block_h

    @pl.when(kj == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
        if count_ref is not None:
            count_ref[...] = jnp.zeros(count_ref.shape, jnp.int32)

    @pl.when(block_visible(qi, kj, prefix, block_q, block_k, cfg.seq_len))
    def _compute():
        if count_ref is not None:
            count_ref[...] += 1
        k = k_ref[...]
        v = v_ref[...]
        q_pos = qi * block_q + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
        k_pos = kj * block_k + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
        vis = visible_mask(q_pos, k_pos, prefix, cfg.seq_len)
        for h in range(bh):  # the query heads of this block share k, v
            s = lax.dot_general(_head(q_ref, h, hd), k, NT,
                                preferred_element_type=jnp.float32) * cfg.scale
            s = jnp.where(vis, s, MASK_VALUE)
            m_prev = m_ref[h]  # [bq, 128], lane-replicated
            m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            alpha = jnp.exp(m_prev - m_next)
            p = jnp.exp(s - m_next[:, :1])
            l_ref[h] = alpha * l_ref[h] + jnp.sum(p, axis=1, keepdims=True)
            m_ref[h] = m_next
            pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            acc_ref[h] = acc_ref[h] * alpha[:, :1] + pv

    @pl.when(kj == pl.num_programs(3) - 1)
    def _store():
        for h in range(bh):
            # l == 0 only in a skipped block of padding queries: write 0 there, not NaN.
            l = l_ref[h]
            empty = l == 0.0
            l = jnp.where(empty, 1.0, l)
            o_ref[:, h * hd:(h + 1) * hd] = (acc_ref[h] / l[:, :1]).astype(o_ref.dtype)
            lse_col = jnp.where(empty, 0.0, m_ref[h] + jnp.log(l))  # [bq, 128], lanes equal
            lse_ref[h] = lse_col.T[:1, :]  # -> [1, bq]


def pallas_forward(q2, k2, v2, prefix_B, cfg):
    hd = cfg.head_dim
    B, t_pad, H = q2.shape[0], q2.shape[1], q2.shape[2] // hd
    G = k2.shape[2] // hd
    R = H // G
    bq, bk, bh = cfg.block_q, cfg.block_k, cfg.block_h
    n_hb = R // bh
    nq, nk = t_pad // bq, t_pad // bk
    grid = (B, G * n_hb, nq, nk)

    def q_map(b, hb, qi, kj, prefix_ref):
        return b, qi, hb

    def kv_map(b, hb, qi, kj, prefix_ref):
        # Past the last needed key block keep pointing at it: the pipeline skips the copy.
        kv_index = kv_block_index(qi, kj, prefix_ref[b], bq, bk, cfg.seq_len)
        return b, kv_index, lax.div(hb, jnp.int32(n_hb))

    def lse_map(b, hb, qi, kj, prefix_ref):
        return b, hb, 0, qi

    in_specs = [pl.BlockSpec((None, bq, bh * hd), q_map),
                pl.BlockSpec((None, bk, hd), kv_map),
                pl.BlockSpec((None, bk, hd), kv_map)]
    out_specs = [pl.BlockSpec((None, bq, bh * hd), q_map),
                 pl.BlockSpec((None, bh, 1, bq), lse_map)]
    out_shape = [jax.ShapeDtypeStruct(q2.shape, q2.dtype),
                 jax.ShapeDtypeStruct((B, H, 1, t_pad), jnp.float32)]
    if cfg.count_blocks:
        spec, shape = _count_spec_and_shape((B, G * n_hb, nq),
                                            lambda b, hb, qi, kj, p: (b, hb, qi, 0, 0))
        out_specs.append(spec)
        out_shape.append(shape)
    scratch = [pltpu.VMEM((bh, bq, LANES), jnp.float32), pltpu.VMEM((bh, bq, LANES), jnp.float32),
               pltpu.VMEM((bh, bq, hd), jnp.float32)]
    itemsize = q2.dtype.itemsize
    flops = 4 * B * H * t_pad * t_pad * hd  # upper bound (no skipping); for the scheduler only
    cost = pl.CostEstimate(flops=flops, transcendentals=B * H * t_pad * t_pad,
                           bytes_accessed=(2 * q2.size + 2 * k2.size) * itemsize)
    kernel = functools.partial(_fwd_kernel, cfg=cfg, block_q=bq, block_k=bk)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=grid, in_specs=in_specs, out_specs=out_specs,
            scratch_shapes=scratch),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=cost,
        interpret=cfg.interpret,
        name="mqa_flash_fwd",
    )(prefix_B, q2, k2, v2)


def _dq_kernel(prefix_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dq_ref, *rest, cfg,
               block_q, block_k):
    if cfg.count_blocks:
        count_ref, acc_ref = rest
    else:
        count_ref, (acc_ref,) = None, rest

    b, qi, kj = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    prefix = prefix_ref[b]
    hd, bh = cfg.head_dim, cfg.block_h

    @pl.when(kj == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
        if count_ref is not None:
            count_ref[...] = jnp.zeros(count_ref.shape, jnp.int32)

    @pl.when(block_visible(qi, kj, prefix, block_q, block_k, cfg.seq_len))
    def _compute():
        if count_ref is not None:
            count_ref[...] += 1
        k = k_ref[...]
        v = v_ref[...]
        q_pos = qi * block_q + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
        k_pos = kj * block_k + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
        vis = visible_mask(q_pos, k_pos, prefix, cfg.seq_len)
        for h in range(bh):
            s = lax.dot_general(_head(q_ref, h, hd), k, NT,
                                preferred_element_type=jnp.float32) * cfg.scale
            s = jnp.where(vis, s, MASK_VALUE)
            lse_col = jnp.expand_dims(lse_ref[h, 0], -1)  # [bq, 1]
            di_col = jnp.expand_dims(di_ref[h, 0], -1)
            p = jnp.exp(s - lse_col)
            dp = lax.dot_general(_head(do_ref, h, hd), v, NT, preferred_element_type=jnp.float32)
            ds = p * (dp - di_col)
            acc_ref[h] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(kj == pl.num_programs(3) - 1)
    def _store():
        for h in range(bh):
            dq_ref[:, h * hd:(h + 1) * hd] = (acc_ref[h] * cfg.scale).astype(dq_ref.dtype)


def pallas_dq(q2, k2, v2, do2, lse, di, prefix_B, cfg):
    hd = cfg.head_dim
    B, t_pad, H = q2.shape[0], q2.shape[1], q2.shape[2] // hd
    G = k2.shape[2] // hd
    R = H // G
    bq, bk, bh = cfg.block_q_bwd, cfg.block_k_bwd, cfg.block_h
    n_hb = R // bh
    nq, nk = t_pad // bq, t_pad // bk

    def q_map(b, hb, qi, kj, prefix_ref):
        return b, qi, hb

    def kv_map(b, hb, qi, kj, prefix_ref):
        kv_index = kv_block_index(qi, kj, prefix_ref[b], bq, bk, cfg.seq_len)
        return b, kv_index, lax.div(hb, jnp.int32(n_hb))

    def row_map(b, hb, qi, kj, prefix_ref):
        return b, hb, 0, qi

    q_spec = pl.BlockSpec((None, bq, bh * hd), q_map)
    kv_spec = pl.BlockSpec((None, bk, hd), kv_map)
    row_spec = pl.BlockSpec((None, bh, 1, bq), row_map)
    out_specs = [q_spec]
    out_shape = [jax.ShapeDtypeStruct(q2.shape, q2.dtype)]
    if cfg.count_blocks:
        spec, shape = _count_spec_and_shape((B, G * n_hb, nq),
                                            lambda b, hb, qi, kj, p: (b, hb, qi, 0, 0))
        out_specs.append(spec)
        out_shape.append(shape)
    kernel = functools.partial(_dq_kernel, cfg=cfg, block_q=bq, block_k=bk)
    itemsize = q2.dtype.itemsize
    cost = pl.CostEstimate(flops=6 * B * H * t_pad * t_pad * hd,
                           transcendentals=B * H * t_pad * t_pad,
                           bytes_accessed=(3 * q2.size + 2 * k2.size) * itemsize)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(B, G * n_hb, nq, nk),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
            out_specs=out_specs, scratch_shapes=[pltpu.VMEM((bh, bq, hd), jnp.float32)]),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=cost,
        interpret=cfg.interpret,
        name="mqa_flash_dq",
    )(prefix_B, q2, k2, v2, do2, lse, di)


def _dkv_kernel(prefix_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dk_ref, dv_ref, *rest,
                cfg, block_q, block_k):
    if cfg.count_blocks:
        count_ref, dk_acc, dv_acc = rest
    else:
        count_ref, (dk_acc, dv_acc) = None, rest

    b, kj, hb, qi = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
    prefix = prefix_ref[b]
    hd, bh = cfg.head_dim, cfg.block_h

    @pl.when((hb == 0) & (qi == 0))
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)
        if count_ref is not None:
            count_ref[...] = jnp.zeros(count_ref.shape, jnp.int32)

    @pl.when(block_visible(qi, kj, prefix, block_q, block_k, cfg.seq_len))
    def _compute():
        if count_ref is not None:
            count_ref[...] += 1
        k = k_ref[...]
        v = v_ref[...]
        # Transposed scores [bk, bq]: the per-query lse and di broadcast along sublanes.
        k_pos = kj * block_k + lax.broadcasted_iota(jnp.int32, (block_k, block_q), 0)
        q_pos = qi * block_q + lax.broadcasted_iota(jnp.int32, (block_k, block_q), 1)
        vis = visible_mask(q_pos, k_pos, prefix, cfg.seq_len)
        for h in range(bh):
            q = _head(q_ref, h, hd)
            do = _head(do_ref, h, hd)
            s_t = lax.dot_general(k, q, NT, preferred_element_type=jnp.float32) * cfg.scale
            s_t = jnp.where(vis, s_t, MASK_VALUE)
            p_t = jnp.exp(s_t - lse_ref[h])  # [bk, bq] - [1, bq]
            dv_acc[...] += jnp.dot(p_t.astype(do.dtype), do, preferred_element_type=jnp.float32)
            dp_t = lax.dot_general(v, do, NT, preferred_element_type=jnp.float32)
            ds_t = p_t * (dp_t - di_ref[h])
            dk_acc[...] += jnp.dot(ds_t.astype(q.dtype), q, preferred_element_type=jnp.float32)

    @pl.when((hb == pl.num_programs(3) - 1) & (qi == pl.num_programs(4) - 1))
    def _store():
        dk_ref[...] = (dk_acc[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def pallas_dkv(q2, k2, v2, do2, lse, di, prefix_B, cfg):
    hd = cfg.head_dim
    B, t_pad, H = q2.shape[0], q2.shape[1], q2.shape[2] // hd
    G = k2.shape[2] // hd
    R = H // G
    bq, bk, bh = cfg.block_q_bwd, cfg.block_k_bwd, cfg.block_h
    n_hb = R // bh
    nq, nk = t_pad // bq, t_pad // bk

    def clamped_qi(b, kj, qi, prefix_ref):
        # Outside the needed query blocks, point at the nearest one: no extra copies.
        return q_block_index(qi, kj, prefix_ref[b], bq, bk, cfg.seq_len)

    def q_map(b, kv, kj, hb, qi, prefix_ref):
        return b, clamped_qi(b, kj, qi, prefix_ref), kv * n_hb + hb

    def row_map(b, kv, kj, hb, qi, prefix_ref):
        return b, kv * n_hb + hb, 0, clamped_qi(b, kj, qi, prefix_ref)

    def kv_map(b, kv, kj, hb, qi, prefix_ref):
        return b, kj, kv

    q_spec = pl.BlockSpec((None, bq, bh * hd), q_map)
    kv_spec = pl.BlockSpec((None, bk, hd), kv_map)
    row_spec = pl.BlockSpec((None, bh, 1, bq), row_map)
    out_specs = [kv_spec, kv_spec]
    out_shape = [jax.ShapeDtypeStruct(k2.shape, k2.dtype), jax.ShapeDtypeStruct(v2.shape, v2.dtype)]
    if cfg.count_blocks:
        spec, shape = _count_spec_and_shape((B, G, nk),
                                            lambda b, kv, kj, hb, qi, p: (b, kv, kj, 0, 0))
        out_specs.append(spec)
        out_shape.append(shape)
    kernel = functools.partial(_dkv_kernel, cfg=cfg, block_q=bq, block_k=bk)
    itemsize = q2.dtype.itemsize
    cost = pl.CostEstimate(flops=8 * B * H * t_pad * t_pad * hd,
                           transcendentals=B * H * t_pad * t_pad,
                           bytes_accessed=(2 * q2.size + 4 * k2.size) * itemsize)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(B, G, nk, n_hb, nq),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
            out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((bk, hd), jnp.float32), pltpu.VMEM((bk, hd), jnp.float32)]),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        cost_estimate=cost,
        interpret=cfg.interpret,
        name="mqa_flash_dkv",
    )(prefix_B, q2, k2, v2, do2, lse, di)


def kernel_inputs(q, k, v, block_sizes, interpret, *, count_blocks=False):
    """(cfg, t_pad, q2, k2, v2): the config and the [B, Tp, heads·K] inputs the kernels take."""
    B, T, H, hd = q.shape
    cfg, t_pad = make_config(T, H // k.shape[2], 1.0 / math.sqrt(hd), block_sizes, interpret,
                             count_blocks, head_dim=hd)
    return (cfg, t_pad, *(layout(x, t_pad, cfg.head_dim) for x in (q, k, v)))


def block_counts(q, k, v, prefix_len, block_sizes, *, interpret=True):
    """Debug: how many (query block, key block) pairs each Pallas kernel computed.

    Runs the forward, dq and dk/dv kernels (interpret mode by default) with a counter output.
    Returns (fwd [B, G*head_blocks, q_blocks], dq [same], dkv [B, G, k_blocks]) int arrays,
    the PallasConfig and the padded length, so tests can check that fully masked blocks were
    skipped.
    """
    cfg, t_pad, q2, k2, v2 = kernel_inputs(q, k, v, block_sizes, interpret, count_blocks=True)
    prefix_B = jnp.clip(jnp.asarray(prefix_len, jnp.int32), 0, q.shape[1])
    o2, lse, fwd_counts = pallas_forward(q2, k2, v2, prefix_B, cfg)
    di = jnp.zeros(lse.shape, jnp.float32)
    dq_counts = pallas_dq(q2, k2, v2, o2, lse, di, prefix_B, cfg)[1]
    dkv_counts = pallas_dkv(q2, k2, v2, o2, lse, di, prefix_B, cfg)[2]
    return fwd_counts[..., 0, 0], dq_counts[..., 0, 0], dkv_counts[..., 0, 0], cfg, t_pad
