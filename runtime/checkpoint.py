"""Checkpoints of a training run (orbax-checkpoint).

Layout of a run directory::

    RUN/run_config.json          the TrainConfig of the run (+ the resolved model config)
    RUN/metrics.jsonl            one JSON object per step
    RUN/checkpoints/<step>/      one orbax checkpoint per saved step, with three items:
        params/                  the student parameters (THE layout of reference/config.py)
        opt_state/               the optimizer state
        meta/                    JSON: step, model config, tokenizer sha256, vocab size,
                                 teacher identity (path, step, config; never its weights),
                                 loader state, run config

orbax writes each step to a temporary directory and renames it when complete, so a
process killed while saving leaves the previous checkpoints intact.
"""
from __future__ import annotations

import json
import os
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp

from salt.reference.config import ModelConfig

CHECKPOINTS = "checkpoints"
ITEMS = ("params", "opt_state", "meta")


def _manager(ckpt_root: pathlib.Path, *, create: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=None, create=create,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(ckpt_root.absolute(), item_names=ITEMS, options=options)


def checkpoint_root(run_dir) -> pathlib.Path:
    return pathlib.Path(run_dir) / CHECKPOINTS


def all_steps(run_dir) -> list[int]:
    """Saved (complete) steps of a run, ascending; [] when there are none."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    steps = []
    for child in root.iterdir():
        if child.is_dir() and child.name.isdigit() and (child / "meta").is_dir():
            steps.append(int(child.name))
    return sorted(steps)


def latest_step(run_dir) -> int | None:
    steps = all_steps(run_dir)
    return steps[-1] if steps else None


def save(run_dir, step: int, params, opt_state, meta: dict, *, keep: set[int] | None = None) -> None:
    """Save step ``step``; then delete older steps except those in ``keep`` (the newest
    checkpoint is always kept)."""
    mngr = _manager(checkpoint_root(run_dir), create=True)
    meta = dict(meta, step=int(step))
    mngr.save(int(step), args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        opt_state=ocp.args.StandardSave(opt_state),
        meta=ocp.args.JsonSave(meta)), force=True)
    mngr.wait_until_finished()
    if keep is not None:
        for old in mngr.all_steps():
            if old != step and old not in keep:
                mngr.delete(old)
    mngr.close()


def restore(run_dir, step: int, abstract_params, abstract_opt_state):
    """(params, opt_state, meta) of ``step``, placed as the abstract trees' shardings say."""
    mngr = _manager(checkpoint_root(run_dir), create=False)
    try:
        out = mngr.restore(int(step), args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            opt_state=ocp.args.StandardRestore(abstract_opt_state),
            meta=ocp.args.JsonRestore()))
    finally:
        mngr.close()
    return out["params"], out["opt_state"], dict(out["meta"])


def resolve(path, step: int | None = None) -> tuple[pathlib.Path, int]:
    """A run dir, its ``checkpoints/`` dir or one step's dir -> (run dir, step).

    ``step=None`` means the latest saved step (or the step of a step directory)."""
    p = pathlib.Path(path)
    if not p.exists():
        raise ValueError(f"checkpoint path {str(path)!r} does not exist")
    if p.name.isdigit() and (p / "meta").is_dir() and p.parent.name == CHECKPOINTS:
        run_dir = p.parent.parent
        if step is not None and step != int(p.name):
            raise ValueError(f"{str(path)!r} is the checkpoint of step {p.name}, not step {step}")
        return run_dir, int(p.name)
    if p.name == CHECKPOINTS and not (p / CHECKPOINTS).is_dir():
        p = p.parent
    steps = all_steps(p)
    if not steps:
        raise ValueError(f"no checkpoint found in {str(path)!r} (expected a run directory with "
                         f"{CHECKPOINTS}/<step>/)")
    if step is None:
        return p, steps[-1]
    if step not in steps:
        raise ValueError(f"{str(path)!r} has no checkpoint of step {step}; saved steps: {steps}")
    return p, int(step)


def read_meta(path, step: int | None = None) -> dict:
    run_dir, step = resolve(path, step)
    meta_dir = checkpoint_root(run_dir) / str(step) / "meta"
    files = sorted(meta_dir.glob("*"))
    for f in files:
        if f.is_file():
            try:
                return json.loads(f.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
    raise ValueError(f"checkpoint {meta_dir} has no readable metadata")


def load_params(path, step: int | None = None, *, shardings=None):
    """(ModelConfig, params, meta) of a saved checkpoint, for teachers, eval and scoring.

    ``path``: a run directory (latest step unless ``step``), its ``checkpoints/`` dir, or one
    step's directory. ``shardings``: optional tree of shardings for the params (default:
    float32 arrays on the default device)."""
    run_dir, step = resolve(path, step)
    meta = read_meta(run_dir, step)
    config = ModelConfig.from_dict(meta["config"])
    from salt.runtime.model import abstract_params
    abstract = abstract_params(config)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                                abstract)
    else:
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract, shardings)
    mngr = _manager(checkpoint_root(run_dir), create=False)
    try:
        out = mngr.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract)))
    finally:
        mngr.close()
    return config, out["params"], meta


def write_json_atomic(path, obj) -> None:
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, (tuple, set)):
        return list(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
