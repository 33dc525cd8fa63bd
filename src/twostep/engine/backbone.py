"""The interface the method code sees: a denoiser that speaks DESIGN §2 conventions.

Method code (samplers, losses, discriminator) only calls :class:`Backbone`; how a particular
network takes its inputs (lists, time direction, output sign) stays inside its adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from torch import nn

Tensor = torch.Tensor


@dataclass
class Conditioning:
    """Text features of a batch, padded.

    embeds: ``(B, L, D)`` token features (padding rows are arbitrary).
    mask:   ``(B, L)`` bool, True on valid tokens. Every row has at least one valid token.
    """

    embeds: Tensor
    mask: Tensor

    @classmethod
    def from_list(cls, feats: Sequence[Tensor]) -> "Conditioning":
        """From variable-length ``(L_i, D)`` tensors (diffusers' ``prompt_embeds`` format)."""
        if len(feats) == 0:
            raise ValueError("empty conditioning list")
        lengths = [int(f.shape[0]) for f in feats]
        if min(lengths) < 1:
            raise ValueError("every prompt needs at least one valid token")
        embeds = torch.nn.utils.rnn.pad_sequence(list(feats), batch_first=True)
        mask = torch.arange(embeds.shape[1], device=embeds.device)[None, :] < torch.tensor(
            lengths, device=embeds.device)[:, None]
        return cls(embeds, mask)

    def to_list(self) -> list[Tensor]:
        """Variable-length ``(L_i, D)`` tensors with padding removed."""
        return [e[m] for e, m in zip(self.embeds, self.mask)]

    def pooled(self) -> Tensor:
        """Masked mean over valid tokens: ``(B, D)`` in float32 (a bf16 sum over hundreds of tokens loses digits)."""
        w = self.mask.float().unsqueeze(-1)
        return (self.embeds.float() * w).sum(1) / w.sum(1).clamp_min(1.0)

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def __getitem__(self, index) -> "Conditioning":
        return Conditioning(self.embeds[index], self.mask[index])

    def to(self, device=None, dtype=None) -> "Conditioning":
        return Conditioning(self.embeds.to(device=device, dtype=dtype), self.mask.to(device=device))


class Backbone(Protocol):
    """A flow-matching denoiser in DESIGN §2 conventions.

    An adapter wraps one diffusers transformer (``adapter.transformer``) and is built from it alone,
    ``type(adapter)(transformer)``: the student attaches its LoRA adapters to that module, and merging them
    rebuilds one adapter per step around a plain copy.
    """

    transformer: nn.Module
    num_blocks: int

    def velocity(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        """``x``: ``(B, C, H, W)`` state at noise level ``sigma`` ``(B,)``; returns ``v = eps - x``, same shape."""
        ...

    def features(self, x: Tensor, sigma: Tensor, cond: Conditioning, blocks: Sequence[int]) -> list[Tensor]:
        """Image-token hidden states after each of ``blocks``, as ``(B, dim, H/p, W/p)`` maps."""
        ...

    def shard_units(self) -> list[nn.Module]:
        """The transformer's blocks, each one FSDP2 unit (``engine/distributed.shard_backbone``)."""
        ...

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        ...
