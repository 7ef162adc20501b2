"""The second reliability campaign (issue 25): data loss under --overwrite, the directory lock,
resume without an intact checkpoint, signals to `salt reproduce`'s workers, store integrity.
(The one-line bad-input cases are in tests/test_reliability_inputs.py.)"""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
from click.testing import CliRunner

from salt.cli.main import cli
from salt.core import lock, outputs
from tiny_corpus import make_tiny_corpus


def _snapshot(root: pathlib.Path) -> dict:
    """Every file and its bytes (a lock file aside: a writer leaves it, empty, by design)."""
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*")) if p.name != lock.LOCK_NAME}


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from salt.data import prepare
    root = tmp_path_factory.mktemp("campaign")
    src = make_tiny_corpus(root / "src", n_docs=20, words=200, seed=5)
    prepare(root / "data", [src], vocab_size=300, val_fraction=0.2, progress=False)
    r = _invoke(*_train_args(root, root / "teacher", "--checkpoint-every", 2))
    assert r.exit_code == 0, r.output
    return root


def _train_args(world, out, *extra):
    return ["train", "--preset", "tiny-teacher", "--data", world / "data", "--out", out, "--steps", 2,
            "--batch", 4, "--seq-len", 8, "--optimizer", "adamw", "--no-progress", *extra]


def _fake_reproduction(world, out: pathlib.Path):
    """A finished-looking reproduction of ``--tiny --data world/data``: its state.json (same
    settings) with stages done, runs/* copied from a real run; returns its configuration."""
    import shutil
    from salt.runtime.experiments import reproduce
    cfg = reproduce.config_for("tiny", out=str(out), data=str(world / "data"))
    out.mkdir()
    state = reproduce._State(out, cfg, force=True).data
    state["stages"] = {"slm": {"seconds": 1.0}, "score": {"seconds": 1.0}}
    (out / "state.json").write_text(json.dumps(state))
    for name in ("SLM", "BASELINE-seed0"):
        shutil.copytree(world / "teacher", out / "runs" / name)
    (out / "eval").mkdir()
    (out / "eval" / "SLM_8.npz").write_bytes(b"stats")
    (out / "report.md").write_text("# report\n")
    return cfg


# --------------------------------------------------------------------------- data loss

def test_overwrite_refuses_user_files_deep_inside_and_deletes_nothing(world, tmp_path):
    from salt.runtime.experiments import reproduce
    out = tmp_path / "R"
    cfg = _fake_reproduction(world, out)
    assert outputs.foreign_files(out, "reproduction") == []
    (out / "eval" / "my.txt").write_text("mine")
    (out / "runs" / "SLM" / "notes.txt").write_text("mine")
    (out / "runs" / "BASELINE-seed0" / "notes.txt").write_text("mine")
    step = sorted((out / "runs" / "SLM" / "checkpoints").iterdir())[0]
    (step / "params" / "mine.bin").write_bytes(b"x")  # not in the step's manifest
    before = _snapshot(out)
    with pytest.raises(ValueError, match="did not write") as e:
        reproduce.run(cfg, force=True, progress=False)
    for name in ("eval/my.txt", "runs/SLM/notes.txt", "runs/BASELINE-seed0/notes.txt"):
        assert name in str(e.value)
    assert _snapshot(out) == before


def test_overwrite_resets_the_state_with_the_files_it_removes(world, tmp_path, monkeypatch):
    """The campaign's second symptom: after --overwrite removed runs/, state.json still listed
    every stage, so every later reproduce failed "checkpoint path R/runs/SLM does not exist"."""
    from salt.runtime.experiments import reproduce
    out = tmp_path / "R"
    cfg = _fake_reproduction(world, out)

    class Stop(Exception):
        pass

    def stop(tc, *args):
        raise Stop(tc.out)
    monkeypatch.setattr(reproduce, "train_stage", stop)
    with pytest.raises(Stop, match="runs/SLM"):  # the SLM is trained again: its stage was reset
        reproduce.run(cfg, force=True, progress=False)
    state = json.loads((out / "state.json").read_text())
    assert state["stages"] == {} and sorted(p.name for p in out.iterdir()) == [".salt.lock", "state.json"]


