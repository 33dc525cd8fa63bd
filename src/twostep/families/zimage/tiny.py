"""Tiny random Z-Image models of the release's own classes, built offline (tests, CPU dry runs of GPU scripts).

:func:`tiny_zimage_pipeline` assembles a real ``ZImagePipeline`` — tokenizer built locally, tiny ``Qwen3Model``,
tiny ``AutoencoderKL``, tiny ``ZImageTransformer2DModel``, Turbo scheduler — that can be saved in diffusers
format and loaded back with ``from_pretrained``, exactly like ``Tongyi-MAI/Z-Image-Turbo``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from twostep.families.zimage.text import build_local_tokenizer, build_tiny_qwen3


def tiny_transformer_config(cap_feat_dim: int = 32, in_channels: int = 16) -> dict:
    return dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=in_channels, dim=64, n_layers=2,
                n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=cap_feat_dim, axes_dims=[8, 12, 12],
                axes_lens=[256, 32, 32])


def tiny_zimage_pipeline(words: Sequence[str], seed: int = 0):
    """A random ``ZImagePipeline`` small enough for CPU tests (latents ``(B, 16, H/2, W/2)``: the VAE downsamples 2x)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    tokenizer = build_local_tokenizer(words)
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
