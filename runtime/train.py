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

import dataclasses
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
from salt.runtime import checkpoint, losses, model, optim, sharding

RUNTIMES = ("jax", "reference")
KERNELS = ("auto", "pallas", "xla", "naive")


def resolve_kernels(name: str) -> str:
    """``--kernels``: "pallas" (TPU kernels), "xla" (their pure-JAX chunked paths: no
    ``[tokens, vocab]`` probabilities, flash attention) or "naive" (plain full-size maths);
    "auto" is Pallas on TPU and "xla" elsewhere."""
    if name == "auto":
        return "pallas" if jax.default_backend() == "tpu" else "xla"
    return name
DTYPES = ("float32", "bfloat16")


class TrainError(ValueError):
    """Bad input or an unrecoverable condition, with a message meant for the user."""


class NonFiniteLoss(TrainError):
    def __init__(self, step: int, loss: float, last_checkpoint: int | None):
        self.step, self.loss, self.last_checkpoint = step, loss, last_checkpoint
        kept = (f"the last good checkpoint (step {last_checkpoint}) is kept"
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
    omega: float = 0.667
    rho: float = 0.25
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
    keep_checkpoints: tuple = ()
    runtime: str = "jax"
    resume: bool = False
    force: bool = False
    remat: bool = False

    # fields that may differ between a run and its resumption
    RESUMABLE_CHANGES = ("resume", "force", "checkpoint_every", "keep_checkpoints", "out")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["keep_checkpoints"] = list(self.keep_checkpoints)
        return d

    def validate(self) -> None:
        """Raise TrainError naming the first bad field."""
        def bad(field, why):
            raise TrainError(f"{field}={getattr(self, field)!r}: {why}")
        try:
            get_preset(self.preset)
        except ValueError as e:
            raise TrainError(str(e)) from None
        for field in ("steps", "batch", "seq_len"):
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
        if self.kd_steps > 0 and not self.teacher:
            raise TrainError(f"kd_steps={self.kd_steps} needs a teacher (--teacher RUN_OR_CHECKPOINT)")
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
        if self.runtime not in RUNTIMES:
            bad("runtime", f"must be one of {RUNTIMES}")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            bad("checkpoint_every", "must be an integer >= 0 (0: only at the end)")
        try:
            sharding.parse_mesh(self.mesh)
        except ValueError as e:
            raise TrainError(str(e)) from None
        if not isinstance(self.seed, int) or self.seed < 0:
            bad("seed", "must be an integer >= 0")


# ----------------------------------------------------------------------------- the step
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


def make_step_fn(student: ModelConfig, teacher: ModelConfig | None, optimizer: str, *,
                 transition: str = "step", rho: float = 0.25, dtype: str = "float32",
                 kernels: str = "xla", remat: bool = False, mesh=None):
    """The pure train step ``(params, opt_state, teacher_params, windows_BxT1, step, hyper)
    -> (params, opt_state, metrics)``; ``teacher`` None builds the standard (CE) step.
    ``step`` is the 1-based step number; ``hyper`` the dict of :func:`hyperparameters`."""
    compute_dtype = jnp.dtype(dtype)
    direction = optim.make_direction(optimizer)

    def loss_fn(params, teacher_params, windows_BxT1, step, hyper):
        inputs, labels = windows_BxT1[:, :-1], windows_BxT1[:, 1:]
        logits = model.forward(params, inputs, student, dtype=compute_dtype,
                               attention_impl=kernels, remat=remat, mesh=mesh)
        if teacher is None:
            parts = losses.ce_parts(logits, labels)
            parts["loss"] = parts["ce"]
            omega = jnp.float32(0.0)
        else:
            t_logits = jax.lax.stop_gradient(model.forward(
                teacher_params, inputs, teacher, dtype=compute_dtype, attention_impl=kernels,
                remat=remat, mesh=mesh))
            omega = losses.omega_at(step, hyper["omega"], hyper["kd_steps"], transition,
                                    hyper["kd_steps1"])
            parts = losses.kd_loss(logits, t_logits, labels, omega, rho, impl=kernels, mesh=mesh)
        metrics = {k: losses.batch_mean(v) for k, v in parts.items() if k != "correct"}
        metrics["accuracy"] = losses.batch_mean(parts["correct"])
        metrics["omega"] = omega
        return metrics["loss"], metrics

    def step_fn(params, opt_state, teacher_params, windows_BxT1, step, hyper):
        grads, metrics = jax.grad(loss_fn, has_aux=True)(params, teacher_params, windows_BxT1,
                                                         step, hyper)
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


_COMPILED: dict = {}
_COMPILED_MAX = 16


def compiled_step(student, teacher, cfg: TrainConfig, mesh, params_abs, opt_abs, teacher_abs,
                  windows_abs):
    """The AOT-compiled step for this run, shared by runs in one process with the same
    model(s), optimizer, transition, dtype, kernels, shapes and mesh (e.g. the four
    students of ``salt reproduce``)."""
    kernels = resolve_kernels(cfg.kernels)
    key = (student, teacher, cfg.optimizer, cfg.transition if teacher is not None else None,
           float(cfg.rho) if teacher is not None else None, cfg.dtype, kernels, cfg.remat,
           windows_abs.shape,
           tuple(d.id for d in mesh.devices.flat), mesh.devices.shape)
    if key not in _COMPILED:
        if len(_COMPILED) >= _COMPILED_MAX:
            _COMPILED.pop(next(iter(_COMPILED)))
        fn = make_step_fn(student, teacher, cfg.optimizer, transition=cfg.transition,
                          rho=float(cfg.rho), dtype=cfg.dtype, kernels=kernels,
                          remat=cfg.remat, mesh=mesh)
        out_sh = (_shardings(params_abs), _shardings(opt_abs), sharding.replicated(mesh))
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


def _shardings(tree):
    return jax.tree.map(lambda a: a.sharding, tree)


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


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
        return _train_reference(cfg, config, store, subset_ids, exclude_ids, teacher, run_dir,
                                progress)
    return _train_jax(cfg, config, store, mesh, subset_ids, exclude_ids, teacher, run_dir,
                      start_step, progress)


def _make_loaders(cfg, store, subset_ids, exclude_ids):
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
    full_loader, kd_loader = _make_loaders(cfg, store, subset_ids, exclude_ids)
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
        params = sharding.shard_params(model.init_params(config, cfg.seed), config, mesh)
        init = optim.make_direction(cfg.optimizer).init
        opt_state = jax.jit(init, out_shardings=_shardings(opt_abs))(params)
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
                                _abstract(teacher_params), windows_abs)
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
                "run_config": cfg.to_dict(), "loader_state": _jsonable(loader.state(step)),
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
                    metrics_file.write(json.dumps(_finite_or_none(record)) + "\n")
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


