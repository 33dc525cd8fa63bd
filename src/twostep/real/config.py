"""The real path's distillation config (``twostep train --config zimage_turbo_2step_lora``): one YAML holds the
pipeline, the teacher-data cache settings, the student, the discriminator, the recipe and the loop."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from twostep.core.config import require
from twostep.core.dtypes import DTYPES
from twostep.core.utils import check_device_name
from twostep.engine.discriminator import DiscriminatorConfig
from twostep.engine.recipe import RecipeConfig
from twostep.engine.student import StudentConfig
from twostep.engine.train_config import DistillTrainConfig
from twostep.real.evaluation.training import TrainEvalConfig
from twostep.real.teacher_data import ZImageDataConfig


@dataclass
class ZImageModelConfig:
    path: str = "Tongyi-MAI/Z-Image-Turbo"  # diffusers pipeline folder or hub id
    dtype: str = "bfloat16"  # the frozen base; LoRA adapters and discriminator heads train in fp32
    device: str = "auto"

    def validate(self) -> None:
        require(self.dtype in DTYPES, "dtype", f"must be one of {sorted(DTYPES)}")
        require(check_device_name(self.device), "device",
                f"must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        require(bool(self.path.strip()), "path", "must name a Z-Image pipeline folder or hub id")


def _real_train_defaults() -> DistillTrainConfig:
    return DistillTrainConfig(steps=2000, batch_size=4, g_lr=1e-4, d_lr=2e-4, warmup_steps=100, bf16=True,
                              gradient_checkpointing=True, log_every=10, sample_every=250, eval_every=0,
                              checkpoint_every=250, ema_decay=0.999, d_warmup_steps=50, fsdp_param_dtype="bfloat16")


@dataclass
class ZImageDistillConfig:
    model: ZImageModelConfig = field(default_factory=ZImageModelConfig)
    data_dir: str = "runs/zimage/teacher_data"  # written by `twostep teacher-data --prompts ...`
    teacher_data: ZImageDataConfig = field(default_factory=ZImageDataConfig)
    student: StudentConfig = field(default_factory=lambda: StudentConfig(lora_rank=64, lora_alpha=64.0))
    # heads on early, middle and late blocks of 30 (block 26 is ~87% deep: fine detail); see the YAML
    discriminator: DiscriminatorConfig = field(default_factory=lambda: DiscriminatorConfig(
        blocks=[7, 15, 23, 26], hidden=256, text_norm=True, r1="approx", r1_weight=0.1))
    # the paper's recipe with the discriminator fixes, as measured on the detail world (docs/results.md)
    recipe: RecipeConfig = field(default_factory=lambda: RecipeConfig(adv_ramp_steps=200))
    train: DistillTrainConfig = field(default_factory=_real_train_defaults)
    # what `train.eval_every` evaluates (the smoke set, a few metrics; see twostep.real.evaluation.training); unset = the
    # defaults, so configs saved before this section existed still resume without a config change
    evaluation: TrainEvalConfig | None = None

    def validate(self) -> None:
        require(list(self.student.sigmas) == list(self.teacher_data.student_sigmas), "student.sigmas",
                "must equal teacher_data.student_sigmas (the cache holds the teacher states there)")
        require(self.recipe.real_source == "teacher", "recipe.real_source",
                "must be 'teacher' on the real path (no natural-image set is wired in)")
        require(not (self.recipe.uses_dmd and self.teacher_data.guidance_scale > 1), "recipe.dmd_weight",
                "must be 0 with a guided teacher (teacher_data.guidance_scale > 1): DMD's real score is the teacher "
                "without guidance, so it would pull the student toward the unguided distribution, not the cache's")


def is_real_config(path: str | None) -> bool:
    """A YAML with a top-level ``model:`` section (a pipeline ``path``/``dtype``/``device``) or a ``data_dir``
    configures the real path. The toy's has ``teacher:``; a toy *teacher* config's ``model:`` holds network sizes
    and is not a distillation config at all (loading it as one names the bad key)."""
    if not path or not os.path.isfile(path):
        return False
    from twostep.core.config import read_yaml

    data = read_yaml(path) or {}
    model = data.get("model")
    toy_model = isinstance(model, dict) and bool(set(model) & {"dim", "n_layers", "n_heads", "patch_size"})
    return "teacher" not in data and (("model" in data and not toy_model) or "data_dir" in data)
