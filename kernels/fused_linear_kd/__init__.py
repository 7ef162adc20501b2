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

* ``"pallas"`` (TPU/Mosaic, :mod:`.tpu`): a forward kernel for the statistics; backward = two
  kernels (``d h_s`` and ``d E_s``) that both recompute the logit tiles.
* ``"pallas_gpu"`` (GPU/Triton, :mod:`salt.kernels.fused_linear_kd_gpu`): the forward statistics
  in one kernel; the backward writes ``dS`` per chunk of token rows from a second kernel and leaves
  the two gradient matmuls to XLA (docs/gpu.md).
* ``"xla"`` (:mod:`.xla`): ``lax.scan`` over vocabulary chunks (forward: statistics; backward:
  recompute the chunk's logits, accumulate ``d h_s`` and add the chunk's ``d E_s`` rows in place).
* ``"naive"``: full logits + :func:`salt.kernels.logits_kd.loss_naive`, autodiff.

:func:`fused_linear_ce_loss` is the same family without a teacher (the standard step, ``salt
score``, ``salt eval``): the teacher's matmul, statistics and ``Q`` term are left out.

The package, in the style of JAX's Pallas ops: :mod:`.common` (block sizes, flop counts, the
label logit), :mod:`.xla` (the chunked scans), :mod:`.tpu` (the Mosaic kernels, their VMEM
estimate and block choice); here the naive path, the ``custom_vjp`` and the entry points.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from salt.kernels import _online
from salt.kernels import fused_linear_kd_gpu as _gpu
from salt.kernels._checks import check_labels_mask, check_omega, check_rho, float_input
from salt.kernels._common import GPU_IMPL, resolve_impl
from salt.kernels.fused_linear_kd import tpu, xla
from salt.kernels.fused_linear_kd.common import (FusedKDBlockSizes, analytic_flops,  # noqa: F401 (public)
                                                 dims, label_logit)
from salt.kernels.logits_kd import loss_naive


def _loss_naive(hs, es, teacher, y, omega, rho):
    s = jnp.dot(hs, es.T, preferred_element_type=jnp.float32)
    t = None if teacher is None else jnp.dot(teacher[0], teacher[1].T, preferred_element_type=jnp.float32)
    return loss_naive(s, t, y, omega, rho)


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
        return xla.stats(hs, es, teacher, y, rho, block_sizes.chunk_vocab, theta, block_sizes.xla_block_tokens)
    if impl == GPU_IMPL:
        theta = label_logit(hs, es, y) if theta is None else theta
        return _gpu.stats(hs, es, teacher, y, theta, rho, _gpu_blocks(hs, es, teacher, block_sizes), interpret)
    return tpu.stats(hs, es, teacher, y, rho, block_sizes, interpret, theta)


def row_grads(hs, es, teacher, y, rows, rho, cfg, f32_out=False):
    """``(d hs, d es)`` from the rows of :func:`salt.kernels._online.grad_rows` (``f32_out``:
    float32 gradients, else in the inputs' dtypes); arguments as :func:`row_stats`."""
    impl, block_sizes, interpret = cfg
    if impl == "xla":
        return xla.grad_blocked(functools.partial(xla.grad_rows, rho=rho, chunk=block_sizes.chunk_vocab),
                                hs, es, teacher, y, rows, f32_out, block_sizes.xla_block_tokens)
    if impl == GPU_IMPL:
        blk = _gpu_blocks(hs, es, teacher, block_sizes)
        return xla.grad_blocked(functools.partial(_gpu.grad_rows_block, rho=rho, blk=blk, interpret=interpret),
                                hs, es, teacher, y, rows, f32_out, blk.chunk)
    return tpu.grads(hs, es, teacher, y, rows, rho, block_sizes, interpret, f32_out)


def _gpu_blocks(hs, es, teacher, block_sizes):
    n, vocab, d_s, d_t = dims(hs, es, teacher)
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
