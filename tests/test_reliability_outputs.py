"""The output rule (docs/safety.md, salt.core.outputs): atomic writers (property-based) and every
data-destroying case of issue 10 — each refused with a message, the user's files untouched."""
import json
import os
import pathlib

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings, strategies as st

from salt.cli.main import cli
from salt.core import outputs
from tiny_corpus import make_tiny_corpus


def _snapshot(root: pathlib.Path) -> dict:
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


# --------------------------------------------------------------------------- atomic writers

@settings(max_examples=200, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(old=st.binary(max_size=300), new=st.binary(max_size=3000), fail_after=st.integers(0, 3000))
def test_write_bytes_is_all_or_nothing(tmp_path_factory, old, new, fail_after):
    d = tmp_path_factory.mktemp("atomic")
    target = d / "f.bin"
    target.write_bytes(old)

    def writer(f):  # writes part of ``new`` then dies (or finishes when fail_after >= len)
        f.write(new[:fail_after])
        if fail_after < len(new):
            raise KeyboardInterrupt
    if fail_after < len(new):
        with pytest.raises(KeyboardInterrupt):
            outputs.write_bytes(target, writer)
        assert target.read_bytes() == old
    else:
        outputs.write_bytes(target, writer)
        assert target.read_bytes() == new
    assert sorted(os.listdir(d)) == ["f.bin"]  # no temporary file left


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20)
                           | st.floats(allow_nan=False, allow_infinity=False),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=30)


@settings(max_examples=200, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(obj=json_values, arr=st.lists(st.integers(-2**31, 2**31 - 1), max_size=50))
def test_json_and_numpy_writers_round_trip(tmp_path_factory, obj, arr):
    d = tmp_path_factory.mktemp("rt")
    outputs.write_json(d / "a.json", obj)
    assert json.loads((d / "a.json").read_text()) == obj
    a = np.asarray(arr, np.int64)
    outputs.save_npy(d / "a.npy", a)
    np.testing.assert_array_equal(np.load(d / "a.npy", allow_pickle=False), a)
    outputs.save_npz(d / "a.npz", compressed=True, x=a)
    with np.load(d / "a.npz", allow_pickle=False) as z:
        np.testing.assert_array_equal(z["x"], a)
    outputs.write_text(d / "t.txt", "héllo")
    assert (d / "t.txt").read_text(encoding="utf-8") == "héllo"
    assert sorted(os.listdir(d)) == ["a.json", "a.npy", "a.npz", "t.txt"]


def test_remove_tree_and_move_into_place_leave_no_half_state(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "x").write_text("1")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "y").write_text("2")
    outputs.move_into_place(tmp_path / "new", tmp_path / "old")
    assert sorted(os.listdir(tmp_path)) == ["old"] and os.listdir(tmp_path / "old") == ["y"]
    outputs.remove_tree(tmp_path / "old")
    assert os.listdir(tmp_path) == []


