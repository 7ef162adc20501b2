"""``salt teacher cache`` and ``salt train --teacher-cache``: the cached-teacher KD run equals the
online top-k KD run over 20 steps; kill -9 during a build, then resume, gives byte-identical files;
a cache that does not match the run is refused, naming the mismatch."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from salt.cli.main import cli
from tiny_corpus import make_tiny_corpus

REPO = pathlib.Path(__file__).resolve().parent.parent
K, STEPS, BATCH, SEQ = 8, 20, 4, 8


def _cli(*args):
    return CliRunner().invoke(cli, [*map(str, args)], catch_exceptions=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from salt.data import prepare
    root = tmp_path_factory.mktemp("teacher_cache")
    src = make_tiny_corpus(root / "src", n_docs=20, words=200, seed=3)
    prepare(root / "data", [src], vocab_size=300, val_fraction=0.2, progress=False)
    result = _cli("train", "--preset", "tiny-teacher", "--data", root / "data", "--out", root / "teacher",
                  "--steps", 2, "--batch", BATCH, "--seq-len", SEQ, "--optimizer", "adamw", "--quiet")
    assert result.exit_code == 0, result.output
    return root


def _cache_args(root, out, steps=STEPS, *extra):
    return ["teacher", "cache", "--teacher", root / "teacher", "--data", root / "data", "--top-k", K,
            "--steps", steps, "--batch", BATCH, "--seq-len", SEQ, "--out", out, "--quiet", *extra]


def _student(root, out, *extra):
    return _cli("train", "--preset", "tiny-student", "--data", root / "data", "--out", root / out,
                "--steps", STEPS, "--kd-steps", STEPS, "--kd-topk", K, "--batch", BATCH, "--seq-len", SEQ,
                "--optimizer", "adamw", "--lr", "1e-2", "--quiet", *extra)


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_cached_kd_equals_online_topk_kd(setup):
    root = setup
    result = _cli(*_cache_args(root, root / "cache32", STEPS, "--values-dtype", "float32"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["bytes_per_token"] == K * (4 + 2) + 4
    assert _student(root, "online", "--teacher", root / "teacher").exit_code == 0
    result = _student(root, "cached", "--teacher-cache", root / "cache32")
    assert result.exit_code == 0, result.output
    online, cached = _metrics(root / "online"), _metrics(root / "cached")
    assert len(online) == len(cached) == STEPS
    for a, b in zip(online, cached):
        for key in ("loss", "ce", "kd", "kl", "accuracy", "grad_norm"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=f"step {a['step']} {key}")
    # the default bfloat16 storage: the same run within the bf16 tolerance
    assert _cli(*_cache_args(root, root / "cache16")).exit_code == 0
    assert _student(root, "cached16", "--teacher-cache", root / "cache16").exit_code == 0
    for a, b in zip(online, _metrics(root / "cached16")):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=2e-2, err_msg=f"step {a['step']}")


@pytest.mark.parametrize("extra, message", [
    (["--batch", 2], "batch"), (["--seed", 1], "seed"), (["--kd-topk", K + 1], "--kd-topk"),
    (["--seq-len", 4], "seq_len"), (["--steps", STEPS + 1, "--kd-steps", STEPS + 1], "KD steps")])
def test_mismatched_cache_is_refused(setup, extra, message):
    root = setup
    if not (root / "cache32").exists():
        assert _cli(*_cache_args(root, root / "cache32", STEPS, "--values-dtype", "float32")).exit_code == 0
    args = ["train", "--preset", "tiny-student", "--data", root / "data", "--out", root / "refused",
            "--steps", STEPS, "--kd-steps", STEPS, "--kd-topk", K, "--batch", BATCH, "--seq-len", SEQ,
            "--quiet", "--teacher-cache", root / "cache32"]
    for flag in extra[::2]:  # the later value of a repeated option wins in click; drop the base one
        i = args.index(flag) if flag in args else None
        if i is not None:
            del args[i:i + 2]
    result = _cli(*args, *extra)
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output and not (root / "refused").exists()


def test_kill_during_build_then_resume_is_byte_identical(setup, tmp_path):
    root = setup
    steps = 400
    fresh, killed = tmp_path / "fresh", tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    command = [sys.executable, "-c", "from salt.cli.main import cli; cli()"]
    proc = subprocess.Popen(command + list(map(str, _cache_args(root, killed, steps))), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while not (killed / "step_000003.lse.npy").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the build never got going"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not json.loads((killed / "cache.json").read_text())["complete"], "killed too late"
    assert not (killed / f"step_{steps:06d}.lse.npy").exists()
    assert _cli(*_cache_args(root, killed, steps)).exit_code == 0  # resume
    assert _cli(*_cache_args(root, fresh, steps)).exit_code == 0
    names = sorted(p.name for p in fresh.iterdir())
    assert names == sorted(p.name for p in killed.iterdir())  # no temporary file left behind
    assert len(names) == 3 * steps + 1
    for name in names:
        assert (fresh / name).read_bytes() == (killed / name).read_bytes(), name
    # a different build into the same directory is refused
    result = _cli(*_cache_args(root, fresh, steps, "--seed", 5))
    assert result.exit_code != 0 and "seed" in result.output
