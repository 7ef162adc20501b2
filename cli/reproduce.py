"""``salt reproduce``: the paper's whole comparison (SLM, BASELINE, RKD, SALT, SALT_DS) end to end."""
from __future__ import annotations

import os
import sys

import click

from salt.runtime.experiments.presets import SIZES, TRANSITIONS
from salt.runtime.train.teacher_cache import DEFAULT_TOP_K as DEFAULT_CACHE_TOPK


def _rho_list(value):
    if value is None:
        return None
    try:
        rhos = [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected a number or comma-separated numbers, got {value!r}",
                                 param_hint="--rho") from None
    if not rhos:
        raise click.BadParameter("expected at least one value", param_hint="--rho")
    return rhos


@click.command("reproduce")
@click.option("--out", default="salt-reproduce", show_default=True, type=click.Path(),
              help="Output directory (data, runs, scores, report.md, plots).")
@click.option("--data", "data_dir", default=None, type=click.Path(),
              help="Use this prepared token store instead of preparing the embedded corpus.")
@click.option("--teacher", "teacher", default=None, type=click.Path(),
              help="Use this SLM run (e.g. made by `salt import hf`; its newest checkpoint) as the "
                   "teacher instead of training one; needs --data prepared with its tokenizer.  "
                   "Without --early-teacher the early-checkpoint selection and SALT_DS are not run.")
@click.option("--early-teacher", "early_teacher", default=None, type=click.Path(),
              help="With --teacher: the run whose newest checkpoint scores the windows for SALT_DS.")
@click.option("--size", "size", type=click.Choice(sorted(SIZES)), default="small",
              show_default=True,
              help="Named experiment (salt.runtime.experiments.presets): small (the default: ρ = 1, "
                   "searched at this scale, with the paper's ρ = 0.25 arm beside it), small-rho1 "
                   "(~13 min; ρ = 1 alone, a weaker SLM), medium (~1 h 45 min), quick "
                   "(smoke run, too small "
                   "to test the claims), tiny (tests), paper-2.8b / paper-8.6b (the paper's runs); "
                   "measured outcomes in docs/reproduction.md.")
@click.option("--preset-size", "size_alias", type=click.Choice(sorted(SIZES)), default=None,
              hidden=True)
@click.option("--tiny", is_flag=True, help="Shorthand for --size tiny (for tests).")
@click.option("--seeds", type=int, default=None,
              help="Independent student seeds (initialisation and data order): seed, seed+1, ...")
@click.option("--seed", type=click.IntRange(min=0, max=2**62), default=None,
              help="First seed (also the SLM's) [default: 1 for small and small-rho1, whose "
                   "search used seeds 0 and 101; else 0].")
@click.option("--omega", type=float, default=None, help="Distillation weight ω (paper 0.667).")
@click.option("--rho", default=None, callback=lambda ctx, param, value: _rho_list(value),
              help="Teacher temperature factor ρ (paper 0.25), or a comma-separated list: one arm "
                   "(RKD, SALT, SALT_DS) per ρ, sharing the SLM, the selection and BASELINE; the "
                   "first leads the report (size small: 1,0.25).")
@click.option("--transition", type=click.Choice(TRANSITIONS), default=None,
              help="ω schedule at the end of the KD phase (paper: step).")
@click.option("--kd-steps1", type=int, default=None,
              help="End of the constant-ω part for the linear transitions.")
@click.option("--teacher-preset", default=None, help="SLM model preset (see `salt presets`).")
@click.option("--student-preset", default=None, help="Student model preset.")
@click.option("--steps", type=int, default=None, help="Student steps n (override the size's).")
@click.option("--kd-steps", type=int, default=None, help="KD steps n_kd of SALT / SALT_DS.")
@click.option("--teacher-steps", type=int, default=None, help="SLM training steps.")
@click.option("--teacher-batch", type=int, default=None, help="SLM batch (windows per step).")
@click.option("--early-step", type=int, default=None, help="Early SLM checkpoint used for scoring.")
@click.option("--batch", type=int, default=None, help="Student batch (windows per step).")
@click.option("--seq-len", type=int, default=None, help="Window length T.")
@click.option("--eval-every", type=int, default=None, help="Checkpoint / evaluation interval.")
@click.option("--eval-windows", type=int, default=None, help="Held-out windows to evaluate.")
@click.option("--lr", type=float, default=None, help="Peak learning rate.")
@click.option("--k", type=int, default=None, help="Top-k of the selection score (eq. 11).")
@click.option("--kd-topk", "kd_topk", type=click.IntRange(min=1), default=None,
              help="Top-K KD (paper eq. 13-14) for RKD, SALT, SALT_DS (default: full-vocabulary KD).")
@click.option("--teacher-cache", "teacher_cache", type=click.Choice(["auto"]), default=None,
              help="auto: build teacher caches once from the SLM (`salt teacher cache`: one per seed "
                   "for the whole pool's order, one for SALT_DS's selected order) and run every KD "
                   "phase from them, with no teacher forward.  The cache holds the top-K: implies "
                   "top-K KD (--kd-topk, default 64).")
@click.option("--side-by-side/--sequential", "side_by_side", default=None,
              help="Train students two at a time, one core each (default), or one after the other.")
@click.option("--overwrite", is_flag=True,
              help="Start over in --out (a reproduction SALT wrote) even if its settings differ.")
@click.option("--force", "overwrite_alias", is_flag=True, hidden=True)  # older spelling of --overwrite
@click.option("--start-over", "start_over", is_flag=True,
              help="When a run of the reproduction saved checkpoints and none of them is intact, train "
                   "it again from step 0 in place (the damaged steps are kept aside) instead of refusing.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def reproduce(out, data_dir, size, size_alias, tiny, overwrite, overwrite_alias, start_over, quiet, **overrides):
    """Run the paper's comparison end to end and write OUT/report.md.

    Prepares data (unless --data), trains the SLM (keeping an early checkpoint), scores and
    selects with the early checkpoint, trains BASELINE, RKD, SALT (forked from RKD at n_kd) and
    SALT_DS students per seed with the same data order and budget, times KD against standard
    steps, evaluates every checkpoint and writes the report: a verdict per claim of the paper
    with per-seed and pooled paired differences, tables and plots.  Re-running skips finished
    stages.
    """
    from salt.runtime.experiments.presets import config_for
    from salt.runtime.experiments.reproduce import run
    from salt.runtime.experiments.students import Interrupted

    if overrides.get("teacher_cache"):
        overrides["teacher_cache"] = True
        if overrides.get("kd_topk") is None:
            overrides["kd_topk"] = DEFAULT_CACHE_TOPK
    size = "tiny" if tiny else (size_alias or size)
    for key in ("teacher", "early_teacher"):  # recorded absolute: a resume from elsewhere matches
        if overrides.get(key) is not None:
            overrides[key] = os.path.abspath(overrides[key])
    if overrides.get("teacher") is not None:
        for key in ("teacher_preset", "teacher_steps", "teacher_batch", "early_step"):
            if overrides.get(key) is not None:
                raise click.UsageError(f"--{key.replace('_', '-')} describes the SLM this command trains; "
                                       "with --teacher none is trained")
    try:
        cfg = config_for(size, out=out, data=data_dir, **overrides)
        results = run(cfg, force=overwrite or overwrite_alias, progress=not quiet, start_over=start_over)
    except Interrupted as e:  # the students saved their checkpoints: 143 (SIGTERM) / 130 (Ctrl-C)
        click.echo(str(e), err=True)
        sys.exit(e.exit_code)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"report: {results['report']}")
