"""The compiled train step: ``(params, opt_state, teacher_params, windows_BxT1, step, hyper)
-> (params, opt_state, metrics)``.

One pure function serves both phases: with a teacher it is the KD step (loss
``(1-ω_j)·ce + ω_j·kd``, ω_j computed inside the step from ``j``, the teacher under
``stop_gradient``), without one the standard (CE) step.  The schedules' constants are runtime
scalars (``hyper``) so one executable serves every run with the same shapes; executables are
AOT-compiled (``jit(...).lower(...).compile()``), shared within a process and, with a
``compile_cache`` directory, kept across processes by JAX's persistent compilation cache.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from salt.reference.config import ModelConfig
from salt.runtime.model import losses, transformer as model, sharding
from salt.runtime.train import optim
from salt.runtime.train.config import TrainConfig, TrainError, resolve_kernels

HYPER_FIELDS = ("lr", "final_lr", "warmup", "steps", "clip", "weight_decay", "omega",
                "kd_steps", "kd_steps1")


def hyperparameters(cfg: TrainConfig) -> dict:
    """The step's runtime scalars (float32): the schedules' constants are arguments of the
    compiled step, not compile-time constants, so one executable serves every run.
    (ρ stays a compile-time constant: the KD-loss kernels take it as a static number.)"""
    values = {f: getattr(cfg, f) for f in HYPER_FIELDS}
    if values["kd_steps1"] is None:
        values["kd_steps1"] = values["kd_steps"]
    return {k: np.float32(v) for k, v in values.items()}


def split_batch(batch):
    """A step's batch: the windows ``[B, T+1]`` alone (causal LM), or a dict with ``tokens``
    ``[B, T+1]``, ``prefix_len`` ``[B]`` (bidirectional prefix) and ``mask`` ``[B, T]`` (the target
    positions that are scored), as the UL2 objective builds it (:mod:`salt.data.ul2`).  A KD step
    from a teacher cache carries ``topk_logits`` / ``topk_ids`` ``[B, T, k]`` in the dict too."""
    if isinstance(batch, dict):
        return batch["tokens"], batch.get("prefix_len"), batch.get("mask")
    return batch, None, None


def make_grad_fn(student: ModelConfig, teacher: ModelConfig | None, *, transition: str = "step",
                 rho: float = 0.25, dtype: str = "float32", kernels: str = "xla", remat: bool = False,
                 mesh=None, grad_accum: int = 1, loss_kernels: str | None = None,
                 kd_topk: int | None = None, vocab: int | None = None, vocab_chunks: int | None = None):
    """``(params, teacher_params, windows_BxT1, step, hyper) -> (grads, metrics)``: the gradient
    of the batch-mean loss and the batch-mean metrics; ``teacher`` None: the standard (CE) loss.

    The loss comes from the final hidden states and tied embeddings through the fused-linear
    kernels (:func:`salt.runtime.model.losses.token_parts`): no ``[tokens, vocab]`` logits unless
    ``kernels="naive"``.  ``grad_accum`` K > 1: the batch is split into K microbatches (microbatch
    ``k`` holds rows ``k, K + k, 2K + k, …``, so each device keeps its own rows) that run one after
    another in a ``lax.scan``; their gradients and metrics are averaged and ONE optimizer update
    follows — the large batch's step up to float rounding (every microbatch has the same number of
    positions, so the mean of the microbatch means is the batch mean).  ``loss_kernels``: the
    loss's implementation when it should differ from ``kernels`` (benchmarks: fused vs full-logits
    loss with the same attention).  ``kd_topk`` K: the KD step's loss is top-K KD (paper eq. 13-14);
    ``vocab``: the tokenizer's vocabulary when a model's embedding has padded rows beyond it (their
    columns get no probability; see :func:`salt.runtime.model.losses.token_parts`); ``vocab_chunks``: the
    vocabulary-parallel loss's chunk count on a data-only mesh (None: the automatic choice of
    :func:`salt.runtime.model.losses.token_parts`)."""
    compute_dtype = jnp.dtype(dtype)
    loss_impl = kernels if loss_kernels is None else loss_kernels
    if not isinstance(grad_accum, int) or grad_accum < 1:
        raise ValueError(f"grad_accum must be an integer >= 1, got {grad_accum!r}")

    def loss_fn(params, teacher_params, batch, step, hyper, n_valid=None):
        windows_BxT1, prefix_B, mask_BxT = split_batch(batch)
        inputs, labels = windows_BxT1[:, :-1], windows_BxT1[:, 1:]
        hidden = model.hidden(params, inputs, student, prefix_B, dtype=compute_dtype,
                              attention_impl=kernels, remat=remat, mesh=mesh)
        if isinstance(batch, dict) and "topk_logits" in batch:  # KD from a teacher cache
            omega = losses.omega_at(step, hyper["omega"], hyper["kd_steps"], transition,
                                    hyper["kd_steps1"])
            parts = losses.token_parts(hidden, model.head_matrix(params), labels, omega=omega, rho=rho, impl=loss_impl,
                                       mesh=mesh, vocab=vocab,
                                       teacher_topk=(batch["topk_logits"], batch["topk_ids"]))
        elif teacher is None:
            parts = losses.token_parts(hidden, model.head_matrix(params), labels, impl=loss_impl, mesh=mesh,
                                       vocab=vocab, vocab_chunks=vocab_chunks)
            omega = jnp.float32(0.0)
        else:  # the teacher reads the same input (same bidirectional prefix)
            t_hidden = jax.lax.stop_gradient(model.hidden(
                teacher_params, inputs, teacher, prefix_B, dtype=compute_dtype,
                attention_impl=kernels, remat=remat, mesh=mesh))
            omega = losses.omega_at(step, hyper["omega"], hyper["kd_steps"], transition,
                                    hyper["kd_steps1"])
            parts = losses.token_parts(hidden, model.head_matrix(params), labels,
                                       teacher=(t_hidden, model.head_matrix(teacher_params)), omega=omega,
                                       rho=rho, impl=loss_impl, mesh=mesh, kd_topk=kd_topk, vocab=vocab,
                                       vocab_chunks=vocab_chunks)
        mean = _position_mean(mask_BxT, n_valid)
        metrics = {k: mean(parts[k]) for k in ("loss", "ce", "kd", "kl") if k in parts}
        metrics["accuracy"] = mean(parts["correct"])
        metrics["omega"] = omega
        return metrics["loss"], metrics

    return _accumulated(jax.grad(loss_fn, has_aux=True), grad_accum, mesh)


def _position_mean(mask_BxT, n_valid):
    """The batch mean of per-position values: over every position, or with a target mask over
    the target positions only (``n_valid``: the whole batch's count, for microbatches)."""
    if mask_BxT is None:
        return losses.batch_mean
    m = mask_BxT.astype(jnp.float32)
    denominator = jnp.maximum(jnp.sum(m), 1.0) if n_valid is None else n_valid

    def mean(v):
        return jnp.sum(v.astype(jnp.float32) * m) / denominator
    return mean


def _accumulated(grad_fn, grad_accum: int, mesh):
    """``grad_fn`` over ``grad_accum`` microbatches in a ``lax.scan``, gradients and metrics
    averaged (see :func:`make_grad_fn`)."""
    def accumulated_grads(params, teacher_params, batch, step, hyper):
        if grad_accum == 1:
            return grad_fn(params, teacher_params, batch, step, hyper)
        B = split_batch(batch)[0].shape[0]
        if B % grad_accum:
            raise ValueError(f"batch {B} is not divisible by grad_accum={grad_accum}")

        def micro(x):  # [B, ...] -> [K, B/K, ...]
            x = x.reshape(B // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)
            if mesh is not None and mesh.size > 1 and (B // grad_accum) % mesh.shape["data"] == 0:
                x = jax.lax.with_sharding_constraint(
                    x, NamedSharding(mesh, P(None, "data", *([None] * (x.ndim - 2)))))
            return x

        micro_batches = jax.tree.map(micro, batch)
        mask_BxT = split_batch(batch)[2]
        # with a target mask the microbatches hold different numbers of targets: each one's sum
        # is divided by the whole batch's count and the results are added (not averaged)
        n_valid = None if mask_BxT is None else jnp.maximum(jnp.sum(mask_BxT.astype(jnp.float32)), 1.0)

        def body(total, micro_batch):
            value = grad_fn(params, teacher_params, micro_batch, step, hyper, n_valid)
            return jax.tree.map(jnp.add, total, value), None

        first = jax.tree.map(lambda x: x[0], micro_batches)
        shapes = jax.eval_shape(grad_fn, params, teacher_params, first, step, hyper, n_valid)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        total, _ = jax.lax.scan(body, zeros, micro_batches)
        if n_valid is not None:
            grads, metrics = total
            return grads, dict(metrics, omega=metrics["omega"] / grad_accum)
        return jax.tree.map(lambda x: x / grad_accum, total)
    return accumulated_grads


def make_step_fn(student: ModelConfig, teacher: ModelConfig | None, optimizer: str, *,
                 transition: str = "step", rho: float = 0.25, dtype: str = "float32",
                 kernels: str = "xla", remat: bool = False, mesh=None, grad_accum: int = 1,
                 loss_kernels: str | None = None, kd_topk: int | None = None, vocab: int | None = None,
                 vocab_chunks: int | None = None):
    """The pure train step ``(params, opt_state, teacher_params, windows_BxT1, step, hyper)
    -> (params, opt_state, metrics)``; ``teacher`` None builds the standard (CE) step.
    ``step`` is the 1-based step number; ``hyper`` the dict of :func:`hyperparameters`.
    Gradients and metrics from :func:`make_grad_fn` (same arguments), then one optimizer update."""
    direction = optim.make_direction(optimizer)
    accumulated_grads = make_grad_fn(student, teacher, transition=transition, rho=rho, dtype=dtype,
                                     kernels=kernels, remat=remat, mesh=mesh, grad_accum=grad_accum,
                                     loss_kernels=loss_kernels, kd_topk=kd_topk, vocab=vocab,
                                     vocab_chunks=vocab_chunks)

    def step_fn(params, opt_state, teacher_params, windows_BxT1, step, hyper):
        grads, metrics = accumulated_grads(params, teacher_params, windows_BxT1, step, hyper)
        grads, metrics["grad_norm"] = optim.clip_by_global_norm(grads, hyper["clip"])
        lr = optim.lr_at(step, hyper["lr"], hyper["warmup"], hyper["steps"], hyper["final_lr"])
        metrics["lr"] = lr
        updates, opt_state = direction.update(grads, opt_state, params)
        params = optim.apply_update(params, updates, lr, hyper["weight_decay"])
        return params, opt_state, metrics

    return step_fn


def abstract_hyper(mesh=None) -> dict:
    sh = None if mesh is None else sharding.replicated(mesh)
    return {k: jax.ShapeDtypeStruct((), jnp.float32, sharding=sh) for k in HYPER_FIELDS}


def compile_step(step_fn, params_abstract, opt_abstract, teacher_abstract, windows_abstract,
                 *, mesh=None, out_shardings=None, donate: bool = True, lower_only: bool = False):
    """AOT-compile (or only lower) a step on abstract arguments carrying their shardings."""
    sh = None if mesh is None else sharding.replicated(mesh)
    step_abstract = jax.ShapeDtypeStruct((), jnp.int32, sharding=sh)
    jitted = jax.jit(step_fn, donate_argnums=(0, 1) if donate else (),
                     out_shardings=out_shardings)
    lowered = jitted.lower(params_abstract, opt_abstract, teacher_abstract, windows_abstract,
                           step_abstract, abstract_hyper(mesh))
    return lowered if lower_only else lowered.compile()


def use_compile_cache(directory: str | None) -> None:
    """Point JAX's persistent compilation cache at ``directory`` (created if needed), so that
    executables are reused across processes (``salt train`` / ``salt plan`` at paper scale compile
    for minutes); None leaves the cache as it is (off unless configured).  Every executable is
    cached (no minimum compile time); the cache is trusted code: keep it private to the user."""
    if directory is None:
        return
    from jax.experimental.compilation_cache import compilation_cache as cc
    path = os.path.abspath(os.path.expanduser(directory))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise TrainError(f"compile_cache={directory!r}: cannot create the directory: {e}") from None
    if jax.config.jax_compilation_cache_dir != path:
        cc.set_cache_dir(path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        cc.reset_cache()  # the next compile opens the cache at the new directory


_COMPILED: dict = {}
_COMPILED_MAX = 16


def compiled_step(student, teacher, cfg: TrainConfig, mesh, params_abs, opt_abs, teacher_abs,
                  windows_abs, vocab: int | None = None):
    """The AOT-compiled step for this run, shared by runs in one process with the same
    model(s), optimizer, transition, dtype, kernels, shapes and mesh (e.g. the four
    students of ``salt reproduce``).  ``vocab``: the tokenizer's vocabulary when a model's
    embedding is padded beyond it (None: the embeddings' rows are the vocabulary)."""
    use_compile_cache(cfg.compile_cache)
    kernels = resolve_kernels(cfg.kernels, mesh.devices.flat[0].platform)
    kd = teacher is not None or (isinstance(windows_abs, dict) and "topk_logits" in windows_abs)
    key = (student, teacher, cfg.optimizer, cfg.transition if kd else None,
           float(cfg.rho) if kd else None, cfg.kd_topk if kd else None, vocab, cfg.dtype, kernels, cfg.remat,
           cfg.grad_accum, cfg.vocab_chunks, jax.tree.structure(windows_abs),
           tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(windows_abs)),
           tuple(d.id for d in mesh.devices.flat), mesh.devices.shape)
    if key not in _COMPILED:
        if len(_COMPILED) >= _COMPILED_MAX:
            _COMPILED.pop(next(iter(_COMPILED)))
        fn = make_step_fn(student, teacher, cfg.optimizer, transition=cfg.transition,
                          rho=float(cfg.rho), dtype=cfg.dtype, kernels=kernels,
                          remat=cfg.remat, mesh=mesh, grad_accum=cfg.grad_accum,
                          kd_topk=cfg.kd_topk if teacher is not None else None, vocab=vocab,
                          vocab_chunks=cfg.vocab_chunks)
        out_sh = (shardings_of(params_abs), shardings_of(opt_abs), sharding.replicated(mesh))
        _COMPILED[key] = compile_step(fn, params_abs, opt_abs, teacher_abs, windows_abs,
                                      mesh=mesh, out_shardings=out_sh)
    return _COMPILED[key]


def opt_state_abstract(optimizer: str, params_abs, mesh):
    """Abstract optimizer state with the shardings XLA propagates from the params' (leaves
    that do not depend on the params, e.g. step counts, are replicated over the mesh)."""
    init = optim.make_direction(optimizer).init
    shapes = jax.eval_shape(init, params_abs)
    chosen = jax.jit(init).lower(params_abs).compile().output_shardings
    replicated = sharding.replicated(mesh)

    def pick(shape, s):
        if not isinstance(s, jax.sharding.NamedSharding) or s.mesh.devices.shape != mesh.devices.shape:
            s = replicated
        return jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=s)

    return jax.tree.map(pick, shapes, chosen)


def shardings_of(tree):
    return jax.tree.map(lambda a: a.sharding, tree)


def abstract_of(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
