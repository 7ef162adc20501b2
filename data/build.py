"""``prepare``: corpus -> tokenizer -> packed token store (the engine of ``salt data prepare``).

Two streaming passes over the sources, so no corpus is ever held in memory:

1. (only when training a tokenizer) read every document, keep a deterministic sample of the
   train documents (those with the smallest sample hash, up to ``sample_bytes``), train
   SentencePiece on the sample's lines.
2. read every document again, route it to train/val by its hash, tokenise it (in
   ``workers`` processes), check decode(encode(doc)) == doc, append ``ids + [EOS]``.

The split is by document: a document goes to ``val`` iff the first 8 bytes of
``blake2b(utf8(text), key=seed)`` read as a big-endian integer, divided by 2**64, are
below ``val_fraction``. Identical documents therefore always land in the same split
(no leakage through duplicates). Everything is built in a hidden temporary directory next
to ``out_dir`` and renamed into place at the end, so an interrupted run never leaves a
directory that looks like a store.

Why one module of ~410 lines: the two passes (tokenizer sample, tokenising workers) share the
store layout, the split hash and the atomic placement; they are one build.
"""
from __future__ import annotations

import collections
import contextlib
import glob
import hashlib
import heapq
import multiprocessing
import os
import pathlib
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from salt.core import outputs
from salt.core.lock import LOCK_NAME, DirLock, is_stale
from salt.data import store as store_format
from salt.data.corpus import Corpus, CorpusStats, embedded_corpus, iter_documents, resolve_sources
from salt.data.tokenizer import (HF_TOKENIZER_FILE, SPECIAL_IDS, TRAINER_OPTIONS, VocabSizeError,
                                 encode_document, is_hf_tokenizer, load_processor, load_tokenizer,
                                 read_hf_tokenizer, sha256_bytes, space_mark_byte_ids, train_tokenizer)

DEFAULT_VAL_FRACTION = 0.02
# Vocabulary for the embedded corpus (~31 MB of stdlib Python): 4096 pieces give ~2.9
# characters per token on it, while the small CPU presets (d_model 128) keep the embedding
# at 4096 x 128 = 0.5M parameters, comparable to their transformer blocks. A 32K vocabulary
# would make the embedding and the output softmax dominate the cost of those models.
EMBEDDED_VOCAB_SIZE = 4096
# Bytes of text (a deterministic sample of train documents) the tokenizer is trained on:
# on the embedded corpus 4 MB gives 2.84 characters/token (6 MB: 2.87, 2 MB: 2.80) for ~14 CPU-s
# of training (6 MB: ~33 CPU-s), a few seconds of wall time on 2 idle cores.
DEFAULT_SAMPLE_BYTES = 4_000_000
# Documents are sent to the tokenising workers in chunks of about this many bytes.
CHUNK_BYTES = 1 << 20
# Below this many bytes of input files, tokenise in-process (no worker processes).
SMALL_CORPUS_BYTES = 4_000_000


def default_vocab_size(corpus_bytes: int) -> int:
    """Default vocabulary for a user corpus of ``corpus_bytes`` bytes of text.

    Small corpora (and the small CPU models trained on them) get 4096, like the embedded
    corpus; larger corpora, which go with larger models, get 16384 and, from 2 GB, 32768.
    Pass ``vocab_size`` (or an existing tokenizer) to choose differently.
    """
    if corpus_bytes < 100_000_000:
        return EMBEDDED_VOCAB_SIZE
    if corpus_bytes < 2_000_000_000:
        return 16384
    return 32768


def _hashes(data: bytes, seed: int) -> tuple[int, int]:
    """(split hash, sample hash): two independent 64-bit hashes of a document."""
    digest = hashlib.blake2b(data, digest_size=16, key=_seed_key(seed)).digest()
    return int.from_bytes(digest[:8], "big"), int.from_bytes(digest[8:], "big")


def _seed_key(seed: int) -> bytes:
    return int(seed).to_bytes(8, "big", signed=True)


