"""The bench's arms and budgets: the paper's recipe stated explicitly (``PAPER``), one change per arm (``ARMS``),
and what ``twostep bench --world NAME [--suite NAME]`` runs by default (``WORLD_BENCHES``).

Every arm is ``PAPER`` with its own overrides, except ``defaults``, which is the shipped config as it is, so the
ablations mean the same thing whatever the packaged defaults become (they are chosen by this bench).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from twostep.core.config import load_config, require, to_dict
from twostep.offline.distill import DistillConfig


# The recipe as the paper states it, set explicitly so the ablations mean the same thing whatever the defaults
# in configs/ become (they are chosen by this bench: the "defaults" arm). Includes the discriminator fixes of the
# adversarial core (issue 9): D-only warm-up, a ramp on the adversarial weight, approximate R1.
PAPER = ["student.params=decoupled", "student.form=lora", "student.renoise=euler", "recipe.real_source=teacher",
         "recipe.end_to_end=true", "recipe.step1_loss=intermediate", "recipe.adv_weight=1.0",
         "recipe.final_reg_weight=0.0", "recipe.student_inputs=own", "train.d_warmup_steps=20",
         "recipe.adv_ramp_steps=50", "discriminator.r1=approx", "discriminator.r1_weight=0.1"]
FULL = "full recipe"
DEFAULTS = "defaults"
LADD = "LADD"
REGRESSION = "regression only"
DMD2 = "DMD2"
DMD2_GAN = "DMD2 + GAN"
DMD2_SHIFTED = "DMD2, shifted σ"
DMD2_WIDE_FAKE = "DMD2, fake score rank 16"

# DMD2 as published, on top of PAPER: the distribution matching gradient on every step's output of the student's own
# chain (backward simulation), a fake-score LoRA trained 5x per generator step, no GAN; PAPER's D-only warm-up
# becomes the fake score's warm-up
DMD2_OVERRIDES = ["recipe.kind=dmd2", "recipe.dmd_weight=1.0", "recipe.adv_weight=0.0", "recipe.step1_loss=none",
                  "recipe.end_to_end=false", "recipe.adv_ramp_steps=0", "discriminator.r1_weight=0.0"]

# name -> (overrides on top of PAPER, what it tests); DEFAULTS takes the config as it is
ARMS: dict[str, tuple[list[str], str]] = {
    FULL: ([], "all three components as the paper states them (with the discriminator fixes)"),
    "real_source=data": (["recipe.real_source=data"], "component 1 removed: GAN reals are dataset images"),
    "params=shared": (["student.params=shared"], "component 2 removed: one parameter set for both steps"),
    "end_to_end=false": (["recipe.end_to_end=false"], "component 3 removed: detach between steps"),
    "step1_loss=none": (["recipe.step1_loss=none"], "component 3 removed: no step-1 regulariser"),
    "step1_loss=final": (["recipe.step1_loss=final"], "step-1 variant: regress x̂1 to the teacher's final"),
    "step1_loss=adversarial": (["recipe.step1_loss=adversarial"], "step-1 variant: GAN loss on x̂1 (D sees x̂1)"),
    "renoise=fresh": (["student.renoise=fresh"], "transition with fresh noise instead of Euler"),
    "form=full": (["student.form=full"], "decoupled by full per-step copies instead of LoRA"),
    "+ final_reg": (["recipe.final_reg_weight=1.0"], "the paper's recipe plus MSE of x̂2 to the teacher's output"),
    REGRESSION: (["recipe.adv_weight=0.0", "recipe.step1_loss=none", "recipe.final_reg_weight=1.0",
                  "discriminator.r1_weight=0.0"],
                 "reference: MSE to the teacher output through both steps, no GAN"),
    LADD: (["recipe.student_inputs=teacher_renoised", "recipe.step1_loss=adversarial", "recipe.final_reg_weight=0.0",
            "recipe.end_to_end=false"],
           "reference (LADD): step k's input is the teacher's output renoised to σ_k; adversarial loss only"),
    DEFAULTS: ([], "the shipped defaults of this world's config, chosen from this bench"),
    # DMD2 (issue 21), at the same budget
    DMD2: (DMD2_OVERRIDES,
           "reference (DMD2): distribution matching with a fake-score LoRA, backward simulation, no GAN"),
    # DMD2's GAN: on dataset images, at a weight scaled from DMD2's (5e-3 on SDXL's 65,536 latent values, 3e-3 on
    # ImageNet's 12,288) by the number of values per image: the DMD term's gradient per value is 1 / numel
    DMD2_GAN: (["recipe.kind=dmd2", "recipe.dmd_weight=1.0", "recipe.adv_weight=0.1", "recipe.step1_loss=none",
                "recipe.end_to_end=false", "recipe.real_source=data"],
               "reference (DMD2 + GAN): DMD2 with its GAN term on dataset images (weight 0.1)"),
    "DMD2 end-to-end": ([*DMD2_OVERRIDES, "recipe.end_to_end=true"],
                        "DMD2 trained end to end as Turbo++ (DMD on the final output only, gradient through both "
                        "steps)"),
    "Turbo++ + DMD": (["recipe.dmd_weight=1.0"], "the paper's recipe plus DMD2's distribution matching term"),
    # uniform levels put half of DMD's gradient below σ = 0.5, on fine detail; flow-matching ports of DMD shift them
    # toward noise as the sampling schedule is (shift 3 here): does that curb DMD2's over-sharpening?
    DMD2_SHIFTED: ([*DMD2_OVERRIDES, "recipe.dmd_sigma_shift=3.0"],
                   "DMD2 with its renoising levels time-shifted as the sampling schedule (shift 3)"),
    # DMD2 trains a full copy as its fake score; a rank-4 LoRA may lag the student's distribution
    DMD2_WIDE_FAKE: ([*DMD2_OVERRIDES, "student.fake_score_rank=16"],
                     "DMD2 with a fake-score LoRA of rank 16 (4x the student's)"),
    # the discriminator's strength and placement (issue 21): it ends near chance in every arm with teacher reals
    "D: every block": (["discriminator.blocks=[0,1,2,3]"], "heads on all 4 teacher blocks instead of blocks 1 and 3"),
    "D: wider heads": (["discriminator.hidden=128"], "heads twice as wide (128 channels)"),
    "D: lower σ_d": (["discriminator.sigma_mean=-2.0"], "σ_d logit-normal centred at -2 instead of -1 (less noise)"),
    "D: 2 updates per G": (["train.d_steps_per_g=2"], "two discriminator updates per generator update"),
}
ABLATIONS = ["real_source=data", "params=shared", "end_to_end=false", "step1_loss=none"]
# arms that change one thing of another arm (not of PAPER): the reading also compares each with that arm
VARIANT_OF = {DMD2_SHIFTED: DMD2, DMD2_WIDE_FAKE: DMD2}


def arm_overrides(name: str, common: list[str] | tuple = ()) -> list[str]:
    """PAPER (not for DEFAULTS), then the overrides ``common`` to every arm, then the arm's own change."""
    return ([] if name == DEFAULTS else list(PAPER)) + list(common) + list(ARMS[name][0])


