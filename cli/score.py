"""``salt score`` (eq. 11 selection score of every candidate window) and ``salt select`` (top-m)."""
from __future__ import annotations

import click

from salt.reference.config import PAPER_K
from salt.runtime.select.score import TOPK_MODES


@click.command("score")
@click.option("--teacher", required=True, type=click.Path(),
              help="Teacher run directory or checkpoint path (an EARLY checkpoint of the SLM).")
@click.option("--teacher-step", type=int, default=None,
              help="Checkpoint step of the teacher run (default: its latest).")
@click.option("--data", "data_dir", required=True, type=click.Path(), help="Token store directory.")
@click.option("--k", type=int, default=PAPER_K, show_default=True, help="Top-k of eq. 11.")
@click.option("--seq-len", type=int, required=True, help="Window length T (the student's).")
@click.option("--exclude-run", "exclude_runs", multiple=True, type=click.Path(),
              help="Also leave out the windows this run's loader served (repeatable).")
@click.option("--exclude", "exclude_files", multiple=True, type=click.Path(),
              help="Also leave out the window ids in this .npy file (repeatable).")
@click.option("--no-exclude-teacher-seen", is_flag=True,
              help="Keep the windows the teacher itself trained on in the pool.")
@click.option("--topk-mode", type=click.Choice(TOPK_MODES), default="zero", show_default=True,
              help="Positions outside the top-k count as 0 (eq. 11) or are dropped.")
@click.option("--max-candidates", type=int, default=None,
              help="Score only a seeded uniform random sample of this many pool windows.")
@click.option("--batch", type=int, default=32, show_default=True, help="Windows per forward pass.")
@click.option("--out", required=True, type=click.Path(), help="Output .npz of window ids and scores.")
@click.option("--overwrite", is_flag=True,
              help="Replace a scores file SALT wrote at --out / discard stale partial results.")
@click.option("--force", "overwrite_alias", is_flag=True, hidden=True)  # older spelling of --overwrite
@click.option("--quiet", is_flag=True, help="No progress bar.")
def score(teacher, teacher_step, data_dir, k, seq_len, exclude_runs, exclude_files,
          no_exclude_teacher_seen, topk_mode, max_candidates, batch, out, overwrite, overwrite_alias, quiet):
    """Score every candidate training window with the teacher (paper eq. 11).

    The pool is every training window minus those the teacher saw (derived from its run's
    recorded loader config and step) and any --exclude-run / --exclude windows.  Resumable:
    re-running the same command continues where an interrupted run stopped.
    """
    from salt.runtime.select.score import ScoreJob, score as run_score

    job = ScoreJob(teacher=teacher, data=data_dir, out=out, k=k, seq_len=seq_len, mode=topk_mode,
                   batch=batch, teacher_step=teacher_step, exclude_runs=tuple(exclude_runs),
                   exclude_files=tuple(exclude_files),
                   exclude_teacher_seen=not no_exclude_teacher_seen,
                   max_candidates=max_candidates, force=overwrite or overwrite_alias)
    try:
        summary = run_score(job, progress=not quiet)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"scored {summary['n_scored']} windows ({summary['n_excluded']} excluded) with "
               f"{summary['teacher']}, k={k}, mode={topk_mode} -> {summary['out']}")
    for note in summary["notes"]:
        click.echo(f"note: {note}")


@click.command("select")
@click.option("--scores", "scores_path", required=True, type=click.Path(),
              help="Scores .npz written by `salt score`.")
@click.option("--top-m", type=click.IntRange(min=1), required=True, help="Number of windows to keep.")
@click.option("--out", required=True, type=click.Path(), help="Output .npy of window ids (int64).")
@click.option("--overwrite", is_flag=True, help="Replace a selection file SALT wrote at --out.")
@click.option("--force", "overwrite_alias", is_flag=True, hidden=True)  # older spelling of --overwrite
def select(scores_path, top_m, out, overwrite, overwrite_alias):
    """Keep the top-m windows by score (ties: window id ascending) for `salt train --subset`."""
    from salt.runtime.select.score import select as run_select

    try:
        ids = run_select(scores_path, top_m, out, force=overwrite or overwrite_alias)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"selected {ids.size} windows -> {out}")