def prepare(out_dir: str | os.PathLike, sources: Sequence[str | os.PathLike] | None = None, *,
            vocab_size: int | None = None, tokenizer: str | os.PathLike | None = None,
            text_field: str = "text", val_fraction: float = DEFAULT_VAL_FRACTION,
            overwrite: bool = False, skip_invalid: bool = False, seed: int = 0,
            progress: bool = True, workers: int | None = None,
            sample_bytes: int = DEFAULT_SAMPLE_BYTES, sentinels: int = 0) -> dict:
    """Build a token store in ``out_dir``; returns its metadata (also in ``metadata.json``).

    sources: paths, directories or globs (see ``salt.data.corpus``); None = the embedded
    default corpus (the interpreter's stdlib ``*.py``). tokenizer: an existing SentencePiece
    model to reuse (special ids must be pad=0 unk=1 bos=2 eos=3) instead of training one, or a
    Hugging Face ``tokenizer.json`` / a model directory holding one (special ids from its
    ``tokenizer_config.json``; the store keeps it as ``tokenizer.json``).
    workers: tokenising processes (default: 1 for inputs under 4 MB, else min(2, CPUs));
    the output does not depend on it. sentinels: UL2 sentinel ids the trained tokenizer
    reserves (``salt.data.tokenizer.sentinel_ids``); with ``tokenizer`` given, it has its own.
    """
    started = time.perf_counter()
    out = pathlib.Path(out_dir)
    _check_args(vocab_size, tokenizer, val_fraction, seed, workers, sample_bytes, text_field)
    corpus = embedded_corpus() if sources is None else resolve_sources(sources)
    inputs = list(corpus.files) + ([pathlib.Path(tokenizer)] if tokenizer is not None else [])
    _check_out_dir(out, overwrite, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)  # fail now (OSError), not after the work

    special_ids, tokenizer_file = dict(SPECIAL_IDS), store_format.TOKENIZER_FILE
    if tokenizer is not None:
        model_bytes, special_ids, tokenizer_file, tokenizer_info, sp = _given_tokenizer(
            tokenizer, vocab_size, sentinels)
    else:
        model_bytes, tokenizer_info = _train_on_sample(
            corpus, vocab_size=vocab_size, text_field=text_field, val_fraction=val_fraction,
            skip_invalid=skip_invalid, seed=seed, progress=progress, sample_bytes=sample_bytes,
            sentinels=sentinels)
        sp = load_processor(model_bytes)
    vocab = sp.vocab_size()
    dtype = store_format.token_dtype(vocab)
    if workers is None:
        # Starting a worker process costs ~1 s; it only pays off on corpora of some size.
        small = corpus.total_file_bytes < SMALL_CORPUS_BYTES
        workers = 1 if small else max(1, min(2, os.cpu_count() or 1))

    _remove_stale_partials(out)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    build_lock = DirLock(tmp)  # marks it as a live build: see _remove_stale_partials
    build_lock.__enter__()
    try:
        (tmp / tokenizer_file).write_bytes(model_bytes)
        stats = CorpusStats()
        splits, roundtrip_failures = _tokenize_to(
            tmp, corpus, stats, model_bytes=model_bytes, special_ids=special_ids, dtype=dtype, text_field=text_field,
            val_fraction=val_fraction, skip_invalid=skip_invalid, seed=seed, progress=progress,
            workers=workers, total_bytes=tokenizer_info.get("corpus_bytes"))
        if stats.documents == 0:
            raise ValueError(f"empty corpus: no non-empty documents in {_describe(corpus)} "
                             f"(skipped: {_nonzero(stats.skipped_summary()) or 'nothing'})")
        metadata = _metadata(tmp, corpus, stats, splits, roundtrip_failures, text_field=text_field,
                             val_fraction=val_fraction, seed=seed, skip_invalid=skip_invalid,
                             tokenizer_info=tokenizer_info, model_bytes=model_bytes, vocab=vocab, dtype=dtype,
                             special_ids=special_ids)
        outputs.write_json(tmp / store_format.METADATA_FILE, metadata)
        outputs.fsync_dir(tmp)
        with DirLock(out, what="--out") if out.exists() else contextlib.nullcontext():
            _check_out_dir(out, overwrite, inputs)  # may have appeared while we worked
            build_lock.release()
            (tmp / LOCK_NAME).unlink(missing_ok=True)
            outputs.move_into_place(tmp, out)
    except BaseException:
        build_lock.release()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        _report(metadata, time.perf_counter() - started)
    return metadata


