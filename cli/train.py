"""``salt train``: BASELINE / RKD / SALT / SALT_DS training (see salt.runtime.train.trainer)."""
from __future__ import annotations

import json
import sys

import click

from salt.reference.config import PAPER_OMEGA, PAPER_RHO
from salt.runtime.train.config import DTYPES, KERNELS, OBJECTIVES, RUNTIMES
from salt.runtime.model.losses import TRANSITIONS
from salt.runtime.train.optim import OPTIMIZERS


def _keep(ctx, param, value):
    if not value:
        return ()
    try:
        steps = tuple(sorted({int(v) for v in value.split(",") if v.strip()}))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated step numbers, got {value!r}") from None
    if any(s < 1 for s in steps):
        raise click.BadParameter(f"step numbers must be >= 1, got {value!r}")
    return steps


REQUIRED = ("data", "out", "steps")  # as flags or in --config (and --preset or --init)


@click.command("train")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="YAML or JSON file of settings in groups (model, data, kd, optimizer, run; docs/workflow.md), "
                   "or a run's run_config.json (re-run it); flags given explicitly override it.")
@click.option("--preset", default=None,
              help="Model preset of the student (see `salt presets`); required unless --init.")
@click.option("--init", type=click.Path(), default=None,
              help="Start from this run's newest checkpoint (its architecture and weights, e.g. from "
                   "`salt import hf`) instead of a preset: continued pre-training.")
@click.option("--data", default=None, type=click.Path(), help="Token store (from `salt data prepare`). Required.")
@click.option("--out", default=None, type=click.Path(), help="Run directory (checkpoints, metrics). Required.")
@click.option("--teacher", type=click.Path(), default=None,
              help="Teacher run directory or checkpoint (needed when --kd-steps > 0).")
@click.option("--teacher-step", type=int, default=None, help="Teacher checkpoint step (default: latest).")
@click.option("--kd-steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="n_kd: steps of the KD phase (0 = BASELINE, = --steps for RKD).")
@click.option("--omega", type=float, default=PAPER_OMEGA, show_default=True, help="Distillation weight ω in [0, 1].")
@click.option("--rho", type=float, default=PAPER_RHO, show_default=True, help="Teacher temperature ρ > 0.")
@click.option("--kd-topk", "kd_topk", type=click.IntRange(min=1), default=None,
              help="Top-k KD (paper eq. 13-14): P and Q restricted to the teacher's top-K tokens and "
                   "renormalised over them (default: full-vocabulary KD).")
@click.option("--teacher-cache", type=click.Path(), default=None,
              help="A `salt teacher cache` directory: the KD phase reads the teacher's top-k from it "
                   "(no teacher forward; needs --kd-topk K <= the cache's k; instead of --teacher).")
@click.option("--transition", type=click.Choice(TRANSITIONS), default="step",
              show_default=True, help="How ω goes to 0 at the end of the KD phase.")
@click.option("--kd-steps1", type=click.IntRange(min=0), default=None,
              help="n_kd1: where the linear transitions start.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Total training steps n. Required.")
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True, help="Global batch (windows).")
@click.option("--seq-len", type=click.IntRange(min=1), default=64, show_default=True, help="Tokens per window T.")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adafactor", show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Peak learning rate.")
@click.option("--final-lr", type=float, default=1e-4, show_default=True, help="Learning rate at the last step.")
@click.option("--warmup", type=click.IntRange(min=0), default=0, show_default=True, help="Linear warm-up steps.")
@click.option("--clip", type=float, default=1.0, show_default=True, help="Global-norm gradient clipping (0: off).")
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--seed", type=click.IntRange(min=0, max=2**63 - 1), default=0, show_default=True,
              help="Seed of the initial parameters and of the data order.")
@click.option("--mesh", default="data=1,model=1", show_default=True,
              help="Device mesh 'data=D,model=M' (data=-1: all devices).")
@click.option("--subset", type=click.Path(), default=None,
              help="SALT_DS: selection file (.npy window ids) the KD phase draws from.")
@click.option("--exclude", type=click.Path(), default=None, help=".npy window ids never trained on.")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True,
              help="Compute dtype (parameters and loss stay float32).")
@click.option("--kernels", type=click.Choice(KERNELS), default="auto",
              show_default=True,
              help="Attention / KD-loss implementation: pallas (TPU), xla (chunked pure JAX), "
                   "naive (full-size maths); auto = pallas on TPU, xla elsewhere.")
@click.option("--objective", type=click.Choice(OBJECTIVES), default="causal", show_default=True,
              help="causal: next-token LM; ul2: the paper's UL2 mixture (causal, prefix LM, span "
                   "corruption 15%/3 and 50%/32 at 6:2:1:1; loss and KD on targets only; needs a "
                   "store prepared with --sentinels).")
