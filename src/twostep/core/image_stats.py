"""Image statistics that the offline worlds and the real-model evaluation both measure."""

from __future__ import annotations

import torch

HIGH_BAND_CUTOFF = 0.25  # cycles per pixel


def high_band_energy(images: torch.Tensor, cutoff: float = HIGH_BAND_CUTOFF) -> float:
    """Mean power per image above ``cutoff`` cycles/px (radial), over all channels, mean removed.

    ``images``: ``(N, C, H, W)`` in [-1, 1] (clamped)."""
    x = images.float().clamp(-1, 1)
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(x).abs().pow(2) / (x.shape[-1] * x.shape[-2])
    fy = torch.fft.fftfreq(x.shape[-2])[:, None]
    fx = torch.fft.fftfreq(x.shape[-1])[None, :]
    band = torch.sqrt(fx ** 2 + fy ** 2) >= cutoff
    return float(power[..., band].sum(-1).mean())
