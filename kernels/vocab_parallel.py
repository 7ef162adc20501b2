"""Vocabulary-parallel fused loss: the kernels of :mod:`salt.kernels.fused_linear_kd` run per
vocabulary chunk inside ``shard_map``, so that no chip ever holds a whole tied embedding or its
whole gradient (docs/design.md §2 maths, §11 the layout).

The functions here run INSIDE ``shard_map`` over one mesh axis of ``n`` chips (``axis``), with the
tokens split over it (each chip its ``N`` rows) and each embedding ``[V, D]`` split over it along
``D`` (each chip ``[V, D/n]``: the FSDP layout of the parameters, so entering costs nothing).

Letters: ``N``, ``V``, ``D`` as docs/design.md §9; the scalars ``n`` (chips), ``n_chunks`` (chunks) and
``c`` (rows per chip per chunk) are this layout's own, so arrays split by them are named
``e_local`` (``[V, D/n]``) and ``e_owned`` (``[n_chunks, c, D]``) rather than given shape suffixes.

Layout.  ``V`` is padded to ``Vp = n_chunks·n·c`` rows (``n_chunks`` chunks of ``n·c`` rows); global row
``v = j·n·c + o·c + i`` (chunk ``j``, owner ``o``, ``i < c``) is owned by chip ``o``.  One
``all_to_all`` turns the ``D``-split block into the owner's ``[n_chunks, c, D]`` rows (``V·D/n`` per
chip each way).  Chunk ``j`` gathered over the axis is then ``[n·c, D]``: the contiguous global
rows ``[j·n·c, (j+1)·n·c)``, so the kernels see an ordinary (narrower) vocabulary whose column
``k`` is token id ``j·n·c + k``; labels are shifted by ``j·n·c`` (a label outside the chunk
matches no column).  The padding rows all fall in the last chunk, which is cut to its
``V − (n_chunks−1)·n·c`` real rows (a static width), so padding never gets probability.

Forward: per chunk the kernels' row statistics (:func:`salt.kernels.fused_linear_kd.row_stats`,
Pallas on TPU, the chunked ``xla`` scan elsewhere), merged across chunks by :func:`merge_stats`
(the online-softmax merge of :mod:`salt.kernels._online`).  The label
logit ``θ_n = h_n · E[y_n]`` (the threshold of ``n_greater`` and the ``s_y`` of ``ce``) is formed
once, exactly, before the loop: each chip takes the ``[D/n]`` slices of the label rows of all
tokens from its ``D``-split block and one ``all_to_all`` hands every chip the full label rows of
its own tokens (``N·n·D/n`` values per chip).  Backward (``custom_vjp``): per chunk the kernels'
gradients in float32, ``d h`` accumulated locally, the chunk's ``d E`` rows reduced with
``psum_scatter`` to their owners; the inverse ``all_to_all`` (autodiff of the forward one) returns
the owner's rows to the ``D``-split layout.  The teacher's embedding takes the same path with no
gradient.  Per chip the largest buffers are one gathered chunk ``[n·c, D]`` (per embedding) and
its float32 gradient, instead of ``[V, D]`` and ``[V, D]`` float32.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from salt.kernels._common import resolve_impl
from salt.kernels._online import finish_output, grad_rows, loss_and_parts, merge_stats, omega_cotangent
from salt.kernels.fused_linear_kd import FusedKDBlockSizes, row_grads, row_stats

# Default gathered rows per chunk (one chunk is ``[n·c, D]``; see :func:`chunk_layout`).
DEFAULT_CHUNK_ROWS = 8192


def chunk_layout(vocab: int, n: int, vocab_chunks: int | None = None) -> tuple:
    """``(n_chunks, c)``: ``n_chunks`` chunks of ``c`` rows per chip (``n·c`` rows gathered per chunk)
    covering ``vocab`` with the fewest padding rows; ``vocab_chunks`` None: about
    :data:`DEFAULT_CHUNK_ROWS` gathered rows per chunk."""
    if vocab_chunks is None:
        vocab_chunks = -(-vocab // DEFAULT_CHUNK_ROWS)
    if not (isinstance(vocab_chunks, int) and vocab_chunks >= 1):
        raise ValueError(f"vocab_chunks must be a positive integer, got {vocab_chunks!r}")
    c = -(-vocab // (n * vocab_chunks))
    return -(-vocab // (n * c)), c


def to_owner_rows(e_local, axis: str, n: int, n_chunks: int, c: int):
    """The ``D``-split block ``e_local`` ``[V, D/n]`` -> this chip's rows ``[n_chunks, c, D]`` of the
    layout.  The exchange runs on the transpose ``[D/n, V]``: ``D/n`` is small (4 at the paper's
    scale) and a ``[V, D/n]`` intermediate would be padded to the TPU's 128 lanes."""
    V, Dn = e_local.shape
    e = jnp.pad(e_local.T, ((0, 0), (0, n_chunks * n * c - V))).reshape(Dn, n_chunks, n, c)
    e = lax.all_to_all(e, axis, 2, 0, tiled=True)                               # [n·D/n, n_chunks, 1, c]
    return e.reshape(n * Dn, n_chunks, c).transpose(1, 2, 0)


