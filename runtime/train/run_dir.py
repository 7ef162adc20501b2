"""The run directory protocol: what ``--out`` may be, what a resume reads and checks, and the
records a run writes next to its checkpoints (``run_config.json``; ``metrics.jsonl`` is
:mod:`salt.runtime.train.metrics_log`'s).  Output rules: docs/safety.md.

A resume continues from the newest *intact* checkpoint with the configuration it recorded
(changes outside :attr:`TrainConfig.RESUMABLE_CHANGES` need ``--force``; another model never),
the tokenizer it recorded, and the teacher it pinned.  When the run saved checkpoints but none
is intact it refuses unless asked to start over: a resume never silently restarts.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import numpy as np

from salt.core import outputs
from salt.reference.config import ModelConfig, param_count
from salt.runtime.model import checkpoint
from salt.runtime.train.config import TrainConfig, TrainError

RUN_CONFIG = "run_config.json"


def check_out(cfg: TrainConfig, run_dir: pathlib.Path) -> None:
    """The output rule (docs/safety.md), before any work: --out is created only if absent or
    empty, resumed only if it is a run directory; it may not contain an input (a teacher, the
    data, a subset), and must be writable."""
    inputs = [x for x in (cfg.data, cfg.teacher, cfg.subset, cfg.exclude, cfg.teacher_cache, cfg.init) if x]
    try:
        outputs.check_output_dir(run_dir, "run", mode="resume" if cfg.resume else "create",
                                 inputs=inputs)
    except outputs.OutputError as e:
        raise TrainError(str(e)) from None
    if cfg.teacher:  # a teacher run that would live where the student writes
        t = pathlib.Path(cfg.teacher).absolute()
        for parent in (t, *t.parents):
            if parent == run_dir.absolute():
                raise TrainError(f"--teacher {cfg.teacher!r} lies inside --out {cfg.out!r}: a run "
                                 "cannot be its own teacher; choose another --out")


def read_json(path: pathlib.Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise TrainError(f"{what} {str(path)!r} is unreadable or not JSON ({e}); "
                         "restore it or choose another --out") from None
    if not isinstance(obj, dict):
        raise TrainError(f"{what} {str(path)!r} is not a JSON object")
    return obj


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "(not recorded)"


def config_changes(saved: dict, cfg) -> list[str]:
    """The fields a resume would change (``cfg``: a TrainConfig or FinetuneConfig; ``saved``: the
    configuration the run recorded; fields newer than the run compare with their defaults;
    ``RESUMABLE_CHANGES`` of the config's class may differ)."""
    now = cfg.to_dict()
    defaults = {f.name: _field_default(f) for f in dataclasses.fields(cfg)}
    return [f"{k}: saved {saved.get(k, defaults[k])!r}, now {now[k]!r}" for k in now
            if k not in type(cfg).RESUMABLE_CHANGES and saved.get(k, defaults[k]) != now[k]]


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """Where a run starts: ``step`` 0 (fresh, or started over) or its newest intact checkpoint,
    and the teacher identity it recorded (None: none recorded)."""

    step: int = 0
    pinned_teacher: dict | None = None


def resume_point(cfg: TrainConfig, run_dir: pathlib.Path, config: ModelConfig, tokenizer_sha: str,
                 start_over: bool) -> ResumePoint:
    """Check a ``--resume`` against what ``run_dir`` recorded and find its starting step."""
    if not (cfg.resume and (run_dir / RUN_CONFIG).exists()):
        return ResumePoint()
    saved = read_json(run_dir / RUN_CONFIG, "run config")
    if not isinstance(saved.get("train"), dict):
        raise TrainError(f"run config {str(run_dir / RUN_CONFIG)!r} has no 'train' object; "
                         "restore it or choose another --out")
    diffs = config_changes(saved["train"], cfg)
    if diffs and not cfg.force:
        raise TrainError(f"cannot resume {cfg.out!r} with a different configuration (pass "
                         f"--force to override): " + "; ".join(diffs))
    if isinstance(saved.get("model"), dict) and saved["model"] != config.to_dict():
        changed = sorted(k for k in set(saved["model"]) | set(config.to_dict())
                         if saved["model"].get(k) != config.to_dict().get(k))
        raise TrainError(f"cannot resume {cfg.out!r}: its checkpoints hold another model ({', '.join(changed)} "
                         f"differ; preset {saved['train'].get('preset')!r} -> {cfg.preset!r}); even "
                         "--force cannot change the model of a run; choose another --out")
    saved_steps = checkpoint.all_steps(run_dir)
    step = checkpoint.newest_intact(run_dir) or 0
    if saved_steps and step == 0 and not start_over:
        raise TrainError(f"cannot resume {cfg.out!r}: none of its checkpoints {saved_steps} is intact "
                         "(see above); nothing was changed.  Pass --start-over to train it again from "
                         "step 0 in this directory (the damaged steps are kept in "
                         f"{checkpoint.CORRUPT}/), or restore a checkpoint")
    if step == 0:  # started over: the teacher the run started with is kept
        return ResumePoint(0, saved.get("teacher"))
    try:
        meta = checkpoint.meta_of(run_dir, step)
    except ValueError as e:
        raise TrainError(str(e)) from None
    if meta.get("tokenizer_sha256") != tokenizer_sha:
        raise TrainError(f"run {cfg.out!r} was trained with tokenizer sha256 "
                         f"{meta.get('tokenizer_sha256')}, but {cfg.data!r} uses {tokenizer_sha}")
    return ResumePoint(step, meta.get("teacher") or saved.get("teacher"))


def check_init(cfg: TrainConfig, tokenizer_sha: str) -> None:
    """``--init RUN`` must share the data's tokenizer."""
    if cfg.init is None:
        return
    init_sha = checkpoint.read_meta(cfg.init).get("tokenizer_sha256")
    if init_sha != tokenizer_sha:
        raise TrainError(f"init {cfg.init!r} was trained with tokenizer sha256 {init_sha}, but the data "
                         f"{cfg.data!r} uses {tokenizer_sha}")


def run_record(cfg: TrainConfig, config: ModelConfig, store, teacher_identity) -> dict:
    """What ``run_config.json`` holds: the configuration, the model, the data's tokenizer and
    the teacher identity."""
    return {"train": cfg.to_dict(), "model": config.to_dict(),
            "tokenizer_sha256": store.tokenizer_sha256, "vocab_size": int(store.vocab_size),
            "teacher": teacher_identity, "param_count": param_count(config)}


def jsonable(x: Any):
    """``x`` with NumPy arrays and scalars as JSON lists and numbers (loader states)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


def verified_or_none(run_dir, step):
    """``step`` if its checkpoint verifies (what "the last good checkpoint" may name), else None."""
    if step is None:
        return None
    try:
        checkpoint.verify(run_dir, step)
        return step
    except checkpoint.CorruptCheckpoint:
        return None
