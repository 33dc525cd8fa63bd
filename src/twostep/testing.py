"""Tiny random instances of each model family's real classes and of the metric models, built offline (tests, CPU
dry runs of GPU scripts). Each family builds its own (``families/<name>/tiny.py``); this module gives the tests one
place to ask for them.
"""

from __future__ import annotations

import torch

TINY_WORDS = ["a", "an", "the", "cat", "dog", "red", "blue", "photo", "of", "on", "sofa", "painting", "city",
              "night", "small", "house", "tree", "sky", "in", "and"]


def tiny_transformer_config(cap_feat_dim: int = 32, in_channels: int = 16) -> dict:
    """A tiny ``ZImageTransformer2DModel`` config (2 blocks of width 64)."""
    from twostep.families.zimage.tiny import tiny_transformer_config as config

    return config(cap_feat_dim, in_channels)


def tiny_transformer_config_of(family: str) -> dict:
    """The tiny transformer config of family ``family`` (its ``families/<name>/tiny.py``, default arguments)."""
    import importlib

    from twostep.families.registry import FAMILY_MODULES, family_named

    family_named(family)  # an unknown name is a TwostepError naming the known ones
    package = FAMILY_MODULES[family].rsplit(".", 1)[0]
    return importlib.import_module(f"{package}.tiny").tiny_transformer_config()


def tiny_zimage_pipeline(seed: int = 0):
    """A random ``ZImagePipeline`` small enough for CPU tests (latents ``(B, 16, H/2, W/2)``: the VAE downsamples
    2x)."""
    from twostep.families.zimage.tiny import tiny_zimage_pipeline as build

    return build(TINY_WORDS, seed)


def tiny_flux2_transformer_config(text_width: int = 48, in_channels: int = 16) -> dict:
    """A tiny ``Flux2Transformer2DModel`` config (one double-stream and two single-stream blocks of width 32)."""
    from twostep.families.flux2.tiny import tiny_transformer_config as config

    return config(text_width, in_channels)


def tiny_flux2_klein_pipeline(seed: int = 0, distilled: bool = True):
    """A random ``Flux2KleinPipeline`` for CPU tests (engine latents ``(B, 16, H/4, W/4)``)."""
    from twostep.families.flux2.tiny import tiny_flux2_klein_pipeline as build

    return build(TINY_WORDS, seed, distilled)


# --------------------------------------------------------------------------- metric models (twostep evaluate)

def _tiny_clip_tokenizer():
    """A ``CLIPTokenizer`` over single characters and :data:`TINY_WORDS`, built offline (no merges: every word the
    vocabulary lacks falls back to its characters)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for word in TINY_WORDS:
        vocab.setdefault(f"{word}</w>", len(vocab))
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789.,'\"-!?":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(f"{ch}</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[])


def save_tiny_clip(path: str, seed: int = 0, image_size: int = 32) -> str:
    """A random ``CLIPModel`` (2 layers per tower) with its tokenizer and image processor, saved at ``path`` in the
    layout of ``openai/clip-vit-large-patch14`` (and of PickScore, also a ``CLIPModel``)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = _tiny_clip_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, projection_dim=16, bos_token_id=0,
                eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=8, projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path


def save_tiny_dinov2(path: str, seed: int = 0, image_size: int = 32) -> str:
    """A random ``Dinov2Model`` (2 layers) with the DINOv2 image processor, saved at ``path`` in the layout of
    ``facebook/dinov2-large``."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=image_size, patch_size=8)
    Dinov2Model(config).eval().save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                      do_center_crop=True, image_mean=[0.485, 0.456, 0.406],
                      image_std=[0.229, 0.224, 0.225]).save_pretrained(path)
    return path
