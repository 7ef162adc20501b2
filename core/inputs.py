"""What is wrong with an input path that should be a regular file (one wording for every command)."""
from __future__ import annotations

import os
import pathlib
import stat


def file_problem(path) -> str | None:
    """None when ``path`` is a readable regular file (or a symlink to one); else why not, as the
    end of a sentence: "does not exist", "is a directory, expected a file", "is a FIFO, not a
    regular file", ...  (so "--subset DIR" never reads "does not exist")."""
    p = pathlib.Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        return "does not exist"
    except NotADirectoryError:
        return "does not exist (a parent is not a directory)"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if stat.S_ISDIR(mode):
        return "is a directory, expected a file"
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode)
                else "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "not a file")
        return f"is {kind}, not a regular file"
    if not os.access(p, os.R_OK):
        return "is not readable (permission denied)"
    return None
