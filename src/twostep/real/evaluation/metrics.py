"""Pure metric functions (no model loading, no I/O). Which library computes what:

- :func:`frechet_distance`: torchmetrics ``FrechetInceptionDistance`` given a feature module that passes
  precomputed features through (:class:`PrecomputedFeatures`), so any feature space (DINOv2, CLIP) works and
  neither torchvision nor torch-fidelity is needed;
- :func:`kernel_distance`: torchmetrics ``KernelInceptionDistance``, the same way (cubic polynomial kernel,
  unbiased MMD², averaged over random subsets drawn from a fixed seed);
- :func:`psnr` / :func:`ssim`: torchmetrics' functional PSNR and SSIM (Gaussian window 11, sigma 1.5), per image;
- :func:`high_band` / :func:`sharpness_ratio`: the detail world's high-band spectral energy
  (:func:`twostep.core.image_stats.high_band_energy`, one definition for both), per image;
- :func:`clip_similarity` / :func:`clip_score`: torchmetrics ``CLIPScore``'s formula (``max(mean(100 * cos(image,
  text)), 0)``) on embeddings from :mod:`twostep.real.evaluation.feature_models` (torchmetrics 1.9's class itself reads
  the feature outputs of transformers 4 and fails on transformers 5's; a test checks the two agree).

Images are ``uint8`` tensors ``(N, 3, H, W)`` (what the samplers decode to and what is stored) unless a
docstring says otherwise; features are float ``(N, D)``.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from twostep.core.image_stats import high_band_energy

Tensor = torch.Tensor


class PrecomputedFeatures(nn.Module):
    """The "feature extractor" handed to torchmetrics: features are computed once per image set by the feature
    model and reused for every pair of sets, so this module only checks their width and passes them on."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)  # torchmetrics reads this instead of probing with a dummy image

    def forward(self, feats: Tensor) -> Tensor:
        if feats.dim() != 2 or feats.shape[1] != self.num_features:
            raise ValueError(f"expected features (N, {self.num_features}), got {tuple(feats.shape)}")
        return feats


def _check_pair(a: Tensor, b: Tensor, what: str) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"{what}: expected two (N, D) feature sets of the same D, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"{what}: needs at least 2 samples in each set, got {len(a)} and {len(b)}")


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to ``feats_a`` ``(N, D)`` and ``feats_b`` ``(M, D)``:
    ``|mu_a - mu_b|² + Tr(S_a + S_b - 2 (S_a S_b)^½)`` with unbiased covariances, in float64 (torchmetrics FID)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    _check_pair(feats_a, feats_b, "frechet_distance")
    metric = FrechetInceptionDistance(feature=PrecomputedFeatures(feats_a.shape[1]))
    metric.update(feats_a.detach().double().cpu(), real=True)
    metric.update(feats_b.detach().double().cpu(), real=False)
    return float(metric.compute())


def kernel_distance(feats_a: Tensor, feats_b: Tensor, subset_size: int = 1000, subsets: int = 100,
                    seed: int = 0) -> tuple[float, float]:
    """Kernel distance (KID) between ``feats_a`` ``(N, D)`` and ``feats_b`` ``(M, D)``: unbiased MMD² with the
    kernel ``k(x, y) = (x·y / D + 1)³``, mean and standard deviation over ``subsets`` random subsets of
    ``min(subset_size, N, M)`` samples each (torchmetrics KID). Unbiased: about 0 for two sets of one
    distribution, and usable on small sets where FD is dominated by its bias. ``seed`` fixes the subsets."""
    from torchmetrics.image.kid import KernelInceptionDistance

    _check_pair(feats_a, feats_b, "kernel_distance")
    size = min(subset_size, len(feats_a), len(feats_b))
    with warnings.catch_warnings():  # "will save all extracted features": they are already all in memory
        warnings.filterwarnings("ignore", message=".*save all extracted features.*")
        metric = KernelInceptionDistance(feature=PrecomputedFeatures(feats_a.shape[1]), subsets=subsets,
                                         subset_size=size)
    metric.update(feats_a.detach().double().cpu(), real=True)
    metric.update(feats_b.detach().double().cpu(), real=False)
    with torch.random.fork_rng(devices=[]):  # the subsets come from torch's global RNG: fix it, restore it after
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def to_unit(images: Tensor) -> Tensor:
    """``uint8 (N, 3, H, W)`` -> float in [0, 1]."""
    return images.float() / 255.0


def psnr(images: Tensor, reference: Tensor) -> Tensor:
    """Per-image PSNR in dB of ``images`` against ``reference`` (both uint8 ``(N, 3, H, W)``, paired by index);
    ``inf`` for identical images. Returns ``(N,)``."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    _check_images(images, reference, "psnr")
    return peak_signal_noise_ratio(to_unit(images), to_unit(reference), data_range=1.0, reduction="none",
                                   dim=(1, 2, 3))


def ssim(images: Tensor, reference: Tensor) -> Tensor:
    """Per-image SSIM of ``images`` against ``reference`` (uint8 ``(N, 3, H, W)``, at least 11 px a side).
    Returns ``(N,)`` in [-1, 1], 1 for identical images."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    _check_images(images, reference, "ssim")
    return structural_similarity_index_measure(to_unit(images), to_unit(reference), data_range=1.0,
                                               reduction="none")


def high_band(images: Tensor) -> Tensor:
    """Per-image high-band spectral energy (the detail world's definition: mean power above 0.25 cycles/px, mean
    removed, over channels) of uint8 ``(N, 3, H, W)`` images. Returns ``(N,)``. One image at a time: a batch of
    1024² FFTs would need gigabytes."""
    return torch.tensor([high_band_energy(to_unit(images[i:i + 1]) * 2 - 1) for i in range(len(images))],
                        dtype=torch.float64)


def sharpness_ratio(images: Tensor, reference: Tensor) -> float:
    """Mean high-band energy of ``images`` over that of ``reference`` (the teacher's 8-step images): 1 = as much
    fine detail as the teacher, below 1 = blurrier (the detail world's high-band ratio)."""
    ref = float(high_band(reference).mean())
    return float(high_band(images).mean()) / ref if ref > 0 else math.nan


def clip_similarity(image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
    """``100 * cos(image_i, text_i)`` per pair. ``image_embeds``, ``text_embeds``: ``(N, D)`` projected CLIP
    embeddings, paired by index. Returns ``(N,)``."""
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(f"clip similarity: {tuple(image_embeds.shape)} image and {tuple(text_embeds.shape)} text "
                         "embeddings")
    return 100 * nn.functional.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)


def clip_score(similarities) -> float:
    """torchmetrics ``CLIPScore``: the mean of :func:`clip_similarity` over a set, floored at 0."""
    values = torch.as_tensor(similarities, dtype=torch.float64)
    return max(float(values.mean()), 0.0)


def _check_images(images: Tensor, reference: Tensor, what: str) -> None:
    if images.shape != reference.shape or images.dim() != 4:
        raise ValueError(f"{what}: expected paired (N, 3, H, W) images, got {tuple(images.shape)} and "
                         f"{tuple(reference.shape)}")


def finite_or_none(value: float | None) -> float | None:
    """For JSON: NaN and infinity become None (``metrics.json`` stays strict JSON)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
