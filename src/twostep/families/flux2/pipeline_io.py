"""Reading a ``Flux2KleinPipeline`` folder: its checks, its schedule rule, its latent shape, its VAE decode.

The pipeline shifts its schedule by the image size: ``mu = compute_empirical_mu(image tokens, steps)`` and
``σ = shift_sigma(s, exp(mu))`` on ``s = linspace(1, 1/N, N)`` (scheduler ``use_dynamic_shifting``, exponential
time shift). :func:`schedule_shift` is that ``exp(mu)``; the engine's ``flow.turbo_sigmas(N, shift)`` then gives
the pipeline's sigmas exactly.
"""

from __future__ import annotations

import math
import os

import torch

from twostep.core.errors import TwostepError
from twostep.families.folders import read_pipeline_json

Tensor = torch.Tensor
PIPELINE_CLASSES = ("Flux2KleinPipeline",)
TRANSFORMER_CLASS = "Flux2Transformer2DModel"
MAX_SEQUENCE_LENGTH = 512  # Flux2KleinPipeline's tokenizer_max_length
MIN_GRID_CELLS = 4


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """The schedule's ``mu`` for ``image_seq_len`` tokens and ``num_steps`` steps: diffusers'
    ``compute_empirical_mu`` (a fit of FLUX.2's shift over resolutions and step counts), written out again here
    and pinned to it by a test."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    slope = (m_200 - m_10) / 190.0
    return float(slope * num_steps + m_200 - 200.0 * slope)


def schedule_shift(image_tokens: int, num_steps: int) -> float:
    """``exp(mu)``: the static shift that gives the pipeline's ``num_steps``-step schedule for an image of
    ``image_tokens`` latent tokens (``(resolution / 16)²`` for klein)."""
    return math.exp(empirical_mu(image_tokens, num_steps))


def release_scheduler():
    """The release's scheduler: its shift grows with the image size (:func:`empirical_mu`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096,
                                           max_shift=1.15, shift=3.0, use_dynamic_shifting=True,
                                           time_shift_type="exponential")


def check_pipeline(folder: str, need: tuple[str, ...] = ("transformer",)) -> dict:
    """The pipeline's ``model_index.json`` (``{}`` for a bare transformer folder); raises if it is not klein."""
    index_path = os.path.join(folder, "model_index.json")
    index: dict = {}
    if os.path.isfile(index_path):
        index = read_pipeline_json(index_path, "pipeline index")
        if index.get("_class_name") not in PIPELINE_CLASSES:
            raise TwostepError(f"{folder} holds a {index.get('_class_name')!r}, not a Flux2KleinPipeline")
    config_path = os.path.join(folder, "transformer", "config.json")
    if not os.path.isfile(config_path):
        raise TwostepError(f"{folder} is not a FLUX.2 klein pipeline folder (no transformer/config.json)")
    cls = read_pipeline_json(config_path, "transformer config").get("_class_name")
    if cls != TRANSFORMER_CLASS:
        raise TwostepError(f"{folder}/transformer is a {cls!r}, not a {TRANSFORMER_CLASS}")
    missing = [part for part in need if not os.path.isdir(os.path.join(folder, part))]
    if missing:
        raise TwostepError(f"{folder} lacks {', '.join(missing)}/ that this command needs; pass a full FLUX.2 "
                           "klein pipeline folder")
    return index


def is_guidance_distilled(folder: str) -> bool:
    """``model_index.json``'s ``is_distilled``: the released klein 4B (4 steps, no guidance) is; klein base is not."""
    path = os.path.join(folder, "model_index.json")
    return bool(read_pipeline_json(path, "pipeline index").get("is_distilled", False)) if os.path.isfile(path) else True


def check_schedule(folder: str, shift: float, resolution: int, num_steps: int) -> None:
    """The scheduler must shift by the image size (exponential, no terminal stretch), and ``shift`` must be that
    shift at ``resolution`` and ``num_steps``: the cached trajectories are the pipeline's only then."""
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    if os.path.isfile(path):
        config = read_pipeline_json(path, "scheduler config")
        if not config.get("use_dynamic_shifting") or config.get("time_shift_type", "exponential") != "exponential":
            raise TwostepError(f"{path}: FLUX.2 klein's scheduler shifts by the image size (use_dynamic_shifting, "
                               "exponential); this one does not, so twostep cannot match its schedule")
        if config.get("shift_terminal"):
            raise TwostepError(f"{path}: shift_terminal={config['shift_terminal']} stretches the schedule; twostep "
                               "matches the schedule without it")
    _, height, width = latent_shape(folder, resolution)
    expected = schedule_shift(height * width, num_steps)
    if abs(expected - shift) > 1e-4 * expected:
        raise TwostepError(f"teacher_data.shift={shift} is not the shift FLUX.2 klein's pipeline uses for "
                           f"{num_steps} steps at {resolution}px: set teacher_data.shift={expected:.6f} (exp of "
                           "compute_empirical_mu)")


