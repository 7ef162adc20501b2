"""Held-out metrics, teacher buckets, `salt eval`."""
import numpy as np
import pytest

from salt.runtime.eval import evaluate as E
from tiny_corpus import make_tiny_corpus, save_checkpoint


def _stats(ids, loss_sum, correct, T=4):
    ids = np.asarray(ids, np.int64)
    return {"window_ids": ids, "loss_sum": np.asarray(loss_sum, np.float64),
            "correct": np.asarray(correct, np.int64), "n_tokens": np.full(ids.size, T, np.int64)}


def test_summarize_token_weighted_metrics():
    s = _stats([0, 1, 2], [4.0, 8.0, 0.0], [1, 2, 4])
    m = E.summarize(s)
    assert m["accuracy"] == pytest.approx(7 / 12)
    assert m["log_ppl"] == pytest.approx(12 / 12)
    assert m["n_windows"] == 3 and m["n_tokens"] == 12
    assert "buckets" not in m


def test_buckets_are_teacher_loss_tertiles_with_id_ties():
    # teacher mean losses: id 10 -> 0.5, 11 -> 0.25, 12 -> 0.5 (tie with 10), 13 -> 2, 14 -> 1, 15 -> 3, 16 -> 0
    teacher = _stats([10, 11, 12, 13, 14, 15, 16], [2, 1, 2, 8, 4, 12, 0], [0] * 7)
    np.testing.assert_array_equal(E.bucket_order(teacher), [16, 11, 10, 12, 14, 13, 15])
    b = E.buckets(teacher)
    np.testing.assert_array_equal(b["easy"], [16, 11, 10])   # array_split: 3, 2, 2
    np.testing.assert_array_equal(b["medium"], [12, 14])
    np.testing.assert_array_equal(b["hard"], [13, 15])
    # A model's stats in a different window order; the buckets follow the ids.
    model = _stats([16, 15, 14, 13, 12, 11, 10], [4, 8, 12, 16, 20, 24, 28], [4, 3, 2, 1, 0, 0, 0])
    m = E.summarize(model, teacher)
    easy = m["buckets"]["easy"]  # ids 16, 11, 10 -> loss 4 + 24 + 28, correct 4 + 0 + 0
    assert easy["log_ppl"] == pytest.approx(56 / 12) and easy["accuracy"] == pytest.approx(4 / 12)
    hard = m["buckets"]["hard"]  # ids 13, 15 -> loss 16 + 8, correct 1 + 3
    assert hard["log_ppl"] == pytest.approx(24 / 8) and hard["accuracy"] == pytest.approx(4 / 8)
    # overall is unchanged by bucketing
    assert m["log_ppl"] == pytest.approx(E.summarize(model)["log_ppl"])


def test_summarize_rejects_mismatched_windows():
    teacher = _stats([0, 1, 2, 3], [1, 2, 3, 4], [0] * 4)
    with pytest.raises(ValueError, match="missing"):
        E.summarize(_stats([0, 1, 2], [1, 1, 1], [0] * 3), teacher)
    with pytest.raises(ValueError, match="at least 3"):
        E.buckets(_stats([0, 1], [1, 1], [0, 0]))


def test_format_table_lists_buckets():
    teacher = _stats([0, 1, 2], [1, 2, 3], [1, 2, 3])
    text = E.format_table([("m", E.summarize(teacher, teacher))])
    assert "easy acc" in text and "hard lppl" in text
    assert "50.00" in text  # overall accuracy 6/12


# ----------------------------------------------------------------------------- on real models





@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from salt.data import TokenStore, prepare
    from salt.reference.config import get_preset
    from salt.runtime.model import transformer as model

    root = tmp_path_factory.mktemp("eval")
    prepare(root / "data", [make_tiny_corpus(root / "src")], vocab_size=300, val_fraction=0.2,
            progress=False)
    store = TokenStore(root / "data")
    out = {"root": root, "data": root / "data", "store": store}
    for name, preset, seed in (("student", "tiny-student", 1), ("teacher", "tiny-teacher", 2)):
        config = get_preset(preset).replace(vocab_size=store.vocab_size)
        params = model.init_params(config, seed=seed)
        save_checkpoint(root / name, config, params, store, 5,
                        run_config={"seq_len": 16, "batch": 4, "seed": 0, "kd_steps": 0})
        out[name] = (config, params)
    return out


