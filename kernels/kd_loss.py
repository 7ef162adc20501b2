"""Fused KD loss from student and teacher logits (docs/design.md §2).

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
* ``"naive"``: the textbook formulas with full ``[N, V]`` softmaxes and autodiff.  For tests/benches.

``omega`` may be a traced scalar (the trainer changes ω per step inside one compiled step);
``rho`` must be a Python number (static: it is baked into the kernels).
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

IMPLS = ("pallas", "xla", "naive")
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
#   qs_c = Σ Q·(s − m_s),                        m_t, log_l_t  (lse(ρt) = m_t + log_l_t),
#   qrt_c = Σ Q·(ρt − m_t)
# and  ce = log_l_s + d_y,  kd = log_l_s − qs_c,  H(Q) = log_l_t − qrt_c,  KL = kd − H(Q).
# ----------------------------------------------------------------------------------------------

N_STATS = 7


def stats_init(shape):
    """Initial carry ``(m_s, l_s, m_t, l_t, a_qs, a_qrt, s_y)`` for rows of ``shape``."""
    neg = jnp.full(shape, _NEG_INF, jnp.float32)
    zero = jnp.zeros(shape, jnp.float32)
    return (neg, zero, neg, zero, zero, zero, zero)


def stats_update(carry, s_f32, rt_f32, valid, onehot):
    """Fold one tile into the running statistics.

    ``s_f32``/``rt_f32``: ``[n, c]`` student logits and ρ·teacher logits (float32, may hold garbage
    where not ``valid``); ``valid``: broadcastable to ``[n, c]`` (column inside the vocabulary and
    not yet counted); ``onehot``: ``[n, c]`` bool, column == label.  Carry entries are ``[n, 1]``:
    running maxima ``m_s``, ``m_t``; ``l_s = Σ exp(s − m_s)``; ``l_t = Σ exp(ρt − m_t)``;
    ``a_qs = Σ exp(ρt − m_t)·(s − m_s)``; ``a_qrt = Σ exp(ρt − m_t)·(ρt − m_t)``; ``s_y``.
    """
    m_s, l_s, m_t, l_t, a_qs, a_qrt, s_y = carry
    s_valid = jnp.where(valid, s_f32, _NEG_INF)
    rt_valid = jnp.where(valid, rt_f32, _NEG_INF)
    m_s_new = jnp.maximum(m_s, jnp.max(s_valid, axis=1, keepdims=True))
    m_t_new = jnp.maximum(m_t, jnp.max(rt_valid, axis=1, keepdims=True))
    alpha_s = jnp.exp(m_s - m_s_new)
    alpha_t = jnp.exp(m_t - m_t_new)
    # shifts of the reference points (0 before the first tile, where the sums are still 0)
    shift_s = jnp.where(m_s == _NEG_INF, 0.0, m_s_new - m_s)
    shift_t = jnp.where(m_t == _NEG_INF, 0.0, m_t_new - m_t)
    p_t = jnp.exp(rt_valid - m_t_new)  # unnormalised teacher probabilities of the tile, 0 if invalid
    s_c = jnp.where(valid, s_f32 - m_s_new, 0.0)
    rt_c = jnp.where(valid, rt_f32 - m_t_new, 0.0)
    l_s = l_s * alpha_s + jnp.sum(jnp.exp(s_valid - m_s_new), axis=1, keepdims=True)
    a_qs = (a_qs - shift_s * l_t) * alpha_t + jnp.sum(p_t * s_c, axis=1, keepdims=True)
    a_qrt = (a_qrt - shift_t * l_t) * alpha_t + jnp.sum(p_t * rt_c, axis=1, keepdims=True)
    l_t = l_t * alpha_t + jnp.sum(p_t, axis=1, keepdims=True)
    s_y = s_y + jnp.sum(jnp.where(jnp.logical_and(onehot, valid), s_f32, 0.0), axis=1, keepdims=True)
    return (m_s_new, l_s, m_t_new, l_t, a_qs, a_qrt, s_y)


def stats_finish(carry):
    """Carry -> ``(m_s, log_l_s, d_y, qs_c, m_t, log_l_t, qrt_c)`` (see the section comment)."""
    m_s, l_s, m_t, l_t, a_qs, a_qrt, s_y = carry
    return (m_s, jnp.log(l_s), m_s - s_y, a_qs / l_t, m_t, jnp.log(l_t), a_qrt / l_t)


def grad_tile(s_f32, rt_f32, onehot, m_s, log_l_s, m_t, log_l_t, g_p, g_y, g_q):
    """``g_p·P − g_y·onehot − g_q·Q`` for one tile (row vectors ``[n, 1]``); with ``g_p = g``,
    ``g_y = (1−ω)·g``, ``g_q = ω·g`` this is ``g·(P − (1−ω)·onehot − ω·Q)``."""
    p = jnp.exp((s_f32 - m_s) - log_l_s)
    q = jnp.exp((rt_f32 - m_t) - log_l_t)
    ds = g_p * p - g_q * q - jnp.where(onehot, g_y, 0.0)
    # rows with a zero cotangent (masked rows, whose logits may be garbage) get exactly 0
    return jnp.where(g_p != 0.0, ds, 0.0)


def loss_from_stats(stats, omega):
    """Row statistics -> ``(loss, ce, kd, kl)`` (each ``[N]`` float32, not masked)."""
    m_s, log_l_s, d_y, qs_c, m_t, log_l_t, qrt_c = stats
    ce = log_l_s + d_y
    kd = log_l_s - qs_c
    kl = kd - (log_l_t - qrt_c)
    loss = log_l_s + (1.0 - omega) * d_y - omega * qs_c
    return loss, ce, kd, kl


def grad_coefficients(g, omega):
    """Per-row ``(g_p, g_y, g_q) = (g, (1−ω)·g, ω·g)`` as float32 ``[N]``."""
    g = g.astype(jnp.float32)
    return g, (1.0 - omega) * g, omega * g


def omega_cotangent(g, stats, omega):
    """``Σ_rows g·∂loss/∂ω = Σ g·(−d_y − qs_c)`` in ``omega``'s dtype and shape."""
    _, _, d_y, qs_c, _, _, _ = stats
    g = g.astype(jnp.float32)
    per_row = jnp.where(g != 0.0, g * (-d_y - qs_c), 0.0)  # masked rows may hold garbage stats
    return jnp.sum(per_row).astype(omega.dtype).reshape(omega.shape)


