"""The lm-evaluation-harness adapter (salt.runtime.eval.harness), offline on the local tasks of
tests/tasks: scores against the float64 reference, greedy decoding against a plain loop,
padding/batching invariance, simple_evaluate, `salt eval --tasks` and `salt-lm-eval`."""
import json
import os
import pathlib
import subprocess
import sys
import tempfile

# The harness's `datasets` must never reach the network here; its cache goes to a temp dir.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="salt-test-hf-"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from kernel_tolerances import F32_TOL, assert_close  # noqa: E402
from salt.data.tokenizer import EOS_ID  # noqa: E402
from salt.runtime.eval import harness  # noqa: E402
from salt.runtime.model.tokens import token_stats_fn  # noqa: E402
from tiny_corpus import make_tiny_corpus, save_checkpoint  # noqa: E402

TASKS = pathlib.Path(__file__).resolve().parent / "tasks"
ALL_TASKS = ["salt_mc", "salt_lambada", "salt_lambada_greedy", "salt_docs"]
SEQ_LEN = 24


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from salt.data import TokenStore, prepare
    from salt.reference.config import get_preset
    from salt.runtime.model import transformer as model

    root = tmp_path_factory.mktemp("harness")
    prepare(root / "data", [make_tiny_corpus(root / "src", n_docs=20, words=200)], vocab_size=300,
            val_fraction=0.2, progress=False)
    store = TokenStore(root / "data")
    config = get_preset("tiny-student").replace(vocab_size=store.vocab_size)
    params = model.init_params(config, seed=3)
    save_checkpoint(root / "run", config, params, store, 5,
                    run_config={"seq_len": SEQ_LEN, "data": str(root / "data")})
    return {"root": root, "run": root / "run", "config": config, "params": params, "store": store}


@pytest.fixture(scope="module")
def lm(run):
    return harness.SaltLM(run=str(run["run"]), batch_size=3)


def _req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def _ref_logprobs(run, tokens):
    """float64 reference: log P(tokens[i+1] | tokens[:i+1]) and argmax == target."""
    from salt.reference import model as ref_model
    params = ref_model.cast_params(run["params"], np.float64)
    logits = ref_model.forward(params, np.asarray([tokens[:-1]]), run["config"])[0]
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    tgt = np.asarray(tokens[1:])
    return logp[np.arange(tgt.size), tgt], logits.argmax(-1) == tgt


PAIRS = [("kalo mi", " nesu"), ("", "tari po defa"), ("ta", "ri"), ("zive ba ", "kalo gu"),
         # longer than max_length: the context keeps its last tokens
         (" ".join(["kamine suta ripo"] * 12), " defa guzi")]


def test_loglikelihood_matches_float64_reference(run, lm):
    got = lm.loglikelihood([_req("loglikelihood", c, x) for c, x in PAIRS], disable_tqdm=True)
    assert len(got) == len(PAIRS)
    for (context, continuation), (logp, greedy) in zip(PAIRS, got):
        if context:
            ctx, cont = lm._encode_pair(context, continuation)
        else:
            ctx, cont = [], lm.tok_encode(continuation)
        assert lm.tok_decode(ctx + cont) == context + continuation
        seq = ([EOS_ID] + ctx + cont)[-(SEQ_LEN + 1):]
        ref_logp, ref_greedy = _ref_logprobs(run, seq)
        assert_close(logp, ref_logp[-len(cont):].sum(), F32_TOL, f"loglikelihood{(context, continuation)}")
        assert greedy == bool(ref_greedy[-len(cont):].all())
    assert len(lm.tok_encode(PAIRS[-1][0])) > SEQ_LEN  # the truncation case is exercised


@pytest.mark.slow
def test_scores_do_not_depend_on_batching_or_padding(run, lm):
    reqs = [_req("loglikelihood", c, x) for c, x in PAIRS]
    one = harness.SaltLM(run=str(run["run"]), batch_size=1).loglikelihood(reqs, disable_tqdm=True)
    many = lm.loglikelihood(reqs, disable_tqdm=True)
    np.testing.assert_allclose([s for s, _ in one], [s for s, _ in many], rtol=1e-6, atol=1e-5)
    assert [g for _, g in one] == [g for _, g in many]


def test_scoring_compiles_once_per_length_bucket(run, lm):
    reqs = [_req("loglikelihood", c, x) for c, x in PAIRS]
    lm.loglikelihood(reqs, disable_tqdm=True)
    fn = token_stats_fn(run["config"], lm.kernels, dtype=lm.dtype)
    compiled = fn._cache_size()
    # other lengths in the same buckets (16 and 32 positions): no new executable
    other = [_req("loglikelihood", c[:-1] or "k", x + "a") for c, x in PAIRS]
    assert len(lm.loglikelihood(other, disable_tqdm=True)) == len(other)
    assert fn._cache_size() == compiled


