"""Documents from columnar sources (optional dependency ``pyarrow``, extra ``salt[parquet]``):

* a Parquet file (``*.parquet``), or a directory / glob of them: the ``text_field`` column,
  one row group at a time, in record batches of at most ``BATCH_ROWS`` rows (memory: about one
  row group's text column, never the whole file), rows in file order;
* a Hugging Face dataset saved to disk (``datasets.Dataset.save_to_disk``: a directory holding
  ``state.json`` and ``dataset_info.json`` beside Arrow stream files): its ``_data_files`` in the
  order ``state.json`` lists them, each streamed batch by batch.  A ``DatasetDict`` (a
  ``dataset_dict.json``) is refused, naming its splits: pass one split's directory.

Row ``i`` (0-based, counted over the file) whose text is null or not a string is an error naming
the file and row, or skipped and counted (``missing_field_lines``) with ``skip_invalid``; a file
without the column is an error naming its columns.  The same texts in the same order give the
same documents as JSONL, so the same token store.
"""
from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator

BATCH_ROWS = 1024
PARQUET_SUFFIXES = (".parquet",)
HF_STATE = "state.json"
HF_INFO = "dataset_info.json"
HF_DICT = "dataset_dict.json"


def is_parquet(path: pathlib.Path) -> bool:
    return path.name.lower().endswith(PARQUET_SUFFIXES)


def is_hf_dataset(path: pathlib.Path) -> bool:
    """A ``save_to_disk`` directory (a Dataset, or a DatasetDict, refused when read)."""
    return path.is_dir() and ((path / HF_STATE).is_file() and (path / HF_INFO).is_file()
                              or (path / HF_DICT).is_file())


def source_bytes(path: pathlib.Path) -> int:
    """Bytes of a source on disk (a saved dataset: its data files)."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return path.stat().st_size


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ValueError("Parquet and Hugging Face dataset sources need the optional dependency pyarrow "
                         "(pip install 'salt[parquet]')") from None
    return pyarrow


def _texts(where: str, batches, text_field: str, schema) -> Iterator[tuple[int, object]]:
    if text_field not in schema.names:
        columns = ", ".join(repr(n) for n in schema.names[:10])
        raise ValueError(f"{where}: no column {text_field!r} (columns: {columns or 'none'}); choose the column "
                         "with --text-field")
    row = 0
    for batch in batches:
        for value in batch.column(batch.schema.get_field_index(text_field)).to_pylist():
            yield row, value
            row += 1


def _documents(where: str, rows, stats, skip_invalid: bool, sanitize) -> Iterator[str]:
    for row, text in rows:
        if not isinstance(text, str):
            if skip_invalid:
                stats.missing_field_lines += 1
                continue
            kind = "null" if text is None else f"a {type(text).__name__}"
            raise ValueError(f"{where}: row {row} (0-based): the text is {kind}, not a string; pass "
                             "--skip-invalid to skip and count such rows")
        text = sanitize(text, stats)
        if text:
            stats.documents += 1
            yield text
        else:
            stats.empty_documents += 1


def iter_parquet(path: pathlib.Path, stats, text_field: str, skip_invalid: bool, sanitize) -> Iterator[str]:
    """The documents of a Parquet file; ``sanitize(text, stats)`` is the corpus's own text check."""
    pa = _pyarrow()
    try:
        pf = pa.parquet.ParquetFile(path, pre_buffer=False)  # pre-buffering reads far ahead: unbounded
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
    schema = pf.schema_arrow
    columns = [text_field] if text_field in schema.names else None
    batches = (batch for group in range(pf.num_row_groups)  # one row group's text column at a time
               for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[group], columns=columns,
                                            use_threads=False))
    rows = _texts(str(path), _guarded(path, batches, pa), text_field, schema)
    yield from _documents(str(path), rows, stats, skip_invalid, sanitize)


def _guarded(path, batches, pa):
    """Batches, with a damaged file's Arrow error turned into one naming the file."""
    try:
        yield from batches
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from None


def iter_hf_dataset(path: pathlib.Path, stats, text_field: str, skip_invalid: bool, sanitize) -> Iterator[str]:
    """The documents of a ``save_to_disk`` dataset directory (as :func:`iter_parquet`)."""
    pa = _pyarrow()
    if (path / HF_DICT).is_file():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise ValueError(f"{path}: a Hugging Face DatasetDict (splits: {', '.join(splits) or 'none'}); pass one "
                         f"split's directory, e.g. {path / (splits[0] if splits else 'train')}")
    try:
        state = json.loads((path / HF_STATE).read_text(encoding="utf-8"))
        files = [path / entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path / HF_STATE}: not a Hugging Face dataset state ({e})") from None
    if state.get("_indices_data_files"):
        raise ValueError(f"{path}: the dataset holds an indices mapping (a select/shuffle view); save it "
                         "with .flatten_indices() first")
    for file in files:
        try:
            reader = pa.ipc.open_stream(pa.OSFile(str(file)))
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{file}: not a readable Arrow stream ({e})") from None
        rows = _texts(str(file), _guarded(file, reader, pa), text_field, reader.schema)
        yield from _documents(str(file), rows, stats, skip_invalid, sanitize)
