"""The trainer's configuration: one frozen dataclass, its validation and the user-facing errors.

``TrainConfig`` is what ``salt train`` (and ``salt reproduce`` for each of its runs) hands to
:func:`salt.runtime.train.trainer.train`; it is recorded in ``RUN/run_config.json`` and compared on
``--resume``.  ``validate`` raises :class:`TrainError` naming the first bad field.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
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


def setting(default, group: str, help: str, *, choices=None, min=None, max=None, path: bool = False,
         flag: str | None = None, metavar: str | None = None):
    """A :class:`TrainConfig` field with what the command line and ``--config`` files are built
    from: its group (model / data / kd / optimizer / run), help text, allowed values (``choices``,
    lower bound ``min``), whether it names a file (``path``), and a flag other than ``--field-name``."""
    return dataclasses.field(default=default, metadata={
        "group": group, "help": help, "choices": choices, "min": min, "max": max, "path": path, "flag": flag,
        "metavar": metavar})


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run.  Each field's metadata (:func:`setting`) says its group, its help and its
    allowed values; ``salt train``'s options and the ``--config`` groups are generated from them."""

    # --- model
    preset: str = setting(dataclasses.MISSING, "model",
                       "Model preset of the student (see `salt presets`); required unless --init.")
    init: str | None = setting(None, "model", "Start from this run's newest checkpoint (its architecture and weights, "
                            "e.g. from `salt import hf`) instead of a preset: continued pre-training.", path=True)
    dtype: str = setting("float32", "model", "Compute dtype (parameters and loss stay float32).", choices=DTYPES)
    kernels: str = setting("auto", "model", "Attention / KD-loss implementation: pallas (TPU), xla (chunked pure "
                        "JAX), naive (full-size maths); auto = pallas on TPU, xla elsewhere.", choices=KERNELS)
    remat: bool = setting(False, "model", "Recompute layer activations in the backward.", flag="--remat/--no-remat")
    vocab_chunks: int | None = setting(None, "model", "Vocabulary-parallel loss on a data-only mesh: the vocabulary in "
                                    "this many chunks, each gathered whole on every device in turn (fewer: faster, "
                                    "more memory). Default: on for embeddings of 64 MiB or more, about 8192 rows per "
                                    "chunk. Not with --kd-topk.", min=1)
    # --- data
    data: str = setting(dataclasses.MISSING, "data", "Token store (from `salt data prepare`). Required.", path=True)
    seq_len: int = setting(64, "data", "Tokens per window T.", min=1)
    batch: int = setting(8, "data", "Global batch (windows).", min=1)
    subset: str | None = setting(None, "data", "SALT_DS: selection file (.npy window ids) the KD phase draws from.",
                              path=True)
    exclude: str | None = setting(None, "data", ".npy window ids never trained on.", path=True)
    objective: str = setting("causal", "data", "causal: next-token LM; ul2: the paper's UL2 mixture (causal, prefix "
                          "LM, span corruption 15%/3 and 50%/32 at 6:2:1:1; loss and KD on targets only; needs a "
                          "store prepared with --sentinels).", choices=OBJECTIVES)
    seed: int = setting(0, "data", "Seed of the initial parameters and of the data order.", min=0, max=2**63 - 1)
    # --- kd
    teacher: str | None = setting(None, "kd", "Teacher run directory or checkpoint (needed when --kd-steps > 0).",
                               path=True)
    teacher_step: int | None = setting(None, "kd", "Teacher checkpoint step (default: latest).")
    kd_steps: int = setting(0, "kd", "n_kd: steps of the KD phase (0 = BASELINE, = --steps for RKD).", min=0)
    omega: float = setting(PAPER_OMEGA, "kd", "Distillation weight ω in [0, 1].")
    rho: float = setting(PAPER_RHO, "kd", "Teacher temperature ρ > 0.")
    kd_topk: int | None = setting(None, "kd", "Top-k KD (paper eq. 13-14): P and Q restricted to the teacher's top-K "
                               "tokens and renormalised over them (default: full-vocabulary KD).", min=1)
    teacher_cache: str | None = setting(None, "kd", "A `salt teacher cache` directory: the KD phase reads the "
                                     "teacher's top-k from it (no teacher forward; needs --kd-topk K <= the "
                                     "cache's k; instead of --teacher).", path=True)
    transition: str = setting("step", "kd", "How ω goes to 0 at the end of the KD phase.", choices=losses.TRANSITIONS)
    kd_steps1: int | None = setting(None, "kd", "n_kd1: where the linear transitions start.", min=0)
    # --- optimizer
    optimizer: str = setting("adafactor", "optimizer", "The optimizer.", choices=optim.OPTIMIZERS)
    steps: int = setting(100, "optimizer", "Total training steps n. Required.", min=1)
    lr: float = setting(1e-3, "optimizer", "Peak learning rate.", min=0)
    final_lr: float = setting(1e-4, "optimizer", "Learning rate at the last step.", min=0)
    warmup: int = setting(0, "optimizer", "Linear warm-up steps.", min=0)
    clip: float = setting(1.0, "optimizer", "Global-norm gradient clipping (0: off).", min=0)
    weight_decay: float = setting(0.0, "optimizer", "Decoupled weight decay.", min=0)
    grad_accum: int = setting(1, "optimizer", "Microbatches per step (gradients accumulated inside the compiled "
                           "step, one update): the same step as the whole batch, on less memory. Must divide "
                           "--batch.", min=1)
    # --- run
    out: str = setting(dataclasses.MISSING, "run", "Run directory (checkpoints, metrics). Required.", path=True)
    runtime: str = setting("jax", "run", "tpu / gpu / cpu: the JAX runtime on that platform's devices (an error if "
                        "there are none); jax: JAX's default platform; reference: the NumPy reference trainer on "
                        "the same batches (tiny models).", choices=RUNTIMES)
    mesh: str = setting("data=1,model=1", "run", "Device mesh 'data=D,model=M' (data=-1: all devices).")
    checkpoint_every: int = setting(0, "run", "Save every N steps (always at the end, at n_kd and on SIGTERM).",
                                 min=0)
    log_every: int = setting(10, "run", "Fetch the metrics from the device every N steps (and at checkpoints and the "
                          "phase switch): metrics.jsonl still has one row per step; the host does not wait for "
                          "the device each step.", min=1)
    checkpoint_minutes: float = setting(10.0, "run", "Also save when this many minutes passed since the last save "
                                     "(0: off), so an interrupted run loses at most that much.", min=0)
    keep_checkpoints: tuple = setting((), "run", "Comma-separated steps whose checkpoints are kept (besides the "
                                   "latest and n_kd).", flag="--keep")
    resume: bool = setting(False, "run", "Continue the run in --out from its latest checkpoint.")
    force: bool = setting(False, "run", "Resume even if the configuration changed.")
    compile_cache: str | None = setting(None, "run", "JAX persistent compilation cache (reused across runs); 'off' "
                                     "disables it. Default: $SALT_COMPILE_CACHE, else ~/.cache/salt/jax-compile.",
                                     metavar="DIR")
    wandb: str | None = setting(None, "run", "Also log the metrics to this Weights & Biases project (optional "
                             "dependency wandb; WANDB_MODE=offline works without a network). TensorBoard files "
                             "are always written.", metavar="PROJECT")

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
        """Raise TrainError naming the first bad field: each field against its metadata (type,
        allowed values, lower bound), then the rules that tie fields together."""
        check_fields(self)
        self._check_model()
        self._check_kd()
        self._check_optimizer()
        self._check_run()

    def _bad(self, field: str, why: str):
        raise TrainError(f"{field}={getattr(self, field)!r}: {why}")

    def _check_model(self) -> None:
        if self.init is not None:
            if self.preset:
                self._bad("preset", "--init takes the architecture of the run it starts from; drop --preset")
            if self.runtime == "reference":
                self._bad("init", "the reference runtime starts from a preset's initialisation only")
        else:
            try:
                get_preset(self.preset)
            except ValueError as e:
                raise TrainError(str(e)) from None
        if self.vocab_chunks is not None:
            if self.kd_topk is not None:
                self._bad("vocab_chunks", "the vocabulary-parallel loss has no top-k KD (kd_topk is set)")
            if self.runtime == "reference":
                self._bad("vocab_chunks", "the reference runtime has no vocabulary-parallel loss")
            try:
                model_axis = sharding.parse_mesh(self.mesh)["model"]
            except ValueError:  # reported by _check_run, as the mesh's error
                model_axis = 1
            if model_axis != 1:
                self._bad("vocab_chunks", f"the vocabulary-parallel loss runs on a data-only mesh, not {self.mesh!r}")

    def _check_kd(self) -> None:
        if self.kd_steps > self.steps:
            raise TrainError(f"kd_steps={self.kd_steps} is larger than steps={self.steps}")
        if not 0.0 <= self.omega <= 1.0:
            self._bad("omega", "must lie in [0, 1]")
        if not self.rho > 0:
            self._bad("rho", "must be a finite number > 0")
        if self.kd_steps1 is not None and not self.kd_steps1 <= self.kd_steps:
            self._bad("kd_steps1", f"must lie in [0, kd_steps={self.kd_steps}]")
        if self.transition != "step" and self.kd_steps1 is None and self.kd_steps > 0:
            self._bad("kd_steps1", f"is needed by transition={self.transition!r}")
        if self.teacher_cache is not None:
            if self.kd_topk is None:
                self._bad("teacher_cache", "holds the teacher's top-k: it needs --kd-topk K")
            if self.objective != "causal":
                self._bad("teacher_cache", "holds the teacher on plain windows: objective must be 'causal'")
            if self.teacher:
                self._bad("teacher_cache", "replaces the teacher: give --teacher or --teacher-cache, not both")
        if self.kd_steps > 0 and not (self.teacher or self.teacher_cache):
            raise TrainError(f"kd_steps={self.kd_steps} needs a teacher (--teacher RUN_OR_CHECKPOINT)")
        if self.kd_topk is not None:
            if self.kd_steps == 0:
                raise TrainError(f"kd_topk={self.kd_topk} only applies to the KD phase, but kd_steps=0")
            if self.runtime == "reference":
                self._bad("kd_topk", "the reference runtime trains full-vocabulary KD only")
        if self.subset and self.kd_steps == 0:
            raise TrainError("subset (SALT_DS selection) only applies to the KD phase, but kd_steps=0")

    def _check_optimizer(self) -> None:
        if not self.lr > 0:
            self._bad("lr", "must be > 0")
        if self.final_lr > self.lr:
            self._bad("final_lr", f"must be <= lr={self.lr}")
        if self.warmup > self.steps:
            self._bad("warmup", f"must be an integer in [0, steps={self.steps}]")
        if self.batch % self.grad_accum:
            self._bad("grad_accum", f"must divide batch={self.batch} (microbatches of equal size)")

    def _check_run(self) -> None:
        if self.objective != "causal" and self.runtime == "reference":
            self._bad("objective", "the reference runtime trains the causal objective only")
        try:
            sharding.parse_mesh(self.mesh)
        except ValueError as e:
            raise TrainError(str(e)) from None
        if self.wandb is not None:
            if not self.wandb:
                self._bad("wandb", "must be a W&B project name")
            if importlib.util.find_spec("wandb") is None:
                self._bad("wandb", "needs the optional dependency wandb (pip install 'salt[wandb]')")