def test_loglikelihood_of_a_greedy_continuation_is_greedy(run, lm):
    """Token level (re-encoding decoded text need not give the same ids): the ids greedy
    decoding produced are the argmax at every position, and a changed last id is not."""
    from salt.runtime.model.generate import greedy_generate
    ctx = [EOS_ID] + lm.tok_encode("kalo mi ne")
    new = greedy_generate(run["params"], run["config"], [ctx], 4, eos_id=EOS_ID)[0]
    assert len(new) == 4
    (_, greedy), (_, other) = lm._loglikelihood_tokens(
        [(None, ctx, new), (None, ctx, new[:-1] + [(new[-1] + 1) % run["config"].vocab_size])])
    assert greedy and not other


def test_rolling_loglikelihood(run, lm):
    short, long_text = "kalo mi nesu", " ".join(["suta ripo defa guzi"] * 10)
    assert len(lm.tok_encode(long_text)) > 2 * SEQ_LEN  # several windows
    got = lm.loglikelihood_rolling([_req("loglikelihood_rolling", t) for t in (short, long_text)],
                                   disable_tqdm=True)
    # a text shorter than the context is one window conditioned on EOS
    ids = lm.tok_encode(short)
    assert_close(got[0], _ref_logprobs(run, [EOS_ID] + ids)[0].sum(), F32_TOL, "rolling short")
    # a long text: disjoint windows of SEQ_LEN predictions, each conditioned on what precedes
    # it (the first on EOS), every token predicted exactly once
    ids = lm.tok_encode(long_text)
    full, expected, start = [EOS_ID] + ids, 0.0, 0
    while start < len(ids):
        stop = min(start + SEQ_LEN, len(ids))
        window = full[max(0, stop - SEQ_LEN):stop + 1]   # SEQ_LEN inputs, the last stop - start scored
        expected += _ref_logprobs(run, window)[0][-(stop - start):].sum()
        start = stop
    assert_close(got[1], expected, F32_TOL, "rolling long")


def _plain_greedy(run, prompt_ids, n):
    """The definition: n times, append the argmax of the (float64 reference) model's logits
    at the last position; stop at EOS."""
    from salt.reference import model as ref_model
    params = ref_model.cast_params(run["params"], np.float64)
    ids = list(prompt_ids)
    for _ in range(n):
        nxt = int(np.argmax(ref_model.forward(params, np.asarray([ids]), run["config"])[0, -1]))
        if nxt == EOS_ID:
            break
        ids.append(nxt)
    return ids[len(prompt_ids):]


def test_generate_until_is_greedy_and_cuts_at_until(run, lm):
    prompts = ["ka", "lomi nesu tari", "po", "defa guzi veba kalo mi ne su"]
    reqs = [_req("generate_until", p, {"until": [], "max_gen_toks": 7}) for p in prompts]
    texts = lm.generate_until(reqs, disable_tqdm=True)
    for p, text in zip(prompts, texts):
        want = _plain_greedy(run, [EOS_ID] + lm.tok_encode(p), 7)
        assert text == lm.tok_decode(want), p
    # the same with batch size 1: padding rows and bucket lengths change nothing
    assert harness.SaltLM(run=str(run["run"]), batch_size=1).generate_until(reqs, disable_tqdm=True) == texts
    # until: the text ends before the first stop string
    for p, text in zip(prompts, texts):
        if len(text) > 2:
            stop = text[1:3]
            got = lm.generate_until([_req("generate_until", p, {"until": [stop], "max_gen_toks": 7})],
                                    disable_tqdm=True)[0]
            assert got == text[:text.index(stop)]
    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until([_req("generate_until", "ka", {"do_sample": True, "temperature": 1.0})])


