"""``salt reproduce``: the paper's whole comparison, end to end, with seeds and a verdict per claim.

Stages (each recorded in ``OUT/state.json`` when finished, so a re-run skips it; an interrupted
training stage resumes from its last checkpoint):

1. ``data``      prepare the embedded corpus (``salt.data.prepare``) unless ``--data`` is given;
2. ``slm``       train the SLM teacher, keeping its early checkpoint (one SLM for all seeds);
                 with ``--teacher RUN`` (e.g. ``salt import hf``) that run's newest checkpoint is
                 the SLM instead, checked against ``--data`` by the trainer's teacher rules before
                 anything is written and pinned (path, step, manifest sha256) in the state;
3. ``score``     score candidate training windows with the EARLY SLM checkpoint (eq. 11, the
                 windows it saw excluded) and select the top m = n_kd x batch; with ``--teacher``
                 the ``--early-teacher`` run scores, and without one there is no selection and no
                 SALT_DS (the report says so for the claims on SALT_DS);
4. per student seed ``s`` (``OUT/runs/<VARIANT>-seed<s>/``): ``BASELINE``, ``RKD``, ``SALT``, ``SALT_DS``
   with identical data order (seed ``s``) and budget, checkpoints every ``eval_every`` steps.
   With the step transition SALT is RKD for its first n_kd steps (docs/design.md §1), so SALT
   is *forked*: RKD's checkpoint at n_kd and its metrics up to n_kd are copied into SALT's run
   directory under SALT's own ``run_config.json`` and the trainer resumes from there
   (bit-identical to SALT trained from scratch; tested).  Every further ρ arm (``extra_rhos``,
   ``--rho 1,0.25``) adds its own ``RKD-rho<ρ>``, ``SALT-rho<ρ>`` and ``SALT_DS-rho<ρ>`` runs
   against the same BASELINE;
5. ``overhead``  KD-step vs standard-step time, interleaved in one process (``salt bench step``);
6. ``eval``      per-window held-out statistics of every kept checkpoint; cached in ``OUT/eval/``;
   ``cloze``     the LAMBADA-style last-word task on held-out passages: the final SLM and every
                 student at n_kd and at the end, by SLM-difficulty bucket (``salt.runtime.eval.cloze``,
                 paper appendix J); cached in ``OUT/eval/cloze/``.  It reads only finished runs,
                 so a reproduction finished before this stage existed runs just this stage;
7. ``report``    ``OUT/report.md``, ``OUT/results.json`` and PNG plots (``salt.runtime.experiments.report``).

Each stage is a small function over the shared :class:`_Run` (settings, OUT, state, what earlier
stages found), listed in order in :data:`STAGES`; the student runs (their configs, the fork, the
side-by-side worker pool) are :mod:`salt.runtime.experiments.students`'.  Re-running with different settings in the same
``OUT`` is refused unless ``--overwrite`` (which starts over).  Students train two at a time, each
process pinned to one core with single-threaded XLA (``side_by_side``; about 1.4x the throughput
of one 2-thread run, docs/reproduction.md); ``--sequential`` trains them one after the other in
this process.  The statistics and the rendering live in ``report.py`` / ``report_render.py``.
Why one module of ~680 lines: the stages, their shared run record and the measurements only they
make (sharpness, caches, overhead) read top to bottom in the order the reproduction runs them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from salt.bench.step import run_benchmark
from salt.core import outputs
from salt.core.lock import LOCK_NAME, DirLock
from salt.data import TokenStore, prepare, validation_batches
from salt.reference.config import ModelConfig, get_preset, param_count
from salt.runtime.eval import evaluate
from salt.runtime.experiments import cloze_stage, report, report_render
from salt.runtime.experiments.presets import SIZES, ReproduceConfig, config_for  # noqa: F401 (re-exported)
from salt.runtime.experiments.students import (StageRecord, fork_run, remove_own, say, side_by_side, train_config,
                                               train_stage)
from salt.runtime.model import checkpoint, transformer as model
from salt.runtime.model.checkpoint import all_steps, read_meta
from salt.runtime.select import score as score_mod
from salt.runtime.train import metrics_log, teacher_cache
from salt.runtime.train.config import TrainError
from salt.runtime.train.setup import check_teacher, student_config

VARIANTS = ("BASELINE", "RKD", "SALT", "SALT_DS")


# --------------------------------------------------------------------------- state

class _State(StageRecord):
    """``OUT/state.json``: the settings fingerprint, finished stages and their wall times."""

    def __init__(self, out: pathlib.Path, cfg: ReproduceConfig, force: bool):

        self.path = out / "state.json"
        settings = dataclasses.asdict(cfg)
        settings.pop("out")
        settings.pop("seeds")  # more --seeds extend a reproduction (stages are per seed)
        settings.pop("extra_rhos")  # so do more ρ arms (stages are per arm; the lead ρ must match)
        for name, default in (("kd_topk", None), ("teacher_cache", False), ("rho_searched", False),
                              ("teacher", None), ("early_teacher", None)):  # newer settings: a
            if settings.get(name) == default:  # reproduction from before they existed still matches
                settings.pop(name)
        if self.path.is_file() and not force:
            try:
                old = json.loads(self.path.read_text(encoding="utf-8"))
                old["settings"], old["stages"]
            except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, RecursionError) as e:
                raise ValueError(f"{str(self.path)!r} is unreadable ({e}); restore it, or pass --overwrite "
                                 "to start the reproduction over") from None
            old.get("settings", {}).pop("seeds", None)
            old.get("settings", {}).pop("extra_rhos", None)
            if old.get("settings") != settings:
                changed = sorted(k for k in set(settings) | set(old.get("settings", {}))
                                 if settings.get(k) != old.get("settings", {}).get(k))
                raise ValueError(f"{str(out)!r} holds a reproduction with different settings "
                                 f"({', '.join(changed)}); use another --out or --overwrite")
            self.data = old
        else:  # new, or --overwrite: starts over (the files of the old stages are removed with it)
            self.data = {"settings": settings, "stages": {}}
        out.mkdir(parents=True, exist_ok=True)
        self.save()



def eval_stats(cache: pathlib.Path, run_dir, step, data_dir, cfg):

    if cache.is_file():
        return evaluate.load_stats(cache)
    stats, _ = evaluate.model_window_stats(run_dir, step, data_dir=data_dir, seq_len=cfg.seq_len,
                                           batch_size=cfg.eval_batch, max_windows=cfg.eval_windows,
                                           progress=False)
    evaluate.save_stats(cache, stats)
    return stats


def arm_suffix(cfg: ReproduceConfig, rho: float) -> str:
    """Run-name suffix of a ρ arm: none for the lead ρ, ``-rho<ρ>`` for the others."""
    return "" if rho == cfg.rho else f"-rho{rho:g}"


def teacher_sharpness(run_dir, step, data_dir, cfg) -> dict:
    """Entropy (nats) of the KD target softmax(ρ·t) and its top-10 mass, mean over held-out
    target positions, vs the uniform distribution's log V (how informative the target is)."""


    config, params, _ = checkpoint.load_params(run_dir, step)

    @jax.jit
    def parts(params, inputs_BxT):
        z_BxTxV = cfg.rho * model.forward(params, inputs_BxT, config).astype(jnp.float32)
        logp_BxTxV = jax.nn.log_softmax(z_BxTxV, axis=-1)
        p_BxTxV = jnp.exp(logp_BxTxV)
        top_BxTx10 = jax.lax.top_k(p_BxTxV, min(10, config.vocab_size))[0]
        return -(p_BxTxV * logp_BxTxV).sum(-1), top_BxTx10.sum(-1)

    ent, top = [], []
    for _, tokens in validation_batches(data_dir, seq_len=cfg.seq_len, batch_size=cfg.eval_batch,
                                        max_windows=min(cfg.eval_windows, 128)):
        e, t = parts(params, jnp.asarray(np.asarray(tokens, np.int32)[:, :-1]))
        ent.append(np.asarray(e).ravel())
        top.append(np.asarray(t).ravel())
    return {"entropy": float(np.mean(np.concatenate(ent))), "top10_mass": float(np.mean(np.concatenate(top))),
            "uniform_entropy": float(math.log(config.vocab_size)), "rho": cfg.rho}


