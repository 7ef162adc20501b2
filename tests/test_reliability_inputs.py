"""Bad input across the commands (issue 10): every case exits non-zero with a message naming the
argument or file, prints no traceback, writes no partial output and leaves every pre-existing
file untouched (including the shared store, teacher run and scores)."""
import gzip
import pathlib
import re

import numpy as np
import pytest
from click.testing import CliRunner

from salt.cli.main import cli
from tiny_corpus import make_tiny_corpus

RNG_BYTES = bytes(np.random.default_rng(0).integers(0, 256, 600, dtype=np.uint8))


def _snapshot(root: pathlib.Path) -> dict:
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from salt.data import TokenStore, prepare
    from salt.runtime.select.score import SCORES_FORMAT
    from salt.core import outputs
    root = tmp_path_factory.mktemp("inputs")
    src = make_tiny_corpus(root / "src", n_docs=20, words=200, seed=4)
    prepare(root / "data", [src], vocab_size=300, val_fraction=0.2, progress=False)
    TokenStore(root / "data")  # writes its token-check cache now, not during a case
    result = CliRunner().invoke(cli, ["train", "--preset", "tiny-teacher", "--data", str(root / "data"),
                                      "--out", str(root / "teacher"), "--steps", "2", "--batch", "4",
                                      "--seq-len", "8", "--optimizer", "adamw", "--no-progress"])
    assert result.exit_code == 0, result.output
    outputs.save_npz(root / "scores.npz", window_ids=np.arange(5), scores=np.linspace(0, 1, 5),
                     format=np.str_(SCORES_FORMAT))
    return root


def _corrupt_store(d: pathlib.Path, world, how: str) -> pathlib.Path:
    import shutil
    store = d / "store"
    shutil.copytree(world / "data", store)
    (store / "token_check.json").unlink(missing_ok=True)
    if how == "no-metadata":
        (store / "metadata.json").unlink()
    elif how == "bad-metadata":
        (store / "metadata.json").write_text("{not json")
    elif how == "truncated":
        data = (store / "train.tokens.bin").read_bytes()
        (store / "train.tokens.bin").write_bytes(data[:-10])
    elif how == "ff":
        data = bytearray((store / "train.tokens.bin").read_bytes())
        data[100:104] = b"\xff\xff\xff\xff"
        (store / "train.tokens.bin").write_bytes(bytes(data))
    elif how == "none":
        pass
    elif how == "offsets":
        from salt.data import TokenStore
        TokenStore(store)  # its token-check cache is written now (the token files stay valid)
        data = bytearray((store / "val.doc_offsets.bin").read_bytes())
        data[8:16] = np.int64(10**9).tobytes()
        (store / "val.doc_offsets.bin").write_bytes(bytes(data))
    return store


