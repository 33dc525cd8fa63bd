"""Distillation loop: optimizers, D:G schedule, warm-ups, clipping, EMA, logging, sample grids, checkpoints.

The method lives in ``recipe.py``; this file only schedules it. Rank-aware: logs, bars and files on rank 0; under
torchrun the student's trainable parameters and the heads train with DDP on slices of the global batch.

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
    RUN/checkpoints/step_XXXXXX/  full state (engine/checkpoint.py: safetensors + JSON + checksums, no pickle);
                                  the last step is always saved; ``--resume latest`` continues from the newest good one
    RUN/student.safetensors       final EMA weights of the student's trainable parameters

Reliability: SIGTERM / SIGINT finish the current step, save a checkpoint and exit with ``preemption.EXIT_CODE``; a
step whose loss or gradient is non-finite applies no update (logged with the term or parameter), and
``train.max_bad_steps`` such steps in a row stop the run; nothing non-finite is ever saved.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from ..config import require, save_config, to_dict
from ..errors import TwostepError
from ..utils import check_output_dir, check_replaceable_dir, ensure_writable_dir, is_main_process, progress, \
    trim_jsonl, write_text
from .checkpoint import CheckpointError, ShardedRef, checkpoint_dir, drop_later_checkpoints, find_resumable, \
    load_sharded, load_state, prune_checkpoints, read_state_json, remove_stale_temporaries, rng_state, save_state, save_tensors, \
    set_rng_state, verify_state
from .preemption import Preempted, StopOnSignal
from .discriminator import Discriminator
from .recipe import RecipeConfig, adv_ramp, discriminator_loss, generator_loss
from .student import Student
from .teacher_data import DTYPES, TeacherData
from .distributed import any_rank, full_tensor, is_sharded, like_layout, local_part, mean_over_ranks

Tensor = torch.Tensor


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

    A world's wiring supplies the full dataclass: ``distill.DistillConfig`` for the offline worlds,
    ``worlds.zimage.train.ZImageDistillConfig`` for the real path.
    """

    train: DistillTrainConfig
    recipe: RecipeConfig


class EMA:
    """Exponential moving average of each step's parameter set (kept apart per group)."""

    def __init__(self, groups: dict[str, list[nn.Parameter]], decay: float, before_write=None):
        self.decay = decay
        self.groups = groups
        # FSDP2: drop gathered copies before the parameters are written (else the next forward would use them)
        self.before_write = before_write or (lambda: None)
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
        self.before_write()
        with torch.no_grad():
            for name, params in self.groups.items():
                for s, p in zip(self.shadow[name], params):
                    p.copy_(s)
        try:
            yield
        finally:
            self.before_write()
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
    grads = [p.grad for p in params if p.grad is not None]
    if grads and is_sharded(grads[0]):  # FSDP2: each rank holds a shard; the squares are summed over the ranks
        import torch.distributed as dist

        squares = torch.stack([local_part(g).detach().float().pow(2).sum() for g in grads]).sum()
        dist.all_reduce(squares)
        return float(squares.sqrt())
    norms = [g.detach().float().norm() for g in grads]
    return float(torch.stack(norms).norm()) if norms else 0.0


def first_nonfinite_grad(named_params) -> str | None:
    """Name of the first parameter whose gradient (this rank's shard of it) holds NaN or inf (None when all are
    finite)."""
    for name, p in named_params:
        if p.grad is not None and not bool(torch.isfinite(local_part(p.grad)).all()):
            return name
    return None


def nonfinite_loss(logs: dict[str, float]) -> str | None:
    """The first logged loss term that is NaN or inf, as ``"term=value"`` (None when all are finite)."""
    for key, value in logs.items():
        if not key.startswith("grad_norm/") and not math.isfinite(value):
            return f"{key}={value}"
    return None


def trainable_state(student: Student) -> dict[str, Tensor]:
    """Only what the student trains (LoRA adapters, or the per-step copies); sharded under FSDP2."""
    names = {id(p) for params in student.parameter_groups().values() for p in params}
    return {n: p.detach().clone() for n, p in student.named_parameters() if id(p) in names}


class NonFiniteTraining(TwostepError):
    """``train.max_bad_steps`` consecutive steps had a non-finite loss or gradient."""


