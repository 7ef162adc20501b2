"""The ``"xla"`` implementation of multi-query attention: pure-JAX flash attention.  A ``lax.map``
over query blocks, and inside it a ``while_loop`` over only the key blocks that are not fully
masked, with an online softmax; the query heads of a key/value head's group are folded into the
query-block rows so each K/V block is read once per group.  A ``custom_vjp`` whose backward
recomputes the blocks (a dq pass over query blocks and a dk/dv pass over key blocks).  Never holds
``[T, T]`` scores of a head."""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from salt.kernels._common import SUBLANES, round_up
from salt.kernels.attention.common import MASK_VALUE, first_query_block, last_key_block, visible_mask


@dataclasses.dataclass(frozen=True)
class _XlaConfig:
    seq_len: int
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    scale: float


def attention(q, k, v, prefix_B, scale, bs):
    B, T, H, hd = q.shape
    G = k.shape[2]
    R = H // G
    t8 = round_up(T, SUBLANES)
    bq, bk = min(bs.block_q, t8), min(bs.block_k, t8)
    bqb, bkb = min(bs.block_q_bwd or bs.block_q, t8), min(bs.block_k_bwd or bs.block_k, t8)
    t_pad = round_up(T, math.lcm(bq, bk, bqb, bkb))
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
    return jnp.where(vis[:, None], s, MASK_VALUE)


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
