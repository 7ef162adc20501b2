"""``salt golden generate|check``: write or verify the reference golden values (tests/golden)."""
from __future__ import annotations

import pathlib

import click

DIR_HELP = ("Folder of the golden .npz files (default: tests/golden in the current directory or "
            "a parent, else in the repository of the installed package).")


def _resolve_dir(directory):
    from salt.reference.golden import find_golden_dir  # noqa: PLC0415 (lazy: fast --help)

    if directory is not None:
        return pathlib.Path(directory)
    try:
        return find_golden_dir()
    except ValueError as e:
        raise click.UsageError(str(e)) from None


def _names(only):
    from salt.reference.golden import golden_files  # noqa: PLC0415

    known = golden_files()
    for name in only:
        if name not in known:
            raise click.BadParameter(f"{name!r} is not a golden file; choose from {', '.join(known)}",
                                     param_hint="--only")
    return list(only) or None


@click.group("golden")
def golden():
    """Generate or check the reference golden values."""


@golden.command("generate")
@click.option("--dir", "directory", type=click.Path(file_okay=False), default=None, help=DIR_HELP)
@click.option("--only", multiple=True, help="Only this file (repeatable), e.g. losses.npz.")
def generate_cmd(directory, only):
    """Recompute every golden file from fixed seeds and write it (atomically)."""
    from salt.reference.golden import generate  # noqa: PLC0415

    folder = _resolve_dir(directory)
    if folder.exists() and not folder.is_dir():
        raise click.BadParameter(f"{folder} is not a folder", param_hint="--dir")
    try:
        written = generate(folder, _names(only))
    except OSError as e:
        raise click.ClickException(f"cannot write golden files to {folder}: {e}") from None
    total = sum(p.stat().st_size for p in written)
    for p in written:
        click.echo(f"wrote {p} ({p.stat().st_size:,} bytes)")
    click.echo(f"{len(written)} files, {total:,} bytes")


@golden.command("check")
@click.option("--dir", "directory", type=click.Path(file_okay=False), default=None, help=DIR_HELP)
@click.option("--only", multiple=True, help="Only this file (repeatable), e.g. losses.npz.")
@click.option("--verbose", "-v", is_flag=True, help="Print every key, not only drifted ones.")
def check_cmd(directory, only, verbose):
    """Recompute every golden value and report drift per file/key; exit 1 on any drift."""
    from salt.reference.golden import TOLERANCES, DEFAULT_TOL, check  # noqa: PLC0415

    folder = _resolve_dir(directory)
    if not folder.is_dir():
        raise click.UsageError(f"golden folder {folder} does not exist (run `salt golden generate`)")
    try:
        rows = check(folder, _names(only))
    except (OSError, ValueError) as e:
        raise click.ClickException(f"cannot read golden files in {folder}: {e}") from None
    by_file: dict[str, list] = {}
    for r in rows:
        by_file.setdefault(r.file, []).append(r)
    n_bad = 0
    for name, file_rows in by_file.items():
        bad = [r for r in file_rows if not r.ok]
        n_bad += len(bad)
        worst_abs = max(r.max_abs for r in file_rows)
        worst_rel = max(r.max_rel for r in file_rows)
        status = "DRIFT" if bad else "ok"
        click.echo(f"{status:5} {name}: {len(file_rows)} keys, max abs {worst_abs:.3g}, "
                   f"max rel {worst_rel:.3g} (tolerance {TOLERANCES.get(name, DEFAULT_TOL):g})")
        for r in file_rows if verbose else bad:
            note = f"  [{r.note}]" if r.note else ""
            click.echo(f"      {'ok' if r.ok else 'DRIFT'} {r.key}: max abs {r.max_abs:.3g}, "
                       f"max rel {r.max_rel:.3g}{note}")
    if n_bad:
        raise click.ClickException(f"{n_bad} golden value(s) drifted in {folder}")
    click.echo(f"all golden values match ({len(rows)} keys in {len(by_file)} files)")
