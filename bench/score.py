"""``salt bench score``: selection score, Numba vs plain NumPy, tokens/s and their ratio in one run.

Random float32 teacher logits ``[seqs, tokens, vocab]`` (normal, scale 3, fixed seed) and random
targets. The Numba function is called once on a tiny batch first so that its compilation (or
cache load) is not timed. Both implementations score the SAME batch; the results are checked to
agree (relative 1e-12) so the timing is of a correct computation. The logits batch is held in
memory as float32 (64 x 512 x 32768 = 4.3 GB at the default size); the NumPy version works on
chunks of sequences (a few hundred MB of float64 temporaries).
"""
from __future__ import annotations

import json
import os
import sys
import time

import click
import numpy as np

from salt.reference.score import selection_score
from salt.reference.score_numba import selection_score_numba


def _make_batch(seqs: int, tokens: int, vocab: int, seed: int):
    rng = np.random.default_rng(seed)
    logits = np.empty((seqs, tokens, vocab), dtype=np.float32)
    for b in range(seqs):  # row by row: no float64 temporary of the whole batch
        logits[b] = rng.standard_normal((tokens, vocab), dtype=np.float32) * 3.0
    targets = rng.integers(0, vocab, size=(seqs, tokens))
    return logits, targets


def run_benchmark(seqs: int, tokens: int, vocab: int, k: int, mode: str, seed: int = 0,
                  threads: int | None = None, log=lambda message: None) -> dict:
    import numba


    if threads is not None:
        numba.set_num_threads(threads)

    log("generating logits ...")
    logits, targets = _make_batch(seqs, tokens, vocab, seed)
    log("numba (warm-up, then timed) ...")
    selection_score_numba(logits[:1, :2], targets[:1, :2], min(k, vocab), mode)  # compile / load cache

    start = time.perf_counter()
    numba_scores = selection_score_numba(logits, targets, k, mode)
    numba_s = time.perf_counter() - start

    log(f"numba took {numba_s:.2f} s; numpy ...")
    start = time.perf_counter()
    numpy_scores = selection_score(logits, targets, k, mode)
    numpy_s = time.perf_counter() - start

    finite = np.isfinite(numpy_scores)
    agree = bool(np.array_equal(finite, np.isfinite(numba_scores)) and np.allclose(
        numba_scores[finite], numpy_scores[finite], rtol=1e-12, atol=0.0))
    n_tokens = seqs * tokens
    return {
        "seqs": seqs, "tokens": tokens, "vocab": vocab, "k": k, "mode": mode,
        "numba_threads": numba.get_num_threads(), "cpu_count": os.cpu_count(),
        "numba_s": numba_s, "numpy_s": numpy_s,
        "numba_tokens_per_s": n_tokens / numba_s, "numpy_tokens_per_s": n_tokens / numpy_s,
        "speedup": numpy_s / numba_s, "results_agree": agree,
    }


@click.command("score")
@click.option("--seqs", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--tokens", default=512, show_default=True, type=click.IntRange(min=1))
@click.option("--vocab", default=32768, show_default=True, type=click.IntRange(min=1))
@click.option("--k", "k", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--mode", default="zero", show_default=True, type=click.Choice(["zero", "exclude"]))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--threads", default=None, type=click.IntRange(min=1),
              help="Numba threads (default: all cores; NumPy is single-threaded either way).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def cli(seqs, tokens, vocab, k, mode, seed, threads, as_json):
    """Numba vs NumPy selection score at V=32768, 64 x 512 tokens (target: Numba >= 10x)."""
    if k > vocab:
        raise click.BadParameter(f"k={k} must be <= vocab={vocab}", param_hint="--k")
    click.echo(f"scoring {seqs} x {tokens} tokens, V={vocab}, k={k}, mode={mode} ...", err=True)
    if threads is not None:
        import numba
        if threads > numba.config.NUMBA_NUM_THREADS:
            raise click.BadParameter(
                f"{threads} > the {numba.config.NUMBA_NUM_THREADS} threads Numba can use",
                param_hint="--threads")
    result = run_benchmark(seqs, tokens, vocab, k, mode, seed, threads,
                           log=lambda message: click.echo(message, err=True))
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(
            f"numba: {result['numba_tokens_per_s']:,.0f} tokens/s ({result['numba_s']:.3f} s, "
            f"{result['numba_threads']} threads)\n"
            f"numpy: {result['numpy_tokens_per_s']:,.0f} tokens/s ({result['numpy_s']:.3f} s)\n"
            f"speedup numba/numpy: {result['speedup']:.1f}x   results agree: {result['results_agree']}")
    if not result["results_agree"]:
        sys.exit(1)
