"""salt reproduce: statistics, seed pooling, verdict logic (synthetic), the RKD -> SALT fork
(bit-identical to SALT from scratch), report rendering, and `salt reproduce --tiny` end to end."""
import json
import math
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from salt.runtime.experiments import report as R
from salt.runtime.experiments import report_render as RR
from salt.runtime.train.metrics_log import read_metrics
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


def test_read_metrics_names_bad_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "ce": 2.0}\nnot json\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics(p)


def test_paired_difference_log_ppl_and_accuracy():
    ids = np.arange(4)
    base = {"window_ids": ids, "loss_sum": np.array([4.0, 8.0, 12.0, 16.0]),
            "correct": np.array([1, 2, 3, 4]), "n_tokens": np.full(4, 4)}
    other = {"window_ids": ids, "loss_sum": np.array([4.4, 7.6, 12.4, 16.4]),
             "correct": np.array([2, 2, 3, 4]), "n_tokens": np.full(4, 4)}
    p = R.paired_difference(other, base)
    d = np.array([0.1, -0.1, 0.1, 0.1])
    assert p["mean"] == pytest.approx(d.mean()) and p["se"] == pytest.approx(d.std(ddof=1) / 2)
    a = R.paired_difference(other, base, "accuracy")
    assert a["mean"] == pytest.approx(0.25 / 4)
    with pytest.raises(ValueError, match="same held-out windows"):
        R.paired_difference(other, dict(base, window_ids=ids + 1))


def test_pooled_seeds_t_interval_and_one_seed_window_interval():
    p = R.pooled([-0.02, -0.01, -0.03], [0.004, 0.005, 0.006])
    se = np.std([-0.02, -0.01, -0.03], ddof=1) / math.sqrt(3)
    assert p["mean"] == pytest.approx(-0.02) and p["se"] == pytest.approx(se)
    assert p["lo"] == pytest.approx(-0.02 - 4.303 * se) and p["hi"] == pytest.approx(-0.02 + 4.303 * se)
    assert p["n"] == 3 and "3 seeds" in p["basis"]
    one = R.pooled([-0.02], [0.004])
    assert (one["lo"], one["hi"]) == pytest.approx((-0.028, -0.012)) and "one seed" in one["basis"]
    assert R.pooled([0.1, 0.1])["se"] == 0.0


# ----------------------------------------------------------------------------- synthetic results

def _stats(rng, n, shift, acc):
    """Per-window statistics of a fake model: mean CE 3 + shift (+ noise), accuracy ~ acc."""
    ids = np.arange(n)
    per_window = 3.0 + shift + 0.002 * rng.standard_normal(n) + 0.2 * np.sin(ids)
    return {"window_ids": ids, "loss_sum": per_window * 16, "n_tokens": np.full(n, 16),
            "correct": np.round(16 * (acc + 0.01 * rng.standard_normal(n))).astype(np.int64)}


def _synthetic_results(shifts, n_seeds=1, testable=True, n=60):
    """``shifts[name] = (log-ppl shift at n_kd, at end)``; same windows for every model."""
    rng = np.random.default_rng(0)
    teacher = _stats(rng, n, 0.5, 0.3)
    per_seed = {}
    for seed in range(n_seeds):
        stats = {}
        for name, (s_kd, s_end) in shifts.items():
            for step, shift in ((2, 1.0), (4, s_kd), (6, (s_kd + s_end) / 2), (8, s_end)):
                stats[(name, step)] = _stats(rng, n, shift, 0.4 - shift / 10)
        r = R.seed_results(stats, teacher, n_kd=4, n_steps=8)
        R.add_efficiency(r, 4, 8, 0.1)
        per_seed[str(seed)] = r
    cfg = {"size": "synthetic", "teacher_preset": "t", "student_preset": "s", "steps": 8,
           "kd_steps": 4, "teacher_steps": 8, "teacher_batch": None, "early_step": 4, "batch": 4,
           "seq_len": 16, "omega": 0.667, "rho": 0.25, "transition": "step", "k": 10,
           "eval_every": 2, "optimizer": "adamw", "lr": 1e-2, "final_lr": 1e-3, "warmup": 2,
           "claims_testable": testable}
    results = {"config": cfg, "seeds": list(range(n_seeds)), "per_seed": per_seed,
               "pooled": R.pool_seeds(per_seed), "eval_windows": n,
               "overhead": {"kd_step_s": 0.011, "std_step_s": 0.01, "overhead": 0.1, "predicted": 0.12,
                            "standard_fraction_of_matmul": 0.3, "matmul_flops_per_s": 1e10, "iters": 3},
               "plots": [], "timings": {"slm": 1.0}}
    results["claims"] = R.claims(results)
    return results


