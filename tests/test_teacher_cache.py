"""``salt teacher cache`` and ``salt train --teacher-cache``: the cached-teacher KD run equals the
online top-k KD run over 20 steps; kill -9 during a build, then resume, gives byte-identical files;
a cache that does not match the run is refused, naming the mismatch; the on-disk size; ``salt
bench step --kd-topk`` times the cached step; ``salt reproduce --teacher-cache auto``."""
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
from salt.core.lock import LOCK_NAME
from tiny_corpus import make_tiny_corpus

K, STEPS, BATCH, SEQ = 8, 20, 4, 8
NPY_HEADER = 128  # bytes of a version-1 .npy header of these small shapes


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


@pytest.mark.slow
def test_cached_kd_equals_online_topk_kd(setup):
    root = setup
    result = _cli(*_cache_args(root, root / "cache32", STEPS, "--values-dtype", "float32"))
    assert result.exit_code == 0, result.output
    # per step: float32 logits and uint16 ids (V = 300) [B, T, K], float32 lse [B, T], three .npy headers
    assert json.loads(result.output)["bytes"] == STEPS * (BATCH * SEQ * (K * (4 + 2) + 4) + 3 * NPY_HEADER)
    assert _student(root, "online", "--teacher", root / "teacher").exit_code == 0
    result = _student(root, "cached", "--teacher-cache", root / "cache32")
    assert result.exit_code == 0, result.output
    online, cached = _metrics(root / "online"), _metrics(root / "cached")
    assert len(online) == len(cached) == STEPS
    for a, b in zip(online, cached):
        for key in ("loss", "ce", "kd", "kl", "accuracy", "grad_norm"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=f"step {a['step']} {key}")
    # the default compact storage (5-bit logits, docs/design.md §2): the same run within 2 %
    assert _cli(*_cache_args(root, root / "cache16")).exit_code == 0
    assert _student(root, "cached16", "--teacher-cache", root / "cache16").exit_code == 0
    for a, b in zip(online, _metrics(root / "cached16")):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=2e-2, err_msg=f"step {a['step']}")


@pytest.mark.slow
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


def test_cache_of_another_data_order_or_tokenizer_is_refused(setup, tmp_path):
    """A subset (SALT_DS's order) the cache was not built over, and another tokenizer, are refused."""
    from salt.data import prepare
    root = setup
    if not (root / "cache32").exists():
        assert _cli(*_cache_args(root, root / "cache32", STEPS, "--values-dtype", "float32")).exit_code == 0
    np.save(tmp_path / "subset.npy", np.arange(16, dtype=np.int64))
    other = tmp_path / "other"
    prepare(other, [root / "src"], vocab_size=280, val_fraction=0.2, progress=False)
    for data, extra, message in ((root / "data", ["--subset", tmp_path / "subset.npy"], "KD data order"),
                                 (other, [], "tokenizer sha256")):
        result = _cli("train", "--preset", "tiny-student", "--data", data, "--out", tmp_path / "refused",
                      "--steps", STEPS, "--kd-steps", STEPS, "--kd-topk", K, "--batch", BATCH, "--seq-len", SEQ,
                      "--quiet", "--teacher-cache", root / "cache32", *extra)
        assert result.exit_code != 0 and message in result.output, result.output
        assert "Traceback" not in result.output and not (tmp_path / "refused").exists()


