"""Discriminator: small heads on the frozen teacher's block features of renoised images (DESIGN §3).

``D(x) = sum_b head_b(features_b(renoise(x, sigma_d, n)), sigma_d, pooled text)``. The feature network is the
teacher itself (LoRA: adapters disabled), never trained; only the heads are. For the generator the features
keep their graph (frozen is not no_grad); for the discriminator step they are computed without one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from . import flow
from .backbones.base import Conditioning
from .config import require

Tensor = torch.Tensor
# feature_fn(x_noisy, sigma, cond, blocks) -> list of (B, dim, h, w)
FeatureFn = Callable[[Tensor, Tensor, Conditioning, Sequence[int]], list]


@dataclass
class DiscriminatorConfig:
    blocks: list[int] = field(default_factory=lambda: [1, 3])
    hidden: int = 64
    loss: Literal["hinge", "non_saturating"] = "hinge"
    r1_weight: float = 0.0
    # logit-normal sigma_d. Measured on the toy: centred at 0 (median sigma 0.5) the heads barely separate
    # teacher-8 from naive-2 outputs (accuracy ~0.6 after 150 steps); at -1.0 / -1.5 they reach ~0.8.
    sigma_mean: float = -1.0
    sigma_std: float = 1.0
    # LayerNorm (no affine) on the pooled prompt features: Qwen3 hidden states carry a few huge outlier channels
    # that would dominate the FiLM conditioning. Off for the toy's tiny encoder (its results were measured without).
    text_norm: bool = False

    def validate(self) -> None:
        require(len(self.blocks) >= 1 and min(self.blocks) >= 0, "blocks", "must list block indices >= 0")
        require(self.hidden >= 8 and self.hidden % 8 == 0, "hidden", "must be a multiple of 8")
        require(self.r1_weight >= 0, "r1_weight", "must be >= 0")


def sigma_embedding(sigma: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of ``sigma`` ``(B,)`` -> ``(B, dim)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=sigma.device) / half)
    angles = sigma.float()[:, None] * 1000.0 * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class FeatureHead(nn.Module):
    """conv -> GroupNorm -> FiLM(cond) -> SiLU -> conv -> per-location logits, averaged to ``(B,)``."""

    def __init__(self, feature_dim: int, cond_dim: int, hidden: int):
        super().__init__()
        self.conv_in = nn.Conv2d(feature_dim, hidden, 3, padding=1)
        self.norm = nn.GroupNorm(8, hidden)
        self.film = nn.Linear(cond_dim, 2 * hidden)
        self.conv_mid = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.to_logit = nn.Conv2d(hidden, 1, 1)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, feats: Tensor, cond: Tensor) -> Tensor:
        h = self.norm(self.conv_in(feats.float()))
        scale, shift = self.film(cond).chunk(2, dim=-1)
        h = F.silu(h * (1 + scale[:, :, None, None]) + shift[:, :, None, None])
        h = F.silu(self.conv_mid(h))
        return self.to_logit(h).mean(dim=(1, 2, 3))


class Discriminator(nn.Module):
    """Heads over the teacher's features; conditioned on ``sigma_d`` and the pooled prompt features."""

    def __init__(self, feature_dim: int, text_dim: int, cfg: DiscriminatorConfig):
        super().__init__()
        self.cfg = cfg
        cond_dim = 2 * cfg.hidden
        self.sigma_mlp = nn.Sequential(nn.Linear(cond_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        self.text_proj = nn.Linear(text_dim, cond_dim)
        self.heads = nn.ModuleList(FeatureHead(feature_dim, cond_dim, cfg.hidden) for _ in cfg.blocks)

    def forward(self, features: Sequence[Tensor], sigma: Tensor, cond: Conditioning) -> Tensor:
        text = cond.pooled()
        if self.cfg.text_norm:
            text = F.layer_norm(text, text.shape[-1:])
        c = self.sigma_mlp(sigma_embedding(sigma, self.text_proj.out_features)) + self.text_proj(text)
        return sum(head(f, c) for head, f in zip(self.heads, features))

    def score(self, feature_fn: FeatureFn, x: Tensor, sigma: Tensor, noise: Tensor, cond: Conditioning) -> Tensor:
        """Logits ``(B,)`` of clean images ``x`` seen at noise level ``sigma`` with noise ``noise``."""
        noisy = flow.renoise(x, noise, sigma)
        return self(feature_fn(noisy, sigma, cond, self.cfg.blocks), sigma, cond)


# --------------------------------------------------------------------------- losses


def d_loss(real_logits: Tensor, fake_logits: Tensor, kind: str) -> Tensor:
    if kind == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_loss(fake_logits: Tensor, kind: str) -> Tensor:
    if kind == "hinge":
        return -fake_logits.mean()
    return F.softplus(-fake_logits).mean()


def r1_penalty(real_logits: Tensor, real_input: Tensor) -> Tensor:
    """``E ||d D / d x_real||^2`` (``real_input`` must require grad and feed ``real_logits``)."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real_input, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()
