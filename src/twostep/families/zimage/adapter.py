"""Adapter over diffusers' ``ZImageTransformer2DModel`` (Z-Image / Z-Image-Turbo).

What Z-Image expects, and what this adapter converts (DESIGN §2):

- inputs are *lists*: latents ``(C, 1, H, W)`` per sample, caption features ``(L_i, cap_feat_dim)``;
- its time input is ``t = 1 - sigma`` (0 = noise), multiplied by ``t_scale=1000`` inside;
- its output is ``u = x - eps = -v``.

Outside this file everything is batched ``(B, C, H, W)`` with ``sigma`` and ``v = eps - x``.
The same class serves the tiny offline model and the 6.15B release (``from_pretrained``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from diffusers import ZImageTransformer2DModel
from torch import nn

from twostep.core.config import require
from twostep.core.errors import TwostepError
from twostep.engine.backbone import Conditioning

Tensor = torch.Tensor

def _published_config() -> dict[str, Any]:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zimage_turbo_transformer.json")
    with open(path, encoding="utf-8") as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


# Z-Image-Turbo's transformer config as published (transformer/config.json of Tongyi-MAI/Z-Image-Turbo; a test
# compares it with an independent copy); 6.155B parameters. `plan` and `benchmarks/gpu_check.py` build from it.
ZIMAGE_TURBO_CONFIG: dict[str, Any] = _published_config()


class _StopForward(Exception):
    """Raised by a feature hook once the deepest requested block has run (skips the rest of the net)."""


class ZImageBackbone(nn.Module):
    """Batched, sigma-convention view of a ``ZImageTransformer2DModel``."""

    def __init__(self, transformer: ZImageTransformer2DModel):
        super().__init__()
        self.transformer = transformer
        self.patch_size = int(transformer.config.all_patch_size[0])
        self.f_patch_size = int(transformer.config.all_f_patch_size[0])

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, config: dict[str, Any], seed: int | None = None, device=None,
                    dtype: torch.dtype | None = None) -> "ZImageBackbone":
        """A randomly initialised transformer (tiny toy configs, or the full one on ``device='meta'``)."""
        try:
            if seed is not None:
                torch.manual_seed(seed)
            with torch.device(device or "cpu"):
                transformer = ZImageTransformer2DModel(**config)
        except (TypeError, AssertionError, ValueError) as err:
            raise TwostepError(f"invalid Z-Image transformer config {config}: {err}") from err
        if dtype is not None:
            transformer = transformer.to(dtype)
        return cls(transformer)

    @classmethod
    def from_pretrained(cls, path_or_id: str, dtype: torch.dtype = torch.bfloat16, **kwargs) -> "ZImageBackbone":
        """Load from a diffusers pipeline folder/hub id (its ``transformer/``) or a bare transformer folder."""
        subfolder = kwargs.pop("subfolder", None)
        if subfolder is None and os.path.isdir(path_or_id):
            if os.path.isfile(os.path.join(path_or_id, "transformer", "config.json")):
                subfolder = "transformer"
        elif subfolder is None:
            subfolder = "transformer"
        try:
            transformer = ZImageTransformer2DModel.from_pretrained(path_or_id, subfolder=subfolder,
                                                                   dtype=dtype, **kwargs)
        except (OSError, ValueError) as err:
            raise TwostepError(f"cannot load a Z-Image transformer from {path_or_id!r}: {err}".splitlines()[0]) from err
        return cls(transformer)

    # ------------------------------------------------------------------ properties

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def in_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    @property
    def cap_feat_dim(self) -> int:
        return int(self.transformer.config.cap_feat_dim)

    @property
    def num_blocks(self) -> int:
        return len(self.transformer.layers)

    def shard_units(self) -> list[nn.Module]:
        t = self.transformer
        return [*t.noise_refiner, *t.context_refiner, *t.layers]

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        if enabled:
            self.transformer.enable_gradient_checkpointing()
        else:
            self.transformer.disable_gradient_checkpointing()

    # ------------------------------------------------------------------ calls

    def _raw(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> list[Tensor]:
        """Run the transformer; returns its list output ``u`` of ``(C, 1, H, W)`` tensors."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if len(cond) != x.shape[0]:
            raise ValueError(f"batch of {x.shape[0]} images but {len(cond)} conditionings")
        if cond.embeds.shape[-1] != self.cap_feat_dim:
            raise ValueError(f"caption features have width {cond.embeds.shape[-1]}, the transformer expects "
                             f"{self.cap_feat_dim}")
        dtype = self.dtype
        sigma = sigma.to(x.device).reshape(-1).expand(x.shape[0])
        images = list(x.to(dtype).unsqueeze(2).unbind(0))
        caps = [c.to(dtype) for c in cond.to_list()]
        t = 1.0 - sigma.float()  # Z-Image time runs the other way (0 = noise); float32 as in the pipeline
        return self.transformer(images, t, caps, patch_size=self.patch_size, f_patch_size=self.f_patch_size,
                                return_dict=False)[0]

    def velocity(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        """``v = eps - x`` for ``x`` ``(B, C, H, W)`` at ``sigma`` ``(B,)``; returned in ``x.dtype``."""
        u = torch.stack([o.float() for o in self._raw(x, sigma, cond)], dim=0).squeeze(2)
        return (-u).to(x.dtype)  # Z-Image predicts x - eps

    forward = velocity

    def features(self, x: Tensor, sigma: Tensor, cond: Conditioning, blocks: Sequence[int]) -> list[Tensor]:
        """Image tokens after each block in ``blocks`` as maps ``(B, dim, H/p, W/p)``.

        Image tokens come first in Z-Image's unified ``[image, caption]`` sequence. The forward stops after
        the deepest requested block. Gradients flow to ``x`` (frozen is not no_grad).
        """
        blocks = list(blocks)
        bad = [b for b in blocks if not 0 <= b < self.num_blocks]
        if not blocks or bad:
            raise ValueError(f"feature blocks must be in [0, {self.num_blocks}), got {blocks}")
        height, width = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        captured: dict[int, Tensor] = {}
        last = max(blocks)

        def hook(index):
            def capture(module, args, output):
                captured[index] = output
                if index == last:
                    raise _StopForward
            return capture

        # hooks live only for this call: a checkpoint recompute in backward, or a deep copy, never sees them
        handles = [self.transformer.layers[b].register_forward_hook(hook(b)) for b in set(blocks)]
        try:
            self._raw(x, sigma, cond)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        maps = []
        for b in blocks:
            tokens = captured[b][:, : height * width]  # (B, H*W, dim), padding and caption dropped
            maps.append(tokens.transpose(1, 2).reshape(x.shape[0], -1, height, width))
        return maps


@dataclass
class TinyZImageConfig:
    """A small ``ZImageTransformer2DModel`` for the offline world (same class as the 6B model)."""

    dim: int = 96
    n_layers: int = 6
    n_refiner_layers: int = 1
    n_heads: int = 4
    patch_size: int = 2
    axes_dims: list[int] = field(default_factory=lambda: [8, 8, 8])
    axes_lens: list[int] = field(default_factory=lambda: [64, 16, 16])

    def validate(self) -> None:
        require(self.n_heads >= 1, "n_heads", "must be at least 1")
        require(self.dim >= 1 and self.dim % self.n_heads == 0, "dim",
                f"must be a positive multiple of n_heads ({self.n_heads})")
        require(self.n_layers >= 1, "n_layers", "must be at least 1")
        require(self.n_refiner_layers >= 0, "n_refiner_layers", "must be >= 0")
        require(self.patch_size in (1, 2, 4), "patch_size", "must be 1, 2 or 4")
        require(len(self.axes_dims) == 3 and len(self.axes_lens) == 3, "axes_dims", "and axes_lens need 3 entries")
        require(all(d >= 0 and d % 2 == 0 for d in self.axes_dims), "axes_dims",
                "must be even numbers >= 0 (rotary embedding pairs)")
        require(sum(self.axes_dims) == self.dim // self.n_heads, "axes_dims",
                f"must sum to dim / n_heads = {self.dim // self.n_heads}")
        # rotary positions: caption tokens (padded to 32) then the image frame; image rows and columns in patches
        require(self.axes_lens[0] >= 34, "axes_lens",
                "[0] must be at least 34 (caption positions, padded to 32, plus the image)")
        require(min(self.axes_lens[1:]) >= 16, "axes_lens",
                "[1] and [2] must be at least 16 (image rows/columns: the toy worlds are up to 16 pixels a side)")

    def to_diffusers(self, in_channels: int, cap_feat_dim: int) -> dict[str, Any]:
        return dict(all_patch_size=[self.patch_size], all_f_patch_size=[1], in_channels=in_channels, dim=self.dim,
                    n_layers=self.n_layers, n_refiner_layers=self.n_refiner_layers, n_heads=self.n_heads,
                    n_kv_heads=self.n_heads, cap_feat_dim=cap_feat_dim, axes_dims=list(self.axes_dims),
                    axes_lens=list(self.axes_lens))
