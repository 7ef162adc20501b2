"""``salt bench data``: ``prepare`` on the embedded corpus (wall time, tokens/s) and loader tokens/s.

1. ``salt.data.prepare`` on the embedded default corpus (the interpreter's stdlib ``*.py``),
   tokenizer training included, into a temporary directory (or ``--out``). Reports wall
   time, CPU seconds (this process and its workers) and tokens/s, plus the full-corpus
   round-trip result. The machine's load average is reported too: on a shared machine the
   wall time depends on what else runs.
2. ``Loader.batch(step)`` for random-order batches (``--batch`` x ``--seq-len``, default 32 x
   1024) from the store's memory map; a few warm-up batches are not timed. Tokens/s counts
   the ``seq_len + 1`` tokens of every window.

``--store DIR`` skips step 1 and benchmarks the loader on an existing store.
"""
from __future__ import annotations

import json
import os
import resource
import tempfile
import time

import click

from salt.data import Loader, prepare


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def bench_prepare(out_dir: str, *, vocab_size: int | None, workers: int | None, progress: bool,
                  overwrite: bool = False) -> dict:

    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    meta = prepare(out_dir, None, vocab_size=vocab_size, workers=workers, overwrite=overwrite,
                   progress=progress)
    wall = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    tokens = meta["totals"]["tokens"]
    docs = meta["totals"]["documents"]
    return {
        "prepare_wall_s": wall,
        "prepare_cpu_s": cpu,
        "prepare_tokens": tokens,
        "prepare_tokens_per_s": tokens / wall,
        "corpus_bytes": meta["totals"]["bytes"],
        "corpus_files": meta["input_files"],
        "documents": docs,
        "roundtrip_ok_documents": docs - meta["roundtrip_failures"],
        "vocab_size": meta["vocab_size"],
        "chars_per_token_bytes": meta["totals"]["bytes"] / tokens,
        "skipped": {k: v for k, v in meta["skipped"].items() if v},
        "python_version": meta["python_version"],
    }


def bench_loader(store_dir: str, *, seq_len: int, batch: int, batches: int, seed: int = 0) -> dict:
    import numpy as np


    loader = Loader(store_dir, seq_len=seq_len, global_batch=batch, seed=seed,
                    process_index=0, process_count=1)
    steps = np.random.default_rng(seed).integers(0, 1 << 30, size=batches + 5)
    for step in steps[:5]:  # warm-up: permutation cache, page cache
        loader.batch(int(step))
    t0 = time.perf_counter()
    for step in steps[5:]:
        loader.batch(int(step))  # int32 copy of the windows: the tokens are really read
    seconds = time.perf_counter() - t0
    tokens = batches * batch * (seq_len + 1)
    return {
        "loader_seq_len": seq_len, "loader_batch": batch, "loader_batches": batches,
        "loader_pool_windows": loader.num_windows,
        "loader_s": seconds, "loader_tokens_per_s": tokens / seconds,
        "loader_batches_per_s": batches / seconds,
    }


@click.command("data")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Where to write the store [default: a temporary directory].")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--store", "store_dir", type=click.Path(file_okay=False), default=None,
              help="Skip prepare; benchmark the loader on this existing store.")
@click.option("--vocab-size", type=click.IntRange(min=1), default=None,
              help="Tokenizer vocabulary [default: prepare's default for the embedded corpus].")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Tokenizing processes.")
@click.option("--seq-len", default=1024, show_default=True, type=click.IntRange(min=1))
@click.option("--batch", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--batches", default=300, show_default=True, type=click.IntRange(min=1),
              help="Timed loader batches.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON object.")
def cli(out_dir, overwrite, store_dir, vocab_size, workers, seq_len, batch, batches, as_json):
    """Data pipeline: prepare wall time and tokens/s; loader tokens/s (random batches)."""
    result = {"cpu_count": os.cpu_count(), "load_average_before": os.getloadavg()}
    tmp = None
    try:
        if store_dir is None:
            if out_dir is None:
                tmp = tempfile.TemporaryDirectory(prefix="salt-bench-data-")
                out_dir = os.path.join(tmp.name, "store")
            result.update(bench_prepare(out_dir, vocab_size=vocab_size, workers=workers,
                                        progress=not as_json, overwrite=overwrite))
            store_dir = out_dir
        result.update(bench_loader(store_dir, seq_len=seq_len, batch=batch, batches=batches))
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    finally:
        if tmp is not None:
            tmp.cleanup()
    result["load_average_after"] = os.getloadavg()
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    if "prepare_wall_s" in result:
        click.echo(f"prepare (embedded corpus, {result['corpus_files']} files, "
                   f"{result['corpus_bytes'] / 1e6:.1f} MB, vocab {result['vocab_size']}): "
                   f"{result['prepare_wall_s']:.1f} s wall, {result['prepare_cpu_s']:.1f} s CPU, "
                   f"{result['prepare_tokens']:,} tokens, {result['prepare_tokens_per_s'] / 1e6:.2f} M tokens/s")
        click.echo(f"round trip: {result['roundtrip_ok_documents']}/{result['documents']} documents; "
                   f"{result['chars_per_token_bytes']:.2f} bytes/token")
    click.echo(f"loader: {result['loader_batches']} random batches of {batch} x {seq_len + 1}: "
               f"{result['loader_tokens_per_s'] / 1e6:.1f} M tokens/s "
               f"({result['loader_batches_per_s']:.0f} batches/s)")
    click.echo(f"load average before/after: {result['load_average_before'][0]:.1f} / "
               f"{result['load_average_after'][0]:.1f} on {result['cpu_count']} CPUs", err=True)
