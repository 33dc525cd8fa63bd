"""The offline world's 8-step teacher: a tiny ``ZImageTransformer2DModel`` trained with flow matching.

It plays the part Z-Image-Turbo plays for real: a model that is good at 8 steps on the Turbo schedule
(shift 3) and clearly worse when run naively at 2. ``twostep train-teacher`` writes a run folder::

    RUN/config.yaml                resolved config (the run can be rebuilt from it alone)
    RUN/teacher.safetensors        EMA weights: what sampling, teacher data and the student use
    RUN/text/                      local tokenizer + tiny Qwen3 text encoder (diffusers/transformers format)
    RUN/prompt_embeds.safetensors  cached embeddings of the ten prompts
    RUN/train_log.jsonl            loss, lr, grad norm every ``log_every`` steps
    RUN/meta.json                  wall time, weight hash, versions
    RUN/state.pt                   resumable training state (``--resume``)
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .backbones.base import Conditioning
from .backbones.zimage import TinyZImageConfig, ZImageBackbone
from .config import load_config, require, save_config
from .engine import flow
from .engine.checkpoint import load_training_state, load_weights, rng_state, save_training_state, save_weights, \
    set_rng_state
from .errors import TwostepError
from .utils import ensure_writable_dir, file_sha256, is_main_process, progress, write_text
from .worlds import get_world
from .worlds.digits.world import PROMPT_CACHE, ToyDataConfig, ToyTextConfig, build_prompt_cache, load_prompt_table

WEIGHTS = "teacher.safetensors"
STATE = "state.pt"


@dataclass
class TeacherTrainConfig:
    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.998
    sigma_mean: float = 0.0  # logit-normal training noise levels, then shifted like the sampler
    sigma_std: float = 1.0
    sigma_shift: float = 1.0  # measured: 1.0 beats 3.0 at equal steps (FD 4.7 vs 6.9, 600 steps)
    log_every: int = 50
    checkpoint_every: int = 500
    threads: int = 0  # torch CPU threads; 0 = leave torch's default

    def validate(self) -> None:
        require(self.steps >= 1, "steps", "must be at least 1")
        require(self.batch_size >= 1, "batch_size", "must be at least 1")
        require(self.lr > 0, "lr", "must be positive")
        require(0.0 <= self.ema_decay < 1.0, "ema_decay", "must be in [0, 1)")
        require(self.sigma_std > 0 and self.sigma_shift > 0, "sigma_std", "and sigma_shift must be positive")
        require(self.log_every >= 1 and self.checkpoint_every >= 1, "log_every", "and checkpoint_every must be >= 1")


@dataclass
class SamplingConfig:
    steps: int = 8
    shift: float = 3.0

    def validate(self) -> None:
        require(1 <= self.steps <= 1000, "steps", "must be in [1, 1000]")
        require(self.shift > 0, "shift", "must be positive")


@dataclass
class EvalConfig:
    num_samples: int = 1000
    batch_size: int = 500
    seed: int = 1234  # noise seed of the evaluation set
    evaluator_seed: int = 0
    throughput_batch: int = 256
    throughput_repeats: int = 5

    def validate(self) -> None:
        from .config import require_seed

        require(self.num_samples >= 20, "num_samples", "must be at least 20 (two per prompt)")
        require(self.batch_size >= 1, "batch_size", "must be at least 1")
        require(self.throughput_batch >= 1, "throughput_batch", "must be at least 1")
        require(self.throughput_repeats >= 1, "throughput_repeats", "must be at least 1")
        require_seed(self.seed, "seed")
        require_seed(self.evaluator_seed, "evaluator_seed")


@dataclass
class TeacherConfig:
    world: str = "digits"  # digits | detail (src/twostep/worlds)
    seed: int = 0
    model: TinyZImageConfig = field(default_factory=TinyZImageConfig)
    text: ToyTextConfig = field(default_factory=ToyTextConfig)
    data: ToyDataConfig = field(default_factory=ToyDataConfig)
    train: TeacherTrainConfig = field(default_factory=TeacherTrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        from .worlds import WORLDS

        require(self.world in WORLDS, "world", f"must be one of {', '.join(WORLDS)}")

    def build_world(self):
        return get_world(self.world, self.data.heldout_fraction, self.data.split_seed)


@dataclass
class Teacher:
    """A loaded teacher run: frozen backbone + the cached prompt table (row = class of its world)."""

    backbone: ZImageBackbone
    prompts: list[str]
    prompt_table: Conditioning
    config: TeacherConfig
    run_dir: str

    def cond(self, labels: torch.Tensor) -> Conditioning:
        return self.prompt_table[labels]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.world.image_shape

    @property
    def num_classes(self) -> int:
        return len(self.prompts)

    @functools.cached_property
    def world(self):
        return self.config.build_world()


def build_backbone(cfg: TeacherConfig, cap_feat_dim: int) -> ZImageBackbone:
    in_channels = cfg.build_world().image_shape[0]
    return ZImageBackbone.from_config(cfg.model.to_diffusers(in_channels=in_channels, cap_feat_dim=cap_feat_dim),
                                      seed=cfg.seed)


def load_teacher(run_dir: str, config_path: str | None = None) -> Teacher:
    """Load a ``train-teacher`` run (optionally with another config, which must build the same shapes)."""
    weights = os.path.join(run_dir, WEIGHTS)
    if not os.path.isfile(weights):
        raise TwostepError(f"{run_dir} holds no trained teacher ({WEIGHTS} missing); run "
                           f"`twostep train-teacher --out {run_dir}` first")
    if os.path.isfile(os.path.join(run_dir, "provenance.json")):  # shipped or recorded run: refuse altered files
        from .shipped import TEACHER_FILES, verify_shipped

        verify_shipped(run_dir, files=TEACHER_FILES)
    cfg = load_config(TeacherConfig, config_path or os.path.join(run_dir, "config.yaml"))
    prompts, table = load_prompt_table(os.path.join(run_dir, PROMPT_CACHE))
    backbone = build_backbone(cfg, cap_feat_dim=table.embeds.shape[-1])
    load_weights(backbone, weights, what="teacher checkpoint")
    backbone.eval().requires_grad_(False)
    return Teacher(backbone, prompts, table, cfg, run_dir)


def _lr_factor(step: int, cfg: TeacherTrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress_ = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)


def train_teacher(cfg: TeacherConfig, out_dir: str, resume: bool = False, command: str | None = None) -> dict:
    """Train the toy teacher into ``out_dir``; returns the run's ``meta`` dict. ``command``: the command line
    recorded in ``provenance.json`` (default: one that retrains from the run's own config.yaml)."""
    ensure_writable_dir(out_dir, what="teacher run folder")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    tc = cfg.train
    state_path = os.path.join(out_dir, STATE)
    if resume and not os.path.isfile(state_path):
        raise TwostepError(f"--resume: {state_path} does not exist; start without --resume")

    save_config(cfg, os.path.join(out_dir, "config.yaml"))
    world = cfg.build_world()
    cache = build_prompt_cache(cfg.text, out_dir, world.prompts())
    _, table = load_prompt_table(cache)

    model = build_backbone(cfg, cap_feat_dim=table.embeds.shape[-1]).train()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, tc))
    data_gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    start_step, elapsed_before = 0, 0.0
    if resume:
        state = load_training_state(state_path)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        data_gen.set_state(state["data_rng"])
        set_rng_state(state["rng"])
        start_step, elapsed_before = state["step"], state["elapsed_s"]

    log_path = os.path.join(out_dir, "train_log.jsonl")
    log_mode = "a" if resume else "w"
    started = time.perf_counter()
    bar = progress(range(start_step, tc.steps), total=tc.steps, desc="teacher", initial=start_step)
    with open(log_path, log_mode, encoding="utf-8") if is_main_process() else open(os.devnull, "w") as log:
        for step in bar:
            x0, labels = world.training_batch(tc.batch_size, data_gen)
            noise = torch.randn(x0.shape, generator=data_gen)
            sigma = flow.sample_logit_normal(tc.batch_size, tc.sigma_mean, tc.sigma_std, tc.sigma_shift,
                                             generator=data_gen)
            x_sigma = flow.add_noise(x0, noise, sigma)
            v = model.velocity(x_sigma, sigma, table[labels])
            loss = torch.nn.functional.mse_loss(v, flow.velocity_target(x0, noise))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            sched.step()
            ema_update(ema, model, min(tc.ema_decay, (1 + step) / (10 + step)))
            if not torch.isfinite(loss):
                raise TwostepError(f"teacher loss became {loss.item()} at step {step}; lower train.lr")
            if step % tc.log_every == 0 or step == tc.steps - 1:
                record = {"step": step, "loss": round(loss.item(), 6), "lr": sched.get_last_lr()[0],
                          "grad_norm": round(float(grad_norm), 4)}
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if (step + 1) % tc.checkpoint_every == 0 and step + 1 < tc.steps:
                save_training_state(state_path, {
                    "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "data_rng": data_gen.get_state(), "rng": rng_state(),
                    "step": step + 1, "elapsed_s": elapsed_before + time.perf_counter() - started})
    wall = elapsed_before + time.perf_counter() - started

    weights = os.path.join(out_dir, WEIGHTS)
    save_weights(ema, weights)
    meta = {
        "kind": "toy-teacher", "steps": tc.steps, "train_wall_s": round(wall, 1),
        "weights_sha256": file_sha256(weights), "torch_threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()), "machine": platform_summary(),
    }
    write_text(os.path.join(out_dir, "meta.json"), json.dumps(meta, indent=2) + "\n")
    if os.path.exists(state_path):
        os.remove(state_path)
    from .config import to_dict
    from .shipped import write_provenance

    retrain = f"twostep train-teacher --config {os.path.join(out_dir, 'config.yaml')} --out {out_dir}"
    write_provenance(out_dir, to_dict(cfg), meta["train_wall_s"], command or retrain, reproduce=retrain)
    return meta


def platform_summary() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {platform.system()}"
