"""The recipes that ship inside the package: ``--config NAME`` finds them from any folder, ``twostep configs`` lists
them. A path to a YAML file works as before.

Each owner keeps its recipes beside its code: ``offline/configs/*.yaml`` for the offline worlds and
``families/<family>/configs/*.yaml`` for each model family. They are found as files, so this module imports
neither."""

from __future__ import annotations

import glob
import os

from twostep.core.errors import TwostepError

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_GLOBS = ("offline/configs/*.yaml", "families/*/configs/*.yaml")


def packaged_configs() -> dict[str, str]:
    """``{name: path}`` of every packaged config (name = file name without ``.yaml``), sorted by name."""
    found: dict[str, str] = {}
    for pattern in CONFIG_GLOBS:
        for path in glob.glob(os.path.join(PACKAGE_ROOT, pattern)):
            name = os.path.basename(path)[:-5]
            if name in found:  # two owners shipping one name would make --config NAME ambiguous
                raise TwostepError(f"packaged config {name!r} exists twice: {found[name]} and {path}")
            found[name] = path
    return dict(sorted(found.items()))


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
