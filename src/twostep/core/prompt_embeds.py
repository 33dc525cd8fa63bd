"""One safetensors file of prompt features ``{prompt_i: (L_i, D)}``, with the prompts in its metadata (the offline
worlds' class-prompt table); and the word list a locally built tokenizer needs for a prompt set."""

from __future__ import annotations

import json
import os
import re
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from twostep.core.errors import TwostepError
from twostep.core.utils import atomic_path

Tensor = torch.Tensor


def words_of(prompts: Sequence[str]) -> list[str]:
    return sorted({w for p in prompts for w in re.findall(r"\w+|[^\w\s]+", p.lower())})


def save_prompt_embeds(path: str, prompts: Sequence[str], feats: Sequence[Tensor], provenance: dict | None = None):
    """Write ``{prompt_i: (L_i, D)}`` to one safetensors file; prompts and provenance in its metadata."""
    if len(prompts) != len(feats):
        raise ValueError("one feature tensor per prompt")
    tensors = {f"prompt_{i:07d}": f.detach().to("cpu").contiguous() for i, f in enumerate(feats)}
    meta = {"prompts": json.dumps(list(prompts)), "provenance": json.dumps(provenance or {})}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)


def load_prompt_embeds(path: str) -> tuple[list[str], list[Tensor], dict]:
    """Inverse of :func:`save_prompt_embeds`: ``(prompts, feats, provenance)``."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise TwostepError(f"prompt-embedding cache {path} does not exist; encode the prompts first")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(path)
        prompts = json.loads(meta["prompts"])
    except Exception as err:  # noqa: BLE001 - any parse failure means the file is not ours
        raise TwostepError(f"{path} is not a twostep prompt-embedding cache ({err}); delete it and re-encode") from err
    feats = [tensors[f"prompt_{i:07d}"] for i in range(len(prompts))]
    return prompts, feats, json.loads(meta.get("provenance", "{}"))
