"""The committed golden values: they recompute without drift, load without pickle, stay small,
and the checker really detects drift."""
import json
import math
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from salt.reference import golden
from salt.reference.config import ModelConfig
from salt.reference.model import forward


def test_committed_golden_files_recompute_without_drift(golden_dir):
    rows = golden.check(golden_dir, progress=False)
    bad = [r for r in rows if not r.ok]
    assert not bad, bad[:10]
    assert {r.file for r in rows} == set(golden.golden_files())


def test_golden_files_are_small_and_pickle_free(golden_dir):
    total = 0
    for name in golden.golden_files():
        path = golden_dir / name
        total += path.stat().st_size
        with np.load(path, allow_pickle=False) as f:
            for key in f.files:
                a = f[key]
                assert a.dtype.kind in "fiub" or (a.dtype.kind == "U" and key.endswith("_json")), key
                if a.dtype.kind == "f":
                    assert a.dtype == np.float64, key
    assert total < 2_000_000


def test_golden_files_are_self_consistent(golden_dir):
    with np.load(golden_dir / "losses.npz", allow_pickle=False) as f:
        for c in ("v37", "v1000", "big"):
            omegas, mask = f[f"{c}/omegas"], f[f"{c}/mask"]
            assert np.isfinite(f[f"{c}/kd_grad"]).all() and np.isfinite(f[f"{c}/kd_loss"]).all()
            for i, w in enumerate(omegas):
                if w == 0:
                    np.testing.assert_allclose(f[f"{c}/kd_loss"][i], f[f"{c}/ce_loss"], rtol=1e-12)
            assert (f[f"{c}/kd_loss"][:, ~mask] == 0).all()
            np.testing.assert_allclose(f[f"{c}/kd_grad"].sum(-1), 0, atol=1e-9)
    with np.load(golden_dir / "score.npz", allow_pickle=False) as f:
        from salt.reference.score import selection_score
        for i, k in enumerate(f["ks"]):
            for mode in ("zero", "exclude"):
                want = selection_score(f["teacher_logits"], f["targets"], int(k), mode, f["mask"])
                np.testing.assert_allclose(want, f[f"scores_{mode}"][i], rtol=1e-12, atol=0)
    for name in ("model_mqa_causal", "model_gqa_prefix", "model_mha_prefix"):
        with np.load(golden_dir / f"{name}.npz", allow_pickle=False) as f:
            config = ModelConfig.from_dict(json.loads(str(f["config_json"])))
            B, T = f["tokens"].shape
            assert f["logits"].shape == (B, T, config.vocab_size)
            np.testing.assert_array_equal(f["window"][:, :-1], f["tokens"])
            np.testing.assert_array_equal(f["window"][:, 1:], f["labels"])
            params = golden.load_params(f, "param")
            # float64 matmuls: OpenBLAS picks its kernel (and so its summation order) by CPU,
            # so the recomputed logits agree to rounding (~1e-14), not bit for bit, across machines.
            np.testing.assert_allclose(
                forward(params, f["tokens"], config, f["prefix_len"]), f["logits"], rtol=1e-12, atol=1e-13)
            w = float(f["kd/omega"])
            assert math.isclose(float(f["kd/loss"]), (1 - w) * float(f["kd/ce"]) + w * float(f["kd/kd"]),
                                rel_tol=1e-12)
            np.testing.assert_allclose(f["hidden"] @ f["param/embed"].T, f["logits"], rtol=1e-12)
    with np.load(golden_dir / "train.npz", allow_pickle=False) as f:
        assert f["adamw/loss"][-1] < f["adamw/loss"][0] and f["sgd/loss"][-1] < f["sgd/loss"][0]
        assert (f["adamw/omega"][:4] == 0.667).all() and (f["adamw/omega"][4:] == 0).all()


