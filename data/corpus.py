"""Where documents come from: the embedded default corpus and the sources users bring.

A *source* is a path (file or directory) or a glob pattern. Files are read as follows
(by name, case-insensitive):

* ``*.jsonl``, ``*.jsonl.gz``, ``*.jsonl.zst`` / ``*.jsonl.zstd``: one JSON object per line,
  the document text under ``text_field``; streamed line by line (never the whole file).
* ``*.parquet``, and a Hugging Face dataset saved to disk (a directory, one source): the
  ``text_field`` column, streamed by record batches (:mod:`salt.data.tabular`).
* any other ``*.gz`` / ``*.zst`` / ``*.zstd``: one compressed text document.
* any other file: one text document (a file holding a NUL byte is treated as binary,
  skipped and counted). A file (or decompressed stream) larger than ``LARGE_DOCUMENT_BYTES``
  (16 MiB) is streamed instead: it is cut at line ends into documents of about
  ``SEGMENT_BYTES`` (1 MiB) each (counted in ``split_large_files``; a piece holding a NUL byte
  is skipped and counted in ``binary_segments``), so no single file is ever held in memory.

A JSONL line nested deeper than ``MAX_JSON_DEPTH`` (64) arrays/objects is an invalid line
(an error naming the file and line, or skipped and counted with ``skip_invalid``).

Directories are walked recursively in sorted order, skipping hidden entries (names starting
with ``.``); globs are expanded (``**`` allowed) in sorted order. The embedded default
corpus is the ``*.py`` files of the running interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``), excluding ``site-packages``, in sorted order.

Nothing is dropped silently: every skipped or altered input is counted in
:class:`CorpusStats`, which ``prepare`` stores in ``metadata.json`` and prints.

Why one module of ~400 lines: every source kind (files, globs, JSONL in three compressions, the
embedded corpus) feeds the same document iterator and the same skip counters; split up, each
reader would need its own copy of the validation rules.
"""
from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import json
import os
import pathlib
import re
import sys
import sysconfig
import zlib
from collections.abc import Iterator, Sequence

from salt.core.inputs import file_problem
from salt.data import tabular

REPLACEMENT_CHAR = "\ufffd"
_REPLACEMENT_BYTES = REPLACEMENT_CHAR.encode("utf-8")
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".jsonl.zstd")
_GZIP_SUFFIXES = (".gz",)
_ZSTD_SUFFIXES = (".zst", ".zstd")
_READ_CHUNK_BYTES = 1 << 20
LARGE_DOCUMENT_BYTES = 16 << 20
SEGMENT_BYTES = 1 << 20
MAX_JSON_DEPTH = 64


@dataclasses.dataclass
class CorpusStats:
    """Counts of what was read, skipped and altered while streaming the sources."""

    files: int = 0
    documents: int = 0                # non-empty documents yielded
    empty_documents: int = 0          # empty texts (skipped)
    binary_files: int = 0             # plain files holding a NUL byte (skipped)
    blank_jsonl_lines: int = 0        # whitespace-only JSONL lines (skipped)
    invalid_json_lines: int = 0       # malformed JSON / not an object (skipped with skip_invalid)
    missing_field_lines: int = 0      # object without a string text field (skipped with skip_invalid)
    non_utf8_documents: int = 0       # documents in which invalid UTF-8 was replaced by U+FFFD
    replaced_characters: int = 0      # number of U+FFFD characters introduced by that replacement
    split_large_files: int = 0        # files over LARGE_DOCUMENT_BYTES read as ~1 MiB pieces
    binary_segments: int = 0          # pieces of such files holding a NUL byte (skipped)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def skipped_summary(self) -> dict:
        """The counters of things skipped or altered (everything but files/documents)."""
        d = self.to_dict()
        d.pop("files")
        d.pop("documents")
        return d


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A resolved, ordered list of input files plus a description for the metadata."""

    files: tuple[pathlib.Path, ...]
    description: dict

    @property
    def total_file_bytes(self) -> int:
        return sum(tabular.source_bytes(f) for f in self.files)


def embedded_corpus() -> Corpus:
    """The default corpus: the running interpreter's stdlib ``*.py`` files, no site-packages."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise ValueError(f"embedded corpus: stdlib directory {root} does not exist")
    files = sorted(_stdlib_py_files(root), key=lambda f: f.relative_to(root).as_posix())
    if not files:
        raise ValueError(f"embedded corpus: no *.py files under {root}")
    listing = "\n".join(f"{f.relative_to(root).as_posix()}\t{f.stat().st_size}" for f in files)
    return Corpus(tuple(files), {
        "kind": "embedded-stdlib",
        "stdlib_dir": str(root),
        "python_version": sys.version.split()[0],
        "python_implementation": sys.implementation.name,
        "num_files": len(files),
        # sha256 over "relative/path<TAB>size" lines, sorted: identifies the file list.
        "file_list_sha256": hashlib.sha256(listing.encode("utf-8")).hexdigest(),
    })


