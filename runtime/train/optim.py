"""Optimizers of the runtime: optax Adafactor (paper default) or AdamW, with global-norm
clipping and the warm-up + cosine learning-rate schedule of docs/design.md §3.

The schedule is evaluated at the 1-based step ``j = count + 1`` (optax's ``count`` is the
number of updates already applied), matching :func:`salt.reference.lr_at`.

AdamW (``optax.adamw``, identical to the reference's documented update)::

    g  <- clip(g)                                 (global norm, when clip > 0)
    m  <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
    m^ = m / (1 - b1^j) ;      v^ = v / (1 - b2^j)
    p  <- p - lr_j (m^ / (sqrt(v^) + eps) + wd p)

Adafactor: ``optax.scale_by_factored_rms`` (factored second moments, decay rate 0.8) and
``optax.clip_by_block_rms(1.0)`` update clipping, no parameter-scale multiplication (so ``lr``
is the step size, as with AdamW); weight decay as for AdamW: ``p <- p - lr_j (u + wd p)``.

All hyperparameters (peak/final lr, warm-up, total steps, clip, weight decay) are runtime
values in the trainer's compiled step, so one executable serves every schedule.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adafactor", "adamw")
ADAMW_B1, ADAMW_B2, ADAMW_EPS = 0.9, 0.95, 1e-8
ADAFACTOR_DECAY, ADAFACTOR_CLIP = 0.8, 1.0


def lr_at(step, peak_lr, warmup_steps, total_steps, final_lr):
    """Learning rate at 1-based ``step``: linear warm-up ``peak * step / warmup`` for
    ``step <= warmup``, then cosine from ``peak`` (at ``warmup``) to ``final_lr`` (at
    ``total_steps``), constant ``final_lr`` after.  Every argument may be traced."""
    j = jnp.asarray(step, jnp.float32)
    warmup = jnp.asarray(warmup_steps, jnp.float32)
    total = jnp.asarray(total_steps, jnp.float32)
    peak = jnp.asarray(peak_lr, jnp.float32)
    final = jnp.asarray(final_lr, jnp.float32)
    warm = peak * j / jnp.maximum(warmup, 1.0)
    span = jnp.maximum(total - warmup, 1.0)
    # 0.5 (1 + cos(pi p)) = sin(pi (1 - p) / 2)^2 with 1 - p = (total - j) / span: well
    # conditioned in float32 near the end of the decay (no cancellation)
    remaining = jnp.clip((total - j) / span, 0.0, 1.0)
    cosine = final + (peak - final) * jnp.sin(0.5 * math.pi * remaining) ** 2
    return jnp.where(j <= warmup, warm, cosine).astype(jnp.float32)


def make_schedule(peak_lr, warmup_steps, total_steps, final_lr):
    """optax-style schedule: count (0-based updates done) -> lr at step count + 1."""
    return lambda count: lr_at(count + 1, peak_lr, warmup_steps, total_steps, final_lr)


def check_hyperparameters(*, lr, final_lr, warmup, clip, weight_decay) -> None:
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if not (final_lr >= 0 and math.isfinite(final_lr)):
        raise ValueError(f"final_lr must be >= 0, got {final_lr!r}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup!r}")
    if not clip >= 0:
        raise ValueError(f"clip must be >= 0 (0 disables clipping), got {clip!r}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")


def make_direction(name: str) -> optax.GradientTransformation:
    """The optimizer's update direction, before weight decay and learning rate (see
    :func:`apply_update`): Adam moments, or Adafactor's factored RMS with block clipping."""
    if name == "adamw":
        return optax.scale_by_adam(b1=ADAMW_B1, b2=ADAMW_B2, eps=ADAMW_EPS)
    if name == "adafactor":
        return optax.chain(optax.scale_by_factored_rms(decay_rate=ADAFACTOR_DECAY),
                           optax.clip_by_block_rms(ADAFACTOR_CLIP))
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def clip_by_global_norm(grads, max_norm):
    """optax.clip_by_global_norm semantics with a (possibly traced) ``max_norm``; ``max_norm
    <= 0`` disables clipping. Returns (clipped grads, pre-clipping global norm)."""
    norm = optax.tree.norm(grads)
    max_norm = jnp.asarray(max_norm, jnp.float32)
    clip = (max_norm > 0) & (norm >= max_norm)
    return jax.tree.map(lambda g: jnp.where(clip, (g / norm) * max_norm, g), grads), norm


def apply_update(params, direction, lr, weight_decay):
    """``p <- p + (-lr) * (direction + weight_decay * p)`` (optax.adamw's order of operations)."""
    lr = jnp.asarray(lr, jnp.float32)
    wd = jnp.asarray(weight_decay, jnp.float32)
    return jax.tree.map(lambda p, d: p + (-lr) * (d + wd * p), params, direction)


def make_optimizer(name: str, *, lr: float, final_lr: float, warmup: int, total_steps: int,
                   clip: float = 1.0, weight_decay: float = 0.0) -> optax.GradientTransformation:
    """The same optimizer as one optax transformation with constants baked in (for users
    outside the trainer); the trainer uses :func:`make_direction` with traced
    hyperparameters so one compiled step serves any schedule."""
    check_hyperparameters(lr=lr, final_lr=final_lr, warmup=warmup, clip=clip,
                          weight_decay=weight_decay)
    schedule = make_schedule(lr, warmup, total_steps, final_lr)
    parts = [optax.clip_by_global_norm(clip)] if clip > 0 else []
    parts += [make_direction(name), optax.add_decayed_weights(weight_decay),
              optax.scale_by_learning_rate(schedule)]
    return optax.chain(*parts)
