"""Exclusive locks on SALT's output directories (docs/safety.md §3): one writer per directory.

A process that writes a run, reproduction, cache or store directory holds ``DIR/.salt.lock``
with ``fcntl.flock(LOCK_EX | LOCK_NB)`` for as long as it writes, and records its pid, host,
start time and command line in the file.  A second process refuses at once with the holder's
pid.  The kernel drops a flock when its holder dies (``kill -9`` included), so a lock file left
behind by a dead process is stale by construction: the next process takes it and overwrites
the record; :func:`is_stale` tells whether a directory's lock file is such a leftover.  The
file itself stays (deleting a lock file that another process may just have opened would let
two holders in); the output rule treats it as SALT's own name.
"""
from __future__ import annotations

import fcntl
import json
import os
import pathlib
import socket
import sys
import time

LOCK_NAME = ".salt.lock"


class LockError(ValueError):
    """The directory is being written by another process (the message names it and its pid)."""


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode("utf-8"))
        return (f"pid {info['pid']} on {info['host']}, since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info['started']))}: "
                f"{info['command'][:120]}")
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not recorded itself yet"


class DirLock:
    """``with DirLock(path, what="--out"):`` hold ``path``'s lock (creating ``path`` when absent).

    Raises :class:`LockError` when another process holds it.  Re-entrant within one process for
    the same directory (a nested ``with`` of the holder is a no-op).  A directory this lock
    created and in which nothing else was written is removed again on release (a command that
    failed its checks leaves nothing behind)."""

    _held: dict[str, int] = {}  # resolved directory -> nesting depth, this process

    def __init__(self, path, *, what: str = "--out"):
        self.path = pathlib.Path(path)
        self.what = what
        self._fd: int | None = None
        self._key: str | None = None
        self._created = False

    def __enter__(self) -> DirLock:
        self._created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        self._key = str(self.path.resolve())
        if self._key in DirLock._held:
            DirLock._held[self._key] += 1
            return self
        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise LockError(f"{self.what} {str(self.path)!r} is being written by another SALT process "
                            f"({holder}); wait for it to finish or stop it") from None
        except OSError as e:  # a file system without flock (some network mounts): say so, go on
            print(f"warning: cannot lock {str(self.path)!r} ({e.strerror or e}); make sure no other "
                  "process writes it", file=sys.stderr, flush=True)
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                             "command": " ".join(sys.argv)}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        self._fd = fd
        DirLock._held[self._key] = 1
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self._key is None or self._key not in DirLock._held:
            return
        DirLock._held[self._key] -= 1
        if DirLock._held[self._key] > 0:
            self._key = None
            return
        del DirLock._held[self._key]
        self._key = None
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)  # no record: nobody holds it
                if self._created and os.listdir(self.path) == [LOCK_NAME]:
                    os.unlink(self.path / LOCK_NAME)  # still held: nobody else can be using it
                    os.rmdir(self.path)
            except OSError:
                pass
            os.close(self._fd)  # drops the flock
            self._fd = None


def is_stale(path) -> bool:
    """Whether ``path`` holds a lock file that no live process holds (a leftover of a dead one)."""
    lock = pathlib.Path(path) / LOCK_NAME
    if not lock.is_file():
        return False
    if str(pathlib.Path(path).resolve()) in DirLock._held:
        return False
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
