"""Training curves where people look: TensorBoard event files (and, with a project name, Weights &
Biases) next to a run's ``metrics.jsonl``.

``RUN/tensorboard/events.out.tfevents.salt-train`` holds one event per ``metrics.jsonl`` row: every
numeric field as the scalar ``train/<field>`` (loss, ce, kd, kl, omega, lr, accuracy, grad_norm,
tokens_per_s) plus ``train/kd_phase`` (1 in the KD phase, 0 after the switch).  The file is a view
of ``metrics.jsonl``: when a run starts or resumes it is rewritten (atomically) from the rows the
trainer kept, then appended to, so a resumed run continues the same curves with no duplicate
points.  ``events.out.tfevents.salt-eval`` holds evaluation results (``eval/<name>``), rewritten
whole by :func:`write_eval`.  The files are TFRecord-framed ``Event`` protocol buffers, encoded here
(no TensorFlow, no tensorboard package needed to write them); ``tensorboard --logdir RUN`` reads
them.

:class:`MetricsSink` is what a training loop writes through: ``metrics.jsonl`` (cut back to the
step a run resumes from) and the TensorBoard / W&B view of it.

W&B (optional dependency ``wandb``): :class:`RunLog` with ``wandb_project`` logs the same rows
(``WANDB_MODE=offline`` works without a network) into ``RUN/wandb``, one W&B run per SALT run (its
id derived from the run directory, ``resume="allow"``).  W&B keeps the first value logged at a
step: the steps a resumed run repeats (those after its last checkpoint) keep their first values
there.
"""
from __future__ import annotations

import hashlib
import json
import math
import pathlib
import struct
import sys
import time

from salt.core import outputs

TB_DIR = "tensorboard"
TRAIN_EVENTS = "events.out.tfevents.salt-train"
EVAL_EVENTS = "events.out.tfevents.salt-eval"
WANDB_DIR = "wandb"
_NOT_SCALARS = ("step", "phase")


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord frames use."""
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC32C[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _record(data: bytes) -> bytes:
    """One TFRecord frame: length, its masked CRC, the data, its masked CRC."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked(crc32c(length))) + data + struct.pack("<I", _masked(crc32c(data)))


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 as protobuf's two's complement
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _bytes_field(number: int, data: bytes) -> bytes:
    return _field(number, 2) + _varint(len(data)) + data


def event(step: int, scalars: dict | None = None, *, wall_time: float | None = None,
          file_version: str | None = None) -> bytes:
    """An ``Event`` message (wall_time = 1, step = 2, file_version = 3, summary = 5) whose summary
    holds one ``Value`` (tag = 1, simple_value = 2) per scalar."""
    msg = _field(1, 1) + struct.pack("<d", time.time() if wall_time is None else wall_time)
    msg += _field(2, 0) + _varint(int(step))
    if file_version is not None:
        msg += _bytes_field(3, file_version.encode())
    if scalars:
        values = b"".join(_bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5) + struct.pack("<f", v))
                          for tag, v in scalars.items())
        msg += _bytes_field(5, values)
    return msg


def _header() -> bytes:
    return _record(event(0, file_version="brain.Event:2"))


def scalars_of(record: dict, prefix: str) -> dict:
    """The finite numeric fields of a metrics row as ``{prefix/name: value}`` (nested dicts
    flattened with ``/``), and for a training row ``prefix/kd_phase``."""
    out = {}

    def walk(d, path):
        for k, v in d.items():
            if k in _NOT_SCALARS and not path:
                continue
            if isinstance(v, dict):
                walk(v, f"{path}{k}/")
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out[f"{prefix}/{path}{k}"] = float(v)
    walk(record, "")
    if record.get("phase") in ("kd", "standard"):
        out[f"{prefix}/kd_phase"] = 1.0 if record["phase"] == "kd" else 0.0
    return out


def read_metrics(path, *, strict: bool = True) -> list[dict]:
    """The rows of a run's ``metrics.jsonl`` (a missing file: none).  A line that is not a JSON
    object with an integer ``step`` (e.g. cut short by a kill) is a ValueError naming
    ``path:line`` when ``strict``, else reported on stderr and dropped."""
    path = pathlib.Path(path)
    rows = []
    if not path.is_file():
        return rows
    for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ok = isinstance(row, dict) and isinstance(row.get("step"), int) and not isinstance(row["step"], bool)
        except (ValueError, RecursionError):
            ok = False
        if ok:
            rows.append(row)
        elif strict:
            raise ValueError(f"{path}:{lineno}: not a metrics row (a JSON object with an integer step): "
                             f"{line[:80]!r}")
        else:
            print(f"warning: {path}:{lineno}: not a metrics record, dropped: {line[:80]!r}",
                  file=sys.stderr, flush=True)
    return rows


