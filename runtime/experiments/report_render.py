"""Rendering of the ``salt reproduce`` results: ``report.md`` and the PNG plots (Figs 2-3 style).

Pure functions of the ``results`` dict built by ``salt.runtime.experiments.reproduce`` (numbers from
``salt.runtime.experiments.report``) and the runs' metrics rows; nothing here trains or evaluates.

Why one module of ~550 lines: one function per report section and per plot, all reading the same
``results`` dict; the statistics are ``report.py``'s.
"""
from __future__ import annotations

import math
import pathlib

import numpy as np

from salt.core import outputs
from salt.reference.config import PAPER_RHO
from salt.runtime.experiments import report as R
from salt.runtime.experiments.report import (BUCKETS, PAPER, PAPER_TABLE11, VARIANTS, lead_lines, train_rows,
                                             verdict_lines)


# --------------------------------------------------------------------------- plots

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _savefig_atomic(fig, path: pathlib.Path) -> None:

    outputs.write_bytes(path, lambda f: fig.savefig(f, format="png"))


def _mean_band(series: list[np.ndarray]):
    """Mean and s.e. across seeds of equally long series (s.e. 0 for one seed)."""
    a = np.stack(series)
    se = a.std(axis=0, ddof=1) / math.sqrt(a.shape[0]) if a.shape[0] > 1 else np.zeros(a.shape[1])
    return a.mean(axis=0), se


def _finish(fig, ax, path, n_kd=None):
    if n_kd:
        ax.axvline(n_kd, color="gray", linestyle="--", linewidth=0.9, label=f"n_kd = {n_kd}")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _savefig_atomic(fig, path)
    _plt().close(fig)
    return str(path)


