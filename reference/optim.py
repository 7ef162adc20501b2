"""Reference optimisers in NumPy: plain SGD and AdamW, and global-norm gradient clipping.

They follow optax's exact update formulas so that the JAX runtime, built as
``optax.chain(optax.clip_by_global_norm(max_norm), optax.adamw(schedule, b1, b2, eps,
weight_decay=wd))`` (or ``optax.sgd(schedule)``), reproduces the reference losses.

Clipping (``optax.clip_by_global_norm``): ``norm = sqrt(sum over all tensors of sum(g**2))``;
the gradients are kept unchanged if ``norm < max_norm``, else each becomes
``(g / norm) * max_norm``.

SGD (``optax.sgd``, no momentum): ``p <- p - lr * g``.

AdamW (``optax.adamw``; ``mask=None``, i.e. weight decay on EVERY tensor, norms and the
embedding included), at update ``t = 1, 2, ...``::

    m = b1 * m + (1 - b1) * g                 # m, v start at 0
    v = b2 * v + (1 - b2) * g**2
    m_hat = m / (1 - b1**t);  v_hat = v / (1 - b2**t)
    p <- p - lr_t * (m_hat / (sqrt(v_hat + eps_root) + eps) + weight_decay * p)

Defaults: ``b1 = 0.9``, ``b2 = 0.95`` (the usual LM-pretraining value; optax's own default
is 0.999, so pass ``b2=0.95`` to optax), ``eps = 1e-8``, ``eps_root = 0``,
``weight_decay = 1e-4`` (optax's default). The learning rate ``lr_t`` is supplied per
update by the caller. optax evaluates a schedule at its 0-based update count, and
``salt.reference.lr_at`` takes 1-based steps, so the runtime's optax schedule is
``lambda count: lr_at(count + 1, ...)`` (the reference trainer's ``lr_schedule`` does the same).

State is a plain dict of flattened arrays (``"layers/wq"`` names) and an int ``count``.
Arithmetic runs in the parameters' dtype.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from salt.reference.config import flatten_params, unflatten_params


def global_norm(tree: dict) -> float:
    """sqrt of the sum of squares of every leaf (nested or flat dict), in float64."""
    return math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64)))
                         for v in flatten_params(tree).values()))


def clip_by_global_norm(grads: dict, max_norm: float | None):
    """(clipped grads, pre-clipping global norm) with optax.clip_by_global_norm semantics.

    ``max_norm=None`` disables clipping (the norm is still returned)."""
    norm = global_norm(grads)
    if max_norm is None or norm < max_norm:
        return grads, norm
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0 (or None to disable clipping), got {max_norm!r}")
    flat = flatten_params(grads)
    return unflatten_params({k: (g / g.dtype.type(norm)) * g.dtype.type(max_norm)
                             for k, g in flat.items()}), norm


@dataclasses.dataclass(frozen=True)
class SGD:
    """Plain SGD: ``p <- p - lr * g`` (optax.sgd without momentum)."""

    name = "sgd"

    def init(self, params: dict) -> dict:
        return {"count": 0}

    def update(self, grads: dict, state: dict, params: dict, lr: float):
        """Returns (new params, new state)."""
        _check_lr(lr)
        g = flatten_params(grads)
        new = {k: p - p.dtype.type(lr) * g[k] for k, p in flatten_params(params).items()}
        return unflatten_params(new), {"count": state["count"] + 1}


@dataclasses.dataclass(frozen=True)
class AdamW:
    """optax.adamw's update in NumPy (see the module docstring)."""

    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    eps_root: float = 0.0
    weight_decay: float = 1e-4
    name = "adamw"

    def __post_init__(self):
        for field in ("b1", "b2"):
            value = getattr(self, field)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"AdamW.{field} must lie in [0, 1), got {value!r}")
        for field in ("eps", "eps_root", "weight_decay"):
            value = getattr(self, field)
            if not value >= 0.0:
                raise ValueError(f"AdamW.{field} must be >= 0, got {value!r}")

    def init(self, params: dict) -> dict:
        flat = flatten_params(params)
        return {"count": 0,
                "mu": {k: np.zeros_like(v) for k, v in flat.items()},
                "nu": {k: np.zeros_like(v) for k, v in flat.items()}}

    def update(self, grads: dict, state: dict, params: dict, lr: float):
        """Returns (new params, new state)."""
        _check_lr(lr)
        g_flat = flatten_params(grads)
        t = state["count"] + 1
        mu, nu, new = {}, {}, {}
        for k, p in flatten_params(params).items():
            f = p.dtype.type
            g = g_flat[k]
            mu[k] = f(1 - self.b1) * g + f(self.b1) * state["mu"][k]
            nu[k] = f(1 - self.b2) * (g * g) + f(self.b2) * state["nu"][k]
            m_hat = mu[k] / f(1 - self.b1 ** t)
            v_hat = nu[k] / f(1 - self.b2 ** t)
            update = m_hat / (np.sqrt(v_hat + f(self.eps_root)) + f(self.eps))
            update = update + f(self.weight_decay) * p
            new[k] = p + (-f(lr)) * update
        return unflatten_params(new), {"count": t, "mu": mu, "nu": nu}


def make_optimizer(name: str, **kwargs):
    """``"sgd"`` or ``"adamw"`` (kwargs go to AdamW)."""
    if name == "sgd":
        if kwargs:
            raise ValueError(f"sgd takes no options, got {sorted(kwargs)}")
        return SGD()
    if name == "adamw":
        return AdamW(**kwargs)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {name!r}")


def _check_lr(lr):
    if not (isinstance(lr, (int, float, np.floating)) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"learning rate must be a finite number >= 0, got {lr!r}")
