"""The martingale differences ξ_t of a run's loss (the paper's appendix L, eq. 56): definitions
and the plug-in estimate in docs/xi.md.

For a held-out window ``w_0 … w_T`` (``T`` targets after the first token), a student ``f`` (the
run analysed) and an oracle ``P*`` (another run's model), with the student's mean log-loss
``ℓ(w) = -(1/T) Σ_{i=1..T} log f(w_i | w_<i)``:

* ``L_t = E[ℓ(W) | W_0..t = w_0..t]`` with ``W_{t+1..T} ~ P*(· | w_0..t)``, ``t = 0 … T``
  (``L_T = ℓ(w)``);
* ``ξ_t = L_t - L_{t-1}``, ``t = 1 … T`` (so ``Σ_t ξ_t = ℓ(w) - L_0``).

The plug-in estimate replaces each ``L_t`` (``t < T``) by the mean of ``ℓ`` over ``n_com``
completions sampled from the oracle after the prefix ``w_0..t``. Completion ``j`` of every
prefix of a window draws its Gumbel noise from the same key (common random numbers,
:func:`salt.runtime.model.decode.sample_fill`): each ``L̂_t`` is still the mean of ``n_com``
independent draws, while ``ξ̂_t = L̂_t - L̂_{t-1}`` is the mean of the paired differences
``d_j = ℓ(c_{t,j}) - ℓ(c_{t-1,j})`` (completions ``t-1, j`` and ``t, j`` coincide from the
moment they agree on a token), whose spread gives ξ̂_t's standard error.

The estimator core (:func:`estimate`) takes the sampler and the loss as functions, so the exact
test (tests/test_xi.py) runs it on a bigram oracle and student whose ``L_t`` is computed by
dynamic programming; :func:`model_functions` builds both from salt checkpoints.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
import tempfile
from typing import Callable

import jax
import numpy as np

from salt.core import outputs
from salt.data import TokenStore, validation_batches
from salt.runtime.model import checkpoint, decode
from salt.runtime.model.tokens import window_stats_fn
from salt.runtime.train.config import resolve_kernels

SampleFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
LossFn = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass
class XiEstimate:
    """Per window ``n``: ``L_hat [N, T+1]`` (``L̂_0 … L̂_T``), ``xi [N, T]`` (``ξ̂_1 … ξ̂_T``),
    ``se [N, T]`` (standard error of each ξ̂_t from the ``n_com`` paired differences)."""
    L_hat: np.ndarray
    xi: np.ndarray
    se: np.ndarray
    n_com: int

    @property
    def T(self) -> int:
        return self.xi.shape[1]


def completion_keys(seed: int, n_windows: int, n_com: int) -> np.ndarray:
    """``[n_windows, n_com, 2]`` PRNG keys: window ``n``'s completion ``j`` (shared by its prefixes)."""
    base = jax.random.PRNGKey(seed)
    per_window = jax.vmap(lambda n: jax.random.fold_in(base, n))(np.arange(n_windows))
    return np.asarray(jax.vmap(lambda k: jax.vmap(lambda j: jax.random.fold_in(k, j))(
        np.arange(n_com)))(per_window))