def plot_all(results: dict, metrics: dict, out_dir) -> list[str]:
    """Training curves (mean over seeds, ±1 s.e. band), held-out log-ppl at every checkpoint
    (mean ± s.e. across seeds) and the paired held-out difference vs BASELINE (±2 s.e.)."""
    plt = _plt()
    out_dir = pathlib.Path(out_dir)
    n_kd = results["config"]["kd_steps"]
    written = []
    for key, label, fname in (("accuracy", "training next-token accuracy", "train_accuracy.png"),
                              ("ce", "training log-perplexity (CE, nats)", "train_log_ppl.png")):
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        for name, per_seed_rows in metrics.items():
            series = []
            for rows in per_seed_rows:
                rows = [r for r in train_rows(rows) if isinstance(r.get(key), (int, float))]
                series.append(np.asarray([float(r[key]) for r in rows]))
            if not series or not series[0].size or len({s.size for s in series}) != 1:
                continue
            mean, se = _mean_band(series)
            w = max(1, mean.size // 40)
            kernel = np.ones(w) / w
            smooth = np.convolve(mean, kernel, mode="same") if w > 1 else mean
            steps = np.arange(1, mean.size + 1)
            ax.plot(steps, smooth, label=name, linewidth=1.3)
            if len(series) > 1:
                ax.fill_between(steps, smooth - se, smooth + se, alpha=0.2)
        ax.set_ylabel(label)
        written.append(_finish(fig, ax, out_dir / fname, n_kd))
    per_seed = list(results["per_seed"].values())
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for name in VARIANTS:
        curves = [r["curves"].get(name, []) for r in per_seed]
        if not curves or not curves[0] or len({len(c) for c in curves}) != 1:
            continue
        steps = np.asarray([p["step"] for p in curves[0]])
        mean, se = _mean_band([np.asarray([p["log_ppl"] for p in c]) for c in curves])
        ax.plot(steps, mean, marker="o", markersize=3, label=name)
        ax.fill_between(steps, mean - se, mean + se, alpha=0.2)
    ax.set_ylabel("held-out log-perplexity (nats)")
    written.append(_finish(fig, ax, out_dir / "val_log_ppl.png", n_kd))
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for key in ("SALT-BASELINE", "SALT_DS-BASELINE", "RKD-BASELINE"):
        curves = [r["paired_curve"].get(key, []) for r in per_seed]
        if not curves or not curves[0] or len({len(c) for c in curves}) != 1:
            continue
        steps = np.asarray([p["step"] for p in curves[0]])
        if len(curves) == 1:
            mean = np.asarray([p["mean"] for p in curves[0]])
            se = np.asarray([p["se"] for p in curves[0]])
        else:
            mean, se = _mean_band([np.asarray([p["mean"] for p in c]) for c in curves])
        ax.plot(steps, mean, marker="o", markersize=3, label=key)
        ax.fill_between(steps, mean - 2 * se, mean + 2 * se, alpha=0.2)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_ylabel("paired held-out log-ppl difference (nats), ±2 s.e.")
    written.append(_finish(fig, ax, out_dir / "paired_difference.png", n_kd))
    if len(results.get("rho_arms") or []) > 1:
        written.append(plot_rho_sensitivity(results["rho_arms"], out_dir / "rho_sensitivity.png"))
    return written


def plot_rho_sensitivity(arms: list[dict], path) -> str:
    """SALT − BASELINE final log-ppl (pooled mean, its interval as error bar) against ρ, and the
    entropy of the SLM's target softmax(ρ·t) per ρ on a second axis."""
    plt = _plt()
    arms = sorted((a for a in arms if a.get("salt_minus_baseline")), key=lambda a: a["rho"])
    rho = np.asarray([a["rho"] for a in arms])
    d = [a["salt_minus_baseline"] for a in arms]
    mean = np.asarray([x["mean"] for x in d])
    err = np.asarray([[x["mean"] - x["lo"] for x in d], [x["hi"] - x["mean"] for x in d]])
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    ax.errorbar(rho, mean, yerr=err, marker="o", capsize=4, label="SALT − BASELINE (final)")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("ρ (teacher logits multiplied by ρ)")
    ax.set_ylabel("held-out log-ppl difference (nats)")
    ax2 = ax.twinx()
    ax2.plot(rho, [a["sharpness"]["entropy"] for a in arms], color="tab:orange", marker="s",
             linestyle="--", label="target entropy (nats)")
    if arms:
        ax2.axhline(arms[0]["sharpness"]["uniform_entropy"], color="tab:orange", linewidth=0.7,
                    linestyle=":")
    ax2.set_ylabel("entropy of softmax(ρ·t) (nats; dotted: uniform)")
    fig.legend(loc="upper center", ncol=2, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    _savefig_atomic(fig, pathlib.Path(path))
    plt.close(fig)
    return str(path)


def rho_lines(results: dict) -> list[str]:
    """The ρ arms section: sensitivity table and each arm's verdicts on claims (a)-(d), (f)."""
    arms = results.get("rho_arms") or []
    if len(arms) < 2:
        return []
    fmt = lambda p: "—" if not p else f"{p['mean']:+.4f} [{p['lo']:+.4f}, {p['hi']:+.4f}]"  # noqa: E731
    L = ["\n## ρ arms: sensitivity to the teacher's temperature\n",
         "Every arm trains RKD, SALT and SALT_DS at its ρ with the same SLM, selection, seeds and "
         "BASELINE; differences are final held-out log-ppl, pooled as the verdicts are "
         "(interval: 95% t over seeds, or ±2 per-window s.e. for one seed). The entropy is that of "
         "the SLM's target softmax(ρ·t), mean over held-out positions.\n",
         "| ρ | target entropy (nats) | top-10 mass | RKD − BASELINE | SALT − BASELINE | SALT_DS − SALT |",
         "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for a in sorted(arms, key=lambda a: a["rho"]):
        sh = a["sharpness"]
        tag = " (lead)" if a["lead"] else (" (paper)" if a["rho"] == PAPER_RHO else "")
        L.append(f"| {a['rho']:g}{tag} | {sh['entropy']:.2f} of {sh['uniform_entropy']:.2f} | "
                 f"{100 * sh['top10_mass']:.1f}% | {fmt(a['rkd_minus_baseline'])} | "
                 f"{fmt(a['salt_minus_baseline'])} | {fmt(a['salt_ds_minus_salt'])} |")
    L.append("\n![SALT − BASELINE against ρ](rho_sensitivity.png)\n")
    for a in arms:
        if a["lead"]:
            continue
        L.append(f"Verdicts of the ρ = {a['rho']:g} arm:\n")
        L.extend(f"- ({c['id']}) {c['claim']}: **{c['status']}** — here {c['here']}" for c in a["claims"])
        L.append("")
    return L


# --------------------------------------------------------------------------- markdown

def _mean_summary(results, name, phase):
    rows = [r["models"].get(name, {}).get(phase) for r in results["per_seed"].values()]
    rows = [r for r in rows if r]
    if not rows:
        return None
    out = {"accuracy": float(np.mean([r["accuracy"] for r in rows])),
           "log_ppl": float(np.mean([r["log_ppl"] for r in rows])), "step": rows[0].get("step")}
    if all("buckets" in r for r in rows):
        out["buckets"] = {b: {m: float(np.mean([r["buckets"][b][m] for r in rows]))
                              for m in ("accuracy", "log_ppl")} for b in BUCKETS}
    return out


def _cell(m):
    return ("—", "—") if not m else (f"{100 * m['accuracy']:.2f}", f"{m['log_ppl']:.4f}")


def _paper(phase, name):
    p = PAPER[phase].get(name)
    return "—" if p is None else f"{p[0]:.2f} / {p[1]:.3f}"


NEAR_UNIFORM = 0.9   # a KD target whose entropy is at least this fraction of log V


def near_uniform(sharpness: dict) -> bool:
    """Whether the measured KD target softmax(ρ·t) is close to uniform (entropy ≥ 90% of log V)."""
    return sharpness["entropy"] >= NEAR_UNIFORM * sharpness["uniform_entropy"]


def _slm_step(results: dict) -> int:
    """The step of the SLM checkpoint the students distilled from (a given teacher's newest)."""
    return int((results.get("teacher") or {}).get("step", results["config"]["teacher_steps"]))


def render_report(results: dict) -> str:
    L = _header_lines(results)
    L.extend(_verdict_section(results))
    L.extend(rho_lines(results))
    L.extend(_table1_section(results))
    L.extend(_per_seed_section(results))
    L.extend(_bucket_section(results))
    L.extend(_cloze_section(results))
    L.extend(_efficiency_section(results))
    L.extend(_selection_section(results))
    L.extend(_plots_section(results))
    L.extend(_timing_section(results))
    return "\n".join(L) + "\n"


def _header_lines(results: dict) -> list[str]:
    """The title, the lead lines, what was run, the sizes and the teacher's sharpness."""
    cfg = results["config"]
    n_kd, n = cfg["kd_steps"], cfg["steps"]
    seeds = results.get("seeds", [])
    L = ["# SALT reproduction report\n"]
    lead = lead_lines(results)
    if lead:
        L.append("\n".join(f"**{line}**" for line in lead) + "\n")
    teacher = results.get("teacher") or {}
    if teacher.get("given"):
        early = teacher.get("early_teacher")
        slm_text = (f"SLM given with `--teacher` (not trained here): `{teacher['path']}` step {teacher['step']} "
                    f"(manifest sha256 {teacher['manifest_sha256'][:16]}…), {teacher['source']}; "
                    f"{teacher['architecture']}")
        select_text = (f"data selection scored by the early teacher `{early['path']}` step {early['step']} "
                       f"({early['source']}; k = {cfg['k']})" if early else
                       "no early teacher (`--early-teacher`): the data selection and SALT_DS were not run")
    else:
        slm_text = (f"SLM preset `{cfg['teacher_preset']}` ({cfg['teacher_steps']:,} steps of batch "
                    f"{cfg.get('teacher_batch') or cfg['batch']})")
        select_text = f"early SLM checkpoint for data selection at step {cfg['early_step']:,} (k = {cfg['k']})"
    L.append(f"Generated by `salt reproduce` (size `{cfg.get('size', '?')}`). {slm_text}, student preset "
             f"`{cfg['student_preset']}`; "
             f"{n:,} student steps of batch {cfg['batch']} × seq_len {cfg['seq_len']}, n_kd = "
             f"{n_kd:,}, ω = {cfg['omega']}, ρ = {cfg['rho']}, transition `{cfg['transition']}`, "
             f"optimizer {cfg['optimizer']} lr {cfg['lr']} → {cfg['final_lr']} (warm-up "
             f"{cfg['warmup']}); {select_text}. Student seeds: {seeds}.")
    if results.get("params"):
        p, t = results["params"], results.get("tokens", {})
        L.append(f"Parameters (non-embedding): SLM {p['teacher_non_embedding']:,}, student "
                 f"{p['student_non_embedding']:,}; vocabulary {p['vocab_size']:,}. Training tokens: "
                 f"SLM {'unknown (given)' if t.get('teacher') is None else format(t['teacher'], ',')}, "
                 f"each student {t.get('student', 0):,}.")
    L.extend(_kd_lines(results))
    sh = results.get("sharpness")
    if sh:
        L.append(f"Teacher sharpness (final SLM, held-out): entropy of softmax(ρ·t) at ρ = {sh['rho']} "
                 f"is {sh['entropy']:.2f} nats (uniform: {sh['uniform_entropy']:.2f}); its top-10 "
                 f"tokens hold {100 * sh['top10_mass']:.1f}% of the mass.")
        if near_uniform(sh):
            L.append(f"**The KD target is close to uniform** (entropy ≥ {NEAR_UNIFORM:.0%} of the "
                     "uniform's): ρ·t leaves this small LM's logits so flat that the KD phase acts "
                     "mostly as label smoothing (the paper's ρ = 0.25 acts on the logits of a 1.5B "
                     "model pre-trained at the paper's scale). docs/reproduction.md measures "
                     "`--rho 1` at this scale.")
    return L


def _verdict_section(results: dict) -> list[str]:
    """One verdict per claim of the paper, and the claims table."""
    L = []
    L.append("\n## Verdict per claim\n")
    L.extend(f"- {line}" for line in verdict_lines(results))
    L.append("\n| claim | paper (2.8B student, Table 1) | here | status |")
    L.append("| --- | --- | --- | --- |")
    for c in results.get("claims", []):
        L.append(f"| ({c['id']}) {c['claim']} | {c['paper']} | {c['here']} | **{c['status']}** |")
    L.append("\nDifferences are paired over the same held-out windows (model − reference). The "
             "paper's log-ppl gain of SALT at the end is only 0.005 nats and its 70%-of-steps "
             "claim is about few-shot averages (Table 2), which a CPU run cannot evaluate.\n")
    return L


def _table1_section(results: dict) -> list[str]:
    """Held-out accuracy and log-perplexity at n_kd and at the end (Table 1 style)."""
    cfg = results["config"]
    n_kd, n = cfg["kd_steps"], cfg["steps"]
    seeds = results.get("seeds", [])
    L = []
    L.append("## Held-out accuracy / log-perplexity (Table 1 style)\n")
    L.append(f"Validation split, {results.get('eval_windows', '?')} windows × {cfg['seq_len']} target "
             f"tokens; mean over {len(seeds)} seed(s). Accuracy in %, log-perplexity in nats.\n")
    L.append(f"| model | acc @ {n_kd:,} | log-ppl @ {n_kd:,} | acc @ {n:,} | log-ppl @ {n:,} | "
             "paper @ 36K | paper @ 208K |")
    L.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    slm = results.get("slm", {})
    a0, l0 = _cell(slm.get("at_kd"))
    a1, l1 = _cell(slm.get("final"))
    L.append(f"| SLM (end = step {_slm_step(results):,}) | {a0} | {l0} | {a1} | {l1} | — | "
             f"{_paper('final', 'SLM')} |")
    for name in VARIANTS:
        a0, l0 = _cell(_mean_summary(results, name, "at_kd"))
        a1, l1 = _cell(_mean_summary(results, name, "final"))
        L.append(f"| {name} | {a0} | {l0} | {a1} | {l1} | {_paper('at_kd', name)} | "
                 f"{_paper('final', name)} |")
    return L


def _per_seed_section(results: dict) -> list[str]:
    """Paired differences per seed."""
    L = []
    L.append("\n### Per seed: paired differences (per-window mean ± s.e.)\n")
    L.append("| seed | comparison | log-ppl @ n_kd | log-ppl @ end | acc (points) @ n_kd | acc (points) @ end |")
    L.append("| --- | --- | ---: | ---: | ---: | ---: |")
    for seed, r in results["per_seed"].items():
        for key in r["paired"].get("final", {}):
            cells = []
            for m, scale in (("log_ppl", 1.0), ("accuracy", 100.0)):
                for phase in ("at_kd", "final"):
                    d = r["paired"].get(phase, {}).get(key, {}).get(m)
                    cells.append("—" if not d else f"{scale * d['mean']:+.4f} ± {scale * d['se']:.4f}")
            L.append(f"| {seed} | {key} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} |")
    return L


def _bucket_section(results: dict) -> list[str]:
    """Accuracy and log-perplexity by the teacher's difficulty tertiles."""
    slm = results.get("slm", {})
    L = []
    L.append("\n## By difficulty bucket (paper §5.4 / appendix J)\n")
    L.append("Held-out windows ranked by the final SLM's mean per-window loss, split into tertiles "
             "(easy = lowest teacher loss); seed means. Accuracy % / log-perplexity.\n")
    L.append("| model | step |" + "".join(f" {b} acc | {b} log-ppl |" for b in BUCKETS))
    L.append("| --- | ---: |" + " ---: | ---: |" * len(BUCKETS))
    for name in ("SLM",) + VARIANTS:
        for phase in ("at_kd", "final"):
            s = slm.get(phase) if name == "SLM" else _mean_summary(results, name, phase)
            if not s or "buckets" not in s:
                continue
            cells = "".join(f" {100 * s['buckets'][b]['accuracy']:.2f} | {s['buckets'][b]['log_ppl']:.4f} |"
                            for b in BUCKETS)
            L.append(f"| {name} | {s.get('step') or '?'} |{cells}")
    return L


def _efficiency_section(results: dict) -> list[str]:
    """The KD-step overhead, the teacher caches and the steps SALT needs to reach BASELINE."""
    cfg = results["config"]
    L = []
    L.append("\n## Efficiency accounting (paper §5.2)\n")
    ov = results.get("overhead", {})
    if ov:
        timer = ov.get("timer", "wall-median")
        kd_s, std_s = ((ov["kd_step_cpu_s"], ov["std_step_cpu_s"]) if timer == "cpu-min"
                       else (ov["kd_step_s"], ov["std_step_s"]))
        wall = (f"; median wall times {1000 * ov['kd_step_s']:.1f} / {1000 * ov['std_step_s']:.1f} ms, "
                f"{100 * ov['wall_overhead']:.1f}%, depend on the machine's other load"
                if timer == "cpu-min" else "")
        L.append(f"KD-step overhead, KD and standard steps timed alternately in one process "
                 f"({ov.get('iters', '?')} each, `salt bench step`), timer: {R.OVERHEAD_TIMERS[timer]}: "
                 f"KD step {1000 * kd_s:.1f} ms vs standard step {1000 * std_s:.1f} ms "
                 f"→ **{100 * ov['overhead']:.1f}%**{wall} (FLOP-count prediction "
                 f"{100 * ov['predicted']:.1f}%; paper: 12.0% measured). The standard step runs at "
                 f"{100 * ov['standard_fraction_of_matmul']:.0f}% of this machine's measured float32 "
                 f"matmul rate ({ov['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s).\n")
    L.extend(_cache_lines(results))
    for seed, r in results["per_seed"].items():
        for name, e in r.get("efficiency", {}).items():
            if e["steps_needed"] is None:
                L.append(f"- seed {seed}: **{name}** never reached BASELINE's final held-out "
                         f"log-ppl ({e['target_log_ppl']:.4f}) within {e['n_steps']:,} steps.")
            else:
                L.append(f"- seed {seed}: **{name}** reached BASELINE's final held-out log-ppl "
                         f"({e['target_log_ppl']:.4f}) after ≈{e['steps_needed']:,.0f} steps "
                         f"(interpolated between checkpoints every {cfg['eval_every']} steps): cost "
                         f"{e['steps_needed']:,.0f} + {min(e['steps_needed'], e['n_kd']):,.0f} × "
                         f"{e['overhead']:.3f} = {e['cost_steps']:,.1f} standard steps vs "
                         f"{e['n_steps']:,} → saving **{100 * e['saving']:.1f}%** (paper ≈28%).")
    return L


def _selection_section(results: dict) -> list[str]:
    """What the early-checkpoint selection scored and kept (SALT_DS)."""
    cfg = results["config"]
    L = []
    if (results.get("selection") or {}).get("skipped"):
        L.append("\n## Data selection (SALT_DS)\n")
        L.append(f"Not run: {results['selection']['skipped']}.")
    elif results.get("selection"):
        s = results["selection"]
        early = (results.get("teacher") or {}).get("early_teacher")
        L.append("\n## Data selection (SALT_DS)\n")
        L.append(f"Scored {s['n_scored']:,} candidate training windows with "
                 + (f"the early teacher `{early['path']}` step {early['step']}" if early else
                    f"the SLM's step-{cfg['early_step']:,} checkpoint")
                 + f" ({s['n_excluded']:,} windows it had seen "
                 f"excluded); selected the top m = {s['m']:,} (= n_kd × batch"
                 f"{', clipped to the pool' if s.get('clipped') else ''}). Score median "
                 f"{s['score_median']:.4f}, selected median {s['selected_median']:.4f}; "
                 f"{100 * s.get('zero_fraction', 0):.1f}% of scored windows score exactly 0.")
        L.extend(f"Note: {note}." for note in s.get("notes", []))
    return L


def _plots_section(results: dict) -> list[str]:
    """The plots, as images."""
    L = []
    L.append("\n## Plots\n")
    for png in results.get("plots", []):
        name = pathlib.Path(png).name
        L.append(f"![{name}]({name})")
    return L


def _timing_section(results: dict) -> list[str]:
    """Wall time per stage and the machine's load."""
    L = []
    if results.get("timings"):
        L.append("\n## Wall time\n")
        L.append("| stage | seconds |")
        L.append("| --- | ---: |")
        for stage, secs in results["timings"].items():
            L.append(f"| {stage} | {secs:.1f} |")
        L.append(f"| **total** | {sum(results['timings'].values()):.1f} |")
        if results.get("side_by_side_runs"):
            L.append("\nStudents trained two at a time, one core each; each run's own wall time "
                     "(overlapping, included in the side-by-side stage above): "
                     + ", ".join(f"{k} {v:.0f} s" for k, v in results["side_by_side_runs"].items())
                     + ".")
        if results.get("machine"):
            m = results["machine"]
            L.append(f"\nWall-clock seconds of the invocation that ran each stage, on {m['cpu_count']} "
                     "CPUs; load average (1/5/15 min) when this report was written: "
                     + "/".join(f"{x:.1f}" for x in m["loadavg"]) + ". A load above the CPU count "
                     "means other work shared the machine and the times are inflated.")
    return L


def _kd_lines(results: dict) -> list[str]:
    """What the KD of RKD / SALT / SALT_DS was: full-vocabulary or top-K, online or from a cache."""
    kd = results.get("kd")
    if not kd:
        return []
    if kd.get("topk") is None:
        return ["KD is full-vocabulary KD (paper eq. 3-4), the teacher run online in every KD step."]
    k = kd["topk"]
    where = ("read from teacher caches built once from the final SLM (`salt teacher cache`; no teacher "
             "forward in the KD steps)" if kd.get("teacher_cache") else "the teacher run online in every KD step")
    return [f"KD is **top-{k} KD** (paper eq. 13-14: the student's and the teacher's distributions "
            f"restricted to the teacher's top-{k} tokens and renormalised there; the CE term stays "
            f"full-vocabulary), not full-vocabulary KD; {where}."]


def _cache_lines(results: dict) -> list[str]:
    tc = (results.get("kd") or {}).get("teacher_cache")
    if not tc:
        return []
    size = sum(b["bytes"] for b in tc["builds"].values())
    per_token = ", ".join(f"{name.split('/', 1)[1]} {b['bytes_per_token']:.0f}" for name, b in tc["builds"].items())
    lines = [f"Teacher caches (top-{results['kd']['topk']}, compact: id sets, 5-bit logits, float32 lse): "
             f"{len(tc['builds'])} built in **{tc['build_s']:.1f} s** in all, {size / 2 ** 20:.1f} MiB on disk "
             f"(bytes per token: {per_token}). {tc['cached_kd_steps']:,} KD steps read them. KD step with "
             f"the online teacher {1000 * tc['online_kd_step_s']:.1f} ms vs from the cache "
             f"{1000 * tc['cached_kd_step_s']:.1f} ms (timed alternately in one process, `salt bench step "
             f"--kd-topk`) → KD-phase time saved {tc['kd_phase_saved_s']:.1f} s, net of the builds "
             f"**{tc['net_saved_s']:+.1f} s** (the efficiency accounting below counts the online-teacher "
             "overhead, as the paper does).\n"]
    return lines


def _cloze_mean(results, name, phase):
    """Seed means of one student's cloze summary (overall and per bucket), or None."""
    rows = [r["models"].get(name, {}).get(phase) for r in results["cloze"]["per_seed"].values()]
    rows = [r for r in rows if r]
    if not rows:
        return None
    return {m: float(np.mean([r[m] for r in rows])) for m in ("accuracy", "loglik")} | {
        "buckets": {b: {m: float(np.mean([r["buckets"][b][m] for r in rows]))
                        for m in ("accuracy", "loglik")} for b in BUCKETS}}


def _cloze_section(results: dict) -> list[str]:
    """The LAMBADA-style task by SLM-difficulty bucket (paper appendix J, Table 11)."""
    cz, cfg = results.get("cloze"), results["config"]
    L = ["\n## LAMBADA-style last word by SLM-difficulty bucket (paper appendix J, Table 11)\n"]
    if not cz:
        return L + ["Not measured."]
    if cz.get("skipped"):
        return L + [f"Not measured: {cz['skipped']} ({cz['n_candidates']} sentence-final words in "
                    f"{cz['n_documents']} held-out documents)."]
    sizes = cz["bucket_sizes"]
    L.append(f"{cz['n_passages']} passages from the {cz['n_documents']} held-out (validation-split) "
             f"documents, which no model trained on ({cz['n_candidates']} sentence-final words before "
             f"the window and length rules): the last word of a sentence predicted from the text "
             f"before it in its document, {cz['mean_tokens']:.0f} tokens per passage on average of "
             f"at most {cfg['seq_len'] + 1} (EOS + context + target; {cz['mean_target_tokens']:.1f} "
             "target tokens). A passage is correct when every target token is the argmax "
             "(LAMBADA's accuracy); the mean log-likelihood of the target's tokens (nats) is "
             "given too, since small models get few passages right. Buckets: tertiles of the final "
             "SLM's ranking (correct first, "
             "ties by its log-likelihood of the target; sizes "
             + " / ".join(str(sizes[b]) for b in BUCKETS) + "). Accuracy as a fraction, mean over "
             f"{len(cz['per_seed'])} seed(s); the paper's Table 11 (2.8B student, LAMBADA) beside. "
             "docs/evaluation.md describes the task.\n")
    if not cfg.get("claims_testable", True):
        L.append(f"Size `{cfg.get('size')}` is too small to test: read nothing into these numbers.\n")
    L.append("| model | step | acc easy | acc medium | acc hard | acc all | log-lik easy | "
             "log-lik medium | log-lik hard | log-lik all | paper easy | paper medium | paper hard |")
    L.append("| --- | ---: |" + " ---: |" * 11)

    def row(name, step, s, paper):
        cells = "".join(f" {s['buckets'][b]['accuracy']:.3f} |" for b in BUCKETS)
        cells += f" {s['accuracy']:.3f} |"
        cells += "".join(f" {s['buckets'][b]['loglik']:.3f} |" for b in BUCKETS)
        cells += f" {s['loglik']:.3f} |"
        ref = "".join(f" {x:.2f} |" for x in paper) if paper else " — | — | — |"
        return f"| {name} | {step:,} |{cells}{ref}"

    L.append(row("SLM", _slm_step(results), cz["slm"], PAPER_TABLE11["final"]["SLM"]))
    for phase, step in (("at_kd", cfg["kd_steps"]), ("final", cfg["steps"])):
        for name in VARIANTS:
            s = _cloze_mean(results, name, phase)
            if s:
                L.append(row(name, step, s, PAPER_TABLE11[phase].get(name)))
    L.append("\nPaired per passage (model − BASELINE; mean ± s.e. over the passages of a bucket):\n")
    L.append("| seed | comparison | step | metric | easy | medium | hard | all |")
    L.append("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for seed, r in cz["per_seed"].items():
        for phase, step in (("at_kd", cfg["kd_steps"]), ("final", cfg["steps"])):
            for key, d in r["paired"].get(phase, {}).items():
                for m, label in (("accuracy", "accuracy"), ("loglik", "log-lik")):
                    cells = "".join(f" {d[m][b]['mean']:+.3f} ± {d[m][b]['se']:.3f} |"
                                    for b in BUCKETS + ("all",))
                    L.append(f"| {seed} | {key} | {step:,} | {label} |{cells}")
    return L


def write_report(results: dict, out_dir) -> str:

    path = pathlib.Path(out_dir) / "report.md"
    text = render_report(results)
    outputs.write_bytes(path, lambda f: f.write(text.encode()))
    return str(path)
