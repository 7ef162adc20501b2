"""Report accounting and rendering (pure functions), and `salt reproduce --tiny` end to end."""
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from salt.runtime import report as R
from tiny_corpus import make_tiny_corpus


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


# ----------------------------------------------------------------------------- end to end



@pytest.mark.slow
def test_reproduce_tiny_end_to_end_and_resume(tmp_path):
    from salt.cli.main import cli
    from salt.data import prepare
    from salt.runtime.checkpoint import all_steps

    prepare(tmp_path / "data", [make_tiny_corpus(tmp_path / "src")], vocab_size=300,
            val_fraction=0.2, progress=False)
    out = tmp_path / "rep"
    argv = ["reproduce", "--tiny", "--data", str(tmp_path / "data"), "--out", str(out), "--quiet"]
    runner = CliRunner()
    r = runner.invoke(cli, argv)
    assert r.exit_code == 0, r.output
    report = (out / "report.md").read_text()
    for heading in ("## Verdict", "Table 1 style", "## By difficulty bucket", "## Efficiency accounting",
                    "## Data selection", "## Plots", "## Wall time"):
        assert heading in report
    for name in ("SLM", "BASELINE", "RKD", "SALT", "SALT_DS"):
        assert f"| {name} " in report
    assert report.count("beat BASELINE") + report.count("beats BASELINE") == 3
    for png in ("train_accuracy.png", "train_log_ppl.png", "val_log_ppl.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == {"SLM", "BASELINE", "RKD", "SALT", "SALT_DS"}
    for name in R.VARIANTS:
        assert results["models"][name]["at_kd"]["step"] == 4
        assert results["models"][name]["final"]["step"] == 8
        assert [p["step"] for p in results["curves"][name]] == [2, 4, 6, 8]
        assert all_steps(out / "runs" / name) == [2, 4, 6, 8]
    # identical data order and budget: BASELINE and SALT see the same windows after n_kd,
    # and SALT_DS's KD phase comes from the selection
    sel = np.load(out / "selection.npy", allow_pickle=False)
    assert sel.size == 4 * 4 and results["selection"]["m"] == 16
    # same init + same data before any KD: RKD and SALT are identical up to n_kd
    assert results["models"]["RKD"]["at_kd"]["log_ppl"] == pytest.approx(
        results["models"]["SALT"]["at_kd"]["log_ppl"], rel=1e-6)
    # the teacher's easy bucket is easiest for the teacher
    b = results["models"]["SLM"]["final"]["buckets"]
    assert b["easy"]["log_ppl"] <= b["medium"]["log_ppl"] <= b["hard"]["log_ppl"]
    # re-running skips every finished stage and reproduces the same numbers
    state = json.loads((out / "state.json").read_text())
    r = runner.invoke(cli, argv)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "state.json").read_text())["stages"] == state["stages"]
    again = json.loads((out / "results.json").read_text())
    assert again["models"] == results["models"]
    # different settings in the same directory are refused, nothing touched
    r = runner.invoke(cli, argv + ["--steps", "12", "--eval-every", "2"])
    assert r.exit_code != 0 and "different settings" in r.output and "steps" in r.output
    assert json.loads((out / "results.json").read_text())["models"] == results["models"]


def test_reproduce_bad_input(tmp_path):
    from salt.cli.main import cli

    runner = CliRunner()
    r = runner.invoke(cli, ["reproduce", "--tiny", "--data", str(tmp_path / "nope"),
                            "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "does not exist" in r.output and "Traceback" not in r.output
    r = runner.invoke(cli, ["reproduce", "--tiny", "--kd-steps", "8", "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "kd_steps (8) must be < steps (8)" in r.output
    r = runner.invoke(cli, ["reproduce", "--tiny", "--eval-every", "3", "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "multiple of eval_every" in r.output


def test_paired_difference_and_noise_statement():
    ids = np.arange(4)
    base = {"window_ids": ids, "loss_sum": np.array([4.0, 8.0, 12.0, 16.0]), "n_tokens": np.full(4, 4)}
    other = {"window_ids": ids, "loss_sum": np.array([4.4, 7.6, 12.4, 16.4]), "n_tokens": np.full(4, 4)}
    p = R.paired_difference(other, base)
    d = np.array([0.1, -0.1, 0.1, 0.1])
    assert p["mean"] == pytest.approx(d.mean())
    assert p["se"] == pytest.approx(d.std(ddof=1) / 2)
    with pytest.raises(ValueError, match="same held-out windows"):
        R.paired_difference(other, dict(base, window_ids=ids + 1))
    results = {"models": {"BASELINE": {"final": {"accuracy": 0.5, "log_ppl": 2.0}},
                          "SALT": {"final": {"accuracy": 0.5, "log_ppl": 1.99}}},
               "paired": {"SALT": {"mean": -0.01, "se": 0.02, "n_windows": 100}}}
    text = "\n".join(R.verdict(results))
    assert "**SALT beats BASELINE**" in text and "**within noise**" in text
