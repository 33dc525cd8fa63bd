"""The detail world's judge: metrics that see blur.

- FD in the features of a small conv net trained here (deterministically) to classify the ten classes;
- class accuracy of the prompt;
- ``high_band``: mean spectral energy above 0.25 cycles/px (per image, mean removed); divided by the teacher's
  8-step value it is the *high-band ratio* (1 = as detailed as the teacher, < 1 = blurrier);
- ``edge_width`` in pixels on the shape classes (square, disc): contrast over the steepest gradients, about 1 px
  for an anti-aliased edge and wider when blurred;
- per-prompt diversity, as in the digits world.

FD is biased by sample count: compare FDs only at equal counts and with the same evaluator.
"""

from __future__ import annotations

import torch
from torch import nn

from twostep.core.image_stats import HIGH_BAND_CUTOFF, high_band_energy  # noqa: F401  (HIGH_BAND_CUTOFF: re-exported)
from twostep.offline.detail.data import NUM_CLASSES, SHAPE_CLASSES, generate
from twostep.offline.digits.evaluator import ClassifierEvaluator, trained_once


class DetailClassifier(nn.Module):
    """Three convs, global average pool: the 64-d pooled activations are the evaluation feature space."""

    def __init__(self, width: int = 32, feature_dim: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, feature_dim, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(feature_dim, NUM_CLASSES)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, 16, 16)`` in [-1, 1] -> ``(N, feature_dim)``."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def train_classifier(seed: int = 0, steps: int = 400, batch_size: int = 128) -> DetailClassifier:
    """Trained on freshly generated images, with fixed seeds on one thread so the feature space never changes;
    once per process for each argument set (:func:`trained_once`: 20 s on 2 cores)."""
    return trained_once(("detail", seed, steps, batch_size), seed, lambda: _train_classifier(seed, steps, batch_size))


def _train_classifier(seed: int, steps: int, batch_size: int) -> DetailClassifier:
    gen = torch.Generator().manual_seed(10_000 + seed)
    model = DetailClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(steps):
        labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=gen)
        x = generate(labels, gen) + 0.05 * torch.randn(batch_size, 3, 16, 16, generator=gen)
        loss = nn.functional.cross_entropy(model(x), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


def edge_width(images: torch.Tensor, top_k: int = 12) -> float:
    """Mean edge width in pixels: (luminance range) / (mean of the ``top_k`` steepest gradient magnitudes)."""
    lum = images.float().clamp(-1, 1).mean(dim=1)  # (N, H, W)
    gx = lum[:, :, 1:] - lum[:, :, :-1]
    gy = lum[:, 1:, :] - lum[:, :-1, :]
    grad = torch.sqrt(gx[:, :-1, :] ** 2 + gy[:, :, :-1] ** 2).flatten(1)
    flat = lum.flatten(1)
    contrast = flat.quantile(0.98, dim=1) - flat.quantile(0.02, dim=1)
    steep = grad.topk(top_k, dim=1).values.mean(1).clamp_min(1e-4)
    keep = contrast > 0.2  # a flat image has no edge to measure
    if not keep.any():
        return float("nan")
    return float((contrast[keep] / steep[keep]).mean())


class DetailEvaluator(ClassifierEvaluator):
    """Holds the classifier and a fixed held-out set of real images; scores batches of generated ones."""

    def __init__(self, seed: int = 0, heldout_samples: int = 1000, heldout_seed: int = 777,
                 classifier_steps: int = 400):
        self.classifier = train_classifier(seed=seed, steps=classifier_steps)
        gen = torch.Generator().manual_seed(heldout_seed)
        labels = torch.arange(heldout_samples) % NUM_CLASSES
        self.heldout_images, self.heldout_labels = generate(labels, gen), labels
        self.heldout = self.heldout_images  # len() = held-out count, as the digits evaluator
        self.heldout_feats = self.features(self.heldout_images)
        self.heldout_accuracy = self.accuracy(self.heldout_images, self.heldout_labels)

    def score(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        shapes = torch.isin(labels, torch.tensor(SHAPE_CLASSES))
        return {**super().score(images, labels), "high_band": high_band_energy(images),
                "edge_width": edge_width(images[shapes]) if shapes.any() else float("nan")}

    def real_floor(self, num_samples: int, seed: int = 0) -> dict[str, float]:
        """The same metrics for ``num_samples`` fresh real images (another seed than the held-out set)."""
        gen = torch.Generator().manual_seed(20_000 + seed)
        labels = torch.arange(num_samples) % NUM_CLASSES
        return self.score(generate(labels, gen), labels)
