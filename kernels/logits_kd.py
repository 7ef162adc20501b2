"""Fused KD loss from student and teacher logits (docs/design.md §2): ``salt.kernels.kd_loss``.

(The module is ``logits_kd`` so that the function ``salt.kernels.kd_loss`` does not shadow it; it
also holds the online row statistics that :mod:`salt.kernels.fused_linear_kd` shares.)

Per target position, with student logits ``s``, teacher logits ``t``, label ``y``, weight ``ω``
and teacher temperature ``ρ``::

    lse(s) = log Σ_v exp(s_v)           P = softmax(s)          Q = softmax(ρ·t)
    ce   = lse(s) − s_y                 kd = lse(s) − Σ_v Q_v s_v
    loss = (1−ω)·ce + ω·kd              KL(Q‖P) = kd − H(Q),  H(Q) = lse(ρ·t) − Σ_v Q_v ρ t_v
    ∂loss/∂s = P − (1−ω)·onehot(y) − ω·Q          (no gradient flows to the teacher)

The ``pallas`` and ``xla`` implementations reduce each row, in one online pass over vocabulary
tiles, to seven *row statistics* kept relative to the running maxima (so float32 logits of
magnitude 1e4 lose no precision; see the section comment below), from which the loss and its
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

Why one module of ~590 lines: as in JAX's own Pallas ops, the kernels, their pure-JAX chunked
twin, the naive path, the custom_vjp and the frozen block sizes of one operation live together
so they are read and tested side by side.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from salt.kernels._common import IMPLS, default_impl, resolve_impl  # noqa: F401 (default_impl: public)

_NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class KDBlockSizes:
    """Tile sizes.  ``block_tokens``: rows per Pallas block (multiple of 8; 16 for bf16 is best);
    ``block_vocab``: vocab columns per Pallas block (multiple of 128); ``chunk_vocab``: vocab
    columns per step of the ``xla`` scan."""

    block_tokens: int = 256
    block_vocab: int = 512
    chunk_vocab: int = 2048

    def __post_init__(self):
        if not (isinstance(self.block_tokens, int) and self.block_tokens > 0 and self.block_tokens % 8 == 0):
            raise ValueError(f"block_tokens must be a positive multiple of 8, got {self.block_tokens!r}")
        if not (isinstance(self.block_vocab, int) and self.block_vocab > 0 and self.block_vocab % 128 == 0):
            raise ValueError(f"block_vocab must be a positive multiple of 128, got {self.block_vocab!r}")
        if not (isinstance(self.chunk_vocab, int) and self.chunk_vocab > 0):
            raise ValueError(f"chunk_vocab must be a positive integer, got {self.chunk_vocab!r}")


# ----------------------------------------------------------------------------------------------
# Online row statistics (shared by the Pallas kernels, the xla scans and fused_linear_kd).
#
# All sums are kept RELATIVE to the running maxima so that logits of magnitude 1e4 lose no
# precision in float32: with m_s = max s and m_t = max ρt the statistics of a row are
#   m_s, log_l_s  (lse(s) = m_s + log_l_s),     d_y  = m_s − s_y  (≥ 0),
#   arg = first index of max s,                  n_gt = #{v ≠ y : s_v > θ}  (θ: the label's logit),
#   qs_c = Σ Q·(s − m_s),                        m_t, log_l_t  (lse(ρt) = m_t + log_l_t),
#   qrt_c = Σ Q·(ρt − m_t)
# and  ce = log_l_s + d_y,  kd = log_l_s − qs_c,  H(Q) = log_l_t − qrt_c,  KL = kd − H(Q),
# correct = (arg == y),  y in the top-k  ⇔  n_gt < k.
# Without a teacher (the cross-entropy kernels) only the student statistics exist.
# Statistics travel as dicts keyed by these names (kernel refs are looked up by name too).
# ----------------------------------------------------------------------------------------------

STUDENT_CARRY = ("m_s", "l_s", "s_y", "arg", "n_gt")
TEACHER_CARRY = ("m_t", "l_t", "a_qs", "a_qrt")
STUDENT_STATS = ("m_s", "log_l_s", "d_y", "arg", "n_gt")
TEACHER_STATS = ("m_t", "log_l_t", "qs_c", "qrt_c")


def carry_names(teacher: bool) -> tuple:
    return STUDENT_CARRY + (TEACHER_CARRY if teacher else ())


def stat_names(teacher: bool) -> tuple:
    return STUDENT_STATS + (TEACHER_STATS if teacher else ())


def stats_init(shape, teacher: bool) -> dict:
    """Initial carry for rows of ``shape`` (see :func:`stats_update`)."""
    init = {"m_s": _NEG_INF, "m_t": _NEG_INF}
    return {k: jnp.full(shape, init.get(k, 0.0), jnp.float32) for k in carry_names(teacher)}


def stats_update(carry, s_f32, rt_f32, valid, cols, y, theta):
    """Fold one tile into the running statistics.

    ``s_f32``/``rt_f32``: ``[n, c]`` student logits and ρ·teacher logits (float32, may hold garbage
    where not ``valid``; ``rt_f32`` None without a teacher); ``valid``: broadcastable to ``[n, c]``
    (column inside the vocabulary and not yet counted); ``cols``: int32 column indices
    broadcastable to ``[n, c]``; ``y``/``theta``: ``[n, 1]`` labels and the label's logit (the
    threshold of ``n_gt``).  Carry entries are ``[n, 1]``: running maxima ``m_s``, ``m_t``;
    ``l_s = Σ exp(s − m_s)``; ``l_t = Σ exp(ρt − m_t)``; ``a_qs = Σ exp(ρt − m_t)·(s − m_s)``;
    ``a_qrt = Σ exp(ρt − m_t)·(ρt − m_t)``; ``s_y``; ``arg`` (float32 index of the first maximum);
    ``n_gt`` (float32 count).
    """
    out = {}
    m_s = carry["m_s"]
    s_valid = jnp.where(valid, s_f32, _NEG_INF)
    tile_max = jnp.max(s_valid, axis=1, keepdims=True)
    m_s_new = jnp.maximum(m_s, tile_max)
    cols_f = jnp.broadcast_to(cols, s_f32.shape).astype(jnp.float32)
    tile_arg = jnp.min(jnp.where(s_valid == tile_max, cols_f, jnp.inf), axis=1, keepdims=True)
    out["arg"] = jnp.where(tile_max > m_s, tile_arg, carry["arg"])  # ties: the earlier index stays
    onehot = jnp.logical_and(cols == y, valid)
    above = jnp.logical_and(jnp.logical_and(valid, cols != y), s_f32 > theta)
    out["n_gt"] = carry["n_gt"] + jnp.sum(above.astype(jnp.float32), axis=1, keepdims=True)
    out["s_y"] = carry["s_y"] + jnp.sum(jnp.where(onehot, s_f32, 0.0), axis=1, keepdims=True)
    out["l_s"] = carry["l_s"] * jnp.exp(m_s - m_s_new) + jnp.sum(jnp.exp(s_valid - m_s_new), axis=1,
                                                                 keepdims=True)
    out["m_s"] = m_s_new
    if rt_f32 is None:
        return out
    m_t, l_t = carry["m_t"], carry["l_t"]
    rt_valid = jnp.where(valid, rt_f32, _NEG_INF)
    m_t_new = jnp.maximum(m_t, jnp.max(rt_valid, axis=1, keepdims=True))
    alpha_t = jnp.exp(m_t - m_t_new)
    # shifts of the reference points (0 before the first tile, where the sums are still 0)
    shift_s = jnp.where(m_s == _NEG_INF, 0.0, m_s_new - m_s)
    shift_t = jnp.where(m_t == _NEG_INF, 0.0, m_t_new - m_t)
    p_t = jnp.exp(rt_valid - m_t_new)  # unnormalised teacher probabilities of the tile, 0 if invalid
    s_c = jnp.where(valid, s_f32 - m_s_new, 0.0)
    rt_c = jnp.where(valid, rt_f32 - m_t_new, 0.0)
    out["a_qs"] = (carry["a_qs"] - shift_s * l_t) * alpha_t + jnp.sum(p_t * s_c, axis=1, keepdims=True)
    out["a_qrt"] = (carry["a_qrt"] - shift_t * l_t) * alpha_t + jnp.sum(p_t * rt_c, axis=1, keepdims=True)
    out["l_t"] = l_t * alpha_t + jnp.sum(p_t, axis=1, keepdims=True)
    out["m_t"] = m_t_new
    return out


def stats_finish(carry) -> dict:
    """Carry -> the statistics of the section comment (``STUDENT_STATS`` [+ ``TEACHER_STATS``])."""
    stats = {"m_s": carry["m_s"], "log_l_s": jnp.log(carry["l_s"]), "d_y": carry["m_s"] - carry["s_y"],
             "arg": carry["arg"], "n_gt": carry["n_gt"]}
    if "m_t" in carry:
        stats.update(m_t=carry["m_t"], log_l_t=jnp.log(carry["l_t"]), qs_c=carry["a_qs"] / carry["l_t"],
                     qrt_c=carry["a_qrt"] / carry["l_t"])
    return stats


def merge_stats(a: dict, b: dict) -> dict:
    """Merge the finished row statistics of two disjoint column sets (``m_s, log_l_s, arg, n_gt``
    [+ ``m_t, log_l_t, qs_c, qrt_c``]; ``arg`` in global ids: ties go to the lower id).  ``d_y``
    is not merged (it is ``m_s − θ`` with the exact label logit, set by the caller)."""
    m_s = jnp.maximum(a["m_s"], b["m_s"])
    out = {"m_s": m_s, "n_gt": a["n_gt"] + b["n_gt"],
           "log_l_s": jnp.logaddexp(a["log_l_s"] + (a["m_s"] - m_s), b["log_l_s"] + (b["m_s"] - m_s)),
           "arg": jnp.where(a["m_s"] > b["m_s"], a["arg"],
                            jnp.where(b["m_s"] > a["m_s"], b["arg"], jnp.minimum(a["arg"], b["arg"])))}
    if "m_t" not in a:
        return out
    m_t = jnp.maximum(a["m_t"], b["m_t"])
    wa, wb = a["log_l_t"] + (a["m_t"] - m_t), b["log_l_t"] + (b["m_t"] - m_t)  # log teacher masses
    log_l_t = jnp.logaddexp(wa, wb)
    wa, wb = jnp.exp(wa - log_l_t), jnp.exp(wb - log_l_t)                      # their shares of Q
    out.update(m_t=m_t, log_l_t=log_l_t,
               qs_c=wa * (a["qs_c"] + (a["m_s"] - m_s)) + wb * (b["qs_c"] + (b["m_s"] - m_s)),
               qrt_c=wa * (a["qrt_c"] + (a["m_t"] - m_t)) + wb * (b["qrt_c"] + (b["m_t"] - m_t)))
    return out


def grad_tile(s_f32, rt_f32, onehot, rows):
    """``g_p·P − g_y·onehot − g_q·Q`` for one tile (``rows``: dict of ``[n, 1]`` row vectors
    ``m_s, log_l_s, g_p, g_y`` [+ ``m_t, log_l_t, g_q``]); with ``g_p = g``, ``g_y = (1−ω)·g``,
    ``g_q = ω·g`` this is ``g·(P − (1−ω)·onehot − ω·Q)``; without a teacher ``g·(P − onehot)``."""
    p = jnp.exp((s_f32 - rows["m_s"]) - rows["log_l_s"])
    ds = rows["g_p"] * p - jnp.where(onehot, rows["g_y"], 0.0)
    if rt_f32 is not None:
        ds = ds - rows["g_q"] * jnp.exp((rt_f32 - rows["m_t"]) - rows["log_l_t"])
    # rows with a zero cotangent (masked rows, whose logits may be garbage) get exactly 0
    return jnp.where(nonzero(rows["g_p"]), ds, 0.0)


def nonzero(x):
    """``x != 0`` (True for NaN) spelled as ``not (x == 0)``: Mosaic (libtpu 0.0.42) cannot lower
    the unordered ``!=`` of floats (``arith.cmpf une``) but lowers ``==``."""
    return jnp.logical_not(x == 0.0)


GRAD_ROWS_STATS = ("m_s", "log_l_s", "m_t", "log_l_t")


def grad_rows(stats, g, omega) -> dict:
    """The per-row ``[N]`` inputs of :func:`grad_tile`: the statistics it needs and
    ``(g_p, g_y, g_q) = (g, (1−ω)·g, ω·g)`` (no ``g_q`` and ``ω = 0`` without a teacher)."""
    g = g.astype(jnp.float32)
    rows = {k: stats[k] for k in GRAD_ROWS_STATS if k in stats}
    if "m_t" in stats:
        rows.update(g_p=g, g_y=(1.0 - omega) * g, g_q=omega * g)
    else:
        rows.update(g_p=g, g_y=g)
    return rows


def loss_from_stats(stats, omega):
    """Row statistics -> ``(loss, parts)`` (each ``[N]`` float32, not masked); ``parts`` has
    ``ce``, ``correct`` (1.0 where argmax == label), ``n_greater`` and, with a teacher, ``kd``, ``kl``.
    Without a teacher the loss is ``ce`` (``omega`` is ignored)."""
    ce = stats["log_l_s"] + stats["d_y"]
    parts = {"ce": ce, "n_greater": stats["n_gt"]}
    if "qs_c" not in stats:
        return ce, parts
    kd = stats["log_l_s"] - stats["qs_c"]
    parts.update(kd=kd, kl=kd - (stats["log_l_t"] - stats["qrt_c"]))
    loss = stats["log_l_s"] + (1.0 - omega) * stats["d_y"] - omega * stats["qs_c"]
    return loss, parts


def with_correct(parts, stats, labels_N):
    """Add ``correct`` (float32 1.0 where the first argmax is the label) to ``parts``."""
    return dict(parts, correct=(stats["arg"] == labels_N.astype(jnp.float32)).astype(jnp.float32))


def omega_cotangent(g, stats, omega):
    """``Σ_rows g·∂loss/∂ω = Σ g·(−d_y − qs_c)`` in ``omega``'s dtype and shape."""
    g = g.astype(jnp.float32)
    per_row = jnp.where(g != 0.0, g * (-stats["d_y"] - stats["qs_c"]), 0.0)  # masked rows: garbage stats
    return jnp.sum(per_row).astype(omega.dtype).reshape(omega.shape)