def teacher_caches(cfg: ReproduceConfig, state, out, data_dir, slm_dir, selection_path, progress) -> dict:
    """Build (or resume) the teacher caches of the KD phases: per seed, one over the whole pool's
    order (``all``: RKD's ``n`` KD steps; SALT's first ``n_kd`` are the same windows) and one over
    SALT_DS's selected order (``selected``: ``n_kd`` steps; none when ``selection_path`` is None:
    no SALT_DS).  The final SLM, top-``cfg.kd_topk``,
    the default compact layout.  Returns ``{(seed, order): cache directory}``; stage ``teacher cache/…``
    records each build's wall time and size."""

    caches = {}
    for seed in cfg.student_seeds():
        for order, steps, subset in (("all", cfg.steps, None), ("selected", cfg.kd_steps, selection_path)):
            if subset is None and order == "selected":
                continue  # no selection (--teacher without --early-teacher): no SALT_DS
            path = out / "teacher_cache" / f"{order}-seed{seed}"
            caches[(seed, order)] = path
            stage = f"teacher cache/{order}-seed{seed}"
            if state.done(stage):
                continue
            t0 = time.time()
            say(f"caching the SLM's top-{cfg.kd_topk} over {steps} KD steps ({order} windows, seed {seed})")
            tc = train_config(cfg, path, data_dir, preset=cfg.student_preset, steps=steps, kd_steps=steps,
                              checkpoint_every=cfg.eval_every, seed=seed, teacher=slm_dir, subset=subset)
            teacher_cache.build(tc, top_k=cfg.kd_topk, out=path, progress=progress)  # resumes a killed build
            state.finish(stage, time.time() - t0, steps=steps, bytes=teacher_cache.stored_bytes(path),
                         tokens=steps * cfg.batch * cfg.seq_len)
    return caches


