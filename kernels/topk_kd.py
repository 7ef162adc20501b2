"""Top-k KD loss (paper eq. 13-14, docs/design.md §2) from final hidden states and tied embeddings,
without a ``[tokens, vocab]`` buffer on the fused paths: ``fused_linear_topk_kd_loss``.

Per token, with student logits ``s = h_s·E_sᵀ``, teacher logits ``t = h_t·E_tᵀ``, label ``y``::

    T      = the teacher's top-k ids (exactly k; ties -> the lower id, as lax.top_k and
             salt.reference.losses.topk_indices)
    P^T    = softmax(s_T),  Q^T = softmax(ρ·t_T)           (both renormalised over T)
    kd_T   = lse(s_T) − Σ_T Q^T·s_T = −Σ_T Q^T log P^T
    loss   = (1−ω)·ce + ω·kd_T,  ce = lse(s) − s_y         (the FULL-vocabulary CE)
    kl     = KL(Q^T‖P^T)                                   (monitoring)

The reference is :func:`salt.reference.losses.topk_kd_loss` (and ``topk_kd_loss_grad``).
Shape letter ``Z``: the ``k`` entries of a token's top-k set (``t_NxZ``; docs/design.md §9, where
``K`` is the head dimension).

Implementations (``impl=``):

* ``"xla"`` and ``"pallas"``: (1) the teacher's top-k.  ``"xla"``: a ``lax.scan`` over vocabulary
  chunks of ``h_t·E_tᵀ``: each ``[N, C]`` chunk is appended to the running ``[N, k]`` set and
  ``lax.top_k`` keeps the best k (the running set holds only lower ids than the chunk, so position
  order is id order and ties go to the lower id; the last chunk is shifted left and its
  already-seen columns masked, as in :mod:`salt.kernels.fused_linear_kd`).  ``"pallas"``: the
  fused-linear Pallas TPU kernel of :mod:`salt.kernels.topk_pallas` when lowered for TPU (or with
  ``interpret=True`` anywhere); lowered for another platform without ``interpret`` it is the same
  scan as ``"xla"`` (``lax.platform_dependent``: the choice is made at lowering, so an ahead-of-time
  TPU compile on a CPU host gets the kernel).  (2) the student's logits at those k ids from
  the gathered embedding rows, in token chunks so no ``[N, k, D]`` array is formed
  (:func:`gathered_logits`, a ``custom_vjp`` whose embedding gradient is scatter-added in
  float32); (3) ``ce``, ``correct``, ``n_greater`` from :func:`fused_linear_ce_loss` with the same
  ``impl`` (the Pallas TPU kernel for ``"pallas"``, the chunked scan for ``"xla"``); (4) the
  ``[N, k]`` maths in plain JAX with autodiff.  Steps (2) and (4) are XLA ops on every platform.
* ``"naive"``: full logits, ``lax.top_k`` and :func:`salt.kernels.logits_kd.loss_naive` for the CE
  part, autodiff: the cross-check.

No gradient reaches the teacher (its arrays are under ``stop_gradient``).
"""
from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp
from jax import lax

from salt.kernels._checks import check_labels_mask, check_omega, check_rho, float_input
from salt.kernels._common import NT, resolve_impl
from salt.kernels._online import chunk_plan, finish_output, lse_step
from salt.kernels.logits_kd import loss_naive
from salt.kernels.fused_linear_kd import FusedKDBlockSizes, fused_linear_ce_loss
from salt.kernels.topk_pallas import TopKKernelBlockSizes, teacher_topk_pallas

_NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class TopKBlockSizes:
    """``chunk_vocab``: vocabulary columns per step of the teacher's top-k scan; ``gather_bytes``:
    the budget of one token chunk's gathered ``[c, k, D_s]`` float32 embedding rows (sets the token
    chunk); ``ce``: the block sizes of the full-vocabulary CE kernel; ``topk``: those of the
    teacher's top-k kernel (``impl="pallas"``)."""

    chunk_vocab: int = 2048
    gather_bytes: int = 16 * 1024 * 1024
    ce: FusedKDBlockSizes = FusedKDBlockSizes()
    topk: TopKKernelBlockSizes = TopKKernelBlockSizes()

    def __post_init__(self):
        for name in ("chunk_vocab", "gather_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.ce, FusedKDBlockSizes):
            raise ValueError(f"ce must be a FusedKDBlockSizes, got {type(self.ce).__name__}")
        if not isinstance(self.topk, TopKKernelBlockSizes):
            raise ValueError(f"topk must be a TopKKernelBlockSizes, got {type(self.topk).__name__}")


def check_k(k, vocab: int) -> int:
    """``k`` as an int; ValueError unless it is an integer in [1, vocab] (static)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= int(k) <= vocab:
        raise ValueError(f"k must be an integer in [1, V={vocab}], got {k!r}")
    return int(k)


# ----------------------------------------------------------------------------------------------
# (1) the teacher's top-k
# ----------------------------------------------------------------------------------------------

def teacher_topk(ht_NxD, et_VxD, k, *, impl="xla", chunk_vocab=2048, with_lse=False, interpret=False,
                 block_sizes=None):
    """``(t_NxZ float32, ids_NxZ int32)``: the k largest teacher logits ``h_t·E_tᵀ`` per row, in
    descending order, ties to the lower id.  ``impl="naive"`` forms the full logits; ``"xla"`` a
    scan over vocabulary chunks of ``chunk_vocab`` columns holds only ``[N, k + chunk]``;
    ``"pallas"`` the Pallas TPU kernel (module docstring; ``interpret`` for Pallas interpret mode,
    ``block_sizes`` a :class:`salt.kernels.topk_pallas.TopKKernelBlockSizes`; its outputs carry no
    gradient).  ``with_lse``: also the full-vocabulary ``lse(t)`` ``[N]`` (float32; online in the
    same pass)."""
    vocab = et_VxD.shape[0]
    k = check_k(k, vocab)
    if impl == "naive":
        t_NxV = jnp.dot(ht_NxD, et_VxD.T, preferred_element_type=jnp.float32)
        top = lax.top_k(t_NxV, k)
        return (*top, jax.nn.logsumexp(t_NxV, axis=1)) if with_lse else top
    scan = functools.partial(_topk_scan, k=k, chunk_vocab=chunk_vocab, with_lse=with_lse)
    if impl != "pallas":
        return scan(ht_NxD, et_VxD)
    kernel = functools.partial(teacher_topk_pallas, k=k, with_lse=with_lse, block_sizes=block_sizes,
                               interpret=interpret)
    if interpret:
        return kernel(ht_NxD, et_VxD)
    return lax.platform_dependent(ht_NxD, et_VxD, tpu=kernel, default=scan)


def _topk_scan(ht_NxD, et_VxD, k, chunk_vocab, with_lse):
    n, vocab = ht_NxD.shape[0], et_VxD.shape[0]
    chunk, n_chunks = chunk_plan(vocab, chunk_vocab)

    def body(carry, j):
        top_NxZ, ids_NxZ, m_Nx1, l_Nx1 = carry
        start = jnp.minimum(j * chunk, vocab - chunk)
        et_c = lax.dynamic_slice_in_dim(et_VxD, start, chunk, axis=0)
        t_NxC = lax.dot_general(ht_NxD, et_c, NT, preferred_element_type=jnp.float32)
        cols_1xC = start + lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
        t_NxC = jnp.where(cols_1xC >= j * chunk, t_NxC, _NEG_INF)  # seen columns of a shifted chunk
        if with_lse:
            m_Nx1, l_Nx1 = lse_step(m_Nx1, l_Nx1, t_NxC)
        merged = jnp.concatenate([top_NxZ, t_NxC], axis=1)
        merged_ids = jnp.concatenate([ids_NxZ, jnp.broadcast_to(cols_1xC, t_NxC.shape)], axis=1)
        top_NxZ, pos_NxZ = lax.top_k(merged, k)
        return (top_NxZ, jnp.take_along_axis(merged_ids, pos_NxZ, axis=1), m_Nx1, l_Nx1), None

    init = (jnp.full((n, k), _NEG_INF, jnp.float32), jnp.zeros((n, k), jnp.int32),
            jnp.full((n, 1), _NEG_INF, jnp.float32), jnp.zeros((n, 1), jnp.float32))
    (top, ids, m, l), _ = lax.scan(body, init, jnp.arange(n_chunks))
    return (top, ids, (m + jnp.log(l))[:, 0]) if with_lse else (top, ids)


# ----------------------------------------------------------------------------------------------
# (2) the student's logits at given ids
# ----------------------------------------------------------------------------------------------

def _token_chunk(n, k, d, gather_bytes):
    return max(1, min(n, gather_bytes // max(1, 4 * k * d)))


def _chunked(x, c):
    """``[N, ...]`` -> ``[ceil(N/c), c, ...]`` (zero-padded rows at the end)."""
    n = x.shape[0]
    pad = -n % c
    if pad:
        x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)], axis=0)
    return x.reshape((n + pad) // c, c, *x.shape[1:])


def _unchunked(x, n):
    return x.reshape(-1, *x.shape[2:])[:n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gathered_logits(hs_NxD, es_VxD, ids_NxZ, gather_bytes=16 * 1024 * 1024):
    """``s_NxZ[n, j] = hs[n] · es[ids[n, j]]`` in float32, scanned over token chunks of at most
    ``gather_bytes`` of gathered rows.  Gradient: ``d hs = Σ_j g·es[ids]``; ``d es`` scatter-added
    at ``ids`` in float32 (then cast to ``es``'s dtype); none for ``ids``."""
    return _gathered_fwd(hs_NxD, es_VxD, ids_NxZ, gather_bytes)[0]


def _gathered_fwd(hs, es, ids, gather_bytes):
    n, k = ids.shape
    c = _token_chunk(n, k, hs.shape[1], gather_bytes)

    def one(args):
        hs_c, ids_c = args
        return jnp.einsum("cd,ckd->ck", hs_c, jnp.take(es, ids_c, axis=0),
                          preferred_element_type=jnp.float32)

    s = lax.map(one, (_chunked(hs, c), _chunked(ids, c)))
    return _unchunked(s, n), (hs, es, ids)


def _gathered_bwd(gather_bytes, res, g_NxZ):
    hs, es, ids = res
    n, k = ids.shape
    d = hs.shape[1]
    c = _token_chunk(n, k, d, gather_bytes)
    g_NxZ = g_NxZ.astype(jnp.float32)
    hs = jnp.where(jnp.any(g_NxZ != 0.0, axis=1, keepdims=True), hs, jnp.zeros_like(hs))  # masked rows

    def body(des_VxD, args):
        hs_c, ids_c, g_c = args
        es_g = jnp.take(es, ids_c, axis=0).astype(jnp.float32)
        dhs_c = jnp.einsum("ck,ckd->cd", g_c, es_g)
        rows = (g_c[:, :, None] * hs_c.astype(jnp.float32)[:, None, :]).reshape(-1, d)
        return des_VxD.at[ids_c.reshape(-1)].add(rows), dhs_c

    des, dhs = lax.scan(body, jnp.zeros(es.shape, jnp.float32),
                        (_chunked(hs, c), _chunked(ids, c), _chunked(g_NxZ, c)))
    return _unchunked(dhs, n).astype(hs.dtype), des.astype(es.dtype), None


gathered_logits.defvjp(_gathered_fwd, _gathered_bwd)


# ----------------------------------------------------------------------------------------------
# (4) the [N, k] maths
# ----------------------------------------------------------------------------------------------

def topk_terms(s_NxZ, rt_NxZ):
    """``(kd_T, kl)`` per row from the student's logits and ρ·teacher logits on the top-k set."""
    log_p = jax.nn.log_softmax(s_NxZ.astype(jnp.float32), axis=-1)
    log_q = jax.nn.log_softmax(lax.stop_gradient(rt_NxZ).astype(jnp.float32), axis=-1)
    q = jnp.exp(log_q)
    return -jnp.sum(q * log_p, axis=-1), jnp.sum(q * (log_q - log_p), axis=-1)


def _loss(hs, es, ht, et, y, valid, omega, rho, k, impl, interpret, block_sizes):
    keep_Nx1 = valid[:, None]  # masked rows may hold garbage: zero them for the top-k part
    ht = lax.stop_gradient(jnp.where(keep_Nx1, ht, jnp.zeros_like(ht)))
    t_NxZ, ids_NxZ = teacher_topk(ht, lax.stop_gradient(et), k, impl=impl, chunk_vocab=block_sizes.chunk_vocab,
                                  interpret=interpret, block_sizes=block_sizes.topk)
    return _loss_from_topk(hs, es, t_NxZ, ids_NxZ, y, valid, omega, rho, impl, interpret, block_sizes)


def _loss_from_topk(hs, es, t_NxZ, ids_NxZ, y, valid, omega, rho, impl, interpret, block_sizes):
    keep_Nx1 = valid[:, None]
    t_NxZ = lax.stop_gradient(jnp.where(keep_Nx1, t_NxZ, 0.0).astype(jnp.float32))
    ids_NxZ = lax.stop_gradient(jnp.where(keep_Nx1, ids_NxZ, 0).astype(jnp.int32))
    hs_clean = jnp.where(keep_Nx1, hs, jnp.zeros_like(hs))
    if impl == "naive":
        s_NxV = jnp.dot(hs_clean, es.T, preferred_element_type=jnp.float32)
        s_NxZ = jnp.take_along_axis(s_NxV, ids_NxZ, axis=1)
        ce, parts = loss_naive(s_NxV, None, y, omega, rho)
    else:
        s_NxZ = gathered_logits(hs_clean, es, ids_NxZ, block_sizes.gather_bytes)
        ce, parts = fused_linear_ce_loss(hs, es, y, valid, impl=impl, interpret=interpret,
                                         block_sizes=block_sizes.ce, return_parts=True)
    kd, kl = topk_terms(s_NxZ, rho * t_NxZ)
    parts = dict(parts, kd=kd, kl=kl)
    return (1.0 - omega) * ce + omega * kd, parts


def _common_args(labels, mask, n, omega, rho, impl, block_sizes):
    labels, valid = check_labels_mask(labels, mask, (n,))
    omega = jnp.asarray(check_omega(omega), jnp.float32)
    block_sizes = TopKBlockSizes() if block_sizes is None else block_sizes
    if not isinstance(block_sizes, TopKBlockSizes):
        raise ValueError(f"block_sizes must be a TopKBlockSizes, got {type(block_sizes).__name__}")
    return labels, valid, omega, check_rho(rho), resolve_impl(impl), block_sizes


def topk_kd_loss_from_teacher_topk(student_hidden, student_embedding, teacher_topk_logits, teacher_topk_ids,
                                   labels, omega, rho, mask=None, *, impl=None, interpret=False,
                                   block_sizes=None, return_parts=False):
    """:func:`fused_linear_topk_kd_loss` given the teacher's top-k set instead of its hidden states
    (e.g. from a teacher cache): ``teacher_topk_logits`` ``[N, k]`` (the teacher's raw logits on
    the set; any float dtype) and ``teacher_topk_ids`` ``[N, k]`` ints in ``[0, V)`` (not checked:
    they may be traced).  Same outputs and gradients (none for the teacher's arrays)."""
    hs = float_input("student_hidden", student_hidden)
    es = float_input("student_embedding", student_embedding)
    t_NxZ = float_input("teacher_topk_logits", teacher_topk_logits)
    ids_NxZ = jnp.asarray(teacher_topk_ids)
    if hs.ndim != 2 or es.ndim != 2 or hs.shape[1] != es.shape[1]:
        raise ValueError(f"student_hidden {hs.shape} and student_embedding {es.shape} must be [N, D] and [V, D]")
    if t_NxZ.ndim != 2 or t_NxZ.shape[0] != hs.shape[0] or ids_NxZ.shape != t_NxZ.shape:
        raise ValueError(f"teacher_topk_logits {t_NxZ.shape} and teacher_topk_ids {ids_NxZ.shape} must both "
                         f"be [N={hs.shape[0]}, k]")
    if not jnp.issubdtype(ids_NxZ.dtype, jnp.integer):
        raise ValueError(f"teacher_topk_ids must be integers, got dtype {ids_NxZ.dtype}")
    check_k(t_NxZ.shape[1], es.shape[0])
    labels, valid, omega, rho, impl, block_sizes = _common_args(labels, mask, hs.shape[0], omega, rho, impl,
                                                                block_sizes)
    outputs = _loss_from_topk(hs, es, t_NxZ, ids_NxZ, labels, valid, omega, rho, impl, interpret, block_sizes)
    return finish_output(outputs, valid, return_parts)


def fused_linear_topk_kd_loss(student_hidden, student_embedding, teacher_hidden, teacher_embedding,
                              labels, omega, rho, k, mask=None, *, impl=None, interpret=False,
                              block_sizes=None, return_parts=False):
    """Per-token top-k KD loss ``(1−ω)·ce + ω·kd_T`` (module docstring), float32 ``[N]``.

    Args as :func:`salt.kernels.fused_linear_kd.fused_linear_kd_loss` (``student_hidden`` ``[N, D_s]``,
    ``student_embedding`` ``[V, D_s]``, ``teacher_hidden`` ``[N, D_t]``, ``teacher_embedding``
    ``[V, D_t]``, int ``labels`` ``[N]``, ``omega`` in [0, 1] (may be traced), static ``rho`` > 0,
    optional ``mask`` ``[N]``), plus the static ``k`` in [1, V]; ``block_sizes``: a
    :class:`TopKBlockSizes`.  ``return_parts``: also ``{"ce", "kd", "kl", "correct", "n_greater"}``
    (``kd``/``kl`` on the top-k set; monitoring values, no gradient).  Gradients flow to the
    student's arrays and ``omega``; the teacher's get zero cotangents.
    """
    arrays = {}
    for name, x in (("student_hidden", student_hidden), ("student_embedding", student_embedding),
                    ("teacher_hidden", teacher_hidden), ("teacher_embedding", teacher_embedding)):
        x = float_input(name, x)
        if x.ndim != 2 or 0 in x.shape:
            raise ValueError(f"{name} must be a non-empty 2-D array, got shape {x.shape}")
        arrays[name] = x
    hs, es = arrays["student_hidden"], arrays["student_embedding"]
    ht, et = arrays["teacher_hidden"], arrays["teacher_embedding"]
    if hs.shape[1] != es.shape[1] or ht.shape[1] != et.shape[1]:
        raise ValueError(f"hidden and embedding widths disagree: student {hs.shape} / {es.shape}, "
                         f"teacher {ht.shape} / {et.shape}")
    if hs.shape[0] != ht.shape[0]:
        raise ValueError(f"student_hidden has {hs.shape[0]} tokens, teacher_hidden {ht.shape[0]}")
    if es.shape[0] != et.shape[0]:
        raise ValueError(f"student_embedding has vocab {es.shape[0]}, teacher_embedding {et.shape[0]}")
    k = check_k(k, es.shape[0])
    labels, valid, omega, rho, impl, block_sizes = _common_args(labels, mask, hs.shape[0], omega, rho, impl,
                                                                block_sizes)
    outputs = _loss(hs, es, ht, et, labels, valid, omega, rho, k, impl, interpret, block_sizes)
    return finish_output(outputs, valid, return_parts)
