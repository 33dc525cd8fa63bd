"""The offline world's data: scikit-learn's 1,797 real 8x8 handwritten digits, with prompts.

Images are ``(N, 1, 8, 8)`` float32 in [-1, 1] (pixel space: the toy has no VAE). The held-out split is
fixed by a seed and stratified by class, so every FD is computed against the same real images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

PROMPT_TEMPLATE = "a handwritten digit {}"
NUM_CLASSES = 10


def class_prompts() -> list[str]:
    """The ten prompts, index = digit class."""
    return [PROMPT_TEMPLATE.format(d) for d in range(NUM_CLASSES)]


@dataclass
class DigitSplit:
    images: torch.Tensor  # (N, 1, 8, 8) in [-1, 1]
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)


def to_unit(pixels: np.ndarray) -> np.ndarray:
    """sklearn's digits are integers 0..16; map them to [-1, 1]."""
    return pixels.astype(np.float32) / 8.0 - 1.0


def load_digit_splits(heldout_fraction: float = 0.3, seed: int = 0) -> tuple[DigitSplit, DigitSplit]:
    """``(train, heldout)``: a stratified split of ``sklearn.datasets.load_digits`` (ships with sklearn)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = to_unit(digits.images)[:, None]
    y = digits.target.astype(np.int64)
    x_tr, x_ho, y_tr, y_ho = train_test_split(x, y, test_size=heldout_fraction, random_state=seed, stratify=y)
    return (DigitSplit(torch.from_numpy(x_tr), torch.from_numpy(y_tr)),
            DigitSplit(torch.from_numpy(x_ho), torch.from_numpy(y_ho)))


def balanced_labels(num_samples: int) -> torch.Tensor:
    """``0, 1, ..., 9, 0, 1, ...``: the prompt of each evaluation sample (balanced over classes)."""
    return torch.arange(num_samples) % NUM_CLASSES
