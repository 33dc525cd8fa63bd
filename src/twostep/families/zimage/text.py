"""Prompt encoding the way ``ZImagePipeline`` does it, and an on-disk embedding cache.

Z-Image conditions on Qwen3: chat template, ``hidden_states[-2]``, kept only on valid (unmasked) tokens,
so each prompt gives a variable-length ``(L_i, D)`` tensor. Embeddings are computed once and cached:
training never needs the text encoder in memory.

The offline world uses the same code with a tokenizer built locally (``tokenizers``) and a tiny
randomly initialised ``Qwen3Model`` (:func:`build_local_tokenizer`, :func:`build_tiny_qwen3`).
"""

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

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "[UNK]"]

# Qwen3's template reduced to what ZImagePipeline uses (one user turn, generation prompt).
CHAT_TEMPLATE = (
    "{%- for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{%- endif %}"
    "{%- endif %}"
)


def build_local_tokenizer(words: Sequence[str]):
    """A word-level tokenizer with Qwen's chat markers, built offline. ``words``: the vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in ["user", "assistant", "system"] + sorted({w.lower() for w in words}):
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="<|endoftext|>",
                                  eos_token="<|im_end|>", additional_special_tokens=SPECIAL_TOKENS[1:5])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def words_of(prompts: Sequence[str]) -> list[str]:
    return sorted({w for p in prompts for w in re.findall(r"\w+|[^\w\s]+", p.lower())})


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


# --------------------------------------------------------------------------- cache


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
