"""Fused KD loss from student and teacher logits (docs/design.md §2): ``salt.kernels.kd_loss``.

(The module is ``logits_kd`` so that the function ``salt.kernels.kd_loss`` does not shadow it.  The
online row statistics it reduces each row to are those of every fused loss:
:mod:`salt.kernels._online`.)

Per target position, with student logits ``s``, teacher logits ``t``, label ``y``, weight ``ω``
and teacher temperature ``ρ``::

    lse(s) = log Σ_v exp(s_v)           P = softmax(s)          Q = softmax(ρ·t)
    ce   = lse(s) − s_y                 kd = lse(s) − Σ_v Q_v s_v
    loss = (1−ω)·ce + ω·kd              KL(Q‖P) = kd − H(Q),  H(Q) = lse(ρ·t) − Σ_v Q_v ρ t_v
    ∂loss/∂s = P − (1−ω)·onehot(y) − ω·Q          (no gradient flows to the teacher)

The ``pallas`` and ``xla`` implementations reduce each row, in one online pass over vocabulary
tiles, to seven *row statistics* kept relative to the running maxima (so float32 logits of
magnitude 1e4 lose no precision; see :mod:`salt.kernels._online`), from which the loss and its
monitoring parts are cheap combinations.  ``(loss, ce, kd, kl)`` carry a ``custom_vjp`` whose
backward recomputes ``P`` and ``Q`` tile by tile from the saved statistics and returns
``g·(P − (1−ω)·onehot − ω·Q)`` for the student logits, ``Σ g·(s_y − Σ Q·s)`` for ``omega``, and a
ZERO cotangent for the teacher logits (the teacher is a fixed target).  ``ce``/``kd``/``kl`` are
monitoring values: their cotangents are ignored (they are returned under ``stop_gradient``).

Implementations (``impl=``):

* ``"pallas"``: Pallas TPU (Mosaic) kernels.  Forward grid (token blocks, vocab blocks) with the
  vocab axis ``"arbitrary"`` and VMEM scratch holding, per row, the running max and sum-exp of both
  distributions and the running ``Q``-weighted sums (online softmax, rescaled whenever a max
  grows); no row of probabilities is ever stored.  Backward grid (token blocks, vocab blocks), both
  ``"parallel"``, recomputes ``P`` and ``Q`` tile by tile from the saved statistics.  Ragged token and
  vocab counts are handled by masking (invalid columns get ``-inf``; invalid rows are dropped).
  ``interpret=True`` (or a ``pltpu.InterpretParams``) runs them on the CPU.
* ``"xla"``: pure JAX; a ``lax.scan`` over vocabulary chunks with the same online maths (the last
  chunk is shifted left to end at ``V`` and its already-counted columns are masked, so nothing is
  padded or copied); the backward is one fused elementwise pass.
* ``"naive"``: the textbook formulas with full ``[N, V]`` softmaxes and autodiff (:func:`loss_naive`,
  the project's one full-logits path: the cross-check of the others).

``omega`` may be a traced scalar (the trainer changes ω per step inside one compiled step);
``rho`` must be a Python number (static: it is baked into the kernels).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from salt.kernels._checks import check_labels_mask, check_omega, check_rho, float_input
from salt.kernels._common import (LANES, SUBLANES, bind, check_block, choose_blocks,
                                  default_impl,  # noqa: F401 (public: the impl of ``impl=None``)
                                  from_lanes, load_row, resolve_impl, row_outputs, row_scratch, row_spec,
                                  to_lanes)
from salt.kernels._online import (bwd_flops, fwd_flops,  # noqa: F401 (public: the op's flop estimates)
                                  carry_names, chunk_plan, finish_output, grad_rows, grad_tile,
                                  loss_and_parts, omega_cotangent, ordered_rows, stat_names, stats_finish,
                                  stats_init, stats_kernel_step, stats_update)


@dataclasses.dataclass(frozen=True)
class KDBlockSizes:
    """Tile sizes.  ``block_tokens``: rows per Pallas block (multiple of 8, the TPU tiling:
    :func:`salt.kernels._common.check_block`; 16 fills bfloat16's packed tiles);
    ``block_vocab``: vocab columns per Pallas block (multiple of 128); ``chunk_vocab``: vocab
    columns per step of the ``xla`` scan."""

    block_tokens: int = 256
    block_vocab: int = 512
    chunk_vocab: int = 2048

    def __post_init__(self):
        check_block("block_tokens", self.block_tokens, SUBLANES, optional=False)
        check_block("block_vocab", self.block_vocab, LANES, optional=False)
        if not (isinstance(self.chunk_vocab, int) and self.chunk_vocab > 0):
            raise ValueError(f"chunk_vocab must be a positive integer, got {self.chunk_vocab!r}")


# ----------------------------------------------------------------------------------------------
# naive: THE plain full-logits path (also used by fused_linear_kd's "naive" and the runtime's
# ``--kernels naive`` cross-check)
# ----------------------------------------------------------------------------------------------

def loss_naive(s_NxV, t_NxV, y_N, omega, rho):
    """Textbook ``(loss, parts)`` with full ``[N, V]`` log-softmaxes (autodiff gradient).
    ``t_NxV`` None: the cross-entropy alone (loss = ce; parts ``ce, correct, n_greater``)."""
    s = s_NxV.astype(jnp.float32)
    log_p = jax.nn.log_softmax(s, axis=-1)
    onehot = jnp.arange(s.shape[1])[None, :] == y_N[:, None]
    ce = -jnp.sum(jnp.where(onehot, log_p, 0.0), axis=-1)
    s_const = lax.stop_gradient(s)
    s_y = jnp.sum(jnp.where(onehot, s_const, 0.0), axis=-1, keepdims=True)
    parts = {"ce": ce, "correct": (jnp.argmax(s_const, axis=-1) == y_N).astype(jnp.float32),
             "n_greater": jnp.sum((s_const > s_y) & ~onehot, axis=-1).astype(jnp.float32)}
    if t_NxV is None:
        return ce, parts
    log_q = jax.nn.log_softmax(rho * lax.stop_gradient(t_NxV).astype(jnp.float32), axis=-1)
    q = jnp.exp(log_q)
    kd = -jnp.sum(q * log_p, axis=-1)
    parts.update(kd=kd, kl=jnp.sum(q * (log_q - log_p), axis=-1))
    return (1.0 - omega) * ce + omega * kd, parts


# ----------------------------------------------------------------------------------------------
# xla: scan over vocab chunks
# ----------------------------------------------------------------------------------------------

def label_logit(s_NxV, y_N):
    """``s[n, y_n]`` in float32 (clipped index: masked rows may hold any label)."""
    return jnp.take_along_axis(s_NxV, y_N[:, None], axis=1, mode="clip")[:, 0].astype(jnp.float32)


def _stats_xla(s_NxV, t_NxV, y_N, rho, chunk):
    n, vocab = s_NxV.shape
    chunk, n_chunks = chunk_plan(vocab, chunk)
    y_Nx1, theta_Nx1 = y_N[:, None], label_logit(s_NxV, y_N)[:, None]

    def body(carry, j):
        start = jnp.minimum(j * chunk, vocab - chunk)
        s_c = lax.dynamic_slice_in_dim(s_NxV, start, chunk, axis=1).astype(jnp.float32)
        rt_c = rho * lax.dynamic_slice_in_dim(t_NxV, start, chunk, axis=1).astype(jnp.float32)
        cols_1xC = start + lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
        return stats_update(carry, s_c, rt_c, cols_1xC >= j * chunk, cols_1xC, y_Nx1, theta_Nx1), None

    carry, _ = lax.scan(body, stats_init((n, 1), teacher=True), jnp.arange(n_chunks))
    return {k: v[:, 0] for k, v in stats_finish(carry).items()}


def _grad_xla(s_NxV, t_NxV, y_N, rows, rho, chunk):
    """One fused elementwise pass (the result is [N, V] anyway; nothing else of that size)."""
    del chunk
    onehot = jnp.arange(s_NxV.shape[1])[None, :] == y_N[:, None]
    ds = grad_tile(s_NxV.astype(jnp.float32), rho * t_NxV.astype(jnp.float32), onehot,
                   {k: v[:, None] for k, v in rows.items()})
    return ds.astype(s_NxV.dtype)


# ----------------------------------------------------------------------------------------------
# pallas (TPU / Mosaic)
# ----------------------------------------------------------------------------------------------

def _fwd_kernel(*refs, rho, vocab, block_vocab):
    ins, outs, acc = bind(refs, ("s", "t", "y", "theta"), stat_names(True), carry_names(True))
    s = ins["s"][...].astype(jnp.float32)
    rt = rho * ins["t"][...].astype(jnp.float32)
    stats_kernel_step(s, rt, ins, outs, acc, vocab=vocab, block_vocab=block_vocab)


def _bwd_kernel(*refs, row_names, rho, vocab, n_tokens, block_tokens, block_vocab):
    ins, rows, outs = bind(refs, ("s", "t", "y"), row_names, ("ds",))
    i, j = pl.program_id(0), pl.program_id(1)
    s = ins["s"][...].astype(jnp.float32)
    rt = rho * ins["t"][...].astype(jnp.float32)
    cols = j * block_vocab + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    row_ids = i * block_tokens + lax.broadcasted_iota(jnp.int32, s.shape, 0)
    ds = grad_tile(s, rt, cols == load_row(ins["y"]), {k: load_row(r) for k, r in rows.items()})
    outs["ds"][...] = jnp.where((cols < vocab) & (row_ids < n_tokens), ds, 0.0).astype(outs["ds"].dtype)


def _stats_pallas(s_NxV, t_NxV, y_N, rho, block_sizes, interpret):
    n, vocab = s_NxV.shape
    bt, bv = choose_blocks(n, vocab, block_sizes.block_tokens, block_sizes.block_vocab)
    tile_spec = pl.BlockSpec((bt, bv), lambda i, j: (i, j))
    in_bytes = s_NxV.size * s_NxV.dtype.itemsize + t_NxV.size * t_NxV.dtype.itemsize
    names = stat_names(True)
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, rho=rho, vocab=vocab, block_vocab=bv),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0, grid=(pl.cdiv(n, bt), pl.cdiv(vocab, bv)),
            in_specs=[tile_spec, tile_spec, row_spec(bt), row_spec(bt)],
            out_specs=[row_spec(bt)] * len(names),
            scratch_shapes=row_scratch(bt, len(carry_names(True)))),
        out_shape=row_outputs(n, len(names)),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(flops=int(fwd_flops(n, vocab)), transcendentals=int(2 * n * vocab),
                                      bytes_accessed=int(in_bytes + 4 * LANES * (2 + len(names)) * n)),
        interpret=interpret,
        name="kd_loss_fwd",
    )(s_NxV, t_NxV, to_lanes(y_N), to_lanes(label_logit(s_NxV, y_N)))
    return {k: from_lanes(o) for k, o in zip(names, outs)}


def _grad_pallas(s_NxV, t_NxV, y_N, rows, rho, block_sizes, interpret):
    n, vocab = s_NxV.shape
    bt, bv = choose_blocks(n, vocab, block_sizes.block_tokens, block_sizes.block_vocab)
    tile_spec = pl.BlockSpec((bt, bv), lambda i, j: (i, j))
    nbytes = 2 * s_NxV.size * s_NxV.dtype.itemsize + t_NxV.size * t_NxV.dtype.itemsize
    row_names, row_operands = ordered_rows(rows)
    return pl.pallas_call(
        functools.partial(_bwd_kernel, row_names=row_names, rho=rho, vocab=vocab, n_tokens=n,
                          block_tokens=bt, block_vocab=bv),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0, grid=(pl.cdiv(n, bt), pl.cdiv(vocab, bv)),
            in_specs=[tile_spec, tile_spec] + [row_spec(bt)] * (1 + len(row_names)),
            out_specs=tile_spec),
        out_shape=jax.ShapeDtypeStruct(s_NxV.shape, s_NxV.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        cost_estimate=pl.CostEstimate(flops=int(bwd_flops(n, vocab)), transcendentals=int(2 * n * vocab),
                                      bytes_accessed=int(nbytes + 4 * LANES * (1 + len(row_names)) * n)),
        interpret=interpret,
        name="kd_loss_bwd",
    )(s_NxV, t_NxV, to_lanes(y_N), *row_operands)


# ----------------------------------------------------------------------------------------------
# custom_vjp core: (loss, parts) per row; gradient to the student logits and omega only
# ----------------------------------------------------------------------------------------------

def _stats(s_NxV, t_NxV, y_N, rho, cfg):
    impl, block_sizes, interpret = cfg
    if impl == "xla":
        return _stats_xla(s_NxV, t_NxV, y_N, rho, block_sizes.chunk_vocab)
    return _stats_pallas(s_NxV, t_NxV, y_N, rho, block_sizes, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _loss_core(s_NxV, t_NxV, y_N, omega, rho, cfg):
    return loss_and_parts(_stats(s_NxV, t_NxV, y_N, rho, cfg), y_N, omega)


def _loss_core_fwd(s_NxV, t_NxV, y_N, omega, rho, cfg):
    stats = _stats(s_NxV, t_NxV, y_N, rho, cfg)
    return loss_and_parts(stats, y_N, omega), (s_NxV, t_NxV, y_N, omega, stats)


def _loss_core_bwd(rho, cfg, res, cotangents):
    s_NxV, t_NxV, y_N, omega, stats = res
    g = cotangents[0]  # the parts are monitoring values: their cotangents are ignored
    rows = grad_rows(stats, g, omega)
    impl, block_sizes, interpret = cfg
    if impl == "xla":
        ds = _grad_xla(s_NxV, t_NxV, y_N, rows, rho, block_sizes.chunk_vocab)
    else:
        ds = _grad_pallas(s_NxV, t_NxV, y_N, rows, rho, block_sizes, interpret)
    # No gradient flows to the teacher: its cotangent is zero by definition.
    return ds, jnp.zeros_like(t_NxV), None, omega_cotangent(g, stats, omega)


_loss_core.defvjp(_loss_core_fwd, _loss_core_bwd)


# ----------------------------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------------------------

def kd_loss(student_logits, teacher_logits, labels, omega, rho, mask=None, *, impl=None, interpret=False,
            block_sizes=None, return_parts=False):
    """Per-position KD loss ``(1−ω)·ce + ω·kd`` (docs/design.md §2), float32, shape of ``labels``.

    Args:
      student_logits, teacher_logits: ``[..., V]`` floating arrays (float32 or bfloat16; math is f32).
        Must be finite at unmasked positions.
      labels: integer ``[...]``; must be in ``[0, V)`` wherever ``mask`` is true (not checked:
        values may be traced; an out-of-range label contributes ``s_y = 0``).
      omega: distillation weight in [0, 1]; a Python number or a (possibly traced) scalar.
      rho: teacher temperature multiplier (``Q = softmax(ρ·t)``), a Python number > 0 (static).
      mask: optional ``[...]`` bool/0-1 array; masked positions give loss 0 and zero gradient.
      impl: "pallas" | "xla" | "naive"; None = "pallas" on TPU, "xla" elsewhere.
      interpret: for "pallas": False, True or a ``pltpu.InterpretParams`` (run on the CPU).
      block_sizes: a :class:`KDBlockSizes`.
      return_parts: also return ``{"ce", "kd", "kl", "correct", "n_greater"}`` per position
        (monitoring; no gradient): ``correct`` is 1.0 where the (first) argmax of the student
        logits is the label, ``n_greater`` the number of logits strictly above the label's.

    Gradient (``jax.grad``): w.r.t. ``student_logits`` ``(P − (1−ω)·onehot − ω·Q)·cotangent``;
    w.r.t. ``omega`` ``(s_y − Σ Q·s)·cotangent``; the teacher logits get a ZERO cotangent (no
    gradient flows to the teacher).  The reduction is the caller's: docs/design.md's mean over valid
    positions is ``loss.sum() / mask.sum()``.
    """
    student_logits = float_input("student_logits", student_logits)
    teacher_logits = float_input("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits shape {student_logits.shape} != teacher_logits shape "
                         f"{teacher_logits.shape}")
    if student_logits.ndim < 1 or student_logits.shape[-1] < 1:
        raise ValueError(f"logits need a non-empty vocabulary axis, got shape {student_logits.shape}")
    lead_shape = student_logits.shape[:-1]
    labels, valid = check_labels_mask(labels, mask, lead_shape)
    omega = check_omega(omega)
    impl = resolve_impl(impl)
    rho = check_rho(rho)
    block_sizes = KDBlockSizes() if block_sizes is None else block_sizes
    if not isinstance(block_sizes, KDBlockSizes):
        raise ValueError(f"block_sizes must be a KDBlockSizes, got {type(block_sizes).__name__}")
    vocab = student_logits.shape[-1]
    n = math.prod(lead_shape)
    s_NxV = student_logits.reshape(n, vocab)
    t_NxV = teacher_logits.reshape(n, vocab)
    y_N = labels.reshape(n)
    omega = jnp.asarray(omega, jnp.float32)
    if impl == "naive":
        keep_Nx1 = valid.reshape(n, 1)  # masked rows may hold garbage: zero them (naive is [N, V] anyway)
        outputs = loss_naive(jnp.where(keep_Nx1, s_NxV, 0), jnp.where(keep_Nx1, t_NxV, 0), y_N, omega, rho)
    else:
        outputs = _loss_core(s_NxV, t_NxV, y_N, omega, rho, (impl, block_sizes, interpret))
    out = finish_output(outputs, valid.reshape(n), return_parts)
    if return_parts:
        loss, parts = out
        return loss.reshape(lead_shape), {k: v.reshape(lead_shape) for k, v in parts.items()}
    return out.reshape(lead_shape)