def _stdlib_py_files(root: pathlib.Path) -> Iterator[pathlib.Path]:
    """``*.py`` files under ``root``, never descending into a ``site-packages`` folder (which
    can hold far more files than the stdlib itself) nor into symlinked folders."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "site-packages"]
        for name in filenames:
            path = pathlib.Path(dirpath) / name
            if name.endswith(".py") and path.is_file():
                yield path


def resolve_sources(sources: Sequence[str | os.PathLike]) -> Corpus:
    """Expand paths, directories and globs into an ordered, de-duplicated list of files."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if len(sources) == 0:
        raise ValueError("sources: empty list (pass None for the embedded default corpus)")
    files: list[pathlib.Path] = []
    seen: set[pathlib.Path] = set()

    def add(path: pathlib.Path):
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            files.append(path)

    for source in sources:
        text = os.fspath(source)
        path = pathlib.Path(text)
        if path.is_file() or tabular.is_hf_dataset(path):
            add(path)
        elif path.is_dir():
            found = sorted(_walk_dir(path), key=lambda f: f.relative_to(path).as_posix())
            if not found:
                raise ValueError(f"source {text!r}: directory holds no (non-hidden) files")
            for f in found:
                add(f)
        elif glob.has_magic(text):
            found = sorted(pathlib.Path(p) for p in glob.glob(text, recursive=True)
                           if pathlib.Path(p).is_file())
            if not found:
                raise ValueError(f"source {text!r}: glob pattern matches no files")
            for f in found:
                add(f)
        else:
            why = file_problem(path) if os.path.lexists(path) else None
            raise ValueError(f"source {text!r}: {why or 'no such file or directory'}")
    return Corpus(tuple(files), {
        "kind": "files",
        "sources": [os.fspath(s) for s in sources],
        "num_files": len(files),
    })


def _walk_dir(root: pathlib.Path) -> Iterator[pathlib.Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                yield pathlib.Path(dirpath) / name


def iter_documents(corpus: Corpus, stats: CorpusStats, *, text_field: str = "text",
                   skip_invalid: bool = False, on_file=None) -> Iterator[str]:
    """Stream the non-empty documents of ``corpus`` in order, updating ``stats``.

    ``on_file(path)`` is called after each file is finished (used for progress bars).
    Raises ValueError naming the file (and line) for malformed input.
    """
    for path in corpus.files:
        stats.files += 1
        name = path.name.lower()
        try:
            if name.endswith(_JSONL_SUFFIXES):
                yield from _iter_jsonl(path, stats, text_field, skip_invalid)
            elif tabular.is_parquet(path) or path.is_dir():
                read = tabular.iter_parquet if path.is_file() else tabular.iter_hf_dataset
                yield from read(path, stats, text_field, skip_invalid, _sanitize_surrogates)
            else:
                yield from _iter_text_file(path, stats)
        except OSError as e:
            raise ValueError(f"{path}: cannot read: {e}") from None
        if on_file is not None:
            on_file(path)


def _iter_text_file(path: pathlib.Path, stats: CorpusStats) -> Iterator[str]:
    """One document per file, or ~SEGMENT_BYTES pieces cut at line ends for a large file."""
    chunks = _iter_file_chunks(path)
    held, size = [], 0
    for chunk in chunks:
        held.append(chunk)
        size += len(chunk)
        if size > LARGE_DOCUMENT_BYTES:
            stats.split_large_files += 1
            yield from _iter_segments(held, chunks, stats)
            return
    data = b"".join(held)
    if b"\x00" in data:
        stats.binary_files += 1
        return
    yield from _one_document(data, stats)


def _one_document(data: bytes, stats: CorpusStats) -> Iterator[str]:
    text = _decode(data, stats)
    if text:
        stats.documents += 1
        yield text
    else:
        stats.empty_documents += 1


def _iter_segments(held: list[bytes], chunks: Iterator[bytes], stats: CorpusStats) -> Iterator[str]:
    """Cut a byte stream into pieces of about SEGMENT_BYTES, each ending at a line end (or, for a
    line longer than that, at a UTF-8 character boundary), and yield each as a document."""
    buf = bytearray()

    def cut(final: bool):
        nonlocal buf
        # a cut needs the byte after the piece (is it inside a character?), so only cut a buffer
        # longer than a piece until the stream ends
        while len(buf) > SEGMENT_BYTES or (final and buf):
            if len(buf) <= SEGMENT_BYTES:
                end = len(buf)
            else:
                end = buf.rfind(b"\n", 0, SEGMENT_BYTES) + 1
                if end == 0:  # no line end: back off to the start of a UTF-8 character
                    end = SEGMENT_BYTES
                    while end > 1 and (buf[end] & 0xC0) == 0x80:
                        end -= 1
            piece = bytes(buf[:end])
            del buf[:end]
            if b"\x00" in piece:
                stats.binary_segments += 1
            else:
                yield from _one_document(piece, stats)

    for chunk in held:
        buf += chunk
        yield from cut(False)
    held.clear()
    for chunk in chunks:
        buf += chunk
        yield from cut(False)
    yield from cut(True)


def _json_too_deep(line: str) -> bool:
    """Whether a JSON text nests arrays/objects deeper than MAX_JSON_DEPTH (strings ignored)."""
    if line.count("[") + line.count("{") <= MAX_JSON_DEPTH:
        return False
    depth = 0
    for ch in _JSON_STRING.sub("", line):
        if ch in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return True
        elif ch in "]}":
            depth -= 1
    return False


def _iter_jsonl(path: pathlib.Path, stats: CorpusStats, text_field: str,
                skip_invalid: bool) -> Iterator[str]:
    for lineno, line in enumerate(_iter_lines(_iter_file_chunks(path)), 1):
        if not line.strip():
            stats.blank_jsonl_lines += 1
            continue
        # Decode the line ourselves so that invalid UTF-8 is replaced and counted.
        line_text = _decode(line, stats)
        try:
            if _json_too_deep(line_text):
                raise json.JSONDecodeError(f"nested deeper than {MAX_JSON_DEPTH} levels", line_text, 0)
            record = json.loads(line_text)
        except (ValueError, RecursionError) as e:  # ValueError: also an integer past Python's digit limit
            if skip_invalid:
                stats.invalid_json_lines += 1
                continue
            what = (f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError)
                    else "nested too deeply" if isinstance(e, RecursionError) else str(e).split(";")[0])
            raise ValueError(f"{path}:{lineno}: malformed JSON ({what}); "
                             "pass --skip-invalid to skip and count such lines") from None
        if not isinstance(record, dict):
            if skip_invalid:
                stats.invalid_json_lines += 1
                continue
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}; "
                             "pass --skip-invalid to skip and count such lines")
        text = record.get(text_field)
        if not isinstance(text, str):
            if skip_invalid:
                stats.missing_field_lines += 1
                continue
            if text_field not in record:
                fields = ", ".join(repr(k) for k in list(record)[:10])
                problem = f"no field {text_field!r} (fields: {fields or 'none'})"
            else:
                problem = f"field {text_field!r} is a {type(text).__name__}, not a string"
            raise ValueError(f"{path}:{lineno}: {problem}; choose the field with --text-field, "
                             "or pass --skip-invalid to skip and count such lines")
        text = _sanitize_surrogates(text, stats)
        if text:
            stats.documents += 1
            yield text
        else:
            stats.empty_documents += 1