def _status(results, cid, word):
    return [c["status"] for c in results["claims"] if c["id"] == cid and word in c["claim"]][0]


def test_claims_hold_when_the_paper_effect_is_present():
    res = _synthetic_results({"BASELINE": (0.0, 0.0), "RKD": (0.1, 0.3), "SALT": (0.1, -0.02),
                              "SALT_DS": (0.12, -0.03)}, n_seeds=3)
    assert _status(res, "a", "RKD") == "holds"
    assert _status(res, "b", "log-ppl") == "holds"
    assert _status(res, "c", "SALT_DS") == "holds"
    f = [c for c in res["claims"] if c["id"] == "f"][0]
    assert f["status"] == "holds" and "saving" in f["here"]
    pooled = res["pooled"]["final"]["SALT-BASELINE"]["log_ppl"]
    assert pooled["n"] == 3 and pooled["hi"] < 0 and pooled["mean"] == pytest.approx(-0.02, abs=2e-3)
    assert all(x == pytest.approx(-0.02, abs=2e-3) for x in pooled["per_seed"])


def test_claims_contradicted_and_within_noise():
    res = _synthetic_results({"BASELINE": (0.0, 0.0), "RKD": (0.1, -0.05), "SALT": (0.1, 0.05),
                              "SALT_DS": (0.1, 0.05)})
    assert _status(res, "a", "RKD") == "contradicted"
    assert _status(res, "b", "log-ppl") == "contradicted"
    assert _status(res, "c", "SALT_DS").startswith("not shown")  # identical shifts: noise only
    assert [c for c in res["claims"] if c["id"] == "f"][0]["status"] == "contradicted"  # never reached
    lines = R.verdict_lines(res)
    assert lines[0].startswith("ONE SEED")
    assert any(line.startswith("(b) SALT ends at least as good as BASELINE in log-ppl") and
               "CONTRADICTED" in line for line in lines)


def test_too_small_size_says_so():
    res = _synthetic_results({"BASELINE": (0.0, 0.0), "RKD": (0.1, 0.3), "SALT": (0.1, -0.02),
                              "SALT_DS": (0.1, -0.02)}, testable=False)
    assert {c["status"] for c in res["claims"]} == {"too small to test"}
    assert any("TOO SMALL TO TEST THE CLAIMS" in line for line in R.verdict_lines(res))


def test_render_report_and_plots(tmp_path):
    res = _synthetic_results({"BASELINE": (0.0, 0.0), "RKD": (0.1, 0.3), "SALT": (0.1, -0.02),
                              "SALT_DS": (0.12, -0.03)}, n_seeds=2)
    rows = [{"step": s, "ce": 3.0 / s, "accuracy": 0.1 * math.log(s + 1)} for s in range(1, 9)]
    res["plots"] = RR.plot_all(res, {"BASELINE": [rows, rows], "SALT": [rows, rows]}, tmp_path)
    for p in res["plots"]:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    text = RR.render_report(res)
    for heading in ("## Verdict per claim", "Table 1 style", "### Per seed", "## By difficulty bucket",
                    "## Efficiency accounting", "## Plots", "## Wall time"):
        assert heading in text
    assert "| (b) SALT ends at least as good as BASELINE in log-ppl" in text and "**holds**" in text
    assert "2 seeds, 95% t-interval" in text and "58.99 / 1.868" in text
    path = RR.write_report(res, tmp_path)
    assert open(path).read() == text


def test_report_warns_when_the_kd_target_is_near_uniform():
    res = _synthetic_results({"BASELINE": (0.0, 0.0), "RKD": (0.1, 0.3), "SALT": (0.1, 0.02),
                              "SALT_DS": (0.12, 0.03)}, n_seeds=1)
    flat = {"entropy": 8.11, "uniform_entropy": math.log(4096), "top10_mass": 0.02, "rho": 0.25}
    sharp = dict(flat, entropy=4.24, top10_mass=0.56, rho=1.0)
    assert RR.near_uniform(flat) and not RR.near_uniform(sharp)
    assert "close to uniform" in RR.render_report(dict(res, sharpness=flat))
    assert "close to uniform" not in RR.render_report(dict(res, sharpness=sharp))


