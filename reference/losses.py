"""Reference per-position losses of SALT and their gradients w.r.t. the student logits (docs/design.md §2).

Notation, per target position: student logits ``s`` (length V), teacher logits ``t``, label ``y``,
distillation weight ``omega`` in [0, 1], teacher temperature ``rho`` > 0.

* ``P = softmax(s)`` (the student is never temperature-scaled), ``Q = softmax(rho * t)``.
* ``ce   = lse(s) - s_y``
* ``kd   = lse(s) - sum_v Q_v s_v``                     (soft cross-entropy, paper eq. 3)
* ``loss = (1 - omega) * ce + omega * kd``            (paper eq. 4)
* ``d loss / d s = P - (1 - omega) * onehot(y) - omega * Q``   (no gradient to the teacher)
* ``kl   = KL(Q || P) = kd - H(Q)``                    (monitoring only)

Every function returns PER-POSITION values of shape ``labels.shape`` (gradients: the shape of the
student logits). Reduction is the caller's; the project's reduction is :func:`mean_over_mask`
(mean over the valid positions of the whole batch). The gradients are those of the per-position
loss, NOT of the mean: the gradient of ``mean_over_mask(loss, mask)`` is
``grad / mask.sum()``.

Numerics: everything is computed in float64 whatever the input dtype (float32, bfloat16 from
``ml_dtypes``, float64, ...) and returned as float64. Log-probabilities are formed as
``(x - max) - log1p(sum_{v != argmax} exp(x_v - max))``, so losses are relatively accurate even
for logits of magnitude 1e4 and for near-zero losses. Masked positions (``mask`` False/0) give
exactly 0 (zero gradient rows); their logits and labels are never read, so padding labels such as
-1 are fine there.

Padded vocabularies: every function takes ``vocab`` (keyword; None = the logits' width). With it,
only the first ``vocab`` columns are the tokenizer's; the columns beyond (embedding rows rounded up
for TPU tiling, possibly a different number for the teacher and the student) are dropped before
any softmax, so they get no probability in P or Q, and gradients are zero there.

Validation (``ValueError`` naming the argument and the value): ``omega`` outside [0, 1] or
non-finite, ``rho`` <= 0 or non-finite, ``k`` not an integer in [1, V], ``vocab`` not an
integer in [1, width], labels outside [0, V) at
unmasked positions, non-integer labels, shape mismatches, teacher/student vocabulary mismatch,
non-finite logits (nan/inf) at unmasked positions, ``rho * teacher_logits`` overflowing float64
there (absurd ``rho``): never a silent NaN.
"""
from __future__ import annotations

import numbers

import numpy as np

__all__ = [
    "ce_loss", "ce_loss_grad", "kd_loss", "kd_loss_grad", "kl_monitor", "loss_parts",
    "topk_kd_loss", "topk_kd_loss_grad", "topk_indices", "log_softmax", "mean_over_mask", "as_mask",
    "cut_vocab",
]


# ----------------------------------------------------------------------------- validation

def _check_scalar(name: str, value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def check_omega(omega) -> float:
    """Return ``omega`` as float; ValueError unless it is a finite real in [0, 1]."""
    value = _check_scalar("omega", omega)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"omega must be in [0, 1], got {omega!r}")
    return value


def check_rho(rho) -> float:
    """Return ``rho`` as float; ValueError unless it is a finite real > 0."""
    value = _check_scalar("rho", rho)
    if value <= 0.0:
        raise ValueError(f"rho must be > 0, got {rho!r}")
    return value


def check_k(k, vocab_size: int) -> int:
    """Return ``k`` as int; ValueError unless it is an integer in [1, vocab_size]."""
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Integral):
        raise ValueError(f"k must be an integer, got {k!r}")
    if not 1 <= int(k) <= vocab_size:
        raise ValueError(f"k must be in [1, V={vocab_size}], got {k!r}")
    return int(k)


