"""The SentencePiece tokenizer shared by teacher and student.

SentencePiece's defaults normalise text (NFKC), collapse and strip whitespace and add a
dummy prefix space, so decode(encode(doc)) != doc for source code. We train with:

* ``normalization_rule_name="identity"``, ``remove_extra_whitespaces=False``,
  ``add_dummy_prefix=False``: the text is tokenised exactly as given;
* ``byte_fallback=True``: any character outside the vocabulary (including ``\\n``, ``\\r``,
  ``\\t``, form feeds, NULs, rare unicode) is encoded as its UTF-8 bytes, so nothing maps to
  ``<unk>``;
* ``allow_whitespace_only_pieces=True``: runs of indentation become pieces;
* ``split_digits=True``: numbers are spelled digit by digit (a small vocabulary is not
  wasted on numerals).

The training sentences are the *lines* of a sample of documents (SentencePiece's trainer
works on sentences); whole documents, newlines included, are encoded at tokenisation time.
One character survives none of this: SentencePiece writes spaces as U+2581 ("▁") and
decodes every "▁" back to a space, so a literal U+2581 in the text would come back as a
space. :func:`encode_document` therefore encodes literal U+2581 as its three byte-fallback
pieces, which decode to U+2581 itself. With that, decode(encode(doc)) == doc for every
valid Unicode document (tested; the full embedded corpus is checked by ``prepare``, which
counts any failure in ``metadata.json``).

Special ids: pad=0, unk=1, bos=2, eos=3 (eos separates documents in the token stream).

Hugging Face tokenizers (``tokenizer.json``, the ``tokenizers`` library) are used as they are:
:class:`HFTokenizer` gives them the few ``SentencePieceProcessor`` methods SALT calls, documents are
encoded without added special tokens, and the special ids (bos / eos / pad / unk, any of them but
eos may be absent) come from the tokenizer's ``tokenizer_config.json`` (or, without one, from the
usual names of its special tokens: :data:`HF_SPECIAL_NAMES`).  :func:`load_tokenizer` reads either
kind from its bytes.
A tokenizer may also reserve ``n`` sentinel ids for the UL2 span-corruption objective
(``salt data prepare --sentinels n``): control pieces ``<extra_id_0>`` … that no text ever
encodes to (control pieces are not matched in input text), ids 4 … 3 + n.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import re
from collections.abc import Iterable

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_IDS = {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID}
# Fixed thread count: the unigram trainer's sums depend on how work is split across
# threads, so a fixed count keeps training byte-for-byte deterministic on any machine.
TRAINER_THREADS = 2
# Training sentences longer than this are cut into pieces of this many characters
# (SentencePiece skips over-long sentences, e.g. minified lines, instead).
MAX_TRAINING_LINE_CHARS = 4096
_SPACE_MARK = "\u2581"
SENTINEL_PIECE = "<extra_id_{}>"

TRAINER_OPTIONS = dict(
    model_type="unigram",
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,
    split_digits=True,
    pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
    num_threads=TRAINER_THREADS,
    max_sentence_length=4 * MAX_TRAINING_LINE_CHARS + 16,  # bytes; UTF-8 is at most 4 per char
    input_sentence_size=0,          # we sample ourselves, deterministically
    shuffle_input_sentence=False,
    seed_sentencepiece_size=1_000_000,
    # Prune the unigram vocabulary by half per EM round instead of the default quarter:
    # on the embedded corpus (4 MB sample, 4096 pieces) this halves the training CPU time
    # (~33 -> ~14 CPU-s) for 0.2% fewer characters per token (2.832 -> 2.837).
    shrinking_factor=0.5,
    minloglevel=2,
)


def training_lines(documents: Iterable[str]) -> Iterable[str]:
    """The sentences the trainer sees: non-empty lines, long ones cut into chunks."""
    for doc in documents:
        for line in doc.split("\n"):
            for start in range(0, len(line), MAX_TRAINING_LINE_CHARS):
                yield line[start:start + MAX_TRAINING_LINE_CHARS]


def train_tokenizer(documents: Iterable[str], vocab_size: int, sentinels: int = 0) -> bytes:
    """Train the SentencePiece model on ``documents``; returns the serialized model.

    ``sentinels``: number of UL2 sentinel ids to reserve (see :func:`sentinel_ids`).

    Deterministic: the same documents in the same order give byte-identical bytes.
    Raises ValueError when ``vocab_size`` does not fit the text (naming the sizes that do).
    """
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    if not isinstance(sentinels, int) or isinstance(sentinels, bool) or not 0 <= sentinels <= 1000:
        raise ValueError(f"sentinels must be an integer in [0, 1000], got {sentinels!r}")
    options = dict(TRAINER_OPTIONS)
    if sentinels:
        options["control_symbols"] = [SENTINEL_PIECE.format(i) for i in range(sentinels)]
    model = io.BytesIO()
    lines = list(training_lines(documents))
    if not lines:
        raise ValueError("cannot train a tokenizer: the corpus sample has no non-empty lines")
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model,
                                       vocab_size=vocab_size, **options)
    except RuntimeError as e:
        raise _vocab_error(str(e), vocab_size) from None
    return model.getvalue()


class VocabSizeError(ValueError):
    """The requested vocabulary does not fit the corpus; ``max_vocab_size`` says what does."""

    def __init__(self, message: str, max_vocab_size: int | None = None,
                 min_vocab_size: int | None = None):
        super().__init__(message)
        self.max_vocab_size = max_vocab_size
        self.min_vocab_size = min_vocab_size


def _vocab_error(message: str, vocab_size: int) -> ValueError:
    too_high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)",
                         message)
    if too_high:
        largest = int(too_high.group(2))
        return VocabSizeError(
            f"vocab_size={vocab_size} is too large for this corpus: the largest size that works "
            f"is {largest} (use --vocab-size {largest} or smaller, or bring more text)",
            max_vocab_size=largest)
    too_small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if too_small:
        smallest = int(too_small.group(2))
        return VocabSizeError(
            f"vocab_size={vocab_size} is too small: this corpus needs at least {smallest} "
            "(4 special ids + 256 byte pieces + its distinct characters)",
            min_vocab_size=smallest)
    return ValueError(f"SentencePiece training failed (vocab_size={vocab_size}): {message}")


def load_processor(model: bytes | str | os.PathLike, name: str | None = None
                   ) -> spm.SentencePieceProcessor:
    """A SentencePieceProcessor from serialized bytes or a path; checks the special ids.

    ``name`` (e.g. the file the bytes were read from) is used in error messages.
    """
    where = name or ("<bytes>" if isinstance(model, bytes) else os.fspath(model))
    try:
        if isinstance(model, bytes):
            sp = spm.SentencePieceProcessor(model_proto=model)
        else:
            sp = spm.SentencePieceProcessor(model_file=os.fspath(model))
    except (OSError, RuntimeError) as e:
        raise ValueError(f"tokenizer {where}: not a readable SentencePiece model ({e})") from None
    check_special_ids(sp, where)
    return sp


def check_special_ids(sp: spm.SentencePieceProcessor, where: str) -> None:
    got = {"pad": sp.pad_id(), "unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id()}
    if got != SPECIAL_IDS:
        raise ValueError(f"tokenizer {where}: special ids {got} differ from the required {SPECIAL_IDS} "
                         "(train it with salt data prepare, or with pad_id=0 unk_id=1 bos_id=2 eos_id=3)")


def sentinel_ids(sp: spm.SentencePieceProcessor) -> list[int]:
    """The reserved UL2 sentinel ids, in order (``<extra_id_0>`` first); empty if none (always
    for a Hugging Face tokenizer)."""
    if isinstance(sp, HFTokenizer):
        return []
    out = []
    while True:
        i = sp.piece_to_id(SENTINEL_PIECE.format(len(out)))
        if i == sp.unk_id() or not sp.is_control(i):
            return out
        out.append(i)


def space_mark_byte_ids(sp: spm.SentencePieceProcessor) -> list[int] | None:
    """Ids of the byte pieces spelling U+2581 in UTF-8, or None without byte fallback (and for a
    Hugging Face tokenizer, whose ``decode`` has no such ambiguity to work around)."""
    if isinstance(sp, HFTokenizer):
        return None
    ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in _SPACE_MARK.encode("utf-8")]
    return None if any(i == sp.unk_id() for i in ids) else ids


def encode_document(sp: spm.SentencePieceProcessor, text: str,
                    space_mark_ids: list[int] | None = None) -> list[int]:
    """Token ids of one document (no BOS/EOS), exactly invertible by ``sp.decode``.

    ``space_mark_ids`` (from :func:`space_mark_byte_ids`) may be passed to save the lookup.
    """
    if _SPACE_MARK not in text:
        return sp.encode(text)
    if space_mark_ids is None:
        space_mark_ids = space_mark_byte_ids(sp)
    if space_mark_ids is None:
        return sp.encode(text)  # no byte fallback: the "▁" -> " " ambiguity cannot be avoided
    ids: list[int] = []
    for i, part in enumerate(text.split(_SPACE_MARK)):
        if i:
            ids.extend(space_mark_ids)
        if part:
            ids.extend(sp.encode(part))
    return ids


# ---- Hugging Face tokenizers ----------------------------------------------------------------

HF_TOKENIZER_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"
# special-token names recognised in a bare tokenizer.json (no tokenizer_config.json beside it)
HF_SPECIAL_NAMES = {"eos": ("</s>", "<eos>", "<|endoftext|>", "<|end_of_text|>"),
                    "bos": ("<s>", "<bos>", "<|begin_of_text|>"), "pad": ("<pad>",), "unk": ("<unk>",)}


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` with the ``SentencePieceProcessor`` methods SALT uses (``encode``
    without added special tokens, ``decode``, ``vocab_size`` = the largest id + 1, ``bos_id`` ...:
    -1 when absent, as SentencePiece says)."""

    def __init__(self, tokenizer, special_ids: dict, name: str):
        self.tokenizer, self.special_ids, self.name = tokenizer, dict(special_ids), name
        self._vocab = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def vocab_size(self) -> int:
        return self._vocab

    def _special(self, key: str) -> int:
        value = self.special_ids.get(key)
        return -1 if value is None else int(value)

    def bos_id(self) -> int:
        return self._special("bos")

    def eos_id(self) -> int:
        return self._special("eos")

    def pad_id(self) -> int:
        return self._special("pad")

    def unk_id(self) -> int:
        return self._special("unk")


