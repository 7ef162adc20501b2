"""The one home of SALT's output safety rule (docs/safety.md): atomic writes and output-directory checks.

Atomic writes: every file a command writes goes to a temporary name in the same directory, is
flushed and fsync'ed, then renamed over the target with ``os.replace`` (and the directory is
fsync'ed), so a reader or a crash sees the old file or the new one, never a half-written one.

Output directories: a command only creates, resumes into or replaces a directory that is absent,
empty, or carries the project's own marker of the same kind:

=============  ==========================================================================
kind           marker
=============  ==========================================================================
store          ``metadata.json`` whose ``format`` is ``salt-token-store``
run            ``run_config.json`` (a JSON object with a ``train`` entry)
reproduction   ``state.json`` (a JSON object with ``settings`` and ``stages``)
score          ``job.json`` (a JSON object with a ``fingerprint``)
teacher_cache  ``cache.json`` whose ``format`` is ``salt-teacher-cache-v1``
hf_export      ``salt_export.json`` whose ``format`` is ``salt-hf-export-v1`` (``salt export hf``)
=============  ==========================================================================

``replace`` (``--overwrite`` / ``--force``) additionally requires that the directory holds
nothing but the names that kind writes, and that no input of the command lies inside it.
Directories are removed by renaming them to a hidden trash name first, so a crash never leaves
a half-deleted directory under its real name.

Why one module of ~420 lines: it is the one home of every write SALT makes (atomic files,
directory swaps, the trash) and of the rule that decides what a command may replace; the two
must change together.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import tempfile

import numpy as np

from salt.core.lock import LOCK_NAME


class OutputError(ValueError):
    """An output path the safety rule refuses (the message names the path)."""


# --------------------------------------------------------------------------- atomic writes

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def fsync_dir(path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path, data) -> None:
    """Write ``data`` (bytes, or a callable ``write(fileobj)``) to ``path`` atomically."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise OutputError(f"{str(path)!r} is a directory, expected a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)  # mkstemp creates 0600; outputs are ordinary files
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        pathlib.Path(tmp).unlink(missing_ok=True)
        if e.filename is None:  # a failed write or fsync (a full disk) names no file: name it
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def _json_default(x):
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (tuple, set)):
        return list(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def save_npz(path, *, compressed: bool = False, **arrays) -> None:
    """``np.savez`` (or ``savez_compressed``) to exactly ``path`` (no suffix added), atomically."""
    save = np.savez_compressed if compressed else np.savez
    write_bytes(path, lambda f: save(f, **arrays))


def save_npy(path, array) -> None:
    write_bytes(path, lambda f: np.save(f, np.asarray(array), allow_pickle=False))


def remove_tree(path) -> None:
    """Delete a directory atomically as far as readers go: rename it to a hidden trash name in
    the same parent, then delete that (a crash leaves only the trash name behind)."""
    path = pathlib.Path(path)
    if not path.exists():
        return
    trash = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.trash-", dir=path.parent))
    os.rename(path, trash / path.name)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def move_into_place(built, out) -> None:
    """Rename the finished directory ``built`` to ``out``; an existing ``out`` (already checked
    by :func:`check_output_dir`) is moved to a trash name first and deleted afterwards."""
    built, out = pathlib.Path(built), pathlib.Path(out)
    if out.exists():
        trash = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.trash-", dir=out.parent))
        os.rename(out, trash / out.name)
        os.rename(built, out)
        fsync_dir(out.parent)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(built, out)
        fsync_dir(out.parent)


# --------------------------------------------------------------------------- output directories

def _json_object(path: pathlib.Path):
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def _is_store(d: pathlib.Path) -> bool:
    meta = _json_object(d / "metadata.json")
    return meta is not None and meta.get("format") == "salt-token-store"


def _is_run(d: pathlib.Path) -> bool:
    cfg = _json_object(d / "run_config.json")
    return cfg is not None and isinstance(cfg.get("train"), dict)


def _is_reproduction(d: pathlib.Path) -> bool:
    state = _json_object(d / "state.json")
    return state is not None and "settings" in state and "stages" in state


def _is_score_job(d: pathlib.Path) -> bool:
    job = _json_object(d / "job.json")
    return job is not None and "fingerprint" in job


def _is_teacher_cache(d: pathlib.Path) -> bool:
    manifest = _json_object(d / "cache.json")
    return manifest is not None and manifest.get("format") in ("salt-teacher-cache-v1", "salt-teacher-cache-v2")


def _is_hf_export(d: pathlib.Path) -> bool:
    marker = _json_object(d / "salt_export.json")
    return marker is not None and marker.get("format") == "salt-hf-export-v1"


def _is_ds_study(d: pathlib.Path) -> bool:
    study = _json_object(d / "study.json")
    return study is not None and study.get("format") == "salt-ds-study-v1"


def _is_finetune(d: pathlib.Path) -> bool:
    cfg = _json_object(d / "run_config.json")
    return cfg is not None and isinstance(cfg.get("finetune"), dict)


MARKERS = {"store": _is_store, "run": _is_run, "finetune": _is_finetune, "reproduction": _is_reproduction,
           "score": _is_score_job, "teacher_cache": _is_teacher_cache, "hf_export": _is_hf_export,
           "ds_study": _is_ds_study}
MARKER_FILES = {"store": "metadata.json", "run": "run_config.json", "finetune": "run_config.json",
                "reproduction": "state.json", "score": "job.json", "teacher_cache": "cache.json",
                "hf_export": "salt_export.json", "ds_study": "study.json"}
_RUN_NAMES = r"run_config\.json|metrics\.jsonl|checkpoints|\.trash|corrupt-checkpoints|tensorboard|wandb"
# names each kind writes (regular expressions over the top-level entries)
OWN_NAMES = {
    "store": r"metadata\.json|tokenizer\.(model|json)|token_check\.json|(train|val)\.(tokens|doc_offsets)\.bin",
    "run": _RUN_NAMES,
    "finetune": _RUN_NAMES + r"|eval\.json|predictions\.jsonl",
    "reproduction": r"state\.json|data|runs|eval|teacher_cache|scores\.npz|scores\.npz\.partial|selection\.npy"
                    r"|results\.json|report\.md|[\w.-]+\.png",
    "score": r"job\.json|chunk_\d+\.npz",
    "teacher_cache": r"cache\.json|step_\d{6}\.(logits|ids|lse|rows)\.npy",
    "hf_export": r"salt_export\.json|config\.json|model\.safetensors|tokenizer\.json|tokenizer_config\.json"
                 r"|special_tokens_map\.json|generation_config\.json",
    "ds_study": r"study\.json|scores|selections|runs|eval|table\.md|results\.json",
}
MODES = ("create", "resume", "replace")
# sub-directories an own directory of a kind holds, and the kind each must be (or absent/empty)
NESTED = {"reproduction": (("data", "store"), ("runs/*", "run"), ("teacher_cache/*", "teacher_cache")),
          "ds_study": (("runs/*", "run"),)}
# what an own directory's sub-directories hold, below the top level (for the file-granular check
# of ``replace``): a kind (checked in turn), or one of the layouts of ``_FOREIGN_IN``
SUBDIRS = {
    "run": {"checkpoints": "checkpoints", ".trash": "set-aside", "corrupt-checkpoints": "set-aside",
            "tensorboard": "tensorboard", "wandb": "wandb"},
    "finetune": {"checkpoints": "checkpoints", ".trash": "set-aside", "corrupt-checkpoints": "set-aside",
                 "tensorboard": "tensorboard", "wandb": "wandb"},
    "reproduction": {"data": "store", "runs": "runs", "teacher_cache": "caches", "eval": "eval",
                     "scores.npz.partial": "score"},
}
# names orbax writes in a checkpoint step (the items of runtime/model/checkpoint.py and its own files)
_ORBAX_TOP = r"_CHECKPOINT_METADATA|commit_success\.txt|params|opt_state|meta"
# hidden temporary names this module, the lock and the checkpoints create
_HIDDEN_OWN = r"\..+\.(trash-|partial-)\w+|\..+\.tmp|\.salt\.lock|\.salt-probe-\w+"


def kind_of(path) -> str | None:
    """The kind of SALT output directory ``path`` is, or None."""
    d = pathlib.Path(path)
    if not d.is_dir():
        return None
    for kind, test in MARKERS.items():
        if test(d):
            return kind
    return None


def _foreign_entries(d: pathlib.Path, kind: str) -> list[str]:
    """Top-level entries of ``d`` that are not names ``kind`` writes."""
    own = re.compile(OWN_NAMES[kind])
    return sorted(p.name for p in d.iterdir() if not own.fullmatch(p.name) and not re.fullmatch(_HIDDEN_OWN, p.name))


def _all_files(d: pathlib.Path) -> list[pathlib.Path]:
    return [p for p in d.rglob("*") if not p.is_dir()]


def _foreign_in_step(step: pathlib.Path) -> list[pathlib.Path]:
    """Files of a checkpoint step its manifest does not list (no manifest: the save did not
    finish; then only orbax's own names count)."""
    manifest = _json_object(step / "salt_manifest.json")
    if manifest is not None and isinstance(manifest.get("files"), dict):
        listed = set(manifest["files"]) | {"salt_manifest.json"}
        return [p for p in _all_files(step) if p.relative_to(step).as_posix() not in listed]
    return [p for p in step.iterdir() if not re.fullmatch(_ORBAX_TOP, p.name)]


def _foreign_in(d: pathlib.Path, layout: str) -> list[pathlib.Path]:
    """Paths under directory ``d`` (of a kind, or one of the layouts below) that SALT did not write."""
    if layout in MARKERS:
        return foreign_files(d, layout)
    found: list[pathlib.Path] = []
    for p in sorted(d.iterdir()):
        if re.fullmatch(_HIDDEN_OWN, p.name):
            continue
        if layout == "checkpoints":  # <step>/ (and orbax's temporary <step>.orbax-checkpoint-tmp-*)
            ok = p.is_dir() and re.fullmatch(r"\d+(\.orbax-checkpoint-tmp-?\w*)?", p.name)
            found += _foreign_in_step(p) if ok else [p]
        elif layout == "set-aside":  # <step>-<random>/<step>/: steps moved aside by checkpoint.py
            inner = [q for q in p.iterdir()] if p.is_dir() else []
            if p.is_dir() and all(q.is_dir() and q.name.isdigit() for q in inner):
                for q in inner:
                    found += _foreign_in_step(q)
            else:
                found.append(p)
        elif layout in ("runs", "caches"):  # one directory per run / cache (a fork's temporary too)
            kind = "run" if layout == "runs" else "teacher_cache"
            if p.is_dir() and (kind_of(p) == kind or not any(p.iterdir())):
                found += foreign_files(p, kind) if any(p.iterdir()) else []
            else:
                found.append(p)
        elif layout == "tensorboard":  # the event files of runtime/train/metrics_log.py
            if not (p.is_file() and re.fullmatch(r"events\.out\.tfevents\.salt-(train|eval)", p.name)):
                found.append(p)
        elif layout == "wandb":  # the W&B library's own files for the run (salt train --wandb)
            continue
        elif layout == "eval":  # per-checkpoint statistics and the cloze stage's scores
            if p.is_dir() and p.name == "cloze":
                found += [q for q in p.iterdir() if not (q.is_file() and q.suffix == ".npz")
                          and not re.fullmatch(_HIDDEN_OWN, q.name)]
            elif not (p.is_file() and p.suffix == ".npz"):
                found.append(p)
        else:
            raise ValueError(f"unknown layout {layout!r}")
    return found


def foreign_files(path, kind: str) -> list[pathlib.Path]:
    """Every path inside ``path`` (an own directory of ``kind``) that SALT did not write: not a
    name that kind writes, a file in a checkpoint step its manifest does not list, a foreign
    sub-directory where a nested SALT directory belongs, ...  (``replace`` removes nothing
    unless this is empty; docs/safety.md §2)."""
    d = pathlib.Path(path)
    found = [d / name for name in _foreign_entries(d, kind)]
    for name, layout in SUBDIRS.get(kind, {}).items():
        sub = d / name
        if sub.is_dir():
            found += _foreign_in(sub, layout)
        elif sub.exists():
            found.append(sub)
    subdirs = SUBDIRS.get(kind, {})
    found += [p for p in d.iterdir() if p.is_dir() and p.name not in subdirs
              and not re.fullmatch(_HIDDEN_OWN, p.name)]  # an own *file* name used by a folder
    return sorted(set(found))


def _within(child: pathlib.Path, parent: pathlib.Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def check_output_dir(path, kind: str, *, mode: str, inputs=(), what: str = "--out",
                     flag: str = "--overwrite") -> str:
    """Apply the safety rule; returns "absent", "empty" or "own" (an existing ``kind`` directory).

    ``mode``: "create" (absent or empty only), "resume" (also an own directory of this kind),
    "replace" (also an own directory holding only that kind's names and none of ``inputs``).
    Raises :class:`OutputError` naming the path otherwise; also when the path is a file, or its
    parent cannot be written (checked by creating and deleting a probe file)."""
    if kind not in MARKERS or mode not in MODES:
        raise ValueError(f"unknown output kind/mode {kind!r}/{mode!r}")
    d = pathlib.Path(path)
    shown = f"{what} {str(d)!r}"
    if d.exists() and not d.is_dir():
        raise OutputError(f"{shown} exists and is not a directory")
    for inp in inputs:
        if inp is not None and d.exists() and _within(pathlib.Path(inp), d):
            raise OutputError(f"{shown} contains an input of this command ({str(inp)!r}); "
                              "choose another output directory")
        if inp is not None and pathlib.Path(inp).is_dir() and _within(d, pathlib.Path(inp)):
            raise OutputError(f"{shown} lies inside an input of this command ({str(inp)!r}); "
                              "choose an output directory outside it")
    if not d.exists():
        check_writable_parent(d, what=what)
        return "absent"
    try:  # a lock file alone (an earlier process that died before writing anything) is empty
        entries = [p for p in d.iterdir() if p.name != LOCK_NAME]
    except OSError as e:
        raise OutputError(f"{shown}: cannot list it ({e.strerror or e})") from None
    if not entries:
        check_writable_parent(d / "probe", what=what)
        return "empty"
    actual = kind_of(d)
    if mode == "create":
        if actual == kind:
            hint = {"store": f"pass {flag} to replace it", "run": "pass --resume to continue it"}.get(
                kind, f"pass {flag} to replace it")
            raise OutputError(f"output directory {str(d)!r} already exists and is not empty; {hint}, "
                              f"or choose another {what}")
        raise OutputError(f"output directory {str(d)!r} already exists, is not empty and is not a SALT "
                          f"{kind} directory (so it is never replaced); choose another {what}")
    if actual != kind:
        found = f"a SALT {actual} directory" if actual else "not a SALT output directory"
        raise OutputError(f"{shown} is {found} (no valid {MARKER_FILES[kind]}); refusing to "
                          f"{'write into' if mode == 'resume' else 'replace'} it; choose another {what}")
    for pattern, sub_kind in NESTED.get(kind, ()):
        for sub in sorted(d.glob(pattern)):
            if sub.is_dir() and any(sub.iterdir()) and kind_of(sub) != sub_kind:
                raise OutputError(f"{str(sub)!r} (inside {shown}) is not a SALT {sub_kind} directory; "
                                  "refusing to write into or replace it; move it away or choose "
                                  f"another {what}")
            if sub.exists() and not sub.is_dir():
                raise OutputError(f"{str(sub)!r} (inside {shown}) is not a directory; move it away")
    if mode == "replace":
        foreign = [p.relative_to(d).as_posix() for p in foreign_files(d, kind)]
        if foreign:
            raise OutputError(f"{shown} holds files that SALT did not write ({', '.join(foreign[:5])}"
                              f"{', ...' if len(foreign) > 5 else ''}); refusing to replace it (nothing "
                              "was deleted); move them away or choose another " + what)
    check_writable_parent(d / "probe", what=what)
    return "own"


def check_output_file(path, *, force: bool, is_own=None, what: str = "--out", flag: str = "--force") -> None:
    """An output *file*: refused if it is a directory, if it exists without ``force``, or (with
    ``force``) if ``is_own(path)`` says it is not a file of the expected kind; its folder must be
    writable."""
    p = pathlib.Path(path)
    if p.is_dir():
        raise OutputError(f"{what} {str(p)!r} is a directory, expected a file path")
    if p.exists():
        if not force:
            raise OutputError(f"output {str(p)!r} already exists (use {flag} to overwrite)")
        if is_own is not None and not is_own(p):
            raise OutputError(f"{what} {str(p)!r} exists and is not a file SALT wrote; refusing to "
                              "overwrite it")
    check_writable_parent(p, what=what)


def check_writable_parent(path, *, what: str = "--out") -> None:
    """The nearest existing ancestor of ``path`` must be a directory we can create files in."""
    p = pathlib.Path(path).absolute()
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{what} {str(path)!r}: {str(parent)!r} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".salt-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{what} {str(path)!r}: cannot write in {str(parent)!r} "
                          f"({e.strerror or e})") from None
