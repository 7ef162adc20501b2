"""Special ids of a Hugging Face tokenizer's store reach generation, fine-tuning, the cloze task and
the lm-eval adapter: a byte-level BPE trained here whose eos and pad come after the learned pieces
(ids far from SentencePiece's fixed 0-3; no bos, no unk), over sentences with final words."""
import json
import os
import tempfile

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="salt-test-hf-"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

tokenizers = pytest.importorskip("tokenizers")

import jax  # noqa: E402

from kernel_tolerances import F32_TOL, assert_close  # noqa: E402
from salt.data import TokenStore, prepare  # noqa: E402
from salt.reference.config import get_preset  # noqa: E402
from salt.runtime.eval import cloze, harness  # noqa: E402
from salt.runtime.model import transformer as model  # noqa: E402
from salt.runtime.model.generate import LoadedModel, greedy_generate  # noqa: E402
from salt.runtime.train import finetune as F  # noqa: E402
from tiny_corpus import SYLLABLES, save_checkpoint  # noqa: E402

pytestmark = pytest.mark.interop

SEQ_LEN = 32
EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<pad>"


def _sentences(rng, n):
    words = lambda k: " ".join("".join(rng.choice(SYLLABLES, size=rng.integers(1, 4))) for _ in range(k))  # noqa: E731
    return " ".join(words(rng.integers(4, 9)).capitalize() + "." for _ in range(n))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tokenizers import decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("special-ids")
    rng = np.random.default_rng(0)
    src = root / "src"
    src.mkdir()
    docs = [_sentences(rng, 12) for _ in range(30)]
    for i, text in enumerate(docs):
        (src / f"doc{i:02d}.txt").write_text(text + "\n")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=290, special_tokens=[],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    n = tok.get_vocab_size()
    tok.add_special_tokens([EOS_TOKEN, PAD_TOKEN])  # ids n and n + 1: after every learned piece
    tok_dir = root / "tokenizer"
    tok_dir.mkdir()
    tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}))
    prepare(root / "data", [src], tokenizer=tok_dir, val_fraction=0.3, progress=False)
    store = TokenStore(root / "data")
    config = get_preset("tiny-student").replace(vocab_size=store.vocab_size)
    params = model.init_params(config, seed=3)
    save_checkpoint(root / "run", config, params, store, 5, run_config={"seq_len": SEQ_LEN, "data": str(root / "data")})
    return {"root": root, "store": store, "run": root / "run", "config": config, "params": params,
            "eos": n, "pad": n + 1, "tokenizer": tok}


def test_store_and_loaded_model_take_the_tokenizers_special_ids(setup):
    store = setup["store"]
    assert (setup["eos"], setup["pad"]) == (290, 291)  # after the 290 learned pieces, far from 0-3
    assert store.special_ids == {"eos": setup["eos"], "pad": setup["pad"], "bos": None, "unk": None}
    assert (store.eos_id, store.pad_id) == (setup["eos"], setup["pad"])
    store.verify()  # every document ends with the tokenizer's eos
    loaded = LoadedModel(setup["run"])
    assert (loaded.eos_id, loaded.pad_id) == (setup["eos"], setup["pad"])
    assert loaded.encode("Kalo mi.") == setup["tokenizer"].encode("Kalo mi.", add_special_tokens=False).ids


def test_greedy_generation_stops_at_the_given_eos(setup):
    params, config, eos = setup["params"], setup["config"], setup["eos"]
    prompt = [eos] + LoadedModel(setup["run"]).encode("Kalo mi ne")
    free = greedy_generate(params, config, [prompt], 12, eos_id=-1)[0]  # -1: never generated
    assert len(free) == 12
    stop = free[3]
    first = free.index(stop)
    assert greedy_generate(params, config, [prompt], 12, eos_id=stop)[0] == free[:first]
    with_eos = greedy_generate(params, config, [prompt], 12, eos_id=eos)[0]
    assert with_eos == (free[:free.index(eos)] if eos in free else free)


def test_cloze_passages_start_with_eos_and_pad_with_pad(setup):
    store = setup["store"]
    passages = cloze.build_passages(store, SEQ_LEN)
    windows, length = passages["windows_PxT1"], passages["length_P"]
    assert windows.shape[0] >= 3
    assert (windows[:, 0] == setup["eos"]).all()
    for row, n in zip(windows, length):
        assert (row[n:] == setup["pad"]).all() and setup["eos"] not in row[1:n].tolist()
    assert all(EOS_TOKEN not in doc for doc in cloze.held_out_documents(store))
    scores = cloze.score_passages(setup["params"], setup["config"], passages, batch_size=4)
    assert np.isfinite(scores["loglik_P"]).all()


def test_finetune_examples_are_framed_by_the_stores_eos(setup):
    encode = LoadedModel(setup["run"]).encode
    eos, pad = setup["eos"], setup["pad"]
    ex = [{"prompt": "Kalo mi", "completion": " nesu.", "line": 1}]
    inputs, targets, mask = F.encode_examples(ex, encode, 16, "f.jsonl", eos_id=eos, pad_id=pad)
    ids = [eos] + encode("Kalo mi") + encode(" nesu.") + [eos]
    n = len(ids) - 1
    assert inputs[0, :n].tolist() == ids[:-1] and targets[0, :n].tolist() == ids[1:]
    assert (inputs[0, n:] == pad).all() and (targets[0, n:] == pad).all()
    assert mask[0, n - 1] == 1.0 and targets[0, n - 1] == eos


@pytest.mark.slow
def test_finetune_runs_on_a_hf_tokenizer_store(setup, tmp_path):
    data = tmp_path / "tasks.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Kalo {s}", "completion": f" {s}."}) + "\n"
                            for s in SYLLABLES))
    summary = F.finetune(F.FinetuneConfig(run=str(setup["run"]), data=str(data), out=str(tmp_path / "ft"),
                                          steps=2, batch=2, warmup=0, eval_fraction=0.2, max_new_tokens=3,
                                          eval_batch=2), progress=False)
    assert summary["eval"]["n"] >= 1
    rows = [json.loads(line) for line in (tmp_path / "ft" / "predictions.jsonl").read_text().splitlines()]
    assert rows and all(EOS_TOKEN not in r["prediction"] for r in rows)


def test_lm_eval_adapter_conditions_on_the_stores_eos(setup):
    from lm_eval.api.instance import Instance

    lm = harness.SaltLM(run=str(setup["run"]), batch_size=2)
    assert lm.eot_token_id == setup["eos"]
    ctx, cont = lm._encode_pair("Kalo mi", " nesu.")
    (logp, _), = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=("Kalo mi", " nesu."),
                                            idx=0)], disable_tqdm=True)
    seq = np.asarray([[setup["eos"]] + ctx + cont])
    logits = np.asarray(jax.jit(lambda p, x: model.forward(p, x, setup["config"]))(setup["params"], seq[:, :-1]))[0]
    logp_T = jax.nn.log_softmax(logits.astype(np.float64), axis=-1)[np.arange(seq.shape[1] - 1), seq[0, 1:]]
    assert_close(logp, float(np.sum(logp_T[-len(cont):])), F32_TOL, "loglikelihood after the store's eos")
