"""``salt train``: a tiny run end to end, and bad input -> a clear message, non-zero exit,
no traceback, nothing written."""
import json

import pytest
from click.testing import CliRunner

from salt.cli.main import cli
from tiny_corpus import make_tiny_corpus


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from salt.data import prepare
    root = tmp_path_factory.mktemp("cli_train")
    src = make_tiny_corpus(root / "src", n_docs=20, words=200, seed=2)
    prepare(root / "data", [src], vocab_size=300, val_fraction=0.2, progress=False)
    return root


def _run(*args):
    return CliRunner().invoke(cli, ["train", *map(str, args)], catch_exceptions=False)


def _base(data, out, *extra):
    return ["--preset", "tiny-teacher", "--data", data / "data", "--out", data / out, "--steps", 3,
            "--batch", 4, "--seq-len", 8, "--optimizer", "adamw", "--no-progress", *extra]


@pytest.mark.slow
def test_train_then_resume_refusals(data):
    result = _run(*_base(data, "run", "--json"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["last_step"] == 3 and summary["last_checkpoint"] == 3
    rows = (data / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3]
    before = sorted(p.name for p in (data / "run").rglob("*"))
    # exists without --resume
    result = _run(*_base(data, "run"))
    assert result.exit_code != 0 and "already exists" in result.output
    # resume with another configuration
    result = _run(*_base(data, "run", "--resume", "--lr", "0.5"))
    assert result.exit_code != 0 and "different configuration" in result.output and "lr" in result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in (data / "run").rglob("*")) == before
    # --force accepts it (nothing left to train: same step count)
    result = _run(*_base(data, "run", "--resume", "--lr", "0.5", "--force"))
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("extra, message", [
    (["--kd-steps", "5", "--teacher", "x"], "kd_steps=5 is larger than steps=3"),
    (["--kd-steps", "1", "--teacher", "x", "--omega", "1.5"], "omega"),
    (["--kd-steps", "1", "--teacher", "x", "--rho", "-1"], "rho"),
    (["--kd-steps", "1"], "needs a teacher"),
    (["--kd-steps", "1", "--teacher", "/no/such/run"], "does not exist"),
    (["--mesh", "data=3"], "not divisible|needs 3 devices"),
    (["--keep", "a,b"], "comma-separated"),
    (["--optimizer", "sgd"], "sgd"),
])
def test_bad_input(data, extra, message):
    import re
    result = _run(*_base(data, "bad", *extra))
    assert result.exit_code != 0
    assert re.search(message, result.output), result.output
    assert "Traceback" not in result.output
    assert not (data / "bad").exists()


def test_missing_data(data, tmp_path):
    result = _run("--preset", "tiny-teacher", "--data", tmp_path / "none", "--out", tmp_path / "o",
                  "--steps", 2)
    assert result.exit_code != 0 and "does not exist" in result.output
    assert not (tmp_path / "o").exists()
