"""The SALT trainer: BASELINE, RKD, SALT and SALT_DS are one loop with different settings.

Step ``j`` (1-based; the loader is asked for ``step0 = j - 1``):

* ``j <= kd_steps`` (KD phase): the batch comes from the selection subset when one is given
  (SALT_DS), else from the full data; the teacher forward runs under ``stop_gradient`` and the
  loss is ``(1-ω_j)·ce + ω_j·kd`` with ``ω_j`` computed inside the compiled step from ``j``.
* ``j > kd_steps`` (standard phase): the batch of the full data at ``step0``; plain CE; no
  teacher forward.  At the switch the teacher's parameters are dropped.

Both steps are compiled ahead of time at start-up (``jit(...).lower(...).compile()``).
The reported metrics of step ``j`` are those of the parameters before its update.
Checkpoints every ``checkpoint_every`` steps, at the end and on SIGTERM; ``resume``
continues bit-identically (deterministic data order from ``step0``; no RNG in the step).
"""
from __future__ import annotations

import gc
import json
import math
import os
import pathlib
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from salt.reference.config import VOCAB_FROM_DATA, ModelConfig, get_preset, param_count
from salt.runtime import checkpoint, model, optim, sharding
from salt.runtime.config import NonFiniteLoss, TrainConfig, TrainError, resolve_kernels  # noqa: F401
from salt.runtime.step import (abstract_of, compiled_step, hyperparameters, opt_state_abstract,
                               shardings_of)


# ----------------------------------------------------------------------------- set-up helpers
def _open_store(path: str):
    from salt.data import TokenStore
    p = pathlib.Path(path)
    if not p.exists():
        raise TrainError(f"data directory {path!r} does not exist (prepare it with `salt data`)")
    try:
        return TokenStore(p)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise TrainError(f"cannot open the token store {path!r}: {e}") from None


def _load_ids(path: str, what: str) -> np.ndarray:
    p = pathlib.Path(path)
    if not p.is_file():
        raise TrainError(f"{what} file {path!r} does not exist")
    try:
        ids = np.load(p, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise TrainError(f"{what} file {path!r} is not a readable .npy array: {e}") from None
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise TrainError(f"{what} file {path!r} must hold a 1-D integer array of window ids, "
                         f"got {ids.dtype} {ids.shape}")
    if ids.size == 0:
        raise TrainError(f"{what} file {path!r} is empty")
    return ids.astype(np.int64)


def student_config(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    config = get_preset(cfg.preset)
    if cfg.preset in VOCAB_FROM_DATA:
        return config.replace(vocab_size=int(vocab_size))
    if config.vocab_size < vocab_size:
        raise TrainError(f"preset {cfg.preset} has vocab_size={config.vocab_size} < the data's "
                         f"vocabulary {vocab_size}")
    return config


def load_teacher(cfg: TrainConfig, student: ModelConfig, tokenizer_sha256: str, mesh=None):
    """(teacher config, params (sharded when ``mesh``), identity dict); checks tokenizer/vocab."""
    try:
        run_dir, step = checkpoint.resolve(cfg.teacher, cfg.teacher_step)
        meta = checkpoint.read_meta(run_dir, step)
        t_config = ModelConfig.from_dict(meta["config"])
    except (ValueError, KeyError) as e:
        raise TrainError(f"teacher {cfg.teacher!r}: {e}") from None
    t_sha = meta.get("tokenizer_sha256")
    if t_sha != tokenizer_sha256:
        raise TrainError(f"teacher {cfg.teacher!r} (step {step}) was trained with tokenizer sha256 "
                         f"{t_sha}, but the data {cfg.data!r} uses {tokenizer_sha256}")
    if t_config.vocab_size != student.vocab_size:
        raise TrainError(f"teacher vocab_size={t_config.vocab_size} differs from the student's "
                         f"{student.vocab_size}")
    shardings = sharding.param_shardings(t_config, mesh) if mesh is not None else None
    t_config, t_params, _ = checkpoint.load_params(run_dir, step, shardings=shardings)
    identity = {"path": str(pathlib.Path(run_dir).absolute()), "step": int(step),
                "config": t_config.to_dict()}
    return t_config, t_params, identity


def _check_resume_config(saved: dict, cfg: TrainConfig) -> list[str]:
    now = cfg.to_dict()
    return [f"{k}: saved {saved.get(k)!r}, now {now[k]!r}" for k in now
            if k not in TrainConfig.RESUMABLE_CHANGES and saved.get(k) != now[k]]


class _Stop:
    """SIGTERM flag: the loop saves a checkpoint after the current step and returns."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handler(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _truncate_metrics(path: pathlib.Path, last_step: int) -> None:
    """Drop metric lines past ``last_step`` (written after the checkpoint we resume from)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(l + "\n" for l in keep))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, *, progress: bool = True) -> dict:
    """Train per ``cfg``; returns a summary dict. Raises TrainError on bad input (before any
    output is written) and NonFiniteLoss when the loss stops being finite."""
    cfg.validate()
    sharding.maybe_initialize_distributed()
    store = _open_store(cfg.data)
    tokenizer_sha = store.tokenizer_sha256
    config = student_config(cfg, store.vocab_size)
    run_dir = pathlib.Path(cfg.out)
    ckpt_steps = checkpoint.all_steps(run_dir)
    start_step = 0
    if run_dir.exists() and any(run_dir.iterdir()) and not cfg.resume:
        raise TrainError(f"output directory {cfg.out!r} already exists and is not empty; pass "
                         f"--resume to continue it or choose another --out")
    if cfg.resume and ckpt_steps:
        saved_path = run_dir / "run_config.json"
        saved = json.loads(saved_path.read_text()) if saved_path.exists() else {}
        diffs = _check_resume_config(saved.get("train", {}), cfg)
        if diffs and not cfg.force:
            raise TrainError(f"cannot resume {cfg.out!r} with a different configuration (pass "
                             f"--force to override): " + "; ".join(diffs))
        start_step = ckpt_steps[-1]
        meta = checkpoint.read_meta(run_dir, start_step)
        if meta.get("tokenizer_sha256") != tokenizer_sha:
            raise TrainError(f"run {cfg.out!r} was trained with tokenizer sha256 "
                             f"{meta.get('tokenizer_sha256')}, but {cfg.data!r} uses {tokenizer_sha}")
    subset_ids = _load_ids(cfg.subset, "subset") if cfg.subset else None
    exclude_ids = _load_ids(cfg.exclude, "exclude") if cfg.exclude else None

    mesh = sharding.make_mesh(cfg.mesh)
    if cfg.batch % mesh.shape["data"]:
        raise TrainError(f"batch={cfg.batch} is not divisible by the data axis "
                         f"({mesh.shape['data']}) of mesh {cfg.mesh!r}")
    need_teacher = cfg.kd_steps > start_step
    # the teacher travels in a dict the loop empties at the switch, so no frame keeps its params
    teacher = {"config": None, "params": None, "identity": None}
    if cfg.kd_steps > 0:
        if need_teacher:
            teacher["config"], teacher["params"], teacher["identity"] = load_teacher(
                cfg, config, tokenizer_sha, mesh)
        else:  # resuming past the KD phase: record the identity, load nothing
            teacher["identity"] = checkpoint.read_meta(run_dir, start_step).get("teacher")

    if cfg.runtime == "reference":
        from salt.runtime.reference_train import train_reference
        return train_reference(cfg, config, store, subset_ids, exclude_ids, teacher, run_dir,
                                progress)
    return _train_jax(cfg, config, store, mesh, subset_ids, exclude_ids, teacher, run_dir,
                      start_step, progress)