class _LossModule(nn.Module):
    """What DDP wraps: ``trained`` is the module whose parameters the loss trains (registered, so DDP averages
    their gradients over the ranks); ``fn(*args)`` computes the loss with everything else (held outside the
    module's parameters, so DDP neither broadcasts nor waits for them)."""

    def __init__(self, trained: nn.Module, fn):
        super().__init__()
        self.trained = trained
        self.fn = fn

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def _data_parallel(module: nn.Module, device: torch.device):
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else 0] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)


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
        # under torchrun each rank takes its slice of the global batch `train.batch_size` and draws the recipe's
        # noise from its own stream (seeded per step). LoRA: DDP averages the gradients of the adapters and the
        # heads. full: FSDP2 shards each step copy and the teacher per block (the heads stay under DDP)
        from .distributed import init_process_group, shards_student, world_size

        self.world, self.rank = world_size(), int(os.environ.get("RANK", "0"))
        self.accum = tc.grad_accum_steps
        self.sharded = shards_student(student.cfg.form)
        if self.world > 1:
            init_process_group()
            if tc.batch_size % (self.world * self.accum):
                raise TwostepError(f"config key 'train.batch_size' {tc.batch_size} (the global batch) must be a "
                                   f"multiple of the {self.world} processes x train.grad_accum_steps {self.accum}")
        if self.sharded:
            student.shard(tc.fsdp_param_dtype, tc.fsdp_reduce_dtype)
        self.groups = student.parameter_groups()
        names = {id(p): n for n, p in student.named_parameters()}
        self.named_groups = {g: [(names[id(p)], p) for p in ps] for g, ps in self.groups.items()}
        self.opt_g = torch.optim.AdamW([{"params": ps, "name": n} for n, ps in self.groups.items()], lr=tc.g_lr,
                                       betas=tuple(tc.betas), weight_decay=tc.weight_decay)
        self.opt_d = torch.optim.AdamW(disc.parameters(), lr=tc.d_lr, betas=tuple(tc.betas),
                                       weight_decay=tc.weight_decay)
        warm = lambda s: min(1.0, (s + 1) / max(1, tc.warmup_steps))  # noqa: E731
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, warm)
        self.sched_d = torch.optim.lr_scheduler.LambdaLR(self.opt_d, warm)
        self.ema = EMA(self.groups, tc.ema_decay, before_write=student.reshard if self.sharded else None)
        self.generator = torch.Generator().manual_seed(tc.seed)  # batch indices: the same stream on every rank
        # noise: a run started under torchrun draws each rank's noise from its own stream, reseeded at every step
        # (kept on a resume with any process count, so the batches' order does not change); a run started in one
        # process draws noise and batch indices from one stream, as it always did
        self.per_rank_noise = self.world > 1
        self.noise_generator = torch.Generator() if self.per_rank_noise else self.generator
        if self.world > 1:
            self.g_loss = self._generator_loss if self.sharded else _data_parallel(
                _LossModule(student, self._generator_loss), self.device)
            self.d_loss = _data_parallel(_LossModule(disc, self._discriminator_loss), self.device)
        else:
            self.g_loss, self.d_loss = self._generator_loss, self._discriminator_loss
        self.step = 0  # generator updates done
        self.d_warmup_done = 0  # discriminator-only warm-up updates done (train.d_warmup_steps)
        self.bad_steps = 0  # consecutive steps with a skipped update
        self.problems: list[str] = []  # this step's skipped updates, "what: why"
        self.stop: StopOnSignal | None = None  # set by fit(): a signal also interrupts the D warm-up
        self.last_checkpoint: str | None = None
        self.elapsed = 0.0
        if tc.gradient_checkpointing:
            student.set_gradient_checkpointing(True)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {"student": trainable_state(self.student), "disc": self.disc.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                "sched_g": self.sched_g.state_dict(), "sched_d": self.sched_d.state_dict(),
                "ema": self.ema.state_dict(), "generator": self.generator.get_state(), "rng": rng_state(),
                "step": self.step, "d_warmup_done": self.d_warmup_done, "bad_steps": self.bad_steps,
                "elapsed_s": self.elapsed, "config": to_dict(self.cfg),
                "ema_names": {g: [n for n, _ in pairs] for g, pairs in self.named_groups.items()},
                "per_rank_noise": self.per_rank_noise}

    def _fit_layout(self, state: dict, folder: str | None) -> None:
        """Give the student's weights, their EMA and AdamW moments this run's layout, in place in ``state``:
        sharded ones (:class:`ShardedRef`) are read from ``folder`` into this rank's shards or whole tensors, and
        whole ones become this rank's shard under FSDP2. So a checkpoint resumes on any number of processes."""
        own = dict(self.student.named_parameters())
        params = [p for group in self.opt_g.param_groups for p in group["params"]]
        targets: dict[str, Tensor] = {}

        def fit(value, template: Tensor, dtype=None):
            if isinstance(value, ShardedRef):
                targets[str(value)] = torch.zeros_like(template, dtype=dtype)
                return targets[str(value)]
            if isinstance(value, Tensor) and value.shape == template.shape:
                return like_layout(value, template)
            return value  # a mismatch: load_state_dict names it

        state["student"] = {n: fit(v, own[n]) if n in own else v for n, v in state["student"].items()}
        state["ema"] = {g: [fit(v, p, torch.float32) for v, p in zip(values, self.groups.get(g, []))]
                        for g, values in state["ema"].items()}
        for index, entry in state["opt_g"]["state"].items():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in entry and int(index) < len(params):
                    entry[key] = fit(entry[key], params[int(index)])
        if targets:
            if folder is None:
                raise CheckpointError("a sharded checkpoint needs its folder to load")
            load_sharded(folder, targets)

    def load_state_dict(self, state: dict, folder: str | None = None) -> None:
        self._fit_layout(state, folder)
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
        self.generator.set_state(state["generator"])  # (torchrun: each rank's noise stream is seeded per step)
        if state.get("per_rank_noise", False) and not self.per_rank_noise:  # a torchrun run, now in one process
            self.per_rank_noise, self.noise_generator = True, torch.Generator()
        set_rng_state(state["rng"])
        self.step, self.elapsed = state["step"], state["elapsed_s"]
        self.d_warmup_done, self.bad_steps = state["d_warmup_done"], state["bad_steps"]

    def save_checkpoint(self) -> str:
        """``RUN/checkpoints/step_XXXXXX/`` (checksummed, atomic; refused when any tensor is non-finite), then
        retention (``train.keep_last`` / ``train.keep_every``). Rank 0 calls it; under FSDP2 every rank does (each
        writes its shards)."""
        root = os.path.join(self.run_dir, "checkpoints")
        path = checkpoint_dir(root, self.step)
        save_state(path, self.state_dict(), what=f"checkpoint at step {self.step}")
        if is_main_process():
            prune_checkpoints(root, self.cfg.train.keep_last, self.cfg.train.keep_every, current=self.step)
        self.last_checkpoint = path
        return path

    # ------------------------------------------------------------------ one iteration

    def _batch(self) -> tuple[dict[str, Tensor], object]:
        index = torch.randint(0, len(self.data), (self.cfg.train.batch_size,), generator=self.generator)
        if self.world > 1:  # this rank's slice of the global batch
            local = len(index) // self.world
            index = index[self.rank * local:(self.rank + 1) * local]
        batch = {k: v.to(self.device, non_blocking=True) for k, v in self.data.batch(index).items()}
        return batch, self.prompt_table[batch["prompt_index"].cpu()].to(self.device)

    def _micro_batches(self):
        """This rank's slice of one global batch, split into ``train.grad_accum_steps`` micro-batches:
        ``[(batch, cond, is_last)]``."""
        batch, cond = self._batch()
        size = len(cond) // self.accum
        return [({k: v[i * size:(i + 1) * size] for k, v in batch.items()}, cond[i * size:(i + 1) * size],
                 i == self.accum - 1) for i in range(self.accum)]

    @contextmanager
    def _gradient_sync(self, loss_fn, last: bool):
        """Gradients are reduced over the ranks on the last micro-batch only (the earlier ones accumulate)."""
        if last or self.world == 1:
            yield
        elif self.sharded and loss_fn is self.g_loss:
            copies = [c.transformer for c in self.student.copies]
            for module in copies:
                module.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                for module in copies:
                    module.set_requires_gradient_sync(True)
        else:
            with loss_fn.no_sync():
                yield

    def _accumulate(self, loss_fn, micro_batches, make_args) -> dict[str, float]:
        """Forward and backward over the micro-batches (each loss scaled by 1 / their count); the logs are averaged.
        ``make_args(batch, cond) -> loss_fn's arguments``."""
        logs: dict[str, float] = {}
        for batch, cond, last in micro_batches:
            with self._gradient_sync(loss_fn, last):
                with self._autocast():
                    out = loss_fn(*make_args(batch, cond))
                total, part = out[0], out[1]
                (total if self.accum == 1 else total / self.accum).backward()
            for key, value in part.items():
                logs[key] = logs.get(key, 0.0) + float(value) / self.accum
        return logs

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.cfg.train.bf16 else nullcontext()

    def _apply(self, optimizer, named_params, logs: dict[str, float], norm: float, what: str) -> bool:
        """Clip and step ``optimizer`` unless a loss term or the gradient is non-finite: then the gradient is
        dropped, nothing is applied, and the reason is added to :attr:`problems`. Returns whether it applied."""
        problem = nonfinite_loss(logs)
        if problem is None and not math.isfinite(norm):
            problem = f"gradient of '{first_nonfinite_grad(named_params)}' is non-finite"
        if self.world > 1 and any_rank(problem is not None) and problem is None:  # every rank skips, or none
            problem = "another process's loss is non-finite"
        if problem is not None:
            optimizer.zero_grad(set_to_none=True)
            self.problems.append(f"{what}: {problem}")
            return False
        nn.utils.clip_grad_norm_([p for _, p in named_params], self.cfg.train.grad_clip)
        optimizer.step()
        return True

    def d_step(self, updates: int | None = None) -> dict[str, float]:
        """``updates`` (default ``d_steps_per_g``) discriminator updates; the student only runs under no_grad."""
        tc, rc = self.cfg.train, self.cfg.recipe
        logs: dict[str, float] = {}
        self.disc.requires_grad_(True)
        named = list(self.disc.named_parameters())
        def args(batch, cond):
            real = batch["final"] if rc.real_source == "teacher" else self.real_images_fn(
                batch["prompt_index"].cpu(), self.noise_generator).to(self.device)
            return batch, real, cond

        for _ in range(tc.d_steps_per_g if updates is None else updates):
            micro = self._micro_batches()
            self.opt_d.zero_grad(set_to_none=True)
            d_logs = self._accumulate(self.d_loss, micro, args)
            d_logs["grad_norm/d"] = grad_norm(self.disc.parameters())
            self._apply(self.opt_d, named, d_logs, d_logs["grad_norm/d"], "discriminator update")
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
            if self._stop_requested():
                break  # the warm-up can outlast a grace period: stop between two of its updates
            logs = self.d_step(updates=1)
            self.d_warmup_done += 1
        return {f"d_warmup/{k}": logs[k] for k in ("d_loss", "d_accuracy", "d_logit_gap") if k in logs}

    def g_step(self) -> dict[str, float]:
        """One student update; the discriminator is frozen meanwhile (its heads get no gradient). The adversarial
        terms are scaled by the ramp at this generator step (``recipe.adv_ramp_steps``). A skipped update also
        skips the EMA update, so the saved weights do not move either."""
        self.disc.requires_grad_(False)
        try:
            micro = self._micro_batches()
            self.opt_g.zero_grad(set_to_none=True)
            ramp = adv_ramp(self.cfg.recipe, self.step)
            logs = self._accumulate(self.g_loss, micro, lambda batch, cond: (batch, cond, ramp))
        finally:
            self.disc.requires_grad_(True)
        for name, params in self.groups.items():
            logs[f"grad_norm/{name}"] = grad_norm(params)
        named = [pair for pairs in self.named_groups.values() for pair in pairs]
        total = math.sqrt(sum(logs[f"grad_norm/{name}"] ** 2 for name in self.groups))
        if self._apply(self.opt_g, named, logs, total, "student update"):
            self.ema.update(self.step)
        self.sched_g.step()
        return logs

    def _generator_loss(self, batch, cond, adv_scale: float):
        return generator_loss(self.student, self.disc, batch, cond, self.cfg.recipe, self.noise_generator,
                              adv_scale=adv_scale)

    def _discriminator_loss(self, batch, real, cond):
        return discriminator_loss(self.student, self.disc, batch, real, cond, self.noise_generator,
                                  rc=self.cfg.recipe)

    def _stop_requested(self) -> bool:
        """A signal reached this process (under torchrun: any process; all stop at the same step)."""
        requested = self.stop is not None and self.stop.requested
        return any_rank(requested) if self.world > 1 else requested

    @property
    def uses_discriminator(self) -> bool:
        """False for pure regression (no adversarial term anywhere): the D step would cost time and change nothing."""
        rc = self.cfg.recipe
        return rc.adv_weight > 0 or (rc.step1_loss == "adversarial" and rc.step1_weight > 0)

    def train_step(self) -> dict[str, float] | None:
        """One generator step: any discriminator warm-up still due, ``d_steps_per_g`` D updates, one G update.

        Updates with a non-finite loss or gradient are skipped (see :meth:`_apply`); ``train.max_bad_steps``
        steps in a row with a skipped update raise :class:`NonFiniteTraining`."""
        self.problems = []
        if self.per_rank_noise:  # this rank's noise for this step: exact on resume, whatever the process count
            self.noise_generator.manual_seed(self.cfg.train.seed + 1_000_003 * (self.rank + 1) + self.step)
        if self.uses_discriminator:
            warm = self.d_warmup()
            if self.d_warmup_done < self.cfg.train.d_warmup_steps:
                return None  # a signal stopped the warm-up: no generator step; fit() saves and stops
            logs = {**warm, **self.d_step(), **self.g_step()}
        else:
            logs = self.g_step()
        if self.world > 1:  # the global batch's values, not rank 0's slice (grad norms are global already)
            logs = mean_over_ranks(logs)
        self.step += 1
        self.bad_steps = self.bad_steps + 1 if self.problems else 0
        if self.bad_steps >= self.cfg.train.max_bad_steps:
            kept = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else
                    "no checkpoint was written")
            raise NonFiniteTraining(
                f"{self.bad_steps} steps in a row (up to step {self.step}) had non-finite values, so no update was "
                f"applied (last: {self.problems[-1]}); nothing non-finite was saved and {kept}; lower train.g_lr / "
                "train.d_lr, or check the teacher data")
        return logs

    # ------------------------------------------------------------------ loop

    def fit(self) -> None:
        """Run to ``train.steps``. The last step is always checkpointed (``--resume latest train.steps=N`` extends
        a finished run); on SIGTERM/SIGINT the current step finishes, a checkpoint is written and
        :class:`~twostep.engine.preemption.Preempted` is raised."""
        tc = self.cfg.train
        main = is_main_process()
        every_rank = main or self.sharded  # FSDP2: the student's forward is a collective, so all ranks run it
        writer = None
        if main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(os.path.join(self.run_dir, "tb"), purge_step=self.step or None)
            except ImportError:
                writer = None
        log_path = os.path.join(self.run_dir, "train_log.jsonl")
        if main:  # a fresh run starts a new log; a resumed one drops records written after its checkpoint
            trim_jsonl(log_path, lambda record: record.get("step", 0) <= self.step, report=print)
        bar = progress(range(self.step, tc.steps), total=tc.steps, initial=self.step, desc="distill")
        started = time.perf_counter() - self.elapsed
        try:
            with StopOnSignal("training") as stop, \
                    open(log_path, "a", encoding="utf-8") if main else open(os.devnull, "w") as log:
                self.stop = stop
                for _ in bar:
                    logs = self.train_step()
                    self.elapsed = time.perf_counter() - started
                    if logs is None:  # stopped inside the discriminator warm-up
                        if every_rank:
                            self.save_checkpoint()
                        raise Preempted(f"stopped by {stop.signal_name} during the discriminator warm-up "
                                        f"({self.d_warmup_done} of {tc.d_warmup_steps} updates); state saved in "
                                        f"{self.last_checkpoint}; continue exactly with `--resume latest` (the same "
                                        "command, without --overwrite)")
                    if self.problems and main:
                        bar.write(f"step {self.step}: update skipped ({'; '.join(self.problems)})")
                    stopping = self._stop_requested()  # the grace period is short: no evaluation or preview
                    if not stopping and every_rank and self.eval_fn is not None and tc.eval_every and (
                            self.step % tc.eval_every == 0 or self.step == tc.steps):
                        with self.ema.applied():
                            logs.update({f"eval/{k}": v for k, v in self.eval_fn(self.student).items()})
                    if (self.step % tc.log_every == 0 or self.step == tc.steps or self.problems or stopping
                            or any(k.startswith("eval/") for k in logs)):  # a stop logs the step it saves
                        record = {"step": self.step, "elapsed_s": round(self.elapsed, 2),
                                  "g_lr": self.sched_g.get_last_lr()[0], **{k: round(v, 6) for k, v in logs.items()}}
                        if self.problems:
                            record["skipped"] = list(self.problems)
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                        if writer is not None:
                            for k, v in logs.items():
                                writer.add_scalar(k, v, self.step)
                        bar.set_postfix(g=f"{logs['g_total']:.3f}", d=f"{logs.get('d_loss', float('nan')):.3f}",
                                        acc=f"{logs.get('d_accuracy', float('nan')):.2f}")
                    if stopping:
                        if every_rank:
                            self.save_checkpoint()
                        raise Preempted(f"stopped by {stop.signal_name} at step {self.step} of {tc.steps}; state "
                                        f"saved in {self.last_checkpoint}; continue exactly with `--resume latest` "
                                        "(the same command, without --overwrite)")
                    if every_rank and self.sample_fn is not None and (self.step % tc.sample_every == 0
                                                                      or self.step == tc.steps):
                        with self.ema.applied():
                            self.sample_fn(self.student, os.path.join(self.run_dir, "samples",
                                                                      f"step_{self.step:06d}.png"))
                    if every_rank and (self.step % tc.checkpoint_every == 0 or self.step == tc.steps):
                        self.save_checkpoint()
        finally:
            if writer is not None:
                writer.close()


