"""Reading a diffusers Z-Image pipeline folder (or hub id) without loading more than each stage needs.

Checks happen before anything heavy loads: the folder must hold a ``ZImagePipeline`` (``model_index.json``) or at
least a ``ZImageTransformer2DModel`` (``transformer/config.json``), and resolutions must fit the VAE grid.
"""

from __future__ import annotations

import os

import torch

from twostep.core.dtypes import torch_dtype  # noqa: F401  (re-exported: the callers' one name for it)
from twostep.core.errors import TwostepError
from twostep.families.folders import (  # noqa: F401  (re-exported: the family's one name for them)
    MAX_RESOLUTION,
    MIN_RESOLUTION,
    component_fingerprint,
    pick_device,
    resolve_pipeline_dir,
)
from twostep.families.folders import (
    read_pipeline_json as _read_json,
)

Tensor = torch.Tensor
MAX_SEQUENCE_LENGTH = 512  # ZImagePipeline's max_sequence_length: prompt tokens (chat template included) it encodes
MIN_GRID_CELLS = 4  # a side of fewer latent patches than this is not an image


def check_zimage_pipeline(folder: str, need: tuple[str, ...] = ("transformer",)) -> dict:
    """The pipeline's ``model_index.json`` (or ``{}`` for a bare transformer folder); raises if it is not Z-Image."""
    index_path = os.path.join(folder, "model_index.json")
    index: dict = {}
    if os.path.isfile(index_path):
        index = _read_json(index_path, "pipeline index")
        if index.get("_class_name") not in ("ZImagePipeline", "TwoStepZImagePipeline"):
            raise TwostepError(f"{folder} holds a {index.get('_class_name')!r}, not a ZImagePipeline; pass a Z-Image "
                               "pipeline folder (e.g. a download of Tongyi-MAI/Z-Image-Turbo)")
    config_path = os.path.join(folder, "transformer", "config.json")
    if not os.path.isfile(config_path):
        raise TwostepError(f"{folder} is not a Z-Image pipeline folder (no transformer/config.json)")
    cls = _read_json(config_path, "transformer config").get("_class_name")
    if cls != "ZImageTransformer2DModel":
        raise TwostepError(f"{folder}/transformer is a {cls!r}, not a ZImageTransformer2DModel")
    missing = [part for part in need if not os.path.isdir(os.path.join(folder, part))]
    if missing:
        raise TwostepError(f"{folder} lacks {', '.join(missing)}/ that this command needs; pass a full Z-Image "
                           "pipeline folder")
    return index


def check_scheduler(folder: str, shift: float) -> None:
    """The pipeline's scheduler must be the static-shift Euler schedule the cache and student assume."""
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    if not os.path.isfile(path):
        return
    config = _read_json(path, "scheduler config")
    if config.get("use_dynamic_shifting"):
        raise TwostepError(f"{folder}: the scheduler uses dynamic shifting; twostep assumes a static shift (Z-Image-Turbo)")
    if not isinstance(config.get("shift", shift), (int, float)):
        raise TwostepError(f"{path}: 'shift' must be a number; the pipeline folder is damaged: download it again")
    if abs(float(config.get("shift", shift)) - shift) > 1e-6:
        raise TwostepError(f"{folder}: the scheduler's shift is {config.get('shift')}, the config says {shift}; set "
                           f"teacher_data.shift={config.get('shift')}")


def vae_grid(folder: str) -> int:
    """Pixels per latent cell times the transformer patch (2): resolutions must be multiples of it (16 for Z-Image)."""
    vae_config = os.path.join(folder, "vae", "config.json")
    if not os.path.isfile(vae_config):
        return 16
    blocks = _read_json(vae_config, "VAE config").get("block_out_channels", [0, 0, 0, 0])
    if not isinstance(blocks, list) or not blocks:
        raise TwostepError(f"{vae_config}: 'block_out_channels' must be a non-empty list; the pipeline folder is "
                           "damaged: download it again")
    return 2 ** (len(blocks) - 1) * 2


