"""Tiny random instances of the real Z-Image classes, built offline (tests, CPU dry runs of GPU scripts).

``tiny_zimage_pipeline`` assembles a real ``ZImagePipeline`` — tokenizer built locally, tiny ``Qwen3Model``,
tiny ``AutoencoderKL``, tiny ``ZImageTransformer2DModel``, Turbo scheduler — that can be saved in diffusers
format and loaded back with ``from_pretrained``, exactly like ``Tongyi-MAI/Z-Image-Turbo``.
"""

from __future__ import annotations

import torch

from twostep.families.zimage.text import build_local_tokenizer, build_tiny_qwen3

TINY_WORDS = ["a", "an", "the", "cat", "dog", "red", "blue", "photo", "of", "on", "sofa", "painting", "city",
              "night", "small", "house", "tree", "sky", "in", "and"]


def tiny_transformer_config(cap_feat_dim: int = 32, in_channels: int = 16) -> dict:
    return dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=in_channels, dim=64, n_layers=2,
                n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=cap_feat_dim, axes_dims=[8, 12, 12],
                axes_lens=[256, 32, 32])


def tiny_zimage_pipeline(seed: int = 0):
    """A random ``ZImagePipeline`` small enough for CPU tests (latents ``(B, 16, H/2, W/2)``: the VAE downsamples 2x)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    tokenizer = build_local_tokenizer(TINY_WORDS)
    text_encoder = build_tiny_qwen3(len(tokenizer), hidden_size=32, num_layers=2, seed=seed)
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(**tiny_transformer_config(cap_feat_dim=32))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, scaling_factor=0.3611, shift_factor=0.1159,
                        use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
    return ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)


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
