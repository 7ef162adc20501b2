"""Reference schedules of SALT (docs/design.md §3): the distillation weight and the learning rate.

Steps are 1-BASED: step ``j = 1`` is the first optimizer update, ``j = n`` the last of an ``n``-step
run (Algorithm 1). Both functions are pure and cheap; the JAX runtime re-implements them (optax)
and is tested against these definitions.

Distillation weight ``omega_at(j, omega, n_kd, transition, n_kd1)``:

* ``"step"`` (default):  ``omega`` for ``j <= n_kd``, ``0`` for ``j > n_kd``.
* ``"linear"``:          ``omega`` for ``j <= n_kd1``;
  ``omega * (n_kd - j) / (n_kd - n_kd1)`` for ``n_kd1 < j <= n_kd`` (so exactly 0 at ``j = n_kd``);
  ``0`` for ``j > n_kd``.
* ``"linear-ratio"``:    the ratio ``r = omega / (1 - omega)`` decays linearly:
  ``r_j = r * f_j`` with ``f_j = (n_kd - j) / (n_kd - n_kd1)`` for ``n_kd1 < j <= n_kd``, and
  ``omega_j = r_j / (1 + r_j) = omega f_j / (omega f_j + 1 - omega)``; ``omega`` for
  ``j <= n_kd1``, ``0`` for ``j >= n_kd``. The last form is used, so ``omega = 1`` is its
  limit: ``omega_j = 1`` for ``j < n_kd`` and ``0`` from ``j = n_kd`` on (no division by zero).

``n_kd1`` (0 <= n_kd1 <= n_kd) is required by the two linear transitions and, when given to
``"step"``, only validated. ``n_kd1 == n_kd`` makes both linear transitions equal to ``"step"``.
BASELINE is ``n_kd = 0`` (omega_j = 0 for every step); RKD is ``n_kd = n`` (KD at every step).
The teacher forward pass is needed exactly at the steps with ``omega_at(...) > 0``.

Learning rate ``lr_at(j, peak_lr, warmup_steps, total_steps, final_lr)`` (paper: 1e-3, 4000,
208K, 1e-4):

* warm-up, ``1 <= j <= warmup_steps``: ``peak_lr * j / warmup_steps`` (linear from 0, so step 1
  gets ``peak_lr / warmup_steps`` and step ``warmup_steps`` gets ``peak_lr``);
* cosine decay, ``j > warmup_steps``: with ``p = min(1, (j - warmup_steps) / (total_steps -
  warmup_steps))``: ``final_lr + (peak_lr - final_lr) * 0.5 * (1 + cos(pi * p))``, which reaches
  ``final_lr`` at ``j = total_steps`` and stays there for ``j > total_steps``.

This equals ``optax.warmup_cosine_decay_schedule(init_value=0, peak_value=peak_lr,
warmup_steps=warmup_steps, decay_steps=total_steps, end_value=final_lr)`` evaluated at count ``j``
(so a runtime whose optimizer count starts at 0 must evaluate it at ``count + 1``).
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from salt.reference.losses import check_omega

__all__ = ["omega_at", "omega_values", "lr_at", "lr_values", "TRANSITIONS"]

TRANSITIONS = ("step", "linear", "linear-ratio")


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def _check_rate(name: str, value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value_f = float(value)
    if not math.isfinite(value_f) or value_f < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return value_f


def _check_omega_schedule(omega, n_kd, transition, n_kd1):
    omega = check_omega(omega)
    n_kd = _check_int("n_kd", n_kd, 0)
    if transition not in TRANSITIONS:
        raise ValueError(f"transition must be one of {TRANSITIONS}, got {transition!r}")
    if n_kd1 is None:
        if transition != "step":
            raise ValueError(f"n_kd1 is required for transition {transition!r}, got None")
    else:
        n_kd1 = _check_int("n_kd1", n_kd1, 0)
        if n_kd1 > n_kd:
            raise ValueError(f"n_kd1 must be <= n_kd={n_kd}, got {n_kd1}")
    return omega, n_kd, n_kd1


def _omega(step: int, omega: float, n_kd: int, transition: str, n_kd1) -> float:
    if step > n_kd:
        return 0.0
    if transition == "step" or step <= n_kd1:
        return omega
    fraction = (n_kd - step) / (n_kd - n_kd1)  # in [0, 1); n_kd1 < step <= n_kd
    if transition == "linear":
        return omega * fraction
    if fraction == 0.0:  # also the omega = 1 limit at step n_kd
        return 0.0
    return omega * fraction / (omega * fraction + (1.0 - omega))


def omega_at(step, omega, n_kd, transition="step", n_kd1=None) -> float:
    """Distillation weight at 1-based ``step`` (see the module docstring for the exact formulas)."""
    step = _check_int("step", step, 1)
    omega, n_kd, n_kd1 = _check_omega_schedule(omega, n_kd, transition, n_kd1)
    return _omega(step, omega, n_kd, transition, n_kd1)


def omega_values(steps, omega, n_kd, transition="step", n_kd1=None) -> np.ndarray:
    """:func:`omega_at` for every entry of an integer array of 1-based steps (float64, same shape)."""
    steps = np.asarray(steps)
    if steps.dtype.kind not in "iu":
        raise ValueError(f"steps must be an integer array, got dtype {steps.dtype}")
    if steps.size and steps.min() < 1:
        raise ValueError(f"steps must be >= 1, got {int(steps.min())}")
    omega, n_kd, n_kd1 = _check_omega_schedule(omega, n_kd, transition, n_kd1)
    flat = [_omega(int(j), omega, n_kd, transition, n_kd1) for j in steps.ravel()]
    return np.asarray(flat, dtype=np.float64).reshape(steps.shape)


def _check_lr_schedule(peak_lr, warmup_steps, total_steps, final_lr):
    peak_lr = _check_rate("peak_lr", peak_lr)
    if peak_lr == 0.0:
        raise ValueError(f"peak_lr must be > 0, got {peak_lr!r}")
    final_lr = _check_rate("final_lr", final_lr)
    if final_lr > peak_lr:
        raise ValueError(f"final_lr must be <= peak_lr={peak_lr}, got {final_lr}")
    warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
    total_steps = _check_int("total_steps", total_steps, 1)
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps must be <= total_steps={total_steps}, got {warmup_steps}")
    return peak_lr, warmup_steps, total_steps, final_lr


def _lr(step: int, peak_lr: float, warmup_steps: int, total_steps: int, final_lr: float) -> float:
    if step <= warmup_steps:
        return peak_lr * step / warmup_steps
    if step >= total_steps:
        return final_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return final_lr + (peak_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(step, peak_lr, warmup_steps, total_steps, final_lr) -> float:
    """Learning rate at 1-based ``step``: linear warm-up from 0, then cosine decay (module docstring)."""
    step = _check_int("step", step, 1)
    args = _check_lr_schedule(peak_lr, warmup_steps, total_steps, final_lr)
    return _lr(step, *args)


def lr_values(steps, peak_lr, warmup_steps, total_steps, final_lr) -> np.ndarray:
    """:func:`lr_at` for every entry of an integer array of 1-based steps (float64, same shape)."""
    steps = np.asarray(steps)
    if steps.dtype.kind not in "iu":
        raise ValueError(f"steps must be an integer array, got dtype {steps.dtype}")
    if steps.size and steps.min() < 1:
        raise ValueError(f"steps must be >= 1, got {int(steps.min())}")
    args = _check_lr_schedule(peak_lr, warmup_steps, total_steps, final_lr)
    flat = [_lr(int(j), *args) for j in steps.ravel()]
    return np.asarray(flat, dtype=np.float64).reshape(steps.shape)