def finish_output(outputs, valid_rows, return_parts):
    """Mask ``(loss, ce, kd, kl)`` rows; parts are monitoring values without gradient."""
    loss, ce, kd, kl = outputs
    loss = jnp.where(valid_rows, loss, 0.0)
    if not return_parts:
        return loss
    parts = {name: lax.stop_gradient(jnp.where(valid_rows, value, 0.0))
             for name, value in (("ce", ce), ("kd", kd), ("kl", kl))}
    return loss, parts


# ----------------------------------------------------------------------------------------------
# Argument checking shared with fused_linear_kd.
# ----------------------------------------------------------------------------------------------

def default_impl() -> str:
    return "pallas" if jax.default_backend() == "tpu" else "xla"


def check_impl(impl):
    if impl is None:
        return default_impl()
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS} or None, got {impl!r}")
    return impl


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
# naive
# ----------------------------------------------------------------------------------------------

def loss_naive(s_NxV, t_NxV, y_N, omega, rho):
    """Textbook ``(loss, ce, kd, kl)`` with full ``[N, V]`` log-softmaxes (autodiff gradient)."""
    log_p = jax.nn.log_softmax(s_NxV.astype(jnp.float32), axis=-1)
    log_q = jax.nn.log_softmax(rho * lax.stop_gradient(t_NxV).astype(jnp.float32), axis=-1)
    q = jnp.exp(log_q)
    onehot = jnp.arange(s_NxV.shape[1])[None, :] == y_N[:, None]
    ce = -jnp.sum(jnp.where(onehot, log_p, 0.0), axis=-1)
    kd = -jnp.sum(q * log_p, axis=-1)
    kl = jnp.sum(q * (log_q - log_p), axis=-1)
    return (1.0 - omega) * ce + omega * kd, ce, kd, kl


# ----------------------------------------------------------------------------------------------
# xla: scan over vocab chunks
# ----------------------------------------------------------------------------------------------

