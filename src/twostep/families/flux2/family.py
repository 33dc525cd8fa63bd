"""FLUX.2 klein (``black-forest-labs/FLUX.2-klein-4B``, diffusers ``Flux2KleinPipeline``) as a :class:`ModelFamily`.

The released klein 4B is itself a 4-step distilled model (``is_distilled``: no guidance); the default recipe
distils its 4 steps into 2.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from twostep.families.base import ModelFamily
from twostep.families.flux2 import pipeline_io, text
from twostep.families.flux2.adapter import FLUX2_KLEIN_4B_CONFIG, Flux2Backbone

Tensor = torch.Tensor


class Flux2KleinFamily(ModelFamily):
    name = "flux2"
    title = "FLUX.2 klein"
    pipeline_classes = pipeline_io.PIPELINE_CLASSES
    transformer_class = pipeline_io.TRANSFORMER_CLASS
    default_model = "black-forest-labs/FLUX.2-klein-4B"
    default_config = "flux2_klein_4b_2step_lora"
    max_sequence_length = pipeline_io.MAX_SEQUENCE_LENGTH
    prompt_padded = True
    default_teacher_steps = 4
    plan_aliases = ("flux2-klein-4b",)
    vae_downsample = 16  # the VAE's 8x, then the pipeline's 2x2 patchify (latents (128, H/16, W/16))

    def check_pipeline(self, folder: str, need: Sequence[str] = ("transformer",)) -> dict:
        return pipeline_io.check_pipeline(folder, need=tuple(need))

    def check_schedule(self, folder: str, shift: float, resolution: int, teacher_steps: int) -> None:
        pipeline_io.check_schedule(folder, shift, resolution, teacher_steps)

    def check_resolution(self, folder: str, resolution: int, key: str = "resolution") -> int:
        return pipeline_io.check_resolution(folder, resolution, key)

    def latent_shape(self, folder: str, resolution: int) -> tuple[int, int, int]:
        return pipeline_io.latent_shape(folder, resolution)

    def load_backbone(self, folder: str, dtype: torch.dtype) -> Flux2Backbone:
        return Flux2Backbone.from_pretrained(folder, dtype=dtype)

    def random_backbone(self, config: dict[str, Any], seed: int | None = None, device=None,
                        dtype: torch.dtype | None = None) -> Flux2Backbone:
        return Flux2Backbone.from_config(config, seed=seed, device=device, dtype=dtype)

    def hidden_width(self, backbone) -> int:
        return backbone.hidden_width

    def load_tokenizer(self, folder: str):
        return pipeline_io.load_tokenizer(folder)

    def load_text_encoder(self, folder: str, device, dtype: torch.dtype):
        return pipeline_io.load_text_encoder(folder, device, dtype)

    def encode_prompts(self, tokenizer, text_encoder, prompts: Sequence[str], max_length: int,
                       device=None) -> list[Tensor]:
        return text.encode_prompts(tokenizer, text_encoder, prompts, max_length=max_length, device=device)

    def prompt_token_counts(self, tokenizer, prompts: Sequence[str]) -> list[int]:
        return text.prompt_token_counts(tokenizer, prompts)

    def load_vae(self, folder: str, device, dtype: torch.dtype):
        return pipeline_io.load_vae(folder, device, dtype)

    def decode_to_uint8(self, vae, latents: Tensor) -> Tensor:
        return pipeline_io.decode_to_uint8(vae, latents)

    def pipeline_sigmas(self, student_sigmas: list[float], shift: float, image_tokens: int) -> list[float]:
        from twostep.families.flux2.model_card import pipeline_sigmas

        return pipeline_sigmas(student_sigmas, image_tokens)

    def pipeline_call_kwargs(self, num_steps: int) -> dict[str, Any]:
        # the step count sets the pipeline's shift (compute_empirical_mu); guidance 1 = one forward per step
        return {"num_inference_steps": num_steps, "guidance_scale": 1.0}

    def check_guidance(self, folder: str, guidance_scale: float) -> bool:
        if guidance_scale <= 1:  # Flux2KleinPipeline: CFG only above 1
            return False
        if pipeline_io.is_guidance_distilled(folder):
            from twostep.core.errors import TwostepError

            raise TwostepError(f"teacher_data.guidance_scale={guidance_scale:g}: {folder} is a guidance-distilled "
                               "klein (model_index.json is_distilled: true), whose pipeline ignores guidance; set "
                               "teacher_data.guidance_scale=0, or distil a klein base model")
        return True

    def guided_velocity(self, cond: Tensor, uncond: Tensor, guidance_scale: float) -> Tensor:
        return uncond + guidance_scale * (cond - uncond)  # Flux2KleinPipeline: neg + g (pos - neg)

    def guidance_call_kwargs(self, guidance_scale: float, negative: Tensor) -> dict[str, Any]:
        return {"guidance_scale": guidance_scale, "negative_prompt_embeds": negative[None]}

    def load_pipeline(self, folder: str, dtype: torch.dtype):
        from diffusers import Flux2KleinPipeline

        return Flux2KleinPipeline.from_pretrained(folder, dtype=dtype)

    def encode_with_pipeline(self, pipe, prompts: Sequence[str], device) -> list[Tensor]:
        embeds, _ = pipe.encode_prompt(list(prompts), device=device, max_sequence_length=self.max_sequence_length)
        return list(embeds)

    def pipeline_latents(self, pipe, embed: Tensor, noise: Tensor, resolution: int, **kwargs) -> Tensor:
        latents = pipe(prompt_embeds=embed[None], latents=noise, height=resolution, width=resolution,
                       output_type="latent", **kwargs).images  # the VAE's latents: back to the engine's
        return pipeline_io.from_vae_latents(pipe.vae, latents).float().cpu()

    def random_pipeline(self, words: Sequence[str], full: bool = False, seed: int = 0):
        if full:
            from twostep.families.flux2.full_size import full_size_random_pipeline

            return full_size_random_pipeline(words, self.published_config(), seed)
        from twostep.families.flux2.tiny import tiny_flux2_klein_pipeline

        return tiny_flux2_klein_pipeline(words, seed)

    def load_transformer(self, folder: str, dtype: torch.dtype):
        from diffusers import Flux2Transformer2DModel

        return Flux2Transformer2DModel.from_pretrained(folder, subfolder="transformer", dtype=dtype)

    def comfy_lora(self, lora: dict[str, Tensor]) -> dict[str, Tensor]:
        from twostep.families.flux2.comfy_workflow import comfy_lora

        return comfy_lora(lora)

    def model_card(self, fmt: str, info: dict, config_summary: dict, comfy_text: str = "") -> str:
        from twostep.families.flux2.model_card import model_card

        return model_card(fmt, info, config_summary, comfy_text)

    def comfy_export(self, info: dict, lora_files: list[str]) -> tuple[str, dict, str]:
        from twostep.families.flux2.comfy_workflow import WORKFLOW_FILE, card_text, workflow_for_export

        graph = workflow_for_export(info, lora_files)
        return WORKFLOW_FILE, graph, card_text(info, lora_files, graph)

    def teacher_name(self, model_path: str, fingerprint: str | None) -> str:
        from twostep.families.folders import teacher_name

        return teacher_name(model_path, fingerprint)

    def published_config(self) -> dict[str, Any]:
        return dict(FLUX2_KLEIN_4B_CONFIG)

    def transformer_layout(self, config: dict[str, Any]) -> dict[str, Any]:
        from diffusers import Flux2Transformer2DModel

        from twostep.core.errors import TwostepError

        try:
            with torch.device("meta"):
                model = Flux2Transformer2DModel(**config)
        except (TypeError, KeyError, AssertionError, ValueError) as err:
            raise TwostepError(f"invalid FLUX.2 transformer config: {err}") from err
        blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
        # the FFN width of a double-stream block (linear_in holds the SwiGLU gate and value: 2 x hidden)
        ffn = int(model.transformer_blocks[0].ff.linear_in.out_features // 2) if model.transformer_blocks else 0
        return {"model": model, "main_blocks": blocks, "blocks": blocks, "dim": int(model.inner_dim),
                "ffn_hidden": ffn, "text_dim": int(config["joint_attention_dim"]),
                "patch": 2, "in_channels": int(config.get("in_channels", 128)),
                "vae_latent_channels": int(config.get("in_channels", 128)) // 4}  # latents patchified 2x2


FAMILY = Flux2KleinFamily()
