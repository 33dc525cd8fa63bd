"""The model families twostep knows, and which one a pipeline folder belongs to.

A family is picked from the pipeline's own files (``model_index.json``'s ``_class_name``, or a bare transformer
folder's ``transformer/config.json``), never from a flag. Each family module is imported only when asked for.
"""

from __future__ import annotations

import importlib
import json
import os

from twostep.core.errors import TwostepError
from twostep.families.base import ModelFamily

# name -> module holding FAMILY; the order is the order of `twostep configs` and the docs' table
FAMILY_MODULES = {"zimage": "twostep.families.zimage.family", "flux2": "twostep.families.flux2.family"}
TOY_FAMILY = "zimage"  # the offline worlds' toy teacher is a tiny model of this family


def family_named(name: str) -> ModelFamily:
    if name not in FAMILY_MODULES:
        raise TwostepError(f"unknown model family {name!r}; twostep knows {', '.join(FAMILY_MODULES)}")
    return importlib.import_module(FAMILY_MODULES[name]).FAMILY


def all_families() -> list[ModelFamily]:
    return [family_named(name) for name in FAMILY_MODULES]


def _class_name(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data.get("_class_name") if isinstance(data, dict) else None


def detect_family(folder: str) -> ModelFamily:
    """The family of the pipeline (or bare transformer) folder ``folder``, from its own config files."""
    index = _class_name(os.path.join(folder, "model_index.json"))
    transformer = _class_name(os.path.join(folder, "transformer", "config.json"))
    for family in all_families():
        if index in family.pipeline_classes or (index is None and transformer == family.transformer_class):
            return family
    families = all_families()
    found = index or transformer
    if found is None:
        kinds = f"a {families[0].title} pipeline folder" + "".join(f", nor a {f.title} one" for f in families[1:])
        raise TwostepError(f"{folder} is not {kinds} (no model_index.json or transformer/config.json); pass the "
                           "folder of a downloaded pipeline")
    classes = f"a {families[0].pipeline_classes[0]}" + "".join(f", nor a {f.pipeline_classes[0]}" for f in families[1:])
    raise TwostepError(f"{folder} holds a {found!r}, not {classes}; pass a pipeline folder of a family twostep "
                       f"distils ({', '.join(f.default_model for f in families)})")
