"""``salt ds-study``: claim (c) diagnosed.  On a finished reproduction, SALT_DS students are
trained again with one setting of the selection changed at a time, and each is compared (paired,
on the reproduction's held-out windows) with that reproduction's SALT and BASELINE.

A setting is a comma-separated list of changes to the reproduction's selection (docs/reproduction.md,
"Claim (c)"):

- ``k=K``          the top-k of the score (eq. 11);
- ``step=S``       the SLM checkpoint that scores (the reproduction's SLM keeps every n_kd-multiple);
- ``pool=N|all``   candidate windows scored (a seeded uniform sample, or the whole training split);
- ``m=M``          windows selected (the KD phase reads n_kd x batch of them: fewer repeat, more
                   are partly unread);
- ``mode=exclude`` targets outside the top-k are dropped from the median instead of counting 0;
- ``random``       the control: m windows drawn uniformly from the pool, no score at all.

Run it on a reproduction of *tuning* seeds: a setting it favours is then confirmed on seeds that
no choice used.  Layout of ``OUT`` (a SALT ds_study directory; re-running resumes, more settings
extend it): ``study.json`` (the reproduction read, the stages done), ``scores/<name>.npz``,
``selections/<name>.npy``, ``runs/SALT_DS-<name>-seed<s>/``, ``eval/``, ``table.md`` and
``results.json``.  The students train two at a time as in the reproduction.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time

import numpy as np

from salt.core import outputs
from salt.core.lock import DirLock
from salt.data import TokenStore
from salt.data.loader import Loader
from salt.runtime.experiments import report
from salt.runtime.experiments.presets import ReproduceConfig
from salt.runtime.experiments.reproduce import eval_stats
from salt.runtime.experiments.students import StageRecord, side_by_side, train_config, train_stage
from salt.runtime.model.checkpoint import all_steps, read_meta
from salt.runtime.select import score as score_mod

def say(msg: str) -> None:
    print(f"[salt ds-study] {msg}", file=sys.stderr, flush=True)


DEFAULT_SETTINGS = ("random", "k=100", "mode=exclude", "step=300", "step=600", "pool=16384", "m=800")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One selection: the reproduction's, with the given fields changed (None: unchanged)."""
    spec: str
    k: int | None = None
    step: int | None = None
    pool: int | str | None = None  # a window count, or "all"
    m: int | None = None
    mode: str | None = None
    random: bool = False

    @property
    def name(self) -> str:
        return self.spec.replace("=", "").replace(",", "_")


def parse_setting(spec: str) -> Setting:
    """``"k=100,step=300"`` -> :class:`Setting`; a clear error naming the bad part."""
    fields: dict = {}
    for part in (p.strip() for p in spec.split(",")):
        key, eq, value = part.partition("=")
        if key in fields:
            raise ValueError(f"--setting {spec!r}: {key} given twice")
        if part == "random":
            fields["random"] = True
        elif key in ("k", "step", "m") and eq and value.isdigit() and int(value) > 0:
            fields[key] = int(value)
        elif key == "pool" and eq and (value == "all" or (value.isdigit() and int(value) > 0)):
            fields["pool"] = value if value == "all" else int(value)
        elif key == "mode" and value in score_mod.TOPK_MODES:
            fields["mode"] = value
        else:
            raise ValueError(f"--setting {spec!r}: cannot read {part!r} (expected k=K, step=S, "
                             f"pool=N|all, m=M, mode={'|'.join(score_mod.TOPK_MODES)} or random)")
    if fields.get("random") and set(fields) & {"k", "step", "mode"}:
        raise ValueError(f"--setting {spec!r}: random selects without a score (only pool= and m= apply)")
    return Setting(spec=spec, **fields)


