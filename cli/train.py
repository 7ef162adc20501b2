"""``salt train``: BASELINE / RKD / SALT / SALT_DS training (see salt.runtime.train.trainer)."""
from __future__ import annotations

import json
import sys

import click

from salt.cli.config_options import config_options
from salt.runtime.train.config import TrainConfig


REQUIRED = ("data", "out", "steps")  # as flags or in --config (and --preset or --init)


@click.command("train")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="YAML or JSON file of settings in groups (model, data, kd, optimizer, run; docs/workflow.md), "
                   "or a run's run_config.json (re-run it); flags given explicitly override it.")
@config_options(TrainConfig, required=REQUIRED + ("preset",))
@click.option("--start-over", "start_over", is_flag=True,
              help="With --resume: when no checkpoint of the run is intact, train it again from step 0 "
                   "in place (the damaged steps are kept aside) instead of refusing.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--progress/--no-progress", default=True, hidden=True)  # older spelling of --quiet
def train(as_json, quiet, progress, config_file, start_over, **options):
    """Train a student (or a teacher: --kd-steps 0) and write checkpoints and metrics.jsonl."""
    from salt.runtime.train.config import COMPILE_CACHE_OFF, default_compile_cache
    from salt.runtime.train.config_file import load_config_file
    from salt.runtime.train.trainer import TrainError, train as run_train

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