def _given_tokenizer(tokenizer, vocab_size, sentinels):
    """A tokenizer given with ``--tokenizer`` (SentencePiece model, or a Hugging Face
    ``tokenizer.json`` / model directory): (its bytes, special ids, the store's file name for it,
    the metadata's tokenizer record, a processor)."""
    if sentinels:
        raise ValueError(f"--sentinels applies to a tokenizer trained here; {os.fspath(tokenizer)!r} "
                         "has its own (drop one of the two)")
    special_ids, tokenizer_file = dict(SPECIAL_IDS), store_format.TOKENIZER_FILE
    model_bytes = None if pathlib.Path(tokenizer).is_dir() else _read_tokenizer(tokenizer)
    if model_bytes is None or is_hf_tokenizer(model_bytes):  # Hugging Face tokenizer.json
        model_bytes, special_ids, _ = read_hf_tokenizer(tokenizer)
        tokenizer_file = HF_TOKENIZER_FILE
    sp = load_tokenizer(model_bytes, special_ids, name=repr(os.fspath(tokenizer)))
    if vocab_size is not None and vocab_size != sp.vocab_size():
        raise ValueError(f"vocab_size={vocab_size} disagrees with tokenizer {os.fspath(tokenizer)!r}, "
                         f"whose vocabulary has {sp.vocab_size()} pieces; drop one of the two")
    tokenizer_info = {"trained": False, "source": os.fspath(tokenizer)}
    if tokenizer_file != store_format.TOKENIZER_FILE:
        tokenizer_info.update(kind="huggingface", file=tokenizer_file)
    return model_bytes, special_ids, tokenizer_file, tokenizer_info, sp


def _metadata(tmp, corpus, stats, splits, roundtrip_failures, *, text_field, val_fraction, seed, skip_invalid,
              tokenizer_info, model_bytes, vocab, dtype, special_ids) -> dict:
    """The store's ``metadata.json`` (the data files in ``tmp`` hashed)."""
    return {
        "format": store_format.FORMAT_NAME,
        "format_version": store_format.FORMAT_VERSION,
        "corpus": corpus.description,
        "python_version": sys.version.split()[0],
        "text_field": text_field,
        "val_fraction": val_fraction,
        "seed": seed,
        "skip_invalid": skip_invalid,
        "split_rule": "val iff int(blake2b(utf8(text), digest_size=16, key=seed as 8-byte "
                      "big-endian signed)[:8], big-endian) / 2**64 < val_fraction",
        "tokenizer": tokenizer_info,
        "tokenizer_sha256": sha256_bytes(model_bytes),
        "vocab_size": vocab,
        "token_dtype": dtype.str,
        "special_ids": special_ids,
        "document_separator": "eos",
        "splits": splits,
        "totals": {k: splits["train"][k] + splits["val"][k] for k in ("documents", "tokens", "bytes")},
        "input_files": stats.files,
        "skipped": stats.skipped_summary(),
        "roundtrip_failures": roundtrip_failures,
        # content hashes of the data files, checked on first use (salt.data.store)
        "files": {name: {"sha256": store_format.file_sha256(tmp / name), "size": (tmp / name).stat().st_size}
                  for split in store_format.SPLITS
                  for name in (store_format.tokens_file(split), store_format.offsets_file(split))},
    }


def _remove_stale_partials(out: pathlib.Path) -> None:
    """Delete ``.OUT.partial-*`` build directories of earlier ``prepare`` runs that died (kill -9):
    only those carrying our lock file (so we made them) that no live process holds."""
    if not out.parent.is_dir():
        return
    for partial in out.parent.glob(f".{glob.escape(out.name)}.partial-*"):
        if partial.is_dir() and is_stale(partial):
            print(f"removing {partial} (left by an interrupted `salt data prepare`)", file=sys.stderr)
            shutil.rmtree(partial, ignore_errors=True)


def _check_args(vocab_size, tokenizer, val_fraction, seed, workers, sample_bytes, text_field):
    if vocab_size is not None and (not isinstance(vocab_size, int) or isinstance(vocab_size, bool)
                                   or vocab_size < 1):
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    if tokenizer is not None and not pathlib.Path(tokenizer).exists():
        raise ValueError(f"tokenizer {os.fspath(tokenizer)!r}: no such file or directory")
    if not isinstance(val_fraction, (int, float)) or not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if not isinstance(seed, int) or not -(1 << 63) <= seed < (1 << 63):
        raise ValueError(f"seed must be a 64-bit integer, got {seed!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    if not isinstance(sample_bytes, int) or sample_bytes < 1:
        raise ValueError(f"sample_bytes must be a positive integer, got {sample_bytes!r}")
    if not isinstance(text_field, str) or not text_field:
        raise ValueError(f"text_field must be a non-empty string, got {text_field!r}")


def _check_out_dir(out: pathlib.Path, overwrite: bool, inputs):
    """The safety rule (salt.core.outputs): --overwrite replaces only a token store that holds
    nothing else and none of the inputs."""
    outputs.check_output_dir(out, "store", mode="replace" if overwrite else "create", inputs=inputs)


def _read_tokenizer(path) -> bytes:
    try:
        return pathlib.Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"tokenizer {os.fspath(path)!r}: cannot read ({e})") from None


