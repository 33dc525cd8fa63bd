"""Typed configs: dataclasses loaded from YAML, dotted overrides (``train.lr=3e-4``), validation by key.

Every error names the dotted key that is wrong. The resolved config is saved with every run
(:func:`save_config`), and a run can be rebuilt from that file alone.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from typing import Any, Sequence, TypeVar

import yaml

from twostep.core.errors import TwostepError
from twostep.core.utils import read_text_file, write_text

MAX_CONFIG_BYTES = 1 << 20  # a config is a few KB; a megabyte is the wrong file

T = TypeVar("T")


class ConfigError(TwostepError):
    """A config value that is missing, unknown or of the wrong type; the message names the key."""


def _check_value(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(key, value, arg)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"config key '{key}': bad value {value!r}")
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"config key '{key}' must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return [_check_value(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, prefix=f"{key}.")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:  # an integer too large for a float
            value = math.inf
        if not math.isfinite(value):
            raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys and bad types raise :class:`ConfigError`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' (known in this section: "
                          f"{', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        default = _field_default(fields[name])
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            # a section given in part keeps what its own default sets apart from the section class's defaults (the
            # Z-Image config's student has rank 64, StudentConfig 16), as if the config had written those keys;
            # the keys it leaves at the class's defaults stay unset, so presets such as recipe.kind still apply
            value = merge(_set_apart(default), value)
        kwargs[name] = _check_value(f"{prefix}{name}", value, hints[name])
    try:
        obj = cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}': {err}") from err
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as err:
            key, message = err.args if len(err.args) == 2 else ("?", str(err))
            raise ConfigError(f"config key '{prefix}{key}' {message}") from err
    return obj


def _field_default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def flatten(data: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: a nested config dict by dotted key."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def predated_keys(old: dict, cur: dict, default: dict) -> list[str]:
    """The flat keys of ``cur`` that ``old`` (written by an older twostep) lacks and ``cur`` leaves at their value in
    ``default``: no change, as new keys default to the behaviour before them. All three flat (:func:`flatten`)."""
    return [k for k in sorted(set(cur) - set(old)) if k in default and cur[k] == default[k]]


def same_config(saved: dict, current: dict, defaults: dict) -> bool:
    """Whether a config written earlier (``saved``) is ``current``, up to :func:`predated_keys`."""
    old, cur = flatten(saved), flatten(current)
    predates = set(predated_keys(old, cur, flatten(defaults)))
    return set(old) <= set(cur) and all(old.get(k) == v for k, v in cur.items() if k not in predates)


def class_defaults(cls: type[T]) -> T | None:
    """``cls()``, or None for a class whose fields are not all defaulted."""
    try:
        return cls()
    except TypeError:
        return None


def _set_apart(obj: Any) -> dict:
    """The constructor fields of dataclass instance ``obj`` whose values differ from its class's defaults (all of
    them when the class has no defaults), nested sections likewise."""
    import copy

    base = class_defaults(type(obj))
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not f.init or (base is not None and value == getattr(base, f.name)):
            continue
        out[f.name] = _set_apart(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
    return out


def require(condition: bool, key: str, message: str) -> None:
    """For ``validate()`` methods: ``require(self.steps > 0, "steps", "must be positive")``."""
    if not condition:
        raise ValueError(key, message)


SEED_MAX = 2 ** 32 - 1  # numpy / scikit-learn seeds (the digit split) must fit 32 bits


def require_seed(value: int, key: str) -> None:
    """Seeds: integers in ``[0, 2**32 - 1]``."""
    require(0 <= value <= SEED_MAX, key, f"must be in [0, {SEED_MAX}] (a seed)")


def to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> ``(["train", "lr"], 0.0003)``; values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
        node[path[-1]] = value
    return data


def read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist" + (" (it is a folder)" if os.path.isdir(path) else ""))
    text = read_text_file(path, what="config file", max_bytes=MAX_CONFIG_BYTES)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: config file is not valid YAML ({problem}); fix it or use another "
                          "--config") from None
    except RecursionError:
        raise ConfigError(f"{path}: config file is nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def merge(data: dict, update: dict) -> dict:
    """Deep-merge ``update`` into ``data`` (sections merge, values replace)."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            merge(data[key], value)
        else:
            data[key] = value
    return data


def load_config(cls: type[T], path: str | None = None, overrides: Sequence[str] = (), update: dict | None = None) -> T:
    """Defaults of ``cls``, updated by the YAML file at ``path``, then ``update`` (e.g. values a command's flags or
    a data folder fix), then dotted ``overrides``."""
    data = read_yaml(path) if path else {}
    return from_dict(cls, apply_overrides(merge(data, update or {}), overrides))


def save_config(obj: Any, path: str) -> None:
    write_text(path, yaml.safe_dump(to_dict(obj), sort_keys=False))
