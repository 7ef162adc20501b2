"""Optimizers of the runtime: optax Adafactor (paper default) or AdamW, with global-norm
clipping and the warm-up + cosine learning-rate schedule of DESIGN.md §3.

The schedule is evaluated at the 1-based step ``j = count + 1`` (optax's ``count`` is the
number of updates already applied), matching :func:`salt.reference.lr_at`.

AdamW (``optax.adamw``, identical to the reference's documented update)::

    g  <- clip(g)                                 (global norm, when clip > 0)
    m  <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
    m^ = m / (1 - b1^j) ;      v^ = v / (1 - b2^j)
    p  <- p - lr_j (m^ / (sqrt(v^) + eps) + wd p)

Adafactor: ``optax.adafactor`` with factored second moments, decay rate 0.8, update
clipping at 1.0 and ``multiply_by_parameter_scale=False`` (so ``lr`` is the step size,
as with AdamW); decoupled weight decay ``wd * lr_j * p`` when ``weight_decay > 0``.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import optax

OPTIMIZERS = ("adafactor", "adamw")
ADAMW_B1, ADAMW_B2, ADAMW_EPS = 0.9, 0.95, 1e-8


def lr_at(step, peak_lr: float, warmup_steps: int, total_steps: int, final_lr: float):
    """Learning rate at 1-based ``step``: linear warm-up ``peak * step / warmup`` for
    ``step <= warmup``, then cosine from ``peak`` (at ``warmup``) to ``final_lr`` (at
    ``total_steps``), constant ``final_lr`` after."""
    j = jnp.asarray(step, jnp.float32)
    if warmup_steps > 0:
        warm = peak_lr * j / warmup_steps
    else:
        warm = jnp.float32(peak_lr)
    span = max(total_steps - warmup_steps, 1)
    # 0.5 (1 + cos(pi p)) = sin(pi (1 - p) / 2)^2 with 1 - p = (total - j) / span: well
    # conditioned in float32 near the end of the decay (no cancellation)
    remaining = jnp.clip((total_steps - j) / span, 0.0, 1.0)
    cosine = final_lr + (peak_lr - final_lr) * jnp.sin(0.5 * math.pi * remaining) ** 2
    return jnp.where(j <= warmup_steps, warm, cosine).astype(jnp.float32)


def make_schedule(peak_lr, warmup_steps, total_steps, final_lr):
    """optax schedule: count (0-based updates done) -> lr at step count + 1."""
    return lambda count: lr_at(count + 1, peak_lr, warmup_steps, total_steps, final_lr)


def make_optimizer(name: str, *, lr: float, final_lr: float, warmup: int, total_steps: int,
                   clip: float = 1.0, weight_decay: float = 0.0) -> optax.GradientTransformation:
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if not (final_lr >= 0 and math.isfinite(final_lr)):
        raise ValueError(f"final_lr must be >= 0, got {final_lr!r}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup!r}")
    if clip < 0:
        raise ValueError(f"clip must be >= 0 (0 disables clipping), got {clip!r}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    schedule = make_schedule(lr, warmup, total_steps, final_lr)
    parts = []
    if clip > 0:
        parts.append(optax.clip_by_global_norm(clip))
    if name == "adamw":
        parts.append(optax.adamw(schedule, b1=ADAMW_B1, b2=ADAMW_B2, eps=ADAMW_EPS,
                                 weight_decay=weight_decay))
    else:
        parts.append(optax.adafactor(schedule, multiply_by_parameter_scale=False,
                                     clipping_threshold=1.0, decay_rate=0.8,
                                     weight_decay_rate=weight_decay or None))
    return optax.chain(*parts)