def teacher_summary(given: dict, slm_dir, slm_step: int, cfg: ReproduceConfig) -> dict:
    """What the report says about the SLM: trained here (preset, steps) or given (``--teacher``:
    path, step, manifest sha256, architecture, where it came from), and the early teacher."""
    def describe(identity):
        c = ModelConfig.from_dict(identity["config"])
        meta = read_meta(identity["path"], identity["step"])
        hf, run_config = meta.get("hf"), meta.get("run_config") or {}
        source = (f"imported from Hugging Face ({hf.get('model_type')}, {hf.get('dtype')}, from {hf.get('source')})"
                  if isinstance(hf, dict) else f"trained by SALT (preset {run_config.get('preset') or c.name!r})")
        return {"path": identity["path"], "step": identity["step"], "manifest_sha256": identity["manifest_sha256"],
                "source": source, "name": c.name,
                "architecture": (f"{c.n_layers} layers, d_model {c.d_model}, {c.n_heads} heads / {c.n_kv_heads} kv, "
                                 f"d_ff {c.d_ff}, {c.activation}, {'tied' if c.tied_head else 'separate'} head, "
                                 f"vocabulary {c.vocab_size}"),
                "non_embedding_params": param_count(c, embedding=False)}

    if not given:
        return {"given": False, "path": str(slm_dir), "step": int(slm_step), "preset": cfg.teacher_preset,
                "early_step": cfg.early_step}
    return dict(describe(given["teacher"]), given=True,
                early_teacher=describe(given["early_teacher"]) if given["early_teacher"] else None)


def kd_summary(cfg: ReproduceConfig, state, overhead: dict, forked: bool) -> dict:
    """What the KD was (full vocabulary or top-K) and, with teacher caches, their measured cost
    and the wall time they saved: cache build time against the KD steps run from them times the
    measured (interleaved ``salt bench step``) difference of the online-teacher and cached KD step."""
    kd = {"topk": cfg.kd_topk, "teacher_cache": None}
    if not cfg.teacher_cache:
        return kd
    stages = state.data["stages"]  # this run's seeds only (an earlier invocation may have had others)
    builds = {stage: stages[stage] for stage in (f"teacher cache/{order}-seed{seed}" for seed in cfg.student_seeds()
                                                 for order in ("all", "selected")) if stage in stages}
    build_s = sum(info["seconds"] for info in builds.values())
    # KD steps read from a cache, per seed: RKD's n, SALT_DS's n_kd (when selected), SALT's n_kd unless forked
    selected = any(k.startswith("teacher cache/selected") for k in builds)
    cached_steps = len(cfg.student_seeds()) * (cfg.steps + (cfg.kd_steps if selected else 0)
                                               + (0 if forked else cfg.kd_steps))
    per_step = overhead["kd_step_s"] - overhead["cached_step_s"]
    kd["teacher_cache"] = {
        "build_s": build_s, "builds": {k: {"seconds": v["seconds"], "bytes": v["bytes"], "steps": v["steps"],
                                           "bytes_per_token": v["bytes"] / v["tokens"]} for k, v in builds.items()},
        "cached_kd_steps": cached_steps, "online_kd_step_s": overhead["kd_step_s"],
        "cached_kd_step_s": overhead["cached_step_s"], "kd_phase_saved_s": cached_steps * per_step,
        "net_saved_s": cached_steps * per_step - build_s,
        "bytes_per_token": overhead.get("cache_bytes_per_token")}
    return kd


# --------------------------------------------------------------------------- the job

def _same_corpus(out: pathlib.Path, cfg: ReproduceConfig) -> dict | None:
    """The finished ``data`` stage of the reproduction in ``out`` when ``cfg`` would prepare the
    same corpus (the embedded one, same vocabulary) and ``out/data`` is a store; else None."""

    try:
        old = json.loads((out / "state.json").read_text(encoding="utf-8"))
        same = old["settings"].get("vocab_size") == cfg.vocab_size and not old["settings"].get("data")
        stage = old["stages"].get("data") if same else None
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return None
    if cfg.data or not isinstance(stage, dict) or outputs.kind_of(out / "data") != "store":
        return None
    return {"seconds": float(stage.get("seconds", 0.0))}


