"""The student runs of ``salt reproduce``: their TrainConfig, training one stage (resumed, never
silently restarted), forking SALT from RKD at n_kd, and the side-by-side pool that trains two runs
at a time, one worker process per core with single-threaded XLA, forwarding SIGTERM / SIGINT."""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from salt.core import outputs
from salt.runtime.experiments.presets import ReproduceConfig
from salt.runtime.model.checkpoint import all_steps, checkpoint_root
from salt.runtime.train import metrics_log
from salt.runtime.train.config import TrainConfig
from salt.runtime.train.trainer import train


class StageRecord:
    """A JSON file (``path``) recording finished stages under ``data["stages"]`` with their wall
    times: the state of ``salt reproduce`` and of ``salt ds-study``, and what :func:`side_by_side`
    reads (``done``) and writes (``finish``).  Subclasses set ``path`` and ``data``."""

    path: pathlib.Path
    data: dict

    def done(self, stage: str) -> bool:
        return stage in self.data["stages"]

    def finish(self, stage: str, seconds: float, **info) -> None:
        self.data["stages"][stage] = dict(info, seconds=float(seconds))
        self.save()

    def info(self, stage: str) -> dict:
        return self.data["stages"].get(stage, {})

    def save(self) -> None:
        outputs.write_json(self.path, self.data)


def say(msg: str) -> None:
    print(f"[salt reproduce] {msg}", file=sys.stderr, flush=True)


def train_config(cfg: ReproduceConfig, run_dir, data_dir, *, preset: str, steps: int, kd_steps: int,
                 checkpoint_every: int, seed: int, batch: int | None = None, teacher=None,
                 subset=None, resume: bool = False, transition: str | None = None, teacher_cache=None):
    """The TrainConfig of one run of the reproduction (``transition`` overrides cfg's: RKD's
    ω is constant for the whole run whatever SALT's transition is).  A KD run is top-K KD when
    ``cfg.kd_topk`` is set; ``teacher_cache``: its KD phase reads that cache instead of running
    ``teacher``."""

    transition = transition or cfg.transition
    if teacher_cache is not None:
        teacher = None
    return TrainConfig(preset=preset, data=str(data_dir), out=str(run_dir),
                       teacher=None if teacher is None else str(teacher), kd_steps=kd_steps,
                       kd_topk=cfg.kd_topk if kd_steps else None,
                       teacher_cache=None if teacher_cache is None else str(teacher_cache),
                       omega=cfg.omega, rho=cfg.rho, transition=transition,
                       kd_steps1=cfg.kd_steps1 if kd_steps and transition != "step" else None,
                       steps=steps, batch=batch or cfg.batch, seq_len=cfg.seq_len,
                       optimizer=cfg.optimizer, lr=cfg.lr, final_lr=cfg.final_lr,
                       warmup=cfg.warmup, seed=seed,
                       subset=None if subset is None else str(subset),
                       checkpoint_every=checkpoint_every,
                       keep_checkpoints=tuple(range(checkpoint_every, steps + 1, checkpoint_every)),
                       resume=resume)


def train_stage(tc, progress=True, start_over=False) -> dict:

    run_dir = pathlib.Path(tc.out)
    # a run this command started is continued from its newest intact checkpoint, or from step 0
    # when it died before its first one; when it saved checkpoints and none is intact it is
    # refused unless ``start_over`` (--start-over), never silently restarted (docs/safety.md)
    resume = run_dir.is_dir() and any(run_dir.iterdir())
    summary = train(dataclasses.replace(tc, resume=resume), progress=progress, start_over=resume and start_over)
    if summary["interrupted"]:  # SIGTERM / SIGINT: checkpoint saved; the stage is not finished
        raise Interrupted(f"training of {str(run_dir)!r} was stopped at step {summary['last_step']} "
                          "(checkpoint saved); re-run the same command to resume",
                          signal.Signals[summary["interrupted_by"]])
    return summary


def fork_run(src_run, step: int, dst_run, tc) -> None:
    """Start run ``dst_run`` (TrainConfig ``tc``) from ``src_run``'s checkpoint at ``step``.

    Copies the checkpoints up to ``step`` and the metrics rows up to ``step`` and writes ``tc`` as the run's
    ``run_config.json`` (with ``forked_from``), so that ``train(tc, resume=True)`` continues it.
    Only valid when both runs are identical up to ``step`` (RKD and SALT with the step
    transition up to n_kd); the directory appears complete or not at all (temp dir + rename).
    """

    src_run, dst_run = pathlib.Path(src_run), pathlib.Path(dst_run)
    if step not in all_steps(src_run):
        raise ValueError(f"cannot fork {str(dst_run)!r}: {str(src_run)!r} has no checkpoint of "
                         f"step {step}")
    if dst_run.exists():
        raise ValueError(f"cannot fork into {str(dst_run)!r}: it exists")
    tmp = dst_run.with_name(dst_run.name + ".fork-tmp")
    remove_own(tmp, "run")  # left by an interrupted fork of this function
    record = json.loads((src_run / "run_config.json").read_text())
    record["train"] = tc.to_dict()
    record["forked_from"] = {"run": str(src_run.absolute()), "step": int(step)}
    tmp.mkdir(parents=True)
    outputs.write_json(tmp / "run_config.json", record)  # first: tmp is a run directory throughout
    for s in all_steps(src_run):  # every kept checkpoint up to the fork: a complete-looking run
        if s <= step:
            shutil.copytree(checkpoint_root(src_run) / str(s), checkpoint_root(tmp) / str(s))

    rows = [r for r in metrics_log.read_metrics(src_run / "metrics.jsonl") if r.get("step", 0) <= step]
    (tmp / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, dst_run)


