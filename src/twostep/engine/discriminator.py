"""Discriminator: small heads on the frozen teacher's block features of renoised images (DESIGN §3).

``D(x) = sum_b head_b(features_b(renoise(x, sigma_d, n)), sigma_d, pooled text)``. The feature network is the
teacher itself (LoRA: adapters disabled), never trained; only the heads are. For the generator the features
keep their graph (frozen is not no_grad); for the discriminator step they are computed without one.

``blocks`` may name any block of the teacher, late ones included (about 75-99% depth sees fine detail that early
blocks do not; the feature pass stops after the deepest block listed, so a late block costs forward compute).

Regularisers of the heads (``r1_weight > 0``):

- ``r1: approx`` (default): ``E (D(x_r + delta) - D(x_r))^2`` with ``delta ~ N(0, (r1_sigma * rms(x_r))^2)`` on
  the renoised real input ``x_r``, as NVIDIA FastGen (``dmd2.py``) and APT do. Both teacher feature passes run under
  no_grad, so only the heads get gradients: no double backward and no graph through a 6B teacher. For small
  ``delta`` it is ``~ r1_sigma^2 rms^2 ||grad_x D||^2``, a scaled finite-difference R1 (it vanishes as
  ``r1_sigma -> 0``; choose ``r1_weight`` for that scale).
- ``r1: exact``: ``E ||d D / d x_r||^2`` by autograd: the real pass keeps its graph through the teacher and the
  penalty's backward differentiates through it a second time (memory and time of a double backward). PyTorch's
  flash and memory-efficient attention kernels have no double backward, so that pass runs with the math kernel
  (:func:`twice_differentiable_attention`), which holds the full attention matrix.

``wrong_prompt_weight > 0`` adds fakes that are real images paired with another sample's prompt, so the heads must
also check the image against its text (see :func:`wrong_prompt_pairs`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from twostep.core.config import require
from twostep.engine import flow
from twostep.engine.backbone import Conditioning

Tensor = torch.Tensor
# feature_fn(x_noisy, sigma, cond, blocks) -> list of (B, dim, h, w)
FeatureFn = Callable[[Tensor, Tensor, Conditioning, Sequence[int]], list]


@dataclass
class DiscriminatorConfig:
    blocks: list[int] = field(default_factory=lambda: [1, 3])
    hidden: int = 64
    loss: Literal["hinge", "non_saturating"] = "hinge"
    r1_weight: float = 0.0
    # approx: logit change under a small perturbation of the real input, heads only (no second backward through the
    # teacher; the default). exact: the gradient penalty by autograd through the teacher (a double backward).
    r1: Literal["approx", "exact"] = "approx"
    r1_sigma: float = 0.01  # approx R1: perturbation std relative to the per-sample RMS of the renoised real input
    # real images paired with another sample's prompt count as fake with this weight (0 = off)
    wrong_prompt_weight: float = 0.0
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
        require(0 < self.r1_sigma <= 1, "r1_sigma",
                "must be in (0, 1] (the relative size of the approximate R1's perturbation)")
        require(self.wrong_prompt_weight >= 0, "wrong_prompt_weight", "must be >= 0 (0 turns wrong-prompt fakes off)")
        require(-10 <= self.sigma_mean <= 10, "sigma_mean", "must be in [-10, 10] (logit-normal mean of sigma_d)")
        require(0 < self.sigma_std <= 10, "sigma_std", "must be in (0, 10] (logit-normal std of sigma_d)")


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


def d_real_loss(real_logits: Tensor, kind: str) -> Tensor:
    """The discriminator's loss on logits it should call real."""
    return F.relu(1 - real_logits).mean() if kind == "hinge" else F.softplus(-real_logits).mean()


def d_fake_loss(fake_logits: Tensor, kind: str) -> Tensor:
    """The discriminator's loss on logits it should call fake."""
    return F.relu(1 + fake_logits).mean() if kind == "hinge" else F.softplus(fake_logits).mean()


def d_loss(real_logits: Tensor, fake_logits: Tensor, kind: str) -> Tensor:
    return d_real_loss(real_logits, kind) + d_fake_loss(fake_logits, kind)


def g_loss(fake_logits: Tensor, kind: str) -> Tensor:
    if kind == "hinge":
        return -fake_logits.mean()
    return F.softplus(-fake_logits).mean()


def r1_penalty(real_logits: Tensor, real_input: Tensor) -> Tensor:
    """Exact R1: ``E ||d D / d x_real||^2`` (``real_input`` must require grad and feed ``real_logits``).

    Its backward differentiates the input gradient again: through the whole teacher when ``real_logits`` came from
    teacher features with a graph. See :func:`approx_r1_penalty` for the variant that avoids that.
    """
    (grad,) = torch.autograd.grad(real_logits.sum(), real_input, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def twice_differentiable_attention():
    """Context for an exact R1 pass: ``scaled_dot_product_attention`` on its math kernel (the fused kernels raise
    "derivative for ... _scaled_dot_product_flash_attention... backward is not implemented" in a double backward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def perturb(x: Tensor, relative_sigma: float, generator: torch.Generator) -> Tensor:
    """``x + relative_sigma * rms(x_i) * n`` with ``n ~ N(0, I)`` drawn from ``generator`` (per-sample RMS, so the
    size means the same for unit-scale latents and for [-1, 1] pixels)."""
    rms = x.detach().float().pow(2).flatten(1).mean(1).sqrt().clamp_min(1e-6)
    n = torch.randn(x.shape, generator=generator).to(device=x.device, dtype=x.dtype)
    return x + relative_sigma * rms.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))) * n


def approx_r1_penalty(real_logits: Tensor, perturbed_logits: Tensor) -> Tensor:
    """Approximate R1 (FastGen / APT): ``E (D(x + delta) - D(x))^2``.

    Both logits come from teacher features computed under no_grad, so the penalty's gradient reaches the heads only:
    first-order, one backward, nothing through the teacher.
    """
    return (perturbed_logits.float() - real_logits.float()).pow(2).mean()


def wrong_prompt_pairs(prompt_index: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Pair each sample with another sample of the batch whose prompt differs: ``(rows, partners)``, both ``(M,)``.

    Real image ``rows[j]`` shown with the conditioning of ``partners[j]`` is a wrong-prompt fake. The partner is
    drawn uniformly among the samples with a different prompt index; a sample with no such partner in the batch (all
    prompts equal to its own) is skipped, so ``M <= B`` and every pair has two different prompts.
    """
    index = prompt_index.detach().cpu()
    different = index[:, None] != index[None, :]
    rows = torch.nonzero(different.any(1)).flatten()
    if rows.numel() == 0:
        return rows, rows.clone()
    partners = torch.multinomial(different[rows].float(), 1, generator=generator).flatten()
    return rows, partners
