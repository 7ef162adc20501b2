"""``salt import hf`` / ``salt export hf`` and Hugging Face tokenizers, with transformers itself as
the oracle (tiny random models of every supported family, built and run by transformers on CPU).

Tolerance: float32 logits of SALT's JAX model and of transformers' torch model agree to
LOGITS_ATOL (absolute; the logits are O(5)): the two differ only in float32 summation order."""
import json
import pathlib
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
tokenizers = pytest.importorskip("tokenizers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from salt.cli.main import cli  # noqa: E402
from salt.runtime.interop import safetensors_io  # noqa: E402
from salt.runtime.interop.hf import export_hf, import_hf  # noqa: E402
from salt.runtime.model import checkpoint, transformer as model  # noqa: E402

pytestmark = pytest.mark.interop

LOGITS_ATOL = 5e-5
TOKENIZER_VOCAB = 300
MODEL_VOCAB = 320  # > the tokenizer's: padded embedding rows, as in Qwen2's checkpoints
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
COMMON = dict(vocab_size=MODEL_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
# family -> transformers config (every option of the family that SALT maps is exercised)
FAMILIES = {
    "llama3": lambda: transformers.LlamaConfig(**COMMON, tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE),
    "llama2": lambda: transformers.LlamaConfig(**COMMON, tie_word_embeddings=False, rms_norm_eps=1e-5),
    "smollm2": lambda: transformers.LlamaConfig(**COMMON, tie_word_embeddings=True,
                                                rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=False),
    "qwen2.5-tied": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=True,
                                                     rope_parameters={"rope_type": "linear", "rope_theta": 1e6,
                                                                      "factor": 2.0}),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=16, tie_word_embeddings=False),
    "gemma": lambda: transformers.GemmaConfig(**COMMON, head_dim=16),
}

WORDS = ("the quick brown fox jumps over lazy dog def return class import numpy as np for in range "
         "print héllo wörld ✓ 0123456789 () [] {} : , . = + - * / \n \t    ").split(" ")


def _documents(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(str(w) + rng.choice(["", " ", "\n", "  "]) for w in rng.choice(WORDS, rng.integers(5, 40)))
            for _ in range(n)]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("interop")


@pytest.fixture(scope="module")
def hf_tokenizer(work):
    """A byte-level BPE tokenizer trained here (the ``tokenizers`` library), saved with its
    tokenizer_config.json naming the special tokens."""
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_documents(300, 0), trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert tok.get_vocab_size() == TOKENIZER_VOCAB
    d = work / "tokenizer"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "unk_token": "<unk>"}))
    return d


@pytest.fixture(scope="module")
def corpus(work):
    path = work / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in _documents(400, 1)))
    return path


def _random_model(family: str, dtype=torch.float32):
    torch.manual_seed(sorted(FAMILIES).index(family))
    m = transformers.AutoModelForCausalLM.from_config(FAMILIES[family](), dtype=torch.float32)
    with torch.no_grad():  # norms (Gemma's start at zero) and biases away from their initial values
        for name, p in m.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return m.to(dtype).eval()


def _checkpoint(work, family, hf_tokenizer, dtype=torch.float32, shard: str | None = None) -> pathlib.Path:
    d = work / f"hf-{family}-{str(dtype).split('.')[-1]}{'-sharded' if shard else ''}"
    if not d.exists():
        m = _random_model(family, dtype)
        m.save_pretrained(d, **({"max_shard_size": shard} if shard else {}))
        for f in hf_tokenizer.iterdir():
            shutil.copy(f, d / f.name)
    return d


def _tokens(seed=0, B=2, T=13):
    return np.random.default_rng(seed).integers(0, MODEL_VOCAB, (B, T))


def _salt_logits(run, tokens):
    config, params, _ = checkpoint.load_params(run)
    return np.asarray(jax.jit(lambda p, x: model.forward(p, x, config))(params, jnp.asarray(tokens)))


