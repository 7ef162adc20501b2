"""``salt eval``: held-out accuracy and log-perplexity, overall and by teacher bucket."""
from __future__ import annotations

import json

import click


@click.command("eval")
@click.option("--run", "run_path", required=True, type=click.Path(),
              help="Run directory or checkpoint path of the model to evaluate.")
@click.option("--step", type=int, default=None, help="Checkpoint step (default: latest).")
@click.option("--data", "data_dir", type=click.Path(), default=None,
              help="Token store directory (with --tasks: the tokenizer's store; default: the run's).")
@click.option("--seq-len", type=int, default=None,
              help="Window length T (default: the run's training seq_len).")
@click.option("--teacher", type=click.Path(), default=None,
              help="Teacher run/checkpoint whose per-window loss defines easy/medium/hard buckets.")
@click.option("--teacher-step", type=int, default=None, help="Teacher checkpoint step (default: latest).")
@click.option("--max-windows", type=int, default=None, help="Evaluate at most this many windows.")
@click.option("--batch", type=int, default=32, show_default=True, help="Windows per forward pass.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--tasks", default=None,
              help="Few-shot tasks of lm-evaluation-harness, comma-separated (needs salt[eval]); "
                   "writes the harness's results JSON instead of the held-out metrics.")
@click.option("--tasks-dir", type=click.Path(), default=None, help="Directory of extra task YAML files.")
@click.option("--num-fewshot", type=click.IntRange(min=0), default=None, help="Few-shot examples per task.")
@click.option("--limit", type=float, default=None, help="At most this many documents per task (< 1: a fraction).")
@click.option("--out", type=click.Path(), default=None, help="With --tasks: write the JSON here (default: stdout).")
def evaluate(run_path, step, data_dir, seq_len, teacher, teacher_step, max_windows, batch, as_json,
             quiet, tasks, tasks_dir, num_fewshot, limit, out):
    """Next-token accuracy and log-perplexity on the validation split (paper Table 1), and the
    same in easy / medium / hard tertiles of windows ranked by a teacher's loss (paper §5.4);
    with --tasks, few-shot tasks through lm-evaluation-harness."""
    if tasks is not None:
        return _evaluate_tasks(run_path, step, data_dir, tasks, tasks_dir, num_fewshot, limit, batch, out)
    if data_dir is None:
        raise click.UsageError("Missing option '--data' (the token store of the held-out split).")
    from salt.runtime.eval.evaluate import evaluate_checkpoints, format_table

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


def _evaluate_tasks(run_path, step, data_dir, tasks, tasks_dir, num_fewshot, limit, batch, out):
    import pathlib

    if out is not None and pathlib.Path(out).exists():
        raise click.ClickException(f"--out {out!r} already exists; choose another path")
    try:
        from salt.runtime.eval import harness
    except ModuleNotFoundError as e:
        raise click.ClickException(f"--tasks needs the optional extra salt[eval] "
                                   f"(pip install 'salt[eval]'): {e}") from None
    if limit is not None and limit >= 1:
        limit = int(limit)
    try:
        results = harness.evaluate_tasks(run_path, step, tasks=tasks.split(","), tasks_dir=tasks_dir,
                                         store=data_dir, num_fewshot=num_fewshot, limit=limit,
                                         batch_size=batch)
    except (ValueError, OSError) as e:  # bad input, or a task's data unreachable (offline)
        raise click.ClickException(str(e)) from None
    if out is None:
        click.echo(harness.results_json(results))
        return
    harness.write_results(results, out)
    click.echo(f"wrote {out}", err=True)
