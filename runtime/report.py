"""The ``salt reproduce`` report: tables, efficiency accounting (paper §5.2) and plots (Figs 2-3).

Everything here is a pure function of the numbers the experiment produced (a ``results`` dict
and the runs' ``metrics.jsonl`` files), so it can be re-rendered and tested without training.
"""
from __future__ import annotations

import json
import math
import pathlib

import numpy as np

VARIANTS = ("BASELINE", "RKD", "SALT", "SALT_DS")
BUCKETS = ("easy", "medium", "hard")


# --------------------------------------------------------------------------- inputs

def read_metrics(path) -> list[dict]:
    """Rows of a run's ``metrics.jsonl`` (lines that are not JSON objects are an error)."""
    rows = []
    path = pathlib.Path(path)
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object")
            rows.append(row)
    return rows


def train_rows(rows: list[dict]) -> list[dict]:
    """Per-step training rows (those with a step and a loss), last one wins per step (resumes)."""
    by_step = {}
    for r in rows:
        if isinstance(r.get("step"), int) and ("ce" in r or "loss" in r):
            by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]


def step_seconds(row: dict, tokens_per_step: int | None = None):
    """Wall seconds of one training step from a metrics row (``step_time`` or tokens/s)."""
    for key in ("step_time", "step_time_s", "step_s"):
        if isinstance(row.get(key), (int, float)) and row[key] > 0:
            return float(row[key])
    tps = row.get("tokens_per_s")
    if tokens_per_step and isinstance(tps, (int, float)) and tps > 0:
        return tokens_per_step / float(tps)
    return None


# --------------------------------------------------------------------------- accounting

def kd_step_overhead(rows: list[dict], n_kd: int, tokens_per_step: int, skip: int = 2) -> dict:
    """Measured KD-step time / standard-step time - 1, from one run's step timings.

    Uses the median step time of KD steps (1..n_kd) and of standard steps (> n_kd), skipping the
    first ``skip`` steps of each phase (compilation / warm-up).  Returns NaN fields when a phase
    has no usable timing.
    """
    kd, std = [], []
    for r in train_rows(rows):
        t = step_seconds(r, tokens_per_step)
        if t is None:
            continue
        s = r["step"]
        if skip < s <= n_kd:
            kd.append(t)
        elif s > n_kd + skip:
            std.append(t)
    kd_s = float(np.median(kd)) if kd else math.nan
    std_s = float(np.median(std)) if std else math.nan
    return {"kd_step_s": kd_s, "std_step_s": std_s, "overhead": kd_s / std_s - 1.0,
            "n_kd_samples": len(kd), "n_std_samples": len(std)}


def steps_to_reach(target: float, steps, values) -> float | None:
    """First step at which a decreasing-is-better curve reaches ``target`` (linear interpolation
    between evaluated steps); None if it never does.  ``steps`` must be increasing."""
    steps = [float(s) for s in steps]
    values = [float(v) for v in values]
    for i, (s, v) in enumerate(zip(steps, values)):
        if v <= target:
            if i == 0:
                return s
            s0, v0 = steps[i - 1], values[i - 1]
            return s0 + (s - s0) * (v0 - target) / (v0 - v) if v0 != v else s
    return None


def efficiency(target_log_ppl: float, curve_steps, curve_log_ppl, n_kd: int, n_steps: int,
               overhead: float) -> dict:
    """Paper §5.2 accounting: cost (in standard steps) for SALT to reach BASELINE's final
    log-perplexity = s* + min(s*, n_kd) * overhead; saving = 1 - cost / n_steps."""
    s_star = steps_to_reach(target_log_ppl, curve_steps, curve_log_ppl)
    out = {"target_log_ppl": float(target_log_ppl), "steps_needed": s_star, "n_steps": int(n_steps),
           "n_kd": int(n_kd), "overhead": float(overhead)}
    if s_star is None:
        out.update(cost_steps=None, saving=None)
    else:
        kd_part = min(s_star, n_kd)
        cost = s_star + kd_part * (overhead if math.isfinite(overhead) else 0.0)
        out.update(cost_steps=float(cost), saving=float(1.0 - cost / n_steps))
    return out


def paired_difference(stats: dict, base_stats: dict) -> dict:
    """Mean per-window log-perplexity difference (model - base) over the same held-out windows,
    with its standard error (windows as the unit; a rough noise scale for the comparison)."""
    if not np.array_equal(stats["window_ids"], base_stats["window_ids"]):
        raise ValueError("paired comparison needs statistics over the same held-out windows")
    d_N = stats["loss_sum"] / stats["n_tokens"] - base_stats["loss_sum"] / base_stats["n_tokens"]
    se = float(np.std(d_N, ddof=1) / np.sqrt(d_N.size)) if d_N.size > 1 else math.nan
    return {"mean": float(np.mean(d_N)), "se": se, "n_windows": int(d_N.size)}


# --------------------------------------------------------------------------- plots

def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or values.size < window:
        return values
    kernel = np.ones(window) / window
    head = np.cumsum(values[:window - 1]) / np.arange(1, window)
    return np.concatenate([head, np.convolve(values, kernel, mode="valid")])


def plot_training_curves(metrics_by_name: dict, out_dir, n_kd: int | None = None) -> list[str]:
    """PNGs of training accuracy and log-perplexity (CE) over steps for each variant (Figs 2-3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key, label, fname in (("accuracy", "training next-token accuracy", "train_accuracy.png"),
                              ("ce", "training log-perplexity (CE, nats)", "train_log_ppl.png")):
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        plotted = False
        for name, rows in metrics_by_name.items():
            rows = [r for r in train_rows(rows) if isinstance(r.get(key), (int, float))]
            if not rows:
                continue
            steps = np.asarray([r["step"] for r in rows])
            vals = np.asarray([float(r[key]) for r in rows])
            window = max(1, len(vals) // 40)
            ax.plot(steps, _smooth(vals, window), label=name, linewidth=1.4)
            plotted = True
        if n_kd:
            ax.axvline(n_kd, color="gray", linestyle="--", linewidth=0.9, label=f"n_kd = {n_kd}")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if plotted:
            ax.legend()
        fig.tight_layout()
        path = out_dir / fname
        _savefig_atomic(fig, path)
        plt.close(fig)
        written.append(str(path))
    return written


def plot_val_curves(curves: dict, out_dir, n_kd: int | None = None,
                    target: float | None = None) -> str:
    """PNG of held-out log-perplexity at each saved checkpoint for each variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for name, points in curves.items():
        if points:
            ax.plot([p["step"] for p in points], [p["log_ppl"] for p in points], marker="o",
                    markersize=3, label=name)
    if n_kd:
        ax.axvline(n_kd, color="gray", linestyle="--", linewidth=0.9, label=f"n_kd = {n_kd}")
    if target is not None:
        ax.axhline(target, color="black", linestyle=":", linewidth=0.9,
                   label="BASELINE final")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out log-perplexity (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = pathlib.Path(out_dir) / "val_log_ppl.png"
    _savefig_atomic(fig, path)
    plt.close(fig)
    return str(path)


def _savefig_atomic(fig, path: pathlib.Path) -> None:
    from salt.data import outputs

    outputs.write_bytes(path, lambda f: fig.savefig(f, format="png"))


# --------------------------------------------------------------------------- markdown

def _fmt_metric(m: dict | None) -> tuple[str, str]:
    if not m:
        return "—", "—"
    return f"{100 * m['accuracy']:.2f}", f"{m['log_ppl']:.4f}"


def _fmt_steps(x) -> str:
    return "—" if x is None else f"{x:,.0f}"


def verdict(results: dict) -> list[str]:
    """Plain statements of who beat whom on final held-out log-perplexity and accuracy."""
    final = {name: results["models"].get(name, {}).get("final") for name in VARIANTS}
    base = final.get("BASELINE")
    lines = []
    if not base:
        return ["BASELINE has no final evaluation, so no comparison can be made."]
    for name in ("SALT", "SALT_DS", "RKD"):
        m = final.get(name)
        if not m:
            lines.append(f"- {name}: not evaluated.")
            continue
        d_lppl = m["log_ppl"] - base["log_ppl"]
        d_acc = 100 * (m["accuracy"] - base["accuracy"])
        better = d_lppl < 0
        p = results.get("paired", {}).get(name)
        noise = ""
        if p and math.isfinite(p["se"]):
            within = abs(p["mean"]) < 2 * p["se"]
            noise = (f" Paired per-window difference {p['mean']:+.4f} ± {p['se']:.4f} (s.e., "
                     f"{p['n_windows']} windows): "
                     + ("**within noise** (|diff| < 2 s.e.)." if within else "outside 2 s.e."))
        lines.append(
            f"- **{name} {'beats' if better else 'does NOT beat'} BASELINE** on final held-out "
            f"log-perplexity at this scale: {m['log_ppl']:.4f} vs {base['log_ppl']:.4f} "
            f"({d_lppl:+.4f} nats); accuracy {100 * m['accuracy']:.2f}% vs "
            f"{100 * base['accuracy']:.2f}% ({d_acc:+.2f} points).{noise}")
    return lines


def render_report(results: dict) -> str:
    cfg = results["config"]
    n_kd, n = cfg["kd_steps"], cfg["steps"]
    L = []
    L.append("# SALT reproduction report\n")
    L.append(f"Generated by `salt reproduce` ({cfg.get('size', '?')} size). Teacher (SLM) preset "
             f"`{cfg['teacher_preset']}`, student preset `{cfg['student_preset']}`; "
             f"{n:,} student steps of batch {cfg['batch']} × seq_len {cfg['seq_len']}, "
             f"n_kd = {n_kd:,}, ω = {cfg['omega']}, ρ = {cfg['rho']}, transition `step`; "
             f"SLM trained {cfg['teacher_steps']:,} steps, early checkpoint at step "
             f"{cfg['early_step']:,} used for data selection (k = {cfg['k']}).")
    if results.get("params"):
        p = results["params"]
        L.append(f"Parameters (non-embedding): SLM {p['teacher_non_embedding']:,}, student "
                 f"{p['student_non_embedding']:,}; vocabulary {p['vocab_size']:,}.")
    L.append("")
    L.append("## Verdict\n")
    L.extend(verdict(results))
    L.append("")
    L.append("## Held-out accuracy / log-perplexity (Table 1 style)\n")
    L.append(f"Validation split, {results.get('eval_windows', '?')} windows × {cfg['seq_len']} "
             f"target tokens. Accuracy in %, log-perplexity = mean CE in nats.\n")
    L.append(f"| model | acc @ {n_kd:,} | log-ppl @ {n_kd:,} | acc @ {n:,} (end) | log-ppl @ {n:,} (end) |")
    L.append("| --- | ---: | ---: | ---: | ---: |")
    slm = results["models"].get("SLM", {})
    a0, l0 = _fmt_metric(slm.get("at_kd"))
    a1, l1 = _fmt_metric(slm.get("final"))
    L.append(f"| SLM (teacher, end = step {cfg['teacher_steps']:,}) | {a0} | {l0} | {a1} | {l1} |")
    for name in VARIANTS:
        m = results["models"].get(name, {})
        a0, l0 = _fmt_metric(m.get("at_kd"))
        a1, l1 = _fmt_metric(m.get("final"))
        L.append(f"| {name} | {a0} | {l0} | {a1} | {l1} |")
    L.append("")
    L.append("## By difficulty bucket (paper §5.4 / appendix J)\n")
    L.append("Held-out windows ranked by the final SLM's mean per-window loss and split into "
             "tertiles (easy = lowest teacher loss). Accuracy % / log-perplexity.\n")
    header = "| model | step |" + "".join(f" {b} acc | {b} log-ppl |" for b in BUCKETS)
    L.append(header)
    L.append("| --- | ---: |" + " ---: | ---: |" * len(BUCKETS))
    for name in ("SLM",) + VARIANTS:
        m = results["models"].get(name, {})
        for key, step in (("at_kd", n_kd), ("final", None)):
            s = m.get(key)
            if not s or "buckets" not in s:
                continue
            step_label = f"{s.get('step', step or n):,}"
            cells = "".join(f" {100 * s['buckets'][b]['accuracy']:.2f} | {s['buckets'][b]['log_ppl']:.4f} |"
                            for b in BUCKETS)
            L.append(f"| {name} | {step_label} |{cells}")
    L.append("")
    L.append("## Efficiency accounting (paper §5.2)\n")
    ov = results.get("overhead", {})
    if ov:
        L.append(f"KD-step overhead measured in the SALT run (median step time, first steps of "
                 f"each phase skipped): KD step {1000 * ov['kd_step_s']:.1f} ms vs standard step "
                 f"{1000 * ov['std_step_s']:.1f} ms → **{100 * ov['overhead']:.1f}%** "
                 f"(FLOP-count prediction: {100 * ov.get('predicted', math.nan):.1f}%; paper: 12.0% "
                 f"measured, 12.5% predicted).\n")
    for name in ("SALT", "SALT_DS"):
        e = results.get("efficiency", {}).get(name)
        if not e:
            continue
        if e["steps_needed"] is None:
            L.append(f"- **{name}** never reached BASELINE's final held-out log-perplexity "
                     f"({e['target_log_ppl']:.4f}) within {e['n_steps']:,} steps: **no efficiency "
                     "gain at this scale.**")
        else:
            L.append(f"- **{name}** reached BASELINE's final held-out log-perplexity "
                     f"({e['target_log_ppl']:.4f}) after ≈{_fmt_steps(e['steps_needed'])} steps "
                     f"(interpolated between checkpoints every {cfg['eval_every']} steps). Cost in "
                     f"standard-step units = {_fmt_steps(e['steps_needed'])} + "
                     f"{_fmt_steps(min(e['steps_needed'], e['n_kd']))} × {e['overhead']:.3f} = "
                     f"{e['cost_steps']:,.1f} vs {e['n_steps']:,} for BASELINE → saving "
                     f"**{100 * e['saving']:.1f}%** (paper: ≈28%).")
    L.append("")
    if results.get("selection"):
        s = results["selection"]
        L.append("## Data selection (SALT_DS)\n")
        sampled = (f" (a seeded uniform sample of the {s['n_train_windows'] - s['n_excluded']:,} "
                   "candidates, to fit the CPU budget)"
                   if s.get("n_train_windows") and s["n_scored"] < s["n_train_windows"] - s["n_excluded"]
                   else "")
        L.append(f"Scored {s['n_scored']:,} candidate training windows{sampled} with the SLM's step-"
                 f"{cfg['early_step']:,} checkpoint ({s['n_excluded']:,} windows it had seen were "
                 f"excluded from the pool); selected the top m = {s['m']:,} (= n_kd × batch"
                 f"{'' if not s.get('clipped') else ', clipped to the pool'}). Score median "
                 f"{s['score_median']:.4f}, selected-set median {s['selected_median']:.4f}"
                 + (f"; {100 * s['zero_fraction']:.1f}% of the scored windows score exactly 0 "
                    "(fewer than half of their targets in the early SLM's top-k; ties among them "
                    "go to the lower window id)" if s.get("zero_fraction") else "") + ".\n")
    L.append("## Plots\n")
    for png in results.get("plots", []):
        name = pathlib.Path(png).name
        L.append(f"![{name}]({name})")
    L.append("")
    if results.get("timings"):
        L.append("## Wall time\n")
        L.append("| stage | seconds |")
        L.append("| --- | ---: |")
        for stage, secs in results["timings"].items():
            L.append(f"| {stage} | {secs:.1f} |")
        L.append(f"| **total** | {sum(results['timings'].values()):.1f} |")
        L.append("")
        if results.get("machine"):
            m = results["machine"]
            L.append(f"Stage times are wall-clock seconds of the invocation that ran each stage, on "
                     f"{m['cpu_count']} CPUs; load average (1/5/15 min) when this report was written: "
                     + "/".join(f"{x:.1f}" for x in m["loadavg"])
                     + ". A load above the CPU count means other work shared the machine and the "
                     "times are inflated accordingly.\n")
    return "\n".join(L) + "\n"


def write_report(results: dict, out_dir) -> str:
    from salt.runtime.score import write_bytes_atomic

    path = pathlib.Path(out_dir) / "report.md"
    text = render_report(results)
    write_bytes_atomic(path, lambda f: f.write(text.encode()))
    return str(path)