def type_ok(value, hint) -> bool:
    """Whether ``value`` has the type of a field annotated ``hint`` (bool is not an int here)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(type_ok(value, h) for h in typing.get_args(hint))
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


def type_name(hint) -> str:
    if hint is tuple:
        return "a list of step numbers"
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return " or ".join(type_name(h) for h in typing.get_args(hint))
    return {type(None): "None", bool: "true or false", int: "an integer", float: "a number",
            str: "a string"}.get(hint, getattr(hint, "__name__", str(hint)))


# The groups of a `salt train --config FILE` (salt.runtime.train.config_file), from the fields' metadata.
GROUPS = {group: tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["group"] == group)
          for group in ("model", "data", "kd", "optimizer", "run")}


def check_fields(config) -> None:
    """Each field of the config dataclass ``config`` against its :func:`setting` metadata (type,
    allowed values, bounds): TrainError naming the first bad one."""
    hints = typing.get_type_hints(type(config))

    def bad(name, why):
        raise TrainError(f"{name}={getattr(config, name)!r}: {why}")
    for f in dataclasses.fields(config):
        value, meta = getattr(config, f.name), f.metadata
        if not type_ok(value, hints[f.name]):
            bound = f" >= {meta['min']}" if meta.get("min") is not None else ""
            bad(f.name, "must be " + type_name(hints[f.name]).replace("an integer", "an integer" + bound)
                .replace("a number", "a number" + bound))
        if value is None or isinstance(value, (bool, str, tuple)):
            if meta.get("choices") is not None and value not in meta["choices"]:
                bad(f.name, f"must be one of {meta['choices']}")
            continue
        if isinstance(value, float) and not math.isfinite(value):
            bad(f.name, "must be a finite number")
        if meta.get("min") is not None and value < meta["min"]:
            bad(f.name, f"must be {'an integer' if isinstance(value, int) else 'a number'} >= {meta['min']}")
        if meta.get("max") is not None and value > meta["max"]:
            bad(f.name, f"must be <= {meta['max']}")
