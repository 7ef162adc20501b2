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

Why one module of ~850 lines: as in JAX's own Pallas ops, the forward and backward kernels,
their pure-JAX chunked twin, the naive path, the custom_vjp and the frozen block sizes of multi-
query attention live together so they are read and tested side by side.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from salt.kernels._common import NT as _NT, IMPLS, default_impl, resolve_impl  # noqa: F401 (default_impl: public)

# Finite "minus infinity" for masked scores: exp(MASK - m) is exactly 0 and never NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_LANES = 128


@dataclasses.dataclass(frozen=True)
class AttentionBlockSizes:
    """Tile sizes. They change speed and memory, never the result (beyond rounding).

    block_q, block_k: query / key rows per block in the forward pass (and the xla path).
    block_h: query heads of one key/value head's group processed per grid step (None: as many as fit
      ``max_rows = block_h * block_q`` rows, at most the group size). Must divide H // G.
    block_q_bwd, block_k_bwd: the same for the backward kernels (None: the forward sizes).
    On a real TPU block_q and block_k must be multiples of 128 (the lane width); sequences
    shorter than a block use one block of ``T`` rounded up to 128 (8 in interpret mode), and a
    block is halved (down to 128) while that reduces the padded length (T=300: 128, not 256).
    In interpret mode the sizes are used as given (capped at T rounded up to 8).
    """

    block_q: int = 256
    block_k: int = 256
    block_h: int | None = None
    block_q_bwd: int | None = None
    block_k_bwd: int | None = None
    max_rows: int = 1024

    def __post_init__(self):
        for name in ("block_q", "block_k", "block_h", "block_q_bwd", "block_k_bwd", "max_rows"):
            value = getattr(self, name)
            if value is None and name not in ("block_q", "block_k", "max_rows"):
                continue
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"AttentionBlockSizes.{name} must be a positive integer, got {value!r}")
            if name != "block_h" and name != "max_rows" and value % 8:
                raise ValueError(f"AttentionBlockSizes.{name} must be a multiple of 8, got {value}")


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------

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
        return _xla_attention(q, k, v, prefix_B, scale, block_sizes)
    return _pallas_attention(q, k, v, prefix_B, scale, block_sizes, interpret)


# ----------------------------------------------------------------------------------------------
# Shared mask / block geometry
# ----------------------------------------------------------------------------------------------

def visible_mask(q_pos, k_pos, prefix, seq_len):
    """Key ``k_pos`` visible from query ``q_pos`` (broadcasting int arrays)."""
    return ((k_pos <= q_pos) | (k_pos < prefix)) & (k_pos < seq_len)


def block_visible(qi, kj, prefix, block_q, block_k, seq_len):
    """True iff block (query block qi, key block kj) has at least one visible (query, key) pair.

    The smallest key of the block is kj*block_k and the largest query (qi+1)*block_q - 1; the
    prefix makes keys < prefix visible from every query. Blocks of only padding queries or only
    padding keys (positions >= seq_len) are never computed.
    """
    k0 = kj * block_k
    return ((qi * block_q < seq_len) & (k0 < seq_len)
            & ((k0 < (qi + 1) * block_q) | (k0 < prefix)))


def last_key_block(qi, prefix, block_q, block_k, seq_len):
    """Largest kj with block_visible(qi, kj) (blocks 0..last are exactly the visible ones)."""
    hi = jnp.minimum(seq_len, jnp.maximum((qi + 1) * block_q, prefix))
    return lax.div(hi - 1, jnp.int32(block_k))  # non-negative: truncation == floor


def first_query_block(kj, prefix, block_q, block_k, seq_len):
    """Smallest qi with block_visible(qi, kj), if any (the visible ones are first..last query block
    holding a real query). Clipped to that last block."""
    k0 = kj * block_k
    last_q = (seq_len - 1) // block_q
    return jnp.where(k0 < prefix, 0, jnp.minimum(lax.div(k0, jnp.int32(block_q)), last_q))


