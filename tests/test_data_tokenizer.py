"""Tokenizer: exact round trip (whitespace, newlines, unicode), determinism, vocabulary errors."""
import io
import random

import pytest
import sentencepiece as spm

from salt.data import (EOS_ID, SPECIAL_IDS, VocabSizeError, encode_document, load_processor,
                       train_tokenizer)
from salt.data.corpus import CorpusStats, embedded_corpus, iter_documents

TRICKY = [
    "def f(x):\n    return x\n",
    "\n\n\nleading newlines and trailing spaces   \n   ",
    "   leading spaces",
    "\ttabs\t\tand  double  spaces\t\n\t\t\tindent",
    "windows\r\nline\r\nendings\r\n",
    "form\x0cfeed and \x0bvertical tab and NUL \x00 and DEL \x7f",
    "unicode: é ß 漢字 😀 ‍ zero-width\u200bjoiner, combining e\u0301, NFKC-sensitive ﬁ ① ＡＢ",
    "the SentencePiece space mark ▁ itself, ▁▁ twice, and at the end ▁",
    "▁",
    " ",
    "\n",
    "x" * 10000,
    "replacement \ufffd char",
]


@pytest.fixture(scope="module")
def stdlib_docs():
    corpus = embedded_corpus()
    docs = list(iter_documents(corpus, CorpusStats()))
    assert len(docs) > 500
    return docs


@pytest.fixture(scope="module")
def stdlib_tokenizer(stdlib_docs):
    # A small tokenizer trained on ~1% of the embedded corpus (fast), with the real options.
    return load_processor(train_tokenizer(stdlib_docs[5::150], 1000))


def test_round_trip_tricky_strings(stdlib_tokenizer):
    sp = stdlib_tokenizer
    for text in TRICKY:
        ids = encode_document(sp, text)
        assert sp.decode(ids) == text, repr(text)
        assert SPECIAL_IDS["unk"] not in ids  # byte fallback: nothing maps to <unk>


def test_round_trip_on_a_sample_of_the_embedded_corpus(stdlib_docs, stdlib_tokenizer):
    # The whole corpus is checked by `salt data prepare` (metadata roundtrip_failures);
    # here a 5% sample, none of it in the tokenizer's training sample.
    sp = stdlib_tokenizer
    sample = stdlib_docs[::20]
    failures = [i for i, doc in enumerate(sample) if sp.decode(encode_document(sp, doc)) != doc]
    assert failures == []
    # Sanity: the tokenizer actually compresses code (> 2 characters per token).
    n_chars = sum(len(d) for d in sample)
    n_tokens = sum(len(encode_document(sp, d)) for d in sample)
    assert n_chars / n_tokens > 2.0


def test_special_ids_and_vocab(stdlib_tokenizer):
    sp = stdlib_tokenizer
    assert sp.vocab_size() == 1000
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
    assert EOS_ID == 3


def test_training_is_deterministic():
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(300)]
    docs = ["\n".join("    " * rng.randint(0, 3) + " ".join(rng.choices(words, k=8)) for _ in range(20))
            for _ in range(100)]
    first = train_tokenizer(docs, 400)
    assert train_tokenizer(docs, 400) == first


def test_vocab_too_large_reports_the_largest_that_works():
    docs = ["hello world\n", "hello there world\n"] * 20
    with pytest.raises(VocabSizeError, match=r"vocab_size=5000 is too large.*largest size that works is (\d+)") as info:
        train_tokenizer(docs, 5000)
    largest = info.value.max_vocab_size
    assert 260 < largest < 5000
    assert load_processor(train_tokenizer(docs, largest)).vocab_size() == largest


def test_vocab_too_small_is_explained():
    with pytest.raises(VocabSizeError, match=r"vocab_size=100 is too small.*at least \d+") as info:
        train_tokenizer(["abc def\n"] * 10, 100)
    assert info.value.min_vocab_size > 256


def test_foreign_tokenizer_with_other_special_ids_is_refused(tmp_path):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world", "hello there"] * 20),
                                   model_writer=model, vocab_size=12, minloglevel=2)
    path = tmp_path / "default_ids.model"
    path.write_bytes(model.getvalue())
    with pytest.raises(ValueError, match=r"default_ids\.model: special ids .* differ"):
        load_processor(path)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"garbage\.model: not a readable SentencePiece model"):
        load_processor(garbage)
