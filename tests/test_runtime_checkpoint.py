"""Checkpoints: orbax round trip, path resolution, keep policy, and interruption —
SIGTERM saves and exits 0, SIGKILL + --resume ends bit-identical to an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from salt.reference.config import get_preset
from salt.runtime.model import checkpoint, transformer as model
from salt.runtime.train import optim
from salt.runtime.train.trainer import TrainConfig, train


def _tree_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()  # bit-identical


@pytest.fixture
def saved(tmp_path):
    config = get_preset("tiny-student")
    params = model.init_params(config, 0)
    opt = optim.make_direction("adafactor")
    state = opt.init(params)
    # one update so the state is not all zeros
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
    _, state = opt.update(grads, state, params)
    meta = {"config": config.to_dict(), "tokenizer_sha256": "ab" * 32, "teacher": None}
    for step in (2, 4, 6):
        checkpoint.save(tmp_path / "run", step, params, state, meta, keep={2})
    return tmp_path / "run", config, params, state


def test_round_trip_is_bit_exact(saved):
    run, config, params, state = saved
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), (params, state))
    p2, s2, meta = checkpoint.restore(run, 6, *abstract)
    _tree_equal(p2, params)
    _tree_equal(s2, state)
    assert meta["step"] == 6 and meta["tokenizer_sha256"] == "ab" * 32


def test_keep_policy_and_latest(saved):
    run = saved[0]
    assert checkpoint.all_steps(run) == [2, 6]  # 4 deleted, 2 kept on request, 6 newest
    assert checkpoint.latest_step(run) == 6
    assert checkpoint.latest_step(run.parent / "nothing") is None


def test_load_params_from_run_dir_checkpoints_dir_or_step_dir(saved):
    run, config, params, _ = saved
    for path, step in [(run, None), (run / "checkpoints", None), (run / "checkpoints" / "2", None),
                       (run, 2)]:
        cfg, p, meta = checkpoint.load_params(path, step)
        assert cfg == config
        _tree_equal(p, params)
        assert meta["step"] == (6 if step is None and path != run / "checkpoints" / "2" else 2)


def test_resolve_errors(saved, tmp_path):
    run = saved[0]
    with pytest.raises(ValueError, match="does not exist"):
        checkpoint.resolve(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no checkpoint found"):
        checkpoint.resolve(tmp_path / "empty")
    with pytest.raises(ValueError, match="no checkpoint of step 3.*\\[2, 6\\]"):
        checkpoint.resolve(run, 3)
    with pytest.raises(ValueError, match="not step 6"):
        checkpoint.resolve(run / "checkpoints" / "2", 6)


# ----------------------------------------------------------------------------- interruption
STEPS = 40


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from salt.data import prepare
    root = tmp_path_factory.mktemp("ckpt")
    rng = np.random.default_rng(0)
    src = root / "src"
    src.mkdir()
    syllables = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "de", "fa", "gu", "zi"]
    for i in range(20):
        words = (" ".join("".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(200)))
        (src / f"d{i}.txt").write_text(words + "\n")
    prepare(root / "data", [src], vocab_size=300, val_fraction=0.2, progress=False)
    return root / "data"


def _args(store, out):
    return ["--preset", "tiny-teacher", "--data", str(store), "--out", str(out), "--steps",
            str(STEPS), "--batch", "4", "--seq-len", "8", "--optimizer", "adamw", "--lr", "1e-2",
            "--checkpoint-every", "2", "--no-progress"]


def _config(store, out, resume=False):
    return TrainConfig(preset="tiny-teacher", data=str(store), out=str(out), steps=STEPS, batch=4,
                       seq_len=8, optimizer="adamw", lr=1e-2, checkpoint_every=2, resume=resume)


def _start(args):
    return subprocess.Popen([sys.executable, "-m", "salt.cli.main", "train", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ))


def _wait_for_checkpoint(proc, run, after: int, timeout=300):
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        latest = checkpoint.latest_step(run)
        if latest is not None and latest > after:
            return latest
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"training exited early ({proc.returncode}): {err.decode()[-2000:]}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail("no checkpoint appeared in time")


@pytest.mark.slow
def test_sigterm_then_sigkill_then_resume_is_bit_identical(store, tmp_path):
    run = tmp_path / "interrupted"
    # 1. SIGTERM: saves a checkpoint at the current step and exits 0
    proc = _start(_args(store, run))
    _wait_for_checkpoint(proc, run, after=0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    stopped = checkpoint.latest_step(run)
    assert stopped < STEPS, "the run finished before SIGTERM arrived; make it longer"
    assert "interrupted" in out.decode()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == stopped  # the checkpoint is the last completed step

    # 2. resume, then SIGKILL (no chance to save) after at least one more checkpoint
    proc = _start(_args(store, run) + ["--resume"])
    _wait_for_checkpoint(proc, run, after=stopped)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    killed_at = checkpoint.latest_step(run)
    assert stopped < killed_at < STEPS, "the run finished before SIGKILL arrived; make it longer"

    # 3. resume to the end (in process) and compare with an uninterrupted run
    summary = train(_config(store, run, resume=True), progress=False)
    assert summary["start_step"] == killed_at and summary["last_step"] == STEPS
    train(_config(store, tmp_path / "straight"), progress=False)
    _, p_resumed, _ = checkpoint.load_params(run)
    _, p_straight, _ = checkpoint.load_params(tmp_path / "straight")
    _tree_equal(p_resumed, p_straight)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    straight = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # no duplicated steps
    assert [r["loss"] for r in rows] == [r["loss"] for r in straight]
