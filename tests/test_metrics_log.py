"""TensorBoard event files (and W&B offline runs) next to metrics.jsonl, read back with
tensorboard's own reader (the oracle): every metrics row is a point of every curve, the phase
switch is a curve, a resumed run continues the same curves with no duplicate step, evaluation
results land in ``eval/*``; `salt train --wandb` in offline mode writes a W&B run."""
import errno
import json
import math
import os
import pathlib
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from salt.cli.main import cli
from salt.runtime.train import metrics_log
from tiny_corpus import make_tiny_corpus

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

TRAIN_CURVES = ("loss", "ce", "kd", "kl", "omega", "lr", "accuracy", "grad_norm", "tokens_per_s", "kd_phase")


def _cli(*args):
    return CliRunner().invoke(cli, [*map(str, args)], catch_exceptions=False)


def _scalars(run_dir) -> dict:
    """``{tag: [(step, value), ...]}`` of every event file under RUN/tensorboard."""
    out = {}
    for path in sorted((pathlib.Path(run_dir) / metrics_log.TB_DIR).iterdir()):
        acc = event_accumulator.EventAccumulator(str(path), size_guidance={event_accumulator.SCALARS: 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    return out


def _rows(run_dir):
    return [json.loads(line) for line in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _check_matches_metrics(run_dir):
    curves, rows = _scalars(run_dir), _rows(run_dir)
    for name in TRAIN_CURVES:
        expected = [(r["step"], (1.0 if r["phase"] == "kd" else 0.0) if name == "kd_phase" else r[name])
                    for r in rows if name == "kd_phase" or r[name] is not None]
        if not expected:  # kd / kl of a run without a KD phase: no curve
            assert f"train/{name}" not in curves
            continue
        points = curves[f"train/{name}"]
        assert [s for s, _ in points] == [s for s, _ in expected], name  # each step once, in order
        np.testing.assert_allclose([v for _, v in points], [v for _, v in expected], rtol=1e-6, err_msg=name)
    return curves


def test_event_encoding_read_back_by_tensorboard(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "phase": "kd", "loss": 2.5, "kd": None}) + "\n")
    with metrics_log.RunLog(tmp_path) as log:
        log.write({"step": 2, "phase": "standard", "loss": -1e30, "nested": {"a": 3}, "flag": True,
                   "nan": math.nan})
    metrics_log.write_eval(tmp_path, {10: {"log_ppl": 1.5, "buckets": {"hard": {"accuracy": 0.25}}}, 2: {"x": 1}})
    curves = _scalars(tmp_path)
    assert curves["train/loss"] == [(1, 2.5), (2, pytest.approx(-1e30, rel=1e-6))]
    assert curves["train/kd_phase"] == [(1, 1.0), (2, 0.0)] and curves["train/nested/a"] == [(2, 3.0)]
    assert "train/kd" not in curves and "train/flag" not in curves and "train/nan" not in curves
    assert curves["eval/log_ppl"] == [(10, 1.5)] and curves["eval/buckets/hard/accuracy"] == [(10, 0.25)]
    assert curves["eval/x"] == [(2, 1.0)]
    assert metrics_log.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from salt.data import prepare
    root = tmp_path_factory.mktemp("metrics_log")
    src = make_tiny_corpus(root / "src", n_docs=20, words=200, seed=3)
    prepare(root / "data", [src], vocab_size=300, val_fraction=0.2, progress=False)
    result = _cli("train", "--preset", "tiny-teacher", "--data", root / "data", "--out", root / "teacher",
                  "--steps", 2, "--batch", 4, "--seq-len", 8, "--optimizer", "adamw", "--quiet")
    assert result.exit_code == 0, result.output
    return root


@pytest.mark.slow
def test_train_and_resume_continue_the_same_curves(data, tmp_path):
    args = ["train", "--preset", "tiny-student", "--data", data / "data", "--out", tmp_path / "run", "--steps", 6,
            "--kd-steps", 3, "--teacher", data / "teacher", "--batch", 4, "--seq-len", 8, "--optimizer", "adamw",
            "--checkpoint-every", 2, "--quiet"]
    assert _cli(*args).exit_code == 0
    first = _check_matches_metrics(tmp_path / "run")
    assert [s for s, _ in first["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in first["train/kd_phase"]] == [1, 1, 1, 0, 0, 0]  # the switch after n_kd = 3
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["3", "6"]
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "6")  # resume from step 3: steps 4-6 again
    result = _cli(*args, "--resume")
    assert result.exit_code == 0, result.output
    again = _check_matches_metrics(tmp_path / "run")
    assert again.keys() == first.keys()
    for tag in first:
        assert [s for s, _ in again[tag]] == [s for s, _ in first[tag]], tag
        if tag != "train/tokens_per_s":  # the same (deterministic) values; tokens/s is wall-clock
            np.testing.assert_allclose([v for _, v in again[tag]], [v for _, v in first[tag]], err_msg=tag)


@pytest.mark.slow
def test_wandb_offline_writes_a_run(data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    result = _cli("train", "--preset", "tiny-student", "--data", data / "data", "--out", run, "--steps", 3,
                  "--batch", 4, "--seq-len", 8, "--optimizer", "adamw", "--quiet", "--wandb", "salt-test")
    assert result.exit_code == 0, result.output
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, list((run / "wandb").iterdir())
    records = b"".join(p.read_bytes() for p in offline[0].glob("run-*.wandb"))
    curves = _scalars(run)  # the history records name every curve TensorBoard has (W&B's binary log)
    assert len(curves) >= 8 and "train/kd" not in curves  # no KD phase here: no kd / kl values
    for tag in curves:
        assert tag.split("/", 1)[1].encode() in records, tag


def test_wandb_without_the_package_is_a_clear_error(data, tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    result = _cli("train", "--preset", "tiny-student", "--data", data / "data", "--out", tmp_path / "r",
                  "--steps", 1, "--batch", 4, "--seq-len", 8, "--quiet", "--wandb", "p")
    assert result.exit_code != 0 and "wandb" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_reproduce_opens_in_tensorboard_with_every_curve(tmp_path):
    """`salt reproduce --tiny`: every run (SLM and the four variants) has every training curve,
    equal to its metrics.jsonl, and the evaluation curves at its kept checkpoints."""
    from salt.data import prepare
    src = make_tiny_corpus(tmp_path / "src")
    for f in sorted(src.iterdir()):  # sentences, for the last-word task
        words = f.read_text().split()
        f.write_text(" ".join(w + "." * (i % 9 == 8) for i, w in enumerate(words)) + "\n")
    prepare(tmp_path / "data", [src], vocab_size=300, val_fraction=0.2, progress=False)
    out = tmp_path / "rep"
    env = {"SALT_COMPILE_CACHE": os.environ.get("SALT_COMPILE_CACHE", "off")}
    result = CliRunner(env=env).invoke(cli, ["reproduce", "--tiny", "--data", str(tmp_path / "data"), "--out",
                                             str(out), "--quiet", "--sequential"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    runs = sorted(p for p in (out / "runs").iterdir() if (p / "metrics.jsonl").exists())
    assert {p.name.split("-")[0] for p in runs} >= {"SLM", "BASELINE", "RKD", "SALT", "SALT_DS"}, runs
    for run in runs:
        curves = _check_matches_metrics(run)
        if not run.name.startswith(("SLM", "BASELINE")):
            assert curves["train/kd"] and 1.0 in [v for _, v in curves["train/kd_phase"]], run
        assert curves["eval/log_ppl"] and curves["eval/accuracy"], run
        assert {s for s, _ in curves["eval/log_ppl"]} <= {s for s, _ in curves["train/loss"]}


def test_a_full_disk_while_writing_metrics_names_the_file(tmp_path):
    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

        def close(self):
            pass

    with metrics_log.MetricsSink(tmp_path, 0) as sink:
        sink._file = Full()
        with pytest.raises(OSError) as info:
            sink.write([{"step": 1, "loss": 1.0}])
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "metrics.jsonl")