def test_verdict_lines_name_settings_that_differ_from_the_paper():
    res = _synthetic_results({"BASELINE": (0.0, 0.0), "RKD": (0.1, 0.3), "SALT": (0.1, -0.02),
                              "SALT_DS": (0.12, -0.03)}, n_seeds=1)
    assert not any(line.startswith("ABLATION") for line in R.verdict_lines(res))
    res["config"] = dict(res["config"], rho=1.0, transition="linear")
    assert R.ablated(res["config"]) == ["ρ = 1.0 (paper 0.25)", "transition = linear (paper step)"]
    assert "ABLATION: ρ = 1.0 (paper 0.25), transition = linear (paper step)" in R.verdict_lines(res)[1]
    res["config"] = dict(res["config"], rho=0.25, transition="step", kd_topk=64)
    assert R.ablated(res["config"]) == ["top-64 KD (paper: full vocabulary)"]


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from salt.data import prepare

    root = tmp_path_factory.mktemp("rep")
    src = make_tiny_corpus(root / "src")
    for f in sorted(src.iterdir()):  # sentences, for the last-word task (salt.runtime.eval.cloze)
        words = f.read_text().split()
        f.write_text(" ".join(w + "." * (i % 9 == 8) for i, w in enumerate(words)) + "\n")
    prepare(root / "data", [src], vocab_size=300, val_fraction=0.2, progress=False)
    return root / "data"


@pytest.mark.slow
def test_salt_forked_from_rkd_is_bit_identical_to_salt_from_scratch(tmp_path, tiny_data):
    from salt.runtime.model import checkpoint
    from salt.runtime.experiments.presets import config_for
    from salt.runtime.experiments.students import fork_run, train_config, train_stage

    cfg = config_for("tiny", data=str(tiny_data), out=str(tmp_path))
    slm = tmp_path / "SLM"
    train_stage(train_config(cfg, slm, tiny_data, preset="tiny-teacher", steps=4, kd_steps=0,
                        checkpoint_every=4, seed=0), progress=False)
    common = dict(preset="tiny-student", steps=8, checkpoint_every=2, seed=3, teacher=slm)
    train_stage(train_config(cfg, tmp_path / "RKD", tiny_data, kd_steps=8, **common), progress=False)
    train_stage(train_config(cfg, tmp_path / "SALT", tiny_data, kd_steps=4, **common), progress=False)
    fork_tc = train_config(cfg, tmp_path / "FORK", tiny_data, kd_steps=4, **common)
    fork_run(tmp_path / "RKD", 4, tmp_path / "FORK", fork_tc)
    assert checkpoint.all_steps(tmp_path / "FORK") == [2, 4]
    summary = train_stage(fork_tc, progress=False)
    assert summary["start_step"] == 4 and summary["last_step"] == 8
    _, p_scratch, _ = checkpoint.load_params(tmp_path / "SALT", 8)
    _, p_fork, meta = checkpoint.load_params(tmp_path / "FORK", 8)
    leaves_scratch, leaves_fork = list(_leaves(p_scratch)), list(_leaves(p_fork))
    assert len(leaves_scratch) == len(leaves_fork) == 11
    for a, b in zip(leaves_scratch, leaves_fork):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert meta["run_config"]["kd_steps"] == 4 and meta["teacher"]["step"] == 4

    def rows(run):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"}
                for r in read_metrics(tmp_path / run / "metrics.jsonl")]
    assert rows("FORK") == rows("SALT") and len(rows("FORK")) == 8
    record = json.loads((tmp_path / "FORK" / "run_config.json").read_text())
    assert record["train"]["kd_steps"] == 4 and record["forked_from"]["step"] == 4
    with pytest.raises(ValueError, match="no checkpoint of step 3"):
        fork_run(tmp_path / "RKD", 3, tmp_path / "FORK2", fork_tc)
    with pytest.raises(ValueError, match="exists"):
        fork_run(tmp_path / "RKD", 4, tmp_path / "FORK", fork_tc)


def _leaves(tree):
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from _leaves(tree[k])
    else:
        yield np.asarray(tree)


