"""Argument checks shared by the loss entry points (:mod:`salt.kernels.logits_kd`,
:mod:`salt.kernels.fused_linear_kd`, :mod:`salt.kernels.topk_kd`): one clear ValueError per bad
argument, before anything is traced into a kernel."""
from __future__ import annotations

import math
import numbers

import jax.numpy as jnp


def check_rho(rho) -> float:
    """``rho`` as a float; ValueError unless a finite Python number > 0 (static: baked into kernels)."""
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real):
        raise ValueError(f"rho must be a Python number (it is static), got {type(rho).__name__} {rho!r}")
    rho = float(rho)
    if not (rho > 0.0 and math.isfinite(rho)):
        raise ValueError(f"rho must be a finite number > 0, got {rho!r}")
    return rho


def check_omega(omega):
    """``omega``: a Python number in [0, 1] (as float) or a scalar array (may be traced)."""
    if isinstance(omega, numbers.Real) and not isinstance(omega, bool):
        if not 0.0 <= float(omega) <= 1.0:
            raise ValueError(f"omega must be in [0, 1], got {omega!r}")
        return float(omega)
    omega = jnp.asarray(omega)
    if omega.ndim != 0:
        raise ValueError(f"omega must be a scalar, got shape {omega.shape}")
    return omega


def check_labels_mask(labels, mask, n_expected_shape):
    """``(labels int32, valid bool)`` of the expected shape (``mask`` None: every row valid)."""
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


def float_input(name, x):
    """``x`` as a JAX array; ValueError (naming ``name``) unless it is floating."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating array, got dtype {x.dtype}")
    return x
