"""``salt finetune``: a tiny model learns a small prompt/completion task (loss down, held-out
exact match and ROUGE reported), SIGTERM + --resume is bit-identical, the loss mask covers
the completion only, and bad JSONL is named by line number."""
import json
import os
import random
import signal

import jax
import numpy as np
import pytest
from click.testing import CliRunner

from salt.cli.main import cli
from salt.data.tokenizer import EOS_ID, PAD_ID
from salt.runtime.model import checkpoint
from salt.runtime.train import finetune as F
from tiny_corpus import SYLLABLES, make_tiny_corpus, save_checkpoint

SEQ_LEN = 24
STEPS = 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from salt.data import TokenStore, prepare
    from salt.reference.config import get_preset
    from salt.runtime.model import transformer as model

    root = tmp_path_factory.mktemp("finetune")
    prepare(root / "data", [make_tiny_corpus(root / "src", n_docs=20, words=200)], vocab_size=300,
            val_fraction=0.2, progress=False)
    store = TokenStore(root / "data")
    config = get_preset("tiny-student").replace(vocab_size=store.vocab_size)
    save_checkpoint(root / "base", config, model.init_params(config, seed=4), store, 3,
                    run_config={"seq_len": SEQ_LEN, "data": str(root / "data")})
    # the task: "yes" after prompts that start with "ka", "no" after those that start with "lo"
    rng = random.Random(0)
    lines = []
    for _ in range(60):
        first = rng.choice(["ka", "lo"])
        words = [first] + ["".join(rng.choices(SYLLABLES, k=2)) for _ in range(3)]
        lines.append(json.dumps({"prompt": " ".join(words) + " =",
                                 "completion": " yes" if first == "ka" else " no"}))
    (root / "task.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _args(root, out, *extra):
    return ["finetune", "--run", str(root / "base"), "--data", str(root / "task.jsonl"),
            "--out", str(root / out), "--steps", str(STEPS), "--batch", "8", "--optimizer", "adamw",
            "--lr", "1e-2", "--final-lr", "1e-4", "--warmup", "5", "--eval-fraction", "0.2",
            "--no-progress", *extra]


def _run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.mark.slow
def test_finetune_learns_the_task_and_reports_exact_match(setup):
    result = _run(*_args(setup, "ft", "--json"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["n_train"] == 48 and summary["n_eval"] == 12 and summary["last_step"] == STEPS
    rows = [json.loads(r) for r in (setup / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in rows]
    # from about log(300) (a random model) to a small fraction of it
    assert losses[0] > 4.0 and np.mean(losses[-5:]) < 0.25 * losses[0], losses
    ev = json.loads((setup / "ft" / "eval.json").read_text())
    assert ev == summary["eval"] and ev["n"] == 12
    preds = [json.loads(r) for r in (setup / "ft" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 12
    assert ev["exact_match"] == pytest.approx(np.mean([p["prediction"].strip() == p["completion"].strip()
                                                       for p in preds]))
    assert ev["exact_match"] >= 0.75, preds  # the task is easy: the first word decides
    for k in ("rouge1", "rouge2", "rougeL"):
        assert 0.0 <= ev[k] <= 1.0
    # the held-out examples were never trained on; the lines are the file's
    lines = (setup / "task.jsonl").read_text().splitlines()
    for p in preds:
        assert json.loads(lines[p["line"] - 1])["prompt"] == p["prompt"]
    # the result is a checkpoint the other commands load (token store and seq_len recorded)
    from salt.runtime.model.generate import LoadedModel
    loaded = LoadedModel(setup / "ft")
    assert loaded.step == STEPS and loaded.seq_len == SEQ_LEN
    # an existing --out is refused without --resume, untouched
    before = sorted(p.name for p in (setup / "ft").rglob("*"))
    result = _run(*_args(setup, "ft"))
    assert result.exit_code != 0 and "already exists" in result.output
    assert sorted(p.name for p in (setup / "ft").rglob("*")) == before


@pytest.mark.slow  # continues the run of the test above (slow tier too)
def test_sigterm_then_resume_is_bit_identical(setup, monkeypatch):
    if not (setup / "ft" / "metrics.jsonl").exists():
        pytest.fail("needs test_finetune_learns_the_task_and_reports_exact_match first")
    real = F.batch_indices

    def stop_at_17(step, *a):  # SIGTERM arrives during step 17: saved after it, then resumed
        if step == 17:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(step, *a)

    monkeypatch.setattr(F, "batch_indices", stop_at_17)
    result = _run(*_args(setup, "ft2", "--json"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # stderr has the trainer's "SIGTERM: saving..." note
    assert summary["interrupted"] and summary["last_checkpoint"] == 17 and "eval" not in summary
    monkeypatch.setattr(F, "batch_indices", real)
    result = _run(*_args(setup, "ft2", "--resume", "--json"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["start_step"] == 17
    a = (setup / "ft" / "metrics.jsonl").read_text().splitlines()
    b = (setup / "ft2" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["loss"] for r in a] == [json.loads(r)["loss"] for r in b]
    _, pa, _ = checkpoint.load_params(setup / "ft")
    _, pb, _ = checkpoint.load_params(setup / "ft2")
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert (setup / "ft" / "eval.json").read_text() == (setup / "ft2" / "eval.json").read_text()
    # a changed setting is refused on resume
    result = _run(*_args(setup, "ft2", "--resume", "--lr", "5e-3"))
    assert result.exit_code != 0 and "different configuration" in result.output


def test_the_loss_mask_covers_the_completion_and_final_eos():
    encode = lambda s: [10 + ord(c) - ord("a") for c in s]
    ex = [{"prompt": "abc", "completion": "de", "line": 1}]
    inputs, targets, mask = F.encode_examples(ex, encode, 8, "f.jsonl", eos_id=EOS_ID, pad_id=PAD_ID)
    ids = [EOS_ID] + encode("abc") + encode("de") + [EOS_ID]
    np.testing.assert_array_equal(inputs[0], ids[:-1] + [PAD_ID] * 2)
    np.testing.assert_array_equal(targets[0], ids[1:] + [PAD_ID] * 2)
    # targets d, e, EOS (positions 3, 4, 5) count; the prompt and the padding do not
    np.testing.assert_array_equal(mask[0], [0, 0, 0, 1, 1, 1, 0, 0])
    with pytest.raises(F.TrainError, match=r"f\.jsonl:1: the example has 6 tokens.*seq_len=5"):
        F.encode_examples(ex, encode, 5, "f.jsonl", eos_id=EOS_ID, pad_id=PAD_ID)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["naive", "xla"])
def test_masked_ce_is_the_mean_over_masked_positions(impl):
    import jax.numpy as jnp

    from salt.reference.config import get_preset
    from salt.runtime.model import transformer as model
    config = get_preset("tiny-student").replace(vocab_size=40)
    params = model.init_params(config, seed=0)
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, 40, (2, 6)).astype(np.int32)
    targets = rng.integers(0, 40, (2, 6)).astype(np.int32)
    mask = np.array([[0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]], np.float32)
    loss, _ = F.masked_ce(params, inputs, targets, mask, config, dtype=jnp.float32, attention_impl=impl)
    logits = np.asarray(model.forward(params, inputs, config), np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ce = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(loss), (ce * mask).sum() / mask.sum(), rtol=1e-5)
    # and it carries a gradient (the monitored parts of token_parts carry none)
    grad = jax.grad(lambda p: F.masked_ce(p, inputs, targets, mask, config, dtype=jnp.float32,
                                          attention_impl=impl)[0])(params)
    assert float(jnp.sum(jnp.abs(grad["embed"]))) > 0.0


def test_batches_follow_from_seed_and_step():
    a = [F.batch_indices(s, 4, 10, 0) for s in range(1, 6)]
    assert all(np.array_equal(x, F.batch_indices(s, 4, 10, 0)) for s, x in zip(range(1, 6), a))
    flat = np.concatenate(a)[:20]  # two epochs: each a permutation of the 10 examples
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))


@pytest.mark.parametrize("content, where, why", [
    ('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", "completion": "b"\n', ":3:", "not valid JSON"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', ":2:", "'completion' is missing"),
    ('["a", "b"]\n', ":1:", "expected a JSON object"),
    ('{"prompt": "a", "completion": 3}\n', ":1:", "not a string"),
    ('{"prompt": "a", "completion": ""}\n', ":1:", "completion is empty"),
    ('\n  \n', "", "has no examples"),
])
def test_bad_jsonl_lines_are_named(setup, tmp_path, content, where, why):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    args = _args(setup, "unused")
    args[args.index("--data") + 1] = str(bad)
    args[args.index("--out") + 1] = str(tmp_path / "out")
    result = _run(*args)
    assert result.exit_code != 0
    assert f"bad.jsonl{where}" in result.output and why in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_missing_run_and_bad_settings_are_clear(setup, tmp_path):
    args = _args(setup, "unused")
    args[args.index("--run") + 1] = str(tmp_path / "nothing")
    result = _run(*args)
    assert result.exit_code != 0 and "does not exist" in result.output
    args = _args(setup, "unused")
    args[args.index("--warmup") + 1] = "200"  # the paper's default, longer than the run
    result = _run(*args)
    assert result.exit_code != 0 and "warmup=200" in result.output
    assert not (setup / "unused").exists()
