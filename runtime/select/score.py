"""Data-selection score (paper eq. 11, docs/design.md §4) computed with a JAX teacher.

For each candidate training window ``w`` (``T + 1`` tokens: inputs ``w[:-1]``, targets ``w[1:]``)
the teacher's per-position cost is

    c_i = -log P(y_i | x_<i)   if y_i is in the teacher's top-k at position i, else 0,

where ``y_i`` is in the top-k iff fewer than ``k`` logits are *strictly* larger than its own
(ties count in favour of membership; one pass over the vocabulary, no sort).  The window's
score is numpy's median of the ``c_i`` (mean of the two middle values for an even count).
With ``mode="exclude"`` the positions outside the top-k are dropped instead of counted as 0;
a window with no top-k position at all then has no median and scores ``-inf`` (never selected
ahead of a window that has one).

The per-token terms (cross-entropy and top-k membership) run in JAX, batched and sharded over
the data axis of all local devices; the median runs on the host in float64 with numpy.

Scoring is resumable: results are written in chunks under ``<out>.partial/`` (each chunk file
written atomically) together with a fingerprint of the job; a re-run with the same settings
continues after the last finished chunk.  The final ``.npz`` (``window_ids`` int64, ``scores``
float64, ``k``, ``mode``, teacher identity, tokenizer sha256, ``seq_len``) is written atomically
and loads with ``allow_pickle=False``.

Why one module of ~460 lines: the per-token terms, the candidate pool (windows the early
checkpoint saw), the resumable scoring job and the top-m selection are one command's pipeline
(`salt score` / `salt select`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import sys

import numpy as np
from tqdm import tqdm

from salt.core import outputs
from salt.core.inputs import file_problem
from salt.core.lock import LOCK_NAME, DirLock
from salt.data import Loader, TokenStore
from salt.data.ids import load_window_ids, numpy_file_kind
from salt.kernels.logits_kd import loss_naive
from salt.reference.config import PAPER_K
from salt.reference.score import top_m_indices
from salt.runtime.model import checkpoint
from salt.runtime.model.tokens import WindowStats
from salt.runtime.train.config import TrainConfig, resolve_kernels
from salt.runtime.train.setup import make_loaders

TOPK_MODES = ("zero", "exclude")
SCORES_FORMAT = "salt-scores-v1"


# --------------------------------------------------------------------------- per-token terms

def token_terms(logits_BxTxV, targets_BxT, k: int):
    """Per-position cross-entropy and top-k membership from full logits (the ``naive`` cross-check
    of :class:`salt.runtime.model.tokens.WindowStats`; the maths is :func:`salt.kernels.logits_kd.loss_naive`'s).

    Returns ``(ce_BxT float32, in_topk_BxT bool)`` where ``in_topk`` holds iff fewer than ``k``
    vocabulary entries have a logit strictly greater than the target's.
    """
    B, T, V = logits_BxTxV.shape
    ce_N, parts = loss_naive(logits_BxTxV.reshape(B * T, V), None, targets_BxT.reshape(B * T).astype("int32"),
                             0.0, 1.0)
    return ce_N.reshape(B, T), (parts["n_greater"] < k).reshape(B, T)


def window_medians(ce_NxT: np.ndarray, in_topk_NxT: np.ndarray, mode: str = "zero") -> np.ndarray:
    """Median per window of the eq. 11 costs (numpy median semantics), float64.

    ``mode="zero"``: positions outside the top-k count as 0.  ``mode="exclude"``: they are dropped;
    a window without any top-k position scores ``-inf``.
    """
    _check_mode(mode)
    ce_NxT = np.asarray(ce_NxT, dtype=np.float64)
    in_topk_NxT = np.asarray(in_topk_NxT, dtype=bool)
    if ce_NxT.shape != in_topk_NxT.shape or ce_NxT.ndim != 2:
        raise ValueError(f"ce and in_topk must be equal-shape 2-D arrays, got {ce_NxT.shape} "
                         f"and {in_topk_NxT.shape}")
    if mode == "zero":
        return np.median(np.where(in_topk_NxT, ce_NxT, 0.0), axis=1)
    out_N = np.full(ce_NxT.shape[0], -np.inf)
    for row, (ce_T, keep_T) in enumerate(zip(ce_NxT, in_topk_NxT)):
        if keep_T.any():
            out_N[row] = np.median(ce_T[keep_T])
    return out_N


def _check_mode(mode: str) -> None:
    if mode not in TOPK_MODES:
        raise ValueError(f"topk mode must be one of {TOPK_MODES}, got {mode!r}")


# --------------------------------------------------------------------------- candidate pool

def seen_windows(run_config: dict, data_dir, steps: int) -> tuple[int, np.ndarray]:
    """Window ids (at the run's own seq_len) that a run's loaders served in its first ``steps`` steps.

    ``run_config`` is the TrainConfig dict a checkpoint records (``meta["run_config"]``); the
    loaders are the trainer's own (:func:`salt.runtime.train.setup.make_loaders`) for that config, the KD
    loader serving steps ``step0 < kd_steps``.  Returns ``(seq_len, ids)``.
    """
    try:
        cfg = TrainConfig.from_dict(run_config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"the run's recorded config is unusable: {e}") from None
    exclude = load_window_ids(cfg.exclude) if cfg.exclude else None
    subset = load_window_ids(cfg.subset) if cfg.subset and cfg.kd_steps > 0 else None
    full, kd = make_loaders(cfg, data_dir, subset, exclude)
    ids = [np.asarray((kd if step0 < cfg.kd_steps else full).window_ids(step0), dtype=np.int64)
           for step0 in range(int(steps))]
    return cfg.seq_len, (np.unique(np.concatenate(ids)) if ids else np.zeros(0, np.int64))


def overlapping_windows(seen_ids: np.ndarray, seen_seq_len: int, seq_len: int,
                        num_windows: int) -> np.ndarray:
    """Ids of windows of length ``seq_len + 1`` that share a token with any seen window.

    Window ``i`` at length ``T`` covers tokens ``[i (T+1), (i+1)(T+1))`` of the split; windows seen
    at another length are mapped by token range (identity when the lengths agree).
    """
    seen_ids = np.unique(np.asarray(seen_ids, dtype=np.int64))
    if seen_seq_len == seq_len:
        return seen_ids[(seen_ids >= 0) & (seen_ids < num_windows)]
    a, b = seen_seq_len + 1, seq_len + 1
    first = (seen_ids * a) // b
    last = ((seen_ids + 1) * a - 1) // b
    hit = np.zeros(num_windows + 1, dtype=np.int64)  # difference array of covered window ids
    np.add.at(hit, np.clip(first, 0, num_windows), 1)
    np.add.at(hit, np.clip(last + 1, 0, num_windows), -1)
    return np.flatnonzero(np.cumsum(hit[:num_windows]) > 0).astype(np.int64)


# --------------------------------------------------------------------------- scoring job

@dataclasses.dataclass(frozen=True)
class ScoreJob:
    teacher: str                 # run dir or checkpoint path
    data: str                    # token store directory
    out: str                     # output .npz
    k: int = PAPER_K
    seq_len: int = 128
    mode: str = "zero"
    batch: int = 32
    teacher_step: int | None = None
    exclude_runs: tuple = ()     # run dirs whose seen windows leave the pool (besides the teacher's)
    exclude_files: tuple = ()    # .npy files of window ids (at seq_len) to leave out
    exclude_teacher_seen: bool = True
    max_candidates: int | None = None  # score a seeded random sample of this many pool windows
    sample_seed: int = 0
    chunk_batches: int = 16      # batches per resumable chunk
    force: bool = False



def load_scores(path) -> dict:
    """Read a scores ``.npz`` written by :func:`score` (no pickle) into a dict."""
    path = pathlib.Path(path)
    problem = file_problem(path)
    if problem:
        raise ValueError(f"scores file {str(path)!r} {problem}")
    try:
        if numpy_file_kind(path) != "npz":
            raise ValueError("not a .npz archive")
        with np.load(path, allow_pickle=False) as z:
            out = {name: z[name] for name in z.files}
    except Exception as e:  # noqa: BLE001
        why = str(e) if "pickle" not in str(e) else "holds objects"
        raise ValueError(f"scores file {str(path)!r} is not a readable scores .npz ({why})") from None
    for name in ("window_ids", "scores"):
        if name not in out:
            raise ValueError(f"{str(path)!r} is not a SALT scores file (no {name!r} array)")
    if out["window_ids"].shape != out["scores"].shape or out["scores"].ndim != 1:
        raise ValueError(f"{str(path)!r}: window_ids and scores must be equal-length 1-D arrays")
    return out


def candidate_pool(job: ScoreJob, teacher_meta: dict, teacher_step: int, num_windows: int):
    """Sorted candidate window ids (all training windows at ``job.seq_len`` minus the excluded
    ones; with ``job.max_candidates`` a seeded uniform sample of that many of them), the
    number excluded and notes for the user (what was not excluded, and why).

    A model imported from Hugging Face (``salt import hf``: its checkpoint records the source,
    no run config) was not trained by SALT on any window of this store, so it excludes none;
    the note says so, since what it saw in its own pre-training is unknown to SALT.  A SALT run
    without a run config is refused as before (its windows are unknown)."""
    excluded = [np.zeros(0, np.int64)]
    sources, notes = [], []
    if job.exclude_teacher_seen:
        sources.append((f"teacher {job.teacher!r}", teacher_meta, teacher_step))
    for run in job.exclude_runs:
        meta = checkpoint.read_meta(run)
        sources.append((f"--exclude-run {run!r}", meta, int(meta["step"])))
    for what, meta, steps in sources:
        run_config = meta.get("run_config")
        if run_config is None and isinstance(meta.get("hf"), dict):
            notes.append(f"{what} was imported from Hugging Face ({meta['hf'].get('model_type')}) and "
                         "never trained by SALT on this store: none of its windows is excluded as "
                         "seen (its own pre-training data is unknown to SALT; --exclude FILE leaves "
                         "out windows you know it saw)")
            continue
        if not isinstance(run_config, dict):
            raise ValueError(f"{what}: the checkpoint records no run config, so the windows it "
                             "saw are unknown (use --no-exclude-teacher-seen / --exclude FILE)")
        if steps > 0:
            t_len, ids = seen_windows(run_config, job.data, steps)
            excluded.append(overlapping_windows(ids, t_len, job.seq_len, num_windows))
    for path in job.exclude_files:
        ids = load_window_ids(path)
        excluded.append(ids[(ids >= 0) & (ids < num_windows)])
    excluded_E = np.unique(np.concatenate(excluded))
    pool = np.setdiff1d(np.arange(num_windows, dtype=np.int64), excluded_E, assume_unique=True)
    if job.max_candidates is not None and job.max_candidates < pool.size:
        rng = np.random.default_rng([job.sample_seed, pool.size])
        pool = np.sort(rng.choice(pool, size=job.max_candidates, replace=False))
    return pool, int(excluded_E.size), notes


def _is_scores_file(path) -> bool:
    """Whether ``path`` is a scores .npz that ``salt score`` wrote (what --force may replace)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return "format" in z.files and str(z["format"]) == SCORES_FORMAT
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False


def _is_ids_file(path) -> bool:
    """Whether ``path`` is a 1-D integer .npy (a selection ``salt select`` wrote)."""
    try:
        ids = np.load(path, allow_pickle=False)
        return isinstance(ids, np.ndarray) and ids.ndim == 1 and np.issubdtype(ids.dtype, np.integer)
    except Exception:  # noqa: BLE001
        return False


def teacher_identity(path, step: int) -> str:
    return f"{os.path.abspath(path)}@{step}"


def _fingerprint(**fields) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def score(job: ScoreJob, progress: bool = True) -> dict:
    """Run a scoring job (see module docstring); returns a summary dict."""
    out = pathlib.Path(job.out)
    _check_job(job, out)
    data_dir = pathlib.Path(job.data)
    store = TokenStore(data_dir)
    config, params, meta = checkpoint.load_params(job.teacher, job.teacher_step)
    teacher_step = int(meta.get("step", job.teacher_step or 0))
    _check_teacher(job, store, config, meta)
    padded = config.vocab_size > store.vocab_size  # padded embedding rows: no probability, not counted

    loader = Loader(data_dir, seq_len=job.seq_len, global_batch=job.batch, seed=0, split="train")
    num_windows = int(loader.num_windows)
    pool_N, n_excluded, notes = candidate_pool(job, meta, teacher_step, num_windows)
    if pool_N.size == 0:
        raise ValueError("the candidate pool is empty (every training window was excluded)")
    ident = teacher_identity(job.teacher, teacher_step)
    fingerprint = _fingerprint(
        teacher=ident, data=str(data_dir.resolve()), tokenizer=store.tokenizer_sha256, k=job.k,
        mode=job.mode, seq_len=job.seq_len, batch=job.batch, chunk_batches=job.chunk_batches,
        n_candidates=int(num_windows),
        pool=hashlib.sha256(pool_N.tobytes()).hexdigest(), **({"vocab": store.vocab_size} if padded else {}))
    partial = out.with_name(out.name + ".partial")
    if partial.exists():  # the output rule before the lock writes into it
        outputs.check_output_dir(partial, "score", mode="replace", what="partial results")
    with DirLock(partial, what="partial results"):  # one scorer per --out (docs/safety.md §3)
        outputs.check_output_file(out, force=job.force, is_own=_is_scores_file)  # again, holding it
        _open_partial(partial, job, {"fingerprint": fingerprint, "teacher": ident, "n_pool": int(pool_N.size)})
        stats = WindowStats(params, config, batch_size=job.batch, impl=resolve_kernels("auto"),
                            vocab=store.vocab_size if padded else None)
        chunk_paths, done = _score_chunks(job, stats, loader, pool_N, partial, progress)
        scores_N = np.concatenate([_read_chunk(path) for path in chunk_paths])
        outputs.save_npz(out, window_ids=pool_N, scores=scores_N, k=np.int64(job.k),
                         mode=np.str_(job.mode), teacher=np.str_(ident), teacher_step=np.int64(teacher_step),
                         tokenizer_sha256=np.str_(store.tokenizer_sha256), seq_len=np.int64(job.seq_len),
                         n_excluded=np.int64(n_excluded), n_train_windows=np.int64(num_windows),
                         format=np.str_(SCORES_FORMAT))
        outputs.remove_tree(partial)
    return {"out": str(out), "n_scored": int(pool_N.size), "n_excluded": n_excluded,
            "n_train_windows": num_windows,
            "resumed_chunks": int(done), "teacher": ident, "k": job.k, "mode": job.mode,
            "notes": notes}


def _check_job(job: ScoreJob, out: pathlib.Path) -> None:
    """The job's own fields and its output, before anything is read or written."""
    _check_mode(job.mode)
    outputs.check_output_file(out, force=job.force, is_own=_is_scores_file)
    if job.batch < 1:
        raise ValueError(f"batch must be >= 1, got {job.batch}")
    if job.seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {job.seq_len}")
    if job.max_candidates is not None and job.max_candidates < 1:
        raise ValueError(f"max_candidates must be >= 1, got {job.max_candidates}")
    if not pathlib.Path(job.data).is_dir():
        raise ValueError(f"data directory {str(job.data)!r} does not exist")


def _check_teacher(job: ScoreJob, store, config, meta: dict) -> None:
    """The teacher fits the data: the same tokenizer, a vocabulary at least the data's, k in range."""
    t_sha = meta.get("tokenizer_sha256")
    if t_sha and t_sha != store.tokenizer_sha256:
        raise ValueError(f"tokenizer mismatch: teacher {job.teacher!r} was trained with tokenizer "
                         f"{t_sha[:12]}…, data {str(job.data)!r} has {store.tokenizer_sha256[:12]}…")
    if config.vocab_size < store.vocab_size:
        raise ValueError(f"teacher vocabulary {config.vocab_size} is smaller than the data's "
                         f"{store.vocab_size}")
    if not 1 <= job.k <= store.vocab_size:
        raise ValueError(f"k must be in [1, {store.vocab_size}] (the tokenizer's vocabulary), got {job.k}")


def _open_partial(partial: pathlib.Path, job: ScoreJob, state: dict) -> None:
    """``OUT.partial/`` (locked by the caller): the resumable chunks of this job (``job.json``
    holds its fingerprint); the partial results of a different job are refused unless
    ``--overwrite``, and then deleted file by file (the lock file stays: it is held)."""
    state_path = partial / "job.json"
    if outputs.check_output_dir(partial, "score", mode="replace", what="partial results") == "own":
        old = json.loads(state_path.read_text())  # valid: checked just above
        if old.get("fingerprint") != state["fingerprint"]:
            if not job.force:
                raise ValueError(f"{str(partial)!r} holds partial scores of a different job "
                                 "(teacher, data, k, mode, seq_len, batch or pool differ); "
                                 "remove it or use --overwrite")
            # checked above: every entry is this command's; job.json last (a crash part-way
            # leaves a directory that is still refused as another job's)
            for child in sorted(partial.iterdir(), key=lambda p: p.name == "job.json"):
                if child.is_dir():
                    outputs.remove_tree(child)
                elif child.name != LOCK_NAME:
                    child.unlink()
    outputs.write_bytes(state_path, lambda f: f.write(json.dumps(state).encode()))


def _score_chunks(job: ScoreJob, stats: WindowStats, loader, pool_N: np.ndarray, partial: pathlib.Path,
                  progress: bool) -> tuple[list, int]:
    """Score the pool in chunks of ``chunk_batches`` batches, each saved to ``partial`` as it is done
    (a re-run skips the chunks already there); returns the chunk paths and how many were resumed."""
    batch = stats.batch
    chunk = batch * job.chunk_batches
    paths = [partial / f"chunk_{c:06d}.npz" for c in range(-(-pool_N.size // chunk))]
    done = sum(path.is_file() for path in paths)
    bar = _progress_bar(total=int(pool_N.size), desc="score", enable=progress)
    try:
        for c, chunk_path in enumerate(paths):
            ids_C = pool_N[c * chunk:(c + 1) * chunk]
            if chunk_path.is_file():
                bar.update(ids_C.size)
                continue
            scores_C = np.empty(ids_C.size, np.float64)
            for b0 in range(0, ids_C.size, batch):
                ids_B = ids_C[b0:b0 + batch]
                windows = np.asarray(loader.windows(ids_B), dtype=np.int32)
                if windows.shape != (ids_B.size, job.seq_len + 1):
                    raise RuntimeError(f"loader returned windows of shape {windows.shape}, "
                                       f"expected {(ids_B.size, job.seq_len + 1)}")
                token_stats = stats(windows)
                ce, in_topk = token_stats["ce"], token_stats["n_greater"] < job.k
                scores_C[b0:b0 + ids_B.size] = window_medians(ce, in_topk, job.mode)
                bar.update(ids_B.size)
            outputs.save_npz(chunk_path, window_ids=ids_C, scores=scores_C)
    finally:
        bar.close()
    return paths, done


def _read_chunk(path: pathlib.Path) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as z:
            return np.asarray(z["scores"], np.float64)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"partial scores {str(path)!r} are unreadable ({type(e).__name__}); delete "
                         "that file and re-run to recompute it") from None


def _progress_bar(total: int, desc: str, enable: bool):
    return tqdm(total=total, desc=desc, unit="win", file=sys.stderr, disable=not enable,
                dynamic_ncols=True)


# --------------------------------------------------------------------------- selection

def select_top_m(window_ids_N: np.ndarray, scores_N: np.ndarray, m: int) -> np.ndarray:
    """The ``m`` highest-scoring window ids, best first; ties by window id ascending (docs/design.md §4).

    The ranking is the reference's (:func:`salt.reference.score.top_m_indices`, applied in window-id
    order so that "lower index" means "lower window id"): ``-inf`` (a window with nothing to take the
    median of) ranks last, NaN is rejected, ``m = 0`` selects nothing.
    """
    window_ids_N = np.asarray(window_ids_N, dtype=np.int64)
    scores_N = np.asarray(scores_N, dtype=np.float64)
    if window_ids_N.shape != scores_N.shape or window_ids_N.ndim != 1:
        raise ValueError("window_ids and scores must be equal-length 1-D arrays")
    if np.unique(window_ids_N).size != window_ids_N.size:
        raise ValueError("window_ids contain duplicates")
    if isinstance(m, (int, np.integer)) and m > window_ids_N.size:
        raise ValueError(f"top-m={m} exceeds the number of scored windows ({window_ids_N.size})")
    if np.isnan(scores_N).any():
        bad = int(window_ids_N[np.argmax(np.isnan(scores_N))])
        raise ValueError(f"scores contain NaN (window id {bad})")
    by_id = np.argsort(window_ids_N, kind="stable")
    return window_ids_N[by_id][top_m_indices(scores_N[by_id], m)]


def select(scores_path, m: int, out_path, force: bool = False) -> np.ndarray:
    """Read scores, pick the top ``m`` (see :func:`select_top_m`), write them atomically as .npy."""
    out_path = pathlib.Path(out_path)
    outputs.check_output_file(out_path, force=force, is_own=_is_ids_file)
    z = load_scores(scores_path)
    ids = select_top_m(z["window_ids"], z["scores"], m)
    outputs.save_npy(out_path, ids)
    return ids
