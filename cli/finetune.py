"""``salt finetune``: supervised fine-tuning on prompt/completion JSONL (see salt.runtime.train.finetune)."""
from __future__ import annotations

import json

import click

from salt.cli.config_options import config_options
from salt.runtime.train.finetune import FinetuneConfig


@click.command("finetune")
@config_options(FinetuneConfig)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--progress/--no-progress", default=True, hidden=True)  # older spelling of --quiet
def finetune(as_json, quiet, progress, **options):
    """Fine-tune a checkpoint on prompt/completion pairs (loss on the completions only), then
    decode the held-out prompts greedily and report exact match and ROUGE (paper Table 3)."""
    from salt.runtime.train.finetune import TrainError, finetune as run_finetune

    try:
        summary = run_finetune(FinetuneConfig(**options), progress=progress and not quiet)
    except TrainError as e:  # bad input: a message, no traceback
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
        return
    status = "interrupted (SIGTERM), checkpoint saved" if summary["interrupted"] else "done"
    click.echo(f"{status}: {summary['out']} step {summary['last_step']} "
               f"(checkpoint {summary['last_checkpoint']}; {summary['n_train']} training examples)")
    if summary["first"] and summary["final"]:
        click.echo(f"loss {summary['first']['loss']:.4f} (step {summary['first']['step']}) -> "
                   f"{summary['final']['loss']:.4f} (step {summary['final']['step']})")
    ev = summary.get("eval")
    if ev:
        click.echo(f"held-out ({ev['n']} examples): exact match {ev['exact_match']:.4f}  rouge1 "
                   f"{ev['rouge1']:.4f}  rouge2 {ev['rouge2']:.4f}  rougeL {ev['rougeL']:.4f}")