def _reference_stats(params, config, data, seq_len, max_windows):
    from salt.data import validation_batches
    from salt.reference.model import forward as ref_forward

    p64 = __import__("jax").tree.map(lambda x: np.asarray(x, np.float64), params)
    windows = np.concatenate([w for _, w in validation_batches(data, seq_len=seq_len, batch_size=64,
                                                               max_windows=max_windows)])
    logits = ref_forward(p64, windows[:, :-1], config)
    targets = windows[:, 1:]
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ce = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return ce, logits.argmax(-1) == targets


def test_window_stats_equal_float64_reference(models):
    config, params = models["student"]
    stats = E.window_stats(params, config, models["data"], seq_len=16, batch_size=5, max_windows=23)
    ce, correct = _reference_stats(params, config, models["data"], 16, 23)
    np.testing.assert_array_equal(stats["window_ids"], np.arange(23))
    np.testing.assert_allclose(stats["loss_sum"], ce.sum(1), rtol=1e-5)
    np.testing.assert_array_equal(stats["correct"], correct.sum(1))
    np.testing.assert_array_equal(stats["n_tokens"], np.full(23, 16))


def test_cli_eval_json_and_table(models):
    import json

    from click.testing import CliRunner

    from salt.cli.main import cli

    runner = CliRunner()
    argv = ["eval", "--run", str(models["root"] / "student"), "--data", str(models["data"]),
            "--teacher", str(models["root"] / "teacher"), "--max-windows", "30", "--quiet"]
    r = runner.invoke(cli, argv + ["--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.output)
    assert result["seq_len"] == 16 and result["model"]["step"] == 5
    m = result["metrics"]
    assert m["n_windows"] == 30 and set(m["buckets"]) == {"easy", "medium", "hard"}
    assert sum(b["n_windows"] for b in m["buckets"].values()) == 30
    # the teacher's own buckets are ordered by its loss
    tb = result["teacher_metrics"]["buckets"]
    assert tb["easy"]["log_ppl"] <= tb["medium"]["log_ppl"] <= tb["hard"]["log_ppl"]
    # same numbers as the library on the reference-checked per-window stats
    config, params = models["student"]
    stats = E.window_stats(params, config, models["data"], seq_len=16, max_windows=30)
    assert m["log_ppl"] == pytest.approx(stats["loss_sum"].sum() / (30 * 16), rel=1e-12)
    r = runner.invoke(cli, argv)
    assert r.exit_code == 0, r.output
    assert "easy acc" in r.output and "teacher" in r.output


@pytest.mark.parametrize("flag, value, message", [
    ("--run", "/nonexistent/run", "does not exist"),
    ("--data", "/nonexistent/data", "does not exist"),
    ("--step", "7", "no checkpoint of step 7"),
    ("--max-windows", "0", "max_windows must be"),
])
def test_cli_eval_bad_input(models, flag, value, message):
    from click.testing import CliRunner

    from salt.cli.main import cli

    args = {"--run": str(models["root"] / "student"), "--data": str(models["data"])}
    args[flag] = value
    r = CliRunner().invoke(cli, ["eval", "--quiet"] + [x for kv in args.items() for x in kv])
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output


def test_eval_refuses_tokenizer_mismatch(models, tmp_path):
    from salt.runtime.model import checkpoint

    config, params = models["student"]
    meta = {"config": config.to_dict(), "tokenizer_sha256": "0" * 64, "vocab_size": 300,
            "run_config": {"seq_len": 16}}
    checkpoint.save(tmp_path / "other", 1, params, {"count": np.zeros((), np.int32)}, meta)
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        E.evaluate_checkpoints(tmp_path / "other", data_dir=models["data"], max_windows=3)
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        E.evaluate_checkpoints(models["root"] / "student", data_dir=models["data"],
                               teacher=tmp_path / "other", max_windows=3)
