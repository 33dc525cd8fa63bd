"""What a model family knows, behind one interface: the real path (``twostep.real``) and the commands call only this.

A family is one folder, ``families/<name>/``, holding its transformer adapter (the σ / ``v = ε - x`` view of
DESIGN §2), prompt encoding, pipeline reading and decoding, the schedule rule of its pipeline, export key names,
the model card's usage code, the ComfyUI graph, ``plan``'s published config and its packaged configs. Its
``family.py`` defines one :class:`ModelFamily` subclass; ``families/registry.py`` lists them and picks one from a
pipeline's own ``model_index.json``.

Adding a family: ``docs/adding-a-family.md``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

Tensor = torch.Tensor


class ModelFamily:
    """One family of diffusers text-to-image pipelines. Subclasses set the class attributes and implement the
    methods; every method takes plain folders, tensors and configs (no twostep run state)."""

    name: str = ""  # short id: config values, export records, `twostep configs`
    title: str = ""  # as people write it, e.g. "Z-Image"
    pipeline_classes: tuple[str, ...] = ()  # model_index.json `_class_name`s this family reads
    transformer_class: str = ""  # transformer/config.json `_class_name`
    default_model: str = ""  # hub id of the release the defaults are for
    default_config: str = ""  # packaged config name (`--config NAME`)
    max_sequence_length: int = 512  # prompt tokens the pipeline encodes
    # the transformer reads every prompt padded to max_sequence_length with no mask (FLUX.2): the padding is part of
    # the conditioning, so a text cache must encode at exactly that length
    prompt_padded: bool = False
    default_teacher_steps: int = 8  # the release's own step count (what the student is distilled from)

    # ------------------------------------------------------------------ pipeline folder (no model loads)

    def check_pipeline(self, folder: str, need: Sequence[str] = ("transformer",)) -> dict:
        """The folder's ``model_index.json`` (``{}`` for a bare transformer folder), after checking it is this
        family's and holds the components in ``need``."""
        raise NotImplementedError

    def check_schedule(self, folder: str, shift: float, resolution: int, teacher_steps: int) -> None:
        """Refuse a scheduler config (or a ``teacher_data.shift``) that the teacher's ``teacher_steps``-step
        trajectories at ``resolution`` would not match: the engine samples ``flow.turbo_sigmas(steps, shift)``."""
        raise NotImplementedError

    def check_resolution(self, folder: str, resolution: int, key: str = "resolution") -> int:
        """Refuse a resolution the pipeline cannot make (naming ``key``); returns the pixel grid."""
        raise NotImplementedError

    def latent_shape(self, folder: str, resolution: int) -> tuple[int, int, int]:
        """``(C, H, W)`` of the latents the engine works on for a square ``resolution``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ networks

    def load_backbone(self, folder: str, dtype: torch.dtype):
        """The transformer of ``folder`` wrapped in the family's :class:`~twostep.engine.backbone.Backbone`."""
        raise NotImplementedError

    def random_backbone(self, config: dict[str, Any], seed: int | None = None, device=None,
                        dtype: torch.dtype | None = None):
        """A randomly initialised transformer of ``config`` (transformer kwargs) in the family's Backbone: tiny
        test configs, or the published one for ``benchmarks/gpu_check.py``."""
        raise NotImplementedError

    def hidden_width(self, backbone) -> int:
        """Channels of the block features the discriminator heads read."""
        raise NotImplementedError

    def load_tokenizer(self, folder: str):
        raise NotImplementedError

    def load_text_encoder(self, folder: str, device, dtype: torch.dtype):
        """``(tokenizer, text_encoder)`` of the pipeline."""
        raise NotImplementedError

    def encode_prompts(self, tokenizer, text_encoder, prompts: Sequence[str], max_length: int,
                       device=None) -> list[Tensor]:
        """Prompt features exactly as the pipeline computes them: one ``(L_i, D)`` tensor per prompt."""
        raise NotImplementedError

    def prompt_token_counts(self, tokenizer, prompts: Sequence[str]) -> list[int]:
        """Tokens of each prompt as the encoder sees them, untruncated (longer ones would be cut off)."""
        raise NotImplementedError

    def load_vae(self, folder: str, device, dtype: torch.dtype):
        raise NotImplementedError

    def decode_to_uint8(self, vae, latents: Tensor) -> Tensor:
        """uint8 images ``(B, 3, H, W)`` on the CPU from latents ``(B, C, h, w)``, as the pipeline decodes."""
        raise NotImplementedError

    def decode_images(self, vae, latents: Tensor) -> list:
        """PIL images from latents (:meth:`decode_to_uint8`)."""
        from PIL import Image

        return [Image.fromarray(p) for p in self.decode_to_uint8(vae, latents).permute(0, 2, 3, 1).numpy()]

    # ------------------------------------------------------------------ inference and export

    def pipeline_sigmas(self, student_sigmas: list[float], shift: float, image_tokens: int) -> list[float]:
        """The ``sigmas=`` the stock pipeline needs to run exactly the student's sigmas on an image of
        ``image_tokens`` latent cells (``H·W`` of :meth:`latent_shape`; families with a static shift ignore it)."""
        raise NotImplementedError

    def pipeline_call_kwargs(self, num_steps: int) -> dict[str, Any]:
        """What every guidance-free call of the stock pipeline with ``num_steps`` steps passes besides the
        sigmas."""
        raise NotImplementedError

    def check_guidance(self, folder: str, guidance_scale: float) -> bool:
        """Whether the teacher of ``folder`` samples with classifier-free guidance at ``guidance_scale`` (by its
        pipeline's own rule); a scale its pipeline would ignore is a TwostepError naming
        ``teacher_data.guidance_scale``."""
        if guidance_scale:
            from twostep.core.errors import TwostepError

            raise TwostepError(f"teacher_data.guidance_scale={guidance_scale:g}: {self.title} teachers take no "
                               "guidance in twostep yet; set teacher_data.guidance_scale=0")
        return False

    def guided_velocity(self, cond: Tensor, uncond: Tensor, guidance_scale: float) -> Tensor:
        """The pipeline's CFG rule on two velocities (engine convention; the rules are linear, so a sign or scale
        between the model's output and ours commutes with them)."""
        raise NotImplementedError

    def guidance_call_kwargs(self, guidance_scale: float, negative: Tensor) -> dict[str, Any]:
        """What a call of the stock pipeline adds to sample with CFG at ``guidance_scale`` against the negative
        prompt's features ``negative`` (as :meth:`encode_with_pipeline` gives them); only asked of a family whose
        :meth:`check_guidance` said yes."""
        raise NotImplementedError

    def load_pipeline(self, folder: str, dtype: torch.dtype):
        """The stock diffusers pipeline of ``folder``."""
        raise NotImplementedError

    def encode_with_pipeline(self, pipe, prompts: Sequence[str], device) -> list[Tensor]:
        """Prompt features computed by the loaded stock pipeline itself (the evaluation's reference path)."""
        raise NotImplementedError

    def pipeline_latents(self, pipe, embed: Tensor, noise: Tensor, resolution: int, **kwargs) -> Tensor:
        """Run the stock pipeline from ``noise`` ``(1, C, h, w)`` with the prompt features ``embed`` and return its
        final latents ``(1, C, h, w)`` on the CPU in float32 (``kwargs``: sigmas or steps, callbacks)."""
        raise NotImplementedError

    def random_pipeline(self, words: Sequence[str], full: bool = False, seed: int = 0):
        """The stock pipeline with random weights and a local tokenizer over ``words``: tiny (tests, CPU runs) or at
        the release's full size (its text encoder, transformer and VAE from their published configs: GPU timing
        where the weights cannot be downloaded), built on the current default device and dtype."""
        raise NotImplementedError

    def load_transformer(self, folder: str, dtype: torch.dtype):
        """The bare diffusers transformer of ``folder`` (merged exports)."""
        raise NotImplementedError

    def comfy_lora(self, lora: dict[str, Tensor]) -> dict[str, Tensor]:
        """One step's LoRA (``{diffusers module}.lora_A/B.weight``, scale in B) in the keys ComfyUI's loader of this
        family maps, with the ``.alpha`` that gives strength 1."""
        raise NotImplementedError

    def model_card(self, fmt: str, info: dict, config_summary: dict, comfy_text: str = "") -> str:
        raise NotImplementedError

    def comfy_export(self, info: dict, lora_files: list[str]) -> tuple[str, dict, str]:
        """``(workflow file name, ComfyUI API graph, the card's ComfyUI section)`` for a ``comfyui`` export."""
        raise NotImplementedError

    def teacher_name(self, model_path: str, fingerprint: str | None) -> str:
        raise NotImplementedError

    # ------------------------------------------------------------------ sizing

    plan_aliases: tuple[str, ...] = ()  # `plan --model` names for the released config (e.g. "zimage-turbo")
    vae_downsample: int = 8  # pixels per cell of the latents the engine works on (:meth:`latent_shape`)

    def transformer_layout(self, config: dict[str, Any]) -> dict[str, Any]:
        """The transformer of ``config`` built on the meta device, as ``plan`` counts it: ``model``,
        ``main_blocks`` (the blocks the image and text tokens go through together), ``blocks`` (every block),
        ``dim``, ``ffn_hidden``, ``text_dim`` (prompt feature width), ``patch`` (latent cells per token side),
        ``in_channels`` (channels of the latents the transformer reads), ``vae_latent_channels`` (channels at the
        VAE's resolution: what a cached latent costs on disk). An invalid config is a :class:`TwostepError`."""
        raise NotImplementedError

    def published_config(self) -> dict[str, Any]:
        """The released transformer's config (``plan`` and ``benchmarks/gpu_check.py`` build from it)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<model family {self.name}>"
