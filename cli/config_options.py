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
    kwargs = dict(help=meta["help"], metavar=meta.get("metavar"))
    default = None if required or field.default is dataclasses.MISSING else field.default
    if field.default is dataclasses.MISSING and not required:
        # no default and not filled in by the command (e.g. from --config); click 8.5 takes an
        # explicit default=None as a given value, so a required option gets no default at all
        kwargs["required"] = True
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
    if not kwargs.get("required"):
        kwargs.update(default=default, show_default=default is not None and default != "")
    return click.option(flag, field.name, type=kind, **kwargs)


def config_options(cls, *, required: tuple = ()):
    """A decorator adding one click option per field of the dataclass ``cls`` (in field order).
    A field without a default is a required option, unless it is in ``required``: then it has no
    default on the command line and the command checks it (it may come from a file)."""
    hints = typing.get_type_hints(cls)

    def decorate(command):
        for field in reversed(dataclasses.fields(cls)):
            command = _option(field, hints[field.name], field.name in required)(command)
        return command
    return decorate