def estimate(windows_NxT1, sample_fn: SampleFn, loss_fn: LossFn, *, n_com: int, seed: int = 0,
             batch_rows: int = 256) -> XiEstimate:
    """Plug-in ξ̂ for each window (rows ``w_0 … w_T``).

    ``sample_fn(tokens_BxT1, prefix_len_B, keys_Bx2)`` returns the rows with positions
    ``>= prefix_len`` sampled from the oracle; ``loss_fn(tokens_BxT1)`` returns the student's mean
    log-loss ``ℓ`` per row ``[B]``. Rows go through both in batches of exactly ``batch_rows``
    (the last one padded), so each compiles once."""
    windows = np.asarray(windows_NxT1, dtype=np.int32)
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [N, T + 1] with T >= 1, got shape {windows.shape}")
    if n_com < 2:
        raise ValueError(f"n_com must be >= 2 (a standard error needs two completions), got {n_com}")
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    N, T1 = windows.shape
    T = T1 - 1
    keys = completion_keys(seed, N, n_com)
    # rows: window n, prefix t in 0..T-1 (prefix_len t+1), completion j; then each window itself
    n_idx, t_idx, j_idx = (a.ravel() for a in np.meshgrid(np.arange(N), np.arange(T), np.arange(n_com),
                                                          indexing="ij"))
    rows = np.concatenate([windows[n_idx], windows])
    prefix_len = np.concatenate([t_idx + 1, np.full(N, T1)])
    row_keys = np.concatenate([keys[n_idx, j_idx], keys[:, 0]])
    losses = np.empty(rows.shape[0], np.float64)
    for start in range(0, rows.shape[0], batch_rows):
        stop = min(start + batch_rows, rows.shape[0])
        pad = batch_rows - (stop - start)
        sl = np.r_[start:stop, np.full(pad, stop - 1)].astype(np.int64)
        filled = sample_fn(rows[sl], prefix_len[sl], row_keys[sl])
        losses[start:stop] = np.asarray(loss_fn(filled), np.float64)[:stop - start]
    ell_NxTxJ = losses[:N * T * n_com].reshape(N, T, n_com)
    ell_N = losses[N * T * n_com:]
    ell_NxT1xJ = np.concatenate([ell_NxTxJ, np.repeat(ell_N[:, None, None], n_com, axis=2)], axis=1)
    d_NxTxJ = np.diff(ell_NxT1xJ, axis=1)
    return XiEstimate(L_hat=ell_NxT1xJ.mean(axis=2), xi=d_NxTxJ.mean(axis=2),
                      se=d_NxTxJ.std(axis=2, ddof=1) / math.sqrt(n_com), n_com=n_com)


# ----------------------------------------------------------------------------- salt checkpoints
def model_functions(student_params, student_config, oracle_params, oracle_config, *, vocab: int,
                    temperature: float = 1.0) -> tuple[SampleFn, LossFn]:
    """The oracle's KV-cache sampler and the student's mean log-loss ``ℓ`` (full-vocabulary
    cross-entropy over the tokenizer's ``vocab`` ids, as ``salt eval`` computes it)."""
    stats = window_stats_fn(student_config, resolve_kernels("auto"),
                            vocab=vocab if student_config.vocab_size > vocab else None)

    def sample_fn(tokens, prefix_len, keys):
        return decode.sample_fill(oracle_params, oracle_config, tokens, prefix_len, keys,
                                  temperature=temperature, vocab=vocab)

    def loss_fn(windows_BxT1):
        ce_BxT = stats(student_params, windows_BxT1)["ce"]
        return np.asarray(ce_BxT, np.float64).mean(axis=1)

    return sample_fn, loss_fn


def held_out_windows(data_dir, T: int, n_windows: int) -> np.ndarray:
    """The first ``n_windows`` validation windows of ``T + 1`` tokens (fewer if the split is short)."""
    parts = [tokens for _, tokens in validation_batches(data_dir, seq_len=T, batch_size=n_windows,
                                                        max_windows=n_windows)]
    if not parts:
        raise ValueError(f"no validation windows of {T + 1} tokens in {str(data_dir)!r}")
    return np.concatenate(parts)


# ----------------------------------------------------------------------------- summaries
# The paper's mean |ξ̂_t| (appendix L, Tables 15 and 16): BASELINE 2.8B and 1.5B students, the
# 8.6B BASELINE as oracle, 64 completions, about 200K validation windows; {T: {t: value}}.
PAPER_T = (1, 5, 10, 30, 100, 300, 640)
PAPER_TABLES = {
    "Table 15 (2.8B)": {64: (0.338, 0.133, 0.106, 0.087), 128: (0.261, 0.099, 0.074, 0.057, 0.042),
                        256: (0.188, 0.082, 0.060, 0.044, 0.033), 512: (0.134, 0.071, 0.053, 0.039, 0.031, 0.019),
                        1280: (0.109, 0.058, 0.041, 0.031, 0.027, 0.023, 0.016)},
    "Table 16 (1.5B)": {64: (0.345, 0.135, 0.108, 0.087), 128: (0.267, 0.102, 0.076, 0.058, 0.042),
                        256: (0.194, 0.085, 0.062, 0.045, 0.033), 512: (0.138, 0.074, 0.055, 0.040, 0.032, 0.019),
                        1280: (0.113, 0.061, 0.043, 0.032, 0.028, 0.024, 0.017)},
}


def table_columns(T_values) -> list[int]:
    """Prefix lengths shown in the table: the paper's (1, 5, 10, 30, …) up to the largest T, and
    every T itself (its last prefix)."""
    return sorted({t for t in PAPER_T if t <= max(T_values)} | set(T_values))