def test_data_stage_never_deletes_a_user_file_in_out_data(world, tmp_path):
    """A reproduction interrupted around data preparation, then a user file in OUT/data/."""
    import shutil
    from salt.runtime.experiments import reproduce
    out = tmp_path / "R"
    cfg = reproduce.config_for("tiny", out=str(out))
    out.mkdir()
    shutil.copytree(world / "data", out / "data")
    (out / "data" / "my.txt").write_text("mine")
    (out / "state.json").write_text(json.dumps({"settings": {}, "stages": {}}))
    reproduce._State(out, cfg, force=True)  # this configuration's state, no stage done
    before = _snapshot(out)
    with pytest.raises(ValueError, match="my.txt"):
        reproduce.run(cfg, progress=False)
    assert _snapshot(out) == before


# --------------------------------------------------------------------------- the lock

_HOLD = ("import sys, time; from salt.core.lock import DirLock\n"
         "with DirLock(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)\n")


def test_lock_refuses_a_second_writer_with_the_holders_pid_and_frees_on_death(tmp_path):
    d = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(d)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(lock.LockError, match=f"pid {holder.pid}"):
            with lock.DirLock(d):
                pass
        assert not lock.is_stale(d)
    finally:
        holder.kill()
        holder.wait()
    assert lock.is_stale(d)  # the kernel dropped the dead holder's lock: the file is a leftover
    with lock.DirLock(d):
        assert json.loads((d / lock.LOCK_NAME).read_text())["pid"] == os.getpid()
    assert (d / lock.LOCK_NAME).read_text() == ""


def _cache_args(world, out):
    return ["teacher", "cache", "--teacher", world / "teacher", "--data", world / "data", "--steps", 2,
            "--batch", 4, "--seq-len", 8, "--out", out, "--quiet"]


def _score_args(world, out):
    return ["score", "--teacher", world / "teacher", "--data", world / "data", "--seq-len", 8, "--out", out,
            "--quiet"]


@pytest.mark.parametrize("command", ["teacher cache", "score"])
def test_a_second_cache_or_score_writer_is_refused_and_a_dead_writers_lock_is_taken_over(world, tmp_path,
                                                                                          command):
    """`salt teacher cache` locks its --out, `salt score` its OUT.partial/ (where it writes)."""
    if command == "teacher cache":
        out = locked = tmp_path / "cache"
        args = _cache_args(world, out)
    else:
        out, locked = tmp_path / "scores.npz", tmp_path / "scores.npz.partial"
        args = _score_args(world, out)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(locked)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # another writer, alive
        r = subprocess.run([sys.executable, "-m", "salt.cli.main", *map(str, args)], capture_output=True,
                           text=True)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and "being written by another SALT process" in errors[0]
        assert f"pid {holder.pid}" in errors[0] and repr(str(locked)) in errors[0]
        assert [p.name for p in tmp_path.iterdir()] == [locked.name]  # nothing written
        assert [p.name for p in locked.iterdir()] == [lock.LOCK_NAME]
    finally:
        holder.kill()
        holder.wait()
    assert lock.is_stale(locked)  # its holder died: the next writer takes the lock over
    r = _invoke(*args)
    assert r.exit_code == 0, r.output
    if command == "teacher cache":
        assert outputs.kind_of(out) == "teacher_cache" and (out / lock.LOCK_NAME).read_text() == ""
    else:
        assert out.is_file() and not locked.exists()


def test_a_failed_command_leaves_no_directory_behind(tmp_path):
    d = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with lock.DirLock(d):
            raise RuntimeError("checks failed")
    assert not d.exists()