def vae_grid(folder: str) -> int:
    """Pixels per latent token: VAE downsampling x the 2x2 patchify (16 for klein)."""
    path = os.path.join(folder, "vae", "config.json")
    if not os.path.isfile(path):
        return 16
    blocks = read_pipeline_json(path, "VAE config").get("block_out_channels", [0, 0, 0, 0])
    if not isinstance(blocks, list) or not blocks:
        raise TwostepError(f"{path}: 'block_out_channels' must be a non-empty list; the pipeline folder is "
                           "damaged: download it again")
    return 2 ** (len(blocks) - 1) * 2


def check_resolution(folder: str, resolution: int, key: str = "resolution") -> int:
    """A multiple of the grid (16 for klein), at least 4 tokens a side. Returns the grid."""
    grid = vae_grid(folder)
    low = MIN_GRID_CELLS * grid
    if resolution % grid or resolution < low:
        nearest = max(low, round(resolution / grid) * grid)
        raise TwostepError(f"{key} {resolution} does not fit this model: it must be a multiple of {grid} (VAE "
                           f"downsampling x 2x2 patches) from {low} pixels up; e.g. {nearest}")
    return grid


def latent_shape(folder: str, resolution: int) -> tuple[int, int, int]:
    """``(128, H/16, W/16)`` for klein: the patchified latents the transformer reads, for ``resolution``²."""
    grid = check_resolution(folder, resolution)
    config = read_pipeline_json(os.path.join(folder, "transformer", "config.json"), "transformer config")
    channels = config.get("in_channels", 128)
    if not isinstance(channels, int) or channels < 4 or channels % 4:
        raise TwostepError(f"{folder}/transformer/config.json: 'in_channels' must be a positive multiple of 4; "
                           "the pipeline folder is damaged: download it again")
    side = resolution // grid
    return channels, side, side


def load_tokenizer(folder: str):
    from transformers import AutoTokenizer

    path = os.path.join(folder, "tokenizer")
    if not os.path.isdir(path):
        raise TwostepError(f"{folder} has no tokenizer/ folder; pass a full FLUX.2 klein pipeline folder")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise TwostepError(f"{path}: the tokenizer cannot be loaded ({reason}); the pipeline folder is damaged: "
                           "download it again") from None


def load_text_encoder(folder: str, device, dtype: torch.dtype):
    """Tokenizer and the pipeline's ``Qwen3ForCausalLM``."""
    from transformers import Qwen3ForCausalLM

    tokenizer = load_tokenizer(folder)
    encoder = Qwen3ForCausalLM.from_pretrained(os.path.join(folder, "text_encoder"), dtype=dtype).to(device).eval()
    return tokenizer, encoder


def load_vae(folder: str, device, dtype: torch.dtype):
    from diffusers import AutoencoderKLFlux2

    return AutoencoderKLFlux2.from_pretrained(os.path.join(folder, "vae"), dtype=dtype).to(device).eval()


def unpatchify(latents: Tensor) -> Tensor:
    """``(B, 4C, h, w)`` -> ``(B, C, 2h, 2w)`` (``Flux2KleinPipeline._unpatchify_latents``)."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c // 4, h * 2, w * 2)


def patchify(latents: Tensor) -> Tensor:
    """``(B, C, 2h, 2w)`` -> ``(B, 4C, h, w)``: the inverse of :func:`unpatchify`."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def _bn_stats(vae, like: Tensor) -> tuple[Tensor, Tensor]:
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


def to_vae_latents(vae, latents: Tensor) -> Tensor:
    """The engine's normalised, patchified latents ``(B, 128, h, w)`` -> the VAE's ``(B, 32, 2h, 2w)``."""
    mean, std = _bn_stats(vae, latents)
    return unpatchify(latents * std + mean)


def from_vae_latents(vae, latents: Tensor) -> Tensor:
    """The VAE's ``(B, 32, H, W)`` (what ``output_type="latent"`` returns) -> the engine's ``(B, 128, H/2, W/2)``."""
    x = patchify(latents)
    mean, std = _bn_stats(vae, x)
    return (x - mean) / std


@torch.no_grad()
def decode_to_uint8(vae, latents: Tensor) -> Tensor:
    """uint8 images ``(B, 3, H, W)`` on the CPU from the engine's latents, exactly as the pipeline decodes."""
    z = to_vae_latents(vae, latents.to(device=vae.device, dtype=vae.dtype))
    pixels = vae.decode(z, return_dict=False)[0]
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