def make_loaders(cfg, store, subset_ids, exclude_ids):
    from salt.data import Loader
    common = dict(seq_len=cfg.seq_len, global_batch=cfg.batch, seed=cfg.seed, split="train",
                  process_index=jax.process_index(), process_count=jax.process_count())
    try:
        full = Loader(store, exclude=exclude_ids, **common)
        kd = Loader(store, subset=subset_ids, **common) if subset_ids is not None else full
    except ValueError as e:
        raise TrainError(f"data {cfg.data!r}: {e}") from None
    return full, kd


def _train_jax(cfg, config, store, mesh, subset_ids, exclude_ids, teacher, run_dir, start_step,
               progress):
    teacher_config, teacher_identity = teacher["config"], teacher["identity"]
    teacher_params = teacher.pop("params")
    full_loader, kd_loader = make_loaders(cfg, store, subset_ids, exclude_ids)
    if start_step > 0:  # the data (pool, order, tokenizer) must be the one the run used
        saved_state = checkpoint.read_meta(run_dir, start_step).get("loader_state")
        loader = kd_loader if start_step < cfg.kd_steps else full_loader
        try:
            if saved_state is not None:
                loader.check_state(saved_state)
        except ValueError as e:
            if not cfg.force:
                raise TrainError(f"cannot resume {str(run_dir)!r}: {e} (pass --force to override)") from None
    p_shardings = sharding.param_shardings(config, mesh)
    params_abs = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              model.abstract_params(config), p_shardings)
    opt_abs = opt_state_abstract(cfg.optimizer, params_abs, mesh)
    if start_step == 0:
        # generated on the devices, each shard where it lives: no host ever holds the model
        # (paper-8.6b is 34 GB in float32); the values do not depend on the mesh
        params = model.init_params_jax(config, cfg.seed, out_shardings=p_shardings)
        init = optim.make_direction(cfg.optimizer).init
        opt_state = jax.jit(init, out_shardings=shardings_of(opt_abs))(params)
    else:
        params, opt_state, _ = checkpoint.restore(run_dir, start_step, params_abs, opt_abs)

    windows_abs = jax.ShapeDtypeStruct((cfg.batch, cfg.seq_len + 1), jnp.int32,
                                       sharding=sharding.batch_sharding(mesh))
    t0 = time.perf_counter()
    std_step = kd_step = None
    if cfg.kd_steps < cfg.steps:
        std_step = compiled_step(config, None, cfg, mesh, params_abs, opt_abs, None, windows_abs)
    if teacher_params is not None:
        kd_step = compiled_step(config, teacher_config, cfg, mesh, params_abs, opt_abs,
                                abstract_of(teacher_params), windows_abs)
    compile_s = time.perf_counter() - t0
    hyper = jax.device_put(hyperparameters(cfg), sharding.replicated(mesh))
    step_sharding = sharding.replicated(mesh)

    run_dir.mkdir(parents=True, exist_ok=True)
    run_record = {"train": cfg.to_dict(), "model": config.to_dict(),
                  "tokenizer_sha256": store.tokenizer_sha256, "vocab_size": int(store.vocab_size),
                  "teacher": teacher_identity, "param_count": param_count(config)}
    first_process = jax.process_index() == 0
    if first_process and (start_step == 0 or not (run_dir / "run_config.json").exists()):
        checkpoint.write_json_atomic(run_dir / "run_config.json", run_record)
    metrics_path = run_dir / "metrics.jsonl"
    if first_process:
        _truncate_metrics(metrics_path, start_step)
    keep = set(int(s) for s in cfg.keep_checkpoints)
    if cfg.kd_steps > 0:
        keep.add(cfg.kd_steps)  # the "early" evaluation point n_kd

    def meta_for(step):
        loader = kd_loader if step < cfg.kd_steps else full_loader
        return {"config": config.to_dict(), "tokenizer_sha256": store.tokenizer_sha256,
                "vocab_size": int(store.vocab_size), "teacher": teacher_identity,
                "run_config": cfg.to_dict(), "loader_state": jsonable(loader.state(step)),
                "preset": cfg.preset}

    last_saved = start_step if start_step > 0 else None
    step = start_step
    history: list[dict] = []
    bar = _progress(cfg.steps, start_step, progress)
    times = {"kd": [], "standard": []}
    try:
        with _Stop() as stop, open(metrics_path, "a") as metrics_file:
            for step in range(start_step + 1, cfg.steps + 1):
                kd_phase = step <= cfg.kd_steps
                if not kd_phase and teacher_params is not None:
                    teacher_params = kd_step = None  # the switch: drop the teacher
                    gc.collect()
                loader = kd_loader if kd_phase else full_loader
                local = loader.batch(step - 1)
                windows = sharding.global_batch_array(local, mesh, cfg.batch)
                step_arr = jax.device_put(np.int32(step), step_sharding)
                t_start = time.perf_counter()
                if kd_phase:
                    params, opt_state, m = kd_step(params, opt_state, teacher_params, windows, step_arr, hyper)
                else:
                    params, opt_state, m = std_step(params, opt_state, None, windows, step_arr, hyper)
                m = {k: float(v) for k, v in jax.device_get(m).items()}
                elapsed = time.perf_counter() - t_start
                phase = "kd" if kd_phase else "standard"
                times[phase].append(elapsed)
                record = {"step": step, "phase": phase, "loss": m["loss"], "ce": m["ce"],
                          "kd": m.get("kd", math.nan), "kl": m.get("kl", math.nan),
                          "omega": m["omega"], "lr": m["lr"], "accuracy": m["accuracy"],
                          "grad_norm": m["grad_norm"],
                          "tokens_per_s": cfg.batch * cfg.seq_len / max(elapsed, 1e-9)}
                if not math.isfinite(m["loss"]):
                    raise NonFiniteLoss(step, m["loss"], last_saved)
                if first_process:
                    metrics_file.write(json.dumps(finite_or_none(record)) + "\n")
                    metrics_file.flush()
                history.append(record)
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}", phase=phase)
                periodic = cfg.checkpoint_every and step % cfg.checkpoint_every == 0
                if periodic or step == cfg.steps or step == cfg.kd_steps or stop.requested:
                    checkpoint.save(run_dir, step, params, opt_state, meta_for(step), keep=keep)
                    last_saved = step
                if stop.requested:
                    break
    finally:
        bar.close()
    interrupted = step < cfg.steps
    return {"run_dir": str(run_dir), "preset": cfg.preset, "model": config.to_dict(),
            "start_step": start_step, "last_step": step, "interrupted": interrupted,
            "last_checkpoint": last_saved, "compile_s": compile_s,
            "final": history[-1] if history else None,
            "kd_step_s": float(np.median(times["kd"])) if times["kd"] else None,
            "standard_step_s": float(np.median(times["standard"])) if times["standard"] else None}


def _progress(total, initial, enabled):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc="train", file=sys.stderr, disable=not enabled,
                dynamic_ncols=True)


def jsonable(x: Any):
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


def finite_or_none(record: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()}
