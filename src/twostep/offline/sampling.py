"""Batched generation over any :class:`~twostep.engine.backbone.Backbone` with the Euler sampler of ``flow.py``."""

from __future__ import annotations

import torch

from twostep.engine import flow
from twostep.engine.backbone import Backbone, Conditioning

Tensor = torch.Tensor


def make_noise(num: int, shape: tuple[int, ...], seed: int) -> Tensor:
    """``(num, *shape)`` standard normal noise from a fixed seed (CPU generator: same on every machine)."""
    return torch.randn((num, *shape), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def generate(backbone: Backbone, noise: Tensor, cond: Conditioning, num_steps: int, shift: float = 3.0,
             batch_size: int = 256, device=None) -> Tensor:
    """The teacher's sampler: ``num_steps`` Euler steps on the Turbo schedule. Returns ``(N, C, H, W)`` on CPU."""
    sigmas = flow.turbo_sigmas(num_steps, shift)
    out = []
    for start in range(0, noise.shape[0], batch_size):
        x = noise[start:start + batch_size].to(device)
        c = cond[start:start + batch_size].to(device)
        out.append(flow.euler_sample(lambda xs, s, i: backbone.velocity(xs, s, c), x, sigmas).cpu())
    return torch.cat(out)