def _hf_logits(path_or_model, tokens):
    m = path_or_model if not isinstance(path_or_model, pathlib.Path) else \
        transformers.AutoModelForCausalLM.from_pretrained(path_or_model, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(torch.tensor(tokens)).logits.float().numpy()


def _tensors(directory: pathlib.Path) -> dict:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(safetensors_io.read(f))
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_import_and_export_match_transformers(work, hf_tokenizer, family):
    """import -> SALT's logits equal transformers'; export -> transformers' logits (of the exported
    directory) equal SALT's; import then export is bit-exact; AutoTokenizer loads the export."""
    src = _checkpoint(work, family, hf_tokenizer)
    run, out = work / f"run-{family}", work / f"export-{family}"
    summary = import_hf(src, run)
    assert summary["tokenizer_vocab"] == TOKENIZER_VOCAB
    tokens = _tokens()
    ours = _salt_logits(run, tokens)
    theirs = _hf_logits(src, tokens)
    delta_import = float(np.abs(ours - theirs).max())
    export_hf(run, out)
    delta_export = float(np.abs(_hf_logits(out, tokens) - ours).max())
    print(f"\n{family}: max |logits| {np.abs(theirs).max():.2f}, max |Δ| import {delta_import:.2e}, "
          f"export {delta_export:.2e}")
    assert delta_import <= LOGITS_ATOL and delta_export <= LOGITS_ATOL
    a, b = _tensors(src), _tensors(out)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes(), name
    # the tokenizer files travel unchanged: AutoTokenizer reads the export as it reads the source
    # (transformers may put its own family's pre-tokenizer over tokenizer.json, for both alike)
    tok, ref = (transformers.AutoTokenizer.from_pretrained(d) for d in (out, src))
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    for text in _documents(20, 5):
        assert tok(text, add_special_tokens=False).input_ids == ref(text, add_special_tokens=False).input_ids
    assert tok.eos_token == "</s>" and tok.eos_token_id == ref.eos_token_id


def test_bfloat16_sharded_checkpoint_round_trips(work, hf_tokenizer):
    """A bfloat16 checkpoint in shards (model.safetensors.index.json): the same model as its
    float32 upcast in transformers; exported back in bfloat16, bit-exact, as one file."""
    src = _checkpoint(work, "qwen2", hf_tokenizer, dtype=torch.bfloat16, shard="20KB")
    assert (src / "model.safetensors.index.json").is_file() and len(list(src.glob("*.safetensors"))) > 2
    run, out = work / "run-bf16", work / "export-bf16"
    assert import_hf(src, run)["dtype"] == "bfloat16"
    tokens = _tokens(1)
    assert np.abs(_salt_logits(run, tokens) - _hf_logits(src, tokens)).max() <= LOGITS_ATOL
    assert export_hf(run, out)["dtype"] == "bfloat16"
    a, b = _tensors(src), _tensors(out)
    assert sorted(a) == sorted(b) and all(a[n].tobytes() == b[n].tobytes() for n in a)


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _broken_copy(work, hf_tokenizer, name, edit):
    src = _checkpoint(work, "llama3", hf_tokenizer)
    d = work / f"broken-{name}"
    shutil.copytree(src, d)
    edit(d)
    return d


def _edit_config(**changes):
    def edit(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(changes)
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


def _shard_away(d):
    m = _random_model("llama3")
    for f in d.glob("*.safetensors"):
        f.unlink()
    m.save_pretrained(d, max_shard_size="20KB")
    shards = sorted(d.glob("model-*.safetensors"))
    shards[1].unlink()


def _big_tokenizer(d):
    tok = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.add_tokens([f"<extra{i}>" for i in range(MODEL_VOCAB)])
    tok.save(str(d / "tokenizer.json"))


BAD_INPUTS = {
    "model_type": (_edit_config(model_type="mixtral"), "model_type='mixtral' is not supported; supported: gemma, "),
    "sliding_window": (_edit_config(model_type="mistral", sliding_window=4096), "sliding_window=4096"),
    "rope_type": (_edit_config(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
                  "rope_type='yarn' is not supported; supported: default, linear, llama3"),
    "shape": (_edit_config(intermediate_size=48), "has shape [64, 32], config.json implies [48, 32]"),
    "missing_shard": (_shard_away, "which is missing from"),
    "tokenizer": (_big_tokenizer, "the tokenizer has 620 ids, more than the model's vocab_size 320"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_checkpoints_give_one_clear_error_and_write_nothing(work, hf_tokenizer, case):
    edit, message = BAD_INPUTS[case]
    src = _broken_copy(work, hf_tokenizer, case, edit)
    out = work / f"never-{case}"
    result = _invoke("import", "hf", src, "--out", out)
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output, result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    assert not out.exists() and not list(work.glob(f".never-{case}*"))


def test_hf_tokenizer_store_encodes_like_tokenizers(work, hf_tokenizer, corpus):
    """salt data prepare --tokenizer DIR: the store holds exactly the ids of ``tokenizers`` (no
    special tokens added) with the tokenizer's own eos after each document; the special ids and the
    round trip are recorded; the sha256 pins tokenizer.json."""
    from salt.data.store import TokenStore
    from salt.data.tokenizer import sha256_bytes
    store_dir = work / "store-hf"
    result = _invoke("data", "prepare", corpus, "--out", store_dir, "--tokenizer", hf_tokenizer,
                     "--val-fraction", "0.1", "--quiet")
    assert result.exit_code == 0, result.output
    store = TokenStore(store_dir)
    tok = tokenizers.Tokenizer.from_file(str(hf_tokenizer / "tokenizer.json"))
    eos = tok.token_to_id("</s>")
    assert store.special_ids == {"pad": 0, "bos": 1, "eos": eos, "unk": 3}
    assert store.vocab_size == TOKENIZER_VOCAB and store.metadata["roundtrip_failures"] == 0
    assert store.tokenizer_sha256 == sha256_bytes((hf_tokenizer / "tokenizer.json").read_bytes())
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    want = sorted(tuple(tok.encode(t, add_special_tokens=False).ids + [eos]) for t in texts)
    got = []
    for split in ("train", "val"):
        tokens, offsets = store.tokens(split), store.doc_offsets(split)
        got += [tuple(tokens[offsets[i]:offsets[i + 1]].tolist()) for i in range(len(offsets) - 1)]
    assert sorted(got) == want
    store.verify()
    assert store.processor().decode(list(got[0][:-1])) in texts


def test_bare_tokenizer_json_finds_its_eos_by_name(work, hf_tokenizer, corpus):
    bare = work / "bare-tokenizer.json"
    shutil.copy(hf_tokenizer / "tokenizer.json", bare)
    result = _invoke("data", "prepare", corpus, "--out", work / "store-bare", "--tokenizer", bare, "--quiet")
    assert result.exit_code == 0, result.output
    meta = json.loads((work / "store-bare" / "metadata.json").read_text())
    assert meta["special_ids"]["eos"] == 2 and meta["tokenizer"]["file"] == "tokenizer.json"


@pytest.mark.slow
def test_kd_with_an_imported_teacher_end_to_end(work, hf_tokenizer, corpus):
    """An imported teacher (vocabulary padded beyond the tokenizer's) over a store prepared with
    its tokenizer: salt eval, salt score, salt teacher cache and a KD run of salt train all accept it; a store
    with another tokenizer is refused."""
    run = work / "teacher-kd"
    import_hf(_checkpoint(work, "llama3", hf_tokenizer), run)
    store = work / "store-kd"
    assert _invoke("data", "prepare", corpus, "--out", store, "--tokenizer", hf_tokenizer, "--quiet").exit_code == 0
    result = _invoke("eval", "--run", run, "--data", store, "--seq-len", "16", "--batch", "2", "--max-windows", "4")
    assert result.exit_code == 0, result.output
    result = _invoke("score", "--teacher", run, "--data", store, "--seq-len", "16", "--batch", "4",
                     "--max-candidates", "8", "--out", work / "scores-kd.npz")
    assert result.exit_code == 0, result.output  # no --no-exclude-teacher-seen: it saw none of this store
    assert "(0 excluded)" in result.output and "imported from Hugging Face (llama)" in result.output
    assert len(np.load(work / "scores-kd.npz")["scores"]) == 8
    result = _invoke("teacher", "cache", "--teacher", run, "--data", store, "--steps", "2", "--batch", "2",
                     "--seq-len", "16", "--top-k", "4", "--out", work / "cache-kd", "--quiet")
    assert result.exit_code == 0, result.output
    student = work / "student-kd"
    result = _invoke("train", "--preset", "tiny-student", "--data", store, "--out", student, "--teacher", run,
                     "--kd-steps", "2", "--steps", "3", "--batch", "2", "--seq-len", "16", "--quiet", "--json")
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (student / "metrics.jsonl").read_text().splitlines()]
    assert any("kd" in m for m in metrics) and all(np.isfinite(m["loss"]) for m in metrics if "loss" in m)
    other = work / "store-other"
    assert _invoke("data", "prepare", corpus, "--out", other, "--vocab-size", "330", "--quiet").exit_code == 0
    result = _invoke("train", "--preset", "tiny-student", "--data", other, "--out", work / "student-x",
                     "--teacher", run, "--kd-steps", "1", "--steps", "1", "--batch", "2", "--seq-len", "16")
    assert result.exit_code != 0 and "tokenizer sha256" in result.output


@pytest.mark.slow
def test_salt_preset_exports_as_gemma(work, corpus):
    """A SALT run of a preset (tanh-GELU, sqrt(d) embedding scale, tied head, SentencePiece
    tokenizer trained by salt data prepare) exports as Gemma: transformers' logits equal SALT's and
    AutoTokenizer gives SentencePiece's ids."""
    store = work / "store-sp"
    assert _invoke("data", "prepare", corpus, "--out", store, "--vocab-size", "330", "--quiet").exit_code == 0
    run = work / "salt-run"
    result = _invoke("train", "--preset", "tiny-student", "--data", store, "--out", run, "--steps", "3",
                     "--batch", "2", "--seq-len", "16", "--lr", "0.05", "--quiet")
    assert result.exit_code == 0, result.output
    out = work / "export-salt"
    result = _invoke("export", "hf", run, "--out", out)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["model_type"] == "gemma"
    config, _, _ = checkpoint.load_params(run)
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, (2, 13))
    ours = _salt_logits(run, tokens)
    delta = float(np.abs(_hf_logits(out, tokens) - ours).max())
    print(f"\nsalt tiny-student as gemma: max |logits| {np.abs(ours).max():.2f}, max |Δ| {delta:.2e}")
    assert delta <= LOGITS_ATOL
    from salt.data.store import TokenStore
    sp = TokenStore(store).processor()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    texts = _documents(50, 7)
    same = sum(tok(t, add_special_tokens=False).input_ids == sp.encode(t) for t in texts)
    print(f"SentencePiece -> tokenizer.json: {same}/{len(texts)} documents with identical ids")
    assert same == len(texts)
    assert all(tok.decode(sp.encode(t)) == t for t in texts)
    # the output safety rule: an existing export is replaced only with --overwrite, a foreign folder never
    assert _invoke("export", "hf", run, "--out", out).exit_code == 1
    assert _invoke("export", "hf", run, "--out", out, "--overwrite").exit_code == 0
    (work / "foreign").mkdir()
    (work / "foreign" / "notes.txt").write_text("mine")
    result = _invoke("export", "hf", run, "--out", work / "foreign", "--overwrite")
    assert result.exit_code == 1 and (work / "foreign" / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_continued_pretraining_from_an_imported_model(work, hf_tokenizer, corpus):
    """salt train --init RUN starts from the imported weights (step 1's CE is transformers' CE of the
    source model on that batch, over the tokenizer's ids), keeps its architecture, and exports back
    to its family."""
    run = work / "init-qwen3"
    src = _checkpoint(work, "qwen3", hf_tokenizer)
    import_hf(src, run)
    store = work / "store-init"
    assert _invoke("data", "prepare", corpus, "--out", store, "--tokenizer", hf_tokenizer, "--quiet").exit_code == 0
    student = work / "student-init"
    result = _invoke("train", "--init", run, "--data", store, "--out", student, "--steps", "2", "--batch", "2",
                     "--seq-len", "16", "--lr", "1e-3", "--quiet")
    assert result.exit_code == 0, result.output
    config, _, _ = checkpoint.load_params(student)
    assert config == checkpoint.load_params(run)[0]
    first = json.loads((student / "metrics.jsonl").read_text().splitlines()[0])
    from salt.data.store import TokenStore
    from salt.runtime.train.config import TrainConfig
    from salt.runtime.train.setup import make_loaders
    loader = make_loaders(TrainConfig(preset="tiny-student", data=str(store), out=str(student), steps=2, batch=2,
                                      seq_len=16), TokenStore(store), None, None)[0]
    windows = np.asarray(loader.batch(0))
    logits = _hf_logits(src, windows[:, :-1])[..., :TOKENIZER_VOCAB]  # the loss skips padded rows
    logp = torch.log_softmax(torch.tensor(logits), -1).numpy()
    ce = -np.take_along_axis(logp, windows[:, 1:, None], -1).mean()
    assert abs(first["ce"] - ce) < 1e-4, (first["ce"], ce)
    out = work / "export-init"
    assert _invoke("export", "hf", student, "--out", out).exit_code == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3"
    assert _invoke("train", "--init", run, "--preset", "tiny-student", "--data", store, "--out", work / "x",
                   "--steps", "1").exit_code != 0


def _hf_store(work, hf_tokenizer, corpus):
    store = work / "store-repro"
    if not store.exists():
        assert _invoke("data", "prepare", corpus, "--out", store, "--tokenizer", hf_tokenizer, "--quiet").exit_code == 0
    return store


def _imported(work, hf_tokenizer, family):
    run = work / f"repro-teacher-{family}"
    if not run.exists():
        import_hf(_checkpoint(work, family, hf_tokenizer), run)
    return run


def test_reproduce_refuses_a_teacher_of_another_tokenizer_and_writes_nothing(work, hf_tokenizer, corpus):
    """--teacher is checked by the trainer's teacher rules before anything is written: a store of
    another tokenizer is refused, so is --teacher without --data and --early-teacher alone."""
    teacher = _imported(work, hf_tokenizer, "llama3")
    other = work / "store-repro-sp"
    assert _invoke("data", "prepare", corpus, "--out", other, "--vocab-size", "330", "--quiet").exit_code == 0
    out = work / "repro-never"
    for args, message in (((("--data", other),), "tokenizer sha256"), ((), "needs data"),
                          ((("--data", other), ("--early-teacher", teacher)), None),
                          ((("--data", _hf_store(work, hf_tokenizer, corpus)), ("--teacher-steps", "5")),
                           "with --teacher none is trained")):
        flat = [x for pair in args for x in pair]
        if message is None:  # --early-teacher without --teacher
            result = _invoke("reproduce", "--tiny", "--early-teacher", teacher, *flat, "--out", out)
            message = "needs teacher"
        else:
            result = _invoke("reproduce", "--tiny", "--teacher", teacher, *flat, "--out", out)
        assert result.exit_code != 0 and message in result.output, result.output
        assert "Traceback" not in result.output and not out.exists()


@pytest.mark.slow
def test_reproduce_with_an_imported_teacher_end_to_end(work, hf_tokenizer, corpus):
    """salt reproduce --teacher RUN_imported --data STORE_hf: no SLM is trained, no selection and no
    SALT_DS without --early-teacher (the report says so instead of a verdict for claim (c)), the
    report names the teacher; a resume with another --teacher is refused; with --early-teacher
    SALT_DS runs on that model's selection (an imported model excludes no windows, as the report notes)."""
    store, teacher = _hf_store(work, hf_tokenizer, corpus), _imported(work, hf_tokenizer, "llama3")
    out = work / "repro"
    result = _invoke("reproduce", "--tiny", "--sequential", "--quiet", "--teacher", teacher, "--data", store,
                     "--out", out)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["teacher"]["given"] and results["teacher"]["path"] == str(teacher.absolute())
    assert results["teacher"]["source"].startswith("imported from Hugging Face (llama, ")
    assert "SALT_DS" not in results["per_seed"]["0"]["models"] and "skipped" in results["selection"]
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["BASELINE-seed0", "RKD-seed0", "SALT-seed0"]
    claim_c = [c for c in results["claims"] if c["id"] == "c"]
    assert [c["status"] for c in claim_c] == ["not run"]
    report = (out / "report.md").read_text()
    assert f"GIVEN TEACHER (not trained by this reproduction): {teacher.absolute()} step 0" in report
    assert "NO EARLY TEACHER" in report and "**not run**" in report
    state = json.loads((out / "state.json").read_text())
    assert state["stages"]["slm"]["teacher"]["path"] == str(teacher.absolute())
    before = (out / "state.json").read_bytes()
    result = _invoke("reproduce", "--tiny", "--sequential", "--teacher", _imported(work, hf_tokenizer, "qwen2"),
                     "--data", store, "--out", out)
    assert result.exit_code != 0 and "different settings (teacher)" in result.output, result.output
    assert (out / "state.json").read_bytes() == before

    early = _imported(work, hf_tokenizer, "smollm2")
    out2 = work / "repro-early"
    result = _invoke("reproduce", "--tiny", "--sequential", "--quiet", "--teacher", teacher, "--early-teacher", early,
                     "--data", store, "--out", out2)
    assert result.exit_code == 0, result.output
    results = json.loads((out2 / "results.json").read_text())
    assert results["teacher"]["early_teacher"]["path"] == str(early.absolute())
    assert "SALT_DS-seed0" in {p.name for p in (out2 / "runs").iterdir()}
    assert results["selection"]["n_excluded"] == 0 and "imported from Hugging Face" in results["selection"]["notes"][0]
    assert "SALT_DS" in results["per_seed"]["0"]["models"]
    assert [c["status"] for c in results["claims"] if c["id"] == "c"] == ["too small to test"]