def label_logits(h_NxD, e_local, y_N, axis: str, n: int):
    """``θ_n = h_n · E[y_n]`` in float32 for this chip's tokens, from the ``D``-split block ``e_local``
    (the same products and sum as :func:`salt.kernels.fused_linear_kd.label_logit`)."""
    N = y_N.shape[0]
    y_all = lax.all_gather(y_N, axis, axis=0, tiled=True)                        # [n·N]
    rows = jnp.take(e_local.T, y_all, axis=1, mode="clip").reshape(e_local.shape[1], n, N)
    e_y_DxN = lax.all_to_all(rows, axis, 1, 0, tiled=True).reshape(-1, N)        # full label rows
    return jnp.sum(h_NxD.astype(jnp.float32) * e_y_DxN.T.astype(jnp.float32), axis=1)


def _gathered(e_owned, j, axis):
    """Chunk ``j`` of all owners (``e_owned``: this chip's ``[n_chunks, c, D]`` rows): the global rows
    ``[j·n·c, (j+1)·n·c)`` as ``[n·c, D]``."""
    return lax.all_gather(lax.dynamic_index_in_dim(e_owned, j, 0, keepdims=False), axis, axis=0, tiled=True)


def _chunk_inputs(es, teacher, j, width, axis, n):
    w_all = n * es.shape[1]
    es_c = _gathered(es, j, axis)[:width]
    t_c = None if teacher is None else (teacher[0], _gathered(teacher[1], j, axis)[:width])
    return es_c, t_c, j * w_all


def _over_chunks(fn, merge, n_chunks, width_last, init=None):
    """``fn(j, width)`` over chunks ``0 … n_chunks−1`` (the last one first: it alone has a static, cut
    width), folded with ``merge(acc, j, value)``."""
    acc = merge(init, n_chunks - 1, fn(n_chunks - 1, width_last))
    if n_chunks > 1:
        acc, _ = lax.scan(lambda a, j: (merge(a, j, fn(j, None)), None), acc, jnp.arange(n_chunks - 1))
    return acc


def _stats(hs, es, teacher, y, theta, rho, cfg):
    kcfg, axis, n, vocab = cfg
    n_chunks, c = es.shape[:2]

    def chunk(j, width):
        es_c, t_c, off = _chunk_inputs(es, teacher, j, width, axis, n)
        st = row_stats(hs, es_c, t_c, y - off, rho, kcfg, theta=theta)
        st.pop("d_y")  # set from the exact label logit below
        return dict(st, arg=st["arg"] + jnp.asarray(off, jnp.float32))

    stats = _over_chunks(chunk, lambda a, j, b: b if a is None else merge_stats(a, b), n_chunks,
                         vocab - (n_chunks - 1) * n * c)
    return dict(stats, d_y=stats["m_s"] - theta)


