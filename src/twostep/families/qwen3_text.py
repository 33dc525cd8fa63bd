"""What the Qwen3-conditioned families share: a word-level tokenizer with Qwen's chat markers and template, built
offline (the offline worlds' toy text encoder and every tiny test pipeline use it; released pipelines ship their
own tokenizer)."""

from __future__ import annotations

from typing import Sequence

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "[UNK]"]

# Qwen3's template reduced to what the pipelines use (one user turn, generation prompt, thinking on or off).
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


# Qwen3-4B, the text encoder of Z-Image-Turbo and FLUX.2 klein 4B (its config.json): what a full-size random
# pipeline builds for GPU timing, where the weights cannot be downloaded
QWEN3_4B_CONFIG = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=1000000.0,
                       max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=True)