# --------------------------------------------------------------------------- run folders and resume

# Config keys that define what a checkpoint's tensors are (or the teacher and data they were fitted to): a resume
# that changes one is refused. A trailing "." covers a whole section.
IDENTITY_KEYS = ("student.sigmas", "student.params", "student.form", "student.lora_rank", "student.lora_targets",
                 "discriminator.blocks", "discriminator.hidden", "teacher.", "teacher_data.", "model.path")
# Keys that do not change what a run computes: a resume may change them freely.
OPERATIONAL_KEYS = ("train.threads", "train.log_every", "train.checkpoint_every", "train.keep_last",
                    "train.keep_every", "train.max_bad_steps")


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _matches(key: str, patterns) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def check_config_change(saved: dict, new: dict, where: str, allow_change: bool, identity_keys=IDENTITY_KEYS,
                        operational_keys=OPERATIONAL_KEYS) -> list[str]:
    """Compare a checkpoint's config with the one a resume would use. Identity keys that differ are refused;
    other differences are refused unless ``allow_change`` (``--allow-config-change``). Returns the changes
    accepted, as ``"key: old -> new"``."""
    old, cur = _flatten(saved), _flatten(new)
    changed = [k for k in sorted(set(old) | set(cur)) if old.get(k) != cur.get(k)]
    fixed = [f"'{k}' ({old.get(k)!r} in {where}, {cur.get(k)!r} now)" for k in changed if _matches(k, identity_keys)]
    if fixed:
        raise TwostepError(f"--resume: config key {', '.join(fixed)} differs; "
                           + ("it defines" if len(fixed) == 1 else "they define") + " the checkpoint's tensors (or the "
                           "teacher and data they fit), so the run cannot continue; start a new run in another --out")
    notable = [f"{k}: {old.get(k)!r} -> {cur.get(k)!r}" for k in changed if not _matches(k, operational_keys)]
    if notable and not allow_change:
        raise TwostepError(f"--resume: the config differs from {where} in " + ", ".join(notable)
                           + "; add --allow-config-change to continue with the new values")
    return notable