def test_check_reports_drift_missing_and_extra_keys(tmp_path, golden_dir):
    shutil.copy(golden_dir / "schedule.npz", tmp_path / "schedule.npz")
    assert all(r.ok for r in golden.check(tmp_path, ["schedule.npz"], progress=False))
    with np.load(tmp_path / "schedule.npz", allow_pickle=False) as f:
        arrays = dict(f)
    arrays["lr/paper"] = arrays["lr/paper"] * (1 + 1e-9)
    arrays["extra"] = np.zeros(2)
    del arrays["omega/linear"]
    golden.write_npz_atomic(tmp_path / "schedule.npz", arrays)
    rows = {r.key: r for r in golden.check(tmp_path, ["schedule.npz"], progress=False)}
    assert not rows["lr/paper"].ok and 5e-10 < rows["lr/paper"].max_rel < 2e-9
    assert not rows["extra"].ok and not rows["omega/linear"].ok
    assert rows["steps"].ok
    missing = golden.check(tmp_path, ["score.npz"], progress=False)
    assert len(missing) == 1 and not missing[0].ok and "missing" in missing[0].note
    assert not list(tmp_path.glob(".*tmp"))  # no temporary leftovers


def test_compare_arrays_rules():
    ok = golden.compare_arrays(np.array([1.0, 2.0 + 1e-13]), np.array([1.0, 2.0]), 1e-12)
    assert ok[2] and ok[1] == pytest.approx(1e-13 / 2, rel=1e-2)
    assert not golden.compare_arrays(np.array([1.0, 2.1]), np.array([1.0, 2.0]), 1e-12)[2]
    assert not golden.compare_arrays(np.zeros(3), np.zeros(2), 1e-12)[2]
    assert not golden.compare_arrays(np.array([1, 2]), np.array([1, 3]), 1e-12)[2]
    assert golden.compare_arrays(np.array([-np.inf, 1.0]), np.array([-np.inf, 1.0]), 1e-12)[2]
    assert not golden.compare_arrays(np.array([0.0, 1.0]), np.array([-np.inf, 1.0]), 1e-12)[2]
    assert golden.compare_arrays(np.array([np.nan]), np.array([np.nan]), 1e-12)[2]


def test_cli_generate_and_check(tmp_path, golden_dir):
    from salt.cli.main import cli

    runner = CliRunner()
    r = runner.invoke(cli, ["golden", "generate", "--dir", str(tmp_path), "--only", "schedule.npz"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "schedule.npz").is_file()
    r = runner.invoke(cli, ["golden", "check", "--dir", str(tmp_path), "--only", "schedule.npz"])
    assert r.exit_code == 0 and "all golden values match" in r.output, r.output
    with np.load(tmp_path / "schedule.npz", allow_pickle=False) as f:
        arrays = dict(f)
    arrays["omega/step"] = arrays["omega/step"] + 1e-6
    golden.write_npz_atomic(tmp_path / "schedule.npz", arrays)
    r = runner.invoke(cli, ["golden", "check", "--dir", str(tmp_path), "--only", "schedule.npz"])
    assert r.exit_code != 0 and "DRIFT" in r.output and "omega/step" in r.output
    assert "Traceback" not in r.output
    r = runner.invoke(cli, ["golden", "check", "--dir", str(tmp_path / "nope")])
    assert r.exit_code != 0 and "does not exist" in r.output
    r = runner.invoke(cli, ["golden", "check", "--dir", str(tmp_path), "--only", "bogus.npz"])
    assert r.exit_code != 0 and "bogus.npz" in r.output
    assert golden.find_golden_dir(golden_dir.parent.parent) == golden_dir


@pytest.mark.parametrize("content", ["truncated", "garbage", "npy"])
def test_unreadable_golden_file_is_reported_not_a_traceback(tmp_path, golden_dir, content):
    from salt.cli.main import cli

    data = (golden_dir / "schedule.npz").read_bytes()
    if content == "npy":
        np.save(tmp_path / "schedule.npy", np.zeros(3))
        (tmp_path / "schedule.npy").rename(tmp_path / "schedule.npz")
    else:
        (tmp_path / "schedule.npz").write_bytes(data[:len(data) // 2] if content == "truncated"
                                                 else b"not an npz file\n")
    rows = golden.check(tmp_path, ["schedule.npz"], progress=False)
    assert len(rows) == 1 and not rows[0].ok and "unreadable" in rows[0].note
    r = CliRunner().invoke(cli, ["golden", "check", "--dir", str(tmp_path), "--only", "schedule.npz"])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    assert "DRIFT" in r.output and "unreadable" in r.output and "Traceback" not in r.output
