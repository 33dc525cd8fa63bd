"""Prompt encoding the way ``Flux2KleinPipeline`` does it.

klein conditions on Qwen3: chat template with thinking off, the prompt padded to ``max_length`` tokens, the
hidden states of layers 9, 18 and 27 side by side (``(L, 3 · hidden)``). The transformer reads all ``L`` tokens,
padding included (the encoder saw the attention mask; the transformer sees none), so every prompt gives an
``(L, D)`` tensor of the same length.
"""

from __future__ import annotations

from typing import Sequence

import torch

Tensor = torch.Tensor

HIDDEN_LAYERS = (9, 18, 27)  # Flux2KleinPipeline's text_encoder_out_layers


def _templated(tokenizer, prompts: Sequence[str]) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True, enable_thinking=False) for p in prompts]


def prompt_token_counts(tokenizer, prompts: Sequence[str]) -> list[int]:
    """Tokens of each prompt with its chat template, untruncated (the pipeline cuts the rest off silently)."""
    return [len(ids) for ids in tokenizer(_templated(tokenizer, prompts), truncation=False, verbose=False).input_ids]


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str], max_length: int = 512,
                   device=None, layers: Sequence[int] = HIDDEN_LAYERS) -> list[Tensor]:
    """Prompt features exactly as ``Flux2KleinPipeline._get_qwen3_prompt_embeds``: ``(max_length, 3·D)`` each."""
    device = device or next(text_encoder.parameters()).device
    inputs = tokenizer(_templated(tokenizer, prompts), padding="max_length", max_length=max_length, truncation=True,
                       return_tensors="pt")
    hidden = text_encoder(input_ids=inputs.input_ids.to(device), attention_mask=inputs.attention_mask.to(device),
                          output_hidden_states=True, use_cache=False).hidden_states
    if max(layers) >= len(hidden):
        raise ValueError(f"the text encoder has {len(hidden) - 1} layers; FLUX.2 reads hidden layers {list(layers)}")
    stacked = torch.cat([hidden[k] for k in layers], dim=-1)  # (B, L, 3·D), layer-major per token
    return list(stacked.unbind(0))


def build_tiny_qwen3_lm(vocab_size: int, hidden_size: int = 16, num_layers: int = 28, seed: int = 0):
    """A small random ``Qwen3ForCausalLM`` (the release's text-encoder class) deep enough for layers 9/18/27."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=hidden_size // 2, max_position_embeddings=512)
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).eval()
