"""Verified checkpoints (issue 10): a manifest of content hashes written last; truncated, partial,
bit-flipped or half-deleted steps are reported by path and skipped in favour of the newest
intact one (resume, teacher, eval, score); resume after such damage is bit-identical and never
stuck; the teacher of a KD run is pinned; time-based checkpoints; SIGINT saves."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from salt.reference.config import get_preset
from salt.runtime.model import checkpoint, transformer as model
from salt.runtime.train import optim
from salt.runtime.train.trainer import TrainConfig, TrainError, train
from tiny_corpus import make_tiny_corpus


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    return all(np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(la, lb))


@pytest.fixture
def saved(tmp_path):
    config = get_preset("tiny-student")
    states = {}
    for step in (2, 4, 6):
        params = model.init_params(config, step)  # different parameters per step
        state = optim.make_direction("adafactor").init(params)
        meta = {"config": config.to_dict(), "tokenizer_sha256": "ab" * 32, "teacher": None}
        checkpoint.save(tmp_path / "run", step, params, state, meta, keep=None)
        states[step] = params
    return tmp_path / "run", states


def _data_files(run, step):
    return [f for f in sorted((run / "checkpoints" / str(step)).rglob("*"))
            if f.is_file() and f.parent.name == "d"]


def _damage(run, step, how):
    d = run / "checkpoints" / str(step)
    if how == "truncate":
        f = _data_files(run, step)[0]
        f.write_bytes(f.read_bytes()[:-7])
    elif how == "bitflip":
        f = _data_files(run, step)[0]
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x10
        f.write_bytes(bytes(data))
    elif how == "missing-item":
        import shutil
        shutil.rmtree(d / "opt_state")
    elif how == "no-manifest":  # killed after orbax finished, before the manifest
        (d / checkpoint.MANIFEST).unlink()
    elif how == "half-deleted":  # what a kill in the middle of a plain rmtree leaves
        import shutil
        shutil.rmtree(d / "params")
    return d


def test_manifest_is_written_last_and_verifies(saved):
    run, _ = saved
    for step in (2, 4, 6):
        manifest = json.loads((run / "checkpoints" / str(step) / checkpoint.MANIFEST).read_text())
        assert manifest["files"] and all(len(v["sha256"]) == 64 for v in manifest["files"].values())
        assert checkpoint.verify(run, step) == checkpoint.manifest_sha256(run / "checkpoints" / str(step))


@pytest.mark.parametrize("how", ["truncate", "bitflip", "missing-item", "no-manifest", "half-deleted"])
def test_damaged_latest_is_reported_and_skipped(saved, how, capsys):
    run, states = saved
    d = _damage(run, 6, how)
    with pytest.raises(checkpoint.CorruptCheckpoint, match=str(d)):
        checkpoint.verify(run, 6)
    assert checkpoint.resolve(run) == (run, 4)
    assert str(d) in capsys.readouterr().err  # reported by path
    config, params, meta = checkpoint.load_params(run)  # teacher / eval / score path
    assert meta["step"] == 4 and _leaves_equal(params, states[4])
    with pytest.raises(checkpoint.CorruptCheckpoint, match=str(d)):  # an explicit step is never swapped
        checkpoint.load_params(run, 6)
    assert checkpoint.intact_steps(run) == [2, 4]


def test_deletion_is_atomic(saved, monkeypatch):
    run, _ = saved
    import shutil
    real = shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # killed while deleting step 2
        checkpoint._delete_step(run, 2)
    monkeypatch.setattr(shutil, "rmtree", real)
    assert checkpoint.all_steps(run) == [4, 6]  # the half-deleted step is gone from checkpoints/
    assert (run / checkpoint.TRASH).is_dir()
    checkpoint.empty_trash(run)
    assert not (run / checkpoint.TRASH).exists()


def test_last_good_checkpoint_means_verified(saved):
    from salt.runtime.train.run_dir import verified_or_none
    run, _ = saved
    _damage(run, 6, "bitflip")
    assert verified_or_none(run, 6) is None and verified_or_none(run, 4) == 4


# ----------------------------------------------------------------------------- training runs

@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from salt.data import prepare
    root = tmp_path_factory.mktemp("relckpt")
    src = make_tiny_corpus(root / "src", n_docs=20, words=200, seed=5)
    prepare(root / "data", [src], vocab_size=300, val_fraction=0.2, progress=False)
    return root / "data"


def _cfg(store, out, **kw):
    base = dict(preset="tiny-teacher", data=str(store), out=str(out), steps=4, batch=4, seq_len=8,
                optimizer="adamw", lr=1e-2, checkpoint_every=1, keep_checkpoints=(1, 2, 3, 4))
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def straight(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    train(_cfg(store, out), progress=False)
    return out


@pytest.mark.slow
def test_resume_after_a_damaged_checkpoint_is_bit_identical_and_not_stuck(store, straight, tmp_path, capsys):
    run = tmp_path / "run"
    train(_cfg(store, run), progress=False)
    d = _damage(run, 4, "bitflip")
    for attempt in range(2):  # the retry must work too (no "step 4 already exists")
        summary = train(_cfg(store, run, resume=True), progress=False)
        assert summary["last_step"] == 4
        assert summary["start_step"] == (3 if attempt == 0 else 4)
    assert str(d) in capsys.readouterr().err
    assert list((run / checkpoint.CORRUPT).rglob(checkpoint.MANIFEST))  # kept aside, not deleted
    _, p_run, _ = checkpoint.load_params(run)
    _, p_straight, _ = checkpoint.load_params(straight)
    assert _leaves_equal(p_run, p_straight)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


@pytest.mark.slow
def test_time_based_checkpoints_and_garbage_metrics_line(store, tmp_path, capsys):
    run = tmp_path / "run"
    train(_cfg(store, run, checkpoint_every=0, checkpoint_minutes=1e-9), progress=False)
    assert checkpoint.all_steps(run) == [1, 2, 3, 4]  # every step passed the (tiny) interval
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.0')  # a line cut short by a kill
    capsys.readouterr()
    train(_cfg(store, run, resume=True), progress=False)
    assert f"{run / 'metrics.jsonl'}:5: not a metrics record" in capsys.readouterr().err


@pytest.mark.slow
def test_kd_resume_uses_the_pinned_teacher_or_refuses(store, straight, tmp_path):
    import shutil
    teacher = tmp_path / "teacher"
    shutil.copytree(straight, teacher)
    student = tmp_path / "student"
    kd = dict(preset="tiny-student", teacher=str(teacher), kd_steps=4, steps=4)
    train(_cfg(store, student, **kd), progress=False)
    meta = checkpoint.read_meta(student)
    assert meta["teacher"]["step"] == 4 and len(meta["teacher"]["manifest_sha256"]) == 64
    run_config = json.loads((student / "run_config.json").read_text())
    assert run_config["teacher"]["manifest_sha256"] == meta["teacher"]["manifest_sha256"]
    for s in (3, 4):  # as if the student was interrupted after step 2
        checkpoint._delete_step(student, s)
    # the teacher run gains a newer checkpoint: the resumed student must keep using step 4
    train(_cfg(store, teacher, steps=5, keep_checkpoints=(1, 2, 3, 4, 5), resume=True, force=True),
          progress=False)
    assert checkpoint.latest_step(teacher) == 5
    train(_cfg(store, student, resume=True, **kd), progress=False)
    assert checkpoint.read_meta(student)["teacher"]["step"] == 4
    # the pinned teacher checkpoint changed, then is gone: resume refuses clearly, writes nothing
    for s in (3, 4):
        checkpoint._delete_step(student, s)
    _damage(teacher, 4, "bitflip")
    with pytest.raises(TrainError, match="step 4.*cannot be used.*cannot be resumed reproducibly"):
        train(_cfg(store, student, resume=True, **kd), progress=False)
    checkpoint._delete_step(teacher, 4)
    with pytest.raises(TrainError, match="teacher .*step 4"):
        train(_cfg(store, student, resume=True, **kd), progress=False)
    assert checkpoint.all_steps(student) == [1, 2]


# ----------------------------------------------------------------------------- interrupts

def _start(store, out, *extra):
    args = ["--preset", "tiny-teacher", "--data", str(store), "--out", str(out), "--steps", "100000",
            "--batch", "4", "--seq-len", "8", "--optimizer", "adamw", "--no-progress", *extra]
    # SIGINT back to its default in the child: a shell without job control starts background
    # jobs (e.g. `bash .ci/run &`) with SIGINT ignored, and Python then never turns it into
    # KeyboardInterrupt, so a Ctrl-C during start-up would be (rightly) ignored.
    return subprocess.Popen([sys.executable, "-m", "salt.cli.main", "train", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_metrics(proc, out, timeout=300):
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        path = out / "metrics.jsonl"
        if path.is_file() and path.read_text().count("\n") >= 3:
            return
        if proc.poll() is not None:
            pytest.fail(f"exited early: {proc.communicate()[1].decode()[-2000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("no metrics in time")


def _wait_until_caught(proc, sig, timeout=600):
    """Until the process has a handler for ``sig`` (its SigCgt mask in /proc)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            status = open(f"/proc/{proc.pid}/status").read()
        except OSError:
            break
        caught = int(next(l for l in status.splitlines() if l.startswith("SigCgt:")).split()[1], 16)
        if caught >> (int(sig) - 1) & 1:
            return
        time.sleep(0.01)
    pytest.fail("the process never installed its signal handler")


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_130(store, tmp_path):
    out = tmp_path / "run"
    proc = _start(store, out, "--checkpoint-every", "0")
    _wait_for_metrics(proc, out)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 130, stderr.decode()[-2000:]
    assert "Traceback" not in stderr.decode() and "Aborted" not in stderr.decode()
    assert "interrupted (SIGINT), checkpoint saved" in stdout.decode()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert checkpoint.latest_step(out) == rows[-1]["step"]  # nothing lost
    checkpoint.verify(out, rows[-1]["step"])


@pytest.mark.slow
def test_second_ctrl_c_aborts_and_startup_interrupts_are_one_line(store, tmp_path):
    out = tmp_path / "run"
    proc = _start(store, out, "--checkpoint-every", "0", "--checkpoint-minutes", "0")
    _wait_for_metrics(proc, out)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 130 and "Traceback" not in stderr.decode() and "Aborted" not in stderr.decode()
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        out = tmp_path / f"startup-{code}"
        proc = _start(store, out)
        _wait_until_caught(proc, signal.SIGTERM)  # salt's handlers are installed: start-up has begun
        time.sleep(0.5)  # inside start-up (imports, store, compile), long before the first step
        assert not (out / "metrics.jsonl").exists()
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=600)
        lines = [l for l in stderr.decode().splitlines() if l.strip() and "WARNING" not in l]
        assert proc.returncode == code, stderr.decode()[-2000:]
        assert len(lines) == 1 and "Traceback" not in stderr.decode(), stderr.decode()[-2000:]
        assert not out.exists() or not (out / "metrics.jsonl").exists()
