"""The safetensors file format, read and written with NumPy (``ml_dtypes`` for bfloat16).

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON (per
tensor: ``dtype``, ``shape``, ``data_offsets`` ``[begin, end)`` into the data that follows; an
optional ``__metadata__`` of strings) and the raw little-endian tensor bytes.  The ``safetensors``
package's NumPy API has no bfloat16, the usual dtype of Hugging Face checkpoints, and this module
needs no torch: it is all SALT's import and export read or write.
"""
from __future__ import annotations

import json
import math
import os
import pathlib

import ml_dtypes
import numpy as np

from salt.core import outputs

DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
          "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
          "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?")}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 2**20


class SafetensorsError(ValueError):
    """A file that is not a valid safetensors file (the message names it)."""


def read_header(path) -> tuple[dict, int]:
    """(per-tensor entries, byte offset of the data) of the file at ``path``; checked against the
    file's size."""
    path = pathlib.Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER or 8 + n > size:
            raise SafetensorsError(f"{path}: not a safetensors file (header length {n} for {size} bytes)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise SafetensorsError(f"{path}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - n
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise SafetensorsError(f"{path}: tensor {name!r} has a malformed header entry ({e!r})") from None
        if not 0 <= begin <= end <= data_bytes or end - begin != math.prod(shape) * dtype.itemsize:
            raise SafetensorsError(f"{path}: tensor {name!r} ({entry['dtype']} {list(shape)}) does not fit "
                                   f"its byte range [{begin}, {end}) of {data_bytes} data bytes "
                                   "(truncated file?)")
    return header, 8 + n


def read(path, names=None) -> dict:
    """``{name: np.ndarray}`` (a copy, in the file's dtype) of the tensors ``names`` (all: None)."""
    path = pathlib.Path(path)
    header, start = read_header(path)
    out = {}
    with open(path, "rb") as f:
        for name in header if names is None else names:
            entry = header[name]
            begin, end = entry["data_offsets"]
            f.seek(start + begin)
            data = f.read(end - begin)
            out[name] = np.frombuffer(data, DTYPES[entry["dtype"]]).reshape(entry["shape"]).copy()
    return out


def write(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write ``{name: array}`` atomically (``salt.core.outputs``), tensors in sorted name order,
    the header padded with spaces to a multiple of 8 bytes (as the ``safetensors`` package does)."""
    header, offset = {}, 0
    arrays = {}
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        if a.dtype not in NAMES:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} has no safetensors name")
        arrays[name] = a
        header[name] = {"dtype": NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)

    def emit(f):
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for a in arrays.values():
            f.write(a.tobytes())

    outputs.write_bytes(os.fspath(path), emit)
