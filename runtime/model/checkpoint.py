"""Checkpoints of a training run (orbax-checkpoint), verified by a manifest of content hashes.

Layout of a run directory::

    RUN/run_config.json          the TrainConfig of the run (+ the resolved model config)
    RUN/metrics.jsonl            one JSON object per step
    RUN/checkpoints/<step>/      one orbax checkpoint per saved step, with three items:
        params/                  the student parameters (THE layout of reference/config.py)
        opt_state/               the optimizer state
        meta/                    JSON: step, model config, tokenizer sha256, vocab size,
                                 teacher identity (path, step, manifest hash, config; never its
                                 weights), loader state, run config
        salt_manifest.json       written LAST: sha256 and size of every other file of the step
    RUN/corrupt-checkpoints/     steps found incomplete or corrupt on resume, moved aside (kept)

A step counts only when its manifest is present and every file matches it (:func:`verify`):
a process killed while saving leaves a step without a manifest, a truncated or bit-flipped file
fails its hash, and either is reported by path and skipped in favour of the newest intact step.
Old steps are deleted by renaming them to a hidden trash name first (``RUN/.trash``), so a
half-deleted step never counts.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import sys
import tempfile

import jax
import orbax.checkpoint as ocp

from salt.core import outputs
from salt.runtime.model.transformer import abstract_params
from salt.data.store import file_sha256  # one streaming sha256 (the store's)
from salt.reference.config import ModelConfig

CHECKPOINTS = "checkpoints"
ITEMS = ("params", "opt_state", "meta")
MANIFEST = "salt_manifest.json"
MANIFEST_FORMAT = "salt-checkpoint-manifest-v1"
TRASH = ".trash"
CORRUPT = "corrupt-checkpoints"


class CorruptCheckpoint(ValueError):
    """A checkpoint step that is incomplete or does not match its manifest (names the path)."""


class CheckpointWriteError(ValueError):
    """A checkpoint could not be written (a full disk, ...); names the step directory."""


def _os_reason(e: BaseException) -> str:
    """The OS error at the root of ``e``'s chain (orbax wraps them), else ``e``'s first line."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    text = str(e).strip().splitlines()
    return "No space left on device" if "No space left" in str(e) else (text[0][:200] if text else type(e).__name__)


class _HoldBackErrors(logging.Filter):
    """Holds back the error records orbax logs while a save runs.  A write that fails in one of
    its threads (a full disk) is logged there with that thread's traceback and then raised to
    :func:`save`, which reports it in one line naming the step; when the save succeeds after
    all, the held records are logged as usual."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            self.records.append(record)
            return False
        return True


_ORBAX_LOG = logging.getLogger("absl")  # orbax logs through absl's logger


def _manager(ckpt_root: pathlib.Path, *, create: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=None, create=create,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(ckpt_root.absolute(), item_names=ITEMS, options=options)


def checkpoint_root(run_dir) -> pathlib.Path:
    return pathlib.Path(run_dir) / CHECKPOINTS


def step_dir(run_dir, step: int) -> pathlib.Path:
    return checkpoint_root(run_dir) / str(int(step))


def _step_dirs(run_dir) -> list[int]:
    """Every ``checkpoints/<int>/`` directory (complete or not), ascending."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(int(c.name) for c in root.iterdir() if c.is_dir() and c.name.isdigit())


def all_steps(run_dir) -> list[int]:
    """Steps that carry a manifest (written last, so the save finished), ascending; [] when none.
    Their content is checked by :func:`verify` / :func:`intact_steps`."""
    return [s for s in _step_dirs(run_dir) if (step_dir(run_dir, s) / MANIFEST).is_file()]


def latest_step(run_dir) -> int | None:
    steps = all_steps(run_dir)
    return steps[-1] if steps else None


# --------------------------------------------------------------------------- manifests

def _content(directory: pathlib.Path) -> dict:
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(directory).as_posix()
            files[rel] = {"sha256": file_sha256(p), "size": p.stat().st_size}
    return files


def write_manifest(directory) -> str:
    """Hash every file of a step directory into its manifest (written atomically, last);
    returns the manifest's own sha256 (the checkpoint's identity)."""
    directory = pathlib.Path(directory)
    manifest = {"format": MANIFEST_FORMAT, "files": _content(directory)}
    outputs.write_json(directory / MANIFEST, manifest)
    return manifest_sha256(directory)


def manifest_sha256(directory) -> str:
    return file_sha256(pathlib.Path(directory) / MANIFEST)


