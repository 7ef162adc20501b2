"""`salt data prepare` / `salt data info`: success output and clean errors (no tracebacks)."""
import gzip
import json
import random

import pytest
from click.testing import CliRunner

from salt.cli.main import cli


@pytest.fixture
def src(tmp_path):
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefgh ijk\n\t") for _ in range(rng.randint(3, 10))) for _ in range(200)]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=60))}) + "\n" for _ in range(40)))
    return path


def run(*args):
    return CliRunner().invoke(cli, ["data", *map(str, args)])


def assert_clean_error(result, *fragments):
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert "Error:" in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def test_prepare_and_info(src, tmp_path):
    out = tmp_path / "store"
    result = run("prepare", src, "--out", out, "--vocab-size", 300, "--val-fraction", 0.1, "--workers", 1)
    assert result.exit_code == 0, result.output
    assert "round trip decode(encode(doc)) == doc" in result.output
    assert "token store written to" in result.output
    info = run("info", out)
    assert info.exit_code == 0, info.output
    assert "vocab_size 300" in info.output and "train:" in info.output
    meta = json.loads(run("info", out, "--json").output)
    assert meta["vocab_size"] == 300 and meta["val_fraction"] == 0.1


def test_prepare_errors_are_clean(src, tmp_path):
    out = tmp_path / "store"
    assert run("prepare", src, "--out", out, "--vocab-size", 300, "--quiet").exit_code == 0
    assert_clean_error(run("prepare", src, "--out", out, "--vocab-size", 300),
                       "already exists", "--overwrite")
    assert run("prepare", src, "--out", out, "--vocab-size", 300, "--overwrite", "--quiet").exit_code == 0

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n')
    assert_clean_error(run("prepare", bad, "--out", tmp_path / "o1"), "bad.jsonl:2", "malformed JSON")
    assert_clean_error(run("prepare", src, "--out", tmp_path / "o2", "--text-field", "body"),
                       "corpus.jsonl:1", "no field 'body'")
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(src.read_bytes())[:200])
    assert_clean_error(run("prepare", cut, "--out", tmp_path / "o3"), "cut.jsonl.gz", "truncated")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert_clean_error(run("prepare", empty, "--out", tmp_path / "o4"), "empty corpus")
    assert_clean_error(run("prepare", src, "--out", tmp_path / "o5", "--vocab-size", 50000),
                       "too large", "largest size that works")
    assert_clean_error(run("prepare", tmp_path / "missing", "--out", tmp_path / "o6"), "no such file")
    assert_clean_error(run("info", tmp_path / "o6"), "no such directory")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert_clean_error(run("prepare", src, "--out", a_file / "store"), str(a_file / "store"))
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    assert_clean_error(run("prepare", src, "--out", tmp_path / "o7", "--tokenizer", garbage),
                       str(garbage), "not a readable SentencePiece model")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 8))


def test_skip_invalid_is_reported(tmp_path, src):
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(src.read_text() + "{oops\n" + json.dumps({"body": 1}) + "\n")
    result = run("prepare", mixed, "--out", tmp_path / "s", "--vocab-size", 300, "--skip-invalid")
    assert result.exit_code == 0, result.output
    assert "invalid_json_lines=1" in result.output and "missing_field_lines=1" in result.output


def test_quiet_still_reports_skipped_inputs(tmp_path, src):
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(src.read_text() + "{oops\n")
    result = run("prepare", mixed, "--out", tmp_path / "s", "--vocab-size", 300, "--skip-invalid", "--quiet")
    assert result.exit_code == 0, result.output
    assert "invalid_json_lines=1" in result.output


def test_bench_data_smoke(src, tmp_path):
    # The benchmark's loader part on a tiny store (the prepare part runs on the embedded corpus).
    out = tmp_path / "store"
    assert run("prepare", src, "--out", out, "--vocab-size", 300, "--quiet").exit_code == 0
    result = CliRunner().invoke(cli, ["bench", "data", "--store", str(out), "--seq-len", "8",
                                      "--batch", "4", "--batches", "3", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["loader_batches"] == 3 and report["loader_tokens_per_s"] > 0


def test_bench_data_refuses_an_existing_out(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    result = CliRunner().invoke(cli, ["bench", "data", "--out", str(tmp_path), "--json"])
    assert result.exit_code != 0
    assert "not a SALT store" in result.output and "Traceback" not in result.output
    assert (tmp_path / "keep.txt").read_text() == "user data"
    result = CliRunner().invoke(cli, ["bench", "data", "--out", str(tmp_path), "--json", "--overwrite"])
    assert result.exit_code != 0 and "refusing to replace" in result.output
    assert (tmp_path / "keep.txt").read_text() == "user data"