def prepare_resume(cfg: RunConfig, run_dir: str, resume: str | None, allow_config_change: bool = False,
                   identity_keys=IDENTITY_KEYS, operational_keys=OPERATIONAL_KEYS) -> str | None:
    """Checks only, writes nothing: the verified checkpoint to resume from (None for a fresh run), after
    comparing its config with ``cfg`` (:func:`check_config_change`). ``--resume latest`` falls back past an
    incomplete or corrupt newest checkpoint and says so. Under torchrun rank 0 checks (reading every file of a
    sharded checkpoint once, not once per process) and the other ranks take its answer."""
    from .distributed import broadcast_object, is_distributed

    if not resume:
        return None
    args = (cfg, run_dir, resume, allow_config_change, identity_keys, operational_keys)
    if not is_distributed():
        return _verified_resume(*args)
    outcome, error = None, None
    if is_main_process():
        try:
            outcome = ("checkpoint", _verified_resume(*args))
        except TwostepError as err:
            outcome, error = ("error", str(err)), err
    kind, value = broadcast_object(outcome)
    if error is not None:
        raise error
    if kind == "error":
        raise TwostepError(value)
    return value


def _verified_resume(cfg: RunConfig, run_dir: str, resume: str, allow_config_change: bool, identity_keys,
                     operational_keys) -> str:
    if os.path.isfile(run_dir):
        raise TwostepError(f"--resume: {run_dir} is a file, not a run folder")
    root = os.path.join(run_dir, "checkpoints")
    if resume == "latest":
        checkpoint = find_resumable(root, report=lambda message: print(f"twostep: {message}"))
        if checkpoint is None:
            raise TwostepError(f"--resume latest: no checkpoint in {root}; start without --resume")
    else:
        checkpoint = resume
        verify_state(checkpoint)
    saved = read_state_json(checkpoint).get("config")
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {checkpoint} records no config")
    changes = check_config_change(saved, to_dict(cfg), os.path.basename(checkpoint), allow_config_change,
                                  identity_keys=identity_keys, operational_keys=operational_keys)
    for change in changes:
        print(f"twostep: resuming with a changed config: {change}")
    return checkpoint