def verify(run_dir, step: int) -> str:
    """Check step ``step`` against its manifest; returns the manifest sha256.
    Raises :class:`CorruptCheckpoint` naming the step directory and what is wrong."""
    d = step_dir(run_dir, step)
    if not d.is_dir():
        raise CorruptCheckpoint(f"checkpoint {d} does not exist")
    mpath = d / MANIFEST
    if not mpath.is_file():
        raise CorruptCheckpoint(f"checkpoint {d} is incomplete (no {MANIFEST}: the save did not finish)")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        expected = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(expected, dict):
            raise ValueError("unknown format")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise CorruptCheckpoint(f"checkpoint {d}: unreadable {MANIFEST} ({e})") from None
    actual = _content(d)
    missing = sorted(set(expected) - set(actual))
    if missing:
        raise CorruptCheckpoint(f"checkpoint {d} is missing {len(missing)} file(s), e.g. {d / missing[0]}")
    extra = sorted(set(actual) - set(expected))
    if extra:
        raise CorruptCheckpoint(f"checkpoint {d} holds file(s) its manifest does not list, e.g. {d / extra[0]}")
    for rel, want in expected.items():
        if actual[rel] != want:
            what = "truncated or extended" if actual[rel]["size"] != want.get("size") else "content changed"
            raise CorruptCheckpoint(f"checkpoint file {d / rel} does not match its manifest ({what})")
    return manifest_sha256(d)


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def intact_steps(run_dir, *, report: bool = True) -> list[int]:
    """Steps that pass :func:`verify`, ascending; the others are reported on stderr by path."""
    good = []
    for s in _step_dirs(run_dir):
        try:
            verify(run_dir, s)
            good.append(s)
        except CorruptCheckpoint as e:
            if report:
                _warn(f"{e}; skipped")
    return good


def newest_intact(run_dir, *, report: bool = True) -> int | None:
    """The newest verified step (checking newest first), or None; skipped ones are reported."""
    for s in reversed(_step_dirs(run_dir)):
        try:
            verify(run_dir, s)
            return s
        except CorruptCheckpoint as e:
            if report:
                _warn(f"{e}; skipped, trying the step before it")
    return None


def set_aside_newer(run_dir, step: int | None) -> list[pathlib.Path]:
    """Before resuming from ``step``: move every step directory newer than it (incomplete or
    corrupt, else it would have been chosen) to ``RUN/corrupt-checkpoints/`` so that the
    resumed run can save those steps again; nothing is deleted. Returns the new paths."""
    moved = []
    for s in _step_dirs(run_dir):
        if step is None or s > step:
            dest_root = pathlib.Path(run_dir) / CORRUPT
            dest_root.mkdir(exist_ok=True)
            dest = pathlib.Path(tempfile.mkdtemp(prefix=f"{s}-", dir=dest_root))
            os.rename(step_dir(run_dir, s), dest / str(s))
            _warn(f"checkpoint {step_dir(run_dir, s)} moved aside to {dest / str(s)}")
            moved.append(dest / str(s))
    return moved


def _delete_step(run_dir, step: int) -> None:
    """Rename the step out of ``checkpoints/`` (atomic), then delete it."""
    trash_root = pathlib.Path(run_dir) / TRASH
    trash_root.mkdir(exist_ok=True)
    trash = pathlib.Path(tempfile.mkdtemp(prefix=f"{step}-", dir=trash_root))
    os.rename(step_dir(run_dir, step), trash / str(step))
    outputs.fsync_dir(checkpoint_root(run_dir))
    shutil.rmtree(trash, ignore_errors=True)
    try:
        trash_root.rmdir()  # gone when nothing else is pending (a killed deletion leaves its entry)
    except OSError:
        pass


def empty_trash(run_dir) -> None:
    """Finish deletions a killed process left in ``RUN/.trash`` (only ever our own steps)."""
    trash_root = pathlib.Path(run_dir) / TRASH
    if trash_root.is_dir():
        shutil.rmtree(trash_root, ignore_errors=True)


# --------------------------------------------------------------------------- save / restore

def save(run_dir, step: int, params, opt_state, meta: dict, *, keep: set[int] | None = None) -> str:
    """Save step ``step`` and its manifest; then delete older steps except those in ``keep``
    (the newest checkpoint is always kept). Returns the manifest sha256."""
    meta = dict(meta, step=int(step))
    held = _HoldBackErrors()
    _ORBAX_LOG.addFilter(held)
    try:
        mngr = _manager(checkpoint_root(run_dir), create=True)
        mngr.save(int(step), args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta)), force=True)
        mngr.wait_until_finished()
        mngr.close()
        digest = None
        if jax.process_index() == 0:
            digest = write_manifest(step_dir(run_dir, step))
    except Exception as e:  # noqa: BLE001 - orbax wraps the OS error (a full disk) in its own
        raise CheckpointWriteError(f"cannot save checkpoint {step_dir(run_dir, step)}: {_os_reason(e)}; the "
                                   "step stays incomplete (skipped on resume); free space and resume "
                                   "with --resume") from None
    finally:
        _ORBAX_LOG.removeFilter(held)
    for record in held.records:  # the save succeeded: nothing to hide
        _ORBAX_LOG.handle(record)
    if jax.process_index() == 0 and keep is not None:
        for old in _step_dirs(run_dir):
            if old != step and old not in keep:
                _delete_step(run_dir, old)
    return digest


