"""The reference trainer: a few SALT steps of a tiny model in NumPy, for CPU debugging and
for golden training curves the JAX runtime must reproduce.

One trainer covers every variant (docs/design.md §1): with a teacher and ``n_kd > 0`` the first
``n_kd`` steps minimise the KD loss ``(1-ω_j)·CE + ω_j·soft-CE`` with ``ω_j =
omega_at(j, omega, n_kd, transition, n_kd1)`` (1-based step ``j``); afterwards (the standard
phase) no teacher forward pass runs at all and the loss is plain CE. BASELINE is ``n_kd = 0``;
RKD is ``n_kd = steps``.

Per step ``j`` (``step0 = j - 1``):

1. ``batch = batch_fn(step0)``: int [B, T+1] windows, or a dict with ``"tokens"`` and optional
   ``"mask"`` [B, T] (valid targets) and ``"prefix_len"`` [B] (prefix-LM);
2. ``ω_j``; if ``ω_j > 0``: teacher logits (teacher forward in the same dtype);
3. ``loss, grads = loss_and_grad(...)`` (mean over valid target positions);
4. clip by global norm (optax conventions, ``clip_norm=None`` disables);
5. ``lr_j = lr(step0)``; optimiser update (``salt.reference.optim``).

The metrics of step ``j`` are those of the parameters BEFORE its update (as a JAX train step
returns them). A step with ``ω_j = 0`` uses plain CE, which equals the KD loss at ω = 0 exactly.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from typing import Callable

import numpy as np
from tqdm import tqdm

from salt.reference.config import ModelConfig
from salt.reference.model import cast_params, check_params, forward, init_params, loss_and_grad
from salt.reference.optim import AdamW, clip_by_global_norm, make_optimizer
from salt.reference.schedule import lr_at, omega_at


def window_batches(tokens, batch: int, seq_len: int, seed: int = 0) -> Callable[[int], np.ndarray]:
    """batch_fn over a 1-D token array: non-overlapping windows of ``seq_len + 1`` tokens.

    Window ``w`` holds ``tokens[w*(seq_len+1) : (w+1)*(seq_len+1)]``. The windows are visited in
    the order of ``numpy.random.default_rng(seed).permutation(n_windows)`` (``seed=None``: in
    order), epoch after epoch (the same order each epoch); step ``step0`` takes the ``batch``
    windows at flat positions ``step0*batch ... step0*batch + batch - 1`` modulo ``n_windows``.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be a 1-D integer array, got {tokens.dtype} {tokens.shape}")
    if batch < 1 or seq_len < 1:
        raise ValueError(f"batch and seq_len must be >= 1, got batch={batch}, seq_len={seq_len}")
    n_windows = tokens.size // (seq_len + 1)
    if n_windows < 1:
        raise ValueError(f"tokens: {tokens.size} tokens hold no window of seq_len+1={seq_len + 1}")
    windows = tokens[: n_windows * (seq_len + 1)].reshape(n_windows, seq_len + 1)
    order = (np.arange(n_windows) if seed is None
             else np.random.default_rng(seed).permutation(n_windows))

    def batch_fn(step0: int) -> np.ndarray:
        flat = (step0 * batch + np.arange(batch)) % n_windows
        return windows[order[flat]].astype(np.int32)

    return batch_fn


def lr_schedule(peak_lr: float, warmup_steps: int, total_steps: int, final_lr: float):
    """``step0 -> lr_at(step0 + 1, ...)``: warm-up + cosine (salt.reference.schedule), validated now."""
    lr_at(1, peak_lr, warmup_steps, total_steps, final_lr)  # ValueError on bad settings

    def lr_fn(step0: int) -> float:
        return lr_at(step0 + 1, peak_lr, warmup_steps, total_steps, final_lr)

    return lr_fn


@dataclasses.dataclass
class TrainResult:
    params: dict
    history: list  # one dict per step: step, phase, omega, lr, loss, ce, kd, kl, accuracy, grad_norm


def _as_lr_fn(lr):
    if callable(lr):
        return lr
    if isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0:
        return lambda step0: float(lr)
    raise ValueError(f"lr must be a number >= 0 or a callable step0 -> lr, got {lr!r}")


