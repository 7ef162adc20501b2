"""``salt xi``: the martingale differences ξ_t of a run's loss (appendix L; docs/xi.md)."""
from __future__ import annotations

import click


def _lengths(ctx, param, value):
    try:
        lengths = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not lengths or min(lengths) < 1:
        raise click.BadParameter(f"expected positive integers, got {value!r}")
    return lengths


@click.command("xi")
@click.option("--run", "run_path", required=True, type=click.Path(),
              help="The run analysed (the student f): run directory or checkpoint path.")
@click.option("--step", type=int, default=None, help="Its checkpoint step (default: latest).")
@click.option("--oracle", required=True, type=click.Path(),
              help="The run whose model is the oracle P* (e.g. a reproduction's SLM).")
@click.option("--oracle-step", type=int, default=None, help="The oracle's step (default: latest).")
@click.option("--data", "data_dir", required=True, type=click.Path(),
              help="Token store whose validation windows are used.")
@click.option("--lengths", default="16,32,64", show_default=True, callback=_lengths,
              help="Sequence lengths T (targets per window), comma-separated.")
@click.option("--windows", "n_windows", type=click.IntRange(min=1), default=32, show_default=True,
              help="Held-out windows per T.")
@click.option("--n-com", type=click.IntRange(min=2), default=8, show_default=True,
              help="Completions sampled from the oracle per prefix.")
@click.option("--temperature", type=float, default=1.0, show_default=True,
              help="Sampling temperature of the oracle (1: P* itself).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-rows", type=click.IntRange(min=1), default=256, show_default=True,
              help="Sequences per sampling/scoring batch.")
@click.option("--out", required=True, type=click.Path(), help="New (absent or empty) output directory.")
def xi(run_path, step, oracle, oracle_step, data_dir, lengths, n_windows, n_com, temperature, seed,
       batch_rows, out):
    """Plug-in estimate of ξ_t (paper eq. 56): the mean |ξ̂_t| table by prefix length t and
    sequence length T (xi.md, xi.json) and histograms of ξ̂_t (xi_hist_T*.png)."""
    from salt.runtime.eval.xi import run_xi

    try:
        results = run_xi(run_path, oracle, data_dir, out, student_step=step, oracle_step=oracle_step,
                         lengths=lengths, n_windows=n_windows, n_com=n_com, temperature=temperature,
                         seed=seed, batch_rows=batch_rows,
                         progress=lambda msg: click.echo(msg, err=True))
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    for s in results["by_T"]:
        click.echo(f"T = {s['T']}: mean |xi_t| over all t {s['mean_abs_xi_all_t']:.4f} "
                   f"({s['n_windows']} windows, {s['n_com']} completions)")
    click.echo(f"wrote {out}/xi.md", err=True)