def is_hf_tokenizer(data: bytes) -> bool:
    """Whether tokenizer bytes are a Hugging Face ``tokenizer.json`` (JSON) rather than a
    SentencePiece model (protobuf)."""
    return data.lstrip()[:1] == b"{"


def _token_content(value):
    return value.get("content") if isinstance(value, dict) else value


def hf_special_ids(tokenizer, config: dict | None, where: str) -> dict:
    """``{"bos", "eos", "pad", "unk": id or None}`` of a ``tokenizers.Tokenizer``: the tokens that
    ``tokenizer_config.json`` (``config``) names (null: none), else, for a key it does not name, the
    usual names (:data:`HF_SPECIAL_NAMES`) among its special tokens.  ValueError naming ``where``
    when there is no eos (SALT's document separator) or a named token is not in the vocabulary."""
    out = {}
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    for key, names in HF_SPECIAL_NAMES.items():
        if config is not None and f"{key}_token" in config:  # named (or null: none) by the config
            token = _token_content(config[f"{key}_token"])
            out[key] = None if token is None else tokenizer.token_to_id(token)
            if token is not None and out[key] is None:
                raise ValueError(f"tokenizer {where}: {HF_CONFIG_FILE} names {key}_token {token!r}, "
                                 "which is not in its vocabulary")
        else:
            found = [n for n in names if n in specials]
            out[key] = tokenizer.token_to_id(found[0]) if found else None
    if out["eos"] is None:
        raise ValueError(f"tokenizer {where}: no eos token (SALT separates documents with it); "
                         f"give the model directory with its {HF_CONFIG_FILE}, or name eos_token there")
    return out


