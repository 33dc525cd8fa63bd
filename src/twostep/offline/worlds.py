"""Worlds: what the engine is distilled *on*. Each one answers the same few questions (the :class:`World` interface).

- ``digits``: sklearn's real 8x8 handwritten digits. Fast; the default demo and the tests. Its 2-step failure is
  mode-averaging, not blur.
- ``detail``: generated sharp 16x16 RGB patterns, where a 2-step sampler's blur is measurable.
- ``zimage``: the real model (``worlds/zimage``): prompt files, cached Qwen3 embeddings and pipeline latents; it
  plugs into the same engine through its teacher-data cache rather than this interface's image sampler.

The engine (``engine/``: ``flow``, ``student``, ``discriminator``, ``recipe``, ``train``, ``teacher_data``,
``checkpoint``) imports nothing from here; ``teacher.py``, ``distill.py``, ``evaluate.py``, ``demo`` and ``bench`` do,
through :func:`get_world`, and ``cli``, ``export`` and ``plan`` reach ``worlds/zimage`` directly.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from twostep.core.errors import TwostepError

Tensor = torch.Tensor


class Evaluator(Protocol):
    heldout: object  # ``len(heldout)`` = number of held-out real images FD is measured against
    heldout_accuracy: float

    def features(self, images: Tensor) -> np.ndarray: ...

    def score(self, images: Tensor, labels: Tensor) -> dict[str, float]:
        """``fd_real``, ``class_accuracy``, ``diversity`` and any world-specific metrics of ``images``."""
        ...

    def real_floor(self, num_samples: int) -> dict[str, float]: ...


class World(Protocol):
    name: str
    class_names: list[str]
    image_shape: tuple[int, int, int]  # (C, H, W) in pixel space, values in [-1, 1]

    def prompts(self) -> list[str]:
        """One prompt per class, index = class label."""
        ...

    def sample_real(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        """Real training images ``(N, C, H, W)`` of classes ``labels`` (teacher training, ``real_source: data``)."""
        ...

    def training_batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(images, labels)`` for one teacher training step."""
        ...

    def build_evaluator(self, seed: int) -> Evaluator: ...


class DigitsWorld:
    name = "digits"
    image_shape = (1, 8, 8)

    def __init__(self, heldout_fraction: float = 0.3, split_seed: int = 0):
        from twostep.offline.digits.data import NUM_CLASSES, load_digit_splits

        self.class_names = [str(d) for d in range(NUM_CLASSES)]
        self.train, self.heldout = load_digit_splits(heldout_fraction, split_seed)
        self._by_class = [self.train.images[self.train.labels == c] for c in range(NUM_CLASSES)]

    def prompts(self) -> list[str]:
        from twostep.offline.digits.data import class_prompts

        return class_prompts()

    def sample_real(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        picks = [pool[torch.randint(0, len(pool), (1,), generator=generator)]
                 for pool in (self._by_class[c] for c in labels.tolist())]
        return torch.cat(picks)

    def training_batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        index = torch.randint(0, len(self.train), (batch_size,), generator=generator)  # the shipped teacher's order
        return self.train.images[index], self.train.labels[index]

    def build_evaluator(self, seed: int) -> Evaluator:
        from twostep.offline.digits.evaluator import Evaluator as DigitsEvaluator

        return DigitsEvaluator(self.train, self.heldout, seed=seed)


class DetailWorld:
    name = "detail"

    def __init__(self, heldout_fraction: float = 0.3, split_seed: int = 0):
        from twostep.offline.detail.data import CLASS_NAMES, SIZE

        self.class_names = list(CLASS_NAMES)
        self.image_shape = (3, SIZE, SIZE)

    def prompts(self) -> list[str]:
        from twostep.offline.detail.data import class_prompts

        return class_prompts()

    def sample_real(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        from twostep.offline.detail.data import generate

        return generate(labels, generator)

    def training_batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        labels = torch.randint(0, len(self.class_names), (batch_size,), generator=generator)
        return self.sample_real(labels, generator), labels

    def build_evaluator(self, seed: int) -> Evaluator:
        from twostep.offline.detail.evaluator import DetailEvaluator

        return DetailEvaluator(seed=seed)


WORLDS = {"digits": DigitsWorld, "detail": DetailWorld}


def get_world(name: str, heldout_fraction: float = 0.3, split_seed: int = 0) -> World:
    if name not in WORLDS:
        raise TwostepError(f"unknown world {name!r}; known: {', '.join(WORLDS)}")
    return WORLDS[name](heldout_fraction, split_seed)