def summary(est: XiEstimate) -> dict:
    """Per prefix length t = 1..T: mean |ξ̂_t| over windows and its standard error across windows,
    the mean per-window standard error of ξ̂_t (the sampling noise that inflates |ξ̂_t|), and the
    noise-corrected root mean square ``sqrt(max(0, mean(ξ̂²) - mean(se²)))`` (an estimate of
    ``sqrt(E ξ_t²)``: the per-window se² is unbiased for the variance of ξ̂_t)."""
    absx = np.abs(est.xi)
    N = est.xi.shape[0]
    return {
        "T": est.T, "n_windows": int(N), "n_com": est.n_com,
        "mean_abs_xi": absx.mean(axis=0).tolist(),
        "mean_abs_xi_se": (absx.std(axis=0, ddof=1) / math.sqrt(N) if N > 1
                           else np.full(est.T, np.nan)).tolist(),
        "mean_se": est.se.mean(axis=0).tolist(),
        "rms_xi_corrected": np.sqrt(np.maximum(0.0, (est.xi ** 2).mean(axis=0)
                                               - (est.se ** 2).mean(axis=0))).tolist(),
        "mean_abs_xi_all_t": float(absx.mean()),
        "L0_mean": float(est.L_hat[:, 0].mean()), "LT_mean": float(est.L_hat[:, -1].mean()),
    }


def render_markdown(results: dict) -> str:
    """The mean |ξ̂_t| table by prefix length t (columns) and sequence length T (rows)."""
    per_T = results["by_T"]
    cols = table_columns([s["T"] for s in per_T])
    lines = [
        "# Martingale differences ξ_t (appendix L)", "",
        f"Student (analysed run): `{results['student']['path']}` step {results['student']['step']}; "
        f"oracle P*: `{results['oracle']['path']}` step {results['oracle']['step']}; "
        f"temperature {results['temperature']}; {results['n_com']} completions per prefix; seed "
        f"{results['seed']}; held-out windows of `{results['data']}`. Definitions: docs/xi.md.", "",
        "Mean |ξ̂_t| over windows (± its standard error over windows); `noise` is the mean standard "
        "error of a single ξ̂_t from its completions: |ξ̂_t| is biased upwards by sampling noise of "
        "about that size, so values near `noise` are not distinguishable from 0.", "",
        "| T | windows | " + " | ".join(f"t = {t}" for t in cols) + " | all t | noise (all t) |",
        "|---|---|" + "---|" * (len(cols) + 2),
    ]
    for s in per_T:
        cells = [f"{s['mean_abs_xi'][t - 1]:.4f} ± {s['mean_abs_xi_se'][t - 1]:.4f}" if t <= s["T"] else ""
                 for t in cols]
        lines.append(f"| {s['T']} | {s['n_windows']} | " + " | ".join(cells)
                     + f" | {s['mean_abs_xi_all_t']:.4f} | {float(np.mean(s['mean_se'])):.4f} |")
    lines += ["", "Noise-corrected RMS ξ_t, sqrt(max(0, mean ξ̂² − mean se²)):", "",
              "| T | " + " | ".join(f"t = {t}" for t in cols) + " |", "|---|" + "---|" * len(cols)]
    for s in per_T:
        lines.append(f"| {s['T']} | " + " | ".join(
            f"{s['rms_xi_corrected'][t - 1]:.4f}" if t <= s["T"] else "" for t in cols) + " |")
    lines += ["", "The paper's mean |ξ̂_t| beside it (appendix L; BASELINE 2.8B and 1.5B, the 8.6B BASELINE as "
              "oracle, 64 completions, ~200K windows; models, data and T differ from this run's):", "",
              "| paper | T | " + " | ".join(f"t = {t}" for t in PAPER_T) + " |", "|---|---|" + "---|" * len(PAPER_T)]
    for name, table in PAPER_TABLES.items():
        for T, row in table.items():
            lines.append(f"| {name} | {T} | " + " | ".join(f"{row[i]:.3f}" if i < len(row) else "—"
                                                         for i in range(len(PAPER_T))) + " |")
    lines += ["", "L̂_0 (mean over windows) and ℓ = L_T: "
              + "; ".join(f"T = {s['T']}: {s['L0_mean']:.4f} / {s['LT_mean']:.4f}" for s in per_T), ""]
    lines += [f"![ξ̂_t histograms, T = {s['T']}](xi_hist_T{s['T']}.png)" for s in per_T] + [""]
    return "\n".join(lines)