def chunk_plan(vocab, chunk):
    """(chunk size, number of chunks); chunk ``j`` covers ``[min(j·c, V−c), +c)`` and counts
    only columns ``>= j·c`` (the last chunk is shifted left instead of padded)."""
    chunk = min(chunk, vocab)
    return chunk, -(-vocab // chunk)


def _stats_xla(s_NxV, t_NxV, y_N, rho, chunk):
    n, vocab = s_NxV.shape
    chunk, n_chunks = chunk_plan(vocab, chunk)
    y_Nx1 = y_N[:, None]

    def body(carry, j):
        start = jnp.minimum(j * chunk, vocab - chunk)
        s_c = lax.dynamic_slice_in_dim(s_NxV, start, chunk, axis=1).astype(jnp.float32)
        rt_c = rho * lax.dynamic_slice_in_dim(t_NxV, start, chunk, axis=1).astype(jnp.float32)
        cols_1xC = start + lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
        valid = cols_1xC >= j * chunk
        return stats_update(carry, s_c, rt_c, valid, cols_1xC == y_Nx1), None

    carry, _ = lax.scan(body, stats_init((n, 1)), jnp.arange(n_chunks))
    return tuple(x[:, 0] for x in stats_finish(carry))


def _grad_xla(s_NxV, t_NxV, y_N, stats, coefs, rho, chunk):
    """One fused elementwise pass (the result is [N, V] anyway; nothing else of that size)."""
    del chunk
    m_s, log_l_s, _, _, m_t, log_l_t, _ = stats
    onehot = jnp.arange(s_NxV.shape[1])[None, :] == y_N[:, None]
    rows = [x[:, None] for x in (m_s, log_l_s, m_t, log_l_t, *coefs)]
    ds = grad_tile(s_NxV.astype(jnp.float32), rho * t_NxV.astype(jnp.float32), onehot, *rows)
    return ds.astype(s_NxV.dtype)


# ----------------------------------------------------------------------------------------------
# pallas (TPU / Mosaic)
# ----------------------------------------------------------------------------------------------

def row_spec(block_tokens, token_axis=0):
    """BlockSpec of a per-row ``[N, 1]`` vector on a 2-D grid whose axis ``token_axis`` walks rows."""
    if token_axis == 0:
        return pl.BlockSpec((block_tokens, 1), lambda i, j: (i, 0))
    return pl.BlockSpec((block_tokens, 1), lambda j, i: (i, 0))


def as_rows(*vectors_N):
    """``[N]`` vectors -> float32 ``[N, 1]`` kernel operands."""
    return tuple(v.astype(jnp.float32)[:, None] for v in vectors_N)


def stats_kernel_step(s, rt, y_ref, refs, *, vocab, block_vocab):
    """Body of a forward statistics kernel on the grid (token blocks, vocab blocks ``"arbitrary"``),
    given the tile's float32 logits ``s`` and ``rt = ρ·t`` (``[bt, bv]``).  ``refs``: the
    :data:`N_STATS` ``[bt, 1]`` output refs, then as many VMEM scratch refs (the running carry)."""
    out_refs, scratch = refs[:N_STATS], refs[N_STATS:]
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        for ref, value in zip(scratch, stats_init(scratch[0].shape)):
            ref[...] = value

    cols = j * block_vocab + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    carry = stats_update(tuple(r[...] for r in scratch), s, rt, cols < vocab, cols == y_ref[...])
    for ref, value in zip(scratch, carry):
        ref[...] = value

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        for ref, value in zip(out_refs, stats_finish(tuple(r[...] for r in scratch))):
            ref[...] = value


def _fwd_kernel(s_ref, t_ref, y_ref, *refs, rho, vocab, block_vocab):
    s = s_ref[...].astype(jnp.float32)
    rt = rho * t_ref[...].astype(jnp.float32)
    stats_kernel_step(s, rt, y_ref, refs, vocab=vocab, block_vocab=block_vocab)


def _bwd_kernel(s_ref, t_ref, y_ref, m_s_ref, log_l_s_ref, m_t_ref, log_l_t_ref, g_p_ref, g_y_ref, g_q_ref,
                ds_ref, *, rho, vocab, n_tokens, block_tokens, block_vocab):
    i, j = pl.program_id(0), pl.program_id(1)
    s = s_ref[...].astype(jnp.float32)
    rt = rho * t_ref[...].astype(jnp.float32)
    cols = j * block_vocab + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    rows = i * block_tokens + lax.broadcasted_iota(jnp.int32, s.shape, 0)
    ds = grad_tile(s, rt, cols == y_ref[...], m_s_ref[...], log_l_s_ref[...], m_t_ref[...], log_l_t_ref[...],
                   g_p_ref[...], g_y_ref[...], g_q_ref[...])
    ds_ref[...] = jnp.where((cols < vocab) & (rows < n_tokens), ds, 0.0).astype(ds_ref.dtype)


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
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, rho=rho, vocab=vocab, block_vocab=bv),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0, grid=(pl.cdiv(n, bt), pl.cdiv(vocab, bv)),
            in_specs=[tile_spec, tile_spec, row_spec(bt)],
            out_specs=[row_spec(bt)] * N_STATS,
            scratch_shapes=[pltpu.VMEM((bt, 1), jnp.float32)] * 7),
        out_shape=[jax.ShapeDtypeStruct((n, 1), jnp.float32)] * N_STATS,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(flops=int(fwd_flops(n, vocab)), transcendentals=int(2 * n * vocab),
                                      bytes_accessed=int(in_bytes + 4 * n + 4 * N_STATS * n)),
        interpret=interpret,
        name="kd_loss_fwd",
    )(s_NxV, t_NxV, y_N[:, None])
    return tuple(o[:, 0] for o in outs)


