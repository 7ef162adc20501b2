"""``salt reproduce``: the paper's whole comparison (SLM, BASELINE, RKD, SALT, SALT_DS) end to end."""
from __future__ import annotations

import click


@click.command("reproduce")
@click.option("--out", default="salt-reproduce", show_default=True, type=click.Path(),
              help="Output directory (data, runs, scores, report.md, plots).")
@click.option("--data", "data_dir", default=None, type=click.Path(),
              help="Use this prepared token store instead of preparing the embedded corpus.")
@click.option("--preset-size", "size", type=click.Choice(["small", "tiny"]), default="small",
              show_default=True, help="Experiment size: small (~20 min on a 2-core CPU) or tiny.")
@click.option("--tiny", is_flag=True, help="Shorthand for --preset-size tiny (for tests).")
@click.option("--steps", type=int, default=None, help="Student steps n (override the size's).")
@click.option("--kd-steps", type=int, default=None, help="KD steps n_kd of SALT / SALT_DS.")
@click.option("--teacher-steps", type=int, default=None, help="SLM training steps.")
@click.option("--early-step", type=int, default=None, help="Early SLM checkpoint used for scoring.")
@click.option("--batch", type=int, default=None, help="Global batch (windows per step).")
@click.option("--seq-len", type=int, default=None, help="Window length T.")
@click.option("--eval-every", type=int, default=None, help="Checkpoint / evaluation interval.")
@click.option("--eval-windows", type=int, default=None, help="Held-out windows to evaluate.")
@click.option("--lr", type=float, default=None, help="Peak learning rate.")
@click.option("--k", type=int, default=None, help="Top-k of the selection score (eq. 11).")
@click.option("--seed", type=int, default=None, help="Seed (initialisation and data order).")
@click.option("--force", is_flag=True, help="Start over in --out even if its settings differ.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def reproduce(out, data_dir, size, tiny, steps, kd_steps, teacher_steps, early_step, batch, seq_len,
              eval_every, eval_windows, lr, k, seed, force, quiet):
    """Run the paper's comparison end to end and write OUT/report.md.

    Prepares data (unless --data), trains the SLM (keeping an early checkpoint), scores and
    selects with the early checkpoint, trains BASELINE, RKD, SALT and SALT_DS students with the
    same data order and budget, evaluates them at n_kd and at the end, and writes the report with
    tables, efficiency accounting and plots.  Re-running skips finished stages.
    """
    from salt.runtime.reproduce import config_for, run

    try:
        cfg = config_for("tiny" if tiny else size, out=out, data=data_dir, steps=steps,
                         kd_steps=kd_steps, teacher_steps=teacher_steps, early_step=early_step,
                         batch=batch, seq_len=seq_len, eval_every=eval_every,
                         eval_windows=eval_windows, lr=lr, k=k, seed=seed)
        results = run(cfg, force=force, progress=not quiet)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"report: {results['report']}")