@pytest.mark.slow
def test_kill_during_build_then_resume_is_byte_identical(setup, tmp_path):
    root = setup
    steps = 400
    fresh, killed = tmp_path / "fresh", tmp_path / "killed"
    env = dict(os.environ)
    command = [sys.executable, "-c", "from salt.cli.main import cli; cli()"]
    proc = subprocess.Popen(command + list(map(str, _cache_args(root, killed, steps))), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while not (killed / "step_000003.rows.npy").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the build never got going"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not json.loads((killed / "cache.json").read_text())["complete"], "killed too late"
    assert not (killed / f"step_{steps:06d}.rows.npy").exists()
    assert _cli(*_cache_args(root, killed, steps)).exit_code == 0  # resume
    assert _cli(*_cache_args(root, fresh, steps)).exit_code == 0
    names = sorted(p.name for p in fresh.iterdir() if p.name != LOCK_NAME)  # (the lock file stays, empty)
    assert names == sorted(p.name for p in killed.iterdir() if p.name != LOCK_NAME)  # no temporary left
    assert len(names) == steps + 1  # the compact layout: one file per step
    for name in names:
        assert (fresh / name).read_bytes() == (killed / name).read_bytes(), name
    # a different build into the same directory is refused
    result = _cli(*_cache_args(root, fresh, steps, "--seed", 5))
    assert result.exit_code != 0 and "seed" in result.output


def test_ids_dtype_and_bytes_per_token_from_written_files():
    from salt.runtime.train.teacher_cache import bytes_per_token, ids_dtype
    assert [ids_dtype(v).name for v in (2, 256, 257, 65536, 65537, 256_000)] == \
        ["uint8", "uint8", "uint16", "uint16", "uint32", "uint32"]
    n = 4 * 8  # positions of one step
    for k, vocab, id_bytes in ((16, 300, 2), (64, 300, 2), (128, 256_000, 4), (64, 200, 1)):
        expected = (n * (k * (2 + id_bytes) + 4) + 3 * NPY_HEADER) / n  # bf16 logits, ids, f32 lse
        assert bytes_per_token(k, vocab, values_dtype="bfloat16", batch=4, seq_len=8) == expected, (k, vocab)
    assert bytes_per_token(64, 300, values_dtype="float32", batch=4, seq_len=8) == \
        (n * (64 * 6 + 4) + 3 * NPY_HEADER) / n


def test_cache_refuses_foreign_out_and_bad_k(setup, tmp_path):
    root = setup
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    result = _cli(*_cache_args(root, foreign, 2))
    assert result.exit_code != 0 and "no valid cache.json" in result.output and "Traceback" not in result.output
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    killed = tmp_path / "killed-early"  # kill -9 while the first cache.json was being written
    killed.mkdir()
    (killed / ".cache.json.x1y2.tmp").write_text('{"form')
    assert _cli(*_cache_args(root, killed, 2)).exit_code == 0
    assert sorted(p.name for p in killed.iterdir()) == sorted(
        [LOCK_NAME, "cache.json"] + [f"step_{s:06d}.rows.npy" for s in (1, 2)])
    result = _cli(*_cache_args(root, tmp_path / "k", 2, "--top-k", 301))  # the later --top-k wins
    assert result.exit_code != 0 and "--top-k" in result.output and not (tmp_path / "k").exists()
    result = _cli("train", "--preset", "tiny-student", "--data", root / "data", "--out", tmp_path / "r",
                  "--steps", 2, "--kd-steps", 2, "--kd-topk", K, "--batch", BATCH, "--seq-len", SEQ,
                  "--quiet", "--teacher-cache", tmp_path / "nothing")
    assert result.exit_code != 0 and "cache.json" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_bench_step_times_the_cached_step(setup):
    """`salt bench step --kd-topk` at tiny sizes: three steps interleaved, the cache's size."""
    from salt.bench.step import format_report, run_benchmark
    r = run_benchmark("tiny-student", "tiny-teacher", vocab=300, batch=BATCH, seq_len=SEQ, optimizer="adamw",
                      iters=1, warmup=0, matmul_n=128, kd_topk=K, progress=False)
    assert r["kd_topk"] == K and r["cached_step_s"] > 0 and r["kd_step_s"] > 0
    assert r["cache_read_s"] > 0
    assert r["cached_bf16_step_s"] > 0 and r["cache_bf16_read_s"] > 0
    assert set(r["cache_bytes_per_token"]) == set(r["cache_bf16_bytes_per_token"]) == {"300", "256000"}
    n = BATCH * SEQ  # bf16 logits, ids (uint16 at V = 300, uint32 at 256,000), f32 lse, three .npy headers
    for vocab, id_bytes in (("300", 2), ("256000", 4)):
        for k in (16, 64, 128):
            assert r["cache_bf16_bytes_per_token"][vocab][str(k)] == \
                (n * (k * (2 + id_bytes) + 4) + 3 * NPY_HEADER) / n
    text = format_report(r)
    assert "cached KD/standard" in text and "k=128" in text and f"top-{K} KD" in text


@pytest.mark.slow
def test_reproduce_with_teacher_cache(tmp_path):
    """`salt reproduce --tiny --teacher-cache auto`: one cache per seed and data order, every KD
    run reads one (RKD and SALT the whole pool's order, SALT_DS the selected), the report says so."""
    from salt.data import prepare
    from salt.runtime.model.checkpoint import all_steps
    src = make_tiny_corpus(tmp_path / "src")
    for f in sorted(src.iterdir()):  # sentences, for the last-word task
        words = f.read_text().split()
        f.write_text(" ".join(w + "." * (i % 9 == 8) for i, w in enumerate(words)) + "\n")
    prepare(tmp_path / "data", [src], vocab_size=300, val_fraction=0.2, progress=False)
    out = tmp_path / "rep"
    result = _cli("reproduce", "--tiny", "--data", tmp_path / "data", "--out", out, "--quiet", "--sequential",
                  "--teacher-cache", "auto", "--kd-topk", K)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["kd_topk"] == K and results["config"]["teacher_cache"] is True
    tc = results["kd"]["teacher_cache"]
    assert set(tc["builds"]) == {"teacher cache/all-seed0", "teacher cache/selected-seed0"}
    steps, kd_steps = results["config"]["steps"], results["config"]["kd_steps"]
    for order, n in (("all", steps), ("selected", kd_steps)):
        manifest = json.loads((out / "teacher_cache" / f"{order}-seed0" / "cache.json").read_text())
        assert manifest["complete"] and manifest["steps"] == n and manifest["top_k"] == K
    assert tc["cached_kd_steps"] == steps + kd_steps  # RKD's n, SALT_DS's n_kd; SALT is forked from RKD
    stages = json.loads((out / "state.json").read_text())["stages"]
    assert tc["build_s"] == pytest.approx(sum(stages[s]["seconds"] for s in tc["builds"]))
    assert tc["kd_phase_saved_s"] == pytest.approx(
        (steps + kd_steps) * (stages["overhead"]["kd_step_s"] - stages["overhead"]["cached_step_s"]))
    for name, order in (("RKD", "all"), ("SALT", "all"), ("SALT_DS", "selected")):
        run = json.loads((out / "runs" / f"{name}-seed0" / "run_config.json").read_text())["train"]
        assert run["teacher"] is None and run["kd_topk"] == K
        assert pathlib.Path(run["teacher_cache"]) == out / "teacher_cache" / f"{order}-seed0"
        assert all_steps(out / "runs" / f"{name}-seed0") == [2, 4, 6, 8]
    assert json.loads((out / "runs" / "BASELINE-seed0" / "run_config.json").read_text())["train"][
        "teacher_cache"] is None
    report = (out / "report.md").read_text()
    assert f"top-{K} KD" in report and "Teacher caches" in report and "net of the builds" in report
    # the SALT_DS selection order was honoured: its cache's windows are the selected ones
    sel = json.loads((out / "teacher_cache" / "selected-seed0" / "cache.json").read_text())["loader_state"]
    full = json.loads((out / "teacher_cache" / "all-seed0" / "cache.json").read_text())["loader_state"]
    assert sel != full


@pytest.mark.slow
def test_resume_past_the_kd_phase_needs_no_cache(setup, tmp_path):
    """A cached run resumed after its KD phase reads nothing from the cache (it may be deleted);
    inside the KD phase the missing cache is refused."""
    import shutil
    root = setup
    cache = tmp_path / "cache"
    assert _cli(*_cache_args(root, cache, 2)).exit_code == 0
    args = ["train", "--preset", "tiny-student", "--data", root / "data", "--out", tmp_path / "run", "--steps", 4,
            "--kd-steps", 2, "--kd-topk", K, "--batch", BATCH, "--seq-len", SEQ, "--optimizer", "adamw",
            "--quiet", "--checkpoint-every", 1, "--keep", 1, "--teacher-cache", cache]
    assert _cli(*args).exit_code == 0
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["1", "2", "4"]
    shutil.rmtree(cache)
    shutil.rmtree(checkpoints / "4")  # resume from step 2 = n_kd: past the KD phase
    result = _cli(*args, "--resume")
    assert result.exit_code == 0, result.output
    assert [m["step"] for m in _metrics(tmp_path / "run")] == [1, 2, 3, 4]
    shutil.rmtree(checkpoints / "2")  # from step 1: inside the KD phase
    shutil.rmtree(checkpoints / "4")
    result = _cli(*args, "--resume")
    assert result.exit_code != 0 and "cache.json" in result.output
