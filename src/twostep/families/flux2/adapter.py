"""``Flux2Backbone``: a diffusers ``Flux2Transformer2DModel`` in the σ / ``v = ε - x`` convention of DESIGN §2.

What FLUX.2 does differently from Z-Image, all of it kept in this file:

- **Latents.** The engine works on the pipeline's own latent space: the VAE's 32 channels patchified 2×2 into
  ``(B, 128, H/16, W/16)`` and batch-norm normalised (``pipeline_io.decode_to_uint8`` undoes both). The
  transformer reads them as a token sequence ``(B, h·w, 128)`` in row-major order with 4-axis position ids
  ``(t=0, row, col, l=0)``; text tokens get ``(0, 0, 0, index)``.
- **Time.** The transformer takes σ itself (it multiplies by 1000 inside); no ``1 - σ``.
- **Output.** ``v = ε - x`` as it comes (the scheduler steps ``x + (σ' - σ)·v``): no sign flip.
- **Text.** The full padded prompt (``max_sequence_length`` tokens, padding included) with no mask, as
  ``Flux2KleinPipeline`` feeds it; every row of a :class:`Conditioning` must therefore be all valid.
- **Block features.** Blocks are numbered over the double-stream blocks, then the single-stream ones. A
  double-stream block's image stream is its second output; a single-stream block runs one ``[text, image]``
  sequence, and the image tokens are the ones after the text.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import torch
from diffusers import Flux2Transformer2DModel
from torch import nn

from twostep.core.errors import TwostepError
from twostep.engine.backbone import Conditioning

Tensor = torch.Tensor


def _published_config() -> dict[str, Any]:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flux2_klein_4b_transformer.json")
    with open(path, encoding="utf-8") as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


# FLUX.2 klein 4B's transformer config (5 double-stream + 20 single-stream blocks of width 24 x 128, Qwen3-4B
# features of 3 x 2560); 3.876B parameters. `plan` and `benchmarks/gpu_check.py` build from it.
FLUX2_KLEIN_4B_CONFIG: dict[str, Any] = _published_config()


def pack(x: Tensor) -> Tensor:
    """``(B, C, h, w)`` -> ``(B, h·w, C)``, row-major (``Flux2KleinPipeline._pack_latents``)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h * w).permute(0, 2, 1)


def unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """``(B, h·w, C)`` -> ``(B, C, h, w)``: the inverse of :func:`pack` (the pipeline scatters by the ids of
    :func:`image_ids`, which are exactly this row-major order)."""
    b, n, c = tokens.shape
    return tokens.permute(0, 2, 1).reshape(b, c, height, width)


def image_ids(height: int, width: int, device=None) -> Tensor:
    """``(h·w, 4)`` position ids ``(t, row, col, l)`` of one image, ``t = l = 0``."""
    one = torch.arange(1, device=device)
    return torch.cartesian_prod(one, torch.arange(height, device=device), torch.arange(width, device=device), one)


def text_ids(length: int, device=None) -> Tensor:
    """``(L, 4)`` position ids ``(0, 0, 0, index)`` of a prompt's tokens."""
    one = torch.arange(1, device=device)
    return torch.cartesian_prod(one, one, one, torch.arange(length, device=device))


class _StopForward(Exception):
    """Raised by a feature hook once the deepest requested block has run (skips the rest of the net)."""