def reproduction_config(repro) -> ReproduceConfig:
    """The settings of the finished reproduction ``repro`` (its ``state.json``), checked for a study."""
    repro = pathlib.Path(repro)
    try:
        state = json.loads((repro / "state.json").read_text(encoding="utf-8"))
        settings, stages = dict(state["settings"]), state["stages"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--reproduction {str(repro)!r} is not a readable SALT reproduction ({e})") from None
    cfg = ReproduceConfig(**{**settings, "out": str(repro), "extra_rhos": tuple(settings.get("extra_rhos", ()))})
    if cfg.teacher is not None or cfg.teacher_cache:
        raise ValueError(f"--reproduction {str(repro)!r} used a given teacher or teacher caches; the study "
                         "re-trains SALT_DS with the reproduction's own SLM online")
    if "eval" not in stages or "score" not in stages:
        raise ValueError(f"--reproduction {str(repro)!r} is not finished (no eval stage); run it to the end first")
    # its student seeds (not among the settings: more --seeds extend a reproduction): seed, seed + 1, ...
    # as long as that seed's SALT and BASELINE were trained
    seeds = 0
    while all(f"{name}/seed{cfg.seed + seeds}" in stages for name in ("BASELINE", "SALT")):
        seeds += 1
    if not seeds:
        raise ValueError(f"--reproduction {str(repro)!r} has no finished SALT and BASELINE to compare with")
    return dataclasses.replace(cfg, seeds=seeds)


class _StudyState(StageRecord):
    """``OUT/study.json``: the reproduction read and the stages finished."""

    def __init__(self, out: pathlib.Path, repro: pathlib.Path):
        self.path = out / "study.json"
        ident = str(repro.resolve())
        if self.path.is_file():
            self.data = json.loads(self.path.read_text(encoding="utf-8"))
            if self.data.get("reproduction") != ident:
                raise ValueError(f"--out {str(out)!r} holds a study of {self.data.get('reproduction')!r}, "
                                 f"not of {ident!r}; choose another --out")
        else:
            self.data = {"format": "salt-ds-study-v1", "reproduction": ident, "stages": {}}
            self.save()


def _pool_and_scores(s: Setting, cfg: ReproduceConfig, repro: pathlib.Path, data_dir, out: pathlib.Path,
                     progress: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """The setting's candidate ids and their scores (None for ``random``), scored with ``salt score``."""
    step = s.step or cfg.early_step
    pool = None if s.pool == "all" else (s.pool or cfg.candidates)
    path = out / "scores" / f"{s.name}.npz"
    path.parent.mkdir(exist_ok=True)
    if not path.is_file():
        job = score_mod.ScoreJob(teacher=str(repro / "runs" / "SLM"), teacher_step=step, data=str(data_dir),
                                 out=str(path), k=s.k or cfg.k, mode=s.mode or "zero", seq_len=cfg.seq_len,
                                 batch=cfg.eval_batch, max_candidates=pool, force=True)
        if s.random:  # the same pool as a scored setting, but only the ids are needed
            loader = Loader(data_dir, seq_len=cfg.seq_len, global_batch=1, seed=0, split="train")
            ids, _, _ = score_mod.candidate_pool(job, read_meta(repro / "runs" / "SLM", step), step,
                                                 int(loader.num_windows))
            outputs.save_npz(path, window_ids=ids, scores=np.full(ids.size, np.nan))
        else:
            say(f"{s.spec}: scoring with the SLM's step {step} (k = {job.k}, mode {job.mode}, "
                f"pool {pool or 'all'})")
            score_mod.score(job, progress=progress)
    z = np.load(path)
    return z["window_ids"], None if s.random else z["scores"]


def _select(s: Setting, cfg: ReproduceConfig, ids: np.ndarray, scores, seed: int) -> np.ndarray:
    m = min(s.m or cfg.kd_steps * cfg.batch, int(ids.size))
    if scores is None:
        return np.sort(np.random.default_rng(seed).choice(ids, size=m, replace=False))
    return score_mod.select_top_m(ids, scores, m)


def window_profile(loader: Loader, processor, ids) -> dict:
    """What a set of windows is made of: digits and whitespace among the decoded characters,
    distinct tokens per window."""
    W = np.asarray(loader.windows(np.asarray(ids, np.int64)))
    text = [processor.decode(w.tolist()) for w in W]
    chars = max(sum(len(t) for t in text), 1)
    return {"windows": int(W.shape[0]),
            "digits": sum(c.isdigit() for t in text for c in t) / chars,
            "whitespace": sum(c.isspace() for t in text for c in t) / chars,
            "distinct_tokens": float(np.mean([len(set(w.tolist())) for w in W])) if len(W) else float("nan")}


def run_study(repro, out, specs=DEFAULT_SETTINGS, *, progress: bool = True) -> dict:
    """Score, select, train and evaluate one SALT_DS student per setting and reproduction seed;
    returns the results (also ``OUT/results.json`` and ``OUT/table.md``)."""
    repro, out = pathlib.Path(repro), pathlib.Path(out)
    settings = [parse_setting(s) for s in specs]
    if len({s.name for s in settings}) != len(settings):
        raise ValueError("--setting: the same setting is given twice")
    cfg = reproduction_config(repro)
    for s in settings:
        if s.step is not None and s.step not in all_steps(repro / "runs" / "SLM"):
            raise ValueError(f"--setting {s.spec!r}: the SLM of {str(repro)!r} has no checkpoint of step "
                             f"{s.step} (it has {all_steps(repro / 'runs' / 'SLM')})")
    outputs.check_output_dir(out, "ds_study", mode="resume", inputs=[repro])
    with DirLock(out):
        return _run_study(repro, out, settings, cfg, progress)


def _run_study(repro, out, settings, cfg, progress) -> dict:
    state = _StudyState(out, repro)
    data_dir = pathlib.Path(cfg.data or repro / "data")
    (out / "selections").mkdir(exist_ok=True)
    jobs = []
    for s in settings:
        ids, scores = _pool_and_scores(s, cfg, repro, data_dir, out, progress)
        selection = out / "selections" / f"{s.name}.npy"
        if not selection.is_file():
            outputs.save_npy(selection, _select(s, cfg, ids, scores, cfg.seed))
        for seed in cfg.student_seeds():
            tc = train_config(cfg, out / "runs" / f"SALT_DS-{s.name}-seed{seed}", data_dir,
                              preset=cfg.student_preset, steps=cfg.steps, kd_steps=cfg.kd_steps,
                              checkpoint_every=cfg.eval_every, seed=seed, teacher=repro / "runs" / "SLM",
                              subset=selection)
            if not state.done(f"{s.name}/seed{seed}"):
                jobs.append((f"{s.name}/seed{seed}", tc, False, None))
    (out / "runs").mkdir(exist_ok=True)

    def announce(stage, tc, forked):
        say(f"training SALT_DS {stage} ({cfg.student_preset}, {cfg.steps} steps, n_kd = {cfg.kd_steps})")

    if cfg.side_by_side and jobs:
        side_by_side(jobs, state, announce)
    for stage, tc, _, _ in jobs:  # one core, or --sequential reproductions
        if not state.done(stage):
            t0 = time.time()
            announce(stage, tc, False)
            train_stage(tc, progress)
            state.finish(stage, time.time() - t0)
    results = _evaluate(repro, out, settings, cfg, data_dir)
    outputs.write_json(out / "results.json", results)
    outputs.write_text(out / "table.md", render_table(results))
    return results


def _evaluate(repro, out, settings, cfg, data_dir) -> dict:
    """Per setting: the score's distribution, what it selected, and SALT_DS against the
    reproduction's SALT and BASELINE (paired, per seed; pooled as the reproduction's verdicts)."""
    (out / "eval").mkdir(exist_ok=True)
    store = TokenStore(data_dir)
    loader = Loader(data_dir, seq_len=cfg.seq_len, global_batch=1, seed=0, split="train")
    processor = store.processor()
    base_sel = np.load(repro / "selection.npy")
    steps = {"at_kd": cfg.kd_steps, "final": cfg.steps}

    def stats(run_dir, name, seed, step, cache_dir):
        """Cached per run and step; the reproduction's own cache is read, never written (an input)."""
        cache = cache_dir / f"seed{seed}_{name}_{step}.npz"
        if cache_dir != out / "eval" and not cache.is_file():
            cache = out / "eval" / f"reproduction_seed{seed}_{name}_{step}.npz"
        return eval_stats(cache, run_dir, step, data_dir, cfg)

    def compare(run_of_seed, name_of_seed, cache_dir) -> dict:
        row = {}
        for phase, step in steps.items():
            for ref in ("SALT", "BASELINE"):
                d = [report.paired_difference(stats(run_of_seed(seed), name_of_seed(seed), seed, step, cache_dir),
                                              stats(repro / "runs" / f"{ref}-seed{seed}", ref, seed, step,
                                                    repro / "eval"))
                     for seed in cfg.student_seeds()]
                row[f"minus_{ref}_{phase}"] = report.pooled([x["mean"] for x in d], [x["se"] for x in d])
        return row

    rows = []
    z = score_mod.load_scores(repro / "scores.npz")
    rows.append(dict(spec="reproduction", **_score_profile(z["window_ids"], z["scores"], base_sel, base_sel),
                     **window_profile(loader, processor, base_sel),
                     **compare(lambda seed: repro / "runs" / f"SALT_DS-seed{seed}", lambda seed: "SALT_DS",
                               repro / "eval")))
    for s in settings:
        z = np.load(out / "scores" / f"{s.name}.npz")
        sel = np.load(out / "selections" / f"{s.name}.npy")
        rows.append(dict(spec=s.spec, **_score_profile(z["window_ids"], None if s.random else z["scores"],
                                                       sel, base_sel),
                         **window_profile(loader, processor, sel),
                         **compare(lambda seed, s=s: out / "runs" / f"SALT_DS-{s.name}-seed{seed}",
                                   lambda seed, s=s: f"SALT_DS-{s.name}", out / "eval")))
    pool_profile = window_profile(loader, processor, np.load(repro / "scores.npz")["window_ids"])
    return {"reproduction": str(repro.resolve()), "seeds": cfg.student_seeds(), "k": cfg.k,
            "early_step": cfg.early_step, "candidates": cfg.candidates, "m": cfg.kd_steps * cfg.batch,
            "n_kd": cfg.kd_steps, "steps": cfg.steps, "reproduction_pool": pool_profile, "rows": rows}


def _score_profile(ids, scores, selected, base_sel) -> dict:
    finite = scores[np.isfinite(scores)] if scores is not None else np.zeros(0)
    chosen = scores[np.isin(ids, selected)] if scores is not None else np.zeros(0)
    chosen = chosen[np.isfinite(chosen)]
    nan = float("nan")
    return {"pool": int(ids.size), "m": int(np.size(selected)),
            "zero_fraction": float(np.mean(scores == 0.0)) if scores is not None else nan,
            "median_score": float(np.median(finite)) if finite.size else nan,
            "lowest_selected_score": float(chosen.min()) if chosen.size else nan,
            "overlap_with_reproduction": float(np.isin(selected, base_sel).mean()) if np.size(selected) else nan}


def _fmt(p: dict, per_seed: bool = False) -> str:
    seeds = f" (per seed {', '.join(f'{x:+.4f}' for x in p['per_seed'])})" if per_seed and p["n"] > 1 else ""
    return f"{p['mean']:+.4f} [{p['lo']:+.4f}, {p['hi']:+.4f}]{seeds}"


def render_table(results: dict) -> str:
    """The study as a markdown table, one row per setting (the reproduction's first)."""
    r = results
    pool = r["reproduction_pool"]
    lines = [f"SALT_DS per selection setting on {r['reproduction']} (seeds {r['seeds']}; reproduction: "
             f"k = {r['k']}, early step {r['early_step']}, pool {r['candidates'] or 'all'}, m = {r['m']}; "
             f"n_kd = {r['n_kd']} of {r['steps']} steps).  Differences are paired held-out log-perplexity; "
             "intervals as the reproduction's verdicts "
             f"({'95% t over seeds' if len(r['seeds']) > 1 else 'one seed, ±2 per-window s.e.'}).  "
             f"The reproduction's pool: {100 * pool['digits']:.1f}% digits, {pool['distinct_tokens']:.1f} "
             "distinct tokens per window.", "",
             "| setting | pool | m | windows scoring 0 | median score | lowest selected | overlap | digits | "
             "distinct tokens | SALT_DS − SALT at n_kd | SALT_DS − SALT final | SALT_DS − BASELINE final |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in r["rows"]:
        def num(key, fmt, row=row):
            return "—" if row[key] != row[key] else format(row[key], fmt)
        lines.append(f"| {row['spec']} | {row['pool']} | {row['m']} | {num('zero_fraction', '.1%')} | "
                     f"{num('median_score', '.3f')} | {num('lowest_selected_score', '.3f')} | "
                     f"{num('overlap_with_reproduction', '.2f')} | {100 * row['digits']:.1f}% | "
                     f"{row['distinct_tokens']:.1f} | {_fmt(row['minus_SALT_at_kd'])} | "
                     f"{_fmt(row['minus_SALT_final'], per_seed=True)} | {_fmt(row['minus_BASELINE_final'])} |")
    return "\n".join(lines) + "\n"
