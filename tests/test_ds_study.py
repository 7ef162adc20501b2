"""salt ds-study: setting parsing, and on a tiny reproduction: an unchanged setting re-trains the
reproduction's own SALT_DS bit for bit, the random control, the table's differences against the
reproduction's own evaluations, resume, and one-line errors."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from salt.runtime.experiments import ds_study as D
from salt.runtime.experiments import report as R
from tiny_corpus import make_tiny_corpus


def test_parse_setting():
    s = D.parse_setting("k=100,step=300")
    assert (s.k, s.step, s.pool, s.m, s.mode, s.random) == (100, 300, None, None, None, False)
    assert s.name == "k100_step300"
    assert D.parse_setting("pool=all").pool == "all" and D.parse_setting("pool=64").pool == 64
    assert D.parse_setting("random,m=8").random and D.parse_setting("mode=exclude").mode == "exclude"
    for bad, why in (("k=0", "cannot read 'k=0'"), ("k=x", "cannot read"), ("mode=max", "cannot read"),
                     ("random,k=3", "without a score"), ("bogus", "cannot read 'bogus'"), ("k=2,k=3", "twice")):
        with pytest.raises(ValueError, match=why):
            D.parse_setting(bad)


@pytest.fixture(scope="module")
def tiny_repro(tmp_path_factory):
    from salt.cli.main import cli
    from salt.data import prepare

    root = tmp_path_factory.mktemp("dss")
    prepare(root / "data", [make_tiny_corpus(root / "src")], vocab_size=300, val_fraction=0.2, progress=False)
    r = CliRunner().invoke(cli, ["reproduce", "--tiny", "--seed", "3", "--seeds", "2", "--data", str(root / "data"),
                                 "--out", str(root / "rep"), "--quiet"])
    assert r.exit_code == 0, r.output
    return root / "rep"


@pytest.mark.slow
def test_ds_study_on_a_tiny_reproduction(tmp_path, tiny_repro):
    from salt.cli.main import cli
    from salt.runtime.eval import evaluate

    def files(d):
        return {p: p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()}

    repro_files = files(tiny_repro)
    out = tmp_path / "study"
    argv = ["ds-study", "--reproduction", str(tiny_repro), "--out", str(out), "--quiet",
            "--setting", "m=16", "--setting", "random"]
    r = CliRunner().invoke(cli, argv)
    assert r.exit_code == 0, r.output
    assert files(tiny_repro) == repro_files  # the reproduction is an input: nothing written there
    res = json.loads((out / "results.json").read_text())
    assert [row["spec"] for row in res["rows"]] == ["reproduction", "m=16", "random"]
    assert res["seeds"] == [3, 4]  # every seed of the reproduction (--seeds is not among its settings)
    for name in ("m16", "random"):
        assert all((out / "runs" / f"SALT_DS-{name}-seed{seed}" / "run_config.json").is_file() for seed in (3, 4))
    # m = n_kd x batch = 16 is the reproduction's own setting: the same selection, and a student
    # bit-identical to the reproduction's SALT_DS
    assert np.array_equal(np.load(out / "selections" / "m16.npy"), np.load(tiny_repro / "selection.npy"))
    for step in (4, 8):
        mine = evaluate.load_stats(out / "eval" / f"seed3_SALT_DS-m16_{step}.npz")
        theirs = evaluate.load_stats(tiny_repro / "eval" / f"seed3_SALT_DS_{step}.npz")
        assert np.array_equal(mine["loss_sum"], theirs["loss_sum"])
    same = res["rows"][1]
    assert same["overlap_with_reproduction"] == 1.0
    for key in ("minus_SALT_final", "minus_BASELINE_final", "minus_SALT_at_kd"):
        assert same[key]["mean"] == res["rows"][0][key]["mean"]
    # the reproduction's row: its own SALT_DS - SALT, recomputed from its evaluations
    per_seed = [R.paired_difference(evaluate.load_stats(tiny_repro / "eval" / f"seed{seed}_SALT_DS_8.npz"),
                                    evaluate.load_stats(tiny_repro / "eval" / f"seed{seed}_SALT_8.npz"))["mean"]
                for seed in (3, 4)]
    assert res["rows"][0]["minus_SALT_final"]["per_seed"] == pytest.approx(per_seed, abs=1e-12)
    # the control: m windows of the pool, drawn without a score
    rand = np.load(out / "selections" / "random.npy")
    pool = np.load(tiny_repro / "scores.npz")["window_ids"]
    assert rand.size == 16 and np.unique(rand).size == 16 and np.isin(rand, pool).all()
    assert res["rows"][2]["zero_fraction"] != res["rows"][2]["zero_fraction"]  # no score: NaN
    table = (out / "table.md").read_text()
    assert table.count("\n| ") == 5 and "| random | " in table and "(per seed " in table
    # a re-run resumes: nothing is trained again; a new setting extends the study
    before = files(out / "runs")
    r = CliRunner().invoke(cli, argv)
    assert r.exit_code == 0, r.output
    assert files(out / "runs") == before


@pytest.mark.slow
def test_ds_study_bad_input(tmp_path, tiny_repro):
    from salt.cli.main import cli

    runner = CliRunner()
    r = runner.invoke(cli, ["ds-study", "--reproduction", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "is not a readable SALT reproduction" in r.output
    r = runner.invoke(cli, ["ds-study", "--reproduction", str(tiny_repro), "--setting", "step=3",
                            "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "has no checkpoint of step 3" in r.output and "Traceback" not in r.output
    r = runner.invoke(cli, ["ds-study", "--reproduction", str(tiny_repro), "--setting", "k=1,k=2",
                            "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "given twice" in r.output
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("user data")
    r = runner.invoke(cli, ["ds-study", "--reproduction", str(tiny_repro), "--out", str(tmp_path / "mine")])
    assert r.exit_code != 0 and (tmp_path / "mine" / "notes.txt").read_text() == "user data"
    assert not (tmp_path / "o").exists()