@click.option("--remat/--no-remat", default=False, show_default=True,
              help="Recompute layer activations in the backward.")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="Save every N steps (always at the end, at n_kd and on SIGTERM).")
@click.option("--log-every", type=click.IntRange(min=1), default=10, show_default=True,
              help="Fetch the metrics from the device every N steps (and at checkpoints and the phase "
                   "switch): metrics.jsonl still has one row per step; the host does not wait each step.")
@click.option("--checkpoint-minutes", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Also save when this many minutes passed since the last save (0: off), so an "
                   "interrupted run loses at most that much.")
@click.option("--keep", "keep_checkpoints", callback=_keep, default="",
              help="Comma-separated steps whose checkpoints are kept (besides the latest and n_kd).")
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True,
              help="Microbatches per step (gradients accumulated inside the compiled step, one "
                   "update): the same step as the whole batch, on less memory. Must divide --batch.")
@click.option("--vocab-chunks", type=click.IntRange(min=1), default=None,
              help="Vocabulary-parallel loss on a data-only mesh: the vocabulary in this many chunks, each "
                   "gathered whole on every device in turn (fewer: faster, more memory). Default: on for "
                   "embeddings of 64 MiB or more, about 8192 rows per chunk. Not with --kd-topk.")
@click.option("--runtime", type=click.Choice(RUNTIMES), default="jax",
              show_default=True,
              help="tpu / gpu / cpu: the JAX runtime on that platform's devices (an error if there are "
                   "none); jax: JAX's default platform; reference: the NumPy reference trainer on the "
                   "same batches (tiny models).")
@click.option("--compile-cache", default=None, metavar="DIR",
              help="JAX persistent compilation cache (reused across runs); 'off' disables it. "
                   "Default: $SALT_COMPILE_CACHE, else ~/.cache/salt/jax-compile.")
@click.option("--wandb", default=None, metavar="PROJECT",
              help="Also log the metrics to this Weights & Biases project (optional dependency wandb; "
                   "WANDB_MODE=offline works without a network). TensorBoard files are always written.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint.")
@click.option("--force", is_flag=True, help="Resume even if the configuration changed.")
@click.option("--start-over", "start_over", is_flag=True,
              help="With --resume: when no checkpoint of the run is intact, train it again from step 0 "
                   "in place (the damaged steps are kept aside) instead of refusing.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--progress/--no-progress", default=True, hidden=True)  # older spelling of --quiet
def train(as_json, quiet, progress, config_file, start_over, **options):
    """Train a student (or a teacher: --kd-steps 0) and write checkpoints and metrics.jsonl."""
    from salt.runtime.train.config import COMPILE_CACHE_OFF, default_compile_cache, load_config_file
    from salt.runtime.train.trainer import TrainConfig, TrainError, train as run_train

    if config_file is not None:  # the file's settings, under the flags given explicitly
        from click.core import ParameterSource
        ctx = click.get_current_context()
        try:
            from_file = load_config_file(config_file)
        except TrainError as e:
            raise click.ClickException(str(e)) from None
        for name, value in from_file.items():
            if ctx.get_parameter_source(name) in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP):
                options[name] = value
    missing = [f"--{n.replace('_', '-')}" for n in REQUIRED if options[n] is None]
    if missing:
        raise click.UsageError(f"Missing {', '.join(missing)} (give as flags or in --config)")

    cache = options["compile_cache"]
    if cache is None:
        options["compile_cache"] = default_compile_cache()
    elif cache.strip().lower() in COMPILE_CACHE_OFF:
        options["compile_cache"] = None
    if not options["preset"] and options["init"] is None:
        raise click.UsageError("give --preset NAME, or --init RUN to continue training a run's model")
    options["preset"] = options["preset"] or ""
    cfg = TrainConfig(**options)
    try:
        summary = run_train(cfg, progress=progress and not quiet, start_over=start_over)
    except (TrainError, ValueError) as e:  # bad input: a message, no traceback
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
        if summary.get("interrupted_by") == "SIGINT":
            sys.exit(130)
        return
    final = summary.get("final") or {}
    by = summary.get("interrupted_by")
    status = f"interrupted ({by}), checkpoint saved" if summary["interrupted"] else "done"
    click.echo(f"{status}: {summary['run_dir']} step {summary['last_step']} "
               f"(checkpoint {summary['last_checkpoint']})", err=False)
    if final:
        click.echo(f"final loss {final['loss']:.4f}  ce {final['ce']:.4f}  "
                   f"accuracy {final['accuracy']:.4f}  lr {final['lr']:.3g}")
    sys.stdout.flush()
    if by == "SIGINT":
        sys.exit(130)
