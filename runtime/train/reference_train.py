"""``salt train --runtime reference``: the NumPy reference trainer (``salt.reference.trainer``)
behind the runtime's command line, run directory and checkpoint format.

Same batches, initial parameters, AdamW, clipping and schedules as the JAX runtime; meant for
tiny models (debugging and cross-checking), kept out of the production loop.
"""
from __future__ import annotations

import math
import time

import jax
import numpy as np

from salt.core import outputs
from salt.reference import trainer as ref_trainer
from salt.reference.optim import AdamW
from salt.reference.schedule import lr_at as ref_lr_at
from salt.runtime.model import checkpoint, transformer as model
from salt.runtime.train import optim
from salt.runtime.train.config import NonFiniteLoss, TrainError
from salt.runtime.train.metrics_log import MetricsSink
from salt.runtime.train.run_dir import RUN_CONFIG, jsonable, run_record


def train_reference(cfg, config, store, loaders, teacher, run_dir, progress):
    """The NumPy reference trainer (salt.reference.trainer) on the same batches, the same
    initial parameters, AdamW, clipping and schedule; metrics and a final checkpoint in the
    runtime's format.  Meant for tiny models (debugging and cross-checking)."""
    if cfg.optimizer != "adamw":
        raise TrainError(f"--runtime reference supports --optimizer adamw only, got {cfg.optimizer!r}")
    if cfg.dtype != "float32":
        raise TrainError("--runtime reference computes in float32 only (got --dtype "
                         f"{cfg.dtype})")
    if checkpoint.all_steps(run_dir):
        raise TrainError(f"--runtime reference cannot resume; {str(run_dir)!r} already has checkpoints")
    full_loader, kd_loader = loaders
    teacher_config, teacher_identity, teacher_params = teacher.config, teacher.identity, teacher.params

    def batch_fn(step0):
        return (kd_loader if step0 < cfg.kd_steps else full_loader).batch(step0)

    ref_teacher = None
    if teacher_params is not None:
        ref_teacher = (teacher_config,
                       jax.tree.map(lambda x: np.asarray(x, np.float32), teacher_params))
    run_dir.mkdir(parents=True, exist_ok=True)
    outputs.write_json(run_dir / RUN_CONFIG, run_record(cfg, config, store, teacher_identity))
    start = time.perf_counter()
    result = ref_trainer.train(
        config, batch_fn, cfg.steps, optimizer=AdamW(b1=optim.ADAMW_B1, b2=optim.ADAMW_B2,
                                                     eps=optim.ADAMW_EPS,
                                                     weight_decay=cfg.weight_decay),
        lr=lambda step0: ref_lr_at(step0 + 1, cfg.lr, cfg.warmup, cfg.steps, cfg.final_lr),
        teacher=ref_teacher, omega=cfg.omega if cfg.kd_steps else 0.0, rho=cfg.rho,
        n_kd=cfg.kd_steps, transition=cfg.transition, n_kd1=cfg.kd_steps1, seed=cfg.seed,
        dtype=np.float32, clip_norm=cfg.clip if cfg.clip > 0 else None, progress=progress,
        params=jax.tree.map(np.asarray, model.init_params_jax(config, cfg.seed)))  # the JAX runtime's
    elapsed = time.perf_counter() - start
    tokens_per_s = cfg.steps * cfg.batch * cfg.seq_len / max(elapsed, 1e-9)
    bad = next((r for r in result.history if not math.isfinite(r["loss"])), None)
    if bad is not None:
        raise NonFiniteLoss(bad["step"], bad["loss"], None)
    with MetricsSink(run_dir, 0, wandb_project=cfg.wandb, config=cfg.to_dict()) as sink:
        sink.write([dict(record, tokens_per_s=tokens_per_s) for record in result.history])
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), result.params)
    meta = {"config": config.to_dict(), "tokenizer_sha256": store.tokenizer_sha256,
            "vocab_size": int(store.vocab_size), "teacher": teacher_identity,
            "run_config": cfg.to_dict(), "loader_state": jsonable(full_loader.state(cfg.steps)),
            "preset": cfg.preset, "runtime": "reference"}
    checkpoint.save(run_dir, cfg.steps, params, {"count": np.asarray(cfg.steps, np.int32)}, meta)
    return {"run_dir": str(run_dir), "preset": cfg.preset, "model": config.to_dict(),
            "start_step": 0, "last_step": cfg.steps, "interrupted": False,
            "last_checkpoint": cfg.steps, "compile_s": 0.0,
            "final": result.history[-1] if result.history else None, "history": result.history}