def check_settings(cfg: ReproduceConfig) -> None:
    """Everything about ``cfg`` that can be checked before a file is written: the fields, the
    presets, each run's training configuration and ``--data`` (a token store).  ValueError
    naming the setting otherwise."""

    cfg.validate()
    for flag, name in ((("--teacher-preset", cfg.teacher_preset),) if cfg.teacher is None else ()) + (
            ("--student-preset", cfg.student_preset),):
        try:
            get_preset(name)
        except ValueError as e:
            raise ValueError(f"{flag}: {e}") from None
    out, data = pathlib.Path(cfg.out), pathlib.Path(cfg.data) if cfg.data else None
    runs = [] if cfg.teacher else [
        train_config(cfg, out, data or out, preset=cfg.teacher_preset, steps=cfg.teacher_steps,
                     kd_steps=0, seed=cfg.seed, batch=cfg.teacher_batch, checkpoint_every=cfg.early_step)]
    for seed in cfg.student_seeds():
        runs.append(train_config(cfg, out, data or out, preset=cfg.student_preset, steps=cfg.steps,
                                 kd_steps=cfg.kd_steps, seed=seed, checkpoint_every=cfg.eval_every,
                                 teacher=out, transition="step"))
    for tc in runs:
        try:
            tc.validate()
        except TrainError as e:
            raise ValueError(f"settings: {e}") from None
    if data is not None:

        if not data.is_dir():
            raise ValueError(f"--data {str(data)!r} does not exist or is not a directory")
        try:
            store = TokenStore(data)
        except (ValueError, OSError) as e:
            raise ValueError(f"--data {str(data)!r} is not a usable token store: {e}") from None
        given_teachers(cfg, store)


def given_teachers(cfg: ReproduceConfig, store) -> dict:
    """``{"teacher": identity, "early_teacher": identity or None}`` of the given SLM runs
    (``--teacher`` / ``--early-teacher``; empty without them), checked against the store and the
    student by the trainer's teacher rules (same tokenizer sha256; a teacher vocabulary padded
    beyond the tokenizer's is allowed) before anything is written; ValueError naming the flag."""
    if cfg.teacher is None:
        return {}
    tc = train_config(cfg, cfg.out, store.path, preset=cfg.student_preset, steps=cfg.steps,
                      kd_steps=cfg.kd_steps, seed=cfg.seed, checkpoint_every=cfg.eval_every,
                      teacher=cfg.teacher)
    found = {"teacher": None, "early_teacher": None}
    for key, flag in (("teacher", "--teacher"), ("early_teacher", "--early-teacher")):
        path = getattr(cfg, key)
        if path is None:
            continue
        try:
            student_config(tc, store.vocab_size)  # the student's preset holds the store's vocabulary
            found[key] = check_teacher(dataclasses.replace(tc, teacher=str(path)), store.tokenizer_sha256,
                                       store.vocab_size)
        except TrainError as e:
            raise ValueError(f"{flag} {str(path)!r}: {e}") from None
        if pathlib.Path(found[key]["path"]).resolve().is_relative_to(pathlib.Path(cfg.out).resolve()):
            raise ValueError(f"{flag} {str(path)!r} lies inside --out {cfg.out!r}: give a run outside it")
    return found


def run(cfg: ReproduceConfig, *, force: bool = False, progress: bool = True, start_over: bool = False) -> dict:
    """Run (or resume) the whole reproduction; returns the results dict (also in results.json).
    The settings are checked before anything is written; ``OUT`` is locked while it runs.
    ``start_over``: a run whose checkpoints are all damaged is trained again from step 0 (else
    refused, naming it).  A stage stopped by SIGTERM / SIGINT raises
    :class:`salt.runtime.experiments.students.Interrupted`."""

    check_settings(cfg)
    out = pathlib.Path(cfg.out)
    outputs.check_output_dir(out, "reproduction", mode="replace" if force else "resume",
                             inputs=[p for p in (cfg.data, cfg.teacher, cfg.early_teacher) if p] if force else ())
    with DirLock(out):
        return _run(cfg, force=force, progress=progress, start_over=start_over)


@dataclasses.dataclass
class _Run:
    """What the stages of one reproduction share: its settings, output directory and state, and
    what earlier stages found (the store, the given teachers, the arms' results)."""

    cfg: ReproduceConfig
    out: pathlib.Path
    state: _State
    progress: bool
    start_over: bool = False  # --start-over: a run whose checkpoints are all damaged trains again
    data_dir: pathlib.Path | None = None
    store: TokenStore | None = None
    given: dict = dataclasses.field(default_factory=dict)  # --teacher / --early-teacher identities
    caches: dict = dataclasses.field(default_factory=dict)
    arms: dict = dataclasses.field(default_factory=dict)  # per ρ: per-seed results, teacher sharpness
    slm: dict = dataclasses.field(default_factory=dict)
    teacher_stats: dict | None = None
    cloze: dict | None = None
    results: dict = dataclasses.field(default_factory=dict)

    @property
    def runs(self) -> pathlib.Path:
        return self.out / "runs"

    @property
    def slm_dir(self) -> pathlib.Path:  # --teacher: that run is the SLM, its newest checkpoint
        return pathlib.Path(self.given["teacher"]["path"]) if self.given else self.runs / "SLM"

    @property
    def slm_step(self) -> int:
        return self.given["teacher"]["step"] if self.given else self.cfg.teacher_steps

    @property
    def selecting(self) -> bool:  # the early-checkpoint selection and SALT_DS run
        return not self.given or self.given["early_teacher"] is not None

    @property
    def variants(self) -> tuple:
        return VARIANTS if self.selecting else tuple(v for v in VARIANTS if v != "SALT_DS")