def _grad_pallas(s_NxV, t_NxV, y_N, stats, coefs, rho, block_sizes, interpret):
    n, vocab = s_NxV.shape
    bt, bv = _blocks(n, vocab, block_sizes)
    tile_spec = pl.BlockSpec((bt, bv), lambda i, j: (i, j))
    nbytes = 2 * s_NxV.size * s_NxV.dtype.itemsize + t_NxV.size * t_NxV.dtype.itemsize
    m_s, log_l_s, _, _, m_t, log_l_t, _ = stats
    return pl.pallas_call(
        functools.partial(_bwd_kernel, rho=rho, vocab=vocab, n_tokens=n, block_tokens=bt, block_vocab=bv),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0, grid=(pl.cdiv(n, bt), pl.cdiv(vocab, bv)),
            in_specs=[tile_spec, tile_spec] + [row_spec(bt)] * 8,
            out_specs=tile_spec),
        out_shape=jax.ShapeDtypeStruct(s_NxV.shape, s_NxV.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        cost_estimate=pl.CostEstimate(flops=int(bwd_flops(n, vocab)), transcendentals=int(2 * n * vocab),
                                      bytes_accessed=int(nbytes + 32 * n)),
        interpret=interpret,
        name="kd_loss_bwd",
    )(s_NxV, t_NxV, y_N[:, None], *as_rows(m_s, log_l_s, m_t, log_l_t, *coefs))


# ----------------------------------------------------------------------------------------------
# custom_vjp core: (loss, ce, kd, kl) per row; gradient to the student logits and omega only
# ----------------------------------------------------------------------------------------------

def _stats(s_NxV, t_NxV, y_N, rho, cfg):
    impl, block_sizes, interpret = cfg
    if impl == "xla":
        return _stats_xla(s_NxV, t_NxV, y_N, rho, block_sizes.chunk_vocab)
    return _stats_pallas(s_NxV, t_NxV, y_N, rho, block_sizes, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _loss_core(s_NxV, t_NxV, y_N, omega, rho, cfg):
    return loss_from_stats(_stats(s_NxV, t_NxV, y_N, rho, cfg), omega)


def _loss_core_fwd(s_NxV, t_NxV, y_N, omega, rho, cfg):
    stats = _stats(s_NxV, t_NxV, y_N, rho, cfg)
    return loss_from_stats(stats, omega), (s_NxV, t_NxV, y_N, omega, stats)


def _loss_core_bwd(rho, cfg, res, cotangents):
    s_NxV, t_NxV, y_N, omega, stats = res
    g = cotangents[0]  # parts (ce, kd, kl) are monitoring values: their cotangents are ignored
    coefs = grad_coefficients(g, omega)
    impl, block_sizes, interpret = cfg
    if impl == "xla":
        ds = _grad_xla(s_NxV, t_NxV, y_N, stats, coefs, rho, block_sizes.chunk_vocab)
    else:
        ds = _grad_pallas(s_NxV, t_NxV, y_N, stats, coefs, rho, block_sizes, interpret)
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
      return_parts: also return ``{"ce", "kd", "kl"}`` per position (monitoring; no gradient).

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