def _jsonable(x: Any):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


def _finite_or_none(record: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()}


# ----------------------------------------------------------------------------- reference runtime
def _train_reference(cfg, config, store, subset_ids, exclude_ids, teacher, run_dir, progress):
    """The NumPy reference trainer (salt.reference.trainer) on the same batches, the same
    initial parameters, AdamW, clipping and schedule; metrics and a final checkpoint in the
    runtime's format.  Meant for tiny models (debugging and cross-checking)."""
    from salt.reference import trainer as ref_trainer
    from salt.reference.optim import AdamW
    from salt.reference.schedule import lr_at as ref_lr_at

    if cfg.optimizer != "adamw":
        raise TrainError(f"--runtime reference supports --optimizer adamw only, got {cfg.optimizer!r}")
    if cfg.dtype != "float32":
        raise TrainError("--runtime reference computes in float32 only (got --dtype "
                         f"{cfg.dtype})")
    if checkpoint.all_steps(run_dir):
        raise TrainError(f"--runtime reference cannot resume; {str(run_dir)!r} already has checkpoints")
    full_loader, kd_loader = _make_loaders(cfg, store, subset_ids, exclude_ids)
    teacher_config, teacher_identity = teacher["config"], teacher["identity"]
    teacher_params = teacher.pop("params")

    def batch_fn(step0):
        return (kd_loader if step0 < cfg.kd_steps else full_loader).batch(step0)

    ref_teacher = None
    if teacher_params is not None:
        ref_teacher = (teacher_config,
                       jax.tree.map(lambda x: np.asarray(x, np.float32), teacher_params))
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.write_json_atomic(run_dir / "run_config.json", {
        "train": cfg.to_dict(), "model": config.to_dict(), "tokenizer_sha256": store.tokenizer_sha256,
        "vocab_size": int(store.vocab_size), "teacher": teacher_identity,
        "param_count": param_count(config)})
    start = time.perf_counter()
    result = ref_trainer.train(
        config, batch_fn, cfg.steps, optimizer=AdamW(b1=optim.ADAMW_B1, b2=optim.ADAMW_B2,
                                                     eps=optim.ADAMW_EPS,
                                                     weight_decay=cfg.weight_decay),
        lr=lambda step0: ref_lr_at(step0 + 1, cfg.lr, cfg.warmup, cfg.steps, cfg.final_lr),
        teacher=ref_teacher, omega=cfg.omega if cfg.kd_steps else 0.0, rho=cfg.rho,
        n_kd=cfg.kd_steps, transition=cfg.transition, n_kd1=cfg.kd_steps1, seed=cfg.seed,
        dtype=np.float32, clip_norm=cfg.clip if cfg.clip > 0 else None, progress=progress)
    elapsed = time.perf_counter() - start
    tokens_per_s = cfg.steps * cfg.batch * cfg.seq_len / max(elapsed, 1e-9)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for record in result.history:
            record = dict(record, tokens_per_s=tokens_per_s)
            if not math.isfinite(record["loss"]):
                raise NonFiniteLoss(record["step"], record["loss"], None)
            f.write(json.dumps(_finite_or_none(record)) + "\n")
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), result.params)
    meta = {"config": config.to_dict(), "tokenizer_sha256": store.tokenizer_sha256,
            "vocab_size": int(store.vocab_size), "teacher": teacher_identity,
            "run_config": cfg.to_dict(), "loader_state": _jsonable(full_loader.state(cfg.steps)),
            "preset": cfg.preset, "runtime": "reference"}
    checkpoint.save(run_dir, cfg.steps, params, {"count": np.asarray(cfg.steps, np.int32)}, meta)
    return {"run_dir": str(run_dir), "preset": cfg.preset, "model": config.to_dict(),
            "start_step": 0, "last_step": cfg.steps, "interrupted": False,
            "last_checkpoint": cfg.steps, "compile_s": 0.0,
            "final": result.history[-1] if result.history else None, "history": result.history}
