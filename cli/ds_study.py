"""``salt ds-study``: SALT_DS re-trained per selection setting on a finished reproduction (claim (c))."""
from __future__ import annotations

import click

from salt.runtime.experiments.ds_study import DEFAULT_SETTINGS, render_table, run_study
from salt.runtime.experiments.students import Interrupted


@click.command("ds-study")
@click.option("--reproduction", "repro", required=True, type=click.Path(),
              help="A finished `salt reproduce` directory (of tuning seeds: no verdict should use them).")
@click.option("--setting", "specs", multiple=True,
              help="A selection setting, the reproduction's with changes: k=K, step=S, pool=N|all, m=M, "
                   "mode=exclude, random (the control), comma-separated; repeatable.  "
                   f"[default: {' '.join(DEFAULT_SETTINGS)}]")
@click.option("--out", required=True, type=click.Path(),
              help="Study directory (new, or one of this study to resume or extend).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def ds_study(repro, specs, out, quiet):
    """Score, select and train one SALT_DS student per setting and seed of the reproduction, and
    compare each with the reproduction's SALT and BASELINE: OUT/table.md, OUT/results.json."""
    try:
        results = run_study(repro, out, specs or DEFAULT_SETTINGS, progress=not quiet)
    except Interrupted as e:
        click.echo(f"Error: {e}", err=True)
        raise SystemExit(e.exit_code) from None
    except (ValueError, FileNotFoundError, OSError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(render_table(results))
