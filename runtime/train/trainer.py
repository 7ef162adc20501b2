"""The SALT trainer: BASELINE, RKD, SALT and SALT_DS are one loop with different settings.

Step ``j`` (1-based; the loader is asked for ``step0 = j - 1``):

* ``j <= kd_steps`` (KD phase): the batch comes from the selection subset when one is given
  (SALT_DS), else from the full data; the teacher forward runs under ``stop_gradient`` and the
  loss is ``(1-ω_j)·ce + ω_j·kd`` with ``ω_j`` computed inside the compiled step from ``j``.
* ``j > kd_steps`` (standard phase): the batch of the full data at ``step0``; plain CE; no
  teacher forward.  At the switch the teacher's parameters are dropped.

Both steps are compiled ahead of time at start-up (``jit(...).lower(...).compile()``).
The reported metrics of step ``j`` are those of the parameters before its update.
Checkpoints every ``checkpoint_every`` steps, every ``checkpoint_minutes`` minutes of wall time,
at the end and on SIGTERM / SIGINT (a second SIGINT aborts at once); ``resume`` continues
bit-identically from the newest *verified* checkpoint (deterministic data order from ``step0``;
no RNG in the step).  A KD run pins its teacher (step and manifest hash) at start; a resume
uses exactly that teacher checkpoint or refuses.  Output-directory rules: docs/safety.md.

Why one module of ~470 lines: it is the loop read top to bottom — set-up, resume checks, the
per-step batch (causal or UL2), the loop with its checkpoints and interrupts — over
runtime/train/config.py (what a run is) and runtime/train/step.py (the compiled step).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import pathlib
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from salt.reference.config import VOCAB_FROM_DATA, ModelConfig, get_preset, param_count
from salt.core import outputs
from salt.core.lock import DirLock, LockError
from salt.runtime.model import checkpoint, transformer as model, sharding
from salt.runtime.train import metrics_log, optim
from salt.runtime.train.config import (NonFiniteLoss, TrainConfig, TrainError, resolve_kernels,  # noqa: F401
                                 runtime_devices)
from salt.runtime.train.step import (abstract_of, compiled_step, hyperparameters, opt_state_abstract,
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
    from salt.data.ids import load_window_ids

    try:
        ids = load_window_ids(path, what=f"--{what}")
    except ValueError as e:
        raise TrainError(str(e)) from None
    if ids.size == 0:
        raise TrainError(f"--{what} file {path!r} is empty")
    return ids


def student_config(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    if cfg.init is not None:  # the architecture of the run the student starts from
        try:
            config = ModelConfig.from_dict(checkpoint.read_meta(cfg.init)["config"])
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise TrainError(f"init {cfg.init!r}: {e}") from None
        if config.vocab_size < vocab_size:
            raise TrainError(f"init {cfg.init!r} has vocab_size={config.vocab_size} < the data's vocabulary "
                             f"{vocab_size}")
        return config
    config = get_preset(cfg.preset)
    if cfg.preset in VOCAB_FROM_DATA:
        return config.replace(vocab_size=int(vocab_size))
    if config.vocab_size < vocab_size:
        raise TrainError(f"preset {cfg.preset} has vocab_size={config.vocab_size} < the data's "
                         f"vocabulary {vocab_size}")
    return config


def load_teacher(cfg: TrainConfig, student: ModelConfig, tokenizer_sha256: str, mesh=None,
                 pinned: dict | None = None, tokenizer_vocab: int | None = None):
    """(teacher config, params (sharded when ``mesh``), identity dict) of the checkpoint that
    :func:`check_teacher` accepts."""
    identity = check_teacher(cfg, student, tokenizer_sha256, pinned=pinned, tokenizer_vocab=tokenizer_vocab)
    t_config = ModelConfig.from_dict(identity["config"])
    shardings = sharding.param_shardings(t_config, mesh) if mesh is not None else None
    t_config, t_params, _ = checkpoint.load_params(identity["path"], identity["step"], shardings=shardings)
    return t_config, t_params, identity


def check_teacher(cfg: TrainConfig, student: ModelConfig, tokenizer_sha256: str,
                  pinned: dict | None = None, tokenizer_vocab: int | None = None) -> dict:
    """The identity dict (path, step, manifest sha256, config) of ``cfg.teacher``'s checkpoint
    after checking its tokenizer and vocabulary against the data and the student; reads no
    parameters.  TrainError naming the teacher otherwise.

    Teacher and student must share the data's tokenizer (sha256); their vocabulary sizes may differ
    when both hold the tokenizer's ``tokenizer_vocab`` ids (embeddings padded to different sizes:
    the padded columns get no probability, see :func:`padded_vocab`).  ``tokenizer_vocab`` None:
    the sizes must be equal.

    ``pinned``: the identity a resumed run recorded at its start; exactly that step is loaded and
    its manifest hash must match (a teacher checkpoint that is gone or changed is refused)."""
    step = cfg.teacher_step
    if pinned is not None:
        step = pinned.get("step")
        if not isinstance(step, int):
            raise TrainError(f"run {cfg.out!r} records no teacher step to resume with: {pinned!r}")
    try:
        run_dir, step = checkpoint.resolve(cfg.teacher, step)
        digest = checkpoint.manifest_sha256(checkpoint.step_dir(run_dir, step))
        meta = checkpoint.meta_of(run_dir, step)
        t_config = ModelConfig.from_dict(meta["config"])
    except (ValueError, KeyError, OSError) as e:
        if pinned is not None:
            raise TrainError(f"teacher {cfg.teacher!r}: the checkpoint this run started with (step "
                             f"{pinned.get('step')}) cannot be used: {e}; the run cannot be resumed "
                             "reproducibly") from None
        raise TrainError(f"teacher {cfg.teacher!r}: {e}") from None
    if pinned is not None and pinned.get("manifest_sha256") not in (None, digest):
        raise TrainError(f"teacher {cfg.teacher!r} step {step} changed since this run started "
                         f"(manifest sha256 {digest[:16]}..., recorded "
                         f"{str(pinned.get('manifest_sha256'))[:16]}...); refusing to resume with "
                         "another teacher")
    t_sha = meta.get("tokenizer_sha256")
    if t_sha != tokenizer_sha256:
        raise TrainError(f"teacher {cfg.teacher!r} (step {step}) was trained with tokenizer sha256 "
                         f"{t_sha}, but the data {cfg.data!r} uses {tokenizer_sha256}")
    if t_config.vocab_size != student.vocab_size:
        if tokenizer_vocab is None:
            raise TrainError(f"teacher vocab_size={t_config.vocab_size} differs from the student's "
                             f"{student.vocab_size}")
        if t_config.vocab_size < tokenizer_vocab:
            raise TrainError(f"teacher {cfg.teacher!r} (step {step}) has vocab_size={t_config.vocab_size}, "
                             f"fewer than the {tokenizer_vocab} ids of the shared tokenizer")
    return {"path": str(pathlib.Path(run_dir).absolute()), "step": int(step),
            "manifest_sha256": digest, "config": t_config.to_dict()}


def padded_vocab(tokenizer_vocab: int, *configs) -> int | None:
    """The tokenizer's vocabulary when some model's embedding has more rows (padding: the loss
    then cuts the embeddings to the tokenizer's ids, so padded columns get no probability), else
    None (every embedding row is a token)."""
    sizes = {c.vocab_size for c in configs if c is not None}
    return None if sizes == {tokenizer_vocab} else int(tokenizer_vocab)


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "(not recorded)"


def _check_resume_config(saved: dict, cfg: TrainConfig) -> list[str]:
    now = cfg.to_dict()
    defaults = {f.name: _field_default(f) for f in dataclasses.fields(TrainConfig)}  # fields newer than the run
    return [f"{k}: saved {saved.get(k, defaults[k])!r}, now {now[k]!r}" for k in now
            if k not in TrainConfig.RESUMABLE_CHANGES and saved.get(k, defaults[k]) != now[k]]


class _Stop:
    """SIGTERM / SIGINT flag: the loop saves a checkpoint after the current step and returns.
    A second SIGINT raises KeyboardInterrupt at once (abort without saving)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = None  # the name of the signal that asked to stop
        self._old = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def _handler(self, signum, frame):
        if self.requested == "SIGINT" and signum == signal.SIGINT:
            # Second Ctrl-C: abort now, through the caller's handler if it has one (the CLI's
            # defers the raise out of imports and finalisers, where it would be lost or fatal).
            old = self._old.get(signum)
            if callable(old) and old is not signal.default_int_handler:
                return old(signum, frame)
            raise KeyboardInterrupt
        if self.requested is None:
            self.requested = signal.Signals(signum).name
            print(f"\n{self.requested}: saving a checkpoint after this step "
                  f"{'(Ctrl-C again to abort)' if signum == signal.SIGINT else ''}",
                  file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _truncate_metrics(path: pathlib.Path, last_step: int) -> None:
    """Drop metric lines past ``last_step`` (written after the checkpoint we resume from).
    A line that is not a step record (e.g. cut short by a kill) is reported and dropped."""
    if not path.exists():
        return
    keep = []
    for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            step = json.loads(line)["step"]
            if not isinstance(step, int):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError, RecursionError):
            print(f"warning: {path}:{lineno}: not a metrics record, dropped: {line[:80]!r}",
                  file=sys.stderr, flush=True)
            continue
        if step <= last_step:
            keep.append(line)
    outputs.write_text(path, "".join(l + "\n" for l in keep))


# ----------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, *, progress: bool = True, start_over: bool = False) -> dict:
    """Train per ``cfg``; returns a summary dict. Raises TrainError on bad input (before any
    output is written) and NonFiniteLoss when the loss stops being finite.

    ``--out`` is locked (salt.core.lock) while this runs.  A resume continues from the newest
    intact checkpoint; when the run saved checkpoints but none is intact it refuses unless
    ``start_over`` (then it trains again from step 0 in place, the damaged steps kept aside).
    A KD run keeps the teacher its ``run_config.json`` records, also when started over."""
    cfg.validate()
    sharding.maybe_initialize_distributed()
    store = _open_store(cfg.data)
    config = student_config(cfg, store.vocab_size)
    if cfg.kd_topk is not None and cfg.kd_topk > store.vocab_size:
        raise TrainError(f"kd_topk={cfg.kd_topk} is larger than the vocabulary V={store.vocab_size} of "
                         f"{cfg.data!r}")
    run_dir = pathlib.Path(cfg.out)
    _check_out(cfg, run_dir)
    try:  # one writer per run directory (the first process of a multi-host run holds it)
        with DirLock(run_dir) if jax.process_index() == 0 else contextlib.nullcontext():
            return _train_locked(cfg, store, config, run_dir, progress, start_over)
    except LockError as e:
        raise TrainError(str(e)) from None


def _train_locked(cfg, store, config, run_dir, progress, start_over):
    tokenizer_sha = store.tokenizer_sha256
    _check_out(cfg, run_dir)  # again, holding the lock
    if cfg.init is not None:
        init_sha = checkpoint.read_meta(cfg.init).get("tokenizer_sha256")
        if init_sha != tokenizer_sha:
            raise TrainError(f"init {cfg.init!r} was trained with tokenizer sha256 {init_sha}, but the data "
                             f"{cfg.data!r} uses {tokenizer_sha}")
    start_step = 0
    pinned_teacher = None
    saved: dict = {}
    if cfg.resume and (run_dir / "run_config.json").exists():
        saved = _read_json(run_dir / "run_config.json", "run config")
        if not isinstance(saved.get("train"), dict):
            raise TrainError(f"run config {str(run_dir / 'run_config.json')!r} has no 'train' object; "
                             "restore it or choose another --out")
        diffs = _check_resume_config(saved["train"], cfg)
        if diffs and not cfg.force:
            raise TrainError(f"cannot resume {cfg.out!r} with a different configuration (pass "
                             f"--force to override): " + "; ".join(diffs))
        if isinstance(saved.get("model"), dict) and saved["model"] != config.to_dict():
            changed = sorted(k for k in set(saved["model"]) | set(config.to_dict())
                             if saved["model"].get(k) != config.to_dict().get(k))
            raise TrainError(f"cannot resume {cfg.out!r}: its checkpoints hold another model ({', '.join(changed)} "
                             f"differ; preset {saved['train'].get('preset')!r} -> {cfg.preset!r}); even "
                             "--force cannot change the model of a run; choose another --out")
        pinned_teacher = saved.get("teacher")  # the teacher the run started with: kept
        saved_steps = checkpoint.all_steps(run_dir)
        start_step = checkpoint.newest_intact(run_dir) or 0
        if saved_steps and start_step == 0 and not start_over:
            raise TrainError(f"cannot resume {cfg.out!r}: none of its checkpoints {saved_steps} is intact "
                             "(see above); nothing was changed.  Pass --start-over to train it again from "
                             "step 0 in this directory (the damaged steps are kept in "
                             f"{checkpoint.CORRUPT}/), or restore a checkpoint")
    if start_step > 0:
        try:
            meta = checkpoint.meta_of(run_dir, start_step)
        except ValueError as e:
            raise TrainError(str(e)) from None
        pinned_teacher = meta.get("teacher") or saved.get("teacher")
        if meta.get("tokenizer_sha256") != tokenizer_sha:
            raise TrainError(f"run {cfg.out!r} was trained with tokenizer sha256 "
                             f"{meta.get('tokenizer_sha256')}, but {cfg.data!r} uses {tokenizer_sha}")
    subset_ids = _load_ids(cfg.subset, "subset") if cfg.subset else None
    exclude_ids = _load_ids(cfg.exclude, "exclude") if cfg.exclude else None
    sentinels = _ul2_sentinels(cfg, store) if cfg.objective == "ul2" else None

    mesh = sharding.make_mesh(cfg.mesh, devices=runtime_devices(cfg.runtime))
    platform = mesh.devices.flat[0].platform
    if resolve_kernels(cfg.kernels, platform) == "pallas" and platform != "tpu":
        raise TrainError(f"--kernels pallas needs a TPU, but this run's devices are {platform}; use "
                         "--kernels auto or xla")
    if cfg.batch % mesh.shape["data"]:
        raise TrainError(f"batch={cfg.batch} is not divisible by the data axis "
                         f"({mesh.shape['data']}) of mesh {cfg.mesh!r}")
    need_teacher = cfg.kd_steps > start_step
    # the teacher travels in a dict the loop empties at the switch, so no frame keeps its params
    teacher = {"config": None, "params": None, "identity": None, "cache": None}
    if cfg.teacher_cache is not None and not need_teacher:  # resuming past the KD phase: the
        teacher["identity"] = pinned_teacher  # cache may be gone; record the identity, read nothing
    elif cfg.teacher_cache is not None:  # the KD phase reads the teacher's top-k from the cache
        from salt.runtime.train.teacher_cache import CacheError, TeacherCache
        try:
            cache = TeacherCache(cfg.teacher_cache)
            cache.check(cfg, store, make_loaders(cfg, store, subset_ids, exclude_ids)[1], store.vocab_size)
        except CacheError as e:
            raise TrainError(str(e)) from None
        teacher["cache"], teacher["identity"] = cache, cache.identity()
        if pinned_teacher is not None and pinned_teacher != teacher["identity"]:
            raise TrainError(f"run {cfg.out!r} started with teacher {pinned_teacher!r}, the cache holds "
                             f"{teacher['identity']!r}; refusing to resume with another teacher")
    elif cfg.kd_steps > 0:
        if need_teacher:
            teacher["config"], teacher["params"], teacher["identity"] = load_teacher(
                cfg, config, tokenizer_sha, mesh, pinned=pinned_teacher,
                tokenizer_vocab=store.vocab_size)
        else:  # resuming past the KD phase: record the identity, load nothing
            teacher["identity"] = pinned_teacher

    if cfg.runtime == "reference":
        if padded_vocab(store.vocab_size, config, teacher["config"]) is not None:
            raise TrainError("--runtime reference needs embeddings of exactly the tokenizer's "
                             f"{store.vocab_size} rows (no vocabulary padding)")
        from salt.runtime.train.reference_train import train_reference
        return train_reference(cfg, config, store, subset_ids, exclude_ids, teacher, run_dir,
                                progress)
    return _train_jax(cfg, config, store, mesh, subset_ids, exclude_ids, teacher, run_dir,
                      start_step, progress, sentinels)


def _read_json(path: pathlib.Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise TrainError(f"{what} {str(path)!r} is unreadable or not JSON ({e}); "
                         "restore it or choose another --out") from None
    if not isinstance(obj, dict):
        raise TrainError(f"{what} {str(path)!r} is not a JSON object")
    return obj


def _check_out(cfg: TrainConfig, run_dir: pathlib.Path) -> None:
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


def batch_abstract(cfg, mesh):
    """The abstract step input: windows ``[B, T+1]`` (causal), or for UL2 the dict of
    :func:`salt.runtime.train.step.split_batch` (tokens, prefix lengths, target mask)."""
    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
    tokens = spec((cfg.batch, cfg.seq_len + 1), jnp.int32)
    if cfg.objective == "causal":
        return tokens
    return {"tokens": tokens, "prefix_len": spec((cfg.batch,), jnp.int32),
            "mask": spec((cfg.batch, cfg.seq_len), jnp.bool_)}


def step_batch(cfg, loader, step0: int, mesh, sentinels):
    """The global step input of 0-based ``step0`` from this process's windows (UL2 examples are
    a function of seed, step and global slot, so every process builds its own share)."""
    local = loader.batch(step0)
    if cfg.objective == "causal":
        return sharding.global_batch_array(local, mesh, cfg.batch)
    from salt.data import PAD_ID, ul2
    tokens, prefix_B, mask_BxT, _ = ul2.batch(
        local, seed=cfg.seed, step=step0, sentinels=sentinels, pad_id=PAD_ID,
        first_slot=loader.process_index * loader.local_batch, global_batch=cfg.batch)
    return {"tokens": sharding.global_batch_array(tokens, mesh, cfg.batch),
            "prefix_len": sharding.global_batch_array(prefix_B.astype(np.int32), mesh, cfg.batch),
            "mask": sharding.global_batch_array(mask_BxT, mesh, cfg.batch)}


def cached_batch_abstract(cfg, mesh):
    """The abstract input of the KD step from a teacher cache: the windows and the teacher's
    top-k logits (float32) and ids (int32), ``[B, T, k]``, all sharded over the batch."""
    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
    shape = (cfg.batch, cfg.seq_len, cfg.kd_topk)
    return {"tokens": spec((cfg.batch, cfg.seq_len + 1), jnp.int32), "topk_logits": spec(shape, jnp.float32),
            "topk_ids": spec(shape, jnp.int32)}


def cached_step_batch(cfg, cache, loader, step0: int, windows, mesh):
    """The KD step's input from the cache: this process's rows of the cached global batch."""
    from salt.runtime.train.teacher_cache import CacheError
    try:
        logits, ids = cache.batch(step0, cfg.kd_topk)
    except CacheError as e:
        raise TrainError(str(e)) from None
    rows = slice(loader.process_index * loader.local_batch, (loader.process_index + 1) * loader.local_batch)
    return {"tokens": windows, "topk_logits": sharding.global_batch_array(logits[rows], mesh, cfg.batch),
            "topk_ids": sharding.global_batch_array(ids[rows], mesh, cfg.batch)}


def _ul2_sentinels(cfg, store) -> list[int]:
    from salt.data.tokenizer import sentinel_ids
    ids = sentinel_ids(store.processor())
    if not ids:
        raise TrainError(f"objective='ul2' needs sentinel ids for span corruption, but the tokenizer of "
                         f"{cfg.data!r} reserves none: prepare the data with "
                         f"`salt data prepare --sentinels 100`")
    return ids


def _train_jax(cfg, config, store, mesh, subset_ids, exclude_ids, teacher, run_dir, start_step,
               progress, sentinels):
    teacher_config, teacher_identity, cache = teacher["config"], teacher["identity"], teacher["cache"]
    teacher_params = teacher.pop("params")
    full_loader, kd_loader = make_loaders(cfg, store, subset_ids, exclude_ids)
    if start_step > 0:  # the data (pool, order, tokenizer) must be the one the run used
        saved_state = checkpoint.meta_of(run_dir, start_step).get("loader_state")
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
        if cfg.init is None:
            params = model.init_params_jax(config, cfg.seed, out_shardings=p_shardings)
        else:  # continued pre-training from a run's newest intact checkpoint
            params = checkpoint.load_params(cfg.init, shardings=p_shardings)[1]
        init = optim.make_direction(cfg.optimizer).init
        opt_state = jax.jit(init, out_shardings=shardings_of(opt_abs))(params)
    else:
        params, opt_state, _ = checkpoint.restore(run_dir, start_step, params_abs, opt_abs)

    windows_abs = batch_abstract(cfg, mesh)
    t0 = time.perf_counter()
    std_step = kd_step = None
    vocab = padded_vocab(store.vocab_size, config, teacher_config)
    if cfg.kd_steps < cfg.steps:
        std_step = compiled_step(config, None, cfg, mesh, params_abs, opt_abs, None, windows_abs,
                                 vocab=vocab)
    if teacher_params is not None:
        kd_step = compiled_step(config, teacher_config, cfg, mesh, params_abs, opt_abs,
                                abstract_of(teacher_params), windows_abs, vocab=vocab)
    elif cache is not None and cfg.kd_steps > start_step:
        kd_step = compiled_step(config, None, cfg, mesh, params_abs, opt_abs, None,
                                cached_batch_abstract(cfg, mesh), vocab=vocab)
    compile_s = time.perf_counter() - t0
    hyper = jax.device_put(hyperparameters(cfg), sharding.replicated(mesh))
    step_sharding = sharding.replicated(mesh)

    run_dir.mkdir(parents=True, exist_ok=True)
    run_record = {"train": cfg.to_dict(), "model": config.to_dict(),
                  "tokenizer_sha256": store.tokenizer_sha256, "vocab_size": int(store.vocab_size),
                  "teacher": teacher_identity, "param_count": param_count(config)}
    first_process = jax.process_index() == 0
    if first_process and (start_step == 0 or not (run_dir / "run_config.json").exists()):
        outputs.write_json(run_dir / "run_config.json", run_record)
    if jax.process_index() == 0:  # incomplete/corrupt newer steps: kept aside, never reused
        checkpoint.empty_trash(run_dir)
        checkpoint.set_aside_newer(run_dir, start_step if start_step > 0 else None)
    metrics_path = run_dir / "metrics.jsonl"
    if first_process:
        _truncate_metrics(metrics_path, start_step)
    run_log = metrics_log.RunLog(run_dir, wandb_project=cfg.wandb, config=cfg.to_dict()) if first_process else None
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
    last_save_time = time.monotonic()
    try:
        with _Stop() as stop, open(metrics_path, "a") as metrics_file:
            for step in range(start_step + 1, cfg.steps + 1):
                kd_phase = step <= cfg.kd_steps
                if not kd_phase and (teacher_params is not None or kd_step is not None):
                    teacher_params = kd_step = None  # the switch: drop the teacher
                    gc.collect()
                loader = kd_loader if kd_phase else full_loader
                windows = step_batch(cfg, loader, step - 1, mesh, sentinels)
                if kd_phase and cache is not None:
                    windows = cached_step_batch(cfg, cache, loader, step - 1, windows, mesh)
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
                    raise NonFiniteLoss(step, m["loss"], _verified_or_none(run_dir, last_saved))
                if first_process:
                    metrics_file.write(json.dumps(finite_or_none(record)) + "\n")
                    metrics_file.flush()
                    run_log.write(record)
                history.append(record)
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}", phase=phase)
                periodic = cfg.checkpoint_every and step % cfg.checkpoint_every == 0
                timed = (cfg.checkpoint_minutes > 0
                         and time.monotonic() - last_save_time >= 60.0 * cfg.checkpoint_minutes)
                if periodic or timed or step == cfg.steps or step == cfg.kd_steps or stop.requested:
                    checkpoint.save(run_dir, step, params, opt_state, meta_for(step), keep=keep)
                    last_saved = step
                    last_save_time = time.monotonic()
                if stop.requested:
                    break
    finally:
        bar.close()
        if run_log is not None:
            run_log.close()
    interrupted = step < cfg.steps
    return {"run_dir": str(run_dir), "preset": cfg.preset, "model": config.to_dict(),
            "start_step": start_step, "last_step": step, "interrupted": interrupted,
            "interrupted_by": stop.requested if interrupted else None,
            "last_checkpoint": last_saved, "compile_s": compile_s,
            "final": history[-1] if history else None,
            "kd_step_s": float(np.median(times["kd"])) if times["kd"] else None,
            "standard_step_s": float(np.median(times["standard"])) if times["standard"] else None}


def _verified_or_none(run_dir, step):
    """``step`` if its checkpoint verifies (what "the last good checkpoint" may name), else None."""
    if step is None:
        return None
    try:
        checkpoint.verify(run_dir, step)
        return step
    except checkpoint.CorruptCheckpoint:
        return None


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