@pytest.mark.slow
def test_two_concurrent_resumes_second_refuses_and_no_metrics_row_is_lost(world, tmp_path):
    run = tmp_path / "run"
    assert _invoke(*_train_args(world, run, "--steps", 40, "--checkpoint-every", 20)).exit_code == 0
    argv = [sys.executable, "-m", "salt.cli.main"] + [str(a) for a in _train_args(
        world, run, "--steps", 400, "--checkpoint-every", 100, "--resume", "--force")]
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while first.poll() is None and not (run / lock.LOCK_NAME).read_text():
        time.sleep(0.05)  # the first holds the lock (its record is written)
    second = subprocess.run(argv, capture_output=True, text=True)
    out1 = first.communicate()[0]
    assert first.returncode == 0, out1
    assert second.returncode != 0 and "being written by another SALT process" in second.stderr
    assert f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 401))


# --------------------------------------------------------------------------- resume

def _corrupt_all_steps(run: pathlib.Path) -> None:
    for f in sorted((run / "checkpoints").rglob("*")):
        if f.is_file() and f.parent.name == "d":
            data = bytearray(f.read_bytes())
            data[len(data) // 2] ^= 1
            f.write_bytes(bytes(data))


@pytest.mark.slow
def test_resume_without_an_intact_checkpoint_refuses_and_start_over_keeps_the_teacher(world, tmp_path):
    import shutil
    teacher = tmp_path / "teacher"
    shutil.copytree(world / "teacher", teacher)
    student = tmp_path / "student"
    kd = ("--teacher", teacher, "--kd-steps", 2, "--steps", 3, "--checkpoint-every", 1)
    assert _invoke(*_train_args(world, student, *kd)).exit_code == 0
    pinned = json.loads((student / "run_config.json").read_text())["teacher"]
    assert pinned["step"] == 2
    r = _invoke(*_train_args(world, teacher, "--steps", 4, "--keep", "2", "--resume", "--force"))  # a newer step
    assert r.exit_code == 0, r.output
    _corrupt_all_steps(student)
    before = _snapshot(student)
    r = _invoke(*_train_args(world, student, *kd, "--resume"))
    assert r.exit_code != 0 and "none of its checkpoints" in r.output and "Traceback" not in r.output
    assert _snapshot(student) == before
    r = _invoke(*_train_args(world, student, *kd, "--resume", "--start-over"))
    assert r.exit_code == 0, r.output
    assert json.loads((student / "run_config.json").read_text())["teacher"] == pinned
    assert any((student / "corrupt-checkpoints").iterdir())  # the damaged steps, kept aside
    from salt.runtime.model import checkpoint
    assert checkpoint.meta_of(student, 3)["teacher"]["step"] == 2


class _Stages:
    """The two methods of reproduce's state that its worker pool uses."""

    def __init__(self):
        self.finished = []

    def done(self, stage):
        return stage in self.finished

    def finish(self, stage, seconds, **info):
        self.finished.append(stage)


@pytest.mark.slow
def test_reproduce_refuses_to_restart_a_stage_whose_checkpoints_are_all_damaged(world, tmp_path):
    """A stage of `salt reproduce` that saved checkpoints, all damaged now: refused (one line
    naming the run and --start-over), in the sequential loop and in a side-by-side worker;
    --start-over trains it again from step 0.  (It used to warn and start over.)"""
    from salt.runtime.experiments import students
    from salt.runtime.model import checkpoint
    from salt.runtime.train.trainer import TrainConfig
    run = tmp_path / "runs" / "BASELINE-seed0"
    tc = TrainConfig(preset="tiny-teacher", data=str(world / "data"), out=str(run), steps=2, batch=4, seq_len=8,
                     optimizer="adamw", checkpoint_every=1, keep_checkpoints=(1, 2))
    students.train_stage(tc, progress=False)
    _corrupt_all_steps(run)
    before = _snapshot(run)
    with pytest.raises(ValueError, match="none of its checkpoints.*--start-over") as e:
        students.train_stage(tc, progress=False)
    assert str(run) in str(e.value) and _snapshot(run) == before
    if len(os.sched_getaffinity(0)) >= 2:  # the side-by-side pool (one worker process per core)
        stages = _Stages()
        job = ("BASELINE/seed0", tc, False, None)
        with pytest.raises(ValueError) as e:
            students.side_by_side([job], stages, lambda *job: None)
        assert "\n" not in str(e.value) and str(run) in str(e.value) and "--start-over" in str(e.value)
        assert _snapshot(run) == before and stages.finished == []
        students.side_by_side([job], stages, lambda *job: None, start_over=True)
        assert stages.finished == ["BASELINE/seed0"]
    else:
        students.train_stage(tc, progress=False, start_over=True)
    assert checkpoint.newest_intact(run) == 2 and any((run / "corrupt-checkpoints").iterdir())


# --------------------------------------------------------------------------- signals

def _marked(marker: str) -> list[int]:
    """Live processes whose environment carries ``marker``."""
    found = []
    for p in pathlib.Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if marker.encode() in (p / "environ").read_bytes():
                    found.append(int(p.name))
            except OSError:
                pass
    return found


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_to_reproduce_stops_its_workers_after_they_save(world, tmp_path, sig):
    from salt.runtime.model import checkpoint
    out, marker = tmp_path / "R", f"SALT_TEST_MARK={uuid.uuid4().hex}"
    env = dict(os.environ, SALT_TEST_MARK=marker.split("=")[1])
    argv = [sys.executable, "-m", "salt.cli.main", "reproduce", "--tiny", "--data", str(world / "data"),
            "--out", str(out), "--steps", "20000", "--kd-steps", "200", "--eval-every", "200", "--quiet",
            "--side-by-side"]
    parent = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    metrics = [out / "runs" / n / "metrics.jsonl" for n in ("BASELINE-seed0", "RKD-seed0")]
    while parent.poll() is None and not all(m.is_file() and m.stat().st_size for m in metrics):
        time.sleep(0.2)  # both workers are training
    assert parent.poll() is None, parent.communicate()[0]
    parent.send_signal(sig)
    output = parent.communicate(timeout=300)[0]
    assert parent.returncode == 128 + sig, output  # 143 / 130, as a `salt train` stopped by it
    assert f"stopped by {sig.name}" in output and "Traceback" not in output
    assert _marked(marker) == []  # no worker outlives the command
    for m in metrics:  # each saved a checkpoint when asked, and its metrics end there
        run = m.parent
        last = checkpoint.newest_intact(run)
        assert last is not None and 0 < last < 20000
        steps = [json.loads(line)["step"] for line in m.read_text().splitlines()]
        assert steps[: last] == list(range(1, last + 1))


# --------------------------------------------------------------------------- integrity and inputs

def test_store_records_content_hashes_and_verify_checks_them(world, tmp_path):
    import shutil
    from salt.data import TokenStore
    store = tmp_path / "store"
    shutil.copytree(world / "data", store)
    meta = json.loads((store / "metadata.json").read_text())
    assert set(meta["files"]) == {"train.tokens.bin", "train.doc_offsets.bin", "val.tokens.bin",
                                  "val.doc_offsets.bin"}
    TokenStore(store).verify()
    data = bytearray((store / "val.doc_offsets.bin").read_bytes())
    data[-1] ^= 0  # unchanged bytes, new inode: re-hashed, still fine
    (store / "val.doc_offsets.bin").unlink()
    (store / "val.doc_offsets.bin").write_bytes(bytes(data))
    TokenStore(store)
    tokens = np.fromfile(store / "val.tokens.bin", np.uint16)
    tokens[0] = 7 if tokens[0] != 7 else 8
    tokens.tofile(store / "val.tokens.bin")
    with pytest.raises(ValueError, match="val.tokens.bin does not match the sha256"):
        TokenStore(store).verify()


def test_jsonl_integer_beyond_the_digit_limit_is_skipped_with_skip_invalid(tmp_path):
    from salt.data.corpus import CorpusStats, iter_documents, resolve_sources
    src = tmp_path / "a.jsonl"
    src.write_text('{"text": "ka"}\n{"text": "lo", "n": ' + "9" * 5000 + '}\n{"text": "mi"}\n')
    stats = CorpusStats()
    docs = list(iter_documents(resolve_sources([src]), stats, text_field="text", skip_invalid=True))
    assert docs == ["ka", "mi"] and stats.invalid_json_lines == 1


def test_a_killed_prepares_partial_directory_is_removed_by_the_next(tmp_path):
    from salt.data import prepare
    src = make_tiny_corpus(tmp_path / "src", n_docs=20, words=200, seed=1)
    stale = tmp_path / ".out.partial-killed"
    stale.mkdir()
    (stale / "train.tokens.bin").write_bytes(b"\0" * 64)
    (stale / lock.LOCK_NAME).write_text('{"pid": 999999}')  # its holder is gone
    live = tmp_path / ".out.partial-live"  # another prepare still building: kept
    held = lock.DirLock(live)
    held.__enter__()
    try:
        mine = tmp_path / ".out.partial-mine"  # no lock file: not provably ours, kept
        mine.mkdir()
        prepare(tmp_path / "out", [src], vocab_size=300, val_fraction=0.2, progress=False)
        assert not stale.exists() and live.exists() and mine.exists()
        assert outputs.kind_of(tmp_path / "out") == "store"
    finally:
        held.release()


def test_disk_full_during_a_checkpoint_is_one_error_naming_the_step(world, tmp_path, monkeypatch):
    from salt.runtime.model import checkpoint

    class Full:
        def save(self, *a, **k):
            raise RuntimeError("write failed") from OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint, "_manager", lambda *a, **k: Full())
    with pytest.raises(checkpoint.CheckpointWriteError, match=r"run/checkpoints/5: No space left on device"):
        checkpoint.save(tmp_path / "run", 5, {}, {}, {})