RUN_FILES = ("config.yaml", "train_log.jsonl", "checkpoints", "student.safetensors", "meta.json", "replaced.txt")


def check_fresh_run_dir(run_dir: str, overwrite: bool, protected: tuple[str, ...] = ()) -> None:
    """Checks only, for a run started without ``--resume``: its folder must be new or empty, unless ``overwrite``
    (which never replaces the working folder or a ``protected`` one, e.g. the teacher or the data, or a parent)."""
    check_output_dir(run_dir, what="training run folder")
    if overwrite:
        check_replaceable_dir(run_dir, True, "training run folder", protected=protected)
    if not os.path.isdir(run_dir) or not os.listdir(run_dir) or overwrite:
        return
    if any(os.path.exists(os.path.join(run_dir, name)) for name in RUN_FILES):
        raise TwostepError(f"{run_dir} already holds a training run; continue it with --resume latest (add "
                           "train.steps=N --allow-config-change to extend it), choose another --out, or pass "
                           "--overwrite to replace it")
    raise TwostepError(f"training run folder {run_dir} is not empty and is not a run; choose another --out, or pass "
                       "--overwrite to replace its contents")


def start_run(cfg: RunConfig, run_dir: str, overwrite: bool = False) -> str | None:
    """After every check passed: create the run folder, save the resolved config, remove what killed writes left.

    With ``overwrite``, a non-empty folder is first moved aside to ``RUN.replaced-TIME`` (returned): the caller
    deletes it with :func:`discard_replaced` once the new run has finished, so a failed new run loses nothing."""
    backup = None
    if overwrite and os.path.isdir(run_dir) and os.listdir(run_dir) and is_main_process():
        backup = f"{os.path.normpath(run_dir)}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(run_dir, backup)
        print(f"twostep: the previous contents of {run_dir} were moved to {backup}; they are deleted when this run "
              "finishes")
    ensure_writable_dir(run_dir, what="training run folder")
    if backup:  # recorded, so that a preempted and resumed run still deletes it when it finishes
        write_text(os.path.join(run_dir, REPLACED), os.path.abspath(backup) + "\n")
    if is_main_process():
        for folder in (run_dir, os.path.join(run_dir, "checkpoints")):
            for path in remove_stale_temporaries(folder):
                print(f"twostep: removed {path}, left by an interrupted write")
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
    return backup


