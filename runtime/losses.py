"""Training losses of the runtime (docs/design.md §2) and the ω schedule (§3) in ``jnp``.

``kd_loss_parts`` is the plain-JAX path: per position it returns the loss
``(1-ω)·ce + ω·kd`` and the monitored parts ``ce``, ``kd`` and ``KL(Q‖P) = kd − H(Q)``,
with ``Q = softmax(ρ·t)`` and ``P = softmax(s)``; the teacher logits are under
``stop_gradient``.  ``impl="pallas"`` / ``"xla"`` routes the loss (and its gradient)
and the monitored parts through ``salt.kernels.kd_loss`` (Pallas / its pure-JAX path).
``batch_mean`` averages over the valid (unmasked) target positions.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_IMPLS = ("naive", "xla", "pallas")
TRANSITIONS = ("step", "linear", "linear-ratio")


def ce_parts(student_logits_BxTxV, labels_BxT):
    """Per-position next-token cross-entropy and correctness (argmax == label)."""
    s = student_logits_BxTxV.astype(jnp.float32)
    lse = jax.nn.logsumexp(s, axis=-1)
    s_y = jnp.take_along_axis(s, labels_BxT[..., None].astype(jnp.int32), axis=-1)[..., 0]
    correct = (jnp.argmax(s, axis=-1) == labels_BxT).astype(jnp.float32)
    return {"ce": lse - s_y, "correct": correct}


def kd_loss_parts(student_logits_BxTxV, teacher_logits_BxTxV, labels_BxT, omega, rho):
    """Plain-JAX per-position loss and parts: dict of ``[B, T]`` float32 arrays
    ``loss, ce, kd, kl, correct``."""
    s = student_logits_BxTxV.astype(jnp.float32)
    t = jax.lax.stop_gradient(teacher_logits_BxTxV.astype(jnp.float32))
    lse = jax.nn.logsumexp(s, axis=-1)
    s_y = jnp.take_along_axis(s, labels_BxT[..., None].astype(jnp.int32), axis=-1)[..., 0]
    log_q = jax.nn.log_softmax(rho * t, axis=-1)
    q = jnp.exp(log_q)
    q_dot_s = jnp.sum(q * s, axis=-1)
    ce = lse - s_y
    kd = lse - q_dot_s
    entropy_q = -jnp.sum(jnp.where(q > 0, q * log_q, 0.0), axis=-1)
    correct = (jnp.argmax(s, axis=-1) == labels_BxT).astype(jnp.float32)
    return {"loss": (1.0 - omega) * ce + omega * kd, "ce": ce, "kd": kd,
            "kl": kd - entropy_q, "correct": correct}


def kd_loss(student_logits_BxTxV, teacher_logits_BxTxV, labels_BxT, omega, rho, *,
            impl: str = "naive", mesh=None):
    """Per-position parts as :func:`kd_loss_parts`; ``loss`` from the chosen implementation.
    ``mesh``: needed for the kernels on more than one device (run under ``shard_map``, batch
    over ``data``)."""
    if impl not in LOSS_IMPLS:
        raise ValueError(f"loss impl must be one of {LOSS_IMPLS}, got {impl!r}")
    if impl == "naive":
        return kd_loss_parts(student_logits_BxTxV, teacher_logits_BxTxV, labels_BxT, omega, rho)
    from salt.kernels.kd_loss import kd_loss as kernel_kd_loss
    kernel_impl = impl

    def kernel(s, t, y, w):  # the monitored parts come from the kernel too (no [B,T,V] copies)
        loss, parts = kernel_kd_loss(s, t, y, w, rho, impl=kernel_impl, return_parts=True)
        return loss, parts["ce"], parts["kd"], parts["kl"]

    teacher = jax.lax.stop_gradient(teacher_logits_BxTxV)
    omega = jnp.asarray(omega, jnp.float32)
    if mesh is not None and mesh.size > 1:
        from jax.sharding import PartitionSpec as P
        data = "data" if labels_BxT.shape[0] % mesh.shape["data"] == 0 else None
        kernel = jax.shard_map(kernel, mesh=mesh, in_specs=(P(data), P(data), P(data), P()),
                               out_specs=(P(data),) * 4, check_vma=False)
    loss, ce, kd, kl = kernel(student_logits_BxTxV, teacher, labels_BxT, omega)
    correct = (jnp.argmax(student_logits_BxTxV, axis=-1) == labels_BxT).astype(jnp.float32)
    return {"loss": loss, "ce": jax.lax.stop_gradient(ce), "kd": jax.lax.stop_gradient(kd),
            "kl": jax.lax.stop_gradient(kl), "correct": correct}


def batch_mean(values_BxT, mask_BxT=None):
    """Mean over valid positions (all positions when ``mask`` is None)."""
    values_BxT = values_BxT.astype(jnp.float32)
    if mask_BxT is None:
        return jnp.mean(values_BxT)
    mask = mask_BxT.astype(jnp.float32)
    return jnp.sum(values_BxT * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def omega_at(step, omega, n_kd, transition: str = "step", n_kd1=None):
    """ω at 1-based ``step``, docs/design.md §3 (same formulas as ``salt.reference.omega_at``).

    ``step``, ``omega``, ``n_kd`` and ``n_kd1`` may be traced; ``transition`` is static.
    ``step``: ω for step <= n_kd, 0 after.  ``linear``: ω up to n_kd1, then
    ``ω (n_kd - j) / (n_kd - n_kd1)``.  ``linear-ratio``: the ratio ω/(1-ω) decays linearly,
    ``ω_j = ω f / (ω f + 1 - ω)`` with the same ``f``.  ``n_kd1=None`` means ``n_kd``.
    """
    if transition not in TRANSITIONS:
        raise ValueError(f"transition must be one of {TRANSITIONS}, got {transition!r}")
    j = jnp.asarray(step, jnp.float32)
    omega_f = jnp.asarray(omega, jnp.float32)
    n_kd = jnp.asarray(n_kd, jnp.float32)
    zero = jnp.float32(0.0)
    if transition == "step":
        return jnp.where(j <= n_kd, omega_f, zero)
    n_kd1 = n_kd if n_kd1 is None else jnp.asarray(n_kd1, jnp.float32)
    frac = jnp.clip((n_kd - j) / jnp.maximum(n_kd - n_kd1, 1.0), 0.0, 1.0)
    if transition == "linear":
        value = omega_f * frac
    else:  # the limit omega = 1 needs no division by zero in this form
        value = jnp.where(frac > 0, omega_f * frac / (omega_f * frac + (1.0 - omega_f)), zero)
    value = jnp.where(j <= n_kd1, omega_f, value)
    return jnp.where(j <= n_kd, value, zero)
