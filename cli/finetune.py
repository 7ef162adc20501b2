"""``salt finetune``: supervised fine-tuning on prompt/completion JSONL (see salt.runtime.train.finetune)."""
from __future__ import annotations

import json

import click

from salt.runtime.train.config import DTYPES
from salt.runtime.train.optim import OPTIMIZERS


@click.command("finetune")
@click.option("--run", required=True, type=click.Path(), help="Run directory or checkpoint to start from.")
@click.option("--step", type=int, default=None, help="Checkpoint step of --run (default: latest).")
@click.option("--data", required=True, type=click.Path(),
              help="JSONL file, one {\"prompt\": ..., \"completion\": ...} per line.")
@click.option("--out", required=True, type=click.Path(), help="Output run directory (checkpoints, metrics, eval).")
@click.option("--store", type=click.Path(), default=None,
              help="Token store whose tokenizer to use (default: the one --run was trained on).")
@click.option("--eval-data", type=click.Path(), default=None,
              help="Held-out JSONL to evaluate on (default: --eval-fraction of --data, never trained on).")
@click.option("--eval-fraction", type=float, default=0.1, show_default=True,
              help="Share of --data held out for evaluation when --eval-data is not given.")
@click.option("--steps", type=click.IntRange(min=1), default=1000, show_default=True, help="Optimizer steps.")
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True, help="Examples per step.")
@click.option("--seq-len", type=click.IntRange(min=2), default=None,
              help="Tokens per example, padded (default: the base run's seq_len).")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adafactor", show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True, help="Peak learning rate.")
@click.option("--final-lr", type=float, default=1e-5, show_default=True,
              help="Learning rate at the last step (cosine).")
@click.option("--warmup", type=click.IntRange(min=0), default=200, show_default=True, help="Linear warm-up steps.")
@click.option("--clip", type=float, default=1.0, show_default=True, help="Global-norm gradient clipping (0: off).")
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--seed", type=click.IntRange(min=0, max=2**63 - 1), default=0, show_default=True,
              help="Seed of the example order and the held-out split.")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True)
@click.option("--kernels", type=click.Choice(["auto", "xla", "naive"]), default="auto", show_default=True,
              help="Attention implementation.")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="Save every N steps (always at the end and on SIGTERM).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
              help="Greedy decoding budget on the held-out split (default: longest completion + 1).")
@click.option("--eval-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Prompts per decoding batch.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint.")
@click.option("--force", is_flag=True, help="Resume even if the configuration changed.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--progress/--no-progress", default=True, hidden=True)  # older spelling of --quiet
def finetune(as_json, quiet, progress, **options):
    """Fine-tune a checkpoint on prompt/completion pairs (loss on the completions only), then
    decode the held-out prompts greedily and report exact match and ROUGE (paper Table 3)."""
    from salt.runtime.train.finetune import FinetuneConfig, TrainError, finetune as run_finetune

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
