"""FLUX.2 klein 4B's stock pipeline at full size with random weights, for timing on a GPU where the release cannot
be downloaded: Qwen3-4B as a causal LM (the pipeline reads its hidden layers 9, 18 and 27), the published
transformer, ``AutoencoderKLFlux2`` at its defaults (the FLUX.2 VAE: 32 latent channels, 8x) and the size-shifted
scheduler, built on the current default device and dtype. The tokenizer is a local word-level one; klein pads
every prompt to 512 tokens, so its text cost does not depend on the prompt anyway."""

from __future__ import annotations

from typing import Sequence


def full_size_random_pipeline(words: Sequence[str], transformer_config: dict, seed: int = 0):
    import torch
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from twostep.families.flux2.pipeline_io import release_scheduler
    from twostep.families.qwen3_text import QWEN3_4B_CONFIG, build_local_tokenizer

    torch.manual_seed(seed)
    return Flux2KleinPipeline(scheduler=release_scheduler(), vae=AutoencoderKLFlux2().eval(),
                              text_encoder=Qwen3ForCausalLM(Qwen3Config(**QWEN3_4B_CONFIG)).eval(),
                              tokenizer=build_local_tokenizer(words),
                              transformer=Flux2Transformer2DModel(**transformer_config).eval(), is_distilled=True)
