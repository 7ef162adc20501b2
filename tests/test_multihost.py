"""Multi-host training on one machine: two processes (``jax.distributed`` with a coordinator on
127.0.0.1, 2 CPU devices each, gloo collectives) train a tiny KD run.

* the two-process losses equal a one-process run on 4 devices (same ``data=4`` mesh);
* each process loads only its own half of every batch (the loader's process share);
* checkpoints are written once and restore into a different process count, both ways;
* a pair killed with SIGKILL mid-run resumes from its last checkpoint and continues the
  same trajectory.

Every subprocess runs under a deadline (killed with its process group when it passes), so a
hung collective can never stall the suite; only loopback addresses are used.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from salt.runtime.model import checkpoint
from salt.runtime.train.trainer import TrainConfig, train
from tiny_corpus import make_tiny_corpus

pytestmark = pytest.mark.slow

STEPS, KD_STEPS, EVERY, BATCH, SEQ = 24, 6, 4, 8, 16
PAIR_TIMEOUT_S = 600  # per two-process run (about 1-2 min on an idle 2-core host)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(tiny, out, *extra):
    return ["train", "--preset", "tiny-student", "--data", tiny["data"], "--out", str(out),
            "--teacher", tiny["teacher"], "--kd-steps", str(KD_STEPS), "--steps", str(STEPS),
            "--batch", str(BATCH), "--seq-len", str(SEQ), "--optimizer", "adamw", "--lr", "3e-3",
            "--final-lr", "3e-4", "--mesh", "data=4", "--checkpoint-every", str(EVERY),
            "--keep", "4,12", "--no-progress", *extra]


def _start_pair(args, log_dir):
    """Two ``salt`` processes forming one 4-device JAX job (2 CPU devices each)."""
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS="--xla_force_host_platform_device_count=2",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(pid))
        log = open(log_dir / f"process{pid}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "salt.cli.main", *args], env=env,
                                      stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
        log.close()
    return procs


def _kill(procs):
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    for p in procs:
        p.wait(timeout=30)


def _wait_pair(procs, log_dir, timeout=PAIR_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        _kill(procs)
        pytest.fail(f"the two-process run did not finish in {timeout} s:\n" + _logs(log_dir))
    if any(p.returncode for p in procs):
        pytest.fail(f"a process failed (exit codes {[p.returncode for p in procs]}):\n" + _logs(log_dir))


def _logs(log_dir):
    return "\n".join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted(log_dir.glob("*.log")))


def _run_pair(tiny, out, *extra):
    log_dir = tiny["root"] / f"logs-{out.name}"
    log_dir.mkdir(exist_ok=True)
    _wait_pair(_start_pair(_train_args(tiny, out, *extra), log_dir), log_dir)


def _cfg(tiny, out, **kw):
    return TrainConfig(preset="tiny-student", data=tiny["data"], out=str(out), teacher=tiny["teacher"],
                       kd_steps=KD_STEPS, steps=STEPS, batch=BATCH, seq_len=SEQ, optimizer="adamw",
                       lr=3e-3, final_lr=3e-4, mesh="data=4", checkpoint_every=EVERY,
                       keep_checkpoints=(4, 12), **kw)


def _metrics(run_dir):
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def _assert_same_run(a_rows, b_rows, steps):
    a = {r["step"]: r for r in a_rows}
    b = {r["step"]: r for r in b_rows}
    for step in steps:
        for key in ("loss", "ce", "kd", "accuracy", "grad_norm"):
            x, y = a[step][key], b[step][key]
            if x is None or y is None:
                assert x is y, (step, key, x, y)
            else:
                assert abs(x - y) <= 1e-6 * max(1.0, abs(x)), (step, key, x, y)


def _copy_until(src, dst, step):
    """A copy of run ``src`` as it was when checkpoint ``step`` was its latest."""
    shutil.copytree(src, dst)
    for s in checkpoint.all_steps(dst):
        if s > step:
            shutil.rmtree(checkpoint.checkpoint_root(dst) / str(s))
    return dst


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Token store, a 2-step teacher, and the one-process 4-device reference run."""
    from salt.data import prepare
    assert jax.device_count() >= 4  # tests/conftest.py gives this process 8 CPU devices
    root = tmp_path_factory.mktemp("multihost")
    prepare(root / "data", [make_tiny_corpus(root / "src", n_docs=30, words=200)], vocab_size=300,
            val_fraction=0.2, progress=False)
    train(TrainConfig(preset="tiny-teacher", data=str(root / "data"), out=str(root / "teacher"),
                      steps=2, batch=BATCH, seq_len=SEQ, optimizer="adamw", lr=1e-2), progress=False)
    t = {"root": root, "data": str(root / "data"), "teacher": str(root / "teacher")}
    train(_cfg(t, root / "one"), progress=False)
    t["one"] = root / "one"
    return t


