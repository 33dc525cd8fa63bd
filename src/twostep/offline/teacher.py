"""The offline world's 8-step teacher: a tiny ``ZImageTransformer2DModel`` trained with flow matching.

It plays the part Z-Image-Turbo plays for real: a model that is good at 8 steps on the Turbo schedule
(shift 3) and clearly worse when run naively at 2. ``twostep train-teacher`` writes a run folder::

    RUN/config.yaml                resolved config (the run can be rebuilt from it alone)
    RUN/teacher.safetensors        EMA weights: what sampling, teacher data and the student use
    RUN/text/                      local tokenizer + tiny Qwen3 text encoder (diffusers/transformers format)
    RUN/prompt_embeds.safetensors  cached embeddings of the ten prompts
    RUN/train_log.jsonl            loss, lr, grad norm every ``log_every`` steps
    RUN/meta.json                  wall time, weight hash, versions
    RUN/checkpoints/step_XXXXXX/   resumable training state while the run is unfinished (``--resume``; removed
                                   at the end). Same format, preemption and non-finite guard as the student's
                                   (engine/checkpoint.py, engine/preemption.py).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from twostep.core.config import load_config, require, save_config, to_dict
from twostep.core.errors import TwostepError
from twostep.core.utils import (
    check_output_dir,
    ensure_writable_dir,
    file_sha256,
    is_main_process,
    platform_summary,
    progress,
    trim_jsonl,
    write_text,
)
from twostep.engine import flow
from twostep.engine.backbone import Backbone, Conditioning
from twostep.engine.callbacks import first_nonfinite_grad
from twostep.engine.checkpoint import (
    checkpoint_dir,
    drop_later_checkpoints,
    load_state,
    load_weights,
    old_format_error,
    prune_checkpoints,
    remove_stale_temporaries,
    rng_state,
    save_state,
    save_weights,
    set_rng_state,
)
from twostep.engine.preemption import Preempted, StopOnSignal
from twostep.engine.run_folder import prepare_resume
from twostep.families.registry import TOY_FAMILY, family_named
from twostep.offline.digits.world import (
    PROMPT_CACHE,
    ToyDataConfig,
    ToyTextConfig,
    build_prompt_cache,
    load_prompt_table,
)
from twostep.offline.worlds import get_world

_TOY = family_named(TOY_FAMILY)  # the toy teacher is a tiny model of a real family (same classes as its release)
ToyModelConfig = _TOY.tiny_config_class

WEIGHTS = "teacher.safetensors"
CHECKPOINTS = "checkpoints"
OLD_STATE = "state.pt"  # the pickle-format state of older versions: refused, never loaded
# what a resumed teacher run may not change (they define its tensors or its data), and what it changes freely
IDENTITY_KEYS = ("world", "model.", "text.", "data.")
OPERATIONAL_KEYS = ("train.threads", "train.log_every", "train.checkpoint_every", "train.keep_last",
                    "train.max_bad_steps")


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
    keep_last: int = 1  # newest checkpoints kept while the run is unfinished
    max_bad_steps: int = 5  # consecutive steps with a non-finite loss or gradient before the run stops
    threads: int = 0  # torch CPU threads; 0 = leave torch's default

    def validate(self) -> None:
        require(self.steps >= 1, "steps", "must be at least 1")
        require(self.batch_size >= 1, "batch_size", "must be at least 1")
        require(math.isfinite(self.lr) and self.lr > 0, "lr", "must be a positive number")
        require(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        require(math.isfinite(self.grad_clip) and self.grad_clip > 0, "grad_clip",
                "must be a positive number (the largest gradient norm applied)")
        require(0.0 <= self.ema_decay < 1.0, "ema_decay", "must be in [0, 1)")
        require(math.isfinite(self.sigma_mean), "sigma_mean", "must be a finite number")
        require(self.sigma_std > 0 and self.sigma_shift > 0, "sigma_std", "and sigma_shift must be positive")
        for key in ("log_every", "checkpoint_every", "keep_last", "max_bad_steps"):
            require(getattr(self, key) >= 1, key, "must be at least 1")
        require(self.threads >= 0, "threads", "must be >= 0 (0 = torch's default)")


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
        from twostep.core.config import require_seed

        require(self.num_samples >= 20, "num_samples", "must be at least 20 (two per prompt)")
        require(self.batch_size >= 1, "batch_size", "must be at least 1")
        require(self.throughput_batch >= 1, "throughput_batch", "must be at least 1")
        require(self.throughput_repeats >= 1, "throughput_repeats", "must be at least 1")
        require_seed(self.seed, "seed")
        require_seed(self.evaluator_seed, "evaluator_seed")


@dataclass
class TeacherConfig:
    world: str = "digits"  # digits | detail (src/twostep/offline)
    seed: int = 0
    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    text: ToyTextConfig = field(default_factory=ToyTextConfig)
    data: ToyDataConfig = field(default_factory=ToyDataConfig)
    train: TeacherTrainConfig = field(default_factory=TeacherTrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        from twostep.offline.worlds import WORLDS

        require(self.world in WORLDS, "world", f"must be one of {', '.join(WORLDS)}")

    def build_world(self):
        return get_world(self.world, self.data.heldout_fraction, self.data.split_seed)


@dataclass
class Teacher:
    """A loaded teacher run: frozen backbone + the cached prompt table (row = class of its world)."""

    backbone: Backbone
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


def build_backbone(cfg: TeacherConfig, cap_feat_dim: int) -> Backbone:
    in_channels = cfg.build_world().image_shape[0]
    return _TOY.backbone_class.from_config(cfg.model.to_diffusers(in_channels=in_channels, cap_feat_dim=cap_feat_dim),
                                      seed=cfg.seed)


def load_teacher(run_dir: str, config_path: str | None = None) -> Teacher:
    """Load a ``train-teacher`` run (optionally with another config, which must build the same shapes)."""
    weights = os.path.join(run_dir, WEIGHTS)
    if not os.path.isfile(weights):
        raise TwostepError(f"{run_dir} holds no trained teacher ({WEIGHTS} missing); run "
                           f"`twostep train-teacher --out {run_dir}` first")
    if os.path.isfile(os.path.join(run_dir, "provenance.json")):  # shipped or recorded run: refuse altered files
        from twostep.offline.shipped import TEACHER_FILES, verify_shipped

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


def _resume_checkpoint(cfg: TeacherConfig, out_dir: str, allow_config_change: bool) -> str:
    """Checks only: the teacher checkpoint ``--resume`` continues from (the student's rules, the teacher's keys)."""
    if os.path.isfile(os.path.join(out_dir, OLD_STATE)) and not os.path.isdir(os.path.join(out_dir, CHECKPOINTS)):
        raise old_format_error(os.path.join(out_dir, OLD_STATE))
    return prepare_resume(cfg, out_dir, "latest", allow_config_change, identity_keys=IDENTITY_KEYS,
                          operational_keys=OPERATIONAL_KEYS)


def train_teacher(cfg: TeacherConfig, out_dir: str, resume: bool = False, command: str | None = None,
                  allow_config_change: bool = False, restart: bool = False) -> dict:
    """Train the toy teacher into ``out_dir``; returns the run's ``meta`` dict. ``command``: the command line
    recorded in ``provenance.json`` (default: one that retrains from the run's own config.yaml). A refused
    ``--resume`` writes nothing. A fresh run into a folder holding an unfinished one's checkpoints is refused,
    unless ``restart`` (the demo and bench, which own their folders): then those checkpoints are removed."""
    root = os.path.join(out_dir, CHECKPOINTS)
    if not resume and os.path.isdir(root) and not restart:
        raise TwostepError(f"{out_dir} holds an unfinished teacher run ({root}); continue it with --resume, or "
                           "choose another --out")
    checkpoint = _resume_checkpoint(cfg, out_dir, allow_config_change) if resume else None
    check_output_dir(out_dir, what="teacher run folder")
    ensure_writable_dir(out_dir, what="teacher run folder")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    tc = cfg.train
    if not resume and restart:
        shutil.rmtree(root, ignore_errors=True)  # an unfinished earlier run: this one starts over
    for path in remove_stale_temporaries(out_dir) + remove_stale_temporaries(root):
        print(f"twostep: removed {path}, left by an interrupted write")

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
    start_step, elapsed_before, bad_steps = 0, 0.0, 0
    if checkpoint:
        state = load_state(checkpoint, verify=False)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        data_gen.set_state(state["data_rng"])
        set_rng_state(state["rng"])
        start_step, elapsed_before, bad_steps = state["step"], state["elapsed_s"], state["bad_steps"]
        print(f"resumed from {checkpoint} at step {start_step}")
        drop_later_checkpoints(root, start_step, report=lambda message: print(f"twostep: {message}"))

    def save(step: int) -> str:
        path = checkpoint_dir(root, step)
        save_state(path, {
            "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "data_rng": data_gen.get_state(), "rng": rng_state(),
            "step": step, "bad_steps": bad_steps, "elapsed_s": elapsed_before + time.perf_counter() - started,
            "config": to_dict(cfg)}, what=f"teacher checkpoint at step {step}")
        prune_checkpoints(root, tc.keep_last, current=step)
        return path

    log_path = os.path.join(out_dir, "train_log.jsonl")
    if is_main_process():  # a resumed run drops the records of steps it will redo
        trim_jsonl(log_path, lambda record: record.get("step", 0) < start_step, report=print)
    started = time.perf_counter()
    last_checkpoint = checkpoint
    bar = progress(range(start_step, tc.steps), total=tc.steps, desc="teacher", initial=start_step)
    with StopOnSignal("teacher training") as stop, \
            open(log_path, "a", encoding="utf-8") if is_main_process() else open(os.devnull, "w") as log:
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
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
            problem = None
            if not torch.isfinite(loss):
                problem = f"loss={loss.item()}"
            elif not torch.isfinite(grad_norm):
                problem = f"gradient of '{first_nonfinite_grad(model.named_parameters())}' is non-finite"
            if problem is None:  # a non-finite step applies nothing: weights, EMA and optimizer state stay put
                torch.nn.utils.clip_grads_with_norm_(model.parameters(), tc.grad_clip, grad_norm)
                opt.step()
                ema_update(ema, model, min(tc.ema_decay, (1 + step) / (10 + step)))
                bad_steps = 0
            else:
                opt.zero_grad(set_to_none=True)
                bad_steps += 1
                bar.write(f"teacher step {step}: update skipped ({problem})")
            sched.step()
            if bad_steps >= tc.max_bad_steps:
                kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint exists"
                raise TwostepError(f"{bad_steps} teacher steps in a row (up to step {step}) had non-finite values "
                                   f"(last: {problem}); nothing non-finite was saved and {kept}; lower train.lr")
            if step % tc.log_every == 0 or step == tc.steps - 1 or problem:
                record = {"step": step, "loss": round(loss.item(), 6), "lr": sched.get_last_lr()[0],
                          "grad_norm": round(float(grad_norm), 4)}
                if problem:
                    record["skipped"] = problem
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if is_main_process() and step + 1 < tc.steps and ((step + 1) % tc.checkpoint_every == 0
                                                               or stop.requested):
                last_checkpoint = save(step + 1)
            if stop.requested and step + 1 < tc.steps:
                raise Preempted(f"stopped by {stop.signal_name} at teacher step {step + 1} of {tc.steps}; state "
                                f"saved in {last_checkpoint}; continue exactly with --resume")
    wall = elapsed_before + time.perf_counter() - started

    weights = os.path.join(out_dir, WEIGHTS)
    save_weights(ema, weights)
    meta = {
        "kind": "toy-teacher", "steps": tc.steps, "train_wall_s": round(wall, 1),
        "weights_sha256": file_sha256(weights), "torch_threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()), "machine": platform_summary(),
    }
    write_text(os.path.join(out_dir, "meta.json"), json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(root, ignore_errors=True)  # a finished teacher keeps no resume state
    from twostep.offline.shipped import write_provenance

    retrain = f"twostep train-teacher --config {os.path.join(out_dir, 'config.yaml')} --out {out_dir}"
    write_provenance(out_dir, to_dict(cfg), meta["train_wall_s"], command or retrain, reproduce=retrain)
    return meta