def finish_output(outputs, valid_rows, return_parts):
    """Mask the loss and the parts' rows; parts are monitoring values without gradient."""
    loss, parts = outputs
    loss = jnp.where(valid_rows, loss, 0.0)
    if not return_parts:
        return loss
    parts = {name: lax.stop_gradient(jnp.where(valid_rows, value, 0.0)) for name, value in parts.items()}
    return loss, parts


# ----------------------------------------------------------------------------------------------
# Argument checking shared with fused_linear_kd.
# ----------------------------------------------------------------------------------------------

def check_impl(impl, gpu_kernel: bool = False):
    """The implementation to run (:func:`salt.kernels._common.resolve_impl`); ``gpu_kernel``: the
    caller has a Pallas GPU kernel."""
    return resolve_impl(impl, gpu_kernel=gpu_kernel)


def check_rho(rho) -> float:
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real):
        raise ValueError(f"rho must be a Python number (it is static), got {type(rho).__name__} {rho!r}")
    rho = float(rho)
    if not (rho > 0.0 and math.isfinite(rho)):
        raise ValueError(f"rho must be a finite number > 0, got {rho!r}")
    return rho


def check_omega(omega):
    if isinstance(omega, numbers.Real) and not isinstance(omega, bool):
        if not 0.0 <= float(omega) <= 1.0:
            raise ValueError(f"omega must be in [0, 1], got {omega!r}")
        return float(omega)
    omega = jnp.asarray(omega)
    if omega.ndim != 0:
        raise ValueError(f"omega must be a scalar, got shape {omega.shape}")
    return omega