def _corrupt_teacher(d: pathlib.Path, world) -> pathlib.Path:
    import shutil
    run = d / "badteacher"
    shutil.copytree(world / "teacher", run)
    for f in sorted((run / "checkpoints").rglob("*")):
        if f.is_file() and f.parent.name == "d":  # an orbax data file: flip one bit
            data = bytearray(f.read_bytes())
            data[len(data) // 2] ^= 1
            f.write_bytes(bytes(data))
    return run


def _train(world, out, *extra):
    return ["train", "--preset", "tiny-teacher", "--data", world / "data", "--out", out, "--steps", 2,
            "--batch", 4, "--seq-len", 8, "--optimizer", "adamw", "--no-progress", *extra]


def _score(world, out, *extra):
    return ["score", "--teacher", world / "teacher", "--data", world / "data", "--seq-len", 8,
            "--out", out, "--quiet", *extra]


def _case(name):
    """Each case: f(d, world) -> (argv, regex the message must match, output path or None)."""
    def deco(f):
        CASES[name] = f
        return f
    return deco


CASES: dict = {}


def _w(d, name, data):
    p = d / name
    p.parent.mkdir(parents=True, exist_ok=True)
    (p.write_bytes if isinstance(data, bytes) else p.write_text)(data)
    return p


def _prep(d, *sources, out=None, extra=()):
    out = out or d / "out"
    return ["data", "prepare", *sources, "--out", out, "--vocab-size", 300, "--quiet", *extra], out


# ---- salt data prepare ----------------------------------------------------------------
@_case("prepare-missing-source")
def _(d, w):
    a, o = _prep(d, d / "nope.txt")
    return a, "nope.txt.*no such file", o


@_case("prepare-empty-dir")
def _(d, w):
    (d / "emptydir").mkdir()
    a, o = _prep(d, d / "emptydir")
    return a, "emptydir.*no \\(non-hidden\\) files", o


@_case("prepare-glob-no-match")
def _(d, w):
    a, o = _prep(d, str(d / "*.nothing"))
    return a, "nothing.*matches no files", o


@_case("prepare-malformed-jsonl")
def _(d, w):
    a, o = _prep(d, _w(d, "a.jsonl", '{"text": "ok"}\n{broken\n'))
    return a, "a.jsonl:2: malformed JSON", o


@_case("prepare-deep-json")
def _(d, w):
    a, o = _prep(d, _w(d, "deep.jsonl", '{"text": "ok"}\n' + "[" * 100_000 + "]" * 100_000 + "\n"))
    return a, "deep.jsonl:2: malformed JSON.*nested", o


@_case("prepare-deep-json-in-object")
def _(d, w):
    a, o = _prep(d, _w(d, "deep2.jsonl", '{"text": ' + '{"a": ' * 5000 + "1" + "}" * 5000 + "}\n"))
    return a, "deep2.jsonl:1: malformed JSON", o


@_case("prepare-jsonl-missing-field")
def _(d, w):
    a, o = _prep(d, _w(d, "f.jsonl", '{"body": "x"}\n'))
    return a, "f.jsonl:1: no field 'text'", o


@_case("prepare-jsonl-not-object")
def _(d, w):
    a, o = _prep(d, _w(d, "n.jsonl", '[1, 2]\n'))
    return a, "n.jsonl:1: expected a JSON object", o


@_case("prepare-truncated-gzip")
def _(d, w):
    a, o = _prep(d, _w(d, "t.jsonl.gz", gzip.compress(b'{"text": "hello"}\n' * 500)[:60]))
    return a, "t.jsonl.gz.*truncated or corrupt gzip", o


@_case("prepare-corrupt-zstd")
def _(d, w):
    a, o = _prep(d, _w(d, "z.txt.zst", RNG_BYTES))
    return a, "z.txt.zst.*zstd", o


@_case("prepare-missing-tokenizer")
def _(d, w):
    a, o = _prep(d, w / "src", extra=("--tokenizer", d / "none.model"))
    a.remove("--vocab-size"), a.remove(300)
    return a, "none.model.*no such file", o


@_case("prepare-garbage-tokenizer")
def _(d, w):
    a, o = _prep(d, w / "src", extra=("--tokenizer", _w(d, "bad.model", RNG_BYTES)))
    a.remove("--vocab-size"), a.remove(300)
    return a, "bad.model", o


@_case("prepare-val-fraction")
def _(d, w):
    a, o = _prep(d, w / "src", extra=("--val-fraction", "1.5"))
    return a, "val_fraction", o


@_case("prepare-vocab-too-small")
def _(d, w):
    a, o = _prep(d, w / "src")
    a[a.index(300)] = 10
    return a, "vocab_size=10 is too small", o


@_case("prepare-out-is-file")
def _(d, w):
    f = _w(d, "afile", "mine")
    a, _ = _prep(d, w / "src", out=f)
    return a, "afile.*(not a directory|is a file)", None


@_case("prepare-out-under-file")
def _(d, w):
    f = _w(d, "afile2", "mine")
    a, _ = _prep(d, w / "src", out=f / "sub")
    return a, "afile2.*not a directory", None


@_case("prepare-out-user-dir")
def _(d, w):
    _w(d, "userdir/notes.txt", "mine")
    a, _ = _prep(d, w / "src", out=d / "userdir")
    return a, "userdir.*not a SALT store", None


@_case("prepare-out-user-dir-overwrite")
def _(d, w):
    _w(d, "userdir2/notes.txt", "mine")
    a, _ = _prep(d, w / "src", out=d / "userdir2", extra=("--overwrite",))
    return a, "userdir2.*refusing to replace", None


@_case("prepare-out-unwritable")
def _(d, w):
    a, _ = _prep(d, w / "src", out="/proc/salt-out")
    return a, "/proc/salt-out.*cannot write", None


@_case("prepare-empty-corpus")
def _(d, w):
    a, o = _prep(d, _w(d, "e.jsonl", '{"text": ""}\n'))
    return a, "empty corpus.*e.jsonl", o


# ---- salt data info -------------------------------------------------------------------
@_case("info-missing-store")
def _(d, w):
    return ["data", "info", d / "nostore"], "nostore.*no such directory", None


@_case("info-no-metadata")
def _(d, w):
    return ["data", "info", _corrupt_store(d, w, "no-metadata")], "store.*no metadata.json", None


@_case("info-bad-metadata")
def _(d, w):
    return ["data", "info", _corrupt_store(d, w, "bad-metadata")], "store.*unreadable metadata.json", None


@_case("info-truncated-tokens")
def _(d, w):
    return ["data", "info", _corrupt_store(d, w, "truncated")], "train.tokens.bin has .* bytes", None


@_case("info-token-ids-beyond-vocab")
def _(d, w):
    return ["data", "info", _corrupt_store(d, w, "ff")], "train.tokens.bin holds token id 65535 >= vocab_size 300", None


@_case("info-verify-bad-offsets")
def _(d, w):
    return ["data", "info", "--verify", _corrupt_store(d, w, "offsets")], "val.doc_offsets.bin", None


# ---- salt train -----------------------------------------------------------------------
@_case("train-missing-data")
def _(d, w):
    a = _train(w, d / "run")
    a[a.index(w / "data")] = d / "nodata"
    return a, "nodata.*does not exist", d / "run"


@_case("train-data-not-a-store")
def _(d, w):
    _w(d, "notstore/x.txt", "x")
    a = _train(w, d / "run")
    a[a.index(w / "data")] = d / "notstore"
    return a, "notstore.*no metadata.json", d / "run"


@_case("train-store-ids-beyond-vocab")
def _(d, w):
    a = _train(w, d / "run")
    a[a.index(w / "data")] = _corrupt_store(d, w, "ff")
    return a, "train.tokens.bin holds token id", d / "run"


@_case("train-subset-npz")
def _(d, w):
    np.savez(d / "sel.npz", ids=np.arange(3))
    return _train(w, d / "run", "--subset", d / "sel.npz", "--kd-steps", 1, "--teacher", w / "teacher"), \
        "sel.npz.*is a .npz archive", d / "run"


@_case("train-subset-random-bytes")
def _(d, w):
    return _train(w, d / "run", "--subset", _w(d, "sel.npy", RNG_BYTES), "--kd-steps", 1, "--teacher",
                  w / "teacher"), "sel.npy.*not a NumPy .npy file", d / "run"


@_case("train-exclude-object-array")
def _(d, w):
    np.save(d / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return _train(w, d / "run", "--exclude", d / "obj.npy"), "obj.npy.*holds objects or is corrupt", d / "run"


@_case("train-exclude-2d")
def _(d, w):
    np.save(d / "two.npy", np.zeros((2, 2), np.int64))
    return _train(w, d / "run", "--exclude", d / "two.npy"), "two.npy.*1-D integer", d / "run"


@_case("train-out-is-file")
def _(d, w):
    return _train(w, _w(d, "runfile", "mine")), "runfile.*not a directory", None


@_case("train-out-unwritable")
def _(d, w):
    return _train(w, "/proc/salt-run"), "/proc/salt-run.*cannot write", None


@_case("train-teacher-missing")
def _(d, w):
    return _train(w, d / "run", "--kd-steps", 1, "--teacher", d / "noteacher"), "noteacher.*does not exist", d / "run"


@_case("train-teacher-no-checkpoints")
def _(d, w):
    (d / "tdir").mkdir()
    return _train(w, d / "run", "--kd-steps", 1, "--teacher", d / "tdir"), "tdir.*no checkpoint found", d / "run"


@_case("train-teacher-corrupt")
def _(d, w):
    return _train(w, d / "run", "--kd-steps", 1, "--teacher", _corrupt_teacher(d, w)), \
        "badteacher.*no intact checkpoint", d / "run"


@_case("train-resume-corrupt-run-config")
def _(d, w):
    _w(d, "oldrun/run_config.json", "{garbage")
    return _train(w, d / "oldrun", "--resume"), "oldrun.*no valid run_config.json", None


@_case("train-seq-len-too-large")
def _(d, w):
    a = _train(w, d / "run")
    a[a.index("--seq-len") + 1] = 100000
    return a, "seq_len=100000 is too large", d / "run"


@_case("train-kd-steps")
def _(d, w):
    return _train(w, d / "run", "--kd-steps", 5, "--teacher", w / "teacher"), "kd_steps=5", d / "run"


@_case("train-checkpoint-minutes")
def _(d, w):
    return _train(w, d / "run", "--checkpoint-minutes", "-1"), "checkpoint-minutes", d / "run"


# ---- salt score / select / eval ---------------------------------------------------------
@_case("score-teacher-missing")
def _(d, w):
    a = _score(w, d / "s.npz")
    a[a.index(w / "teacher")] = d / "noteacher"
    return a, "noteacher.*does not exist", d / "s.npz"


@_case("score-data-missing")
def _(d, w):
    a = _score(w, d / "s.npz")
    a[a.index(w / "data")] = d / "nodata"
    return a, "nodata.*does not exist", d / "s.npz"


@_case("score-exclude-random-bytes")
def _(d, w):
    return _score(w, d / "s.npz", "--exclude", _w(d, "ex.npy", RNG_BYTES)), "ex.npy.*not a NumPy", d / "s.npz"


@_case("score-k-zero")
def _(d, w):
    return _score(w, d / "s.npz", "--k", 0), "k must be in", d / "s.npz"


@_case("score-out-is-dir")
def _(d, w):
    _w(d, "sdir/keep", "k")
    return _score(w, d / "sdir", "--force"), "sdir.*is a directory", None


@_case("score-out-exists")
def _(d, w):
    return _score(w, _w(d, "s.npz", b"mine")), "s.npz.*already exists", None


@_case("score-corrupt-partial-state")
def _(d, w):
    _w(d, "s.npz.partial/job.json", "{garbage")
    return _score(w, d / "s.npz"), "s.npz.partial.*no valid job.json", d / "s.npz"


@_case("score-teacher-corrupt")
def _(d, w):
    a = _score(w, d / "s.npz")
    a[a.index(w / "teacher")] = _corrupt_teacher(d, w)
    return a, "badteacher.*no intact checkpoint", d / "s.npz"


@_case("select-scores-missing")
def _(d, w):
    return ["select", "--scores", d / "none.npz", "--top-m", 2, "--out", d / "sel.npy"], "none.npz.*does not exist", \
        d / "sel.npy"


@_case("select-scores-random-bytes")
def _(d, w):
    return ["select", "--scores", _w(d, "r.npz", RNG_BYTES), "--top-m", 2, "--out", d / "sel.npy"], \
        "r.npz", d / "sel.npy"


@_case("select-top-m-zero")
def _(d, w):
    return ["select", "--scores", w / "scores.npz", "--top-m", 0, "--out", d / "sel.npy"], "top-m", d / "sel.npy"


@_case("select-out-exists")
def _(d, w):
    return ["select", "--scores", w / "scores.npz", "--top-m", 2, "--out", _w(d, "sel.npy", b"mine")], \
        "sel.npy.*already exists", None


@_case("select-force-onto-foreign-file")
def _(d, w):
    return ["select", "--scores", w / "scores.npz", "--top-m", 2, "--out", _w(d, "notes.npy", b"mine"),
            "--force"], "notes.npy.*not a file SALT wrote", None


@_case("eval-run-missing")
def _(d, w):
    return ["eval", "--run", d / "norun", "--data", w / "data", "--quiet"], "norun.*does not exist", None


@_case("eval-data-missing")
def _(d, w):
    return ["eval", "--run", w / "teacher", "--data", d / "nodata", "--quiet"], "nodata.*does not exist", None


@_case("eval-step-missing")
def _(d, w):
    return ["eval", "--run", w / "teacher", "--step", 7, "--data", w / "data", "--quiet"], \
        "no checkpoint of step 7", None


@_case("eval-corrupt-checkpoint")
def _(d, w):
    return ["eval", "--run", _corrupt_teacher(d, w), "--data", w / "data", "--quiet"], \
        "badteacher.*no intact checkpoint", None


# ---- issue 25: the second campaign's cases ---------------------------------------------
def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def _reproduce(w, out, *extra):
    return ["reproduce", "--tiny", "--data", w / "data", "--out", out, "--quiet", *extra]


@_case("train-seed-beyond-64-bits")
def _(d, w):
    return _train(w, d / "run", "--seed", 2**64), "--seed", d / "run"


@_case("reproduce-bogus-teacher-preset")
def _(d, w):
    return _reproduce(w, d / "R", "--teacher-preset", "bogus"), "--teacher-preset.*bogus", d / "R"


@_case("reproduce-bogus-student-preset")
def _(d, w):
    return _reproduce(w, d / "R", "--student-preset", "bogus"), "--student-preset.*bogus", d / "R"


@_case("reproduce-negative-lr")
def _(d, w):
    return _reproduce(w, d / "R", "--lr", -1), "lr=-1", d / "R"


@_case("reproduce-data-missing")
def _(d, w):
    a = _reproduce(w, d / "R")
    a[a.index(w / "data")] = d / "nodata"
    return a, "nodata.*does not exist", d / "R"


@_case("reproduce-data-is-a-user-directory")
def _(d, w):
    a = _reproduce(w, d / "R")
    a[a.index(w / "data")] = _w(d, "mine/notes.txt", "mine").parent
    return a, "mine.*not a usable token store", d / "R"


@_case("prepare-dev-null-source")
def _(d, w):
    a, o = _prep(d, "/dev/null")
    return a, "/dev/null.*character device, not a regular file", o


@_case("prepare-fifo-source")
def _(d, w):
    import os
    os.mkfifo(d / "fifo")
    a, o = _prep(d, d / "fifo")
    return a, "fifo.*a FIFO, not a regular file", o


@_case("prepare-jsonl-integer-beyond-the-digit-limit")
def _(d, w):
    a, o = _prep(d, _w(d, "big.jsonl", '{"text": "ka lo", "n": ' + "9" * 5000 + "}\n"))
    return a, r"big.jsonl:1: malformed JSON.*digits.*--skip-invalid", o


@_case("train-subset-is-a-directory")
def _(d, w):
    (d / "sub").mkdir()
    return _train(w, d / "run", "--teacher", w / "teacher", "--kd-steps", 1, "--subset", d / "sub"), \
        "sub.*is a directory, expected a file", d / "run"


@_case("select-scores-is-a-directory")
def _(d, w):
    (d / "scores").mkdir()
    return ["select", "--scores", d / "scores", "--top-m", 2, "--out", d / "sel.npy"], \
        "scores.*is a directory, expected a file", d / "sel.npy"


@_case("finetune-data-is-a-directory")
def _(d, w):
    (d / "ftdata").mkdir()
    return ["finetune", "--run", w / "teacher", "--data", d / "ftdata", "--out", d / "ft", "--steps", 1, "--warmup", 0,
            "--quiet"], "ftdata.*is a directory, expected a file", d / "ft"


def _ft_data(d):
    return _w(d, "ft.jsonl", '{"prompt": "ka lo", "completion": " mi"}\n' * 6)


@_case("finetune-out-is-its-own-run")
def _(d, w):
    run = _copy(w / "teacher", d / "base")
    return ["finetune", "--run", run, "--data", _ft_data(d), "--out", run, "--steps", 1, "--warmup", 0, "--quiet"], \
        "contains an input", None


@_case("finetune-out-inside-its-run")
def _(d, w):
    run = _copy(w / "teacher", d / "base")
    return ["finetune", "--run", run, "--data", _ft_data(d), "--out", run / "ft", "--steps", 1, "--warmup", 0,
            "--quiet"], \
        "lies inside an input", run / "ft"


@_case("finetune-resume-force-into-a-user-directory")
def _(d, w):
    _w(d, "U/metrics.jsonl", "my notes\n")
    return ["finetune", "--run", w / "teacher", "--data", _ft_data(d), "--out", d / "U", "--steps", 1, "--warmup", 0,
            "--resume", "--force", "--quiet"], "U.*not a SALT output directory", None


@_case("train-kernels-pallas-on-cpu")
def _(d, w):
    return _train(w, d / "run", "--kernels", "pallas"), "--kernels pallas needs a TPU", d / "run"


@_case("score-seq-len-longer-than-the-split")
def _(d, w):
    a = _score(w, d / "s.npz")
    a[a.index("--seq-len") + 1] = 100000
    return a, "seq_len=100000.*fewer than one window", d / "s.npz"


@_case("train-resume-with-another-preset")
def _(d, w):
    run = _copy(w / "teacher", d / "run")
    a = _train(w, run, "--resume", "--force", "--steps", 3)
    a[a.index("tiny-teacher")] = "tiny-student"
    return a, "another model.*tiny-teacher.*tiny-student", None


@_case("train-resume-edited-run-config")
def _(d, w):
    import json
    run = _copy(w / "teacher", d / "run")
    record = json.loads((run / "run_config.json").read_text())
    del record["train"]["data"]
    (run / "run_config.json").write_text(json.dumps(record))
    return _train(w, run, "--resume"), r"different configuration.*data: saved '\(not recorded\)'", None


@_case("train-resume-no-intact-checkpoint")
def _(d, w):
    return _train(w, _corrupt_teacher(d, w), "--resume"), \
        "none of its checkpoints.*intact.*--start-over", None


@_case("info-metadata-vocab-size-edited")
def _(d, w):
    import json
    store = _corrupt_store(d, w, "none")
    meta = json.loads((store / "metadata.json").read_text())
    meta["vocab_size"] = 100000
    (store / "metadata.json").write_text(json.dumps(meta))
    return ["data", "info", store, "--verify"], "vocab_size=100000.*300 pieces", None


@_case("info-bit-rot-with-size-and-mtime-kept")
def _(d, w):
    import os
    from salt.data import TokenStore
    store = _corrupt_store(d, w, "none")
    TokenStore(store)  # the check is cached for these sizes and mtimes
    path = store / "train.tokens.bin"
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[200:202] = np.uint16(5).tobytes() if data[200:202] != np.uint16(5).tobytes() else np.uint16(6).tobytes()
    path.write_bytes(bytes(data))  # a valid id, same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return ["data", "info", store], "train.tokens.bin does not match the sha256", None


@_case("train-bad-ids-behind-a-trusted-check-cache")
def _(d, w):
    import json
    from salt.data import TokenStore
    store = _corrupt_store(d, w, "none")
    TokenStore(store)
    path = store / "train.tokens.bin"
    tokens = np.fromfile(path, np.uint16)
    tokens[np.random.default_rng(0).random(tokens.size) < 0.05] = 65535
    tokens.tofile(path)
    cache = json.loads((store / "token_check.json").read_text())  # as if the rot changed no stat
    st = path.stat()
    cache["train"].update(size=st.st_size, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns, inode=st.st_ino)
    (store / "token_check.json").write_text(json.dumps(cache))
    a = _train(w, d / "run")
    a[a.index(w / "data")] = store
    return a, "train.tokens.bin holds token id 65535 >= vocab_size 300", d / "run"


def test_there_are_at_least_40_cases():
    assert len(CASES) >= 40


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, world, tmp_path):
    argv, message, out = CASES[name](tmp_path, world)
    before, shared = _snapshot(tmp_path), _snapshot(world)
    result = CliRunner().invoke(cli, [str(a) for a in argv])
    assert result.exit_code not in (0, None), result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), \
        f"uncaught {result.exception!r}"
    assert "Traceback" not in result.output
    assert re.search(message, result.output, re.S), result.output
    assert "pickle" not in result.output.lower()
    if out is not None:
        assert not pathlib.Path(out).exists(), f"partial output {out} left behind"
    assert _snapshot(tmp_path) == before, "a pre-existing file changed"
    assert _snapshot(world) == shared, "a shared input changed"