def _as_logits(name: str, logits) -> np.ndarray:
    """Float64 copy of a logits array ``[..., V]`` (accepts any real float dtype incl. bfloat16)."""
    array = np.asarray(logits)
    if array.dtype.kind in "bOSUVcmM" and array.dtype.name not in _EXTRA_FLOAT_NAMES:
        raise ValueError(f"{name} must be a real floating-point array, got dtype {array.dtype}")
    if array.ndim < 1 or array.shape[-1] < 1:
        raise ValueError(f"{name} must have shape [..., V] with V >= 1, got shape {array.shape}")
    return array.astype(np.float64)


def cut_vocab(name: str, logits: np.ndarray, vocab) -> np.ndarray:
    """``logits[..., :vocab]`` (the padded columns beyond the tokenizer's ``vocab`` dropped)."""
    if vocab is None:
        return logits
    width = logits.shape[-1]
    if isinstance(vocab, (bool, np.bool_)) or not isinstance(vocab, numbers.Integral) or not 1 <= vocab <= width:
        raise ValueError(f"vocab must be an integer in [1, {width}] ({name}'s width), got {vocab!r}")
    return logits[..., :int(vocab)]


def _zero_padded(grad: np.ndarray, width: int) -> np.ndarray:
    """A gradient over the first ``vocab`` columns, back at the logits' ``width`` (zeros beyond)."""
    pad = width - grad.shape[-1]
    return grad if pad == 0 else np.concatenate([grad, np.zeros(grad.shape[:-1] + (pad,))], axis=-1)


# ml_dtypes floats (bfloat16, float8_*) report dtype.kind 'V'; they convert exactly to float64.
_EXTRA_FLOAT_NAMES = frozenset({
    "bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e4m3b11fnuz", "float8_e5m2",
    "float8_e5m2fnuz", "float8_e3m4", "float8_e4m3", "float8_e8m0fnu", "float6_e2m3fn",
    "float6_e3m2fn", "float4_e2m1fn",
})


def as_mask(mask, shape: tuple) -> np.ndarray:
    """Boolean validity mask of ``shape`` (None -> all valid). Accepts bool or 0/1 numbers."""
    if mask is None:
        return np.ones(shape, dtype=bool)
    array = np.asarray(mask)
    if array.shape != tuple(shape):
        raise ValueError(f"mask must have shape {tuple(shape)} (the labels' shape), got {array.shape}")
    if array.dtype == bool:
        return array
    if array.dtype.kind not in "iuf":
        raise ValueError(f"mask must be boolean or 0/1 numbers, got dtype {array.dtype}")
    bad = (array != 0) & (array != 1)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"mask must contain only 0/1 (or bool), got {array[where].item()!r} at index {where}")
    return array != 0


def _as_labels(labels, shape: tuple, vocab_size: int, valid: np.ndarray) -> np.ndarray:
    """int64 labels of ``shape`` checked in [0, V) at valid positions; 0 at masked positions."""
    array = np.asarray(labels)
    if array.dtype.kind not in "iu":
        raise ValueError(f"labels must be an integer array, got dtype {array.dtype}")
    if array.shape != tuple(shape):
        raise ValueError(
            f"labels must have shape {tuple(shape)} (the logits' shape without V), got {array.shape}")
    bad = valid & ((array < 0) | (array >= vocab_size))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"labels must be in [0, V={vocab_size}) at unmasked positions, got {int(array[where])} "
            f"at index {where}")
    return np.where(valid, array, 0).astype(np.int64)


def _check_finite(what: str, logits_f64: np.ndarray, valid: np.ndarray) -> None:
    bad = valid & ~np.isfinite(logits_f64).all(axis=-1)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{what} non-finite values (nan/inf) at unmasked position {where}")


