"""A tiny random ``Flux2KleinPipeline`` of the release's own classes, built offline (tests, CPU dry runs).

Tokenizer built locally, a 28-layer ``Qwen3ForCausalLM`` of width 16 (the pipeline reads hidden layers 9, 18 and
27), a 2-level ``AutoencoderKLFlux2`` (latents ``(B, 4, H/2, W/2)``, patchified to ``(B, 16, H/4, W/4)``), a
``Flux2Transformer2DModel`` with one double-stream and two single-stream blocks, the size-shifted scheduler.
"""

from __future__ import annotations

from typing import Sequence

import torch

from twostep.families.qwen3_text import build_local_tokenizer


def tiny_transformer_config(text_width: int = 48, in_channels: int = 16) -> dict:
    return dict(patch_size=1, in_channels=in_channels, num_layers=1, num_single_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=text_width, timestep_guidance_channels=32, mlp_ratio=2.0,
                axes_dims_rope=(4, 4, 4, 4), rope_theta=2000, guidance_embeds=False)


def tiny_flux2_klein_pipeline(words: Sequence[str], seed: int = 0, distilled: bool = True):
    """A random ``Flux2KleinPipeline`` small enough for CPU tests; ``distilled`` sets ``is_distilled`` (the
    released klein 4B is; klein base, a guidance model, is not)."""
    from diffusers import (
        AutoencoderKLFlux2,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )

    from twostep.families.flux2.pipeline_io import release_scheduler
    from twostep.families.flux2.text import build_tiny_qwen3_lm

    tokenizer = build_local_tokenizer(words)
    text_encoder = build_tiny_qwen3_lm(len(tokenizer), hidden_size=16, num_layers=28, seed=seed)
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(**tiny_transformer_config(text_width=3 * 16))
    vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             layers_per_block=1, norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
                             mid_block_add_attention=False)
    with torch.no_grad():  # batch-norm statistics that are not the identity, so a wrong normalisation shows
        vae.bn.running_mean.copy_(torch.linspace(-0.5, 0.5, vae.bn.num_features))
        vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, vae.bn.num_features))
    return Flux2KleinPipeline(scheduler=release_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=distilled)