def _reset_for_overwrite(out: pathlib.Path, cfg: ReproduceConfig) -> _State:
    """``--overwrite`` of a reproduction: everything in OUT is this command's own (checked file by
    file before); the fresh state is written first, so a crash part-way leaves a state that redoes
    whatever is gone.  The same prepared corpus is kept, with its stage."""
    kept_data = _same_corpus(out, cfg)
    state = _State(out, cfg, force=True)
    if kept_data is not None:
        state.finish("data", kept_data["seconds"])
    for child in sorted(out.iterdir()):
        if child.name in ("state.json", LOCK_NAME) or (child.name == "data" and kept_data is not None):
            continue
        if child.is_dir():
            outputs.remove_tree(child)
        else:
            child.unlink()
    return state


def _stage_data(r: _Run) -> None:
    """1. The token store: ``--data``, or the embedded corpus prepared in OUT/data."""
    cfg, state = r.cfg, r.state
    r.data_dir = pathlib.Path(cfg.data) if cfg.data else r.out / "data"
    if cfg.data:
        if not r.data_dir.is_dir():
            raise ValueError(f"--data {str(r.data_dir)!r} does not exist")
    elif not state.done("data"):
        t0 = time.time()
        say(f"preparing the embedded corpus in {r.data_dir}")
        kwargs = {} if cfg.vocab_size is None else {"vocab_size": cfg.vocab_size}
        # an own (or empty) store only: prepare's output rule, file by file
        prepare(str(r.data_dir), progress=r.progress, overwrite=True, **kwargs)
        state.finish("data", time.time() - t0)
    r.store = TokenStore(r.data_dir)
    r.given = given_teachers(cfg, r.store)


def _stage_slm(r: _Run) -> None:
    """2. The SLM teacher: trained here, or the given ``--teacher`` (pinned in the state)."""
    cfg, state, given = r.cfg, r.state, r.given
    if given:
        recorded = state.info("slm").get("teacher")
        if recorded is not None and (recorded["manifest_sha256"], recorded["step"]) != (
                given["teacher"]["manifest_sha256"], given["teacher"]["step"]):
            raise ValueError(f"--teacher {cfg.teacher!r} is not the checkpoint this reproduction started with "
                             f"({recorded['path']} step {recorded['step']}, manifest sha256 "
                             f"{recorded['manifest_sha256'][:16]}...); use another --out or --overwrite")
        if not state.done("slm"):
            say(f"using the given SLM {given['teacher']['path']} (step {r.slm_step}); not training one")
            state.finish("slm", 0.0, teacher=given["teacher"], early_teacher=given["early_teacher"])
    if not state.done("slm"):
        t0 = time.time()
        say(f"training the SLM teacher ({cfg.teacher_preset}, {cfg.teacher_steps} steps)")
        train_stage(train_config(cfg, r.slm_dir, r.data_dir, preset=cfg.teacher_preset,
                            steps=cfg.teacher_steps, kd_steps=0, seed=cfg.seed,
                            batch=cfg.teacher_batch,
                            checkpoint_every=math.gcd(cfg.early_step, cfg.kd_steps)), r.progress, r.start_over)
        state.finish("slm", time.time() - t0)


def _stage_score(r: _Run) -> None:
    """3. Score candidate windows with the early checkpoint (eq. 11) and select the top m."""
    cfg, state, given = r.cfg, r.state, r.given
    scores_path, selection_path = r.out / "scores.npz", r.out / "selection.npy"
    scorer = (given["early_teacher"]["path"], given["early_teacher"]["step"]) if given and r.selecting \
        else (str(r.slm_dir), cfg.early_step)
    if not r.selecting:
        say("no --early-teacher: the early-checkpoint selection and SALT_DS are not run")
        return
    if state.done("score"):
        return
    t0 = time.time()
    say(f"scoring candidate windows with {scorer[0]} step {scorer[1]} (k={cfg.k})")
    job = score_mod.ScoreJob(teacher=scorer[0], teacher_step=scorer[1], data=str(r.data_dir),
                             out=str(scores_path), k=cfg.k, seq_len=cfg.seq_len,
                             batch=cfg.eval_batch, max_candidates=cfg.candidates, force=True)
    summary = score_mod.score(job, progress=r.progress)
    z = score_mod.load_scores(scores_path)
    m = cfg.kd_steps * cfg.batch
    clipped = m > z["window_ids"].size
    m = min(m, int(z["window_ids"].size))
    ids = score_mod.select_top_m(z["window_ids"], z["scores"], m)
    outputs.save_npy(selection_path, ids)
    finite = z["scores"][np.isfinite(z["scores"])]
    selected = z["scores"][np.isin(z["window_ids"], ids)]
    state.finish("score", time.time() - t0, n_scored=summary["n_scored"], notes=summary["notes"],
                 n_train_windows=summary["n_train_windows"],
                 n_excluded=summary["n_excluded"], m=int(m), clipped=bool(clipped),
                 score_median=float(np.median(finite)) if finite.size else math.nan,
                 zero_fraction=float(np.mean(z["scores"] == 0.0)),
                 selected_median=float(np.median(selected[np.isfinite(selected)]))
                 if np.isfinite(selected).any() else math.nan)