class Flux2Backbone(nn.Module):
    """Batched, σ-convention view of a ``Flux2Transformer2DModel``."""

    def __init__(self, transformer: Flux2Transformer2DModel):
        super().__init__()
        self.transformer = transformer

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, config: dict[str, Any], seed: int | None = None, device=None,
                    dtype: torch.dtype | None = None) -> "Flux2Backbone":
        """A randomly initialised transformer (tiny test configs, or the full one on ``device='meta'``)."""
        try:
            if seed is not None:
                torch.manual_seed(seed)
            with torch.device(device or "cpu"):
                transformer = Flux2Transformer2DModel(**config)
        except (TypeError, AssertionError, ValueError) as err:
            raise TwostepError(f"invalid FLUX.2 transformer config {config}: {err}") from err
        return cls(transformer.to(dtype) if dtype is not None else transformer)

    @classmethod
    def from_pretrained(cls, path_or_id: str, dtype: torch.dtype = torch.bfloat16) -> "Flux2Backbone":
        """From a pipeline folder (its ``transformer/``) or a bare transformer folder."""
        subfolder = "transformer"
        if os.path.isdir(path_or_id) and not os.path.isfile(os.path.join(path_or_id, "transformer", "config.json")):
            subfolder = None
        try:
            transformer = Flux2Transformer2DModel.from_pretrained(path_or_id, subfolder=subfolder, dtype=dtype)
        except (OSError, ValueError) as err:
            raise TwostepError(f"cannot load a FLUX.2 transformer from {path_or_id!r}: {err}".splitlines()[0]) from err
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
        """Width of the prompt features (three Qwen3 hidden layers side by side)."""
        return int(self.transformer.config.joint_attention_dim)

    @property
    def hidden_width(self) -> int:
        return int(self.transformer.inner_dim)

    @property
    def num_double_blocks(self) -> int:
        return len(self.transformer.transformer_blocks)

    @property
    def num_blocks(self) -> int:
        return self.num_double_blocks + len(self.transformer.single_transformer_blocks)

    def shard_units(self) -> list[nn.Module]:
        t = self.transformer
        return [*t.transformer_blocks, *t.single_transformer_blocks]

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        if enabled:
            self.transformer.enable_gradient_checkpointing()
        else:
            self.transformer.disable_gradient_checkpointing()

    # ------------------------------------------------------------------ calls

    def _raw(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        """The transformer's output tokens ``(B, h·w, C)`` for ``x`` ``(B, C, h, w)`` at ``sigma`` ``(B,)``."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected x of shape (B, {self.in_channels}, h, w), got {tuple(x.shape)}")
        if len(cond) != x.shape[0]:
            raise ValueError(f"batch of {x.shape[0]} images but {len(cond)} conditionings")
        if cond.embeds.shape[-1] != self.cap_feat_dim:
            raise ValueError(f"prompt features have width {cond.embeds.shape[-1]}, the transformer expects "
                             f"{self.cap_feat_dim}")
        if not bool(cond.mask.all()):
            raise ValueError("FLUX.2 reads the full padded prompt: every prompt must have the same number of "
                             "tokens (encode them with padding to max_length, as the pipeline does)")
        dtype, device = self.dtype, x.device
        sigma = sigma.to(device).reshape(-1).expand(x.shape[0])
        height, width = x.shape[-2:]
        return self.transformer(hidden_states=pack(x).to(dtype), encoder_hidden_states=cond.embeds.to(dtype),
                                timestep=sigma.to(dtype), img_ids=image_ids(height, width, device),
                                txt_ids=text_ids(cond.embeds.shape[1], device), guidance=None,
                                return_dict=False)[0]

    def velocity(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        """``v = ε - x`` for ``x`` ``(B, C, h, w)`` at ``sigma`` ``(B,)``; returned in ``x.dtype``."""
        out = self._raw(x, sigma, cond)
        return unpack(out.float(), *x.shape[-2:]).to(x.dtype)

    forward = velocity

    def features(self, x: Tensor, sigma: Tensor, cond: Conditioning, blocks: Sequence[int]) -> list[Tensor]:
        """Image tokens after each block in ``blocks`` as maps ``(B, dim, h, w)``; the forward stops after the
        deepest requested block. Gradients flow to ``x`` (frozen is not no_grad)."""
        blocks = list(blocks)
        bad = [b for b in blocks if not 0 <= b < self.num_blocks]
        if not blocks or bad:
            raise ValueError(f"feature blocks must be in [0, {self.num_blocks}), got {blocks}")
        height, width = x.shape[-2:]
        text_len = cond.embeds.shape[1]
        doubles = self.num_double_blocks
        captured: dict[int, Tensor] = {}
        last = max(blocks)

        def hook(index):
            def capture(module, args, output):
                # double-stream: (text, image); single-stream: one [text, image] sequence
                captured[index] = output[1] if index < doubles else output[:, text_len:]
                if index == last:
                    raise _StopForward
            return capture

        modules = self.shard_units()
        handles = [modules[b].register_forward_hook(hook(b)) for b in set(blocks)]
        try:
            self._raw(x, sigma, cond)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return [captured[b].transpose(1, 2).reshape(x.shape[0], -1, height, width) for b in blocks]