def _decode(data: bytes, stats: CorpusStats) -> str:
    """UTF-8 decode; invalid bytes become U+FFFD and are counted (per document and per char)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        stats.non_utf8_documents += 1
        stats.replaced_characters += text.count(REPLACEMENT_CHAR) - data.count(_REPLACEMENT_BYTES)
        return text


def _sanitize_surrogates(text: str, stats: CorpusStats) -> str:
    """JSON may carry lone surrogates (``"\\ud800"``), which are not valid UTF-8: replace them."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        before = text.count(REPLACEMENT_CHAR)
        fixed = "".join(REPLACEMENT_CHAR if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)
        stats.non_utf8_documents += 1
        stats.replaced_characters += fixed.count(REPLACEMENT_CHAR) - before
        return fixed


def _iter_file_chunks(path: pathlib.Path) -> Iterator[bytes]:
    """Raw (decompressed) bytes of a file, in chunks; truncated archives raise ValueError."""
    name = path.name.lower()
    if name.endswith(_GZIP_SUFFIXES):
        try:
            with gzip.open(path, "rb") as f:
                while chunk := f.read(_READ_CHUNK_BYTES):
                    yield chunk
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise ValueError(f"{path}: truncated or corrupt gzip file ({e})") from None
    elif name.endswith(_ZSTD_SUFFIXES):
        yield from _iter_zstd_chunks(path)
    else:
        with open(path, "rb") as f:
            while chunk := f.read(_READ_CHUNK_BYTES):
                yield chunk


def _iter_zstd_chunks(path: pathlib.Path) -> Iterator[bytes]:
    # zstandard's stream_reader returns a truncated stream silently, so we drive a
    # decompressobj per frame and check that the last frame reached its end.
    import zstandard

    decompressor = zstandard.ZstdDecompressor()
    dobj = decompressor.decompressobj()
    frame_started = False
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_READ_CHUNK_BYTES):
                while chunk:
                    frame_started = True
                    out = dobj.decompress(chunk)
                    if out:
                        yield out
                    if dobj.eof:
                        chunk = dobj.unused_data
                        dobj = decompressor.decompressobj()
                        frame_started = False
                    else:
                        chunk = b""
    except zstandard.ZstdError as e:
        raise ValueError(f"{path}: corrupt zstd file ({e})") from None
    if frame_started:
        raise ValueError(f"{path}: truncated zstd file (the last frame does not end)")


def _iter_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Split a byte stream at b"\\n" (the newline is dropped; a trailing partial line is kept).

    Linear time: a line spanning many chunks is joined once, not re-copied per chunk.
    """
    partial: list[bytes] = []  # pieces of the line not yet ended
    for chunk in chunks:
        *complete, rest = chunk.split(b"\n")
        if complete:
            partial.append(complete[0])
            complete[0] = b"".join(partial)
            yield from complete
            partial = []
        if rest:
            partial.append(rest)
    if partial:
        yield b"".join(partial)