class RunLog:
    """Mirror a run's ``metrics.jsonl`` rows into TensorBoard (and W&B).  Open it after the trainer
    has truncated ``metrics.jsonl`` to the step it resumes from; :meth:`write` each new row."""

    def __init__(self, run_dir, *, metrics_file: str = "metrics.jsonl", wandb_project: str | None = None,
                 config: dict | None = None):
        self.run_dir = pathlib.Path(run_dir)
        self.path = self.run_dir / TB_DIR / TRAIN_EVENTS
        rows = read_metrics(self.run_dir / metrics_file, strict=False)
        outputs.write_bytes(self.path, _header() + b"".join(
            _record(event(r["step"], scalars_of(r, "train"))) for r in rows))
        self._file = open(self.path, "ab")
        self._wandb = None
        self._last_wandb_step = max((r["step"] for r in rows), default=0)
        if wandb_project:
            self._wandb = _wandb_init(self.run_dir, wandb_project, config)

    def write(self, record: dict) -> None:
        self._file.write(_record(event(record["step"], scalars_of(record, "train"))))
        self._file.flush()
        if self._wandb is not None and record["step"] > self._last_wandb_step:
            self._wandb.log({k.split("/", 1)[1]: v for k, v in scalars_of(record, "train").items()},
                            step=record["step"])
            self._last_wandb_step = record["step"]

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            import wandb
            self._wandb.finish()
            wandb.teardown()  # stops W&B's service process once it has written everything
            self._wandb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _wandb_init(run_dir: pathlib.Path, project: str, config: dict | None):
    try:
        import wandb
    except ImportError:
        raise ValueError("--wandb needs the optional dependency wandb (pip install 'salt[wandb]')") from None
    (run_dir / WANDB_DIR).mkdir(parents=True, exist_ok=True)
    run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
    return wandb.init(project=project, dir=str(run_dir), id=run_id, resume="allow", name=run_dir.name,
                      config=config or {})


def write_eval(run_dir, results: dict) -> None:
    """Evaluation results ``{step: {name: value, ...}}`` (nested dicts flattened) as the scalars
    ``eval/<name>`` in ``RUN/tensorboard/events.out.tfevents.salt-eval``, the file rewritten whole."""
    path = pathlib.Path(run_dir) / TB_DIR / EVAL_EVENTS
    outputs.write_bytes(path, _header() + b"".join(
        _record(event(int(step), scalars_of(results[step], "eval"))) for step in sorted(results, key=int)))


def finite_or_none(record: dict) -> dict:
    """``record`` with non-finite floats as None (JSON has no NaN)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()}


def truncate_metrics(path: pathlib.Path, last_step: int) -> None:
    """Drop metric rows past ``last_step`` (written after the checkpoint a run resumes from).
    A line that is not a step record (e.g. cut short by a kill) is reported and dropped."""
    if not path.exists():
        return
    rows = [r for r in read_metrics(path, strict=False) if r["step"] <= last_step]
    outputs.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


class MetricsSink:
    """A run's metrics: ``RUN/metrics.jsonl`` (one JSON row per step; rows past ``start_step``,
    written before the checkpoint the run resumes from, are dropped first) and its TensorBoard
    (and W&B) view.  ``enabled`` False (processes other than the first): writes nothing."""

    def __init__(self, run_dir, start_step: int, *, enabled: bool = True, wandb_project: str | None = None,
                 config: dict | None = None):
        self.path = pathlib.Path(run_dir) / "metrics.jsonl"
        self._file = self._log = None
        if enabled:
            truncate_metrics(self.path, start_step)
            self._file = open(self.path, "a")
            self._log = RunLog(run_dir, wandb_project=wandb_project, config=config)

    def write(self, rows: list[dict]) -> None:
        if self._file is None:
            return
        try:
            self._file.write("".join(json.dumps(finite_or_none(r)) + "\n" for r in rows))
            self._file.flush()
        except OSError as e:  # e.g. a full disk: the error names the file (the CLI prints one line)
            raise OSError(e.errno, e.strerror, str(self.path)) from None
        for r in rows:
            self._log.write(r)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._log.close()
            self._file = self._log = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
