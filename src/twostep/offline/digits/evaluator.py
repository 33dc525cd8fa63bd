"""The offline world's judge: a small classifier trained on the real training digits.

No Inception/CLIP weights exist offline, so quality is measured in this classifier's feature space:

- Fréchet distance (FD) between feature Gaussians (own implementation with numpy/scipy linear algebra). FD is biased by
  sample count: compare FDs only at equal counts.
- class accuracy: does the image show the digit its prompt asked for?
- per-prompt diversity: mean pairwise feature distance between samples of the same prompt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from twostep.offline.digits.data import NUM_CLASSES, DigitSplit


class DigitClassifier(nn.Module):
    """MLP on the 64 pixels; the 64-d penultimate activations are the evaluation feature space."""

    def __init__(self, hidden: int = 256, feature_dim: int = 64):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, feature_dim),
                                  nn.ReLU())
        self.head = nn.Linear(feature_dim, NUM_CLASSES)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 1, 8, 8)`` in [-1, 1] -> ``(N, feature_dim)``."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


# what trained_once has trained in this process: key -> (frozen model, CPU RNG state right after its training)
_TRAINED: dict[tuple, tuple[nn.Module, torch.Tensor]] = {}


def trained_once(key: tuple, seed: int, train: Callable[[], nn.Module]) -> nn.Module:
    """The frozen classifier ``train()`` returns, trained the first time ``key`` is asked for in this process.

    ``train`` runs after ``torch.manual_seed(seed)`` on one thread: reduction order must not depend on the caller's
    thread count (a different classifier is a different feature space and shifts every FD). So the result is
    deterministic in its key, and a demo, its student's evaluation and a bench share one. A repeat call leaves the
    global RNG exactly as training would have, so what the caller draws next does not depend on the cache."""
    torch.manual_seed(seed)  # the CUDA generators too, on every call, as training would
    if key not in _TRAINED:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            model = train()
        finally:
            torch.set_num_threads(threads)
        _TRAINED[key] = (model, torch.get_rng_state())
    model, rng_after = _TRAINED[key]
    torch.set_rng_state(rng_after)
    return model


def train_classifier(train: DigitSplit, seed: int = 0, epochs: int = 60, batch_size: int = 64) -> DigitClassifier:
    """Deterministic: fixed seed, fixed batch order, one thread (:func:`trained_once`, keyed on the split's
    contents and the arguments)."""
    digest = hashlib.sha256(train.images.numpy().tobytes() + train.labels.numpy().tobytes()).hexdigest()
    return trained_once(("digits", digest, seed, epochs, batch_size), seed,
                        lambda: _train_classifier(train, seed, epochs, batch_size))


def _train_classifier(train: DigitSplit, seed: int, epochs: int, batch_size: int) -> DigitClassifier:
    gen = torch.Generator().manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    n = len(train)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            x = train.images[idx] + 0.1 * torch.randn(train.images[idx].shape, generator=gen)
            loss = nn.functional.cross_entropy(model(x), train.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval().requires_grad_(False)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """FD between Gaussians fitted to two ``(N, D)`` feature sets.

    ``tr sqrt(C_a C_b)`` is taken as ``sum sqrt(eig(C_a^1/2 C_b C_a^1/2))``: the same value, from a symmetric
    matrix, so it stays real and stable when a covariance is singular (dead ReLU units).
    """
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a = np.atleast_2d(np.cov(feats_a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(feats_b, rowvar=False))
    root_a = _sqrt_psd(cov_a)
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_sqrt = np.sqrt(np.clip(cross, 0, None)).sum()
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)
    return max(value, 0.0)  # a set against itself can come out as -1e-12


def per_prompt_diversity(feats: np.ndarray, labels: np.ndarray) -> float:
    """Mean over prompts of the mean pairwise L2 distance between that prompt's samples' features."""
    values = []
    for c in np.unique(labels):
        f = feats[labels == c]
        if len(f) < 2:
            continue
        d = np.sqrt(((f[:, None, :] - f[None, :, :]) ** 2).sum(-1))
        values.append(d.sum() / (len(f) * (len(f) - 1)))
    return float(np.mean(values)) if values else float("nan")


class ClassifierEvaluator:
    """Scores images in a trained classifier's feature space: FD to ``heldout_feats``, class accuracy, diversity.

    Subclasses set ``classifier`` (with ``features`` and logits ``forward``) and ``heldout_feats``.
    """

    classifier: nn.Module
    heldout_feats: np.ndarray

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> np.ndarray:
        return self.classifier.features(images.float().clamp(-1, 1)).double().numpy()

    @torch.no_grad()
    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        pred = self.classifier(images.float().clamp(-1, 1)).argmax(-1)
        return float((pred == labels).float().mean())

    def score(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Metrics of ``images`` ``(N, C, H, W)`` generated for prompts ``labels`` ``(N,)``."""
        feats = self.features(images)
        return {
            "fd_real": frechet_distance(feats, self.heldout_feats),
            "class_accuracy": self.accuracy(images, labels),
            "diversity": per_prompt_diversity(feats, labels.numpy()),
        }


class Evaluator(ClassifierEvaluator):
    """Holds the classifier and the held-out reference features; scores batches of generated digits."""

    def __init__(self, train: DigitSplit, heldout: DigitSplit, seed: int = 0):
        self.classifier = train_classifier(train, seed=seed)
        self.train, self.heldout = train, heldout
        self.heldout_feats = self.features(heldout.images)
        self.heldout_accuracy = self.accuracy(heldout.images, heldout.labels)

    def real_floor(self, num_samples: int, seed: int = 0) -> dict[str, float]:
        """The same metrics for ``num_samples`` real *training* digits: what a perfect generator would score."""
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self.train), generator=gen)[:num_samples]
        if len(idx) < num_samples:
            raise ValueError(f"only {len(self.train)} real training digits; ask for fewer samples")
        return self.score(self.train.images[idx], self.train.labels[idx])
