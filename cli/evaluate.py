"""``salt eval``: held-out accuracy and log-perplexity, overall and by teacher bucket."""
from __future__ import annotations

import json

import click


@click.command("eval")
@click.option("--run", "run_path", required=True, type=click.Path(),
              help="Run directory or checkpoint path of the model to evaluate.")
@click.option("--step", type=int, default=None, help="Checkpoint step (default: latest).")
@click.option("--data", "data_dir", required=True, type=click.Path(), help="Token store directory.")
@click.option("--seq-len", type=int, default=None,
              help="Window length T (default: the run's training seq_len).")
@click.option("--teacher", type=click.Path(), default=None,
              help="Teacher run/checkpoint whose per-window loss defines easy/medium/hard buckets.")
@click.option("--teacher-step", type=int, default=None, help="Teacher checkpoint step (default: latest).")
@click.option("--max-windows", type=int, default=None, help="Evaluate at most this many windows.")
@click.option("--batch", type=int, default=32, show_default=True, help="Windows per forward pass.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def evaluate(run_path, step, data_dir, seq_len, teacher, teacher_step, max_windows, batch, as_json,
             quiet):
    """Next-token accuracy and log-perplexity on the validation split (paper Table 1), and the
    same in easy / medium / hard tertiles of windows ranked by a teacher's loss (paper §5.4)."""
    from salt.runtime.evaluate import evaluate_checkpoints, format_table

    try:
        result = evaluate_checkpoints(run_path, step, data_dir=data_dir, seq_len=seq_len,
                                      teacher=teacher, teacher_step=teacher_step,
                                      max_windows=max_windows, batch_size=batch, progress=not quiet)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{result['model']['path']} @ step {result['model']['step']}  "
               f"({result['n_windows']} windows x {result['seq_len']} tokens)")
    rows = [("model", result["metrics"])]
    if "teacher_metrics" in result:
        rows.append(("teacher", result["teacher_metrics"]))
    click.echo(format_table(rows))
