"""Window-id files: the ``.npy`` arrays of window ids that ``salt select`` writes and that
``--subset`` / ``--exclude`` read (never unpickled)."""
from __future__ import annotations

import pathlib

import numpy as np

from salt.core.inputs import file_problem


def numpy_file_kind(path: pathlib.Path) -> str:
    with open(path, "rb") as f:
        head = f.read(6)
    if head == b"\x93NUMPY":
        return "npy"
    if head[:4] == b"PK\x03\x04":
        return "npz"
    return "other"


def load_window_ids(path, what: str = "window-id") -> np.ndarray:
    """A 1-D int64 array of window ids from a ``.npy`` file (``salt select`` output); errors name
    the file (never suggest unpickling)."""
    path = pathlib.Path(path)
    problem = file_problem(path)
    if problem:
        raise ValueError(f"{what} file {str(path)!r} {problem}")
    try:
        kind = numpy_file_kind(path)
        if kind == "npz":
            raise ValueError(f"{what} file {str(path)!r} is a .npz archive; expected a .npy array of "
                             "window ids (as `salt select` writes)")
        if kind != "npy":
            raise ValueError(f"{what} file {str(path)!r} is not a NumPy .npy file (no .npy header)")
        ids = np.load(path, allow_pickle=False)
    except ValueError as e:
        if str(path) in str(e):
            raise
        raise ValueError(f"{what} file {str(path)!r} is not a readable .npy array of window ids "
                         f"(holds objects or is corrupt)") from None
    except (OSError, EOFError) as e:
        raise ValueError(f"{what} file {str(path)!r} cannot be read ({e})") from None
    if not isinstance(ids, np.ndarray) or ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{what} file {str(path)!r} must hold a 1-D integer array of window ids, got "
                         f"{getattr(ids, 'dtype', type(ids).__name__)} {getattr(ids, 'shape', '')}")
    return ids.astype(np.int64)