def check_labels_mask(labels, mask, n_expected_shape):
    labels = jnp.asarray(labels)
    if tuple(labels.shape) != tuple(n_expected_shape):
        raise ValueError(f"labels shape {labels.shape} must equal {tuple(n_expected_shape)}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if mask is None:
        valid = jnp.ones(labels.shape, bool)
    else:
        mask = jnp.asarray(mask)
        if tuple(mask.shape) != tuple(labels.shape):
            raise ValueError(f"mask shape {mask.shape} must equal labels shape {labels.shape}")
        valid = mask.astype(bool) if mask.dtype == bool else mask != 0
    return labels.astype(jnp.int32), valid


def _float_input(name, x):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating array, got dtype {x.dtype}")
    return x


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

def chunk_plan(vocab, chunk):
    """(chunk size, number of chunks); chunk ``j`` covers ``[min(j·c, V−c), +c)`` and counts
    only columns ``>= j·c`` (the last chunk is shifted left instead of padded)."""
    chunk = min(chunk, vocab)
    return chunk, -(-vocab // chunk)


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

ROW_ORDER = ("m_s", "log_l_s", "m_t", "log_l_t", "g_p", "g_y", "g_q")

# Per-row vectors (labels, label logits, statistics, running carries) cross the Pallas boundary
# and live in VMEM scratch LANE-DENSE, as ``[rows, LANES]`` with the value repeated along the
# lanes (JAX's own flash attention keeps its ``l``/``m`` the same way): a ``[rows, 1]`` block
# would be padded to full lanes in VMEM anyway and moved by narrow, strided DMAs.  Kernels
# load a block and use lane 0 (:func:`load_row`) and store a broadcast (:func:`store_row`).
LANES = 128


def to_lanes(x_N):
    """``[N]`` -> the lane-dense ``[N, LANES]`` operand (the value repeated along the lanes)."""
    return jnp.broadcast_to(x_N[:, None], (x_N.shape[0], LANES))


def from_lanes(x_NxL):
    """A lane-dense ``[N, LANES]`` kernel output -> ``[N]``."""
    return x_NxL[:, 0]


def load_row(ref):
    """A lane-dense row block ``[bt, LANES]`` -> the ``[bt, 1]`` column of values."""
    return ref[...][:, :1]


def store_row(ref, value_Bx1):
    """Store a ``[bt, 1]`` column into a lane-dense ``[bt, LANES]`` block (repeated along lanes)."""
    ref[...] = jnp.broadcast_to(value_Bx1, ref.shape).astype(ref.dtype)


def row_spec(block_tokens, token_axis=0):
    """BlockSpec of a lane-dense per-row ``[N, LANES]`` operand on a 2-D grid whose axis
    ``token_axis`` walks rows."""
    if token_axis == 0:
        return pl.BlockSpec((block_tokens, LANES), lambda i, j: (i, 0))
    return pl.BlockSpec((block_tokens, LANES), lambda j, i: (i, 0))


def row_scratch(block_tokens, n_rows):
    """``n_rows`` lane-dense float32 VMEM scratch blocks ``[block_tokens, LANES]``."""
    return [pltpu.VMEM((block_tokens, LANES), jnp.float32)] * n_rows


def row_outputs(n, n_rows):
    """Shapes of ``n_rows`` lane-dense float32 per-row outputs ``[N, LANES]``."""
    return [jax.ShapeDtypeStruct((n, LANES), jnp.float32)] * n_rows


def ordered_rows(rows: dict) -> tuple:
    """``(names, lane-dense [N, LANES] float32 operands)`` of the backward's row inputs, in
    :data:`ROW_ORDER`."""
    names = tuple(k for k in ROW_ORDER if k in rows)
    return names, tuple(to_lanes(rows[k].astype(jnp.float32)) for k in names)


def bind(refs, *groups):
    """A kernel's positional refs as one dict per group of names (the groups in call order)."""
    out, i = [], 0
    for names in groups:
        out.append(dict(zip(names, refs[i:i + len(names)])))
        i += len(names)
    if i != len(refs):
        raise ValueError(f"kernel got {len(refs)} refs, the names account for {i}")
    return out


def stats_kernel_step(s, rt, ins, outs, acc, *, vocab, block_vocab):
    """Body of a forward statistics kernel on the grid (token blocks, vocab blocks ``"arbitrary"``),
    given the tile's float32 logits ``s`` and ``rt = ρ·t`` (``[bt, bv]``; ``rt`` None without a
    teacher).  ``ins`` holds the ``"y"`` and ``"theta"`` refs; ``outs`` the statistic output refs
    and ``acc`` the VMEM scratch refs of the running carry, by name (all lane-dense
    ``[bt, LANES]``)."""
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        for name, value in stats_init((s.shape[0], 1), teacher=rt is not None).items():
            store_row(acc[name], value)

    cols = j * block_vocab + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    carry = stats_update({k: load_row(r) for k, r in acc.items()}, s, rt, cols < vocab, cols,
                         load_row(ins["y"]), load_row(ins["theta"]))
    for name, value in carry.items():
        store_row(acc[name], value)

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        for name, value in stats_finish({k: load_row(r) for k, r in acc.items()}).items():
            store_row(outs[name], value)


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


def fwd_flops(n, vocab):
    """Analytic flop count of the forward statistics: ~20 elementwise flops per logit pair."""
    return 20 * n * vocab


def bwd_flops(n, vocab):
    """Analytic flop count of the backward tile: ~10 elementwise flops per logit pair."""
    return 10 * n * vocab


def _blocks(n, vocab, bs: KDBlockSizes):
    block_tokens = min(bs.block_tokens, -(-n // 16) * 16)  # 16: bf16 sublane packing
    block_vocab = min(bs.block_vocab, -(-vocab // 128) * 128)
    return block_tokens, block_vocab


def _stats_pallas(s_NxV, t_NxV, y_N, rho, block_sizes, interpret):
    n, vocab = s_NxV.shape
    bt, bv = _blocks(n, vocab, block_sizes)
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
    bt, bv = _blocks(n, vocab, block_sizes)
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


def _outputs(stats, y_N, omega):
    loss, parts = loss_from_stats(stats, omega)
    return loss, with_correct(parts, stats, y_N)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _loss_core(s_NxV, t_NxV, y_N, omega, rho, cfg):
    return _outputs(_stats(s_NxV, t_NxV, y_N, rho, cfg), y_N, omega)


def _loss_core_fwd(s_NxV, t_NxV, y_N, omega, rho, cfg):
    stats = _stats(s_NxV, t_NxV, y_N, rho, cfg)
    return _outputs(stats, y_N, omega), (s_NxV, t_NxV, y_N, omega, stats)


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
    student_logits = _float_input("student_logits", student_logits)
    teacher_logits = _float_input("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits shape {student_logits.shape} != teacher_logits shape "
                         f"{teacher_logits.shape}")
    if student_logits.ndim < 1 or student_logits.shape[-1] < 1:
        raise ValueError(f"logits need a non-empty vocabulary axis, got shape {student_logits.shape}")
    lead_shape = student_logits.shape[:-1]
    labels, valid = check_labels_mask(labels, mask, lead_shape)
    omega = check_omega(omega)
    impl = check_impl(impl)
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
