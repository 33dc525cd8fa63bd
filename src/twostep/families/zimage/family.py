"""Z-Image (``Tongyi-MAI/Z-Image-Turbo``, diffusers ``ZImagePipeline``) as a :class:`ModelFamily`."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from twostep.families.base import ModelFamily
from twostep.families.zimage import pipeline_io, text
from twostep.families.zimage.adapter import ZIMAGE_TURBO_CONFIG, TinyZImageConfig, ZImageBackbone

Tensor = torch.Tensor


class ZImageFamily(ModelFamily):
    name = "zimage"
    title = "Z-Image"
    pipeline_classes = ("ZImagePipeline", "TwoStepZImagePipeline")
    transformer_class = "ZImageTransformer2DModel"
    default_model = "Tongyi-MAI/Z-Image-Turbo"
    default_config = "zimage_turbo_2step_lora"
    max_sequence_length = pipeline_io.MAX_SEQUENCE_LENGTH

    # the offline worlds' toy teacher is a tiny Z-Image transformer on a tiny Qwen3 (same classes as the release)
    tiny_config_class = TinyZImageConfig
    backbone_class = ZImageBackbone
    build_local_tokenizer = staticmethod(text.build_local_tokenizer)
    build_tiny_text_encoder = staticmethod(text.build_tiny_qwen3)

    def check_pipeline(self, folder: str, need: Sequence[str] = ("transformer",)) -> dict:
        return pipeline_io.check_zimage_pipeline(folder, need=tuple(need))

    def check_schedule(self, folder: str, shift: float, resolution: int, teacher_steps: int) -> None:
        pipeline_io.check_scheduler(folder, shift)

    def check_resolution(self, folder: str, resolution: int, key: str = "resolution") -> int:
        return pipeline_io.check_resolution(folder, resolution, key)

    def latent_shape(self, folder: str, resolution: int) -> tuple[int, int, int]:
        return pipeline_io.latent_shape(folder, resolution)

    def load_backbone(self, folder: str, dtype: torch.dtype) -> ZImageBackbone:
        return ZImageBackbone.from_pretrained(folder, dtype=dtype)

    def random_backbone(self, config: dict[str, Any], seed: int | None = None, device=None,
                        dtype: torch.dtype | None = None) -> ZImageBackbone:
        return ZImageBackbone.from_config(config, seed=seed, device=device, dtype=dtype)

    def hidden_width(self, backbone) -> int:
        return int(backbone.transformer.config.dim)

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
        from twostep.families.zimage.model_card import pipeline_sigmas

        return pipeline_sigmas(student_sigmas, shift)

    def pipeline_call_kwargs(self, num_steps: int) -> dict[str, Any]:
        return {"guidance_scale": 0.0}

    def check_guidance(self, folder: str, guidance_scale: float) -> bool:
        return guidance_scale > 0  # ZImagePipeline.do_classifier_free_guidance

    def guided_velocity(self, cond: Tensor, uncond: Tensor, guidance_scale: float) -> Tensor:
        return cond + guidance_scale * (cond - uncond)  # ZImagePipeline: pos + g (pos - neg)

    def guidance_call_kwargs(self, guidance_scale: float, negative: Tensor) -> dict[str, Any]:
        return {"guidance_scale": guidance_scale, "negative_prompt_embeds": [negative]}

    def load_pipeline(self, folder: str, dtype: torch.dtype):
        from diffusers import ZImagePipeline

        return ZImagePipeline.from_pretrained(folder, dtype=dtype)

    def encode_with_pipeline(self, pipe, prompts: Sequence[str], device) -> list[Tensor]:
        embeds, _ = pipe.encode_prompt(list(prompts), device=device, do_classifier_free_guidance=False)
        return list(embeds)

    def pipeline_latents(self, pipe, embed: Tensor, noise: Tensor, resolution: int, **kwargs) -> Tensor:
        latents = pipe(prompt_embeds=[embed], latents=noise, height=resolution, width=resolution,
                       output_type="latent", **kwargs).images
        return latents.float().cpu()

    def random_pipeline(self, words: Sequence[str], full: bool = False, seed: int = 0):
        if full:
            from twostep.families.zimage.full_size import full_size_random_pipeline

            return full_size_random_pipeline(words, self.published_config(), seed)
        from twostep.families.zimage.tiny import tiny_zimage_pipeline

        return tiny_zimage_pipeline(words, seed)

    def load_transformer(self, folder: str, dtype: torch.dtype):
        from diffusers import ZImageTransformer2DModel

        return ZImageTransformer2DModel.from_pretrained(folder, subfolder="transformer", dtype=dtype)

    def comfy_lora(self, lora: dict[str, Tensor]) -> dict[str, Tensor]:
        # ComfyUI's Z-Image loader maps `diffusion_model.` + the diffusers module names onto its fused qkv
        out = {f"diffusion_model.{k}": v for k, v in lora.items()}
        for key, value in lora.items():
            if key.endswith(".lora_A.weight"):  # scale is baked in: alpha = rank gives strength 1
                out[f"diffusion_model.{key[:-len('.lora_A.weight')]}.alpha"] = torch.tensor(float(value.shape[0]))
        return out

    def model_card(self, fmt: str, info: dict, config_summary: dict, comfy_text: str = "") -> str:
        from twostep.families.zimage.model_card import model_card

        return model_card(fmt, info, config_summary, comfy_text)

    def comfy_export(self, info: dict, lora_files: list[str]) -> tuple[str, dict, str]:
        from twostep.families.zimage.comfy_workflow import WORKFLOW_FILE, card_text, workflow_for_export

        graph = workflow_for_export(info, lora_files)  # the schedule, shift and resolution of this run
        return WORKFLOW_FILE, graph, card_text(info, lora_files, graph)

    def teacher_name(self, model_path: str, fingerprint: str | None) -> str:
        from twostep.families.zimage.model_card import teacher_name

        return teacher_name(model_path, fingerprint)

    plan_aliases = ("zimage-turbo",)

    def transformer_layout(self, config: dict[str, Any]) -> dict[str, Any]:
        from diffusers import ZImageTransformer2DModel

        from twostep.core.errors import TwostepError

        try:
            with torch.device("meta"):
                model = ZImageTransformer2DModel(**config)
        except (TypeError, KeyError, AssertionError, ValueError) as err:
            raise TwostepError(f"invalid Z-Image transformer config: {err}") from err
        blocks = [*model.layers, *model.noise_refiner, *model.context_refiner]
        return {"model": model, "main_blocks": list(model.layers), "blocks": blocks, "dim": int(config["dim"]),
                "ffn_hidden": int(blocks[0].feed_forward.w1.out_features), "text_dim": int(config["cap_feat_dim"]),
                "patch": int(config.get("all_patch_size", [2])[0]), "in_channels": int(config.get("in_channels", 16)),
                "vae_latent_channels": int(config.get("in_channels", 16))}

    def published_config(self) -> dict[str, Any]:
        return dict(ZIMAGE_TURBO_CONFIG)


FAMILY = ZImageFamily()