def _describe(corpus: Corpus) -> str:
    if corpus.description["kind"] == "embedded-stdlib":
        return f"the embedded corpus ({corpus.description['stdlib_dir']})"
    return f"sources {corpus.description['sources']}"


def _nonzero(counts: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in counts.items() if v)


def _train_on_sample(corpus: Corpus, *, vocab_size, text_field, val_fraction, skip_invalid, seed,
                     progress, sample_bytes, sentinels=0) -> tuple[bytes, dict]:
    """Pass 1: sample train documents deterministically and train the tokenizer on them."""
    stats = CorpusStats()
    threshold = val_fraction * 2.0 ** 64
    heap: list[tuple[int, int, str]] = []  # (-sample_hash, size, text): max-heap on the hash
    held = corpus_bytes = 0
    with tqdm(total=len(corpus.files), unit="file", desc="sampling for tokenizer",
              disable=not progress, file=sys.stderr) as bar:
        for text in iter_documents(corpus, stats, text_field=text_field, skip_invalid=skip_invalid,
                                   on_file=lambda _: bar.update()):
            data = text.encode("utf-8")
            corpus_bytes += len(data)
            split_hash, sample_hash = _hashes(data, seed)
            if split_hash < threshold:
                continue
            heapq.heappush(heap, (-sample_hash, len(data), text))
            held += len(data)
            while held > sample_bytes and len(heap) > 1:
                _, size, _ = heapq.heappop(heap)
                held -= size
    if stats.documents == 0:
        raise ValueError(f"empty corpus: no non-empty documents in {_describe(corpus)} "
                         f"(skipped: {_nonzero(stats.skipped_summary()) or 'nothing'})")
    if not heap:
        raise ValueError(f"no train documents to train a tokenizer on: all {stats.documents} "
                         f"documents went to the validation split (val_fraction={val_fraction})")
    sample = [text for _, _, text in sorted(heap, reverse=True)]  # ascending sample hash
    chosen = vocab_size if vocab_size is not None else default_vocab_size(corpus_bytes)
    if progress:
        print(f"training tokenizer: vocab_size={chosen} on {len(sample)} documents "
              f"({held / 1e6:.1f} MB)...", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        model_bytes = train_tokenizer(sample, chosen, sentinels)
    except VocabSizeError as e:
        if vocab_size is not None or e.max_vocab_size is None:
            raise
        # The default was too large for a small corpus: use the largest size that works.
        if progress:
            print(f"default vocab_size={chosen} is too large for this corpus; "
                  f"using {e.max_vocab_size}", file=sys.stderr)
        chosen = e.max_vocab_size
        model_bytes = train_tokenizer(sample, chosen, sentinels)
    info = {
        "trained": True,
        "model_type": TRAINER_OPTIONS["model_type"],
        "vocab_size_requested": vocab_size,
        "sample_documents": len(sample),
        "sample_bytes": held,
        "sample_budget_bytes": sample_bytes,
        "corpus_bytes": corpus_bytes,
        "sentinels": sentinels,
        "trainer_options": {k: v for k, v in TRAINER_OPTIONS.items() if k != "minloglevel"},
    }  # no timings here: they would break byte-identical outputs
    if progress:
        print(f"tokenizer trained in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return model_bytes, info


# ---- pass 2: tokenising workers -------------------------------------------------------------

_worker_sp = None
_worker_space_ids = None


def _init_worker(model_bytes: bytes, special_ids: dict | None = None):
    global _worker_sp, _worker_space_ids
    _worker_sp = load_tokenizer(model_bytes, special_ids)
    _worker_space_ids = space_mark_byte_ids(_worker_sp)


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """Tokens of each text followed by EOS, concatenated; per-document lengths; round-trip failures."""
    pieces, lengths, failures = [], np.empty(len(texts), np.int64), 0
    for i, text in enumerate(texts):
        ids = encode_document(_worker_sp, text, _worker_space_ids)
        if _worker_sp.decode(ids) != text:
            failures += 1
        ids.append(_worker_sp.eos_id())
        pieces.append(np.asarray(ids, dtype=np.uint32))
        lengths[i] = len(ids)
    return np.concatenate(pieces), lengths, failures


class _SplitWriter:
    def __init__(self, directory: pathlib.Path, split: str, dtype: np.dtype):
        self.dtype = dtype
        self.tokens_fh = open(directory / store_format.tokens_file(split), "wb")
        self.offsets_fh = open(directory / store_format.offsets_file(split), "wb")
        self.offsets_fh.write(np.zeros(1, store_format.OFFSET_DTYPE).tobytes())
        self.documents = self.tokens = self.bytes = 0

    def write(self, ids: np.ndarray, lengths: np.ndarray, nbytes: int):
        if len(lengths) == 0:
            return
        self.tokens_fh.write(ids.astype(self.dtype).tobytes())
        ends = self.tokens + np.cumsum(lengths)
        self.offsets_fh.write(ends.astype(store_format.OFFSET_DTYPE).tobytes())
        self.documents += len(lengths)
        self.tokens += int(lengths.sum())
        self.bytes += nbytes

    def close(self):
        for fh in (self.tokens_fh, self.offsets_fh):
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()

    def counts(self) -> dict:
        return {"documents": self.documents, "tokens": self.tokens, "bytes": self.bytes}


def _tokenize_to(directory: pathlib.Path, corpus: Corpus, stats: CorpusStats, *, model_bytes, special_ids, dtype,
                 text_field, val_fraction, skip_invalid, seed, progress, workers, total_bytes):
    threshold = val_fraction * 2.0 ** 64
    writers = {s: _SplitWriter(directory, s, dtype) for s in store_format.SPLITS}
    failures = 0
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing",
               disable=not progress, file=sys.stderr)

    def chunks():
        texts, is_val, sizes, held = [], [], [], 0
        for text in iter_documents(corpus, stats, text_field=text_field, skip_invalid=skip_invalid):
            data = text.encode("utf-8")
            texts.append(text)
            is_val.append(_hashes(data, seed)[0] < threshold)
            sizes.append(len(data))
            held += len(data)
            if held >= CHUNK_BYTES:
                yield texts, np.array(is_val, bool), np.array(sizes, np.int64)
                texts, is_val, sizes, held = [], [], [], 0
        if texts:
            yield texts, np.array(is_val, bool), np.array(sizes, np.int64)

    def consume(result, is_val, sizes):
        nonlocal failures
        ids, lengths, chunk_failures = result
        failures += chunk_failures
        ends = np.cumsum(lengths)
        starts = ends - lengths
        for split, mask in (("train", ~is_val), ("val", is_val)):
            if mask.any():
                parts = [ids[s:e] for s, e in zip(starts[mask], ends[mask])]
                writers[split].write(np.concatenate(parts), lengths[mask], int(sizes[mask].sum()))
        bar.update(int(sizes.sum()))

    try:
        if workers == 1:
            _init_worker(model_bytes, special_ids)
            for texts, is_val, sizes in chunks():
                consume(_encode_chunk(texts), is_val, sizes)
        else:
            # "spawn": safe even if the caller has started threads (JAX, tqdm monitors).
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(workers, initializer=_init_worker, initargs=(model_bytes, special_ids)) as pool:
                pending: collections.deque = collections.deque()
                for texts, is_val, sizes in chunks():
                    pending.append((pool.apply_async(_encode_chunk, (texts,)), is_val, sizes))
                    while len(pending) > 2 * workers:
                        job, v, s = pending.popleft()
                        consume(job.get(), v, s)
                while pending:
                    job, v, s = pending.popleft()
                    consume(job.get(), v, s)
    finally:
        bar.close()
        for w in writers.values():
            w.close()
    return {s: w.counts() for s, w in writers.items()}, failures


# ---- summary --------------------------------------------------------------------------------

def summary_lines(metadata: dict) -> list[str]:
    """Human-readable summary of a store's metadata (used by prepare and the CLI)."""
    lines = [f"vocab_size {metadata['vocab_size']} ({metadata['token_dtype']}), "
             f"tokenizer sha256 {metadata['tokenizer_sha256'][:16]}..."]
    for split in store_format.SPLITS:
        c = metadata["splits"][split]
        lines.append(f"{split:5s}: {c['documents']:>10,} documents {c['tokens']:>14,} tokens "
                     f"{c['bytes']:>15,} bytes")
    skipped = _nonzero(metadata["skipped"])
    lines.append(f"input files: {metadata['input_files']:,}; skipped/altered: {skipped or 'none'}")
    failures = metadata["roundtrip_failures"]
    total = metadata["totals"]["documents"]
    lines.append(f"round trip decode(encode(doc)) == doc: {total - failures:,}/{total:,} documents")
    return lines


def _report(metadata: dict, seconds: float):
    for line in summary_lines(metadata):
        print(line, file=sys.stderr)
    tokens = metadata["totals"]["tokens"]
    print(f"prepared in {seconds:.1f} s ({tokens / max(seconds, 1e-9) / 1e6:.2f} M tokens/s)",
          file=sys.stderr)
