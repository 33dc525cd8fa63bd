"""Prompt encoding the way ``ZImagePipeline`` does it (the on-disk cache is ``core/prompt_embeds.py``).

Z-Image conditions on Qwen3: chat template, ``hidden_states[-2]``, kept only on valid (unmasked) tokens,
so each prompt gives a variable-length ``(L_i, D)`` tensor. Embeddings are computed once and cached:
training never needs the text encoder in memory.

The offline world uses the same code with a tokenizer built locally (``tokenizers``) and a tiny
randomly initialised ``Qwen3Model`` (:func:`build_local_tokenizer`, :func:`build_tiny_qwen3`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from twostep.core.prompt_embeds import (  # noqa: F401  (re-exported: the offline world's and tests' names)
    load_prompt_embeds,
    save_prompt_embeds,
    words_of,
)
from twostep.families.qwen3_text import (  # noqa: F401  (re-exported: the offline world's and tests' names)
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    build_local_tokenizer,
)

Tensor = torch.Tensor

def build_tiny_qwen3(vocab_size: int, hidden_size: int = 32, num_layers: int = 2, seed: int = 0):
    """A small random ``Qwen3Model`` (the real text encoder's class) for the offline world and tests."""
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=hidden_size // 2, max_position_embeddings=512)
    torch.manual_seed(seed)
    return Qwen3Model(config).eval()


def _templated(tokenizer, prompts: Sequence[str]) -> list[str]:
    """Each prompt as ``ZImagePipeline._encode_prompt`` hands it to the tokenizer (one user turn, chat template)."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True, enable_thinking=True) for p in prompts]


def prompt_token_counts(tokenizer, prompts: Sequence[str]) -> list[int]:
    """Tokens of each prompt as the encoder would see it (chat template included), without truncation: the
    pipeline cuts anything beyond its ``max_length`` off silently."""
    return [len(ids) for ids in tokenizer(_templated(tokenizer, prompts), truncation=False, verbose=False).input_ids]


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str], max_length: int = 512,
                   device=None) -> list[Tensor]:
    """Prompt features exactly as ``ZImagePipeline._encode_prompt``: a list of ``(L_i, D)`` tensors."""
    device = device or next(text_encoder.parameters()).device
    texts = _templated(tokenizer, prompts)
    inputs = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    ids = inputs.input_ids.to(device)
    mask = inputs.attention_mask.to(device).bool()
    hidden = text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
    return [hidden[i][mask[i]] for i in range(len(prompts))]
