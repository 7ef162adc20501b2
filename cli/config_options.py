"""Command-line options generated from a configuration dataclass: each field's type, default and
metadata (group, help, choices, bounds, file or not, flag name; see
:func:`salt.runtime.train.config._opt`) become one click option, so a default or a help text is
written once, next to the field."""
from __future__ import annotations

import dataclasses
import types
import typing

import click


def _base(hint):
    """``int | None`` -> int."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [h for h in typing.get_args(hint) if h is not type(None)]
        return args[0]
    return hint


def _step_list(ctx, param, value):
    if not value:
        return ()
    if isinstance(value, (tuple, list)):
        return tuple(value)
    try:
        steps = tuple(sorted({int(v) for v in value.split(",") if v.strip()}))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated step numbers, got {value!r}") from None
    if any(s < 1 for s in steps):
        raise click.BadParameter(f"step numbers must be >= 1, got {value!r}")
    return steps


def _option(field: dataclasses.Field, hint, required: bool):
    meta = field.metadata
    flag = meta.get("flag") or "--" + field.name.replace("_", "-")
    default = None if required else field.default
    kwargs = dict(help=meta["help"], metavar=meta.get("metavar"))
    base = _base(hint)
    if base is bool:  # a flag; "--x/--no-x" in the metadata for both forms
        if "/" in flag:
            return click.option(flag, field.name, default=field.default, show_default=True, **kwargs)
        if field.default:
            raise TypeError(f"{field.name}: a flag that defaults to true needs a --no- form")
        return click.option(flag, field.name, is_flag=True, default=False, **kwargs)
    if base is tuple:  # step numbers, comma-separated
        return click.option(flag, field.name, default="", callback=_step_list, **kwargs)
    if meta.get("choices") is not None:
        kind = click.Choice(meta["choices"])
    elif meta.get("path"):
        kind = click.Path()
    elif base is int and (meta.get("min") is not None or meta.get("max") is not None):
        kind = click.IntRange(min=meta.get("min"), max=meta.get("max"))
    elif base is float and meta.get("min") is not None:
        kind = click.FloatRange(min=meta["min"])
    else:
        kind = base
    return click.option(flag, field.name, type=kind, default=default,
                        show_default=default is not None and default != "", **kwargs)


def config_options(cls, *, required: tuple = ()):
    """A decorator adding one click option per field of the dataclass ``cls`` (in field order);
    the fields in ``required`` get no default on the command line (the command checks them)."""
    hints = typing.get_type_hints(cls)

    def decorate(command):
        for field in reversed(dataclasses.fields(cls)):
            command = _option(field, hints[field.name], field.name in required)(command)
        return command
    return decorate