def restore(run_dir, step: int, abstract_params, abstract_opt_state):
    """(params, opt_state, meta) of ``step`` (verified first), placed as the abstract trees'
    shardings say."""
    verify(run_dir, step)
    mngr = _manager(checkpoint_root(run_dir), create=False)
    try:
        out = mngr.restore(int(step), args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            opt_state=ocp.args.StandardRestore(abstract_opt_state),
            meta=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 - a verified checkpoint that orbax still cannot read
        raise CorruptCheckpoint(f"checkpoint {step_dir(run_dir, step)} cannot be restored: {e}") from None
    finally:
        mngr.close()
    return out["params"], out["opt_state"], dict(out["meta"])


def resolve(path, step: int | None = None) -> tuple[pathlib.Path, int]:
    """A run dir, its ``checkpoints/`` dir or one step's dir -> (run dir, step), verified.

    ``step=None`` means the newest intact step (or the step of a step directory); incomplete or
    corrupt newer steps are reported on stderr and skipped. An explicit step must be intact."""
    p = pathlib.Path(path)
    if not p.exists():
        raise ValueError(f"checkpoint path {str(path)!r} does not exist")
    if p.name.isdigit() and p.parent.name == CHECKPOINTS and p.is_dir():
        run_dir = p.parent.parent
        if step is not None and step != int(p.name):
            raise ValueError(f"{str(path)!r} is the checkpoint of step {p.name}, not step {step}")
        verify(run_dir, int(p.name))
        return run_dir, int(p.name)
    if p.name == CHECKPOINTS and not (p / CHECKPOINTS).is_dir():
        p = p.parent
    steps = _step_dirs(p)
    if not steps:
        raise ValueError(f"no checkpoint found in {str(path)!r} (expected a run directory with "
                         f"{CHECKPOINTS}/<step>/)")
    if step is None:
        found = newest_intact(p)
        if found is None:
            raise CorruptCheckpoint(f"no intact checkpoint in {str(path)!r}: every step of "
                                    f"{checkpoint_root(p)} is incomplete or corrupt (see above)")
        return p, found
    if step not in steps:
        raise ValueError(f"{str(path)!r} has no checkpoint of step {step}; saved steps: {all_steps(p)}")
    verify(p, step)
    return p, int(step)


def read_meta(path, step: int | None = None) -> dict:
    run_dir, step = resolve(path, step)
    return meta_of(run_dir, step)


def meta_of(run_dir, step: int) -> dict:
    """The metadata of a step already chosen by :func:`resolve` / :func:`newest_intact`
    (not verified again)."""
    meta_dir = step_dir(run_dir, step) / "meta"
    for f in sorted(meta_dir.glob("*")):
        if f.is_file():
            try:
                meta = json.loads(f.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                continue
            if isinstance(meta, dict):
                return meta
    raise CorruptCheckpoint(f"checkpoint {meta_dir} has no readable metadata")


def load_params(path, step: int | None = None, *, shardings=None):
    """(ModelConfig, params, meta) of a saved, verified checkpoint, for teachers, eval and scoring.

    ``path``: a run directory (newest intact step unless ``step``), its ``checkpoints/`` dir, or
    one step's directory. ``shardings``: optional tree of shardings for the params (default:
    float32 arrays on the default device). ``meta["manifest_sha256"]`` identifies the checkpoint."""
    run_dir, step = resolve(path, step)
    digest = manifest_sha256(step_dir(run_dir, step))
    meta = meta_of(run_dir, step)
    try:
        config = ModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptCheckpoint(f"checkpoint {step_dir(run_dir, step)}: bad model config in its "
                                f"metadata ({e})") from None
    abstract = abstract_params(config)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                                abstract)
    else:
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract, shardings)
    mngr = _manager(checkpoint_root(run_dir), create=False)
    try:
        out = mngr.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract)))
    except Exception as e:  # noqa: BLE001
        raise CorruptCheckpoint(f"checkpoint {step_dir(run_dir, step)} cannot be restored: {e}") from None
    finally:
        mngr.close()
    return config, out["params"], dict(meta, step=int(step), manifest_sha256=digest)