def _stage_caches(r: _Run) -> None:
    """3b. Teacher caches: the SLM's top-K over every KD phase's windows, computed once."""
    if r.cfg.teacher_cache:
        r.caches = teacher_caches(r.cfg, r.state, r.out, r.data_dir, r.slm_dir,
                                  r.out / "selection.npy" if r.selecting else None, r.progress)


def _student_jobs(r: _Run) -> list:
    """The unfinished student runs: ``(stage, TrainConfig, forked, stage it waits for)``."""
    cfg = r.cfg
    plan = {"BASELINE": dict(kd_steps=0),
            "RKD": dict(kd_steps=cfg.steps, teacher=r.slm_dir, transition="step"),
            "SALT": dict(kd_steps=cfg.kd_steps, teacher=r.slm_dir),
            "SALT_DS": dict(kd_steps=cfg.kd_steps, teacher=r.slm_dir, subset=r.out / "selection.npy")}
    jobs = []
    for seed in cfg.student_seeds():
        for rho in cfg.rhos():  # the extra ρ arms share BASELINE: it is trained once, in the lead arm
            arm_cfg, arm = dataclasses.replace(cfg, rho=rho), arm_suffix(cfg, rho)
            for name in ("BASELINE", "RKD", "SALT_DS", "SALT"):  # SALT last: it waits for RKD
                if (name == "BASELINE" and arm) or name not in r.variants:
                    continue
                order = "selected" if name == "SALT_DS" else "all"
                tc = train_config(arm_cfg, r.runs / f"{name}{arm}-seed{seed}", r.data_dir, preset=cfg.student_preset,
                                  steps=cfg.steps, checkpoint_every=cfg.eval_every, seed=seed,
                                  teacher_cache=r.caches.get((seed, order)) if name != "BASELINE" else None,
                                  **plan[name])
                forked = name == "SALT" and cfg.transition == "step"
                jobs.append((f"{name}{arm}/seed{seed}", tc, forked, f"RKD{arm}/seed{seed}" if forked else None))
    return [j for j in jobs if not r.state.done(j[0])]


def _stage_students(r: _Run) -> None:
    """4. BASELINE, RKD, SALT and SALT_DS per seed (and per extra ρ arm), two at a time."""
    cfg, state = r.cfg, r.state
    jobs = _student_jobs(r)

    def prepare_job(stage, tc, forked):
        run_dir = pathlib.Path(tc.out)
        if forked and all_steps(run_dir) == []:
            remove_own(run_dir, "run")  # an earlier fork of ours that never got to train
            fork_run(run_dir.with_name(run_dir.name.replace("SALT-", "RKD-", 1)), cfg.kd_steps,
                     run_dir, tc)
        say(f"training {stage} ({cfg.student_preset}, {cfg.steps} steps, n_kd = {tc.kd_steps}"
             + (f"; forked from RKD at step {cfg.kd_steps}" if forked else "")
             + ("; one core" if cfg.side_by_side else "") + ")")

    if cfg.side_by_side and jobs:
        t0 = time.time()
        side_by_side(jobs, state, prepare_job, r.start_over)
        state.finish("students side by side", time.time() - t0)
    for stage, tc, forked, _ in jobs:  # sequential (or what the side-by-side pool left)
        if state.done(stage):
            continue
        t0 = time.time()
        prepare_job(stage, tc, forked)
        train_stage(tc, r.progress, r.start_over)
        state.finish(stage, time.time() - t0, forked=forked)


