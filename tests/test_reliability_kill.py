"""kill -9 campaign (issue 10): a training run is SIGKILLed at random times (during start-up,
steps, checkpoint saves and deletions) at least 20 times, resumed each time, and must end
bit-identical to an uninterrupted run, with every metrics step exactly once.

Processes share a JAX persistent compilation cache, so a restart loads the compiled steps
instead of compiling them again."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from salt.runtime.model import checkpoint
from tiny_corpus import make_tiny_corpus

KILLS = 20
STEPS = 400


def _args(store, out):
    return ["train", "--preset", "tiny-teacher", "--data", str(store), "--out", str(out), "--steps",
            str(STEPS), "--batch", "4", "--seq-len", "8", "--optimizer", "adamw", "--lr", "1e-2",
            "--checkpoint-every", "3", "--no-progress", "--resume"]


def _metric_lines(out):
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


@pytest.mark.slow
def test_kill_9_campaign_resumes_bit_identically(tmp_path):
    from salt.data import prepare
    src = make_tiny_corpus(tmp_path / "src", n_docs=20, words=200, seed=6)
    store = tmp_path / "data"
    prepare(store, [src], vocab_size=300, val_fraction=0.2, progress=False)
    env = dict(os.environ, SALT_COMPILE_CACHE=str(tmp_path / "jax-cache"))  # salt train --compile-cache
    rng = random.Random(10)
    run = tmp_path / "run"
    kills, phases = 0, {"start-up": 0, "training": 0}
    while kills < KILLS:
        proc = subprocess.Popen([sys.executable, "-m", "salt.cli.main", *_args(store, run)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        if kills % 4 == 3:  # a kill at a random moment of start-up
            time.sleep(rng.uniform(0.2, 3.0))
            phases["start-up"] += 1
        else:  # a kill at a random moment after training resumed (steps, saves, deletions)
            seen = _metric_lines(run)
            deadline = time.monotonic() + 300
            while _metric_lines(run) <= seen and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.6))
            phases["training"] += 1
        if proc.poll() is not None:
            pytest.fail(f"the run ended before kill {kills + 1} (make STEPS larger): "
                        f"{proc.stderr.read().decode()[-2000:]}")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stderr.close()
        kills += 1
    assert _metric_lines(run) < STEPS
    final = subprocess.run([sys.executable, "-m", "salt.cli.main", *_args(store, run)],
                           capture_output=True, env=env, timeout=900)
    assert final.returncode == 0, final.stderr.decode()[-2000:]
    straight = tmp_path / "straight"
    args = _args(store, straight)
    args[args.index("--checkpoint-every") + 1] = "0"
    done = subprocess.run([sys.executable, "-m", "salt.cli.main", *args[:-1]], capture_output=True,
                          env=env, timeout=900)
    assert done.returncode == 0, done.stderr.decode()[-2000:]

    _, p_run, m_run = checkpoint.load_params(run)
    _, p_straight, _ = checkpoint.load_params(straight)
    assert m_run["step"] == STEPS
    for a, b in zip(jax.tree.leaves(p_run), jax.tree.leaves(p_straight)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    straight_rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows] == [r["loss"] for r in straight_rows]
    assert checkpoint.intact_steps(run) == checkpoint.all_steps(run)
    assert not (run / checkpoint.TRASH).exists()
    print(f"kill -9 campaign: {kills} kills ({phases}), resumed bit-identically to step {STEPS}")
