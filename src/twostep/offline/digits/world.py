"""Assembles the offline world: digit splits, the local text encoder and its cached prompt embeddings.

The text path is the real one (``text.encode_prompts``: chat template, ``hidden_states[-2]``, masked),
run on a tokenizer built locally and a tiny random ``Qwen3Model``. Both are saved with the run, and
the ten prompt embeddings are cached next to them, so nothing is re-encoded later.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

from twostep.core.config import require, require_seed
from twostep.core.prompt_embeds import load_prompt_embeds, save_prompt_embeds, words_of
from twostep.engine.backbone import Conditioning
from twostep.families.registry import TOY_FAMILY, family_named
from twostep.offline.digits.data import class_prompts

PROMPT_CACHE = "prompt_embeds.safetensors"


@dataclass
class ToyDataConfig:
    heldout_fraction: float = 0.3
    split_seed: int = 0

    def validate(self) -> None:
        require(0.05 <= self.heldout_fraction <= 0.5, "heldout_fraction", "must be in [0.05, 0.5]")
        require_seed(self.split_seed, "split_seed")


@dataclass
class ToyTextConfig:
    hidden_size: int = 32
    num_layers: int = 2
    max_length: int = 32
    seed: int = 0

    def validate(self) -> None:
        require(self.hidden_size % 2 == 0 and self.hidden_size >= 4, "hidden_size", "must be an even number >= 4")
        require(self.num_layers >= 1, "num_layers", "must be at least 1")
        require(16 <= self.max_length <= 512, "max_length",
                "must be in [16, 512] (the chat template takes 9 tokens; the tiny encoder has 512 positions)")
        require_seed(self.seed, "seed")


@contextmanager
def _quiet_transformers_progress():
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def build_prompt_cache(cfg: ToyTextConfig, out_dir: str, prompts: list[str] | None = None) -> str:
    """Build the local tokenizer + tiny Qwen3, save them under ``out_dir/text``, cache the prompt embeddings."""
    prompts = prompts or class_prompts()
    toy = family_named(TOY_FAMILY)
    tokenizer = toy.build_local_tokenizer(words_of(prompts))
    encoder = toy.build_tiny_text_encoder(len(tokenizer), cfg.hidden_size, cfg.num_layers, cfg.seed)
    feats = toy.encode_prompts(tokenizer, encoder, prompts, cfg.max_length)
    text_dir = os.path.join(out_dir, "text")
    tokenizer.save_pretrained(os.path.join(text_dir, "tokenizer"))
    with _quiet_transformers_progress():  # its "Writing model shards" bar writes \r updates into logs
        encoder.save_pretrained(os.path.join(text_dir, "text_encoder"))
    path = os.path.join(out_dir, PROMPT_CACHE)
    save_prompt_embeds(path, prompts, feats, provenance={"encoder": "toy tiny Qwen3Model", "seed": cfg.seed,
                                                          "hidden_states": -2, "max_length": cfg.max_length})
    return path


def load_prompt_table(path: str) -> tuple[list[str], Conditioning]:
    """The cached class prompts as one padded :class:`Conditioning` (row = digit class)."""
    prompts, feats, _ = load_prompt_embeds(path)
    return prompts, Conditioning.from_list(feats)