def _stage_overhead(r: _Run) -> None:
    """5. KD-step overhead, the two steps interleaved in one process (``salt bench step``)."""
    cfg, state = r.cfg, r.state
    if state.done("overhead"):
        return
    t0 = time.time()
    say("timing KD and standard steps interleaved (salt bench step)")
    b = run_benchmark(cfg.student_preset, cfg.teacher_preset, vocab=r.store.vocab_size,
                      teacher_config=ModelConfig.from_dict(r.given["teacher"]["config"]) if r.given else None,
                      batch=cfg.batch, seq_len=cfg.seq_len, optimizer=cfg.optimizer,
                      iters=cfg.overhead_iters, warmup=1, transition=cfg.transition,
                      kd_topk=cfg.kd_topk, progress=False)
    keys = ("standard_step_s", "kd_step_s", "measured_ratio", "predicted_ratio",
            "matmul_flops_per_s", "standard_fraction_of_matmul", "kd_fraction_of_matmul",
            "standard_tokens_per_s", "iters", "standard_step_cpu_s", "kd_step_cpu_s", "cpu_ratio")
    if cfg.kd_topk is not None:
        keys += ("cached_step_s", "cached_ratio", "cached_vs_online", "cache_bytes_per_token")
    state.finish("overhead", time.time() - t0, **{k: b[k] for k in keys})


def _stage_eval(r: _Run) -> None:
    """6. Held-out statistics of the SLM and of every kept student checkpoint, per ρ arm."""
    cfg, state = r.cfg, r.state
    t0 = time.time()
    eval_dir = r.out / "eval"
    eval_dir.mkdir(exist_ok=True)
    say("evaluating every kept checkpoint on the held-out split")
    r.teacher_stats = eval_stats(eval_dir / f"SLM_{r.slm_step}.npz", r.slm_dir, r.slm_step, r.data_dir, cfg)
    slm_steps = [r.slm_step] if r.given else sorted({s for s in all_steps(r.slm_dir)
                                                     if s in (cfg.kd_steps, r.slm_step)})
    for s in slm_steps:
        summary = evaluate.summarize(eval_stats(eval_dir / f"SLM_{s}.npz", r.slm_dir, s, r.data_dir,
                                                 cfg), r.teacher_stats)
        summary["step"] = s
        r.slm["final" if s == r.slm_step else "at_kd"] = summary
    if not r.given:  # a given teacher's run is the user's: nothing is written into it
        metrics_log.write_eval(r.slm_dir, {v["step"]: {k: x for k, x in v.items() if k != "step"}
                                           for v in r.slm.values()})
    for rho in cfg.rhos():  # per ρ: per-seed results of its RKD, SALT, SALT_DS against the shared BASELINE
        arm = arm_suffix(cfg, rho)
        per_seed = {str(seed): _seed_results(r, seed, arm, eval_dir) for seed in cfg.student_seeds()}
        if not state.done(f"sharpness{arm}"):
            state.finish(f"sharpness{arm}", 0.0, **teacher_sharpness(
                r.slm_dir, r.slm_step, r.data_dir, dataclasses.replace(cfg, rho=rho)))
        r.arms[rho] = {"per_seed": per_seed, "sharpness": {k: v for k, v in state.info(f"sharpness{arm}").items()
                                                           if k != "seconds"}}
    if not state.done("eval"):
        state.finish("eval", time.time() - t0)


def _seed_results(r: _Run, seed: int, arm: str, eval_dir: pathlib.Path) -> dict:
    """One seed's evaluated variants of one ρ arm (:func:`report.seed_results`); each run's
    evaluations also go to its TensorBoard files."""
    stats = {}
    for name in r.variants:
        run_name = f"{name}{'' if name == 'BASELINE' else arm}"
        run_dir = r.runs / f"{run_name}-seed{seed}"
        for s in all_steps(run_dir):
            if s <= r.cfg.steps:
                stats[(name, s)] = eval_stats(eval_dir / f"seed{seed}_{run_name}_{s}.npz",
                                               run_dir, s, r.data_dir, r.cfg)
        metrics_log.write_eval(run_dir, {s: evaluate.summarize(stats[(name, s)], r.teacher_stats)
                                         for (n, s) in stats if n == name})
    return report.seed_results(stats, r.teacher_stats, n_kd=r.cfg.kd_steps, n_steps=r.cfg.steps)


def _stage_cloze(r: _Run) -> None:
    """6b. The LAMBADA-style last-word task on held-out passages (appendix J)."""
    t0 = time.time()
    if not r.state.done("cloze"):
        say("scoring the LAMBADA-style last-word task (held-out passages, SLM-difficulty buckets)")
    r.cloze = cloze_stage.reproduce_stage(r.out, r.cfg, r.data_dir, r.variants, slm=(r.slm_dir, r.slm_step))
    if not r.state.done("cloze"):
        r.state.finish("cloze", time.time() - t0, n_passages=r.cloze["n_passages"])


