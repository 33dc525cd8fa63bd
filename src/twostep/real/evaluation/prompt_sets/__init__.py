"""Built-in prompt sets for ``twostep evaluate --prompts builtin:NAME`` (files beside this module; SOURCE.md says
where each comes from and under which licence)."""

from __future__ import annotations

import os

from twostep.core.errors import TwostepError

FOLDER = os.path.dirname(os.path.abspath(__file__))
PREFIX = "builtin:"
BUILTIN = {
    "smoke": "smoke.txt",  # 16 prompts written for twostep: quick checks, and evaluation during training
    "parti": "parti.jsonl",  # 204 PartiPrompts (every 8th row of PartiPrompts.tsv; Apache-2.0, Google Research)
}


def resolve_prompt_file(spec: str) -> str:
    """``builtin:NAME`` -> the packaged file; anything else is a user's prompt file path, returned as it is."""
    if not spec.startswith(PREFIX):
        return spec
    name = spec[len(PREFIX):]
    if name not in BUILTIN:
        raise TwostepError(f"unknown built-in prompt set {spec!r}; known: "
                           + ", ".join(PREFIX + n for n in BUILTIN) + " (or give a .txt / .jsonl / .parquet file)")
    return os.path.join(FOLDER, BUILTIN[name])
