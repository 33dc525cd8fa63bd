"""Cached prompt embeddings for the real path (the family's text encoder): computed once, read lazily during training.

Layout of ``DIR``::

    DIR/manifest.json                 prompts, their sha256, text-encoder fingerprint, dtype, shard list
    DIR/embeds-00000.safetensors ...  ``prompt_{i:07d}`` -> ``(L_i, D)`` (the tokens the family's pipeline feeds
                                      the transformer)

Shards are memory-mapped on read, so a cache of many prompts never has to sit in RAM.
"""

from __future__ import annotations

import json
import os
import re
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from twostep.core.dtypes import torch_dtype
from twostep.core.errors import TwostepError
from twostep.core.prompts import check_prompt_tokens, prompts_sha256
from twostep.core.utils import atomic_path, ensure_writable_dir, progress, read_json_file, write_text
from twostep.engine.backbone import Conditioning
from twostep.families.folders import component_fingerprint, pick_device
from twostep.families.registry import detect_family

Tensor = torch.Tensor
MANIFEST = "manifest.json"
_SHARD_NAME = re.compile(r"embeds-\d{5}\.safetensors")


def check_prompt_lengths(folder: str, prompts: Sequence[str], max_length: int, path: str | None = None,
                         tokenizer=None) -> None:
    """Refuse prompts longer than ``max_length`` tokens (the pipeline would cut them off silently), naming their
    lines in ``path`` (``None``: a prompt given on the command line). Loads only the tokenizer."""
    family = detect_family(folder)
    tokenizer = tokenizer or family.load_tokenizer(folder)
    check_prompt_tokens(family.prompt_token_counts(tokenizer, list(prompts)), max_length, path)


def read_text_manifest(out_dir: str) -> dict:
    """The prompt cache's manifest, checked for the shape this module writes; anything else is one error naming
    the file and telling how to rebuild it."""
    path = os.path.join(out_dir, MANIFEST)
    fix = f"delete {out_dir} and rerun `twostep teacher-data --prompts ...`"
    manifest = read_json_file(path, what="prompt-cache manifest", hint=fix)

    def bad(what: str) -> TwostepError:
        return TwostepError(f"{path}: prompt-cache manifest {what}; {fix}")

    if not isinstance(manifest, dict):
        raise bad(f"must be a JSON object, not {type(manifest).__name__}")
    for key, kind in (("provenance", dict), ("prompts", list), ("shard_size", int), ("shards", list),
                      ("complete", bool)):
        if key not in manifest:
            raise bad(f"lacks '{key}'")
        if not isinstance(manifest[key], kind) or (kind is int and isinstance(manifest[key], bool)):
            wanted = {dict: "a mapping", list: "a list", int: "an integer", bool: "true or false"}[kind]
            raise bad(f"'{key}' must be {wanted}, not {type(manifest[key]).__name__}")
    if not all(isinstance(p, str) for p in manifest["prompts"]):
        raise bad("'prompts' must be a list of strings")
    if manifest["shard_size"] < 1:
        raise bad("'shard_size' must be at least 1")
    for i, shard in enumerate(manifest["shards"]):
        if not (isinstance(shard, dict) and isinstance(shard.get("name"), str) and _SHARD_NAME.fullmatch(shard["name"])
                and all(isinstance(shard.get(k), int) and not isinstance(shard.get(k), bool) and shard[k] >= 0
                        for k in ("first_index", "count"))):
            raise bad(f"shard entry {i} must be {{'name': 'embeds-NNNNN.safetensors', 'first_index': int, "
                      "'count': int}")
    return manifest


def text_provenance(folder: str, prompts: Sequence[str], dtype: str, max_length: int) -> dict:
    return {"text_encoder": component_fingerprint(folder, "text_encoder"),
            "tokenizer": component_fingerprint(folder, "tokenizer"), "prompts_sha256": prompts_sha256(list(prompts)),
            "num_prompts": len(prompts), "dtype": dtype, "max_length": max_length}