def histogram_steps(T: int) -> list[int]:
    """The prefix lengths a histogram figure shows: 1, T/4, T/2, T (distinct, ascending)."""
    return sorted({1, max(1, T // 4), max(1, T // 2), T})


def write_histograms(est: XiEstimate, path) -> None:
    """Figure 4-style histograms of ξ̂_t over windows, one panel per t in :func:`histogram_steps`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = histogram_steps(est.T)
    fig, axes = plt.subplots(1, len(steps), figsize=(3.2 * len(steps), 2.8), squeeze=False)
    for ax, t in zip(axes[0], steps):
        ax.hist(est.xi[:, t - 1], bins=30, color="tab:blue", alpha=0.8)
        ax.axvline(0.0, color="gray", linewidth=0.8)
        ax.set_title(f"T = {est.T}, t = {t}")
        ax.set_xlabel("ξ̂_t")
    axes[0][0].set_ylabel("windows")
    fig.tight_layout()
    outputs.write_bytes(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


# ----------------------------------------------------------------------------- a run
def _load(path, step, store, who: str):
    config, params, meta = checkpoint.load_params(path, step=step)
    sha = meta.get("tokenizer_sha256")
    if sha and sha != store.tokenizer_sha256:
        raise ValueError(f"{who} {str(path)!r} was trained with tokenizer {sha[:12]}…, the data "
                         f"{str(store.path)!r} has {store.tokenizer_sha256[:12]}…")
    return config, params, {"path": str(path), "step": int(meta.get("step", step or 0)),
                            "preset": config.name}


def run_xi(student, oracle, data_dir, out, *, student_step=None, oracle_step=None, lengths=(16, 32, 64),
           n_windows: int = 32, n_com: int = 8, temperature: float = 1.0, seed: int = 0,
           batch_rows: int = 256, progress: Callable[[str], None] | None = None) -> dict:
    """ξ̂ of ``student`` with ``oracle`` as P*, for each sequence length in ``lengths``; writes
    ``xi.json`` (per-window estimates and the summaries), ``xi.md`` (the tables) and
    ``xi_hist_T{T}.png`` into the new directory ``out`` (absent or empty; built under a hidden
    name and renamed into place)."""
    lengths = sorted({int(T) for T in lengths})
    if not lengths or lengths[0] < 1:
        raise ValueError(f"lengths must be positive integers, got {lengths}")
    for name, value in (("n_windows", n_windows), ("batch_rows", batch_rows)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if n_com < 2:
        raise ValueError(f"n_com must be >= 2 (a standard error needs two completions), got {n_com}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    out = pathlib.Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise outputs.OutputError(f"--out {str(out)!r} exists and is not an empty directory; "
                                  "choose another path")
    outputs.check_writable_parent(out)
    data_path = pathlib.Path(data_dir)
    if not data_path.is_dir():
        raise ValueError(f"data directory {str(data_path)!r} does not exist")
    store = TokenStore(data_path)
    s_config, s_params, s_info = _load(student, student_step, store, "the run")
    o_config, o_params, o_info = _load(oracle, oracle_step, store, "the oracle")
    vocab = store.vocab_size
    windows = {T: held_out_windows(data_path, T, n_windows) for T in lengths}
    sample_fn, loss_fn = model_functions(s_params, s_config, o_params, o_config, vocab=vocab,
                                         temperature=temperature)
    results = {"student": s_info, "oracle": o_info, "data": str(data_path), "temperature": temperature,
               "n_com": n_com, "seed": seed, "lengths": lengths, "by_T": [], "per_window": {}}
    estimates = {}
    for T in lengths:
        if progress is not None:
            progress(f"T = {T}: {windows[T].shape[0]} windows x {T} prefixes x {n_com} completions")
        est = estimate(windows[T], sample_fn, loss_fn, n_com=n_com, seed=seed, batch_rows=batch_rows)
        estimates[T] = est
        results["by_T"].append(summary(est))
        results["per_window"][str(T)] = {"L_hat": est.L_hat, "xi": est.xi, "se": est.se}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
    built = tmp / out.name  # made by mkdir: the usual directory mode (mkdtemp's is 0700)
    try:
        built.mkdir()
        outputs.write_json(built / "xi.json", results)
        outputs.write_text(built / "xi.md", render_markdown(results))
        for T, est in estimates.items():
            write_histograms(est, built / f"xi_hist_T{T}.png")
        if out.exists():
            out.rmdir()  # checked empty above
        outputs.move_into_place(built, out)
    finally:
        outputs.remove_tree(tmp)
    return results