REPLACED = "replaced.txt"  # the folder an --overwrite run moved aside, deleted when the run finishes


def discard_replaced(run_dir: str) -> None:
    """Delete what ``--overwrite`` moved aside (recorded in ``RUN/replaced.txt``), once the new run has finished."""
    record = os.path.join(run_dir, REPLACED)
    if is_main_process() and os.path.isfile(record):
        backup = open(record, encoding="utf-8").read().strip()
        if backup.startswith(os.path.normpath(os.path.abspath(run_dir)) + ".replaced-"):  # only ever that folder
            shutil.rmtree(backup, ignore_errors=True)
        os.remove(record)


def check_run_dir(cfg: RunConfig, run_dir: str, resume: str | None, allow_config_change: bool = False,
                  overwrite: bool = False, protected: tuple[str, ...] = ()) -> str | None:
    """Every check on the run folder before a run writes anything: :func:`prepare_resume` with ``--resume``,
    else :func:`check_fresh_run_dir`. Returns the checkpoint to resume from (or None)."""
    if overwrite and resume:
        raise TwostepError("--overwrite replaces a run; it cannot be combined with --resume")
    if allow_config_change and not resume:
        raise TwostepError("--allow-config-change only applies with --resume")
    if resume:
        return prepare_resume(cfg, run_dir, resume, allow_config_change)
    check_fresh_run_dir(run_dir, overwrite, protected)
    return None