def _prepare(student_logits, labels, mask, teacher_logits=None, vocab=None):
    """Validate and convert. Returns (s, t_or_None, labels_int64, valid), masked rows zeroed and
    cut to ``vocab`` columns."""
    s = cut_vocab("student_logits", _as_logits("student_logits", student_logits), vocab)
    vocab_size = s.shape[-1]
    t = None
    if teacher_logits is not None:
        t = cut_vocab("teacher_logits", _as_logits("teacher_logits", teacher_logits), vocab)
        if t.shape[-1] != s.shape[-1]:
            raise ValueError(
                f"teacher_logits vocabulary size {t.shape[-1]} != student_logits vocabulary size "
                f"{s.shape[-1]}")
        if t.shape != s.shape:
            raise ValueError(
                f"teacher_logits shape {t.shape} != student_logits shape {s.shape}")
    positions = s.shape[:-1]
    valid = as_mask(mask, positions)
    y = _as_labels(labels, positions, vocab_size, valid)
    _check_finite("student_logits has", s, valid)
    s = np.where(valid[..., None], s, 0.0)
    if t is not None:
        _check_finite("teacher_logits has", t, valid)
        t = np.where(valid[..., None], t, 0.0)
    return s, t, y, valid


def _scaled_teacher(rho: float, t: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``rho * t`` (the logits of Q); ValueError if it overflows at an unmasked position."""
    with np.errstate(over="ignore"):
        scaled = rho * t
    _check_finite(f"rho * teacher_logits overflows float64 (rho={rho!r}):", scaled, valid)
    return scaled


# ----------------------------------------------------------------------------- numerics

def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Relatively accurate float64 log-softmax.

    ``log p_v = (x_v - m) - log1p(sum_{u != u*} exp(x_u - m))`` with ``m = x_{u*}`` the maximum
    (``u*`` its first index). Using ``log1p`` of the sum without the max term keeps
    ``-log p`` accurate to a few ulps even when it is tiny (confident predictions).
    """
    x = np.asarray(x, dtype=np.float64)
    x = np.moveaxis(x, axis, -1)
    arg_max = np.argmax(x, axis=-1)[..., None]
    x_max = np.take_along_axis(x, arg_max, axis=-1)
    shifted = x - x_max
    exp_shifted = np.exp(shifted)
    np.put_along_axis(exp_shifted, arg_max, 0.0, axis=-1)
    out = shifted - np.log1p(exp_shifted.sum(axis=-1, keepdims=True))
    return np.moveaxis(out, -1, axis)


def _take_last(x: np.ndarray, index: np.ndarray) -> np.ndarray:
    return np.take_along_axis(x, index[..., None], axis=-1)[..., 0]


def mean_over_mask(values, mask=None) -> float:
    """The project's reduction: mean of ``values`` over valid positions (all if ``mask`` is None).

    ``values`` are per-position numbers (e.g. from :func:`kd_loss`). With no valid position the
    mean is undefined: ValueError (never a silent NaN).
    """
    values = np.asarray(values, dtype=np.float64)
    valid = as_mask(mask, values.shape)
    count = int(valid.sum())
    if count == 0:
        raise ValueError("mean_over_mask: mask selects no position")
    return float(np.where(valid, values, 0.0).sum() / count)


# ----------------------------------------------------------------------------- CE

def ce_loss(logits, labels, mask=None, *, vocab=None) -> np.ndarray:
    """Per-position cross-entropy ``lse(s) - s_y`` (float64, 0 at masked positions)."""
    s, _, y, valid = _prepare(logits, labels, mask, vocab=vocab)
    return np.where(valid, -_take_last(log_softmax(s), y), 0.0)


def ce_loss_grad(logits, labels, mask=None, *, vocab=None) -> np.ndarray:
    """Gradient of the per-position CE w.r.t. the logits: ``P - onehot(y)``; zero rows where masked."""
    s, _, y, valid = _prepare(logits, labels, mask, vocab=vocab)
    grad = np.exp(log_softmax(s))
    np.put_along_axis(grad, y[..., None], _take_last(grad, y)[..., None] - 1.0, axis=-1)
    return _zero_padded(np.where(valid[..., None], grad, 0.0), np.shape(logits)[-1])


# ----------------------------------------------------------------------------- KD

def loss_parts(student_logits, teacher_logits, labels, omega, rho, mask=None, *, vocab=None) -> dict:
    """All per-position quantities of docs/design.md §2 at once (float64, 0 at masked positions).

    Returns a dict of arrays of shape ``labels.shape``:
    ``loss`` = (1-omega) ce + omega kd, ``ce``, ``kd`` = -sum Q log P, ``kl`` = KL(Q||P),
    ``teacher_entropy`` = H(Q) (so ``kl = kd - teacher_entropy`` up to rounding).
    """
    omega = check_omega(omega)
    rho = check_rho(rho)
    s, t, y, valid = _prepare(student_logits, labels, mask, teacher_logits, vocab)
    log_p = log_softmax(s)
    log_q = log_softmax(_scaled_teacher(rho, t, valid))
    q = np.exp(log_q)
    ce = -_take_last(log_p, y)
    kd = -(q * log_p).sum(axis=-1)  # sum of non-negative terms: relatively accurate
    kl = (q * (log_q - log_p)).sum(axis=-1)
    entropy = -(q * log_q).sum(axis=-1)
    loss = (1.0 - omega) * ce + omega * kd
    zero = lambda a: np.where(valid, a, 0.0)  # noqa: E731
    return {"loss": zero(loss), "ce": zero(ce), "kd": zero(kd), "kl": zero(kl),
            "teacher_entropy": zero(entropy)}


def kd_loss(student_logits, teacher_logits, labels, omega, rho, mask=None, *, vocab=None) -> np.ndarray:
    """Per-position SALT loss ``lse(s) - [(1-omega) s_y + omega sum_v Q_v s_v]``, Q = softmax(rho t).

    ``student_logits``/``teacher_logits``: ``[..., V]`` (same shape); ``labels``: ``[...]`` int;
    ``mask``: ``[...]`` bool/0-1 or None. Returns float64 ``labels.shape``, exactly 0 where masked.
    omega = 0 gives :func:`ce_loss`; omega = 1 gives pure soft cross-entropy.
    """
    return loss_parts(student_logits, teacher_logits, labels, omega, rho, mask, vocab=vocab)["loss"]


def kd_loss_grad(student_logits, teacher_logits, labels, omega, rho, mask=None, *, vocab=None) -> np.ndarray:
    """Gradient of the PER-POSITION :func:`kd_loss` w.r.t. the student logits.

    ``P - (1-omega) onehot(y) - omega Q``, float64 of the student logits' shape, zero rows where
    masked. (Divide by the number of valid positions for the gradient of the mean.)
    """
    omega = check_omega(omega)
    rho = check_rho(rho)
    s, t, y, valid = _prepare(student_logits, labels, mask, teacher_logits, vocab)
    grad = np.exp(log_softmax(s)) - omega * np.exp(log_softmax(_scaled_teacher(rho, t, valid)))
    np.put_along_axis(grad, y[..., None], _take_last(grad, y)[..., None] - (1.0 - omega), axis=-1)
    return _zero_padded(np.where(valid[..., None], grad, 0.0), np.shape(student_logits)[-1])


def kl_monitor(student_logits, teacher_logits, rho, mask=None, *, vocab=None) -> np.ndarray:
    """Per-position ``KL(Q || P) = kd - H(Q)`` (monitoring; float64, 0 where masked).

    Computed directly as ``sum_v Q_v (log Q_v - log P_v)`` (no cancellation between kd and H(Q)).
    """
    rho = check_rho(rho)
    s = _as_logits("student_logits", student_logits)
    labels = np.zeros(s.shape[:-1], dtype=np.int64)  # KL does not use labels
    return loss_parts(student_logits, teacher_logits, labels, 0.0, rho, mask, vocab=vocab)["kl"]


# ----------------------------------------------------------------------------- top-k KD

def topk_indices(teacher_logits, k: int, *, vocab=None) -> np.ndarray:
    """The teacher's top-k vocabulary set per position: int64 ``[..., k]``.

    Exactly ``k`` entries: the ``k`` largest teacher logits, ties broken by the LOWER vocabulary
    index (the convention of ``jax.lax.top_k``), listed in descending logit order. The set is
    chosen on the teacher logits ``t`` themselves (``rho > 0`` does not change the order).

    Note: this differs on purpose from the selection score's top-k MEMBERSHIP test (docs/design.md §4:
    ties count in favour of membership), which needs no set, only a count.
    """
    t = cut_vocab("teacher_logits", _as_logits("teacher_logits", teacher_logits), vocab)
    k = check_k(k, t.shape[-1])
    return np.argsort(-t, axis=-1, kind="stable")[..., :k]


def _topk_parts(student_logits, teacher_logits, labels, omega, rho, k, mask, vocab):
    omega = check_omega(omega)
    rho = check_rho(rho)
    s, t, y, valid = _prepare(student_logits, labels, mask, teacher_logits, vocab)
    k = check_k(k, s.shape[-1])
    index = np.argsort(-t, axis=-1, kind="stable")[..., :k]
    log_p = log_softmax(s)
    log_p_top = log_softmax(np.take_along_axis(s, index, axis=-1))  # log P^T on the set
    log_q_top = log_softmax(  # log Q^T on the set
        np.take_along_axis(_scaled_teacher(rho, t, valid), index, axis=-1))
    return omega, s, y, valid, index, log_p, log_p_top, log_q_top


def topk_kd_loss(student_logits, teacher_logits, labels, omega, rho, k, mask=None, *, vocab=None) -> np.ndarray:
    """Per-position top-k KD loss (paper eq. 13-14 inside eq. 4).

    With ``T`` = :func:`topk_indices` (exactly k tokens, ties -> lower index), ``P^T`` and ``Q^T`` are
    ``softmax(s)`` and ``softmax(rho t)`` restricted to ``T`` and renormalised over it:

        ``kd_T = -sum_{v in T} Q^T_v log P^T_v = lse_T(s) - sum_{v in T} Q^T_v s_v``
        ``loss = (1 - omega) * ce + omega * kd_T``

    The ground-truth term ``ce = lse(s) - s_y`` stays the FULL-vocabulary cross-entropy (eq. 13
    replaces only the distillation term; the label need not be in ``T``). So omega = 0 gives
    :func:`ce_loss` exactly and k = V gives :func:`kd_loss` (up to summation-order rounding).
    float64, 0 at masked positions.
    """
    omega, s, y, valid, index, log_p, log_p_top, log_q_top = _topk_parts(
        student_logits, teacher_logits, labels, omega, rho, k, mask, vocab)
    ce = -_take_last(log_p, y)
    kd_top = -(np.exp(log_q_top) * log_p_top).sum(axis=-1)
    return np.where(valid, (1.0 - omega) * ce + omega * kd_top, 0.0)


def topk_kd_loss_grad(student_logits, teacher_logits, labels, omega, rho, k, mask=None, *,
                      vocab=None) -> np.ndarray:
    """Gradient of the per-position :func:`topk_kd_loss` w.r.t. the student logits.

    ``(1 - omega) (P - onehot(y)) + omega (P^T - Q^T)`` with ``P^T``, ``Q^T`` zero outside the
    teacher's top-k set; float64 of the student logits' shape, zero rows where masked.
    """
    omega, s, y, valid, index, log_p, log_p_top, log_q_top = _topk_parts(
        student_logits, teacher_logits, labels, omega, rho, k, mask, vocab)
    grad = (1.0 - omega) * np.exp(log_p)
    np.put_along_axis(grad, y[..., None], _take_last(grad, y)[..., None] - (1.0 - omega), axis=-1)
    top = np.take_along_axis(grad, index, axis=-1) + omega * (np.exp(log_p_top) - np.exp(log_q_top))
    np.put_along_axis(grad, index, top, axis=-1)
    return _zero_padded(np.where(valid[..., None], grad, 0.0), np.shape(student_logits)[-1])
