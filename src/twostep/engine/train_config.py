"""The ``train`` section of a run's config, and what the loop reads of a whole run's config."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

from twostep.core.config import require
from twostep.core.dtypes import DTYPES
from twostep.engine.recipe import RecipeConfig


@dataclass
class DistillTrainConfig:
    steps: int = 250  # generator updates
    batch_size: int = 64  # the global batch of one update, over every process and micro-batch
    grad_accum_steps: int = 1  # micro-batches per update (each process splits its slice of the batch this way)
    g_lr: float = 2e-4
    d_lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.0, 0.99])
    weight_decay: float = 0.0
    d_steps_per_g: int = 1
    # distribution matching (recipe.dmd_weight > 0): fake-score updates per generator update (DMD2's two
    # time-scale rule: 5) and their learning rate (None = g_lr, as DMD2)
    fake_steps_per_g: int = 5
    fake_lr: float | None = None
    warmup_steps: int = 20  # learning-rate warm-up (both optimizers)
    # critic-only updates (the discriminator's, and the fake score's with distribution matching) before the first
    # generator update (not counted in `steps`; resume-safe)
    d_warmup_steps: int = 0
    grad_clip: float = 1.0
    ema_decay: float = 0.99
    bf16: bool = False
    gradient_checkpointing: bool = False
    log_every: int = 10
    sample_every: int = 100
    eval_every: int = 100  # 0 = no periodic evaluation
    checkpoint_every: int = 100
    keep_last: int = 2  # newest checkpoints kept
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0 = none)
    max_bad_steps: int = 5  # consecutive steps with a non-finite loss or gradient before the run stops
    seed: int = 0
    threads: int = 0
    # FSDP2 (student.form: full under torchrun): the dtype blocks compute in once gathered, and of the gradient
    # reduce-scatter (float32 and float32: no mixed precision)
    fsdp_param_dtype: str = "float32"
    fsdp_reduce_dtype: str = "float32"

    def validate(self) -> None:
        require(self.steps >= 1, "steps", "must be at least 1")
        require(self.batch_size >= 2, "batch_size", "must be at least 2")
        require(math.isfinite(self.g_lr) and self.g_lr > 0, "g_lr", "must be a positive number")
        require(math.isfinite(self.d_lr) and self.d_lr > 0, "d_lr", "must be a positive number")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "must be two values in [0, 1)")
        require(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(self.d_steps_per_g >= 1, "d_steps_per_g", "must be at least 1")
        require(self.fake_steps_per_g >= 1, "fake_steps_per_g", "must be at least 1")
        require(self.fake_lr is None or (math.isfinite(self.fake_lr) and self.fake_lr > 0), "fake_lr",
                "must be a positive number (or null: train.g_lr)")
        require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0 (0 = no learning-rate warm-up)")
        require(self.d_warmup_steps >= 0, "d_warmup_steps", "must be >= 0 (0 = no discriminator warm-up)")
        require(math.isfinite(self.grad_clip) and self.grad_clip > 0, "grad_clip",
                "must be a positive number (the largest gradient norm applied)")
        require(0 <= self.ema_decay < 1, "ema_decay", "must be in [0, 1)")
        for key in ("log_every", "sample_every", "checkpoint_every", "keep_last", "max_bad_steps"):
            require(getattr(self, key) >= 1, key, "must be at least 1")
        require(self.keep_every >= 0, "keep_every", "must be >= 0 (0 keeps only the newest keep_last)")
        require(self.eval_every >= 0, "eval_every", "must be >= 0 (0 turns periodic evaluation off)")
        require(self.seed >= 0, "seed", "must be >= 0")
        require(self.threads >= 0, "threads", "must be >= 0 (0 = torch's default)")
        require(self.grad_accum_steps >= 1, "grad_accum_steps", "must be at least 1 (1 = no accumulation)")
        require(self.batch_size % self.grad_accum_steps == 0, "batch_size",
                f"{self.batch_size} must be a multiple of train.grad_accum_steps ({self.grad_accum_steps})")
        for key in ("fsdp_param_dtype", "fsdp_reduce_dtype"):
            require(getattr(self, key) in DTYPES, key, f"must be one of {', '.join(DTYPES)}")


class RunConfig(Protocol):
    """What the loop reads of a run's config: ``train`` and ``recipe`` (``to_dict`` saves the whole of it).

    A world's wiring supplies the full dataclass: ``offline.distill.DistillConfig`` for the offline worlds,
    ``real.config.ZImageDistillConfig`` for the real path.
    """

    train: DistillTrainConfig
    recipe: RecipeConfig
