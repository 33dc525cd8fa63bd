"""Z-Image-Turbo's stock pipeline at full size with random weights, for timing on a GPU where the release cannot be
downloaded: Qwen3-4B, the published transformer and the 16-channel ``AutoencoderKL``, built on the current default
device and dtype. The tokenizer is a local word-level one: the text encoder still reads a prompt-length sequence,
which is what its cost depends on."""

from __future__ import annotations

from typing import Sequence

# the release's vae/config.json
VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  layers_per_block=2, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
                  use_quant_conv=False, use_post_quant_conv=False, sample_size=1024)


def full_size_random_pipeline(words: Sequence[str], transformer_config: dict, seed: int = 0):
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from twostep.families.qwen3_text import QWEN3_4B_CONFIG, build_local_tokenizer

    torch.manual_seed(seed)
    return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False),
                          vae=AutoencoderKL(**VAE_CONFIG).eval(),
                          text_encoder=Qwen3Model(Qwen3Config(**QWEN3_4B_CONFIG)).eval(),
                          tokenizer=build_local_tokenizer(words),
                          transformer=ZImageTransformer2DModel(**transformer_config).eval())
