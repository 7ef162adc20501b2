"""Multi-query / grouped-query flash attention: Pallas TPU kernels, a pure-JAX flash path, naive.

Conventions (reference/config.py, docs/design.md §5):

* ``q`` is ``[B, T, H, K]``, ``k`` and ``v`` are ``[B, T, G, K]`` with ``H % G == 0``;
  query head ``j`` uses key/value head ``j // (H // G)`` (``G = 1`` multi-query,
  ``1 < G < H`` grouped, ``G = H`` multi-head).
* scores are ``q·k / sqrt(K)``; key ``s`` is visible from query ``t`` iff ``s <= t`` or
  ``s < prefix_len[b]`` (prefix-LM; ``prefix_len = 0`` is causal, ``prefix_len = T`` is fully
  bidirectional). Rotary embedding is the caller's job.

Implementations (``impl``):

* ``"naive"``: materialises the ``[B, H, T, T]`` scores (the reference maths, in JAX).
* ``"xla"``: pure-JAX flash attention. A ``lax.map`` over query blocks, and inside it a
  ``while_loop`` over only the key blocks that are not fully masked, with an online softmax;
  the query heads of a key/value head's group are folded into the query-block rows so each
  K/V block is read once per group. A ``custom_vjp`` whose backward recomputes the blocks (a dq pass over query
  blocks and a dk/dv pass over key blocks). Never holds ``[T, T]`` scores of a head.
* ``"pallas"``: TPU (Mosaic) kernels, same maths. Forward and dq kernels: grid
  ``(B, G * head_blocks, q_blocks, k_blocks)``, the k axis ``"arbitrary"`` with VMEM scratch
  for the running max, sum and accumulator; dk/dv kernel: grid
  ``(B, G, k_blocks, head_blocks, q_blocks)`` reducing over the group's heads and the query
  blocks. Fully masked blocks (above the diagonal and outside the prefix, or all padding) are
  skipped in compute (``pl.when``) and in the DMA (the block index is clamped to the last/first
  needed block, so the pipeline does not fetch a new block). The per-example prefix length
  arrives by scalar prefetch. Ragged ``T`` is padded to the block size and masked.

Layout: the kernels read q, k, v and write o, dq, dk, dv as ``[B, T, heads·K]`` (a free
reshape of ``[B, T, heads, K]``, and the layout the projections ``a @ wq`` produce): a block is
``[block_q, block_h·K]`` and head ``h`` a 128-aligned lane slice, so no transposes or
relayouts are needed in HBM (head sizes that are not a multiple of 128 are zero-padded on the
TPU). The log-sum-exp residual and ``di = rowsum(do * o)`` are ``[B, H, 1, T]`` float32
(lane-major, so the dk/dv kernel broadcasts them along sublanes of its transposed
``[block_k, block_q]`` scores); ``di`` comes from a small Pallas kernel.

Letters as docs/design.md §9: ``G`` key/value heads, ``R = H / G`` query heads per key/value
head, ``K`` the head dimension (the local variable ``hd``; lower-case ``k`` is the keys).

The package, in the style of JAX's Pallas ops: :mod:`.common` (block sizes, mask geometry),
:mod:`.xla` (the pure-JAX flash path), :mod:`.tpu` (the Mosaic kernels); here the entry point and
the naive path.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from salt.kernels._common import resolve_impl
from salt.kernels.attention import tpu, xla
from salt.kernels.attention.common import AttentionBlockSizes, visible_mask


def mqa_attention(q, k, v, prefix_len=None, *, impl=None, interpret=False, block_sizes=None,
                  causal=True):
    """Masked multi-query / grouped-query attention; returns ``[B, T, H, K]`` in q's dtype.

    q: [B, T, H, K]; k, v: [B, T, G, K] with H % G == 0.
    prefix_len: int [B] or None (causal). Values are clipped to [0, T].
    impl: "pallas", "xla" or "naive"; None = "pallas" on TPU, "xla" elsewhere (no GPU kernel:
      "pallas" on a GPU runs "xla"; :func:`salt.kernels._common.resolve_impl`).
    interpret: Pallas only: run the TPU kernels in the TPU interpreter (True, or a
      ``pltpu.InterpretParams``, e.g. with ``detect_races=True``).
    block_sizes: AttentionBlockSizes (pallas and xla).
    causal: False makes every key visible (same as prefix_len = T).
    """
    impl = resolve_impl(impl)  # no GPU kernel: "pallas" on a GPU runs the "xla" path
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be rank 4 ([B, T, heads, head_dim]); got shapes "
                         f"q={q.shape}, k={k.shape}, v={v.shape}")
    B, T, H, hd = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k={k.shape}, v={v.shape}")
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != hd:
        raise ValueError(f"k/v shape {k.shape} does not match q shape {q.shape} "
                         f"(expected [{B}, {T}, G, {hd}])")
    G = k.shape[2]
    if H % G:
        raise ValueError(f"number of query heads H={H} is not divisible by kv heads G={G}")
    if not (jnp.issubdtype(q.dtype, jnp.floating) and q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if block_sizes is None:
        block_sizes = AttentionBlockSizes()
    if not isinstance(block_sizes, AttentionBlockSizes):
        raise ValueError(f"block_sizes must be an AttentionBlockSizes, got {type(block_sizes).__name__}")

    if prefix_len is None:
        prefix_B = jnp.zeros((B,), jnp.int32)
    else:
        prefix_B = jnp.asarray(prefix_len)
        if prefix_B.shape != (B,) or not jnp.issubdtype(prefix_B.dtype, jnp.integer):
            raise ValueError(f"prefix_len must be an integer array of shape ({B},), got "
                             f"shape {prefix_B.shape} dtype {prefix_B.dtype}")
        prefix_B = jnp.clip(prefix_B.astype(jnp.int32), 0, T)
    if not causal:
        prefix_B = jnp.full((B,), T, jnp.int32)

    scale = 1.0 / math.sqrt(hd)
    if impl == "naive":
        return _naive_attention(q, k, v, prefix_B, scale)
    if impl == "xla":
        return xla.attention(q, k, v, prefix_B, scale, block_sizes)
    return tpu.attention(q, k, v, prefix_B, scale, block_sizes, interpret)


def _naive_attention(q, k, v, prefix_B, scale):
    """The plain full-size softmax (float32 or wider), the cross-check of the kernels; letters
    as docs/design.md §9 (G kv heads, R = H / G queries per kv head, K head dim)."""
    B, T, H, K = q.shape
    G = k.shape[2]
    R = H // G
    dtype = jnp.promote_types(q.dtype, jnp.float32)
    q_BxTxGxRxK = q.astype(dtype).reshape(B, T, G, R, K)
    s_BxGxRxTxS = jnp.einsum("btgrk,bsgk->bgrts", q_BxTxGxRxK, k.astype(dtype)) * scale
    pos = jnp.arange(T)
    vis_BxTxS = visible_mask(pos[None, :, None], pos[None, None, :], prefix_B[:, None, None], T)
    s_BxGxRxTxS = jnp.where(vis_BxTxS[:, None, None], s_BxGxRxTxS, -jnp.inf)
    p = jax.nn.softmax(s_BxGxRxTxS, axis=-1)
    o = jnp.einsum("bgrts,bsgk->btgrk", p, v.astype(dtype))
    return o.reshape(B, T, H, K).astype(q.dtype)
