"""``salt teacher cache``: the teacher's top-k over a run's KD-phase batches, computed once
(see salt.runtime.train.teacher_cache)."""
from __future__ import annotations

import json

import click

from salt.runtime.train.teacher_cache import DEFAULT_LOGIT_BITS, DEFAULT_TOP_K, DEFAULT_VALUES, VALUE_DTYPES


@click.group("teacher")
def teacher():
    """Teacher utilities (the KD phase's teacher outputs, computed once)."""


@teacher.command("cache")
@click.option("--teacher", "teacher_run", required=True, type=click.Path(), help="Teacher run directory or checkpoint.")
@click.option("--teacher-step", type=int, default=None, help="Teacher checkpoint step (default: latest).")
@click.option("--data", required=True, type=click.Path(), help="Token store (from `salt data prepare`).")
@click.option("--top-k", type=click.IntRange(min=1), default=DEFAULT_TOP_K, show_default=True,
              help="Teacher logits kept per target position.")
@click.option("--steps", type=click.IntRange(min=1), required=True,
              help="KD steps n_kd to cache (the first n_kd batches of the run).")
@click.option("--batch", type=click.IntRange(min=1), required=True, help="Global batch of the run.")
@click.option("--seq-len", type=click.IntRange(min=1), required=True, help="Tokens per window T of the run.")
@click.option("--seed", type=click.IntRange(min=0, max=2**63 - 1), default=0, show_default=True,
              help="The run's --seed.")
@click.option("--subset", type=click.Path(), default=None, help="The run's --subset (SALT_DS selection).")
@click.option("--exclude", type=click.Path(), default=None, help="The run's --exclude.")
@click.option("--values-dtype", type=click.Choice(VALUE_DTYPES), default=DEFAULT_VALUES, show_default=True,
              help="Storage of the top-k set: compact (ids as a coded set, logits quantised to --logit-bits "
                   "relative to the row's max; docs/design.md §2), or uncompressed logits of this dtype "
                   "(float32: exact, for checks).")
@click.option("--logit-bits", type=click.IntRange(1, 16), default=DEFAULT_LOGIT_BITS, show_default=True,
              help="Bits per logit of the compact layout.")
@click.option("--out", required=True, type=click.Path(), help="Cache directory (resumed if interrupted).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def cache(teacher_run, teacher_step, data, top_k, steps, batch, seq_len, seed, subset, exclude, values_dtype,
          logit_bits, out, quiet):
    """Run the teacher once over the windows a `salt train` with these settings sees in its KD
    phase; store the top-k logits, their ids and the full-vocabulary log-sum-exp per position.
    Use it with `salt train --teacher-cache OUT --kd-topk K` (K <= --top-k)."""
    from salt.runtime.train.config import TrainConfig
    from salt.runtime.train.teacher_cache import CacheError, build

    cfg = TrainConfig(preset="tiny-student", data=data, out=out, teacher=teacher_run, teacher_step=teacher_step,
                      kd_steps=steps, steps=steps, batch=batch, seq_len=seq_len, seed=seed, subset=subset,
                      exclude=exclude)
    try:
        manifest = build(cfg, top_k=top_k, out=out, values_dtype=values_dtype, logit_bits=logit_bits,
                         progress=not quiet)
    except (CacheError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    from salt.runtime.train.teacher_cache import stored_bytes
    size = stored_bytes(out)
    click.echo(json.dumps({"cache": out, "steps": steps, "top_k": top_k, "values_dtype": values_dtype,
                           "logit_bits": manifest.get("logit_bits"), "ids_dtype": manifest["ids_dtype"],
                           "bytes": size, "bytes_per_token": size / (steps * batch * seq_len)}))


@teacher.command("verify")
@click.argument("cache_dir", type=click.Path())
def verify(cache_dir):
    """Hash every shard of a teacher cache against its cache.json (`salt train --teacher-cache`
    checks sizes when it opens a cache and each shard's hash when it reads it; this checks all
    of them up front)."""
    from salt.runtime.train.teacher_cache import CacheError, TeacherCache

    try:
        n = TeacherCache(cache_dir).verify()
    except CacheError as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps({"cache": cache_dir, "shards_verified": n}))