@dataclass
class BenchConfig:
    seeds: int = 3
    steps: int = 100
    batch_size: int = 32
    eval_samples: int = 1000
    curve_every: int = 0  # evaluate every N generator steps (learning curves); 0 = endpoint only
    curve_samples: int = 500

    def validate(self) -> None:
        require(self.seeds >= 1, "seeds", "must be at least 1")
        require(self.steps >= 1, "steps", "must be at least 1")
        require(self.batch_size >= 1, "batch_size", "must be at least 1")
        require(self.eval_samples >= 20, "eval_samples", "must be at least 20 (two per prompt)")
        require(self.curve_samples >= 20, "curve_samples", "must be at least 20 (two per prompt)")
        require(self.curve_every >= 0, "curve_every", "must be >= 0 (0 = endpoint only)")


@dataclass
class WorldBench:
    """What ``twostep bench --world NAME`` runs by default: its config, arms and budget."""

    config: str
    arms: list[str]
    budget: BenchConfig
    quick_overrides: list[str]
    quick: BenchConfig  # --quick's budget: a few steps, and curves only where the full budget has them
    # other questions at the same budget (`--suite NAME`, their own section of docs/results.md): name -> arms
    suites: dict[str, list[str]] = dataclasses.field(default_factory=dict)


SUITE_DEFAULT = "ablations"
SUITE_TITLES = {"dmd2": "DMD2 against the paper's recipe",
                "discriminator": "The discriminator's strength and placement in the paper's recipe"}