@pytest.fixture(scope="module")
def pair_run(tiny):
    out = tiny["root"] / "two"
    _run_pair(tiny, out)
    return out


def test_two_processes_equal_one_process(tiny, pair_run):
    one, two = _metrics(tiny["one"]), _metrics(pair_run)
    assert [r["step"] for r in two] == list(range(1, STEPS + 1))  # written once, by process 0
    assert [r["phase"] for r in two] == [r["phase"] for r in one]
    _assert_same_run(one, two, range(1, STEPS + 1))
    assert one[-1]["loss"] < one[0]["loss"]  # it trained
    # the same checkpoints, one directory each, nothing left half-written
    assert checkpoint.all_steps(pair_run) == checkpoint.all_steps(tiny["one"])
    assert sorted((p.name for p in checkpoint.checkpoint_root(pair_run).iterdir()), key=int) == \
        [str(s) for s in checkpoint.all_steps(pair_run)]
    _, p_one, _ = checkpoint.load_params(tiny["one"])
    _, p_two, meta = checkpoint.load_params(pair_run)
    assert meta["step"] == STEPS
    for a, b in zip(jax.tree.leaves(p_one), jax.tree.leaves(p_two)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_each_process_loads_only_its_share(tiny):
    """The loader the trainer builds gives process i rows [i B/2, (i+1) B/2) of each batch."""
    from salt.data import Loader, TokenStore
    store = TokenStore(tiny["data"])
    common = dict(seq_len=SEQ, global_batch=BATCH, seed=0, split="train")
    whole = Loader(store, process_index=0, process_count=1, **common)
    halves = [Loader(store, process_index=i, process_count=2, **common) for i in range(2)]
    for step in (0, 1, 17):
        parts = [h.batch(step) for h in halves]
        assert all(p.shape == (BATCH // 2, SEQ + 1) for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), whole.batch(step))
        np.testing.assert_array_equal(np.concatenate([h.local_window_ids(step) for h in halves]),
                                      whole.window_ids(step))


def test_two_process_checkpoint_resumes_in_one_process(tiny, pair_run):
    out = _copy_until(pair_run, tiny["root"] / "two_then_one", 12)
    summary = train(_cfg(tiny, out, resume=True), progress=False)
    assert summary["start_step"] == 12 and summary["last_step"] == STEPS
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    _assert_same_run(_metrics(tiny["one"]), rows, range(13, STEPS + 1))


def test_one_process_checkpoint_resumes_in_two_processes(tiny):
    out = _copy_until(tiny["one"], tiny["root"] / "one_then_two", 4)  # still in the KD phase
    _run_pair(tiny, out, "--resume")
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    _assert_same_run(_metrics(tiny["one"]), rows, range(5, STEPS + 1))


def test_killed_pair_resumes_from_its_last_checkpoint(tiny):
    out = tiny["root"] / "killed"
    log_dir = tiny["root"] / "logs-killed"
    log_dir.mkdir()
    procs = _start_pair(_train_args(tiny, out), log_dir)
    deadline = time.monotonic() + PAIR_TIMEOUT_S
    try:
        while not checkpoint.all_steps(out):  # kill -9 both as soon as the first checkpoint is complete
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                pytest.fail("the pair ended or stalled before its first checkpoint:\n" + _logs(log_dir))
            time.sleep(0.02)
    finally:
        _kill(procs)
    saved = checkpoint.all_steps(out)
    assert saved and saved[-1] < STEPS, f"the pair was not killed mid-run (checkpoints {saved})"
    _run_pair(tiny, out, "--resume")
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # metrics past the checkpoint replaced
    _assert_same_run(_metrics(tiny["one"]), rows, range(saved[-1] + 1, STEPS + 1))
    assert checkpoint.all_steps(out) == checkpoint.all_steps(tiny["one"])
