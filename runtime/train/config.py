"""The trainer's configuration: one frozen dataclass, its validation and the user-facing errors.

``TrainConfig`` is what ``salt train`` (and ``salt reproduce`` for each of its runs) hands to
:func:`salt.runtime.train.trainer.train`; it is recorded in ``RUN/run_config.json`` and compared on
``--resume``.  ``validate`` raises :class:`TrainError` naming the first bad field.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import pathlib
import types
import typing

import jax

from salt.kernels import default_impl
from salt.reference.config import PAPER_OMEGA, PAPER_RHO, get_preset
from salt.runtime.model import losses, sharding
from salt.runtime.train import optim

# "jax": the JAX runtime on the default platform; "tpu" / "gpu" / "cpu": on that platform's devices;
# "reference": the NumPy reference trainer (tiny models).
JAX_PLATFORMS = ("tpu", "gpu", "cpu")
RUNTIMES = ("jax",) + JAX_PLATFORMS + ("reference",)
KERNELS = ("auto", "pallas", "xla", "naive")
OBJECTIVES = ("causal", "ul2")  # ul2: the mixture of salt.data.ul2 (docs/design.md §7)
DTYPES = ("float32", "bfloat16")
COMPILE_CACHE_ENV = "SALT_COMPILE_CACHE"
COMPILE_CACHE_OFF = ("", "off", "none")


def resolve_kernels(name: str, platform: str | None = None) -> str:
    """``--kernels``: "pallas" (the Pallas kernels of the platform: TPU kernels; on a GPU the
    fused-linear losses' GPU kernel, the xla paths elsewhere), "xla" (the pure-JAX chunked paths: no
    ``[tokens, vocab]`` logits or probabilities, flash attention) or "naive" (plain full-size
    maths); "auto" is :func:`salt.kernels.default_impl` (Pallas on TPU and GPU, "xla" elsewhere;
    ``platform``: default JAX's)."""
    if name == "auto":
        return default_impl(platform)
    return name


def _platform_devices(platform: str) -> list:
    try:
        return list(jax.devices(platform))
    except RuntimeError:  # unknown or uninitialisable backend
        return []


def runtime_devices(runtime: str) -> list:
    """The devices ``--runtime`` runs on ("jax" and "reference": JAX's default devices).  A
    platform without devices raises :class:`TrainError` naming what was found."""
    if runtime not in JAX_PLATFORMS:
        return list(jax.devices())
    devices = _platform_devices(runtime)
    if devices:
        return devices
    found = {}
    for d in jax.devices():
        found[d.platform] = found.get(d.platform, 0) + 1
    found_text = ", ".join(f"{n} {p} device{'s' if n > 1 else ''}" for p, n in found.items()) or "none"
    hint = ""
    if runtime == "tpu":
        hint = ("; to size a TPU run from this host (ahead-of-time compiled for a topology, no TPU "
                "needed) use `salt plan --topology ...`")
    raise TrainError(f"runtime={runtime!r}: JAX finds no {runtime.upper()} devices on this host "
                     f"(found: {found_text}){hint}")


def default_compile_cache() -> str | None:
    """``$SALT_COMPILE_CACHE`` ("off" disables), else ``$XDG_CACHE_HOME/salt/jax-compile``
    (``~/.cache/salt/jax-compile``)."""
    env = os.environ.get(COMPILE_CACHE_ENV)
    if env is not None:
        return None if env.strip().lower() in COMPILE_CACHE_OFF else env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "salt", "jax-compile")


class TrainError(ValueError):
    """Bad input or an unrecoverable condition, with a message meant for the user."""


