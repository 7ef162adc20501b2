"""prepare + TokenStore: layout, exact contents, determinism, atomicity and bad input."""
import hashlib
import json
import os
import random

import numpy as np
import pytest

import salt.data.build as build_module
from salt.data import EOS_ID, TokenStore, VocabSizeError, encode_document, prepare
from salt.data.store import OFFSET_DTYPE

VOCAB = 400


def make_documents(n_docs=120, seed=0):
    """Code-like documents: indentation, tabs, CRLF, blank lines, unicode, the ▁ mark."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz_") for _ in range(rng.randint(2, 9)))
             for _ in range(400)]
    extras = ["é", "漢字", "😀", "▁", "\t", "  ", "\r", "0123", "()", ":", "#"]
    docs = []
    for _ in range(n_docs):
        lines = ["    " * rng.randint(0, 3) + " ".join(rng.choices(words + extras, k=rng.randint(0, 12)))
                 for _ in range(rng.randint(1, 30))]
        docs.append("\n".join(lines) + rng.choice(["", "\n", "\n\n", "  "]))
    return [d for d in docs if d]


def write_jsonl(path, docs):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs = make_documents()
    write_jsonl(root / "a.jsonl", docs[:80])
    (root / "plain").mkdir()
    for i, d in enumerate(docs[80:]):
        (root / "plain" / f"doc{i:03d}.txt").write_text(d, encoding="utf-8", newline="")
    return root, docs


@pytest.fixture(scope="module")
def store_dir(corpus, tmp_path_factory):
    root, _ = corpus
    out = tmp_path_factory.mktemp("stores") / "store"
    prepare(out, [root / "a.jsonl", root / "plain"], vocab_size=VOCAB, val_fraction=0.2,
            progress=False, workers=1)
    return out


def test_store_holds_exactly_the_documents(store_dir, corpus):
    _, docs = corpus
    store = TokenStore(store_dir)
    sp = store.processor()
    assert store.vocab_size == VOCAB and store.tokens("train").dtype == np.uint16
    decoded = {"train": [], "val": []}
    for split in ("train", "val"):
        tokens, offsets = store.tokens(split), store.doc_offsets(split)
        assert offsets.dtype == OFFSET_DTYPE and offsets[0] == 0 and offsets[-1] == len(tokens)
        assert not tokens.flags.writeable
        for d in range(store.num_documents(split)):
            ids = tokens[offsets[d]:offsets[d + 1]]
            assert ids[-1] == EOS_ID and EOS_ID not in ids[:-1]
            decoded[split].append(sp.decode(ids[:-1].tolist()))
            assert ids[:-1].tolist() == encode_document(sp, decoded[split][-1])
    # Every document is in exactly one split, in input order, decoded exactly.
    assert sorted(decoded["train"] + decoded["val"]) == sorted(docs)
    assert [d for d in docs if d in set(decoded["train"])] == decoded["train"]
    assert 0 < len(decoded["val"]) < len(docs) / 2
    meta = store.metadata
    assert meta["roundtrip_failures"] == 0
    assert meta["totals"]["documents"] == len(docs)
    assert meta["splits"]["val"]["documents"] == len(decoded["val"])
    assert meta["splits"]["train"]["bytes"] == sum(len(d.encode()) for d in decoded["train"])
    assert meta["tokenizer_sha256"] == hashlib.sha256(store.tokenizer_path.read_bytes()).hexdigest()
    assert meta["special_ids"] == {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
    assert meta["input_files"] == 1 + 40 and meta["python_version"]


def test_split_is_by_document_hash_and_seed(corpus, tmp_path):
    # The same document text always lands in the same split (no leakage through duplicates).
    root, docs = corpus
    dup = write_jsonl(tmp_path / "dup.jsonl", docs[:30] + docs[:30])
    meta = prepare(tmp_path / "s", [dup], vocab_size=VOCAB, val_fraction=0.3, progress=False, workers=1)
    store = TokenStore(tmp_path / "s")
    assert meta["splits"]["val"]["documents"] % 2 == 0 and meta["splits"]["train"]["documents"] % 2 == 0
    sp = store.processor()
    off = store.doc_offsets("val")
    val_docs = [sp.decode(store.tokens("val")[off[i]:off[i + 1] - 1].tolist()) for i in range(len(off) - 1)]
    assert all(val_docs.count(d) == 2 for d in val_docs)
    meta2 = prepare(tmp_path / "s2", [dup], vocab_size=VOCAB, val_fraction=0.3, seed=1, progress=False, workers=1)
    assert meta2["seed"] == 1
    assert TokenStore(tmp_path / "s2").tokens("val").tobytes() != store.tokens("val").tobytes()


def _tree_bytes(path):  # the store's content (token_check.json is a cache written on open)
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != "token_check.json"}


def test_same_inputs_give_byte_identical_outputs(corpus, store_dir, tmp_path):
    root, _ = corpus
    # Second run with 2 tokenizing processes: outputs must not depend on the worker count.
    prepare(tmp_path / "again", [root / "a.jsonl", root / "plain"], vocab_size=VOCAB, val_fraction=0.2,
            progress=False, workers=2)
    assert _tree_bytes(tmp_path / "again") == _tree_bytes(store_dir)
    assert sorted(os.listdir(tmp_path)) == ["again"]  # no temporary directories left behind


def test_reusing_a_tokenizer(corpus, store_dir, tmp_path):
    root, _ = corpus
    tok = TokenStore(store_dir).tokenizer_path
    meta = prepare(tmp_path / "reuse", [root / "a.jsonl", root / "plain"], tokenizer=tok,
                   val_fraction=0.2, progress=False, workers=1)
    assert meta["tokenizer"]["trained"] is False
    assert _tree_bytes(tmp_path / "reuse")["train.tokens.bin"] == _tree_bytes(store_dir)["train.tokens.bin"]
    with pytest.raises(ValueError, match=f"vocab_size=512 disagrees with tokenizer .*{VOCAB} pieces"):
        prepare(tmp_path / "x", [root / "a.jsonl"], tokenizer=tok, vocab_size=512, progress=False)
    with pytest.raises(ValueError, match="tokenizer .*missing.model.*no such file"):
        prepare(tmp_path / "x", [root / "a.jsonl"], tokenizer=tmp_path / "missing.model", progress=False)


def test_existing_output_directory_is_refused_unless_overwrite(corpus, tmp_path):
    root, _ = corpus
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="out' already exists.*not a SALT store"):
        prepare(out, [root / "plain"], vocab_size=300, progress=False, workers=1)
    assert (out / "precious.txt").read_text() == "keep me"
    # --overwrite never replaces a directory that is not a token store (docs/safety.md)
    with pytest.raises(ValueError, match="not a SALT output directory.*refusing to replace"):
        prepare(out, [root / "plain"], vocab_size=300, overwrite=True, progress=False, workers=1)
    assert (out / "precious.txt").read_text() == "keep me"
    store = tmp_path / "store"
    prepare(store, [root / "plain"], vocab_size=300, progress=False, workers=1)
    with pytest.raises(ValueError, match="store' already exists.*--overwrite"):
        prepare(store, [root / "plain"], vocab_size=300, progress=False, workers=1)
    prepare(store, [root / "plain"], vocab_size=300, overwrite=True, progress=False, workers=1)
    assert TokenStore(store).vocab_size == 300
    assert sorted(os.listdir(tmp_path)) == ["out", "store"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="afile. exists and is not a directory"):
        prepare(tmp_path / "afile", [root / "plain"], vocab_size=300, overwrite=True, progress=False)


def test_interrupted_prepare_leaves_no_store(corpus, tmp_path, monkeypatch):
    root, _ = corpus
    real = build_module._SplitWriter.write
    calls = []

    def write_then_die(self, *args):
        real(self, *args)
        calls.append(1)
        raise KeyboardInterrupt  # as if the user hit Ctrl-C half way through

    monkeypatch.setattr(build_module._SplitWriter, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "out", [root / "a.jsonl"], vocab_size=VOCAB, progress=False, workers=1)
    assert calls and os.listdir(tmp_path) == []


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n\n')
    with pytest.raises(ValueError, match=r"empty corpus.*empty_documents=1.*blank_jsonl_lines=1"):
        prepare(tmp_path / "out", [tmp_path / "empty.jsonl"], progress=False)
    with pytest.raises(ValueError, match=r"empty corpus"):
        prepare(tmp_path / "out", [tmp_path / "empty.jsonl"], tokenizer=None, vocab_size=300, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["empty.jsonl"]


def test_vocab_too_large_names_the_largest_that_works(corpus, tmp_path):
    root, _ = corpus
    with pytest.raises(VocabSizeError, match=r"vocab_size=60000 is too large.*largest size that works is \d+"):
        prepare(tmp_path / "out", [root / "plain"], vocab_size=60000, progress=False, workers=1)
    assert os.listdir(tmp_path) == []


def test_default_vocab_falls_back_for_small_corpora(corpus, tmp_path):
    # The default (4096) does not fit a tiny corpus: it uses the largest size that works.
    root, _ = corpus
    meta = prepare(tmp_path / "out", [root / "plain"], progress=False, workers=1)
    assert 300 < meta["vocab_size"] < 4096 and meta["tokenizer"]["vocab_size_requested"] is None


def test_skipped_inputs_are_counted_in_metadata(corpus, tmp_path):
    root, docs = corpus
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps({"text": d}) for d in docs[:40]] + ["{broken", json.dumps({"other": 1}), '{"text": ""}']
    path.write_bytes("\n".join(lines).encode() + b'\n{"text": "bad \xff byte"}\n')
    with pytest.raises(ValueError, match=r"mixed\.jsonl:41: malformed JSON"):
        prepare(tmp_path / "out", [path], vocab_size=VOCAB, progress=False)
    meta = prepare(tmp_path / "out", [path], vocab_size=VOCAB, skip_invalid=True, progress=False, workers=1)
    assert meta["skipped"]["invalid_json_lines"] == 1
    assert meta["skipped"]["missing_field_lines"] == 1
    assert meta["skipped"]["empty_documents"] == 1
    assert meta["skipped"]["non_utf8_documents"] == 1 and meta["skipped"]["replaced_characters"] == 1
    assert meta["totals"]["documents"] == 41
    assert json.loads((tmp_path / "out" / "metadata.json").read_text()) == meta


def test_bad_arguments(tmp_path):
    for kwargs, message in [({"val_fraction": 1.0}, "val_fraction"), ({"vocab_size": 0}, "vocab_size"),
                            ({"workers": 0}, "workers"), ({"text_field": ""}, "text_field")]:
        with pytest.raises(ValueError, match=message):
            prepare(tmp_path / "out", [tmp_path], progress=False, **kwargs)


def test_incomplete_or_corrupt_store_is_refused(store_dir, tmp_path):
    import shutil

    with pytest.raises(ValueError, match="nowhere: no such directory"):
        TokenStore(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(store_dir, broken)
    (broken / "metadata.json").rename(broken / "metadata.json.bak")
    with pytest.raises(ValueError, match=r"broken: no metadata\.json.*incomplete"):
        TokenStore(broken)
    (broken / "metadata.json.bak").rename(broken / "metadata.json")
    TokenStore(broken)
    data = (broken / "train.tokens.bin").read_bytes()
    (broken / "train.tokens.bin").write_bytes(data[:-2])
    with pytest.raises(ValueError, match=r"broken: train\.tokens\.bin has \d+ bytes, the metadata says"):
        TokenStore(broken)
    (broken / "train.tokens.bin").write_bytes(data)
    (broken / "tokenizer.model").write_bytes(b"other")
    with pytest.raises(ValueError, match=r"broken: tokenizer\.model sha256 .* does not match"):
        TokenStore(broken)
    (broken / "metadata.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"broken: unreadable metadata\.json"):
        TokenStore(broken)
    with pytest.raises(ValueError, match="split must be one of"):
        TokenStore(store_dir).tokens("test")


def test_token_dtype_follows_the_vocabulary():
    from salt.data.store import token_dtype

    assert token_dtype(4096) == np.dtype("<u2") and token_dtype(65536) == np.dtype("<u2")
    assert token_dtype(65537) == np.dtype("<u4") and token_dtype(256000) == np.dtype("<u4")


def test_default_vocab_size_rule():
    from salt.data import EMBEDDED_VOCAB_SIZE, default_vocab_size

    assert default_vocab_size(31_000_000) == EMBEDDED_VOCAB_SIZE == 4096
    assert default_vocab_size(500_000_000) == 16384 and default_vocab_size(10**10) == 32768
