"""The ``"xla"`` implementation of the fused-linear KD / CE loss: ``lax.scan`` over vocabulary chunks
(forward: the online row statistics; backward: recompute the chunk's logits, accumulate ``d h_s``
in the carry and add the chunk's ``d E_s`` rows in place), the rows in blocks of
``FusedKDBlockSizes.xla_block_tokens``.  :func:`grad_blocked` also runs the GPU kernel's backward
chunks."""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from salt.kernels import _online
from salt.kernels._common import NT
from salt.kernels.fused_linear_kd.common import label_logit


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


def stats(hs, es, teacher, y, rho, chunk, theta=None, block=None):
    """Row statistics, the rows in blocks of ``block`` (``lax.map``; padded rows dropped)."""
    blocks, pad = _row_blocks(hs.shape[0], block)
    if blocks is None:
        return _stats_rows(hs, es, teacher, y, rho, chunk, theta)
    theta = label_logit(hs, es, y) if theta is None else theta
    rows = (hs, y, theta) + (() if teacher is None else (teacher[0],))
    xs = [_blocked(a, blocks, pad) for a in rows]

    def one(x):
        h, yb, tb, *t = x
        return _stats_rows(h, es, None if teacher is None else (t[0], teacher[1]), yb, rho, chunk, tb)

    out = lax.map(one, xs)
    return {k: v.reshape(-1)[:hs.shape[0]] for k, v in out.items()}


def _stats_rows(hs, es, teacher, y, rho, chunk, theta=None):
    n, vocab = hs.shape[0], es.shape[0]
    chunk, n_chunks = _online.chunk_plan(vocab, chunk)
    theta = label_logit(hs, es, y) if theta is None else theta
    y_Nx1, theta_Nx1 = y[:, None], theta[:, None]

    def body(carry, j):
        _, _, s_c, rt_c, cols, valid = _chunk_logits(hs, es, teacher, j, chunk, vocab, rho)
        return _online.stats_update(carry, s_c, rt_c, valid, cols, y_Nx1, theta_Nx1), None

    carry, _ = lax.scan(body, _online.stats_init((n, 1), teacher=teacher is not None), jnp.arange(n_chunks))
    return {k: v[:, 0] for k, v in _online.stats_finish(carry).items()}


def grad_blocked(grad_rows_fn, hs, es, teacher, y, rows, f32_out=False, block=None):
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


def grad_rows(hs, es, teacher, y, rows, des_VxD, *, rho, chunk):
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