class NonFiniteLoss(TrainError):
    def __init__(self, step: int, loss: float, last_checkpoint: int | None):
        self.step, self.loss, self.last_checkpoint = step, loss, last_checkpoint
        kept = (f"the last good (verified) checkpoint (step {last_checkpoint}) is kept"
                if last_checkpoint is not None else "no checkpoint was written")
        super().__init__(f"non-finite loss {loss} at step {step}; training stopped; {kept}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    preset: str
    data: str
    out: str
    teacher: str | None = None
    teacher_step: int | None = None
    kd_steps: int = 0
    omega: float = PAPER_OMEGA
    rho: float = PAPER_RHO
    kd_topk: int | None = None  # top-k KD (paper eq. 13-14) over the teacher's top-k; None: full vocab
    teacher_cache: str | None = None  # `salt teacher cache` output: the KD phase without a teacher forward
    transition: str = "step"
    kd_steps1: int | None = None
    steps: int = 100
    batch: int = 8
    seq_len: int = 64
    optimizer: str = "adafactor"
    lr: float = 1e-3
    final_lr: float = 1e-4
    warmup: int = 0
    clip: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    mesh: str = "data=1,model=1"
    subset: str | None = None
    exclude: str | None = None
    dtype: str = "float32"
    kernels: str = "auto"
    checkpoint_every: int = 0
    log_every: int = 10  # metrics fetched from the device every this many steps (and at checkpoints)
    checkpoint_minutes: float = 10.0   # also save when this much wall time passed (0: off)
    keep_checkpoints: tuple = ()
    runtime: str = "jax"
    resume: bool = False
    force: bool = False
    remat: bool = False
    objective: str = "causal"
    grad_accum: int = 1
    vocab_chunks: int | None = None  # vocabulary-parallel loss chunks (None: automatic, losses.token_parts)
    compile_cache: str | None = None  # JAX persistent compilation cache directory (None: off)
    # start from this run's newest checkpoint (its architecture and weights; e.g. `salt import hf`)
    # instead of a preset's random initialisation: continued pre-training. preset is then ""
    init: str | None = None
    wandb: str | None = None  # W&B project the metrics are also logged to (optional dependency wandb)

    # fields that may differ between a run and its resumption
    RESUMABLE_CHANGES = ("resume", "force", "checkpoint_every", "checkpoint_minutes", "log_every",
                         "keep_checkpoints", "out", "compile_cache", "vocab_chunks", "wandb")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["keep_checkpoints"] = list(self.keep_checkpoints)
        return d

    def to_nested(self) -> dict:
        """The config as the groups of a ``--config`` file (:data:`GROUPS`)."""
        flat = self.to_dict()
        return {group: {name: flat[name] for name in names} for group, names in GROUPS.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """The config a run recorded (``to_dict``); fields this version does not know are
        ignored, fields the record lacks take their defaults."""
        if not isinstance(d, dict):
            raise TypeError(f"a recorded train config must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [n for n in ("preset", "data", "out") if n not in d]
        if missing:
            raise ValueError(f"the recorded train config lacks {', '.join(missing)}")
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs["keep_checkpoints"] = tuple(kwargs.get("keep_checkpoints") or ())
        return cls(**kwargs)

    def validate(self) -> None:
        """Raise TrainError naming the first bad field."""
        def bad(field, why):
            raise TrainError(f"{field}={getattr(self, field)!r}: {why}")
        if self.init is not None:
            if self.preset:
                bad("preset", "--init takes the architecture of the run it starts from; drop --preset")
            if self.runtime == "reference":
                bad("init", "the reference runtime starts from a preset's initialisation only")
        else:
            try:
                get_preset(self.preset)
            except ValueError as e:
                raise TrainError(str(e)) from None
        for field in ("steps", "batch", "seq_len", "grad_accum", "log_every"):
            v = getattr(self, field)
            if not isinstance(v, int) or v < 1:
                bad(field, "must be an integer >= 1")
        if not isinstance(self.kd_steps, int) or self.kd_steps < 0:
            bad("kd_steps", "must be an integer >= 0")
        if self.kd_steps > self.steps:
            raise TrainError(f"kd_steps={self.kd_steps} is larger than steps={self.steps}")
        if not (0.0 <= self.omega <= 1.0) or not math.isfinite(self.omega):
            bad("omega", "must lie in [0, 1]")
        if not (self.rho > 0) or not math.isfinite(self.rho):
            bad("rho", "must be a finite number > 0")
        if self.transition not in losses.TRANSITIONS:
            bad("transition", f"must be one of {losses.TRANSITIONS}")
        if self.kd_steps1 is not None and not (0 <= self.kd_steps1 <= self.kd_steps):
            bad("kd_steps1", f"must lie in [0, kd_steps={self.kd_steps}]")
        if self.transition != "step" and self.kd_steps1 is None and self.kd_steps > 0:
            bad("kd_steps1", f"is needed by transition={self.transition!r}")
        if self.teacher_cache is not None:
            if self.kd_topk is None:
                bad("teacher_cache", "holds the teacher's top-k: it needs --kd-topk K")
            if self.objective != "causal":
                bad("teacher_cache", "holds the teacher on plain windows: objective must be 'causal'")
            if self.teacher:
                bad("teacher_cache", "replaces the teacher: give --teacher or --teacher-cache, not both")
        if self.kd_steps > 0 and not (self.teacher or self.teacher_cache):
            raise TrainError(f"kd_steps={self.kd_steps} needs a teacher (--teacher RUN_OR_CHECKPOINT)")
        if self.kd_topk is not None:
            if isinstance(self.kd_topk, bool) or not isinstance(self.kd_topk, int) or self.kd_topk < 1:
                bad("kd_topk", "must be an integer >= 1 (the teacher's top-k set), or None for full-vocabulary KD")
            if self.kd_steps == 0:
                raise TrainError(f"kd_topk={self.kd_topk} only applies to the KD phase, but kd_steps=0")
            if self.runtime == "reference":
                bad("kd_topk", "the reference runtime trains full-vocabulary KD only")
        if self.vocab_chunks is not None:
            if isinstance(self.vocab_chunks, bool) or not isinstance(self.vocab_chunks, int) or self.vocab_chunks < 1:
                bad("vocab_chunks", "must be an integer >= 1, or None (automatic)")
            if self.kd_topk is not None:
                bad("vocab_chunks", "the vocabulary-parallel loss has no top-k KD (kd_topk is set)")
            if self.runtime == "reference":
                bad("vocab_chunks", "the reference runtime has no vocabulary-parallel loss")
            try:
                model_axis = sharding.parse_mesh(self.mesh)["model"]
            except ValueError:  # reported below, as the mesh's error
                model_axis = 1
            if model_axis != 1:
                bad("vocab_chunks", f"the vocabulary-parallel loss runs on a data-only mesh, not {self.mesh!r}")
        if self.subset and self.kd_steps == 0:
            raise TrainError("subset (SALT_DS selection) only applies to the KD phase, but kd_steps=0")
        if self.optimizer not in optim.OPTIMIZERS:
            bad("optimizer", f"must be one of {optim.OPTIMIZERS}")
        for field in ("lr", "final_lr", "clip", "weight_decay"):
            v = getattr(self, field)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                bad(field, "must be a finite number >= 0")
        if not self.lr > 0:
            bad("lr", "must be > 0")
        if self.final_lr > self.lr:
            bad("final_lr", f"must be <= lr={self.lr}")
        if not isinstance(self.warmup, int) or not 0 <= self.warmup <= self.steps:
            bad("warmup", f"must be an integer in [0, steps={self.steps}]")
        if self.dtype not in DTYPES:
            bad("dtype", f"must be one of {DTYPES}")
        if self.kernels not in KERNELS:
            bad("kernels", f"must be one of {KERNELS}")
        if self.objective not in OBJECTIVES:
            bad("objective", f"must be one of {OBJECTIVES}")
        if self.objective != "causal" and self.runtime == "reference":
            bad("objective", "the reference runtime trains the causal objective only")
        if self.runtime not in RUNTIMES:
            bad("runtime", f"must be one of {RUNTIMES}")
        if self.batch % self.grad_accum:
            bad("grad_accum", f"must divide batch={self.batch} (microbatches of equal size)")
        if self.compile_cache is not None and not isinstance(self.compile_cache, str):
            bad("compile_cache", "must be a directory path or None")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            bad("checkpoint_every", "must be an integer >= 0 (0: only at the end)")
        if (not isinstance(self.checkpoint_minutes, (int, float)) or not math.isfinite(self.checkpoint_minutes)
                or self.checkpoint_minutes < 0):
            bad("checkpoint_minutes", "must be a finite number >= 0 (0: off)")
        try:
            sharding.parse_mesh(self.mesh)
        except ValueError as e:
            raise TrainError(str(e)) from None
        if not isinstance(self.seed, int) or self.seed < 0:
            bad("seed", "must be an integer >= 0")
        if self.wandb is not None:
            import importlib.util
            if not isinstance(self.wandb, str) or not self.wandb:
                bad("wandb", "must be a W&B project name")
            if importlib.util.find_spec("wandb") is None:
                bad("wandb", "needs the optional dependency wandb (pip install 'salt[wandb]')")


# ----------------------------------------------------------------------------- config files
# The groups of a `salt train --config FILE` (YAML or JSON); every TrainConfig field is in exactly one.
GROUPS = {
    "model": ("preset", "init", "dtype", "kernels", "remat", "vocab_chunks"),
    "data": ("data", "seq_len", "batch", "subset", "exclude", "objective", "seed"),
    "kd": ("teacher", "teacher_step", "kd_steps", "omega", "rho", "kd_topk", "teacher_cache", "transition",
           "kd_steps1"),
    "optimizer": ("optimizer", "steps", "lr", "final_lr", "warmup", "clip", "weight_decay", "grad_accum"),
    "run": ("out", "runtime", "mesh", "checkpoint_every", "log_every", "checkpoint_minutes", "keep_checkpoints", "resume",
            "force", "compile_cache", "wandb"),
}
assert sorted(n for names in GROUPS.values() for n in names) == sorted(f.name for f in dataclasses.fields(TrainConfig))


def _field_types() -> dict:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


def _type_ok(value, hint) -> bool:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is tuple:
        return isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool)
                                                         for v in value)
    return False


def _unknown(key: str, known, where: str) -> TrainError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return TrainError(f"{where}: unknown key {key!r}{hint}; known: {', '.join(known)}")


def load_config_file(path) -> dict:
    """The TrainConfig fields a ``--config`` file sets, flat, type-checked: nested groups
    (:data:`GROUPS`; YAML for ``*.yaml`` / ``*.yml``, else JSON), or a run's ``run_config.json``
    (its flat ``train`` record: re-run a run).  An unknown key, a key in the wrong group or a
    value of the wrong type is a :class:`TrainError` naming it."""
    path = pathlib.Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TrainError(f"--config {str(path)!r}: unreadable ({getattr(e, 'strerror', None) or e})") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml
            doc = yaml.safe_load(text)
        else:
            doc = json.loads(text)
    except Exception as e:  # yaml.YAMLError, json.JSONDecodeError, RecursionError
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        kind = "YAML" if path.suffix.lower() in (".yaml", ".yml") else "JSON"
        raise TrainError(f"--config {str(path)!r}: not valid {kind} ({first})") from None
    if not isinstance(doc, dict):
        raise TrainError(f"--config {str(path)!r}: expected a mapping of groups ({', '.join(GROUPS)})")
    types_ = _field_types()
    flat: dict = {}
    if isinstance(doc.get("train"), dict) and "model" in doc and "tokenizer_sha256" in doc:  # a run_config.json
        items = [(f"train.{k}", k, v) for k, v in doc["train"].items()]
        for where, key, _ in items:
            if key not in types_:
                raise _unknown(key, types_, f"--config {str(path)!r}: {where}")
    else:
        items = []
        for group, body in doc.items():
            if group not in GROUPS:
                raise _unknown(group, GROUPS, f"--config {str(path)!r}")
            if not isinstance(body, dict):
                raise TrainError(f"--config {str(path)!r}: group {group!r} must be a mapping of keys")
            for key, value in body.items():
                if key not in GROUPS[group]:
                    owner = next((g for g, names in GROUPS.items() if key in names), None)
                    if owner is not None:
                        raise TrainError(f"--config {str(path)!r}: key {group}.{key} belongs in group {owner!r}")
                    raise _unknown(key, GROUPS[group], f"--config {str(path)!r}: {group}")
                items.append((f"{group}.{key}", key, value))
    for where, key, value in items:
        if not _type_ok(value, types_[key]):
            want = getattr(types_[key], "__name__", str(types_[key]))
            want = "a list of step numbers" if key == "keep_checkpoints" else want
            raise TrainError(f"--config {str(path)!r}: {where} = {value!r} is not of type {want}")
        flat[key] = tuple(value) if key == "keep_checkpoints" else value
    return flat
