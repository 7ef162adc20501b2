"""``salt train --config FILE``: a run's settings from a YAML or JSON file in groups (model, data,
kd, optimizer, run: the groups of :class:`~salt.runtime.train.config.TrainConfig`'s fields), or a
run's ``run_config.json`` (re-run a run).  docs/workflow.md shows the format."""
from __future__ import annotations

import difflib
import json
import pathlib
import typing

import yaml

from salt.runtime.train.config import GROUPS, TrainConfig, TrainError, type_name, type_ok



def _unknown(key: str, known, where: str) -> TrainError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return TrainError(f"{where}: unknown key {key!r}{hint}; known: {', '.join(known)}")


def load_config_file(path) -> dict:
    """The TrainConfig fields a ``--config`` file sets, flat, type-checked: nested groups
    (:data:`GROUPS`; YAML for ``*.yaml`` / ``*.yml``, else JSON), or a run's ``run_config.json``
    (its flat ``train`` record: re-run a run).  An unknown key, a key in the wrong group or a
    value of the wrong type is a :class:`TrainError` naming it."""
    path = pathlib.Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TrainError(f"--config {str(path)!r}: unreadable ({getattr(e, 'strerror', None) or e})") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            doc = yaml.safe_load(text)
        else:
            doc = json.loads(text)
    except Exception as e:  # yaml.YAMLError, json.JSONDecodeError, RecursionError
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        kind = "YAML" if path.suffix.lower() in (".yaml", ".yml") else "JSON"
        raise TrainError(f"--config {str(path)!r}: not valid {kind} ({first})") from None
    if not isinstance(doc, dict):
        raise TrainError(f"--config {str(path)!r}: expected a mapping of groups ({', '.join(GROUPS)})")
    types_ = typing.get_type_hints(TrainConfig)
    flat: dict = {}
    if isinstance(doc.get("train"), dict) and "model" in doc and "tokenizer_sha256" in doc:  # a run_config.json
        items = [(f"train.{k}", k, v) for k, v in doc["train"].items()]
        for where, key, _ in items:
            if key not in types_:
                raise _unknown(key, types_, f"--config {str(path)!r}: {where}")
    else:
        items = []
        for group, body in doc.items():
            if group not in GROUPS:
                raise _unknown(group, GROUPS, f"--config {str(path)!r}")
            if not isinstance(body, dict):
                raise TrainError(f"--config {str(path)!r}: group {group!r} must be a mapping of keys")
            for key, value in body.items():
                if key not in GROUPS[group]:
                    owner = next((g for g, names in GROUPS.items() if key in names), None)
                    if owner is not None:
                        raise TrainError(f"--config {str(path)!r}: key {group}.{key} belongs in group {owner!r}")
                    raise _unknown(key, GROUPS[group], f"--config {str(path)!r}: {group}")
                items.append((f"{group}.{key}", key, value))
    for where, key, value in items:
        if not type_ok(value, types_[key]):
            raise TrainError(f"--config {str(path)!r}: {where} = {value!r} is not {type_name(types_[key])}")
        flat[key] = tuple(value) if key == "keep_checkpoints" else value
    return flat