def _unpack_batch(batch, step0):
    if isinstance(batch, dict):
        if "tokens" not in batch:
            raise ValueError(f"batch_fn({step0}) returned a dict without 'tokens'")
        return np.asarray(batch["tokens"]), batch.get("mask"), batch.get("prefix_len")
    return np.asarray(batch), None, None


def train(config: ModelConfig, batch_fn, steps: int, *, batch: int | None = None,
          seq_len: int | None = None, optimizer="adamw", lr=1e-3, teacher: tuple | None = None, omega: float = 0.0,
          rho: float = 1.0, n_kd: int = 0, transition: str = "step", n_kd1: int | None = None,
          seed: int = 0, params: dict | None = None, dtype=np.float32,
          clip_norm: float | None = 1.0, progress: bool = False) -> TrainResult:
    """Train ``config`` for ``steps`` steps; see the module docstring for the step.

    ``batch_fn(step0)``: the batch of 0-based step ``step0``; or a 1-D token array, then read
    as ``window_batches(tokens, batch, seq_len, seed)``.
    ``optimizer``: ``"sgd"``, ``"adamw"`` (default AdamW hyperparameters) or an optimiser object.
    ``lr``: a constant or a callable ``step0 -> lr`` (e.g. :func:`lr_schedule`).
    ``teacher``: ``(teacher_config, teacher_params)`` for the KD phase (needed when
    ``n_kd > 0`` and ``omega > 0``). ``params``: initial student params (default:
    ``init_params(config, seed)``), cast to ``dtype``.
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not isinstance(n_kd, int) or n_kd < 0:
        raise ValueError(f"n_kd must be an integer >= 0, got {n_kd!r}")
    if not callable(batch_fn):
        if batch is None or seq_len is None:
            raise ValueError("a token array as data needs batch= and seq_len=")
        batch_fn = window_batches(batch_fn, batch, seq_len, seed)
    elif batch is not None or seq_len is not None:
        raise ValueError("batch= and seq_len= apply to a token array, not to a batch_fn")
    lr_fn = _as_lr_fn(lr)
    if isinstance(optimizer, str):
        optimizer = make_optimizer(optimizer)
    params = init_params(config, seed, np.float64) if params is None else params
    check_params(params, config)
    params = cast_params(params, dtype)
    if teacher is not None:
        t_config, t_params = teacher
        check_params(t_params, t_config)
        if t_config.vocab_size != config.vocab_size:
            raise ValueError(f"teacher vocab_size={t_config.vocab_size} differs from the "
                             f"student's {config.vocab_size}")
        t_params = cast_params(t_params, dtype)
    elif n_kd > 0 and omega > 0:
        raise ValueError(f"n_kd={n_kd} and omega={omega} need a teacher (got None)")

    state = optimizer.init(params)
    history = []
    for step0 in tqdm(range(steps), desc="reference train", file=sys.stderr, disable=not progress):
        j = step0 + 1
        tokens, mask, prefix_len = _unpack_batch(batch_fn(step0), step0)
        omega_j = float(omega_at(j, omega, n_kd, transition, n_kd1)) if n_kd > 0 else 0.0
        teacher_logits = None
        if omega_j > 0:
            teacher_logits = forward(t_params, tokens[:, :-1], t_config, prefix_len)
        loss, grads, m = loss_and_grad(params, tokens, config, teacher_logits, omega_j, rho,
                                       mask, prefix_len)
        grads, grad_norm = clip_by_global_norm(grads, clip_norm)
        lr_j = float(lr_fn(step0))
        params, state = optimizer.update(grads, state, params, lr_j)
        history.append({"step": j, "phase": "kd" if j <= n_kd else "standard", "omega": omega_j,
                        "lr": lr_j, "loss": loss, "ce": m["ce"], "kd": m.get("kd", math.nan),
                        "kl": m.get("kl", math.nan), "accuracy": m["accuracy"],
                        "grad_norm": grad_norm})
    return TrainResult(params=params, history=history)


__all__ = ["AdamW", "TrainResult", "lr_schedule", "train", "window_batches"]