def encode_prompt_cache(folder: str, prompts: Sequence[str], out_dir: str, dtype: str = "bfloat16",
                        batch_size: int = 16, shard_size: int = 512, max_length: int = 512,
                        device=None) -> str:
    """Encode ``prompts`` with the pipeline's tokenizer and text encoder into ``out_dir``.

    Resumable: the manifest is rewritten after every shard, and a rerun with the same prompts and encoder skips
    finished shards (a cache of other prompts is replaced). 512 prompts of up to 512 tokens x 2560 in bf16 is at
    most 1.3 GB per shard in RAM.
    """
    ensure_writable_dir(out_dir, what="prompt-embedding folder")
    provenance = text_provenance(folder, prompts, dtype, max_length)
    manifest_path = os.path.join(out_dir, MANIFEST)
    manifest = {"provenance": provenance, "prompts": list(prompts), "shard_size": shard_size, "shards": [],
                "complete": False}
    if os.path.isfile(manifest_path):
        previous = read_text_manifest(out_dir)
        if previous.get("provenance") == provenance and previous.get("shard_size") == shard_size:
            if previous.get("complete"):
                return out_dir
            manifest = previous
    done = {s["name"] for s in manifest["shards"] if os.path.isfile(os.path.join(out_dir, s["name"]))}
    device = pick_device(device)
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    family = detect_family(folder)
    tokenizer, encoder = family.load_text_encoder(folder, device, compute)
    check_prompt_lengths(folder, prompts, max_length, tokenizer=tokenizer)  # callers check first, with line numbers
    store = torch_dtype(dtype)
    for start in progress(range(0, len(prompts), shard_size), desc="text shards"):
        name = f"embeds-{start // shard_size:05d}.safetensors"
        if name in done:
            continue
        chunk = list(prompts[start:start + shard_size])
        tensors = {}
        for b in range(0, len(chunk), batch_size):
            feats = family.encode_prompts(tokenizer, encoder, chunk[b:b + batch_size], max_length, device=device)
            for j, f in enumerate(feats):
                tensors[f"prompt_{start + b + j:07d}"] = f.to("cpu", store).contiguous()
        with atomic_path(os.path.join(out_dir, name)) as tmp:
            save_file(tensors, tmp)
        manifest["shards"].append({"name": name, "first_index": start, "count": len(chunk)})
        write_text(manifest_path, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    del encoder
    manifest["complete"] = True
    manifest["shards"].sort(key=lambda s: s["first_index"])
    write_text(manifest_path, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return out_dir


class PromptEmbeds:
    """Index a prompt cache like a table: ``embeds[index_tensor]`` -> padded :class:`Conditioning`."""

    def __init__(self, out_dir: str, expected: dict | None = None):
        path = os.path.join(out_dir, MANIFEST)
        if not os.path.isfile(path):
            raise TwostepError(f"no prompt-embedding cache in {out_dir}; run `twostep teacher-data --prompts ...` first")
        manifest = read_text_manifest(out_dir)
        if expected is not None:
            for key, value in expected.items():
                if manifest["provenance"].get(key) != value:
                    raise TwostepError(f"the prompt cache in {out_dir} was made with {key}="
                                       f"{manifest['provenance'].get(key)!r}, not {value!r}; re-run teacher-data")
        self.prompts: list[str] = manifest["prompts"]
        self.provenance = manifest["provenance"]
        self._shard_size = manifest["shard_size"]
        if not manifest.get("complete"):
            raise TwostepError(f"the prompt cache in {out_dir} is unfinished; rerun `twostep teacher-data` to finish it")
        shards = sorted(manifest["shards"], key=lambda s: s["first_index"])
        self._files = [os.path.join(out_dir, s["name"]) for s in shards]
        self._check_shards(out_dir, shards)
        self._handles: dict[int, object] = {}
        self.width = int(self.get(0).shape[-1])

    def _check_shards(self, out_dir: str, shards: list[dict]) -> None:
        """Every prompt in exactly one listed shard file (contiguous, ``shard_size`` each), holding its tensor."""
        fix = f"delete {out_dir} and rerun `twostep teacher-data --prompts ...`"
        where = os.path.join(out_dir, MANIFEST)
        n, size = len(self.prompts), self._shard_size
        if not n:
            raise TwostepError(f"{where}: the prompt cache holds no prompts; {fix}")
        expected = [(start, min(size, n - start)) for start in range(0, n, size)]
        if [(s["first_index"], s["count"]) for s in shards] != expected:
            raise TwostepError(f"{where}: the shards do not cover prompts 0..{n - 1} in blocks of {size} (listed: "
                               f"{[(s['first_index'], s['count']) for s in shards][:6]}); {fix}")
        for shard, path in zip(shards, self._files):
            if not os.path.isfile(path):
                raise TwostepError(f"prompt-cache shard {path} is missing; {fix}")
            try:
                with safe_open(path, framework="pt") as f:
                    keys = set(f.keys())
            except Exception as err:  # noqa: BLE001 - any reader failure means the shard is damaged
                raise TwostepError(f"prompt-cache shard {path} is not readable ({type(err).__name__}); {fix}") from None
            first, count = shard["first_index"], shard["count"]
            if not {f"prompt_{i:07d}" for i in range(first, first + count)} <= keys:
                raise TwostepError(f"prompt-cache shard {path} lacks prompts {first}..{first + count - 1}; {fix}")

    def __len__(self) -> int:
        return len(self.prompts)

    def get(self, i: int) -> Tensor:
        """``(L_i, D)`` features of prompt ``i`` in the stored dtype."""
        if not 0 <= i < len(self.prompts):
            raise IndexError(f"prompt {i} out of range ({len(self.prompts)} cached)")
        shard = i // self._shard_size
        if shard not in self._handles:
            self._handles[shard] = safe_open(self._files[shard], framework="pt")
        return self._handles[shard].get_tensor(f"prompt_{i:07d}")

    def __getitem__(self, index: Tensor) -> Conditioning:
        return Conditioning.from_list([self.get(int(i)) for i in index.reshape(-1).tolist()])

    def __getstate__(self):  # file handles do not pickle (dataloader workers reopen lazily)
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state
