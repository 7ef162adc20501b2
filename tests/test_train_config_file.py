"""`salt train --config FILE`: nested groups in YAML or JSON, flags override the file, a run
re-launched from its own run_config.json trains bit-identically, unknown / misplaced / mistyped
keys are errors naming the key."""
import json

import pytest
import yaml
from click.testing import CliRunner

from salt.cli.main import cli
from salt.runtime.train.config import GROUPS, TrainConfig, TrainError
from salt.runtime.train.config_file import load_config_file
from tiny_corpus import make_tiny_corpus


def _cli(*args):
    return CliRunner().invoke(cli, [*map(str, args)], catch_exceptions=False)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from salt.data import prepare
    root = tmp_path_factory.mktemp("config_file")
    src = make_tiny_corpus(root / "src", n_docs=20, words=200, seed=3)
    prepare(root / "data", [src], vocab_size=300, val_fraction=0.2, progress=False)
    result = _cli("train", "--preset", "tiny-teacher", "--data", root / "data", "--out", root / "teacher",
                  "--steps", 2, "--batch", 4, "--seq-len", 8, "--optimizer", "adamw", "--quiet")
    assert result.exit_code == 0, result.output
    return root


def _rows(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # tokens/s: wall-clock


def _params(run, step):
    import jax
    import numpy as np

    from salt.runtime.model.checkpoint import load_params
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(load_params(run, step)[1])]


@pytest.mark.slow
def test_yaml_groups_flags_override_and_rerun_from_run_config_is_bit_identical(root, tmp_path):
    import numpy as np
    cfg = {"model": {"preset": "tiny-student"},
           "data": {"data": str(root / "data"), "batch": 4, "seq_len": 8, "seed": 1},
           "kd": {"teacher": str(root / "teacher"), "kd_steps": 2, "omega": 0.5},
           "optimizer": {"optimizer": "adamw", "steps": 3, "lr": 0.01},
           "run": {"out": str(tmp_path / "from-yaml")}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    result = _cli("train", "--config", tmp_path / "run.yaml", "--steps", 4, "--quiet")  # the flag wins
    assert result.exit_code == 0, result.output
    recorded = json.loads((tmp_path / "from-yaml" / "run_config.json").read_text())["train"]
    assert recorded["steps"] == 4 and recorded["omega"] == 0.5 and recorded["seed"] == 1
    assert recorded["lr"] == 0.01 and recorded["teacher"] == str(root / "teacher")
    assert recorded["final_lr"] == TrainConfig.final_lr  # not in the file, not a flag: the default
    # the same run from flags alone: the same run_config.json record and the same training
    flags = _cli("train", "--preset", "tiny-student", "--data", root / "data", "--batch", 4, "--seq-len", 8,
                 "--seed", 1, "--teacher", root / "teacher", "--kd-steps", 2, "--omega", 0.5, "--optimizer", "adamw",
                 "--steps", 4, "--lr", 0.01, "--out", tmp_path / "from-flags", "--quiet")
    assert flags.exit_code == 0, flags.output
    again = json.loads((tmp_path / "from-flags" / "run_config.json").read_text())["train"]
    assert {k: v for k, v in again.items() if k != "out"} == {k: v for k, v in recorded.items() if k != "out"}
    # re-launched from its own run_config.json (a new --out): bit-identical metrics and parameters
    rerun = _cli("train", "--config", tmp_path / "from-yaml" / "run_config.json", "--out", tmp_path / "rerun",
                 "--quiet")
    assert rerun.exit_code == 0, rerun.output
    assert _rows(tmp_path / "rerun") == _rows(tmp_path / "from-yaml") == _rows(tmp_path / "from-flags")
    for a, b in zip(_params(tmp_path / "rerun", 4), _params(tmp_path / "from-yaml", 4)):
        np.testing.assert_array_equal(a, b)
    nested = TrainConfig.from_dict(recorded).to_nested()
    assert set(nested) == set(GROUPS) and nested["kd"]["omega"] == 0.5
    (tmp_path / "nested.json").write_text(json.dumps(nested))
    assert load_config_file(tmp_path / "nested.json") == {
        k: tuple(v) if k == "keep_checkpoints" else v for k, v in recorded.items()}


@pytest.mark.parametrize("doc, message", [
    ({"optimzer": {"lr": 0.1}}, "unknown key 'optimzer' (did you mean 'optimizer'?)"),
    ({"optimizer": {"learning_rate": 0.1}}, "optimizer: unknown key 'learning_rate'"),
    ({"model": {"steps": 3}}, "key model.steps belongs in group 'optimizer'"),
    ({"optimizer": {"steps": "3"}}, "optimizer.steps = '3' is not an integer"),
    ({"optimizer": {"lr": True}}, "optimizer.lr = True is not a number"),
    ({"run": {"keep_checkpoints": [1, "x"]}}, "run.keep_checkpoints"),
    ({"kd": [1, 2]}, "group 'kd' must be a mapping"),
    ([1, 2], "expected a mapping of groups"),
])
def test_bad_config_names_the_key(tmp_path, doc, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(TrainError) as e:
        load_config_file(path)
    assert message in str(e.value) and str(path) in str(e.value)
    result = _cli("train", "--config", path, "--out", tmp_path / "run")
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_unparsable_file_and_missing_required_settings(tmp_path):
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    result = _cli("train", "--config", tmp_path / "bad.yaml")
    assert result.exit_code != 0 and "not valid YAML" in result.output and "Traceback" not in result.output
    (tmp_path / "part.yaml").write_text(yaml.safe_dump({"model": {"preset": "tiny-student"}}))
    result = _cli("train", "--config", tmp_path / "part.yaml", "--steps", 2)
    assert result.exit_code != 0 and "--data, --out" in result.output