def test_bad_model_arguments_are_clear(run, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        harness.SaltLM(run=str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="unknown salt model argument"):
        harness.SaltLM(run=str(run["run"]), temprature=0.5)
    with pytest.raises(ValueError, match="no checkpoint of step 7"):
        harness.SaltLM(run=str(run["run"]), step=7)


# ----------------------------------------------------------------------------- through the harness
def test_simple_evaluate_on_local_tasks(run, lm):
    from lm_eval import simple_evaluate

    out = simple_evaluate(model=lm, tasks=ALL_TASKS, task_manager=harness.task_manager(ALL_TASKS, TASKS),
                          limit=4, bootstrap_iters=10, log_samples=True)
    res = out["results"]
    assert set(ALL_TASKS) <= set(res)
    for key in ("acc,none", "acc_norm,none"):
        assert 0.0 <= res["salt_mc"][key] <= 1.0
    assert 0.0 <= res["salt_lambada"]["acc,none"] <= 1.0 and res["salt_lambada"]["perplexity,none"] > 1.0
    assert 0.0 <= res["salt_lambada_greedy"]["exact_match,first_word"] <= 1.0
    assert res["salt_docs"]["bits_per_byte,none"] > 0.0
    # the harness's per-document answers are the adapter's own
    sample = out["samples"]["salt_mc"][0]
    direct = lm.loglikelihood([_req("loglikelihood", *a) for a in (r.args for r in _mc_requests(sample))],
                              disable_tqdm=True)
    np.testing.assert_allclose([float(r[0][0]) for r in sample["resps"]], [d[0] for d in direct], rtol=1e-6)
    assert sample["acc"] == float(np.argmax([d[0] for d in direct]) == sample["target"])


def _mc_requests(sample):
    return [_req("loglikelihood", *a) for a in sample["arguments"].values()] if isinstance(
        sample["arguments"], dict) else [_req("loglikelihood", *a) for a in sample["arguments"]]


def test_simple_evaluate_by_registered_name(run):
    from lm_eval import simple_evaluate

    out = simple_evaluate(model="salt", model_args=f"run={run['run']},step=5,batch_size=2",
                          tasks=["salt_lambada"], task_manager=harness.task_manager(["salt_lambada"], TASKS),
                          limit=3, bootstrap_iters=10)
    assert out["results"]["salt_lambada"]["sample_len"] == 3


def test_bad_task_names_are_clear():
    # the check of task_manager, on a manager of the local tasks only (the full one indexes
    # the harness's built-in tasks, tens of seconds: see the slow CLI test below)
    from lm_eval.tasks import TaskManager
    tm = TaskManager(include_path=str(TASKS), include_defaults=False)
    harness.check_tasks(tm, ALL_TASKS)
    with pytest.raises(ValueError, match=r"unknown task\(s\): 'salt_lambda' \(did you mean salt_lambada"):
        harness.check_tasks(tm, ["salt_mc", "salt_lambda"], str(TASKS))


def _eval(*args):
    from salt.cli.main import cli
    return CliRunner().invoke(cli, ["eval", *map(str, args)], catch_exceptions=False)


def test_salt_eval_tasks_writes_the_harness_json(run, tmp_path):
    out = tmp_path / "results.json"
    result = _eval("--run", run["run"], "--tasks", "salt_mc,salt_lambada", "--tasks-dir", TASKS,
                   "--limit", 3, "--batch", 4, "--out", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["results"]["salt_mc"]["sample_len"] == 3 and "salt_lambada" in data["results"]
    assert data["salt"]["step"] == 5 and data["salt"]["max_length"] == SEQ_LEN
    assert not [p for p in tmp_path.iterdir() if p.name != "results.json"]  # no temp files left
    # an existing --out is never overwritten
    before = out.read_text()
    result = _eval("--run", run["run"], "--tasks", "salt_mc", "--tasks-dir", TASKS, "--out", out)
    assert result.exit_code != 0 and "already exists" in result.output and out.read_text() == before


def test_salt_eval_tasks_errors_are_clear(run, tmp_path):
    result = _eval("--run", tmp_path / "missing", "--tasks", "salt_mc", "--tasks-dir", TASKS)
    assert result.exit_code != 0 and "does not exist" in result.output
    assert "Traceback" not in result.output
    result = _eval("--run", run["run"], "--tasks", "salt_mc", "--tasks-dir", tmp_path / "nodir")
    assert result.exit_code != 0 and "tasks directory" in result.output
    result = _eval("--run", run["run"], "--step", 9, "--tasks", "salt_mc", "--tasks-dir", TASKS)
    assert result.exit_code != 0 and "no checkpoint of step 9" in result.output


@pytest.mark.slow
def test_salt_eval_unknown_task_is_clear(run):
    """Indexes the harness's built-in tasks (tens of seconds) before saying no."""
    result = _eval("--run", run["run"], "--tasks", "salt_mc,salt_lambda", "--tasks-dir", TASKS)
    assert result.exit_code != 0, result.output
    assert "unknown task(s): 'salt_lambda'" in result.output and "salt_lambada" in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_salt_lm_eval_console_script(run, tmp_path):
    """The harness's own CLI with `--model salt` (the console script salt-lm-eval)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-c", "from salt.runtime.eval.harness import lm_eval_main; lm_eval_main()",
           "--model", "salt", "--model_args", f"run={run['run']},step=5", "--tasks", "salt_mc",
           "--include_path", str(TASKS), "--limit", "2", "--batch_size", "2",
           "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = list((tmp_path / "out").rglob("results_*.json"))
    assert len(files) == 1
    assert json.loads(files[0].read_text())["results"]["salt_mc"]["sample_len"] == 2