def kv_block_index(qi, kj, prefix, block_q, block_k, seq_len):
    """Key block the forward/dq pipelines fetch at grid step (qi, kj): kj, clamped to the last
    visible one, so skipped steps repeat the previous index and no copy is issued."""
    return jnp.minimum(kj, last_key_block(qi, prefix, block_q, block_k, seq_len))


def q_block_index(qi, kj, prefix, block_q, block_k, seq_len):
    """Query block the dk/dv pipeline fetches at step (kj, qi): qi, clamped into the visible
    range [first_query_block, last query block holding a real query]."""
    first = first_query_block(kj, prefix, block_q, block_k, seq_len)
    return jnp.minimum(jnp.maximum(qi, first), (seq_len - 1) // block_q)


def _round_up(x, m):
    return -(-x // m) * m


# ----------------------------------------------------------------------------------------------
# naive
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# xla: pure-JAX flash attention (custom_vjp)
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _XlaConfig:
    seq_len: int
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    scale: float


def _xla_attention(q, k, v, prefix_B, scale, bs):
    B, T, H, hd = q.shape
    G = k.shape[2]
    R = H // G
    t8 = _round_up(T, 8)
    bq, bk = min(bs.block_q, t8), min(bs.block_k, t8)
    bqb, bkb = min(bs.block_q_bwd or bs.block_q, t8), min(bs.block_k_bwd or bs.block_k, t8)
    t_pad = _round_up(T, math.lcm(bq, bk, bqb, bkb))
    cfg = _XlaConfig(T, bq, bk, bqb, bkb, scale)
    pad = ((0, 0), (0, t_pad - T), (0, 0), (0, 0))
    # [B, T, H, K] -> [B, G, R, Tp, K] (head j = g·R + r); k/v -> [B, G, Tp, K].
    q5 = jnp.pad(q, pad).reshape(B, t_pad, G, R, hd).transpose(0, 2, 3, 1, 4)
    k4 = jnp.pad(k, pad).transpose(0, 2, 1, 3)
    v4 = jnp.pad(v, pad).transpose(0, 2, 1, 3)
    o5 = _xla_flash(q5, k4, v4, prefix_B, cfg)
    return o5.transpose(0, 3, 1, 2, 4).reshape(B, t_pad, H, hd)[:, :T]


def _fold_rows(x5, start, size):
    """[B, G, R, Tp, d] -> rows start..start+size of every head, folded: [B, G, R*size, d]."""
    B, G, R, _, d = x5.shape
    return lax.dynamic_slice_in_dim(x5, start, size, axis=3).reshape(B, G, R * size, d)


def _row_positions(qi, block_q, R):
    return qi * block_q + jnp.tile(jnp.arange(block_q), R)  # [R*bq], row r -> query position


def _xla_block_scores(qb, kb, q_pos, kj, block_k, prefix_B, cfg):
    """Masked scaled scores of a folded query block against key block kj: [B, G, R*bq, bk] f32."""
    s = jnp.einsum("bhrd,bhsd->bhrs", qb, kb, preferred_element_type=jnp.float32) * cfg.scale
    k_pos = kj * block_k + jnp.arange(block_k)
    vis = visible_mask(q_pos[None, :, None], k_pos[None, None, :], prefix_B[:, None, None],
                       cfg.seq_len)
    return jnp.where(vis[:, None], s, _MASK_VALUE)


def _xla_forward(q5, k4, v4, prefix_B, cfg):
    B, G, R, t_pad, hd = q5.shape
    bq, bk = cfg.block_q, cfg.block_k
    max_prefix = jnp.max(prefix_B)

    def q_block(qi):
        qb = _fold_rows(q5, qi * bq, bq)
        q_pos = _row_positions(qi, bq, R)
        n_blocks = last_key_block(qi, max_prefix, bq, bk, cfg.seq_len) + 1

        def body(kj, carry):
            m, l, acc = carry
            kb = lax.dynamic_slice_in_dim(k4, kj * bk, bk, axis=2)
            vb = lax.dynamic_slice_in_dim(v4, kj * bk, bk, axis=2)
            s = _xla_block_scores(qb, kb, q_pos, kj, bk, prefix_B, cfg)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            alpha = jnp.exp(m - m_new)
            p = jnp.exp(s - m_new[..., None])
            l = alpha * l + jnp.sum(p, axis=-1)
            acc = alpha[..., None] * acc + jnp.einsum(
                "bhrs,bhsd->bhrd", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
            return m_new, l, acc

        rows = R * bq
        init = (jnp.full((B, G, rows), -jnp.inf, jnp.float32), jnp.zeros((B, G, rows), jnp.float32),
                jnp.zeros((B, G, rows, hd), jnp.float32))
        m, l, acc = lax.fori_loop(0, n_blocks, body, init)
        # Every query row sees key 0 (0 <= t), so l > 0 after block 0.
        return (acc / l[..., None]).astype(q5.dtype), m + jnp.log(l)

    o_blocks, lse_blocks = lax.map(q_block, jnp.arange(t_pad // bq))
    # [nq, B, G, R*bq, ...] -> [B, G, R, Tp, ...]
    nq = t_pad // bq
    o5 = o_blocks.reshape(nq, B, G, R, bq, hd).transpose(1, 2, 3, 0, 4, 5).reshape(B, G, R, t_pad, hd)
    lse = lse_blocks.reshape(nq, B, G, R, bq).transpose(1, 2, 3, 0, 4).reshape(B, G, R, t_pad)
    return o5, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _xla_flash(q5, k4, v4, prefix_B, cfg):
    return _xla_forward(q5, k4, v4, prefix_B, cfg)[0]


def _xla_flash_fwd(q5, k4, v4, prefix_B, cfg):
    o5, lse = _xla_forward(q5, k4, v4, prefix_B, cfg)
    return o5, (q5, k4, v4, prefix_B, o5, lse)


def _xla_flash_bwd(cfg, res, do5):
    q5, k4, v4, prefix_B, o5, lse = res
    B, G, R, t_pad, hd = q5.shape
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    nq, nk = t_pad // bq, t_pad // bk
    max_prefix = jnp.max(prefix_B)
    di = jnp.sum(do5.astype(jnp.float32) * o5.astype(jnp.float32), axis=-1)  # [B, G, R, Tp]
    lse5, di5 = lse[..., None], di[..., None]

    def p_and_ds(qi, kj):
        qb = _fold_rows(q5, qi * bq, bq)
        dob = _fold_rows(do5, qi * bq, bq)
        lse_b = _fold_rows(lse5, qi * bq, bq)[..., 0]
        di_b = _fold_rows(di5, qi * bq, bq)[..., 0]
        kb = lax.dynamic_slice_in_dim(k4, kj * bk, bk, axis=2)
        vb = lax.dynamic_slice_in_dim(v4, kj * bk, bk, axis=2)
        s = _xla_block_scores(qb, kb, _row_positions(qi, bq, R), kj, bk, prefix_B, cfg)
        p = jnp.exp(s - lse_b[..., None])
        dp = jnp.einsum("bhrd,bhsd->bhrs", dob, vb, preferred_element_type=jnp.float32)
        ds = p * (dp - di_b[..., None])
        return qb, dob, kb, p, ds

    def dq_block(qi):
        def body(kj, dq):
            _, _, kb, _, ds = p_and_ds(qi, kj)
            return dq + jnp.einsum("bhrs,bhsd->bhrd", ds.astype(kb.dtype), kb,
                                   preferred_element_type=jnp.float32)
        n_blocks = last_key_block(qi, max_prefix, bq, bk, cfg.seq_len) + 1
        dq = lax.fori_loop(0, n_blocks, body, jnp.zeros((B, G, R * bq, hd), jnp.float32))
        return (dq * cfg.scale).astype(q5.dtype)

    def dkv_block(kj):
        def body(qi, carry):
            dk, dv = carry
            qb, dob, _, p, ds = p_and_ds(qi, kj)
            dv = dv + jnp.einsum("bhrs,bhrd->bhsd", p.astype(dob.dtype), dob,
                                 preferred_element_type=jnp.float32)
            dk = dk + jnp.einsum("bhrs,bhrd->bhsd", ds.astype(qb.dtype), qb,
                                 preferred_element_type=jnp.float32)
            return dk, dv
        first = first_query_block(kj, max_prefix, bq, bk, cfg.seq_len)
        n_q = jnp.where(kj * bk < cfg.seq_len, nq, first)  # all-padding key block: no work
        zeros = jnp.zeros((B, G, bk, hd), jnp.float32)
        dk, dv = lax.fori_loop(first, n_q, body, (zeros, zeros))
        return (dk * cfg.scale).astype(k4.dtype), dv.astype(v4.dtype)

    dq_blocks = lax.map(dq_block, jnp.arange(nq))
    dq5 = dq_blocks.reshape(nq, B, G, R, bq, hd).transpose(1, 2, 3, 0, 4, 5).reshape(q5.shape)
    dk_blocks, dv_blocks = lax.map(dkv_block, jnp.arange(nk))
    dk4 = dk_blocks.transpose(1, 2, 0, 3, 4).reshape(k4.shape)
    dv4 = dv_blocks.transpose(1, 2, 0, 3, 4).reshape(v4.shape)
    return dq5, dk4, dv4, None


_xla_flash.defvjp(_xla_flash_fwd, _xla_flash_bwd)


# ----------------------------------------------------------------------------------------------
# pallas: TPU (Mosaic) kernels
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _PallasConfig:
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


def _pallas_config(T, R, scale, bs, interpret, count_blocks=False, head_dim=128):
    from jax.experimental.pallas import tpu as pltpu

    if interpret is True:
        interpret = pltpu.InterpretParams()
    granule = 8 if interpret else _LANES
    if not interpret:
        for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
            value = getattr(bs, name)
            if value is not None and value % _LANES:
                raise ValueError(f"AttentionBlockSizes.{name}={value} must be a multiple of "
                                 f"{_LANES} for the TPU kernels")
    t_min = _round_up(T, granule)

    def fit(block):
        block = min(block, t_min)
        if not interpret:  # on the TPU, halve a block while that reduces the padded length
            while (block % (2 * granule) == 0
                   and _round_up(T, block // 2) < _round_up(T, block)):
                block //= 2
        return block

    bq, bk = fit(bs.block_q), fit(bs.block_k)
    bqb, bkb = fit(bs.block_q_bwd or bs.block_q), fit(bs.block_k_bwd or bs.block_k)
    bh = _pick_block_h(R, max(bq, bqb), bs.max_rows, bs.block_h)
    # Heads sit side by side in the lane dimension ([B, T, heads * hd]); on the TPU a head's
    # lane slice must be 128-aligned, so other head sizes are zero-padded (scores unchanged).
    hd = head_dim if interpret or head_dim % _LANES == 0 else _round_up(head_dim, _LANES)
    cfg = _PallasConfig(T, hd, bq, bk, bh, bqb, bkb, scale, interpret or False, count_blocks)
    return cfg, _round_up(T, math.lcm(bq, bk, bqb, bkb))


def _pallas_layout(x, t_pad, head_dim):
    """[B, T, N, d] -> zero-padded [B, t_pad, N * head_dim] (a free reshape when nothing pads)."""
    B, T, N, d = x.shape
    x = jnp.pad(x, ((0, 0), (0, t_pad - T), (0, 0), (0, head_dim - d)))
    return x.reshape(B, t_pad, N * head_dim)


def _pallas_attention(q, k, v, prefix_B, scale, bs, interpret):
    B, T, H, hd = q.shape
    G = k.shape[2]
    cfg, t_pad = _pallas_config(T, H // G, scale, bs, interpret, head_dim=hd)
    q2, k2, v2 = (_pallas_layout(x, t_pad, cfg.head_dim) for x in (q, k, v))
    out = _pallas_flash(q2, k2, v2, prefix_B, cfg)
    return out.reshape(B, t_pad, H, cfg.head_dim)[:, :T, :, :hd]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _pallas_flash(q2, k2, v2, prefix_B, cfg):
    return _pallas_forward(q2, k2, v2, prefix_B, cfg)[0]


def _pallas_flash_fwd(q2, k2, v2, prefix_B, cfg):
    o2, lse = _pallas_forward(q2, k2, v2, prefix_B, cfg)[:2]
    return o2, (q2, k2, v2, prefix_B, o2, lse)


def _row_dot_kernel(do_ref, o_ref, di_ref, *, cfg):
    hd = cfg.head_dim
    for h in range(di_ref.shape[0]):
        prod = _head(do_ref, h, hd).astype(jnp.float32) * _head(o_ref, h, hd).astype(jnp.float32)
        col = jnp.sum(prod, axis=1, keepdims=True)  # [bq, 1]
        di_ref[h] = jnp.broadcast_to(col, (col.shape[0], _LANES)).T[:1, :]  # -> [1, bq]


def _row_dot(do2, o2, cfg):
    """di = rowsum(do * o) per query head: [B, Tp, H·K] x2 -> [B, H, 1, Tp] float32.

    A small Pallas kernel: in XLA the per-head reduction over a lane slice of [B, Tp, H·K]
    costs a relayout copy of a float32 [B, Tp, H·K] array."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

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


def _pallas_flash_bwd(cfg, res, do2):
    q2, k2, v2, prefix_B, o2, lse = res
    di = _row_dot(do2, o2, cfg)
    dq = _pallas_dq(q2, k2, v2, do2, lse, di, prefix_B, cfg)[0]
    dk, dv = _pallas_dkv(q2, k2, v2, do2, lse, di, prefix_B, cfg)[:2]
    return dq, dk, dv, None


_pallas_flash.defvjp(_pallas_flash_fwd, _pallas_flash_bwd)


def _count_spec_and_shape(pl, grid_rows, index_map):
    """Debug output: an (8, 128) int32 tile per grid row, incremented per computed block."""
    spec = pl.BlockSpec((None, None, None, 8, _LANES), index_map)
    return spec, jax.ShapeDtypeStruct((*grid_rows, 8, _LANES), jnp.int32)


def _head(ref, h, head_dim):
    """Static lane slice of head h from a [rows, heads·K] block (128-aligned on the TPU)."""
    return ref[:, h * head_dim:(h + 1) * head_dim]


def _fwd_kernel(prefix_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *rest, cfg, block_q, block_k):
    if cfg.count_blocks:
        count_ref, m_ref, l_ref, acc_ref = rest
    else:
        count_ref, (m_ref, l_ref, acc_ref) = None, rest
    from jax.experimental import pallas as pl

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
            s = lax.dot_general(_head(q_ref, h, hd), k, _NT,
                                preferred_element_type=jnp.float32) * cfg.scale
            s = jnp.where(vis, s, _MASK_VALUE)
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


def _pallas_forward(q2, k2, v2, prefix_B, cfg):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

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
        spec, shape = _count_spec_and_shape(pl, (B, G * n_hb, nq),
                                            lambda b, hb, qi, kj, p: (b, hb, qi, 0, 0))
        out_specs.append(spec)
        out_shape.append(shape)
    scratch = [pltpu.VMEM((bh, bq, _LANES), jnp.float32), pltpu.VMEM((bh, bq, _LANES), jnp.float32),
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
    from jax.experimental import pallas as pl

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
            s = lax.dot_general(_head(q_ref, h, hd), k, _NT,
                                preferred_element_type=jnp.float32) * cfg.scale
            s = jnp.where(vis, s, _MASK_VALUE)
            lse_col = jnp.expand_dims(lse_ref[h, 0], -1)  # [bq, 1]
            di_col = jnp.expand_dims(di_ref[h, 0], -1)
            p = jnp.exp(s - lse_col)
            dp = lax.dot_general(_head(do_ref, h, hd), v, _NT, preferred_element_type=jnp.float32)
            ds = p * (dp - di_col)
            acc_ref[h] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(kj == pl.num_programs(3) - 1)
    def _store():
        for h in range(bh):
            dq_ref[:, h * hd:(h + 1) * hd] = (acc_ref[h] * cfg.scale).astype(dq_ref.dtype)


def _pallas_dq(q2, k2, v2, do2, lse, di, prefix_B, cfg):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

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
        spec, shape = _count_spec_and_shape(pl, (B, G * n_hb, nq),
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
    from jax.experimental import pallas as pl

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
            s_t = lax.dot_general(k, q, _NT, preferred_element_type=jnp.float32) * cfg.scale
            s_t = jnp.where(vis, s_t, _MASK_VALUE)
            p_t = jnp.exp(s_t - lse_ref[h])  # [bk, bq] - [1, bq]
            dv_acc[...] += jnp.dot(p_t.astype(do.dtype), do, preferred_element_type=jnp.float32)
            dp_t = lax.dot_general(v, do, _NT, preferred_element_type=jnp.float32)
            ds_t = p_t * (dp_t - di_ref[h])
            dk_acc[...] += jnp.dot(ds_t.astype(q.dtype), q, preferred_element_type=jnp.float32)

    @pl.when((hb == pl.num_programs(3) - 1) & (qi == pl.num_programs(4) - 1))
    def _store():
        dk_ref[...] = (dk_acc[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _pallas_dkv(q2, k2, v2, do2, lse, di, prefix_B, cfg):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

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
        spec, shape = _count_spec_and_shape(pl, (B, G, nk),
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


def pallas_kernel_inputs(q, k, v, block_sizes, interpret, *, count_blocks=False):
    """(cfg, t_pad, q2, k2, v2): the config and the [B, Tp, heads·K] inputs the kernels take."""
    B, T, H, hd = q.shape
    cfg, t_pad = _pallas_config(T, H // k.shape[2], 1.0 / math.sqrt(hd), block_sizes, interpret,
                                count_blocks, head_dim=hd)
    return (cfg, t_pad, *(_pallas_layout(x, t_pad, cfg.head_dim) for x in (q, k, v)))


def pallas_block_counts(q, k, v, prefix_len, block_sizes, *, interpret=True):
    """Debug: how many (query block, key block) pairs each Pallas kernel computed.

    Runs the forward, dq and dk/dv kernels (interpret mode by default) with a counter output.
    Returns (fwd [B, G*head_blocks, q_blocks], dq [same], dkv [B, G, k_blocks]) int arrays,
    the _PallasConfig and the padded length, so tests can check that fully masked blocks were
    skipped.
    """
    cfg, t_pad, q2, k2, v2 = pallas_kernel_inputs(q, k, v, block_sizes, interpret,
                                                  count_blocks=True)
    prefix_B = jnp.clip(jnp.asarray(prefix_len, jnp.int32), 0, q.shape[1])
    o2, lse, fwd_counts = _pallas_forward(q2, k2, v2, prefix_B, cfg)
    di = jnp.zeros(lse.shape, jnp.float32)
    dq_counts = _pallas_dq(q2, k2, v2, o2, lse, di, prefix_B, cfg)[1]
    dkv_counts = _pallas_dkv(q2, k2, v2, o2, lse, di, prefix_B, cfg)[2]
    return fwd_counts[..., 0, 0], dq_counts[..., 0, 0], dkv_counts[..., 0, 0], cfg, t_pad