def max_grid_cells(folder: str) -> int | None:
    """Latent patches a side the transformer's rotary positions cover (``axes_lens[1:]``), None if unknown."""
    path = os.path.join(folder, "transformer", "config.json")
    if not os.path.isfile(path):
        return None
    lens = _read_json(path, "transformer config").get("axes_lens")
    if not (isinstance(lens, list) and len(lens) == 3 and all(isinstance(v, int) for v in lens)):
        return None
    return min(lens[1:])


def check_resolution(folder: str, resolution: int, key: str = "resolution") -> int:
    """The resolution rule of the pipeline in ``folder``: a multiple of its grid (VAE downsampling x patch size,
    16 for Z-Image), at least 4 grid cells (64 px for Z-Image) and at most what its rotary positions cover
    (8192 px for Z-Image). Returns the grid."""
    grid = vae_grid(folder)
    cells = max_grid_cells(folder)
    low, high = MIN_GRID_CELLS * grid, (cells * grid if cells else None)
    rule = (f"a multiple of {grid} (VAE downsampling x patch size) from {low}"
            + (f" to {high}" if high else " up") + " pixels")
    if resolution % grid or resolution < low or (high and resolution > high):
        nearest = max(low, round(resolution / grid) * grid)
        nearest = min(nearest, high) if high else nearest
        raise TwostepError(f"{key} {resolution} does not fit this model: it must be {rule}; e.g. {nearest}")
    return grid


def latent_shape(folder: str, resolution: int) -> tuple[int, int, int]:
    """``(C, H, W)`` of the latents ``ZImagePipeline`` uses for a square ``resolution`` (checked)."""
    grid = check_resolution(folder, resolution)
    config = _read_json(os.path.join(folder, "transformer", "config.json"), "transformer config")
    channels = config.get("in_channels", 16)
    if not isinstance(channels, int) or channels < 1:
        raise TwostepError(f"{folder}/transformer/config.json: 'in_channels' must be a positive integer; the "
                           "pipeline folder is damaged: download it again")
    side = resolution // (grid // 2)
    return channels, side, side


def load_tokenizer(folder: str):
    """The pipeline's tokenizer alone (cheap: prompt lengths are checked with it before any model loads)."""
    from transformers import AutoTokenizer

    path = os.path.join(folder, "tokenizer")
    if not os.path.isdir(path):
        raise TwostepError(f"{folder} has no tokenizer/ folder; pass a full Z-Image pipeline folder")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise TwostepError(f"{path}: the tokenizer cannot be loaded ({reason}); the pipeline folder is damaged: "
                           "download it again") from None


def load_text_encoder(folder: str, device, dtype: torch.dtype):
    """Tokenizer and Qwen3 text encoder of the pipeline."""
    from transformers import AutoModel

    tokenizer = load_tokenizer(folder)
    encoder = AutoModel.from_pretrained(os.path.join(folder, "text_encoder"), dtype=dtype).to(device).eval()
    return tokenizer, encoder


def load_vae(folder: str, device, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(os.path.join(folder, "vae"), dtype=dtype).to(device).eval()


@torch.no_grad()
def decode_to_uint8(vae, latents: Tensor) -> Tensor:
    """uint8 images ``(B, 3, H, W)`` on the CPU from Z-Image latents ``(B, 16, h, w)``, exactly as
    ``ZImagePipeline`` decodes them."""
    z = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    pixels = vae.decode(z, return_dict=False)[0]
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def decode_latents(vae, latents: Tensor) -> list:
    """PIL images from Z-Image latents ``(B, 16, h, w)`` (:func:`decode_to_uint8`)."""
    from PIL import Image

    return [Image.fromarray(p) for p in decode_to_uint8(vae, latents).permute(0, 2, 3, 1).numpy()]
