"""``salt reproduce``: the paper's whole comparison, end to end, at a small preset.

Stages (each recorded in ``OUT/state.json`` when finished, so a re-run skips it; an interrupted
training stage resumes from its last checkpoint):

1. ``data``      prepare the embedded corpus (``salt.data.prepare``) unless ``--data`` is given;
2. ``slm``       train the SLM teacher (``small-teacher``), keeping its early checkpoint;
3. ``score``     score every candidate training window with the EARLY SLM checkpoint (eq. 11,
                 the windows it saw excluded) and select the top m = n_kd x batch;
4. ``BASELINE``, ``RKD``, ``SALT``, ``SALT_DS``: train the students (``small-student``) with
                 identical data order (same seed, batch, seq_len) and budget, checkpoints every
                 ``eval_every`` steps (so n_kd and the end are among them);
5. ``eval``      per-window held-out statistics of every kept checkpoint (teacher buckets from
                 the final SLM); cached under ``OUT/eval/``;
6. ``report``    ``OUT/report.md``, ``OUT/results.json`` and PNG plots.

Re-running with different settings in the same ``OUT`` is refused unless ``--force`` (which
starts over).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shutil
import sys
import time

import numpy as np

VARIANTS = ("BASELINE", "RKD", "SALT", "SALT_DS")


@dataclasses.dataclass(frozen=True)
class ReproduceConfig:
    out: str = "salt-reproduce"
    data: str | None = None          # existing token store; default OUT/data (prepared)
    size: str = "small"
    teacher_preset: str = "small-teacher"
    student_preset: str = "small-student"
    steps: int = 200                 # student steps n
    kd_steps: int = 40               # n_kd (paper: 36K of 208K = 17%)
    teacher_steps: int = 200
    early_step: int = 40             # early SLM checkpoint used for scoring
    batch: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    final_lr: float = 3e-4
    warmup: int = 20
    optimizer: str = "adamw"
    omega: float = 0.667
    rho: float = 0.25
    k: int = 10
    candidates: int | None = 4096    # windows scored for SALT_DS (None: the whole pool)
    eval_every: int = 20
    eval_windows: int = 256
    eval_batch: int = 32
    seed: int = 0
    vocab_size: int | None = None    # for data preparation (None: the data layer's default)

    def validate(self) -> None:
        for name in ("steps", "kd_steps", "teacher_steps", "early_step", "batch", "seq_len",
                     "eval_every", "eval_windows", "eval_batch", "k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.kd_steps >= self.steps:
            raise ValueError(f"kd_steps ({self.kd_steps}) must be < steps ({self.steps}) for SALT")
        if self.early_step >= self.teacher_steps:
            raise ValueError(f"early_step ({self.early_step}) must be < teacher_steps "
                             f"({self.teacher_steps})")
        for name in ("steps", "kd_steps"):
            if getattr(self, name) % self.eval_every:
                raise ValueError(f"{name} ({getattr(self, name)}) must be a multiple of eval_every "
                                 f"({self.eval_every}) so that its checkpoint is kept")
        if self.teacher_steps % self.early_step:
            raise ValueError(f"teacher_steps ({self.teacher_steps}) must be a multiple of "
                             f"early_step ({self.early_step})")
        if not 0.0 <= self.omega <= 1.0:
            raise ValueError(f"omega must be in [0, 1], got {self.omega}")
        if not self.rho > 0:
            raise ValueError(f"rho must be > 0, got {self.rho}")


SIZES = {
    # Measured to finish within 20 minutes on a 2-core CPU, data preparation included.
    "small": ReproduceConfig(),
    # For the test suite: tiny presets, a handful of steps.
    "tiny": ReproduceConfig(size="tiny", teacher_preset="tiny-teacher", student_preset="tiny-student",
                            steps=8, kd_steps=4, teacher_steps=8, early_step=4, batch=4, seq_len=16,
                            lr=1e-2, final_lr=1e-3, warmup=2, eval_every=2, eval_windows=12,
                            eval_batch=4, candidates=None),
}


def config_for(size: str, **overrides) -> ReproduceConfig:
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    cfg = dataclasses.replace(SIZES[size], **{k: v for k, v in overrides.items() if v is not None})
    cfg.validate()
    return cfg


# --------------------------------------------------------------------------- state

class _State:
    """``OUT/state.json``: the settings fingerprint, finished stages and their wall times."""

    def __init__(self, out: pathlib.Path, cfg: ReproduceConfig, force: bool):
        from salt.runtime.checkpoint import write_json_atomic

        self._write = write_json_atomic
        self.path = out / "state.json"
        settings = dataclasses.asdict(cfg)
        settings.pop("out")
        if self.path.is_file():
            old = json.loads(self.path.read_text())
            if old.get("settings") != settings:
                if not force:
                    changed = sorted(k for k in set(settings) | set(old.get("settings", {}))
                                     if settings.get(k) != old.get("settings", {}).get(k))
                    raise ValueError(f"{str(out)!r} holds a reproduction with different settings "
                                     f"({', '.join(changed)}); use another --out or --force")
                old = None
            self.data = old or {"settings": settings, "stages": {}}
        else:
            self.data = {"settings": settings, "stages": {}}
        out.mkdir(parents=True, exist_ok=True)
        self.save()

    def done(self, stage: str) -> bool:
        return stage in self.data["stages"]

    def finish(self, stage: str, seconds: float, **info) -> None:
        self.data["stages"][stage] = dict(info, seconds=float(seconds))
        self.save()

    def info(self, stage: str) -> dict:
        return self.data["stages"].get(stage, {})

    def save(self) -> None:
        self._write(self.path, self.data)


def _say(msg: str) -> None:
    print(f"[salt reproduce] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- stages

def _train(cfg: ReproduceConfig, run_dir: pathlib.Path, data_dir, *, preset: str, steps: int,
           kd_steps: int, checkpoint_every: int, teacher=None, subset=None, progress=True) -> dict:
    from salt.runtime.checkpoint import latest_step
    from salt.runtime.train import TrainConfig, train

    resume = latest_step(run_dir) is not None
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)  # a run that died before its first checkpoint: start it over
    tc = TrainConfig(preset=preset, data=str(data_dir), out=str(run_dir),
                     teacher=None if teacher is None else str(teacher), kd_steps=kd_steps,
                     omega=cfg.omega, rho=cfg.rho, transition="step", steps=steps, batch=cfg.batch,
                     seq_len=cfg.seq_len, optimizer=cfg.optimizer, lr=cfg.lr, final_lr=cfg.final_lr,
                     warmup=cfg.warmup, seed=cfg.seed,
                     subset=None if subset is None else str(subset),
                     checkpoint_every=checkpoint_every,
                     keep_checkpoints=tuple(range(checkpoint_every, steps + 1, checkpoint_every)),
                     resume=resume)
    return train(tc, progress=progress)


def _eval_stats(cache: pathlib.Path, run_dir, step, data_dir, cfg, progress):
    from salt.runtime import evaluate

    if cache.is_file():
        return evaluate.load_stats(cache)
    stats, _ = evaluate.model_window_stats(run_dir, step, data_dir=data_dir, seq_len=cfg.seq_len,
                                           batch_size=cfg.eval_batch, max_windows=cfg.eval_windows,
                                           progress=False)
    evaluate.save_stats(cache, stats)
    return stats


def run(cfg: ReproduceConfig, *, force: bool = False, progress: bool = True) -> dict:
    """Run (or resume) the whole reproduction; returns the results dict (also in results.json)."""
    from salt.runtime import evaluate, report, score as score_mod
    from salt.runtime.checkpoint import all_steps, write_json_atomic

    cfg.validate()
    out = pathlib.Path(cfg.out)
    from salt.data import outputs  # the output rule of docs/safety.md (OUT, OUT/data, OUT/runs/*)
    outputs.check_output_dir(out, "reproduction", mode="replace" if force else "resume",
                             inputs=[cfg.data] if force and cfg.data else ())
    if force and (out / "state.json").is_file():
        for child in ("runs", "eval", "scores.npz", "selection.npy", "results.json", "report.md"):
            p = out / child
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    state = _State(out, cfg, force)
    runs = out / "runs"

    # 1. data ------------------------------------------------------------------------------
    data_dir = pathlib.Path(cfg.data) if cfg.data else out / "data"
    if cfg.data:
        if not data_dir.is_dir():
            raise ValueError(f"--data {str(data_dir)!r} does not exist")
    elif not state.done("data"):
        from salt.data import prepare

        t0 = time.time()
        _say(f"preparing the embedded corpus in {data_dir}")
        if data_dir.exists():
            shutil.rmtree(data_dir)
        kwargs = {} if cfg.vocab_size is None else {"vocab_size": cfg.vocab_size}
        prepare(str(data_dir), **kwargs)
        state.finish("data", time.time() - t0)
    from salt.data import TokenStore

    store = TokenStore(data_dir)

    # 2. SLM teacher -----------------------------------------------------------------------
    slm_dir = runs / "SLM"
    if not state.done("slm"):
        t0 = time.time()
        _say(f"training the SLM teacher ({cfg.teacher_preset}, {cfg.teacher_steps} steps)")
        _train(cfg, slm_dir, data_dir, preset=cfg.teacher_preset, steps=cfg.teacher_steps,
               kd_steps=0, checkpoint_every=math.gcd(cfg.early_step, cfg.kd_steps),
               progress=progress)
        state.finish("slm", time.time() - t0)

    # 3. score + select --------------------------------------------------------------------
    scores_path, selection_path = out / "scores.npz", out / "selection.npy"
    if not state.done("score"):
        t0 = time.time()
        _say(f"scoring candidate windows with the SLM's step-{cfg.early_step} checkpoint (k={cfg.k})")
        job = score_mod.ScoreJob(teacher=str(slm_dir), teacher_step=cfg.early_step, data=str(data_dir),
                                 out=str(scores_path), k=cfg.k, seq_len=cfg.seq_len,
                                 batch=cfg.eval_batch, max_candidates=cfg.candidates, force=True)
        summary = score_mod.score(job, progress=progress)
        z = score_mod.load_scores(scores_path)
        m = cfg.kd_steps * cfg.batch
        clipped = m > z["window_ids"].size
        m = min(m, int(z["window_ids"].size))
        ids = score_mod.select_top_m(z["window_ids"], z["scores"], m)
        score_mod.save_npy_atomic(selection_path, ids)
        finite = z["scores"][np.isfinite(z["scores"])]
        selected = z["scores"][np.isin(z["window_ids"], ids)]
        state.finish("score", time.time() - t0, n_scored=summary["n_scored"],
                     n_train_windows=summary["n_train_windows"],
                     n_excluded=summary["n_excluded"], m=int(m), clipped=bool(clipped),
                     score_median=float(np.median(finite)) if finite.size else math.nan,
                     zero_fraction=float(np.mean(z["scores"] == 0.0)),
                     selected_median=float(np.median(selected[np.isfinite(selected)]))
                     if np.isfinite(selected).any() else math.nan)

    # 4. students --------------------------------------------------------------------------
    plan = {"BASELINE": dict(kd_steps=0), "RKD": dict(kd_steps=cfg.steps, teacher=slm_dir),
            "SALT": dict(kd_steps=cfg.kd_steps, teacher=slm_dir),
            "SALT_DS": dict(kd_steps=cfg.kd_steps, teacher=slm_dir, subset=selection_path)}
    for name in VARIANTS:
        if state.done(name):
            continue
        t0 = time.time()
        _say(f"training {name} ({cfg.student_preset}, {cfg.steps} steps, n_kd = "
             f"{plan[name]['kd_steps']})")
        _train(cfg, runs / name, data_dir, preset=cfg.student_preset, steps=cfg.steps,
               checkpoint_every=cfg.eval_every, progress=progress, **plan[name])
        state.finish(name, time.time() - t0)

    # 5. evaluation ------------------------------------------------------------------------
    t0 = time.time()
    eval_dir = out / "eval"
    eval_dir.mkdir(exist_ok=True)
    _say("evaluating every kept checkpoint on the held-out split")
    teacher_stats = _eval_stats(eval_dir / f"SLM_{cfg.teacher_steps}.npz", slm_dir,
                                cfg.teacher_steps, data_dir, cfg, progress)
    models, curves, final_stats = {}, {}, {}
    for name in ("SLM",) + VARIANTS:
        run_dir = slm_dir if name == "SLM" else runs / name
        final_step = cfg.teacher_steps if name == "SLM" else cfg.steps
        steps = [s for s in all_steps(run_dir) if s <= final_step
                 and (name != "SLM" or s in (cfg.kd_steps, final_step))]
        curves[name] = []
        models[name] = {}
        for s in steps:
            stats = _eval_stats(eval_dir / f"{name}_{s}.npz", run_dir, s, data_dir, cfg, progress)
            summary = evaluate.summarize(stats, teacher_stats)
            summary["step"] = s
            curves[name].append({"step": s, "log_ppl": summary["log_ppl"],
                                 "accuracy": summary["accuracy"]})
            if s == cfg.kd_steps:
                models[name]["at_kd"] = summary
            if s == final_step:
                models[name]["final"] = summary
                final_stats[name] = stats
    eval_seconds = time.time() - t0
    if not state.done("eval"):
        state.finish("eval", eval_seconds)

    # 6. accounting + report ---------------------------------------------------------------
    from salt.reference.config import get_preset, param_count
    from salt.runtime.model import forward_flops, train_step_flops

    t_cfg = get_preset(cfg.teacher_preset).replace(vocab_size=store.vocab_size)
    s_cfg = get_preset(cfg.student_preset).replace(vocab_size=store.vocab_size)
    predicted = (forward_flops(t_cfg, cfg.batch, cfg.seq_len)
                 / train_step_flops(s_cfg, cfg.batch, cfg.seq_len))
    metrics = {name: report.read_metrics(runs / name / "metrics.jsonl")
               for name in ("SLM",) + VARIANTS if (runs / name / "metrics.jsonl").is_file()}
    overhead = report.kd_step_overhead(metrics.get("SALT", []), cfg.kd_steps,
                                       cfg.batch * cfg.seq_len)
    overhead["predicted"] = predicted
    results = {"config": dataclasses.asdict(cfg), "models": models, "curves": curves,
               "overhead": overhead, "eval_windows": int(teacher_stats["window_ids"].size),
               "params": {"teacher_non_embedding": param_count(t_cfg, embedding=False),
                          "student_non_embedding": param_count(s_cfg, embedding=False),
                          "vocab_size": store.vocab_size}}
    base_final = models.get("BASELINE", {}).get("final")
    results["efficiency"] = {}
    if base_final:
        for name in ("SALT", "SALT_DS"):
            pts = curves.get(name, [])
            results["efficiency"][name] = report.efficiency(
                base_final["log_ppl"], [p["step"] for p in pts], [p["log_ppl"] for p in pts],
                cfg.kd_steps, cfg.steps, overhead["overhead"])
    if "BASELINE" in final_stats:
        results["paired"] = {name: report.paired_difference(final_stats[name], final_stats["BASELINE"])
                             for name in ("RKD", "SALT", "SALT_DS") if name in final_stats}
    sel = state.info("score")
    results["selection"] = {k: sel[k] for k in ("n_scored", "n_train_windows", "n_excluded", "m", "clipped",
                                                "score_median", "selected_median", "zero_fraction")
                            if k in sel}
    plots = report.plot_training_curves({n: metrics[n] for n in VARIANTS if n in metrics}, out,
                                        n_kd=cfg.kd_steps)
    plots.append(report.plot_val_curves({n: curves[n] for n in VARIANTS}, out, n_kd=cfg.kd_steps,
                                        target=base_final["log_ppl"] if base_final else None))
    results["plots"] = plots
    order = ("data", "slm", "score") + VARIANTS + ("eval",)
    stages = state.data["stages"]
    results["timings"] = {stage: stages[stage]["seconds"] for stage in order if stage in stages}
    results["machine"] = {"cpu_count": os.cpu_count(), "loadavg": list(os.getloadavg())}
    write_json_atomic(out / "results.json", results)
    results["report"] = report.write_report(results, out)
    _say(f"report written to {results['report']}")
    return results