QUICK = BenchConfig(seeds=1, steps=4, batch_size=8, eval_samples=40, curve_every=0, curve_samples=40)
QUICK_TEACHER = ["teacher.model.dim=32", "teacher.model.n_heads=2", "teacher.model.axes_dims=[4,6,6]",
                 "teacher.model.n_layers=4", "teacher.text.hidden_size=8", "teacher.train.steps=30",
                 "teacher.train.batch_size=32", "teacher.train.warmup_steps=5", "teacher_data.num_samples=64",
                 "teacher_data.shard_size=64", "teacher_data.batch_size=64", "student.lora_rank=4",
                 "discriminator.hidden=16", "teacher.eval.throughput_batch=8", "teacher.eval.throughput_repeats=1"]
# --quick shrinks PAPER's warm-ups to the 4-step budget; set after PAPER (and before the user's overrides and the
# arm's own change), or PAPER's 20 D-only updates would cost more than the 4 generator steps
QUICK_WARMUPS = ["train.d_warmup_steps=1", "recipe.adv_ramp_steps=2"]
WORLD_BENCHES = {
    # digits: the original ablation table (endpoints; 100 steps x 3 seeds)
    "digits": WorldBench("toy_demo", [a for a in ARMS if a not in (DMD2_GAN, DMD2_SHIFTED, DMD2_WIDE_FAKE,
                                                                  "DMD2 end-to-end", "Turbo++ + DMD")
                                      and not a.startswith("D: ")],
                         BenchConfig(), QUICK_TEACHER, QUICK),
    # detail: learning curves on the world where blur is measurable, 2 seeds. A detail step costs ~6x a digits step
    # on 2 CPU cores (64 image tokens, RGB), so 500 steps at batch 16 is what fits the 90-minute bar: 5x the digits
    # budget in generator steps, 2.5x in samples
    "detail": WorldBench("detail_demo",
                         [FULL, REGRESSION, "params=shared", "end_to_end=false", "real_source=data", LADD],
                         BenchConfig(seeds=2, steps=500, batch_size=16, eval_samples=1000, curve_every=50,
                                     curve_samples=500),
                         QUICK_TEACHER + ["teacher.model.axes_lens=[64,16,16]"],
                         dataclasses.replace(QUICK, curve_every=2),
                         # DMD2 against the paper's recipe (issue 21): the detail block's budget and seeds
                         suites={"dmd2": [FULL, DMD2, DMD2_GAN, DMD2_SHIFTED, DMD2_WIDE_FAKE],
                                 "discriminator": [FULL, "D: every block", "D: wider heads", "D: lower σ_d",
                                                   "D: 2 updates per G"]}),
}
CURVE_METRICS = ["gap_closure", "high_band_ratio", "d_accuracy", "d_logit_gap", "fake_score_loss",
                 "dmd_real_fake_gap"]


def defaults_arm(config_path: str | None, arm_names: list[str]) -> str | None:
    """The arm whose recipe the config's defaults are (student, discriminator, recipe and D schedule equal)."""
    def recipe_of(cfg) -> dict:
        d = to_dict(cfg)
        return {"student": d["student"], "discriminator": d["discriminator"], "recipe": d["recipe"],
                "d_warmup_steps": d["train"]["d_warmup_steps"]}

    shipped = recipe_of(load_config(DistillConfig, config_path))
    for name in arm_names:
        if name != DEFAULTS and recipe_of(load_config(DistillConfig, config_path, arm_overrides(name))) == shipped:
            return name
    return None