def read_hf_tokenizer(path: str | os.PathLike) -> tuple[bytes, dict, dict | None]:
    """(``tokenizer.json`` bytes, special ids, ``tokenizer_config.json`` dict or None) of a
    ``tokenizer.json`` file or a model directory holding one (its ``tokenizer_config.json``, in the
    same folder, names the special tokens)."""
    p = pathlib.Path(path)
    file = p / HF_TOKENIZER_FILE if p.is_dir() else p
    if not file.is_file():
        raise ValueError(f"tokenizer {os.fspath(path)!r}: no {HF_TOKENIZER_FILE} in that directory")
    data = file.read_bytes()
    config = None
    config_path = file.parent / HF_CONFIG_FILE
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise ValueError(f"tokenizer {os.fspath(config_path)!r}: unreadable JSON ({e})") from None
        if not isinstance(config, dict):
            raise ValueError(f"tokenizer {os.fspath(config_path)!r}: not a JSON object")
    tok = _hf_tokenizer(data, repr(os.fspath(file)))
    return data, hf_special_ids(tok, config, repr(os.fspath(file))), config


def _hf_tokenizer(data: bytes, where: str):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ValueError(f"tokenizer {where} is a Hugging Face tokenizer.json: install the `tokenizers` "
                         "package (pip install 'salt[interop]')") from None
    try:
        return Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a plain Exception
        raise ValueError(f"tokenizer {where}: not a readable tokenizer.json ({e})") from None


def load_tokenizer(data: bytes, special_ids: dict | None = None, name: str | None = None):
    """The tokenizer in ``data``: a :class:`HFTokenizer` for ``tokenizer.json`` bytes (with
    ``special_ids``, e.g. a token store's; None: found as :func:`hf_special_ids` does without a
    config), else the SentencePiece model (:func:`load_processor`, SALT's fixed special ids)."""
    where = name or "<bytes>"
    if not is_hf_tokenizer(data):
        return load_processor(data, name=name)
    tok = _hf_tokenizer(data, where)
    return HFTokenizer(tok, special_ids or hf_special_ids(tok, None, where), where)


def sentencepiece_to_hf_json(model: bytes) -> bytes:
    """A ``tokenizer.json`` (``tokenizers`` Unigram) of a SentencePiece model trained by SALT
    (identity normalisation, no dummy prefix, byte fallback): the same pieces and scores, spaces as
    "▁", bytes as ``<0xNN>``; control, unknown and unused pieces get a score no segmentation picks
    (SentencePiece never matches them in text).  For ``salt export hf`` (docs/interop.md counts how
    often its ids equal SentencePiece's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    sp = load_processor(model)
    vocab = []
    for i in range(sp.get_piece_size()):
        special = sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)
        vocab.append((sp.id_to_piece(i), -1e9 if special else float(sp.get_score(i))))
    tok = Tokenizer(models.Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE_MARK, prepend_scheme="never", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace(_SPACE_MARK, " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok.to_str().encode("utf-8")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
