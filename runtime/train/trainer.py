"""The SALT trainer: BASELINE, RKD, SALT and SALT_DS are one loop with different settings.

Step ``j`` (1-based; the loader is asked for ``step0 = j - 1``):

* ``j <= kd_steps`` (KD phase): the batch comes from the selection subset when one is given
  (SALT_DS), else from the full data; the teacher forward runs under ``stop_gradient`` and the
  loss is ``(1-ω_j)·ce + ω_j·kd`` with ``ω_j`` computed inside the compiled step from ``j``.
* ``j > kd_steps`` (standard phase): the batch of the full data at ``step0``; plain CE; no
  teacher forward.  At the switch the teacher's parameters are dropped.

Both steps are compiled ahead of time at start-up (``jit(...).lower(...).compile()``).
The reported metrics of step ``j`` are those of the parameters before its update.  They stay on
the device until the log interval (``log_every`` steps, the phase switch, or a checkpoint), when
one transfer fetches them all: the host does not wait for the device every step.

The pieces: :mod:`~salt.runtime.train.setup` (store, ids, architecture, teacher, loaders),
:mod:`~salt.runtime.train.run_dir` (the output rule, resume checks, ``run_config.json``),
:mod:`~salt.runtime.train.batches` (each step's input), :mod:`~salt.runtime.train.step` (the
compiled step); here the loop and its hooks: :class:`MetricsHook` (fetch, check, log) and
:class:`CheckpointHook` (every ``checkpoint_every`` steps, every ``checkpoint_minutes`` minutes,
at ``n_kd``, at the end and on SIGTERM / SIGINT).  ``resume`` continues bit-identically from the
newest *verified* checkpoint (deterministic data order from ``step0``; no RNG in the step).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import pathlib
import sys
import time

import jax
import numpy as np
from tqdm import tqdm

from salt.core import outputs
from salt.core.lock import DirLock, LockError
from salt.runtime.model import checkpoint, sharding, transformer as model
from salt.runtime.train import optim
from salt.runtime.train.batches import batch_abstract, cached_batch_abstract, cached_step_batch, step_batch
from salt.runtime.train.config import NonFiniteLoss, TrainConfig, TrainError, resolve_kernels, runtime_devices
from salt.runtime.train.metrics_log import MetricsSink
from salt.runtime.train.reference_train import train_reference
from salt.runtime.train.run_dir import (RUN_CONFIG, check_init, check_out, jsonable, resume_point, run_record,
                                        verified_or_none)
from salt.runtime.train.setup import (Teacher, load_ids, load_teacher, make_loaders, open_store, padded_vocab,
                                      student_config, ul2_sentinels)
from salt.runtime.train.step import abstract_of, compiled_step, hyperparameters, opt_state_abstract, shardings_of
from salt.runtime.train.stop import StopFlag
from salt.runtime.train.teacher_cache import CacheError, TeacherCache


def train(cfg: TrainConfig, *, progress: bool = True, start_over: bool = False) -> dict:
    """Train per ``cfg``; returns a summary dict. Raises TrainError on bad input (before any
    output is written) and NonFiniteLoss when the loss stops being finite.

    ``--out`` is locked (salt.core.lock) while this runs.  A resume continues from the newest
    intact checkpoint; when the run saved checkpoints but none is intact it refuses unless
    ``start_over`` (then it trains again from step 0 in place, the damaged steps kept aside).
    A KD run keeps the teacher its ``run_config.json`` records, also when started over."""
    cfg.validate()
    sharding.maybe_initialize_distributed()
    store = open_store(cfg.data)
    config = student_config(cfg, store.vocab_size)
    if cfg.kd_topk is not None and cfg.kd_topk > store.vocab_size:
        raise TrainError(f"kd_topk={cfg.kd_topk} is larger than the vocabulary V={store.vocab_size} of "
                         f"{cfg.data!r}")
    run_dir = pathlib.Path(cfg.out)
    check_out(cfg, run_dir)
    try:  # one writer per run directory (the first process of a multi-host run holds it)
        with DirLock(run_dir) if jax.process_index() == 0 else contextlib.nullcontext():
            return _train_locked(cfg, store, config, run_dir, progress, start_over)
    except LockError as e:
        raise TrainError(str(e)) from None


def _train_locked(cfg, store, config, run_dir, progress, start_over):
    check_out(cfg, run_dir)  # again, holding the lock
    check_init(cfg, store.tokenizer_sha256)
    start = resume_point(cfg, run_dir, config, store.tokenizer_sha256, start_over)
    subset_ids = load_ids(cfg.subset, "subset") if cfg.subset else None
    exclude_ids = load_ids(cfg.exclude, "exclude") if cfg.exclude else None
    sentinels = ul2_sentinels(cfg, store) if cfg.objective == "ul2" else None
    mesh = sharding.make_mesh(cfg.mesh, devices=runtime_devices(cfg.runtime))
    platform = mesh.devices.flat[0].platform
    if resolve_kernels(cfg.kernels, platform) == "pallas" and platform != "tpu":
        raise TrainError(f"--kernels pallas needs a TPU, but this run's devices are {platform}; use "
                         "--kernels auto or xla")
    if cfg.batch % mesh.shape["data"]:
        raise TrainError(f"batch={cfg.batch} is not divisible by the data axis "
                         f"({mesh.shape['data']}) of mesh {cfg.mesh!r}")
    loaders = make_loaders(cfg, store, subset_ids, exclude_ids)
    teacher = setup_teacher(cfg, store, mesh, loaders[1], start.step, start.pinned_teacher)
    if cfg.runtime == "reference":
        if padded_vocab(store.vocab_size, config, teacher.config) is not None:
            raise TrainError("--runtime reference needs embeddings of exactly the tokenizer's "
                             f"{store.vocab_size} rows (no vocabulary padding)")
        return train_reference(cfg, config, store, loaders, teacher, run_dir, progress)
    return _train_jax(cfg, config, store, mesh, loaders, teacher, run_dir, start.step, progress, sentinels)


def setup_teacher(cfg: TrainConfig, store, mesh, kd_loader, start_step: int, pinned: dict | None) -> Teacher:
    """The teacher of a run that starts (or resumes) at ``start_step``: a checkpoint, or a
    teacher cache.  Past the KD phase nothing is loaded (the recorded identity is kept); a resume
    must find the teacher it recorded (``pinned``), or refuses."""
    if cfg.kd_steps == 0:
        return Teacher()
    if cfg.kd_steps <= start_step:  # resuming past the KD phase: the teacher (or cache) may be gone
        return Teacher(identity=pinned)
    if cfg.teacher_cache is None:
        config, params, identity = load_teacher(cfg, store.tokenizer_sha256, store.vocab_size, mesh,
                                                pinned=pinned)
        return Teacher(config=config, params=params, identity=identity)
    try:  # the KD phase reads the teacher's top-k from the cache
        cache = TeacherCache(cfg.teacher_cache)
        cache.check(cfg, store, kd_loader, store.vocab_size)
    except CacheError as e:
        raise TrainError(str(e)) from None
    if pinned is not None and pinned != cache.identity():
        raise TrainError(f"run {cfg.out!r} started with teacher {pinned!r}, the cache holds "
                         f"{cache.identity()!r}; refusing to resume with another teacher")
    return Teacher(identity=cache.identity(), cache=cache)


def _check_loader_state(cfg, run_dir, start_step, loaders) -> None:
    """A resume must read the data (pool, order, tokenizer) the run used."""
    saved_state = checkpoint.meta_of(run_dir, start_step).get("loader_state")
    loader = loaders[1] if start_step < cfg.kd_steps else loaders[0]
    try:
        if saved_state is not None:
            loader.check_state(saved_state)
    except ValueError as e:
        if not cfg.force:
            raise TrainError(f"cannot resume {str(run_dir)!r}: {e} (pass --force to override)") from None


def _initial_state(cfg, config, mesh, run_dir, start_step):
    """(params, opt_state, their abstract shapes) at ``start_step``: initialised on the devices
    (each shard where it lives: no host ever holds the model), from ``--init``, or restored."""
    p_shardings = sharding.param_shardings(config, mesh)
    params_abs = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              model.abstract_params(config), p_shardings)
    opt_abs = opt_state_abstract(cfg.optimizer, params_abs, mesh)
    if start_step > 0:
        params, opt_state, _ = checkpoint.restore(run_dir, start_step, params_abs, opt_abs)
        return params, opt_state, params_abs, opt_abs
    if cfg.init is None:  # the values do not depend on the mesh
        params = model.init_params_jax(config, cfg.seed, out_shardings=p_shardings)
    else:  # continued pre-training from a run's newest intact checkpoint
        params = checkpoint.load_params(cfg.init, shardings=p_shardings)[1]
    opt_state = jax.jit(optim.make_direction(cfg.optimizer).init, out_shardings=shardings_of(opt_abs))(params)
    return params, opt_state, params_abs, opt_abs


@dataclasses.dataclass
class Steps:
    """The compiled steps: ``kd`` (teacher forward, or teacher top-k from the cache) and
    ``standard``; None where the run has no such phase left."""

    kd: object = None
    standard: object = None
    compile_s: float = 0.0


def _compile_steps(cfg, config, teacher: Teacher, mesh, params_abs, opt_abs, vocab, start_step) -> Steps:
    t0 = time.perf_counter()
    steps = Steps()
    windows_abs = batch_abstract(cfg, mesh)
    if cfg.kd_steps < cfg.steps:
        steps.standard = compiled_step(config, None, cfg, mesh, params_abs, opt_abs, None, windows_abs,
                                       vocab=vocab)
    if teacher.params is not None:
        steps.kd = compiled_step(config, teacher.config, cfg, mesh, params_abs, opt_abs,
                                 abstract_of(teacher.params), windows_abs, vocab=vocab)
    elif teacher.cache is not None and cfg.kd_steps > start_step:
        steps.kd = compiled_step(config, None, cfg, mesh, params_abs, opt_abs, None,
                                 cached_batch_abstract(cfg, mesh), vocab=vocab)
    steps.compile_s = time.perf_counter() - t0
    return steps


# ----------------------------------------------------------------------------- hooks
class MetricsHook:
    """Keeps each step's metrics on the device and fetches them in one transfer every
    ``log_every`` steps (and before a checkpoint or the phase switch): checks the loss is
    finite, writes the rows, updates the progress bar.  A row's ``tokens_per_s`` is that of its
    fetch interval (wall time of the interval over its steps)."""

    def __init__(self, cfg: TrainConfig, sink: MetricsSink, bar, run_dir):
        self.cfg, self.sink, self.bar, self.run_dir = cfg, sink, bar, run_dir
        self.pending: list[tuple[int, str, dict]] = []
        self.history: list[dict] = []
        self.step_s = {"kd": [], "standard": []}  # seconds per step of each fetch interval
        self.last_good_checkpoint = None  # what a NonFiniteLoss names
        self._since = time.perf_counter()

    def after_step(self, step: int, phase: str, metrics) -> None:
        if self.pending and self.pending[-1][1] != phase:
            self.flush()  # intervals never span the switch: per-phase step times
        self.pending.append((step, phase, metrics))
        self.bar.update(1)
        if len(self.pending) >= self.cfg.log_every:
            self.flush()

    def flush_after_error(self) -> None:
        """Write the rows of the steps that completed before an error stopped the loop (a row
        that cannot be fetched or is not finite is left out: the error already stops the run)."""
        try:
            self.flush()
        except Exception:  # noqa: BLE001 (the loop's own error is the one reported)
            self.pending = []

    def flush(self) -> None:
        if not self.pending:
            return
        fetched = jax.device_get([m for _, _, m in self.pending])
        now = time.perf_counter()
        per_step = (now - self._since) / len(self.pending)
        self._since = now
        rows = []
        for (step, phase, _), m in zip(self.pending, fetched):
            m = {k: float(v) for k, v in m.items()}
            if not math.isfinite(m["loss"]):
                self.pending = []
                raise NonFiniteLoss(step, m["loss"], verified_or_none(self.run_dir, self.last_good_checkpoint))
            rows.append({"step": step, "phase": phase, "loss": m["loss"], "ce": m["ce"],
                         "kd": m.get("kd", math.nan), "kl": m.get("kl", math.nan), "omega": m["omega"],
                         "lr": m["lr"], "accuracy": m["accuracy"], "grad_norm": m["grad_norm"],
                         "tokens_per_s": self.cfg.batch * self.cfg.seq_len / max(per_step, 1e-9)})
        self.step_s[self.pending[-1][1]].append(per_step)
        self.pending = []
        self.sink.write(rows)
        self.history.extend(rows)
        self.bar.set_postfix(loss=f"{rows[-1]['loss']:.4f}", phase=rows[-1]["phase"])


class CheckpointHook:
    """Saves a checkpoint every ``checkpoint_every`` steps, when ``checkpoint_minutes`` of wall
    time passed, at ``n_kd``, at the last step and when a stop was requested; the metrics up to
    the step are fetched (and checked) first, so a checkpoint never holds a non-finite state."""

    def __init__(self, cfg: TrainConfig, run_dir, metrics: MetricsHook, meta_for, keep: set, start_step: int):
        self.cfg, self.run_dir, self.metrics, self.meta_for, self.keep = cfg, run_dir, metrics, meta_for, keep
        self.last_saved = start_step if start_step > 0 else None
        self.metrics.last_good_checkpoint = self.last_saved
        self._last_time = time.monotonic()

    def due(self, step: int, stop_requested: bool) -> bool:
        cfg = self.cfg
        periodic = cfg.checkpoint_every and step % cfg.checkpoint_every == 0
        timed = cfg.checkpoint_minutes > 0 and time.monotonic() - self._last_time >= 60.0 * cfg.checkpoint_minutes
        return bool(periodic or timed or step in (cfg.steps, cfg.kd_steps) or stop_requested)

    def after_step(self, step: int, state, stop_requested: bool) -> None:
        if not self.due(step, stop_requested):
            return
        self.metrics.flush()
        params, opt_state = state
        checkpoint.save(self.run_dir, step, params, opt_state, self.meta_for(step), keep=self.keep)
        self.last_saved = self.metrics.last_good_checkpoint = step
        self._last_time = time.monotonic()


# ----------------------------------------------------------------------------- the loop
def _train_jax(cfg, config, store, mesh, loaders, teacher: Teacher, run_dir, start_step, progress, sentinels):
    full_loader, kd_loader = loaders
    if start_step > 0:
        _check_loader_state(cfg, run_dir, start_step, loaders)
    params, opt_state, params_abs, opt_abs = _initial_state(cfg, config, mesh, run_dir, start_step)
    vocab = padded_vocab(store.vocab_size, config, teacher.config)
    steps = _compile_steps(cfg, config, teacher, mesh, params_abs, opt_abs, vocab, start_step)
    hyper = jax.device_put(hyperparameters(cfg), sharding.replicated(mesh))
    step_sharding = sharding.replicated(mesh)

    first_process = jax.process_index() == 0
    run_dir.mkdir(parents=True, exist_ok=True)
    if first_process and (start_step == 0 or not (run_dir / RUN_CONFIG).exists()):
        outputs.write_json(run_dir / RUN_CONFIG, run_record(cfg, config, store, teacher.identity))
    if first_process:  # incomplete/corrupt newer steps: kept aside, never reused
        checkpoint.empty_trash(run_dir)
        checkpoint.set_aside_newer(run_dir, start_step if start_step > 0 else None)
    keep = set(int(s) for s in cfg.keep_checkpoints) | ({cfg.kd_steps} if cfg.kd_steps > 0 else set())

    def meta_for(step):
        loader = kd_loader if step < cfg.kd_steps else full_loader
        return {"config": config.to_dict(), "tokenizer_sha256": store.tokenizer_sha256,
                "vocab_size": int(store.vocab_size), "teacher": teacher.identity,
                "run_config": cfg.to_dict(), "loader_state": jsonable(loader.state(step)),
                "preset": cfg.preset}

    step = start_step
    bar = tqdm(total=cfg.steps, initial=start_step, desc="train", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    sink = MetricsSink(run_dir, start_step, enabled=first_process, wandb_project=cfg.wandb, config=cfg.to_dict())
    metrics = MetricsHook(cfg, sink, bar, run_dir)
    saver = CheckpointHook(cfg, run_dir, metrics, meta_for, keep, start_step)
    try:
        with StopFlag() as stop, sink:
            try:
                for step in range(start_step + 1, cfg.steps + 1):
                    kd_phase = step <= cfg.kd_steps
                    if not kd_phase and (teacher.params is not None or steps.kd is not None):
                        teacher.params = steps.kd = None  # the switch: drop the teacher
                        gc.collect()
                    loader = kd_loader if kd_phase else full_loader
                    windows = step_batch(cfg, loader, step - 1, mesh, sentinels)
                    if kd_phase and teacher.cache is not None:
                        windows = cached_step_batch(cfg, teacher.cache, loader, step - 1, windows, mesh)
                    step_arr = jax.device_put(np.int32(step), step_sharding)
                    run_step = steps.kd if kd_phase else steps.standard
                    params, opt_state, m = run_step(params, opt_state, teacher.params if kd_phase else None,
                                                    windows, step_arr, hyper)
                    metrics.after_step(step, "kd" if kd_phase else "standard", m)
                    saver.after_step(step, (params, opt_state), stop.requested is not None)
                    if stop.requested:
                        break
            except BaseException:
                metrics.flush_after_error()  # e.g. a damaged cache shard at the next step
                raise
    finally:
        bar.close()
    interrupted = step < cfg.steps
    median = {phase: float(np.median(s)) if s else None for phase, s in metrics.step_s.items()}
    return {"run_dir": str(run_dir), "preset": cfg.preset, "model": config.to_dict(),
            "start_step": start_step, "last_step": step, "interrupted": interrupted,
            "interrupted_by": stop.requested if interrupted else None,
            "last_checkpoint": saver.last_saved, "compile_s": steps.compile_s,
            "final": metrics.history[-1] if metrics.history else None,
            "kd_step_s": median["kd"], "standard_step_s": median["standard"]}
