"""Training losses of the runtime from final hidden states and the LM head matrix (the tied
embedding, or a separate ``lm_head``: ``transformer.head_matrix``) (docs/design.md §2),
and the ω schedule (§3) in ``jnp``.

:func:`token_parts` is the one loss entry point of the trainer, ``salt score`` and ``salt eval``:
per position the loss (``(1-ω)·ce + ω·kd`` with a teacher, ``ce`` without) and the monitored parts
``ce``, ``correct`` (argmax == label), ``n_greater`` (logits strictly above the label's) and, with a
teacher, ``kd`` and ``KL(Q‖P) = kd − H(Q)`` (``Q = softmax(ρ·t)``, ``P = softmax(s)``).  All of
them come out of :mod:`salt.kernels` (``fused_linear_kd_loss`` / ``fused_linear_ce_loss``): with
``impl`` "pallas" or "xla" no ``[tokens, vocab]`` array is formed; "naive" forms the full logits
(the cross-check).  With ``kd_topk`` K the KD term is the top-k KD of paper eq. 13-14 (P and Q
restricted to the teacher's top-K set and renormalised; :mod:`salt.kernels.topk_kd`, also without a
``[tokens, vocab]`` array on the fused paths); ``kd`` and ``kl`` are then those on the top-K set.
``vocab``: the tokenizer's vocabulary when the embeddings carry padded rows beyond it (their
columns get no probability in either softmax: the embeddings are cut to ``vocab`` rows).
The teacher's arrays get no gradient.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from salt.reference.schedule import TRANSITIONS  # noqa: F401 (one list of transitions)
from salt.kernels.fused_linear_kd import fused_linear_ce_loss, fused_linear_kd_loss
from salt.kernels.topk_kd import fused_linear_topk_kd_loss, topk_kd_loss_from_teacher_topk
from salt.kernels.vocab_parallel import local_loss

LOSS_IMPLS = ("naive", "xla", "pallas")


def token_parts(hidden_BxTxD, embed_VxD, labels_BxT, *, teacher=None, omega=0.0, rho=1.0,
                impl: str = "xla", mesh=None, kd_topk: int | None = None, vocab: int | None = None,
                vocab_chunks: int | None = None, teacher_topk=None) -> dict:
    """Per-position ``[B, T]`` float32 dict ``loss, ce, correct, n_greater`` (+ ``kd, kl`` with a
    teacher).  ``teacher``: ``(teacher_hidden_BxTxD_t, teacher_embed_VxD_t)`` or None (plain CE);
    ``omega`` may be traced, ``rho`` is static.  ``teacher_topk``: ``(logits_BxTxZ, ids_BxTxZ)``, the
    teacher's top-k set given (a teacher cache) instead of ``teacher``: top-k KD over it.
    ``mesh``: with more than one device the kernels run under ``shard_map`` with the batch over
    ``data``: vocabulary-parallel (:mod:`salt.kernels.vocab_parallel`, docs/design.md §11) when the
    mesh is ``data`` alone, the batch and both widths split over it, no ``kd_topk`` or
    ``teacher_topk``, and either ``vocab_chunks`` (its static chunk count) is given or the
    embeddings hold at least :data:`VOCAB_PARALLEL_MIN_BYTES` (``vocab_chunks`` None: the module's
    default count); otherwise the embeddings replicated, their gradient summed."""
    if impl not in LOSS_IMPLS:
        raise ValueError(f"loss impl must be one of {LOSS_IMPLS}, got {impl!r}")
    B, T, _ = hidden_BxTxD.shape
    embed_VxD = cut_vocab(embed_VxD, vocab, "the student").astype(hidden_BxTxD.dtype)
    if teacher is not None:
        t_hidden, t_embed = (jax.lax.stop_gradient(x) for x in teacher)
        teacher = (t_hidden, cut_vocab(t_embed, vocab, "the teacher").astype(t_hidden.dtype))
    cached = teacher_topk is not None
    if cached:
        if teacher is not None:
            raise ValueError("give teacher or teacher_topk, not both")
        teacher = tuple(jax.lax.stop_gradient(x) for x in teacher_topk)

    def kernel(h, e, y, w, *t):
        t = t or None
        b = h.shape[0]
        flat = lambda x: x.reshape(b * T, *x.shape[2:])  # noqa: E731
        if t is None:
            loss, parts = fused_linear_ce_loss(flat(h), e, flat(y), impl=impl, return_parts=True)
        elif cached:
            loss, parts = topk_kd_loss_from_teacher_topk(flat(h), e, flat(t[0]), flat(t[1]), flat(y), w, rho,
                                                         impl=impl, return_parts=True)
        elif kd_topk is not None:
            loss, parts = fused_linear_topk_kd_loss(flat(h), e, flat(t[0]), t[1], flat(y), w, rho, kd_topk,
                                                    impl=impl, return_parts=True)
        else:
            loss, parts = fused_linear_kd_loss(flat(h), e, flat(t[0]), t[1], flat(y), w, rho, impl=impl,
                                               return_parts=True)
        return {"loss": loss.reshape(b, T), **{k: v.reshape(b, T) for k, v in parts.items()}}

    omega = jnp.asarray(omega, jnp.float32)
    if impl != "naive" and mesh is not None and mesh.size > 1:
        from jax.sharding import PartitionSpec as P
        if not cached and _vocab_parallel_applies(mesh, B, embed_VxD, teacher, kd_topk, vocab_chunks):
            return _vocab_parallel(hidden_BxTxD, embed_VxD, labels_BxT, teacher, omega, rho, impl, mesh,
                                   vocab_chunks)
        data = "data" if B % mesh.shape["data"] == 0 else None
        t_specs = () if teacher is None else (P(data), P(data) if cached else P())
        kernel = jax.shard_map(kernel, mesh=mesh, in_specs=(P(data), P(), P(data), P()) + t_specs,
                               out_specs=P(data), check_vma=False)
    return kernel(hidden_BxTxD, embed_VxD, labels_BxT.astype(jnp.int32), omega, *(teacher or ()))


# Below this many bytes of embeddings (student + teacher, as the kernels read them) gathering them
# whole on every chip is cheap, and faster than the vocabulary-parallel exchange (and on a TPU a
# small ``[V/n, D]`` layout wastes most of its 128 lanes); ``vocab_chunks`` forces the latter.
VOCAB_PARALLEL_MIN_BYTES = 64 * 2**20


def _vocab_parallel_applies(mesh, B, embed_VxD, teacher, kd_topk, vocab_chunks) -> bool:
    n = mesh.shape["data"]
    embeddings = [embed_VxD] + ([] if teacher is None else [teacher[1]])
    big = sum(e.size * e.dtype.itemsize for e in embeddings) >= VOCAB_PARALLEL_MIN_BYTES
    return (kd_topk is None and mesh.size == n and n > 1 and B % n == 0
            and all(e.shape[1] % n == 0 for e in embeddings) and (big or vocab_chunks is not None))


def _vocab_parallel(hidden_BxTxD, embed_VxD, labels_BxT, teacher, omega, rho, impl, mesh, vocab_chunks):
    """:func:`token_parts` on a ``data``-only mesh: tokens and embedding widths split over
    ``data`` (the parameters' FSDP layout), the vocabulary-parallel kernels per chip."""
    from jax.sharding import PartitionSpec as P

    B, T, _ = hidden_BxTxD.shape
    n = mesh.shape["data"]

    def kernel(h, e, y, w, *t):
        b = h.shape[0]
        flat = lambda x: x.reshape(b * T, *x.shape[2:])  # noqa: E731
        t = (flat(t[0]), t[1]) if t else None
        loss, parts = local_loss(flat(h), e, flat(y), w, t, rho=rho, axis="data", n=n,
                                 vocab_chunks=vocab_chunks, impl=impl)
        return {"loss": loss.reshape(b, T), **{k: v.reshape(b, T) for k, v in parts.items()}}

    t_specs = () if teacher is None else (P("data"), P(None, "data"))
    kernel = jax.shard_map(kernel, mesh=mesh, in_specs=(P("data"), P(None, "data"), P("data"), P()) + t_specs,
                           out_specs=P("data"), check_vma=False)
    return kernel(hidden_BxTxD, embed_VxD, labels_BxT.astype(jnp.int32), omega, *(teacher or ()))


def cut_vocab(embed_VxD, vocab: int | None, who: str = "the model"):
    """The first ``vocab`` rows of a tied embedding whose rows beyond the tokenizer's vocabulary
    are padding (``vocab`` None or equal to the rows: unchanged).  The padded rows' logits are then
    never formed, so they get no probability and no gradient."""
    if vocab is None or vocab == embed_VxD.shape[0]:
        return embed_VxD
    if not 1 <= vocab <= embed_VxD.shape[0]:
        raise ValueError(f"{who}'s embedding has {embed_VxD.shape[0]} rows, fewer than the "
                         f"tokenizer's vocabulary {vocab}")
    return embed_VxD[:vocab]


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
    ``ω_j = ω f / (ω f + 1 - ω)`` with the same ``f``.  ``n_kd1`` is required by ``linear`` and
    ``linear-ratio`` (as in the reference) and ignored by ``step``.
    """
    if transition not in TRANSITIONS:
        raise ValueError(f"transition must be one of {TRANSITIONS}, got {transition!r}")
    if n_kd1 is None and transition != "step":
        raise ValueError(f"n_kd1 is required for transition {transition!r}, got None")
    j = jnp.asarray(step, jnp.float32)
    omega_f = jnp.asarray(omega, jnp.float32)
    n_kd = jnp.asarray(n_kd, jnp.float32)
    zero = jnp.float32(0.0)
    if transition == "step":
        return jnp.where(j <= n_kd, omega_f, zero)
    n_kd1 = jnp.asarray(n_kd1, jnp.float32)
    frac = jnp.clip((n_kd - j) / jnp.maximum(n_kd - n_kd1, 1.0), 0.0, 1.0)
    if transition == "linear":
        value = omega_f * frac
    else:  # the limit omega = 1 needs no division by zero in this form
        value = jnp.where(frac > 0, omega_f * frac / (omega_f * frac + (1.0 - omega_f)), zero)
    value = jnp.where(j <= n_kd1, omega_f, value)
    return jnp.where(j <= n_kd, value, zero)
