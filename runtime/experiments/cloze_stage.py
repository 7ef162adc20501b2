"""``salt reproduce``'s cloze stage: the LAMBADA-style task of :mod:`salt.runtime.eval.cloze`
scored for the SLM and every student at n_kd and at the end, bucketed by the SLM's difficulty,
with per-seed and pooled paired differences."""
from __future__ import annotations

import pathlib

import numpy as np

from salt.core import outputs
from salt.data import TokenStore
from salt.runtime.eval.cloze import (BUCKETS, build_passages, difficulty_buckets, model_summary,
                                     paired_bucket_difference, passages_sha, score_passages)
from salt.runtime.experiments.report import pooled
from salt.runtime.model import checkpoint

COMPARISONS = (("SALT", "BASELINE"), ("SALT_DS", "BASELINE"), ("RKD", "BASELINE"))


def summarize(passages: dict, slm_scores: dict, scores: dict) -> dict:
    """The report's numbers.  ``scores[seed][(variant, phase)]`` (phase "at_kd" / "final") are
    :func:`score_passages` results; buckets come from the final SLM's ``slm_scores``."""
    buckets = difficulty_buckets(slm_scores["correct_P"], slm_scores["loglik_P"])
    out = {"n_passages": int(passages["windows_PxT1"].shape[0]),
           "n_candidates": passages["n_candidates"], "n_documents": passages["n_documents"],
           "mean_target_tokens": float(np.mean(passages["n_target_P"])),
           "mean_tokens": float(np.mean(passages["length_P"])),
           "bucket_sizes": {b: int(idx.size) for b, idx in buckets.items()},
           "slm": model_summary(slm_scores, buckets), "per_seed": {}, "pooled": {}}
    for seed, by_model in scores.items():
        models, paired = {}, {}
        for (name, phase), s in by_model.items():
            models.setdefault(name, {})[phase] = model_summary(s, buckets)
        for a, b in COMPARISONS:
            for phase in ("at_kd", "final"):
                if (a, phase) in by_model and (b, phase) in by_model:
                    paired.setdefault(phase, {})[f"{a}-{b}"] = paired_bucket_difference(
                        by_model[(a, phase)], by_model[(b, phase)], buckets)
        out["per_seed"][str(seed)] = {"models": models, "paired": paired}
    for phase in ("at_kd", "final"):
        for a, b in COMPARISONS:
            key = f"{a}-{b}"
            ds = [r["paired"][phase][key] for r in out["per_seed"].values()
                  if key in r["paired"].get(phase, {})]
            if ds:
                out["pooled"].setdefault(phase, {})[key] = {
                    m: {g: pooled([d[m][g]["mean"] for d in ds], [d[m][g]["se"] for d in ds])
                        for g in BUCKETS + ("all",)} for m in ("accuracy", "loglik")}
    return out


def _cached_scores(path: pathlib.Path, sha: str, run_dir, step, passages, batch_size) -> dict:
    """Scores of one checkpoint, cached in ``path`` (recomputed when the passages changed)."""
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["passages_sha"]) == sha:
                    return {"loglik_P": z["loglik_P"], "correct_P": z["correct_P"]}
        except Exception:  # noqa: BLE001 - our own cache: unreadable means recompute
            pass
    config, params, _ = checkpoint.load_params(run_dir, step)
    s = score_passages(params, config, passages, batch_size=batch_size)
    outputs.save_npz(path, passages_sha=np.asarray(sha), **s)
    return s


def reproduce_stage(out, cfg, data_dir, variants, slm) -> dict:
    """``salt reproduce``'s cloze stage: score the final SLM (``slm``: its run directory and
    step) and every student (each seed) at n_kd and at the end on the passages (scores cached
    in ``OUT/eval/cloze/``), bucket by the SLM, and return :func:`summarize`'s dict
    (``{"n_passages": P, "skipped": why}`` when fewer than three passages)."""
    out, store = pathlib.Path(out), TokenStore(data_dir)
    passages = build_passages(store, cfg.seq_len)
    n = int(passages["windows_PxT1"].shape[0])
    if n < len(BUCKETS):
        return {"n_passages": n, "n_candidates": passages["n_candidates"],
                "n_documents": passages["n_documents"],
                "skipped": f"only {n} passages in the held-out split (need {len(BUCKETS)})"}
    sha = passages_sha(passages)
    cache = out / "eval" / "cloze"
    cache.mkdir(parents=True, exist_ok=True)

    def get(name, run_dir, step):
        return _cached_scores(cache / f"{name}_{step}.npz", sha, run_dir, step, passages,
                              cfg.eval_batch)

    slm = get("SLM", *slm)
    scores = {}
    for seed in cfg.student_seeds():
        for name in variants:
            run_dir = out / "runs" / f"{name}-seed{seed}"
            kept = checkpoint.all_steps(run_dir) if run_dir.is_dir() else []
            for phase, step in (("at_kd", cfg.kd_steps), ("final", cfg.steps)):
                if step in kept:
                    scores.setdefault(seed, {})[(name, phase)] = get(f"seed{seed}_{name}", run_dir, step)
    result = summarize(passages, slm, scores)
    result["passages_sha"] = sha
    sp = store.processor()
    result["examples"] = []
    for i in np.linspace(0, n - 1, min(n, 3)).round().astype(int):
        L, k = int(passages["length_P"][i]), int(passages["n_target_P"][i])
        result["examples"].append({"context": sp.decode(passages["windows_PxT1"][i, 1:L - k].tolist()),
                                   "target": sp.decode(passages["windows_PxT1"][i, L - k:L].tolist())})
    return result
