"""The recipes that ship inside the package (``src/twostep/configs/*.yaml``): ``--config NAME`` finds them from
any folder, ``twostep configs`` lists them. A path to a YAML file works as before."""

from __future__ import annotations

import os

from .errors import TwostepError

CONFIG_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def packaged_configs() -> dict[str, str]:
    """``{name: path}`` of every packaged config (name = file name without ``.yaml``)."""
    return {name[:-5]: os.path.join(CONFIG_ROOT, name) for name in sorted(os.listdir(CONFIG_ROOT))
            if name.endswith(".yaml")}


def packaged_config(name: str) -> str:
    """The packaged config called ``name`` (with or without ``.yaml``)."""
    configs = packaged_configs()
    key = name[:-5] if name.endswith(".yaml") else name
    if key not in configs:
        raise TwostepError(f"no packaged config {name!r}; known: {', '.join(configs)} (`twostep configs`)")
    return configs[key]


def resolve_config(value: str) -> str:
    """A YAML path as given when the file exists; else a packaged config's name; else a one-line error."""
    if os.path.isfile(value):
        return value
    if os.sep not in value and "/" not in value:
        configs = packaged_configs()
        key = value[:-5] if value.endswith(".yaml") else value
        if key in configs:
            return configs[key]
    if os.path.isdir(value):
        raise TwostepError(f"config {value} is a folder; give a YAML file or a packaged config name")
    raise TwostepError(f"config file {value} does not exist (packaged configs: {', '.join(packaged_configs())}; "
                       "`twostep configs` lists them)")


def describe(path: str) -> str:
    """The first comment line of a config file: what it is for."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("#"):
                return line.lstrip("#").strip()
            if line.strip():
                break
    return ""