# a `salt` whose disk fills up during step 4's checkpoint: orbax's write of an item's _METADATA,
# in one of its threads, fails with ENOSPC (on a real full disk, a 400 KiB tmpfs, that is where
# it failed, and orbax logged that thread's traceback)
_FULL_AT_STEP_4 = """
import errno, sys
from etils.epath import abstract_path
real = abstract_path.Path.write_text
def write_text(self, *args, **kwargs):
    if "/checkpoints/4" in str(self) and self.name == "_METADATA":
        raise OSError(errno.ENOSPC, "No space left on device")
    return real(self, *args, **kwargs)
abstract_path.Path.write_text = write_text
from salt.cli.main import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_save_is_one_line_and_the_previous_step_stays_usable(world, tmp_path):
    from salt.runtime.model import checkpoint
    run = tmp_path / "run"
    args = [str(a) for a in _train_args(world, run, "--steps", 4, "--checkpoint-every", 2, "--keep", "2")]
    r = subprocess.run([sys.executable, "-c", _FULL_AT_STEP_4, *args], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr + r.stdout, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and f"{run}/checkpoints/4: No space left on device" in errors[0], r.stderr
    assert checkpoint.newest_intact(run) == 2  # the previous checkpoint, intact
    r = _invoke(*_train_args(world, run, "--steps", 4, "--checkpoint-every", 2, "--keep", "2", "--resume"))
    assert r.exit_code == 0, r.output  # space again: it resumes from step 2 and saves step 4
    assert checkpoint.newest_intact(run) == 4
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_full_disk_in_an_atomic_write_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    import errno

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    target = tmp_path / "metrics.jsonl"
    with pytest.raises(OSError) as e:
        outputs.write_text(target, "row\n")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []
