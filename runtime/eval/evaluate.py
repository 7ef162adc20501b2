"""Held-out evaluation: next-token accuracy and log-perplexity, overall and by teacher bucket.

Metrics (paper Table 1, docs/design.md §6) on the validation split, windows of ``T + 1`` tokens:

* accuracy  = fraction of target positions whose argmax prediction equals the target;
* log-perplexity = mean cross-entropy (nats) over target positions.

Per-window statistics (sum of CE, number correct, number of targets) are computed once per model
(:func:`window_stats`) and every summary is derived from them.  The bucketed view (paper §5.4,
appendix J) ranks the held-out windows by a *teacher's* mean per-window loss (lowest = easiest;
ties by window id) and splits the ranking into tertiles ``easy`` / ``medium`` / ``hard``
(``numpy.array_split`` sizes: the first buckets take the remainder).
"""
from __future__ import annotations

import functools
import pathlib
import sys

import numpy as np

from salt.core import outputs

BUCKETS = ("easy", "medium", "hard")


@functools.lru_cache(maxsize=16)
def _stats_fn(config, mesh=None, kernels: str = "auto", vocab: int | None = None):
    """``jit``-ed per-position ``(ce_BxT, correct_BxT)`` of one model config from the final hidden
    states and the tied embedding through the fused-linear kernel (no ``[tokens, vocab]`` logits;
    :func:`salt.runtime.model.losses.token_parts`).  ``mesh``: the devices' mesh (axis ``data``) of the
    batch.  Cached, so that evaluating many checkpoints of a run compiles once."""
    import jax

    from salt.runtime.model import losses, transformer as model
    from salt.runtime.train.config import resolve_kernels

    impl = resolve_kernels(kernels)

    @jax.jit
    def stats(params, windows_BxT1):
        hidden = model.hidden(params, windows_BxT1[:, :-1], config, attention_impl=impl, mesh=mesh)
        parts = losses.token_parts(hidden, model.head_matrix(params), windows_BxT1[:, 1:], impl=impl, mesh=mesh,
                                   vocab=vocab)  # padded embedding rows (beyond vocab): no probability
        return parts["ce"], parts["correct"] > 0.5

    return stats


def window_stats(params, config, data_dir, *, seq_len: int, batch_size: int = 32,
                 max_windows: int | None = None, progress: bool = False, desc: str = "eval") -> dict:
    """Per-window held-out statistics of one model (JAX, batched, sharded over local devices).

    Returns ``{"window_ids": int64[N], "loss_sum": float64[N], "correct": int64[N],
    "n_tokens": int64[N]}``.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from tqdm import tqdm

    from salt.data import validation_batches

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")
    devices = jax.devices()
    batch = -(-batch_size // len(devices)) * len(devices)
    mesh = Mesh(np.asarray(devices), ("data",))
    batch_sharding = NamedSharding(mesh, P("data"))
    params = jax.device_put(params, NamedSharding(mesh, P()))

    from salt.data.store import open_store
    tokenizer_vocab = open_store(data_dir).vocab_size
    stats = _stats_fn(config, mesh, vocab=tokenizer_vocab if config.vocab_size > tokenizer_vocab else None)

    ids_out, loss_out, correct_out = [], [], []
    bar = tqdm(desc=desc, unit="win", file=sys.stderr, disable=not progress, dynamic_ncols=True,
               total=max_windows)
    try:
        for ids, tokens in validation_batches(data_dir, seq_len=seq_len, batch_size=batch,
                                              max_windows=max_windows):
            ids = np.asarray(ids, dtype=np.int64)
            tokens = np.asarray(tokens, dtype=np.int32)
            n = ids.size
            if tokens.shape != (n, seq_len + 1):
                raise RuntimeError(f"validation batch of shape {tokens.shape}, expected "
                                   f"{(n, seq_len + 1)}")
            if n < batch:  # pad: one compiled shape
                tokens = np.concatenate([tokens, np.zeros((batch - n, seq_len + 1), np.int32)])
            ce, correct = stats(params, jax.device_put(jnp.asarray(tokens), batch_sharding))
            ce = np.asarray(ce, dtype=np.float64)[:n]
            correct = np.asarray(correct)[:n]
            ids_out.append(ids)
            loss_out.append(ce.sum(axis=1))
            correct_out.append(correct.sum(axis=1).astype(np.int64))
            bar.update(n)
    finally:
        bar.close()
    if not ids_out:
        raise ValueError(f"no validation windows of seq_len={seq_len} in {str(data_dir)!r}")
    window_ids = np.concatenate(ids_out)
    return {"window_ids": window_ids, "loss_sum": np.concatenate(loss_out),
            "correct": np.concatenate(correct_out),
            "n_tokens": np.full(window_ids.size, seq_len, dtype=np.int64)}


def model_window_stats(path, step=None, *, data_dir, seq_len, batch_size=32, max_windows=None,
                       progress=False, check_tokenizer: str | None = None) -> tuple[dict, dict]:
    """Load a checkpoint (run dir or checkpoint path) and compute :func:`window_stats`.

    Returns ``(stats, info)`` with ``info = {"path", "step", "preset", "tokenizer_sha256"}``.
    Raises ValueError when ``check_tokenizer`` is given and differs from the checkpoint's.
    """
    from salt.runtime.model import checkpoint

    config, params, meta = checkpoint.load_params(path, step=step)
    sha = meta.get("tokenizer_sha256")
    if check_tokenizer and sha and sha != check_tokenizer:
        raise ValueError(f"tokenizer mismatch: {str(path)!r} was trained with tokenizer {sha[:12]}…, "
                         f"the data has {check_tokenizer[:12]}…")
    stats = window_stats(params, config, data_dir, seq_len=seq_len, batch_size=batch_size,
                         max_windows=max_windows, progress=progress, desc=pathlib.Path(path).name)
    info = {"path": str(path), "step": int(meta.get("step", step or 0)), "preset": config.name,
            "tokenizer_sha256": sha}
    return stats, info


def _metrics(loss_sum, correct, n_tokens) -> dict:
    n = int(np.sum(n_tokens))
    return {"accuracy": float(np.sum(correct) / n), "log_ppl": float(np.sum(loss_sum) / n),
            "n_windows": int(np.size(loss_sum)), "n_tokens": n}


def bucket_order(teacher_stats: dict) -> np.ndarray:
    """Window ids ranked easiest first by the teacher's mean loss (ties: window id ascending)."""
    mean_loss = teacher_stats["loss_sum"] / teacher_stats["n_tokens"]
    order = np.lexsort((teacher_stats["window_ids"], mean_loss))
    return teacher_stats["window_ids"][order]


def buckets(teacher_stats: dict) -> dict:
    """``{"easy": ids, "medium": ids, "hard": ids}`` (tertiles of :func:`bucket_order`)."""
    ranked = bucket_order(teacher_stats)
    if ranked.size < len(BUCKETS):
        raise ValueError(f"need at least {len(BUCKETS)} held-out windows to bucket, got {ranked.size}")
    return dict(zip(BUCKETS, np.array_split(ranked, len(BUCKETS))))


def summarize(stats: dict, teacher_stats: dict | None = None) -> dict:
    """Overall metrics and, with ``teacher_stats``, the same per easy / medium / hard bucket."""
    out = _metrics(stats["loss_sum"], stats["correct"], stats["n_tokens"])
    if teacher_stats is not None:
        position = {int(w): i for i, w in enumerate(stats["window_ids"])}
        missing = [int(w) for w in teacher_stats["window_ids"] if int(w) not in position]
        if missing:
            raise ValueError(f"{len(missing)} windows the teacher was evaluated on are missing from "
                             "the model's statistics (different --max-windows or seq_len?)")
        out["buckets"] = {}
        for name, ids in buckets(teacher_stats).items():
            rows = np.asarray([position[int(w)] for w in ids], dtype=np.int64)
            out["buckets"][name] = _metrics(stats["loss_sum"][rows], stats["correct"][rows],
                                            stats["n_tokens"][rows])
    return out


def save_stats(path, stats: dict) -> None:
    outputs.save_npz(path, **stats)


def load_stats(path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {name: z[name] for name in ("window_ids", "loss_sum", "correct", "n_tokens")}
    except Exception as e:  # noqa: BLE001 - any unreadable cache is reported by name
        raise ValueError(f"evaluation cache {str(path)!r} is unreadable ({type(e).__name__}); "
                         "delete it to recompute") from None


def format_table(rows: list[tuple[str, dict]], *, buckets_too: bool = True) -> str:
    """A plain-text table: one row per (name, summary)."""
    head = f"{'model':<28}{'acc %':>8}{'log-ppl':>9}"
    has_buckets = buckets_too and any("buckets" in s for _, s in rows)
    if has_buckets:
        for b in BUCKETS:
            head += f"{b + ' acc':>12}{b + ' lppl':>12}"
    lines = [head, "-" * len(head)]
    for name, s in rows:
        line = f"{name:<28}{100 * s['accuracy']:>8.2f}{s['log_ppl']:>9.4f}"
        if has_buckets and "buckets" in s:
            for b in BUCKETS:
                line += f"{100 * s['buckets'][b]['accuracy']:>12.2f}{s['buckets'][b]['log_ppl']:>12.4f}"
        lines.append(line)
    return "\n".join(lines)


def recorded_seq_len(meta: dict):
    """The training window length a checkpoint's metadata records, or None."""
    for key in ("run_config", "loader_state"):
        value = meta.get(key)
        if isinstance(value, dict) and isinstance(value.get("seq_len"), int):
            return value["seq_len"]
    return meta.get("seq_len") if isinstance(meta.get("seq_len"), int) else None


def evaluate_checkpoints(path, step=None, *, data_dir, seq_len=None, teacher=None, teacher_step=None,
                         max_windows=None, batch_size=32, progress=False) -> dict:
    """What ``salt eval`` prints: metrics of one checkpoint, bucketed by a teacher if given."""
    from salt.data import TokenStore
    from salt.runtime.model import checkpoint

    data_path = pathlib.Path(data_dir)
    if not data_path.is_dir():
        raise ValueError(f"data directory {str(data_path)!r} does not exist")
    store = TokenStore(data_path)
    config, params, meta = checkpoint.load_params(path, step=step)
    sha = meta.get("tokenizer_sha256")
    if sha and sha != store.tokenizer_sha256:
        raise ValueError(f"tokenizer mismatch: {str(path)!r} was trained with tokenizer {sha[:12]}…, "
                         f"data {str(data_path)!r} has {store.tokenizer_sha256[:12]}…")
    if seq_len is None:
        seq_len = recorded_seq_len(meta)
        if seq_len is None:
            raise ValueError(f"{str(path)!r} records no seq_len; pass --seq-len")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    model_info = {"path": str(path), "step": int(meta.get("step", step or 0)), "preset": config.name}
    teacher_stats = None
    result = {"seq_len": int(seq_len), "data": str(data_path), "model": model_info}
    if teacher is not None:
        t_stats, t_info = model_window_stats(teacher, teacher_step, data_dir=data_path,
                                             seq_len=seq_len, batch_size=batch_size,
                                             max_windows=max_windows, progress=progress,
                                             check_tokenizer=store.tokenizer_sha256)
        teacher_stats = t_stats
        result["teacher"] = {k: t_info[k] for k in ("path", "step", "preset")}
    stats = window_stats(params, config, data_path, seq_len=seq_len, batch_size=batch_size,
                         max_windows=max_windows, progress=progress, desc=pathlib.Path(path).name)
    result["metrics"] = summarize(stats, teacher_stats)
    result["n_windows"] = result["metrics"]["n_windows"]
    if teacher_stats is not None:
        result["teacher_metrics"] = summarize(teacher_stats, teacher_stats)
    return result
