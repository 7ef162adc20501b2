"""The packed token store written by ``salt data prepare`` and read by everything else.

Layout of a store directory::

    metadata.json             written last; a directory without it is not a store
    tokenizer.model           the SentencePiece model (sha256 in the metadata)
    train.tokens.bin          flat token ids of the train split, native-endian uint16 or uint32
    train.doc_offsets.bin     int64 [documents + 1]: document d is tokens[off[d]:off[d+1]]
    val.tokens.bin, val.doc_offsets.bin
    token_check.json          cache of the checks below (size, mtime, ctime, inode, max id per split)

Integrity (docs/safety.md §7).  ``metadata.json`` records the sha256 and size of every data file
(``files``).  Opening a store checks, cheaply: the tokenizer's sha256 and that its vocabulary is
the metadata's ``vocab_size``; each file's size; on first use, and whenever a tokens or offsets
file's size, mtime, ctime or inode changed, each file's sha256 against the metadata and every
token id below ``vocab_size`` (a max over the memory map; the result cached in
``token_check.json``); otherwise a sample of ``SAMPLED_IDS`` token ids per split.  The loader
checks the ids of every batch it serves.  :meth:`TokenStore.verify` (``salt data info
--verify``) re-checks everything from scratch.

Each document's tokens end with EOS (id 3), so the flat stream is
``doc0 EOS doc1 EOS ...``. The store is opened read-only with memory maps.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib

import numpy as np

from salt.core import outputs
from salt.data.tokenizer import HF_TOKENIZER_FILE, SPECIAL_IDS, load_tokenizer

FORMAT_NAME = "salt-token-store"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
TOKENIZER_FILE = "tokenizer.model"
TOKEN_CHECK_FILE = "token_check.json"
_MAX_CHUNK = 1 << 24  # tokens per slice of the max scan
SAMPLED_IDS = 4096  # token ids per split checked at each open when the files are unchanged
SPLITS = ("train", "val")
OFFSET_DTYPE = np.dtype("<i8")


def tokens_file(split: str) -> str:
    return f"{split}.tokens.bin"


def offsets_file(split: str) -> str:
    return f"{split}.doc_offsets.bin"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32 (little-endian on disk)."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def file_sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class TokenStore:
    """A prepared token store (read-only).

    Raises ValueError naming the path if the directory is not a complete store
    (no ``metadata.json``, unreadable metadata, missing files or sizes that disagree).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        meta_path = self.path / METADATA_FILE
        if not self.path.is_dir():
            raise ValueError(f"token store {self.path}: no such directory "
                             "(create one with `salt data prepare --out DIR`)")
        if not meta_path.is_file():
            raise ValueError(f"token store {self.path}: no {METADATA_FILE}; the store is incomplete "
                             "(an interrupted `salt data prepare`?) or not a token store")
        try:
            self.metadata = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"token store {self.path}: unreadable {METADATA_FILE} ({e})") from None
        if not isinstance(self.metadata, dict) or self.metadata.get("format") != FORMAT_NAME:
            raise ValueError(f"token store {self.path}: {METADATA_FILE} is not a {FORMAT_NAME} metadata file")
        if self.metadata.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"token store {self.path}: format_version "
                             f"{self.metadata.get('format_version')!r} is not supported "
                             f"(expected {FORMAT_VERSION}); re-run `salt data prepare`")
        try:
            self.vocab_size = int(self.metadata["vocab_size"])
            self.tokenizer_sha256 = str(self.metadata["tokenizer_sha256"])
            self.dtype = np.dtype(self.metadata["token_dtype"])
            self._counts = {s: self.metadata["splits"][s] for s in SPLITS}
            for s in SPLITS:
                int(self._counts[s]["tokens"]), int(self._counts[s]["documents"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"token store {self.path}: {METADATA_FILE} lacks or garbles a field ({e!r})") from None
        tok_info = self.metadata.get("tokenizer")
        tok_file = tok_info.get("file", TOKENIZER_FILE) if isinstance(tok_info, dict) else TOKENIZER_FILE
        if tok_file not in (TOKENIZER_FILE, HF_TOKENIZER_FILE):
            raise ValueError(f"token store {self.path}: {METADATA_FILE} names an unknown tokenizer file {tok_file!r}")
        self.tokenizer_path = self.path / tok_file
        self.special_ids = dict(self.metadata.get("special_ids") or SPECIAL_IDS)
        if not self.tokenizer_path.is_file():
            raise ValueError(f"token store {self.path}: missing {tok_file}")
        digest = file_sha256(self.tokenizer_path)
        if digest != self.tokenizer_sha256:
            raise ValueError(f"token store {self.path}: {tok_file} sha256 {digest} does not match "
                             f"the metadata's {self.tokenizer_sha256}")
        pieces = self.processor().vocab_size()
        if pieces != self.vocab_size:
            raise ValueError(f"token store {self.path}: {METADATA_FILE} says vocab_size={self.vocab_size}, "
                             f"but its {TOKENIZER_FILE} has {pieces} pieces; the metadata is corrupt "
                             "(re-run `salt data prepare`)")
        if self.dtype != token_dtype(self.vocab_size):
            raise ValueError(f"token store {self.path}: {METADATA_FILE} says token_dtype={self.dtype.str}, "
                             f"but a vocabulary of {self.vocab_size} is stored as {token_dtype(self.vocab_size).str}")
        self._hashes = self.metadata.get("files")
        if self._hashes is not None and not (isinstance(self._hashes, dict) and all(
                isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in self._hashes.values())):
            raise ValueError(f"token store {self.path}: {METADATA_FILE} garbles its 'files' hashes")
        for split in SPLITS:
            self._check_size(tokens_file(split), self.num_tokens(split) * self.dtype.itemsize)
            self._check_size(offsets_file(split), (self.num_documents(split) + 1) * OFFSET_DTYPE.itemsize)
        self._tokens: dict[str, np.ndarray] = {}
        self._offsets: dict[str, np.ndarray] = {}
        self._check_token_ids(use_cache=True)

    def _check_hash(self, name: str) -> None:
        want = (self._hashes or {}).get(name)
        if want is None:
            return  # a store prepared before content hashes: sizes and ids only
        digest = file_sha256(self.path / name)
        if digest != want["sha256"]:
            raise ValueError(f"token store {self.path}: {self.path / name} does not match the sha256 "
                             f"{METADATA_FILE} records for it (the file changed or rotted); the store is "
                             "corrupt (re-run `salt data prepare`)")

    def _check_sample(self, split: str) -> None:
        tokens = self.tokens(split)
        if len(tokens) == 0:
            return
        at = np.random.default_rng().integers(0, len(tokens), size=min(SAMPLED_IDS, len(tokens)))
        self.check_ids(tokens[np.sort(at)], split, "a sample of")

    def check_ids(self, ids: np.ndarray, split: str, what: str) -> None:
        """ValueError naming the tokens file when some id of ``ids`` (``what`` of ``split``) is
        not below ``vocab_size``."""
        if ids.size and int(ids.max()) >= self.vocab_size:
            raise ValueError(f"token store {self.path}: {self.path / tokens_file(split)} holds token id "
                             f"{int(ids.max())} >= vocab_size {self.vocab_size} ({what} its tokens); the "
                             "store is corrupt (re-run `salt data prepare`; `salt data info --verify` "
                             "checks it)")

    def _check_token_ids(self, *, use_cache: bool) -> dict:
        """Every id < vocab_size in both splits and every file its recorded sha256, redone when a
        file's size, mtime, ctime or inode changed; else a sample of the ids (ValueError naming
        the file otherwise)."""
        cache_path = self.path / TOKEN_CHECK_FILE
        cache = {}
        if use_cache and cache_path.is_file():
            try:
                cache = json.loads(cache_path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError, RecursionError):
                cache = {}
        fresh, changed = {}, False
        for split in SPLITS:
            path = self.path / tokens_file(split)
            key = {}
            for name, tag in ((tokens_file(split), ""), (offsets_file(split), "offsets_")):
                st = (self.path / name).stat()
                key.update({f"{tag}size": st.st_size, f"{tag}mtime_ns": st.st_mtime_ns,
                            f"{tag}ctime_ns": st.st_ctime_ns, f"{tag}inode": st.st_ino})
            entry = cache.get(split) if isinstance(cache, dict) else None
            if (isinstance(entry, dict) and {k: entry.get(k) for k in key} == key
                    and isinstance(entry.get("max_id"), int)):
                max_id, recheck = entry["max_id"], False
                self._check_sample(split)
            else:
                recheck = True
                tokens = self.tokens(split)
                max_id = -1
                for start in range(0, len(tokens), _MAX_CHUNK):
                    max_id = max(max_id, int(tokens[start:start + _MAX_CHUNK].max()))
                changed = True
            if max_id >= self.vocab_size:
                raise ValueError(f"token store {self.path}: {path} holds token id {max_id} >= vocab_size "
                                 f"{self.vocab_size}; the store is corrupt (re-run `salt data prepare`)")
            if recheck:
                self._check_hash(tokens_file(split))
                self._check_hash(offsets_file(split))
            fresh[split] = dict(key, max_id=max_id)
        if changed:
            try:  # a cache only: a read-only store is checked again next time
                outputs.write_json(cache_path, fresh)
            except OSError:
                pass
        return fresh

    def verify(self) -> dict:
        """Full check (``salt data info --verify``): token ids < vocab (no cache), document offsets
        start at 0, never decrease, end at the token count, and every document ends with EOS.
        Returns per-split facts; raises ValueError naming the file and position otherwise."""
        EOS_ID = self.special_ids["eos"]
        facts = self._check_token_ids(use_cache=False)
        for split in SPLITS:
            offsets, tokens = self.doc_offsets(split), self.tokens(split)
            name = self.path / offsets_file(split)
            if len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(tokens):
                raise ValueError(f"token store {self.path}: {name} must start at 0 and end at "
                                 f"{len(tokens)} (the token count)")
            steps = np.diff(offsets)
            if (steps < 1).any():
                d = int(np.argmax(steps < 1))
                raise ValueError(f"token store {self.path}: {name}: document {d} is empty or ends "
                                 "before it starts")
            if len(tokens) and (tokens[offsets[1:] - 1] != EOS_ID).any():
                d = int(np.argmax(tokens[offsets[1:] - 1] != EOS_ID))
                raise ValueError(f"token store {self.path}: document {d} of {tokens_file(split)} "
                                 "does not end with EOS")
            facts[split]["documents"] = int(len(offsets) - 1)
        return facts

    def _check_size(self, name: str, expected: int):
        path = self.path / name
        if not path.is_file():
            raise ValueError(f"token store {self.path}: missing {name}")
        size = path.stat().st_size
        if size != expected:
            raise ValueError(f"token store {self.path}: {name} has {size} bytes, the metadata says "
                             f"{expected}; the store is corrupt or truncated")

    @staticmethod
    def _check_split(split: str):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")

    def num_tokens(self, split: str) -> int:
        self._check_split(split)
        return int(self._counts[split]["tokens"])

    def num_documents(self, split: str) -> int:
        self._check_split(split)
        return int(self._counts[split]["documents"])

    def tokens(self, split: str) -> np.ndarray:
        """Read-only memory map of the split's flat token ids (uint16 or uint32)."""
        self._check_split(split)
        if split not in self._tokens:
            self._tokens[split] = _memmap(self.path / tokens_file(split), self.dtype,
                                          self.num_tokens(split))
        return self._tokens[split]

    def doc_offsets(self, split: str) -> np.ndarray:
        """int64 [documents + 1]: document d spans tokens[off[d]:off[d+1]] (EOS included)."""
        self._check_split(split)
        if split not in self._offsets:
            self._offsets[split] = _memmap(self.path / offsets_file(split), OFFSET_DTYPE,
                                           self.num_documents(split) + 1)
        return self._offsets[split]

    @property
    def eos_id(self) -> int:
        """The tokenizer's eos: the document separator, and the start and end of a generation."""
        return int(self.special_ids["eos"])

    @property
    def pad_id(self) -> int:
        """The id written at positions no loss or attention reads (padding of batches and
        prompts): the tokenizer's pad, or its eos when it has none (many Hugging Face
        tokenizers)."""
        pad = self.special_ids.get("pad")
        return self.eos_id if pad is None or int(pad) < 0 else int(pad)

    def processor(self):
        """The store's tokenizer: a ``sentencepiece.SentencePieceProcessor``, or for a Hugging Face
        ``tokenizer.json`` a :class:`salt.data.tokenizer.HFTokenizer` with the store's special ids."""
        return load_tokenizer(self.tokenizer_path.read_bytes(), self.special_ids, name=str(self.tokenizer_path))

    def __repr__(self):
        return (f"TokenStore({str(self.path)!r}, vocab_size={self.vocab_size}, "
                f"train_tokens={self.num_tokens('train')}, val_tokens={self.num_tokens('val')})")


def _memmap(path: pathlib.Path, dtype: np.dtype, count: int) -> np.ndarray:
    if count == 0:  # numpy cannot memory-map an empty file
        empty = np.zeros(0, dtype=dtype)
        empty.flags.writeable = False
        return empty
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def open_store(store_or_dir) -> TokenStore:
    """Accept a TokenStore or a path to one."""
    return store_or_dir if isinstance(store_or_dir, TokenStore) else TokenStore(store_or_dir)