ONE_CORE_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def remove_own(path: pathlib.Path, kind: str) -> None:
    """Delete a directory this command wrote, after proving it holds nothing else (the output
    rule, file by file: salt.core.outputs.foreign_files); refused otherwise."""
    if path.exists():
        outputs.check_output_dir(path, kind, mode="replace", what="directory")
        outputs.remove_tree(path)


def worker() -> None:
    """Child process of :func:`side_by_side`: train the TrainConfig given as JSON on stdin.
    It dies with its parent (SIGTERM, so it saves a checkpoint first) and reports a user error
    as one line (exit 1); stopped by a signal it exits 143."""
    try:  # Linux: SIGTERM when the parent dies, even by kill -9
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    d = json.loads(sys.stdin.read())
    start_over = d.pop("start_over")
    os.sched_setaffinity(0, {d.pop("core")})  # before XLA starts its threads
    d["keep_checkpoints"] = tuple(d["keep_checkpoints"])
    try:
        train_stage(TrainConfig(**d), progress=False, start_over=start_over)
    except Interrupted as e:
        print(e, file=sys.stderr, flush=True)
        sys.exit(143)
    except (ValueError, OSError) as e:
        print(f"Error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


class Interrupted(ValueError):
    """A training stage stopped by SIGTERM / SIGINT after saving its checkpoint; ``exit_code``
    is 128 + the signal's number (143 / 130, as a `salt` command stopped by it)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


def side_by_side(jobs, state, prepare_job, start_over=False) -> None:
    """Train ``jobs`` two at a time, each process pinned to one core with single-threaded XLA
    (measured ~1.4x the throughput of one 2-thread run on 2 cores, docs/reproduction.md).
    A job whose prerequisite stage is not done waits; a failed job raises after the others end.
    SIGTERM / SIGINT are forwarded to the workers, which save a checkpoint and exit; then this
    raises (re-run to resume)."""

    cores = sorted(os.sched_getaffinity(0))[:2]
    if len(cores) < 2:
        return  # one core: the sequential loop trains everything
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + ONE_CORE_XLA_FLAGS).strip())
    pending, running, failed = list(jobs), {}, []
    stopped = []  # the signals received: forwarded to the workers, which save and exit

    def forward(signum, frame):
        if not stopped:
            say(f"{signal.Signals(signum).name}: asking the students to save a checkpoint and stop")
        stopped.append(signum)
        for _, proc, _, _ in running.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    old = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            old[sig] = signal.signal(sig, forward)
        except ValueError:  # not the main thread: the caller's handlers stay
            pass
    try:
        _run_workers(cores, env, pending, running, failed, stopped, state, prepare_job, start_over)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if stopped:
        raise Interrupted(f"stopped by {signal.Signals(stopped[0]).name}: the students saved their "
                          "checkpoints; re-run the same command to resume", stopped[0])
    if failed:
        raise ValueError("; ".join(failed))


def _run_workers(cores, env, pending, running, failed, stopped, state, prepare_job, start_over) -> None:
    """:func:`side_by_side`'s loop: start jobs on free cores, collect the finished ones; no new
    job once a signal came (``stopped``); returns when every worker has exited."""

    while pending or running:
        for core in cores:
            if core in running or failed or stopped:
                continue
            ready = [j for j in pending if j[3] is None or state.done(j[3])]
            if not ready:
                break
            job = ready[0]
            pending.remove(job)
            prepare_job(job[0], job[1], job[2])
            log = tempfile.TemporaryFile()  # the child's output (a file: no pipe to fill)
            proc = subprocess.Popen(  # its own session: a terminal's Ctrl-C reaches it through us only
                [sys.executable, "-c", "from salt.runtime.experiments.students import worker; worker()"],
                stdin=subprocess.PIPE, stdout=log, stderr=log, env=env, start_new_session=True)
            proc.stdin.write(json.dumps(dict(job[1].to_dict(), core=core, start_over=start_over)).encode())
            proc.stdin.close()
            running[core] = (job, proc, time.time(), log)
            if stopped:  # the signal came while it started
                proc.send_signal(stopped[0])
        if not running:
            break
        time.sleep(0.5)
        for core, (job, proc, t0, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.seek(0)
            err = log.read().decode(errors="replace")
            log.close()
            del running[core]
            if proc.returncode == 0:
                state.finish(job[0], time.time() - t0, forked=job[2], side_by_side=True, core=core)
            elif not stopped:  # a user error: its one line; else the end of its output
                why = [line[len("Error: "):] for line in err.splitlines() if line.startswith("Error: ")]
                failed.append(f"{job[0]} failed (exit {proc.returncode}): {why[-1] if why else err.strip()[-2000:]}")
