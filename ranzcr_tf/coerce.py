"""Values from YAML files and ``--set`` overrides onto the typed config tree (``config.py``).

    merge(cfg, {"train": {"epochs": "3"}})          # "3" -> 3 (train.epochs is an int), in place
    merge(cfg, parse_overrides(["model.weights=none"]))

Each value is converted to its field's declared type (``bool``, ``int``, ``float``, ``str``, ``dict``,
``list``, ``X | None``); a value that does not fit, or a key the dataclass does not have, is a
``ValueError`` naming the dotted key and what is valid there.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import fields
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML/command-line value to the field's declared type, or raise naming the key."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):  # Optional[X] or X | None (Python < 3.14 tells them apart)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        inner = [a for a in get_args(annotation) if a is not type(None)][0]
        return coerce(value, inner, key)
    if isinstance(value, str) and annotation is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ValueError(f"config {key}: cannot parse {value!r}: {exc}") from None
    try:
        if annotation is bool:
            if isinstance(value, bool):
                return value
            raise TypeError
        if annotation is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if annotation is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if annotation is str:
            return str(value)
        if annotation is dict or origin is dict:
            if isinstance(value, dict):
                return dict(value)
            raise TypeError
        if annotation is list or origin is list:
            if not isinstance(value, (list, tuple)):
                value = [value]
            return list(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ValueError(f"config {key} = {value!r}: expected a value of type {getattr(annotation, '__name__', annotation)}")


def merge(obj: Any, updates: dict, prefix: str = "") -> None:
    hints = get_type_hints(type(obj))
    names = [f.name for f in fields(obj)]
    for key, value in updates.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ValueError(f"unknown config key {path!r}; valid keys here: {', '.join(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"config {path!r} is a section; give its keys, e.g. {path}.{names[0]}=...")
            merge(current, value, prefix=f"{path}.")
        else:
            setattr(obj, key, coerce(value, hints[key], path))


def parse_overrides(overrides: list[str] | None) -> dict:
    """``["train.epochs=3", "model.weights=none"]`` -> nested dict."""
    nested: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value (e.g. train.epochs=3)")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = raw
    return nested
