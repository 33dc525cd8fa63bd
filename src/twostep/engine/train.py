"""Distillation loop: optimizers, D:G schedule, warm-ups, clipping, EMA, logging, sample grids, checkpoints.

The method lives in ``recipe.py``; this file only schedules it. Rank-aware: logs, bars and files on rank 0.

Two warm-ups protect the student from a discriminator that has not learnt anything yet: ``train.d_warmup_steps``
discriminator-only updates run before the first generator update (they are not generator steps; the count is part
of the checkpoint, so a resumed run does not repeat them), and ``recipe.adv_ramp_steps`` ramps the adversarial
weight from 0 over the first generator steps (logged as ``adv_weight_eff``). ``train.warmup_steps`` is the
learning-rate warm-up of both optimizers.

A run folder::

    RUN/config.yaml               resolved config
    RUN/train_log.jsonl           every ``log_every`` steps: losses, D accuracy and logits, grad norms, output stats
    RUN/tb/                       the same scalars for TensorBoard
    RUN/samples/step_XXXXXX.png   fixed-seed grids (EMA weights): rows = prompts
    RUN/checkpoints/step_XXXXXX.pt full state; ``--resume latest`` continues from the newest
    RUN/student.safetensors       final EMA weights of the student's trainable parameters
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from ..config import require, save_config, to_dict
from ..errors import TwostepError
from ..utils import ensure_writable_dir, is_main_process, progress, write_text
from .checkpoint import rng_state, save_training_state, load_training_state, set_rng_state
from .discriminator import Discriminator
from .recipe import RecipeConfig, adv_ramp, discriminator_loss, generator_loss
from .student import Student
from .teacher_data import TeacherData

Tensor = torch.Tensor


@dataclass
class DistillTrainConfig:
    steps: int = 250  # generator updates
    batch_size: int = 64
    g_lr: float = 2e-4
    d_lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.0, 0.99])
    weight_decay: float = 0.0
    d_steps_per_g: int = 1
    warmup_steps: int = 20  # learning-rate warm-up (both optimizers)
    # discriminator-only updates before the first generator update (not counted in `steps`; resume-safe)
    d_warmup_steps: int = 0
    grad_clip: float = 1.0
    ema_decay: float = 0.99
    bf16: bool = False
    gradient_checkpointing: bool = False
    log_every: int = 10
    sample_every: int = 100
    eval_every: int = 100  # 0 = no periodic evaluation
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    threads: int = 0

    def validate(self) -> None:
        require(self.steps >= 1 and self.batch_size >= 2, "steps", "must be >= 1 (and batch_size >= 2)")
        require(self.g_lr > 0 and self.d_lr > 0, "g_lr", "and d_lr must be positive")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "must be two values in [0, 1)")
        require(self.d_steps_per_g >= 1, "d_steps_per_g", "must be at least 1")
        require(self.d_warmup_steps >= 0, "d_warmup_steps", "must be >= 0 (0 = no discriminator warm-up)")
        require(0 <= self.ema_decay < 1, "ema_decay", "must be in [0, 1)")
        require(self.log_every >= 1 and self.sample_every >= 1 and self.checkpoint_every >= 1, "log_every",
                "sample_every and checkpoint_every must be >= 1")
        require(self.eval_every >= 0, "eval_every", "must be >= 0 (0 turns periodic evaluation off)")


class RunConfig(Protocol):
    """What the loop reads of a run's config: ``train`` and ``recipe`` (``to_dict`` saves the whole of it).

    A world's wiring supplies the full dataclass: ``distill.DistillConfig`` for the offline worlds,
    ``worlds.zimage.train.ZImageDistillConfig`` for the real path.
    """

    train: DistillTrainConfig
    recipe: RecipeConfig


class EMA:
    """Exponential moving average of each step's parameter set (kept apart per group)."""

    def __init__(self, groups: dict[str, list[nn.Parameter]], decay: float):
        self.decay = decay
        self.groups = groups
        self.shadow = {name: [p.detach().clone().float() for p in params] for name, params in groups.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for name, params in self.groups.items():
            for s, p in zip(self.shadow[name], params):
                s.lerp_(p.detach().float(), 1 - decay)

    @contextmanager
    def applied(self):
        """Temporarily load the EMA weights into the live parameters."""
        backup = {name: [p.detach().clone() for p in params] for name, params in self.groups.items()}
        with torch.no_grad():
            for name, params in self.groups.items():
                for s, p in zip(self.shadow[name], params):
                    p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, params in self.groups.items():
                    for b, p in zip(backup[name], params):
                        p.copy_(b)

    def state_dict(self) -> dict:
        return {name: [s.clone() for s in shadow] for name, shadow in self.shadow.items()}

    def load_state_dict(self, state: dict) -> None:
        for name in self.shadow:
            for s, v in zip(self.shadow[name], state[name]):
                s.copy_(v)


def grad_norm(params) -> float:
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def trainable_state(student: Student) -> dict[str, Tensor]:
    """Only what the student trains (LoRA adapters, or the per-step copies)."""
    names = {id(p) for params in student.parameter_groups().values() for p in params}
    return {n: p.detach().clone() for n, p in student.named_parameters() if id(p) in names}


def latest_checkpoint(run_dir: str) -> str | None:
    paths = glob.glob(os.path.join(run_dir, "checkpoints", "step_*.pt"))
    if not paths:
        return None
    return max(paths, key=lambda p: int(re.findall(r"step_(\d+)\.pt$", p)[0]))


class Trainer:
    """Holds the student, discriminator, optimizers and EMA; :meth:`fit` runs the loop."""

    def __init__(self, cfg: RunConfig, student: Student, disc: Discriminator, data: TeacherData,
                 prompt_table, real_images_fn, run_dir: str, sample_fn=None, eval_fn=None, device=None):
        tc = cfg.train
        self.device = torch.device(device or "cpu")
        self.cfg, self.student, self.disc, self.data = cfg, student, disc, data
        self.prompt_table = prompt_table
        self.real_images_fn = real_images_fn  # (prompt_index, generator) -> real images (real_source: data)
        self.run_dir = run_dir
        self.sample_fn = sample_fn  # (student, path) -> None, writes a grid with the EMA weights applied
        self.eval_fn = eval_fn  # (student) -> {metric: value}, run with the EMA weights applied
        self.groups = student.parameter_groups()
        self.opt_g = torch.optim.AdamW([{"params": ps, "name": n} for n, ps in self.groups.items()], lr=tc.g_lr,
                                       betas=tuple(tc.betas), weight_decay=tc.weight_decay)
        self.opt_d = torch.optim.AdamW(disc.parameters(), lr=tc.d_lr, betas=tuple(tc.betas),
                                       weight_decay=tc.weight_decay)
        warm = lambda s: min(1.0, (s + 1) / max(1, tc.warmup_steps))  # noqa: E731
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, warm)
        self.sched_d = torch.optim.lr_scheduler.LambdaLR(self.opt_d, warm)
        self.ema = EMA(self.groups, tc.ema_decay)
        self.generator = torch.Generator().manual_seed(tc.seed)
        self.step = 0  # generator updates done
        self.d_warmup_done = 0  # discriminator-only warm-up updates done (train.d_warmup_steps)
        self.elapsed = 0.0
        if tc.gradient_checkpointing:
            student.set_gradient_checkpointing(True)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {"student": trainable_state(self.student), "disc": self.disc.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                "sched_g": self.sched_g.state_dict(), "sched_d": self.sched_d.state_dict(),
                "ema": self.ema.state_dict(), "generator": self.generator.get_state(), "rng": rng_state(),
                "step": self.step, "d_warmup_done": self.d_warmup_done, "elapsed_s": self.elapsed,
                "config": to_dict(self.cfg)}

    def load_state_dict(self, state: dict) -> None:
        own = dict(self.student.named_parameters())
        with torch.no_grad():
            for name, value in state["student"].items():
                if name not in own or own[name].shape != value.shape:
                    raise TwostepError(f"checkpoint tensor '{name}' does not fit this student; resume with the "
                                       "config the run was made with")
                own[name].copy_(value)
        self.disc.load_state_dict(state["disc"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.sched_g.load_state_dict(state["sched_g"])
        self.sched_d.load_state_dict(state["sched_d"])
        self.ema.load_state_dict(state["ema"])
        self.generator.set_state(state["generator"])
        set_rng_state(state["rng"])
        self.step, self.elapsed = state["step"], state["elapsed_s"]
        # checkpoints from before the warm-up existed: a run past step 0 is past any warm-up
        self.d_warmup_done = state.get("d_warmup_done", self.cfg.train.d_warmup_steps if self.step > 0 else 0)

    def save_checkpoint(self) -> str:
        path = os.path.join(self.run_dir, "checkpoints", f"step_{self.step:06d}.pt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_training_state(path, self.state_dict())
        paths = sorted(glob.glob(os.path.join(self.run_dir, "checkpoints", "step_*.pt")))
        for old in paths[:-self.cfg.train.keep_checkpoints]:
            os.remove(old)
        return path

    # ------------------------------------------------------------------ one iteration

    def _batch(self) -> tuple[dict[str, Tensor], object]:
        index = torch.randint(0, len(self.data), (self.cfg.train.batch_size,), generator=self.generator)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in self.data.batch(index).items()}
        return batch, self.prompt_table[batch["prompt_index"].cpu()].to(self.device)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.cfg.train.bf16 else nullcontext()

    def d_step(self, updates: int | None = None) -> dict[str, float]:
        """``updates`` (default ``d_steps_per_g``) discriminator updates; the student only runs under no_grad."""
        tc, rc = self.cfg.train, self.cfg.recipe
        logs: dict[str, float] = {}
        self.disc.requires_grad_(True)
        for _ in range(tc.d_steps_per_g if updates is None else updates):
            batch, cond = self._batch()
            real = batch["final"] if rc.real_source == "teacher" else self.real_images_fn(
                batch["prompt_index"].cpu(), self.generator).to(self.device)
            with self._autocast():
                d_total, d_logs = discriminator_loss(self.student, self.disc, batch, real, cond, self.generator,
                                                     rc=rc)
            self.opt_d.zero_grad(set_to_none=True)
            d_total.backward()
            logs["grad_norm/d"] = grad_norm(self.disc.parameters())
            nn.utils.clip_grad_norm_(self.disc.parameters(), tc.grad_clip)
            self.opt_d.step()
            logs.update(d_logs)
        self.sched_d.step()
        return logs

    def d_warmup(self) -> dict[str, float]:
        """The discriminator-only updates still due (``train.d_warmup_steps``), one at a time; the student is not
        touched. Returns the last update's D health as ``d_warmup/...`` (empty once the warm-up is done)."""
        remaining = self.cfg.train.d_warmup_steps - self.d_warmup_done
        if remaining <= 0:
            return {}
        logs: dict[str, float] = {}
        for _ in progress(range(remaining), total=remaining, desc="discriminator warm-up", leave=False):
            logs = self.d_step(updates=1)
            self.d_warmup_done += 1
        return {f"d_warmup/{k}": logs[k] for k in ("d_loss", "d_accuracy", "d_logit_gap") if k in logs}

    def g_step(self) -> dict[str, float]:
        """One student update; the discriminator is frozen meanwhile (its heads get no gradient). The adversarial
        terms are scaled by the ramp at this generator step (``recipe.adv_ramp_steps``)."""
        tc = self.cfg.train
        self.disc.requires_grad_(False)
        try:
            batch, cond = self._batch()
            with self._autocast():
                g_total, logs, _ = generator_loss(self.student, self.disc, batch, cond, self.cfg.recipe,
                                                  self.generator, adv_scale=adv_ramp(self.cfg.recipe, self.step))
            self.opt_g.zero_grad(set_to_none=True)
            g_total.backward()
        finally:
            self.disc.requires_grad_(True)
        for name, params in self.groups.items():
            logs[f"grad_norm/{name}"] = grad_norm(params)
        nn.utils.clip_grad_norm_([p for ps in self.groups.values() for p in ps], tc.grad_clip)
        self.opt_g.step()
        self.sched_g.step()
        self.ema.update(self.step)
        return logs

    @property
    def uses_discriminator(self) -> bool:
        """False for pure regression (no adversarial term anywhere): the D step would cost time and change nothing."""
        rc = self.cfg.recipe
        return rc.adv_weight > 0 or (rc.step1_loss == "adversarial" and rc.step1_weight > 0)

    def train_step(self) -> dict[str, float]:
        """One generator step: any discriminator warm-up still due, ``d_steps_per_g`` D updates, one G update."""
        logs = {**self.d_warmup(), **self.d_step(), **self.g_step()} if self.uses_discriminator else self.g_step()
        if not all(math.isfinite(logs[k]) for k in ("g_total", "d_loss") if k in logs):
            raise TwostepError(f"losses became non-finite at step {self.step}; lower train.g_lr / train.d_lr")
        self.step += 1
        return logs

    # ------------------------------------------------------------------ loop

    def fit(self) -> None:
        tc = self.cfg.train
        main = is_main_process()
        writer = None
        if main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(os.path.join(self.run_dir, "tb"), purge_step=self.step or None)
            except ImportError:
                writer = None
        log_path = os.path.join(self.run_dir, "train_log.jsonl")
        if main and os.path.exists(log_path):
            # a fresh run starts a new log; a resumed one drops records written after its checkpoint
            kept = [line for line in open(log_path, encoding="utf-8") if json.loads(line)["step"] <= self.step]
            write_text(log_path, "".join(kept))
        bar = progress(range(self.step, tc.steps), total=tc.steps, initial=self.step, desc="distill")
        started = time.perf_counter() - self.elapsed
        with open(log_path, "a", encoding="utf-8") if main else open(os.devnull, "w") as log:
            for _ in bar:
                logs = self.train_step()
                self.elapsed = time.perf_counter() - started
                if main and self.eval_fn is not None and tc.eval_every and (
                        self.step % tc.eval_every == 0 or self.step == tc.steps):
                    with self.ema.applied():
                        logs.update({f"eval/{k}": v for k, v in self.eval_fn(self.student).items()})
                if self.step % tc.log_every == 0 or self.step == tc.steps or any(k.startswith("eval/") for k in logs):
                    record = {"step": self.step, "elapsed_s": round(self.elapsed, 2),
                              "g_lr": self.sched_g.get_last_lr()[0], **{k: round(v, 6) for k, v in logs.items()}}
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    if writer is not None:
                        for k, v in logs.items():
                            writer.add_scalar(k, v, self.step)
                    bar.set_postfix(g=f"{logs['g_total']:.3f}", d=f"{logs.get('d_loss', float('nan')):.3f}",
                                    acc=f"{logs.get('d_accuracy', float('nan')):.2f}")
                if main and self.sample_fn is not None and (self.step % tc.sample_every == 0 or self.step == tc.steps):
                    with self.ema.applied():
                        self.sample_fn(self.student, os.path.join(self.run_dir, "samples",
                                                                  f"step_{self.step:06d}.png"))
                if main and self.step % tc.checkpoint_every == 0 and self.step < tc.steps:
                    self.save_checkpoint()
        if writer is not None:
            writer.close()


def setup_run(cfg: RunConfig, run_dir: str, resume: str | None) -> str | None:
    """Create the run folder, save the resolved config; return the checkpoint to resume from (or None)."""
    ensure_writable_dir(run_dir, what="training run folder")
    checkpoint = None
    if resume:
        checkpoint = latest_checkpoint(run_dir) if resume == "latest" else resume
        if checkpoint is None or not os.path.isfile(checkpoint):
            raise TwostepError(f"--resume {resume}: no checkpoint found in {run_dir}/checkpoints; start without "
                               "--resume")
    if is_main_process():
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
    return checkpoint


def resume_trainer(trainer: Trainer, checkpoint: str | None) -> None:
    if checkpoint:
        trainer.load_state_dict(load_training_state(checkpoint))
        if is_main_process():
            print(f"resumed from {checkpoint} at step {trainer.step}")


def write_meta(run_dir: str, meta: dict) -> None:
    if is_main_process():
        write_text(os.path.join(run_dir, "meta.json"), json.dumps(meta, indent=2) + "\n")