def test_check_output_dir_rule(tmp_path):
    assert outputs.check_output_dir(tmp_path / "new", "run", mode="create") == "absent"
    (tmp_path / "empty").mkdir()
    assert outputs.check_output_dir(tmp_path / "empty", "store", mode="replace") == "empty"
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    for mode in outputs.MODES:
        with pytest.raises(outputs.OutputError, match="user"):
            outputs.check_output_dir(user, "run", mode=mode)
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps({"train": {}}))
    assert outputs.check_output_dir(run, "run", mode="resume") == "own"
    with pytest.raises(outputs.OutputError, match="SALT run directory"):
        outputs.check_output_dir(run, "store", mode="resume")
    (run / "mine.txt").write_text("x")
    with pytest.raises(outputs.OutputError, match="did not write.*mine.txt"):
        outputs.check_output_dir(run, "run", mode="replace")
    with pytest.raises(outputs.OutputError, match="contains an input"):
        outputs.check_output_dir(run, "run", mode="resume", inputs=[run / "mine.txt"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(outputs.OutputError, match="not a directory"):
        outputs.check_output_dir(tmp_path / "file", "run", mode="create")
    with pytest.raises(outputs.OutputError, match="not a directory"):
        outputs.check_output_dir(tmp_path / "file" / "sub", "run", mode="create")


def test_reproduction_with_teacher_caches_can_be_replaced_but_not_a_foreign_one(tmp_path):
    """`salt reproduce --overwrite` of a run that used --teacher-cache auto: its teacher_cache/*
    folders are caches (cache.json of the cache format); a foreign folder there is refused."""
    repro = tmp_path / "repro"
    cache = repro / "teacher_cache" / "all-seed0"
    cache.mkdir(parents=True)
    (repro / "state.json").write_text(json.dumps({"settings": {}, "stages": {}}))
    (cache / "cache.json").write_text(json.dumps({"format": "salt-teacher-cache-v1"}))
    (cache / "step_000001.lse.npy").write_bytes(b"")
    assert outputs.kind_of(cache) == "teacher_cache"
    assert outputs.check_output_dir(repro, "reproduction", mode="replace") == "own"
    (repro / "teacher_cache" / "mine").mkdir()
    (repro / "teacher_cache" / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(outputs.OutputError, match="mine.*not a SALT teacher_cache directory"):
        outputs.check_output_dir(repro, "reproduction", mode="replace")


def test_unwritable_out_is_refused():
    # /proc refuses new files even to root (a chmod'ed folder does not stop root)
    with pytest.raises(outputs.OutputError, match="cannot write"):
        outputs.check_output_dir("/proc/salt-safety-test", "run", mode="create")


# --------------------------------------------------------------------------- the cases

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from salt.data import prepare
    root = tmp_path_factory.mktemp("safety")
    src = make_tiny_corpus(root / "src", n_docs=20, words=200, seed=3)
    prepare(root / "data", [src], vocab_size=300, val_fraction=0.2, progress=False)
    return root


def test_prepare_overwrite_never_deletes_its_sources(world, tmp_path):
    x = tmp_path / "x"
    make_tiny_corpus(x, n_docs=5, words=50, seed=1)
    before = _snapshot(tmp_path)
    result = _invoke("data", "prepare", x, "--out", x, "--overwrite", "--vocab-size", 300, "--quiet")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "contains an input" in result.output or "not a SALT" in result.output
    assert _snapshot(tmp_path) == before


def test_prepare_overwrite_of_a_store_holding_sources_is_refused(world, tmp_path):
    store = tmp_path / "store"
    result = _invoke("data", "prepare", world / "src", "--out", store, "--vocab-size", 300, "--quiet")
    assert result.exit_code == 0, result.output
    (store / "my_source.txt").write_text("ka lo mi " * 100)
    before = _snapshot(tmp_path)
    result = _invoke("data", "prepare", store / "my_source.txt", "--out", store, "--overwrite",
                     "--vocab-size", 300, "--quiet")
    assert result.exit_code != 0 and "Traceback" not in result.output and str(store) in result.output
    assert _snapshot(tmp_path) == before


def _train_args(world, out, *extra):
    return ["train", "--preset", "tiny-teacher", "--data", world / "data", "--out", out, "--steps", 2,
            "--batch", 4, "--seq-len", 8, "--optimizer", "adamw", "--no-progress", *extra]


def test_train_resume_into_a_user_directory_is_refused(world, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "metrics.jsonl").write_text("my own notes\n")
    before = _snapshot(tmp_path)
    result = _invoke(*_train_args(world, out, "--resume"))
    assert result.exit_code != 0 and "not a SALT output directory" in result.output
    assert "Traceback" not in result.output
    assert _snapshot(tmp_path) == before


def test_train_resume_into_a_token_store_is_refused(world, tmp_path):
    from salt.data import prepare
    other = tmp_path / "other_store"
    prepare(other, [world / "src"], vocab_size=300, val_fraction=0.2, progress=False)
    before = _snapshot(other)
    result = _invoke(*_train_args(world, other, "--resume"))
    assert result.exit_code != 0 and "SALT store directory" in result.output
    assert _snapshot(other) == before
    result = _invoke(*_train_args(world, world / "data", "--resume"))  # --out is --data itself
    assert result.exit_code != 0 and "contains an input" in result.output


def test_student_whose_teacher_is_its_own_out_is_refused(world, tmp_path):
    teacher = tmp_path / "t"
    assert _invoke(*_train_args(world, teacher)).exit_code == 0
    before = _snapshot(teacher)
    result = _invoke(*_train_args(world, teacher, "--resume", "--force", "--teacher", teacher,
                                  "--kd-steps", 1, "--steps", 3))
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "contains an input" in result.output or "own teacher" in result.output
    assert _snapshot(teacher) == before


def test_reproduce_never_deletes_user_files_under_out(world, tmp_path):
    from salt.runtime.experiments import reproduce
    out = tmp_path / "repro"
    (out / "data").mkdir(parents=True)
    (out / "data" / "corpus.txt").write_text("my corpus")
    (out / "runs" / "SLM").mkdir(parents=True)
    (out / "runs" / "SLM" / "notes.md").write_text("my notes")
    before = _snapshot(out)
    with pytest.raises(ValueError, match="not a SALT output directory"):
        reproduce.run(reproduce.config_for("tiny", out=str(out)), progress=False)
    assert _snapshot(out) == before
    # even inside a reproduction directory (state.json), foreign data/ and runs/* are refused
    (out / "state.json").write_text(json.dumps({"settings": {}, "stages": {}}))
    before = _snapshot(out)
    with pytest.raises(ValueError, match="not a SALT store directory"):
        reproduce.run(reproduce.config_for("tiny", out=str(out)), progress=False)
    (out / "data" / "corpus.txt").unlink()
    with pytest.raises(ValueError, match="SLM.*not a SALT run directory"):
        reproduce.run(reproduce.config_for("tiny", out=str(out)), progress=False)
    assert (out / "runs" / "SLM" / "notes.md").read_text() == "my notes"


def test_score_out_directory_with_force_is_an_error(world, tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "keep").write_text("k")
    result = _invoke("score", "--teacher", tmp_path / "none", "--data", world / "data", "--seq-len", 8,
                     "--out", tmp_path / "dir", "--force")
    assert result.exit_code != 0 and "is a directory" in result.output
    assert "Traceback" not in result.output and (tmp_path / "dir" / "keep").read_text() == "k"
    (tmp_path / "user.npz").write_bytes(b"not ours")
    result = _invoke("score", "--teacher", tmp_path / "none", "--data", world / "data", "--seq-len", 8,
                     "--out", tmp_path / "user.npz", "--force")
    assert result.exit_code != 0 and "not a file SALT wrote" in result.output
    assert (tmp_path / "user.npz").read_bytes() == b"not ours"
