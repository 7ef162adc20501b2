"""Report accounting and rendering (pure functions), and `salt reproduce --tiny` end to end."""
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from salt.runtime import report as R


def test_steps_to_reach_interpolates_first_crossing():
    steps, vals = [10, 20, 30, 40], [3.0, 2.5, 2.0, 1.9]
    assert R.steps_to_reach(2.25, steps, vals) == pytest.approx(25.0)
    assert R.steps_to_reach(3.5, steps, vals) == 10.0
    assert R.steps_to_reach(2.0, steps, vals) == 30.0
    assert R.steps_to_reach(1.0, steps, vals) is None


def test_efficiency_matches_paper_arithmetic():
    # Paper §5.2: reach BASELINE at 146K steps, n_kd = 36K, overhead 1/8 -> (146 + 36/8)K of 208K.
    e = R.efficiency(1.868, [140e3, 150e3, 208e3], [1.870, 1.866, 1.86], 36000, 208000, 0.125)
    assert e["steps_needed"] == pytest.approx(145000.0)
    assert e["cost_steps"] == pytest.approx(145000 + 36000 * 0.125)
    assert e["saving"] == pytest.approx(1 - (145000 + 4500) / 208000)
    # reached inside the KD phase: only the KD steps taken pay the overhead
    e = R.efficiency(2.0, [10, 20], [2.5, 1.5], 100, 200, 0.5)
    assert e["cost_steps"] == pytest.approx(15 * 1.5)
    never = R.efficiency(1.0, [10, 20], [2.5, 1.5], 10, 20, 0.1)
    assert never["steps_needed"] is None and never["saving"] is None


def test_kd_step_overhead_from_step_timings():
    rows = [{"step": s, "ce": 1.0, "tokens_per_s": 100.0 if s <= 10 else 125.0} for s in range(1, 31)]
    rows.append({"event": "checkpoint", "step": 10})
    ov = R.kd_step_overhead(rows, n_kd=10, tokens_per_step=50, skip=2)
    assert ov["kd_step_s"] == pytest.approx(0.5) and ov["std_step_s"] == pytest.approx(0.4)
    assert ov["overhead"] == pytest.approx(0.25)
    assert ov["n_kd_samples"] == 8 and ov["n_std_samples"] == 18
    assert math.isnan(R.kd_step_overhead([], 10, 50)["overhead"])


def test_read_metrics_names_bad_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "ce": 2.0}\nnot json\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        R.read_metrics(p)


def _summary(acc, lppl, step):
    b = {name: {"accuracy": acc + d, "log_ppl": lppl - d, "n_windows": 4, "n_tokens": 64}
         for name, d in zip(R.BUCKETS, (0.1, 0.0, -0.1))}
    return {"accuracy": acc, "log_ppl": lppl, "n_windows": 12, "n_tokens": 192, "step": step,
            "buckets": b}


def test_render_report_states_the_outcome_plainly(tmp_path):
    cfg = {"size": "tiny", "teacher_preset": "tiny-teacher", "student_preset": "tiny-student",
           "steps": 8, "kd_steps": 4, "teacher_steps": 8, "early_step": 4, "batch": 4, "seq_len": 16,
           "omega": 0.667, "rho": 0.25, "k": 10, "eval_every": 2}
    models = {"SLM": {"final": _summary(0.3, 3.0, 8)},
              "BASELINE": {"at_kd": _summary(0.2, 3.5, 4), "final": _summary(0.35, 2.5, 8)},
              "RKD": {"at_kd": _summary(0.25, 3.2, 4), "final": _summary(0.3, 2.9, 8)},
              "SALT": {"at_kd": _summary(0.25, 3.2, 4), "final": _summary(0.36, 2.45, 8)},
              "SALT_DS": {"at_kd": _summary(0.25, 3.2, 4), "final": _summary(0.34, 2.6, 8)}}
    results = {"config": cfg, "models": models, "eval_windows": 12,
               "overhead": {"kd_step_s": 0.011, "std_step_s": 0.01, "overhead": 0.1, "predicted": 0.12},
               "efficiency": {"SALT": R.efficiency(2.5, [2, 4, 6, 8], [3.6, 3.2, 2.48, 2.45], 4, 8, 0.1),
                              "SALT_DS": R.efficiency(2.5, [2, 4, 6, 8], [3.6, 3.2, 2.7, 2.6], 4, 8, 0.1)},
               "plots": [], "timings": {"slm": 1.0}}
    text = R.render_report(results)
    assert "**SALT beats BASELINE**" in text
    assert "**SALT_DS does NOT beat BASELINE**" in text
    assert "**RKD does NOT beat BASELINE**" in text
    assert "SALT_DS** never reached" in text and "no efficiency gain at this scale" in text
    assert "| SALT | 25.00 | 3.2000 | 36.00 | 2.4500 |" in text
    assert "10.0%" in text  # measured overhead
    path = R.write_report(results, tmp_path)
    assert open(path).read() == text


def test_plots_are_png(tmp_path):
    rows = [{"step": s, "ce": 3.0 / s, "accuracy": 0.1 * math.log(s + 1)} for s in range(1, 50)]
    written = R.plot_training_curves({"BASELINE": rows, "SALT": rows}, tmp_path, n_kd=10)
    written.append(R.plot_val_curves({"SALT": [{"step": 10, "log_ppl": 2.0}, {"step": 20, "log_ppl": 1.5}]},
                                     tmp_path, n_kd=10, target=1.7))
    for p in written:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