@pytest.mark.slow
def test_reproduce_tiny_two_seeds_end_to_end_and_resume(tmp_path, tiny_data):
    from salt.cli.main import cli
    from salt.runtime.model.checkpoint import all_steps

    out = tmp_path / "rep"
    argv = ["reproduce", "--tiny", "--seeds", "2", "--seed", "5", "--data", str(tiny_data),
            "--out", str(out), "--quiet"]
    runner = CliRunner()
    r = runner.invoke(cli, argv)
    assert r.exit_code == 0, r.output
    report = (out / "report.md").read_text()
    for heading in ("## Verdict per claim", "Table 1 style", "## By difficulty bucket",
                    "## LAMBADA-style last word by SLM-difficulty bucket", "## Efficiency accounting",
                    "## Data selection", "## Plots", "## Wall time"):
        assert heading in report
    assert "TOO SMALL TO TEST THE CLAIMS" in report and "2 seeds, 95% t-interval" in report
    for png in ("train_accuracy.png", "train_log_ppl.png", "val_log_ppl.png", "paired_difference.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [5, 6] and set(results["per_seed"]) == {"5", "6"}
    for seed in ("5", "6"):
        models = results["per_seed"][seed]["models"]
        for name in R.VARIANTS:
            assert models[name]["at_kd"]["step"] == 4 and models[name]["final"]["step"] == 8
            assert all_steps(out / "runs" / f"{name}-seed{seed}") == [2, 4, 6, 8]
        # SALT is forked from RKD at n_kd: identical there
        assert models["RKD"]["at_kd"]["log_ppl"] == models["SALT"]["at_kd"]["log_ppl"]
    assert (results["per_seed"]["5"]["models"]["BASELINE"]["final"]["log_ppl"]
            != results["per_seed"]["6"]["models"]["BASELINE"]["final"]["log_ppl"])
    state = json.loads((out / "state.json").read_text())
    assert state["stages"]["SALT/seed5"]["forked"] is True
    assert math.isfinite(results["overhead"]["overhead"]) and results["overhead"]["timer"] == "cpu-min"
    assert results["sharpness"]["entropy"] <= results["sharpness"]["uniform_entropy"] + 1e-6
    sel = np.load(out / "selection.npy", allow_pickle=False)
    assert sel.size == 4 * 4 and results["selection"]["m"] == 16
    cz = results["cloze"]  # the last-word task: every model at n_kd and at the end, two seeds
    assert cz["n_passages"] >= 30 and sum(cz["bucket_sizes"].values()) == cz["n_passages"]
    for seed in ("5", "6"):
        models = cz["per_seed"][seed]["models"]
        assert all(set(models[name]) == {"at_kd", "final"} for name in R.VARIANTS)
        assert models["RKD"]["at_kd"] == models["SALT"]["at_kd"]
    assert "| SLM | 8 |" in report and "(g) SALT - BASELINE LAMBADA-style" in report
    assert [c["status"] for c in results["claims"] if c["id"] == "g"] == ["too small to test"]
    # re-running skips every finished stage and reproduces the same numbers
    r = runner.invoke(cli, argv)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "state.json").read_text())["stages"] == state["stages"]
    assert json.loads((out / "results.json").read_text())["per_seed"] == results["per_seed"]
    # a reproduction finished before the cloze stage existed: a re-run runs only that stage
    old = json.loads((out / "state.json").read_text())
    del old["stages"]["cloze"]
    (out / "state.json").write_text(json.dumps(old))
    shutil.rmtree(out / "eval" / "cloze")
    r = runner.invoke(cli, argv)
    assert r.exit_code == 0, r.output
    stages = json.loads((out / "state.json").read_text())["stages"]
    assert "cloze" in stages and {k: v for k, v in stages.items() if k != "cloze"} == old["stages"]
    assert json.loads((out / "results.json").read_text())["cloze"] == results["cloze"]
    # more seeds extend the reproduction: the SLM and the selection are reused
    r = runner.invoke(cli, argv[:3] + ["3"] + argv[4:])
    assert r.exit_code == 0, r.output
    three = json.loads((out / "results.json").read_text())
    assert three["seeds"] == [5, 6, 7] and three["per_seed"]["5"] == results["per_seed"]["5"]
    stages = json.loads((out / "state.json").read_text())["stages"]
    assert stages["slm"] == state["stages"]["slm"] and "BASELINE/seed7" in stages
    # different settings in the same directory are refused, nothing touched
    r = runner.invoke(cli, argv + ["--omega", "0.5"])
    assert r.exit_code != 0 and "different settings" in r.output and "omega" in r.output


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
    r = runner.invoke(cli, ["reproduce", "--tiny", "--transition", "linear", "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "needs kd_steps1" in r.output


def test_overhead_timer_is_robust_to_interference():
    """The reported overhead uses each step's minimum per-process CPU time over the interleaved
    repetitions: repetitions slowed by other processes (here: added to some of them) change the
    median wall-time ratio but not the robust one."""
    from salt.bench.step import robust_times

    quiet = {"standard": [0.100, 0.101, 0.102, 0.100], "kd": [0.112, 0.113, 0.112, 0.114]}
    r = robust_times(quiet)
    assert r["cpu_ratio"] == pytest.approx(0.112 / 0.100)
    loaded = {"standard": [0.100, 0.101, 0.102, 0.100], "kd": [0.112, 0.2, 0.31, 0.25]}
    assert robust_times(loaded)["cpu_ratio"] == r["cpu_ratio"]
    assert _median_ratio(quiet) < 1.15 and _median_ratio(loaded) > 2.0
    # what reproduce records: the CPU-time ratio when timed, the wall median for older states
    timing = {"measured_ratio": 1.35, "cpu_ratio": r["cpu_ratio"], "kd_step_cpu_s": 0.112,
              "standard_step_cpu_s": 0.1}
    est = R.overhead_estimate(timing)
    assert est["timer"] == "cpu-min" and est["overhead"] == pytest.approx(0.12)
    assert est["wall_overhead"] == pytest.approx(0.35)
    old = R.overhead_estimate({"measured_ratio": 1.35})
    assert old == {"overhead": pytest.approx(0.35), "timer": "wall-median", "wall_overhead": pytest.approx(0.35)}


def _median_ratio(times):
    return float(np.median(times["kd"]) / np.median(times["standard"]))


def test_report_names_the_overhead_timer():
    res = _synthetic_results({"BASELINE": (0.0, 0.0), "RKD": (0.1, 0.3), "SALT": (0.1, -0.02),
                              "SALT_DS": (0.1, -0.02)})
    res["overhead"].update(R.overhead_estimate({"measured_ratio": 1.35, "cpu_ratio": 1.12,
                                                "kd_step_cpu_s": 0.0112, "standard_step_cpu_s": 0.01}))
    text = RR.render_report(res)
    assert "minimum per-process CPU time" in text and "**12.0%**" in text and "35.0%" in text


def test_rho_list_config_and_cli_parsing():
    from salt.runtime.experiments.presets import PAPER_RHO, config_for

    small = config_for("small")
    assert small.seed == 1 and config_for("small-rho1").seed == 1  # the search used seeds 0 and 101
    assert small.rhos() == [1.0, PAPER_RHO] and small.rho_searched
    cfg = config_for("small", rho=[1.0, 0.25, 0.5])
    assert cfg.rho == 1.0 and cfg.extra_rhos == (0.25, 0.5) and cfg.rho_searched  # the searched ρ leads
    other = config_for("small", rho=[0.5, 1.0])
    assert other.rhos() == [0.5, 1.0] and not other.rho_searched                 # not the searched ρ
    assert config_for("quick", rho=[2.0]).rhos() == [2.0]
    with pytest.raises(ValueError, match="distinct"):
        config_for("small", rho=[1.0, 1.0])
    with pytest.raises(ValueError, match="rho must be > 0"):
        config_for("small", rho=[1.0, -0.5])
    from salt.cli.main import cli
    r = CliRunner().invoke(cli, ["reproduce", "--tiny", "--rho", "1,x", "--out", "unused"])
    assert r.exit_code != 0 and "--rho" in r.output and "Traceback" not in r.output


def _with_arms(res, lead=1.0, searched=True):
    """Synthetic two-arm results: the lead arm is ``res`` itself; the ρ = 0.25 arm has SALT worse."""
    worse = _synthetic_results({"BASELINE": (0.0, 0.0), "RKD": (0.1, 0.3), "SALT": (0.1, 0.04),
                                "SALT_DS": (0.1, 0.05)})
    res["config"].update(rho=lead, rho_searched=searched)
    sharp = {"entropy": 4.2, "uniform_entropy": 8.3, "top10_mass": 0.55, "rho": lead}
    flat = {"entropy": 7.9, "uniform_entropy": 8.3, "top10_mass": 0.08, "rho": 0.25}
    res["sharpness"] = sharp
    res["rho_arms"] = R.rho_arms(res, {lead: {"per_seed": res["per_seed"], "sharpness": sharp},
                                       0.25: {"per_seed": worse["per_seed"], "sharpness": flat}})
    return res


def test_report_leads_with_searched_rho_and_shows_the_paper_arm(tmp_path):
    res = _with_arms(_synthetic_results({"BASELINE": (0.0, 0.0), "RKD": (0.1, 0.3), "SALT": (0.1, -0.02),
                                         "SALT_DS": (0.1, -0.03)}))
    res["seeds"] = [1]
    lines = R.verdict_lines(res)
    assert lines[0].startswith("ρ = 1 WAS CHOSEN BY SEARCH AT THIS SCALE") and "0.25" in lines[0]
    assert "on seeds 0, 101, none of which this run's verdicts use (seeds 1)" in lines[0]
    # a run on a seed the search used says so in its first line
    res["seeds"] = [0, 1, 2]
    assert "WARNING, this run uses seed 0, so its verdicts are not independent" in R.verdict_lines(res)[0]
    res["seeds"] = [1]
    assert lines[1].startswith("ρ = 0.25 ARM (THE PAPER’S ρ)") and "entropy 7.90" in lines[1]
    assert "against 4.20 at ρ = 1" in lines[1] and "SALT − BASELINE log-ppl +0.03" in lines[1]
    assert not any(line.startswith("ABLATION") for line in lines)   # the searched ρ is no ablation
    arms = {a["rho"]: a for a in res["rho_arms"]}
    assert arms[1.0]["lead"] and arms[1.0]["salt_minus_baseline"]["hi"] < 0
    assert [c["status"] for c in arms[0.25]["claims"] if "log-ppl (SALT - BASELINE" in c["claim"]] == ["contradicted"]
    text = RR.render_report(res)
    head = text.split("\n## ")[0]
    assert "WAS CHOSEN BY SEARCH" in head and "THE PAPER’S ρ" in head
    assert "## ρ arms: sensitivity" in text and "| 0.25 (paper) | 7.90 of 8.30 |" in text
    assert "Verdicts of the ρ = 0.25 arm" in text
    path = RR.plot_rho_sensitivity(res["rho_arms"], tmp_path / "rho.png")
    assert open(path, "rb").read(4) == b"\x89PNG"
    # a lead ρ given by hand is an ablation, said as such; no search claimed
    hand = _with_arms(_synthetic_results({"BASELINE": (0.0, 0.0), "RKD": (0.1, 0.3), "SALT": (0.1, -0.02),
                                          "SALT_DS": (0.1, -0.03)}), lead=0.5, searched=False)
    lines = R.verdict_lines(hand)
    assert not any("SEARCH" in line for line in lines)
    assert any(line.startswith("ABLATION: ρ = 0.5 (paper 0.25)") for line in lines)


@pytest.mark.slow
def test_reproduce_tiny_two_rho_arms_share_slm_selection_and_baseline(tmp_path, tiny_data):
    from salt.cli.main import cli

    out = tmp_path / "rep"
    argv = ["reproduce", "--tiny", "--seed", "5", "--data", str(tiny_data), "--out", str(out), "--quiet"]
    r = CliRunner().invoke(cli, argv + ["--rho", "1,0.25"])
    assert r.exit_code == 0, r.output
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["BASELINE-seed5", "RKD-rho0.25-seed5", "RKD-seed5", "SALT-rho0.25-seed5", "SALT-seed5",
                    "SALT_DS-rho0.25-seed5", "SALT_DS-seed5", "SLM"]
    results = json.loads((out / "results.json").read_text())
    arms = results["rho_arms"]
    assert [a["rho"] for a in arms] == [1.0, 0.25] and arms[0]["lead"] and not arms[1]["lead"]
    assert arms[1]["sharpness"]["entropy"] > arms[0]["sharpness"]["entropy"]  # ρ = 0.25 flattens
    # the arms share BASELINE: its final log-ppl is the same row in both
    base = [a["pooled"]["final"]["SALT-BASELINE"]["log_ppl"] for a in arms]
    assert base[0]["n"] == base[1]["n"] == 1
    report = (out / "report.md").read_text()
    assert "ρ = 0.25 ARM (THE PAPER’S ρ)" in report.split("\n## ")[0]
    assert (out / "rho_sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    state = json.loads((out / "state.json").read_text())
    assert state["stages"]["SALT-rho0.25/seed5"]["forked"] is True
    # a third arm extends the reproduction: nothing shared is re-run
    r = CliRunner().invoke(cli, argv + ["--rho", "1,0.25,0.5"])
    assert r.exit_code == 0, r.output
    again = json.loads((out / "state.json").read_text())["stages"]
    assert all(again[k] == v for k, v in state["stages"].items() if k != "students side by side")
    assert "SALT-rho0.5/seed5" in again and len(json.loads((out / "results.json").read_text())["rho_arms"]) == 3
