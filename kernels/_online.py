"""The online row statistics every fused loss is built on (docs/design.md §2 maths): the online
log-sum-exp (:func:`lse_step`), the running max / sum-exp / ``Q``-weighted sums of a row folded tile
by tile (:func:`stats_update`), their merge across disjoint column sets (:func:`merge_stats`), the
loss and monitoring parts they give (:func:`loss_and_parts`) and the gradient tile recomputed from
them (:func:`grad_tile`).

Users: the logits loss (:mod:`salt.kernels.logits_kd`), the fused-linear KD / CE loss
(:mod:`salt.kernels.fused_linear_kd`: its xla scan, its Pallas TPU kernels and the Pallas GPU
kernels of :mod:`salt.kernels.fused_linear_kd_gpu`), its vocabulary-parallel form
(:mod:`salt.kernels.vocab_parallel`) and the teacher's top-k (:mod:`salt.kernels.topk_kd`,
:mod:`salt.kernels.topk_pallas`: :func:`lse_step`).  The code is the same on every path, so the
Pallas kernels, the GPU kernels and the xla scans agree to rounding by construction.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from salt.kernels._common import load_row, store_row, to_lanes

_NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------
# Online row statistics (the Pallas TPU and GPU kernels and the xla scans of every fused loss).
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


def lse_step(m, l, x):
    """One tile of the online log-sum-exp: the running max ``m`` and ``l = Σ exp(x − m)`` (both
    ``[..., 1]``) updated with the tile ``x`` ``[..., c]`` (``-inf`` where a column does not count);
    ``lse = m + log(l)`` at the end.  ``m`` starts at ``-inf``, ``l`` at 0."""
    m_new = jnp.maximum(m, jnp.max(x, axis=-1, keepdims=True))
    return m_new, l * jnp.exp(m - m_new) + jnp.sum(jnp.exp(x - m_new), axis=-1, keepdims=True)


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
    m_s_new, out["l_s"] = lse_step(m_s, carry["l_s"], s_valid)
    cols_f = jnp.broadcast_to(cols, s_f32.shape).astype(jnp.float32)
    tile_arg = jnp.min(jnp.where(s_valid == tile_max, cols_f, jnp.inf), axis=1, keepdims=True)
    out["arg"] = jnp.where(tile_max > m_s, tile_arg, carry["arg"])  # ties: the earlier index stays
    onehot = jnp.logical_and(cols == y, valid)
    above = jnp.logical_and(jnp.logical_and(valid, cols != y), s_f32 > theta)
    out["n_gt"] = carry["n_gt"] + jnp.sum(above.astype(jnp.float32), axis=1, keepdims=True)
    out["s_y"] = carry["s_y"] + jnp.sum(jnp.where(onehot, s_f32, 0.0), axis=1, keepdims=True)
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


def loss_and_parts(stats, labels_N, omega):
    """:func:`loss_from_stats` with ``correct`` (float32 1.0 where the first argmax is the label)
    added to the parts: the outputs of every fused loss's ``custom_vjp`` core."""
    loss, parts = loss_from_stats(stats, omega)
    return loss, dict(parts, correct=(stats["arg"] == labels_N.astype(jnp.float32)).astype(jnp.float32))


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


# The backward's per-row inputs (:func:`grad_rows`) in the order they are passed to a kernel.
ROW_ORDER = ("m_s", "log_l_s", "m_t", "log_l_t", "g_p", "g_y", "g_q")


def ordered_rows(rows: dict) -> tuple:
    """``(names, lane-dense [N, LANES] float32 operands)`` of the backward's row inputs, in
    :data:`ROW_ORDER`."""
    names = tuple(k for k in ROW_ORDER if k in rows)
    return names, tuple(to_lanes(rows[k].astype(jnp.float32)) for k in names)


# ----------------------------------------------------------------------------------------------
# The vocabulary walk of the xla scans and the body of the Pallas TPU forward kernels.
# ----------------------------------------------------------------------------------------------

def chunk_plan(vocab, chunk):
    """(chunk size, number of chunks); chunk ``j`` covers ``[min(j·c, V−c), +c)`` and counts
    only columns ``>= j·c`` (the last chunk is shifted left instead of padded)."""
    chunk = min(chunk, vocab)
    return chunk, -(-vocab // chunk)


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


def fwd_flops(n, vocab):
    """Analytic flop count of the forward statistics: ~20 elementwise flops per logit pair."""
    return 20 * n * vocab


def bwd_flops(n, vocab):
    """Analytic flop count of the backward tile: ~10 elementwise flops per logit pair."""
    return 10 * n * vocab
