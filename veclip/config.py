"""Config plumbing shared by every stage: a config file and ``--set key=value`` overrides
applied to nested frozen dataclasses, with values coerced to each field's type."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path

from veclip.schema import ColumnMap


def _coerce(value, hint):
    """Turn a CLI string or a JSON value into the field's type."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value in (None, "None", "null", ""):
            return None
        return _coerce(value, args[0])
    if dataclasses.is_dataclass(hint):
        if isinstance(hint, type) and hint is ColumnMap and isinstance(value, str):
            return ColumnMap.parse(value)
        return _merge(hint(), value) if isinstance(value, dict) else value
    if hint is bool:
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"expected a boolean, got {value!r}")
            return value.lower() in ("true", "1", "yes")
        return bool(value)
    if hint in (int, float, str):
        return hint(value)
    if origin is tuple:
        return tuple(json.loads(value)) if isinstance(value, str) and value.startswith("[") else tuple(value if isinstance(value, list) else [value])
    if hint is dict or origin is dict:
        return json.loads(value) if isinstance(value, str) else dict(value)
    return value


def _merge(obj, values: dict):
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    changes = {}
    for key, value in values.items():
        if key not in names:
            raise ValueError(f"unknown config field {key!r} in {type(obj).__name__}; fields: {sorted(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[key] = _merge(current, value)
        else:
            changes[key] = _coerce(value, hints[key])
    return dataclasses.replace(obj, **changes)


def apply_overrides(config, overrides: list[str]):
    """Apply ``dotted.key=value`` strings, e.g. ``fuser.sampling.temperature=0.5``."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"bad --set {item!r}: expected key=value, e.g. fuser.pool.max_actors=4")
        nested: dict = {}
        cursor = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = value
        try:
            config = _merge(config, nested)
        except (TypeError, ValueError) as err:
            raise ValueError(f"bad --set {item!r}: {err}") from None
    return config


def load_config_file(config, path: str):
    """Merge a JSON (or YAML) file of nested fields into ``config``."""
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    return _merge(config, data or {})