def resume_trainer(trainer: Trainer, checkpoint: str | None) -> None:
    if checkpoint:
        trainer.load_state_dict(load_state(checkpoint, verify=False), folder=checkpoint)
        trainer.last_checkpoint = checkpoint
        if is_main_process():
            print(f"resumed from {checkpoint} at step {trainer.step}")
            drop_later_checkpoints(os.path.dirname(checkpoint), trainer.step,
                                   report=lambda message: print(f"twostep: {message}"))


def save_student_weights(trainer: Trainer, path: str) -> dict[str, Tensor]:
    """The EMA weights of the trainable parameters to ``path`` (fp32, refused when non-finite); returns them.
    Every rank calls it (FSDP2: the whole tensors are gathered from the shards); rank 0 writes."""
    with trainer.ema.applied():
        state = {k: full_tensor(v).float().cpu() for k, v in trainable_state(trainer.student).items()}
    if is_main_process():
        save_tensors(state, path, what="student weights")
    return state


def checkpoint_student_weights(run_dir: str, checkpoint: str) -> tuple[str, dict[str, Tensor]]:
    """``(folder, EMA weights of the trainable parameters by name)`` from a checkpoint (``latest`` or a folder),
    what :func:`save_student_weights` would have written at its step; an FSDP2 checkpoint's shards are gathered
    whole in this process."""
    from .checkpoint import load_whole_state

    if checkpoint == "latest":
        root = os.path.join(run_dir, "checkpoints")
        folder = find_resumable(root, report=lambda message: print(f"twostep: {message}"))
        if folder is None:
            raise TwostepError(f"--checkpoint latest: no checkpoint in {root}")
    else:
        folder = checkpoint
    state = load_whole_state(folder)
    names, ema = state.get("ema_names"), state.get("ema")
    if not isinstance(names, dict) or not isinstance(ema, dict) or set(names) != set(ema):
        raise CheckpointError(f"checkpoint {folder} does not record its EMA weights' names (written by an older "
                              "twostep); export the finished run's student.safetensors instead")
    weights = {}
    for group, group_names in names.items():
        if len(group_names) != len(ema[group]):
            raise CheckpointError(f"checkpoint {folder}: EMA group {group!r} has {len(ema[group])} tensors for "
                                  f"{len(group_names)} names")
        weights.update({name: value.float() for name, value in zip(group_names, ema[group])})
    return folder, weights


def write_meta(run_dir: str, meta: dict) -> None:
    if is_main_process():
        write_text(os.path.join(run_dir, "meta.json"), json.dumps(meta, indent=2) + "\n")