def _grads(hs, es, teacher, y, rows, rho, cfg):
    kcfg, axis, n, vocab = cfg
    n_chunks, c, D = es.shape

    def chunk(j, width):
        es_c, t_c, off = _chunk_inputs(es, teacher, j, width, axis, n)
        dhs, des = row_grads(hs, es_c, t_c, y - off, rows, rho, kcfg, f32_out=True)
        des = jnp.pad(des, ((0, n * c - des.shape[0]), (0, 0)))
        return dhs, lax.psum_scatter(des, axis, scatter_dimension=0, tiled=True)  # the owner's [c, D]

    def merge(acc, j, value):  # each owned row is written once: store it in the embedding's dtype
        dhs, des = acc
        return dhs + value[0], lax.dynamic_update_index_in_dim(des, value[1].astype(es.dtype), j, 0)

    init = (jnp.zeros(hs.shape, jnp.float32), jnp.zeros((n_chunks, c, D), es.dtype))
    dhs, des = _over_chunks(chunk, merge, n_chunks, vocab - (n_chunks - 1) * n * c, init)
    return dhs.astype(hs.dtype), des


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _core(hs, es, teacher, y, theta, omega, rho, cfg):
    return loss_and_parts(_stats(hs, es, teacher, y, theta, rho, cfg), y, omega)


def _core_fwd(hs, es, teacher, y, theta, omega, rho, cfg):
    stats = _stats(hs, es, teacher, y, theta, rho, cfg)
    return loss_and_parts(stats, y, omega), (hs, es, teacher, y, omega, stats)


def _core_bwd(rho, cfg, res, cotangents):
    hs, es, teacher, y, omega, stats = res
    g = cotangents[0]  # the parts are monitoring values: their cotangents are ignored
    dhs, des = _grads(hs, es, teacher, y, grad_rows(stats, g, omega), rho, cfg)
    if teacher is None:
        return dhs, des, None, None, None, jnp.zeros_like(omega)
    return (dhs, des, jax.tree.map(jnp.zeros_like, teacher), None, None, omega_cotangent(g, stats, omega))


_core.defvjp(_core_fwd, _core_bwd)


def local_loss(hs_NxD, es_local, y_N, omega, teacher=None, *, rho=1.0, axis: str, n: int,
               vocab_chunks: int | None = None, impl: str = "xla", block_sizes=None, interpret=False):
    """Per-token ``(loss, parts)`` of this chip's ``N`` tokens, inside ``shard_map`` over ``axis``
    (``n`` chips): the values of :func:`salt.kernels.fused_linear_kd.fused_linear_kd_loss` (with
    ``teacher = (ht_NxD, et_local)``) or ``fused_linear_ce_loss`` (``teacher`` None), parts
    ``ce, correct, n_greater`` (+ ``kd, kl``) under ``stop_gradient``.  ``es_local``/``et_local``:
    this chip's ``D``-split blocks of the embeddings (gradient: the student's, in that layout);
    ``vocab_chunks``: ``n_chunks`` of :func:`chunk_layout`; ``impl``: "pallas" (on a GPU "pallas_gpu"),
    "pallas_gpu" or "xla" per chunk."""
    if impl not in ("pallas", "pallas_gpu", "xla"):
        raise ValueError(f"the vocabulary-parallel loss runs impl 'pallas', 'pallas_gpu' or 'xla', got {impl!r}")
    impl = resolve_impl(impl, gpu_kernel=True)  # "pallas" on a GPU: the GPU kernel
    vocab = es_local.shape[0]
    n_chunks, c = chunk_layout(vocab, n, vocab_chunks)
    block_sizes = FusedKDBlockSizes() if block_sizes is None else block_sizes
    y_N = y_N.astype(jnp.int32)
    theta = lax.stop_gradient(label_logits(hs_NxD, es_local, y_N, axis, n))
    es = to_owner_rows(es_local, axis, n, n_chunks, c)
    if teacher is not None:
        ht, et = (lax.stop_gradient(x) for x in teacher)
        if et.shape[0] != vocab:
            raise ValueError(f"student embedding has vocab {vocab}, teacher embedding {et.shape[0]}")
        teacher = (ht, to_owner_rows(et, axis, n, n_chunks, c))
    omega = jnp.asarray(omega, jnp.float32)
    outputs = _core(hs_NxD, es, teacher, y_N, theta, omega, rho, ((impl, block_sizes, interpret), axis, n, vocab))
    return finish_output(outputs, jnp.ones(y_N.shape, bool), True)