def _overhead(ov: dict) -> dict:
    """The report's KD-step overhead from the ``overhead`` stage's measurements."""
    return {"kd_step_s": ov["kd_step_s"], "std_step_s": ov["standard_step_s"],
            **report.overhead_estimate(ov), "predicted": ov["predicted_ratio"] - 1.0,
            "matmul_flops_per_s": ov["matmul_flops_per_s"],
            "standard_fraction_of_matmul": ov["standard_fraction_of_matmul"],
            "kd_fraction_of_matmul": ov["kd_fraction_of_matmul"], "iters": ov["iters"],
            **{k: ov[k] for k in ("cached_step_s", "cached_ratio", "cached_vs_online",
                                  "cache_bytes_per_token") if k in ov}}


def _stage_report(r: _Run) -> None:
    """7. Accounting, verdicts, plots: OUT/results.json and OUT/report.md."""
    cfg, state, given, store = r.cfg, r.state, r.given, r.store
    t_cfg = (ModelConfig.from_dict(given["teacher"]["config"]) if given
             else get_preset(cfg.teacher_preset)).replace(vocab_size=store.vocab_size)
    s_cfg = get_preset(cfg.student_preset).replace(vocab_size=store.vocab_size)
    ov = state.info("overhead")
    overhead = _overhead(ov)
    for arm in r.arms.values():
        for seed_result in arm["per_seed"].values():
            report.add_efficiency(seed_result, cfg.kd_steps, cfg.steps, overhead["overhead"])
    per_seed = r.arms[cfg.rho]["per_seed"]
    results = {"config": dataclasses.asdict(cfg), "seeds": cfg.student_seeds(), "slm": r.slm,
               "per_seed": per_seed, "pooled": report.pool_seeds(per_seed),
               "overhead": overhead, "eval_windows": int(r.teacher_stats["window_ids"].size),
               "sharpness": r.arms[cfg.rho]["sharpness"],
               "params": {"teacher_non_embedding": param_count(t_cfg, embedding=False),
                          "student_non_embedding": param_count(s_cfg, embedding=False),
                          "vocab_size": store.vocab_size},
               "tokens": {"student": cfg.steps * cfg.batch * cfg.seq_len,
                          "teacher": None if given else  # a given teacher's training is unknown here
                          cfg.teacher_steps * (cfg.teacher_batch or cfg.batch) * cfg.seq_len}}
    results["teacher"] = teacher_summary(given, r.slm_dir, r.slm_step, cfg)
    sel = state.info("score")
    results["selection"] = {k: sel[k] for k in ("n_scored", "n_train_windows", "n_excluded", "m", "clipped",
                                                "score_median", "selected_median", "zero_fraction", "notes")
                            if k in sel}
    if not r.selecting:
        results["selection"] = {"skipped": "no --early-teacher was given with --teacher: the early-checkpoint "
                                           "selection (eq. 11) and SALT_DS were not run"}
    results["cloze"] = r.cloze
    results["kd"] = kd_summary(cfg, state, ov, cfg.transition == "step")
    results["claims"] = report.claims(results)
    results["rho_arms"] = report.rho_arms(results, dict(r.arms))
    metrics = {}
    for seed in cfg.student_seeds():
        for name in r.variants:
            path = r.runs / f"{name}-seed{seed}" / "metrics.jsonl"
            if path.is_file():
                metrics.setdefault(name, []).append(metrics_log.read_metrics(path))
    results["plots"] = report_render.plot_all(results, metrics, r.out)
    stages = state.data["stages"]
    results["timings"] = {stage: info["seconds"] for stage, info in stages.items()
                          if not stage.startswith("sharpness") and not info.get("side_by_side")}
    results["side_by_side_runs"] = {stage: info["seconds"] for stage, info in stages.items()
                                    if info.get("side_by_side")}
    results["machine"] = {"cpu_count": os.cpu_count(), "loadavg": list(os.getloadavg())}
    outputs.write_json(r.out / "results.json", results)
    results["report"] = report_render.write_report(results, r.out)
    say(f"report written to {results['report']}")
    for line in report.verdict_lines(results):
        say(line)
    r.results = results


# The reproduction, stage by stage (each records itself in OUT/state.json when finished).
STAGES = (("data", _stage_data), ("slm", _stage_slm), ("score", _stage_score), ("teacher caches", _stage_caches),
          ("students", _stage_students), ("overhead", _stage_overhead), ("eval", _stage_eval),
          ("cloze", _stage_cloze), ("report", _stage_report))


def _run(cfg: ReproduceConfig, *, force: bool = False, progress: bool = True, start_over: bool = False) -> dict:
    out = pathlib.Path(cfg.out)
    # the output rule of docs/safety.md (OUT, OUT/data, OUT/runs/*), again, holding the lock
    outputs.check_output_dir(out, "reproduction", mode="replace" if force else "resume",
                             inputs=[p for p in (cfg.data, cfg.teacher, cfg.early_teacher) if p] if force else ())
    state = _reset_for_overwrite(out, cfg) if force and (out / "state.json").is_file() else _State(out, cfg, force)
    r = _Run(cfg, out, state, progress, start_over)
    for _, stage in STAGES:
        stage(r)
    return r.results
