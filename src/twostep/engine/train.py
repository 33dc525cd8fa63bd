"""The distillation loop: the D:G schedule, warm-ups, micro-batches, and when to log, sample, evaluate and save.

The method lives in ``recipe.py``; this file only schedules it: per generator step, ``d_steps_per_g`` discriminator
updates (when a loss is adversarial), ``fake_steps_per_g`` fake-score updates (with distribution matching), then one
generator update. Around it: ``train_config.py`` (the ``train``
section), ``callbacks.py`` (optimisers, clipping, the non-finite guard, EMA), ``train_log.py`` (the JSONL and
TensorBoard log) and ``run_folder.py`` (run folders, checkpoint scheduling, resume). Rank-aware: logs, bars and files on rank 0; under
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

import math
import os
import time
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from twostep.core.config import to_dict
from twostep.core.errors import TwostepError
from twostep.core.utils import is_main_process, progress
from twostep.engine.callbacks import EMA, NonFiniteTraining, adamw, clip_and_step, grad_norm, make_optimizers
from twostep.engine.checkpoint import (
    CheckpointError,
    ShardedRef,
    drop_later_checkpoints,
    load_sharded,
    load_state,
    rng_state,
    save_tensors,
    set_rng_state,
)
from twostep.engine.discriminator import Discriminator
from twostep.engine.distributed import any_rank, full_tensor, like_layout, mean_over_ranks
from twostep.engine.preemption import Preempted, StopOnSignal
from twostep.engine.recipe import adv_ramp, discriminator_loss, fake_score_step_loss, generator_loss
from twostep.engine.run_folder import is_due, write_checkpoint
from twostep.engine.student import Student, fake_score_state, trainable_state
from twostep.engine.teacher_data import TeacherData
from twostep.engine.train_config import RunConfig
from twostep.engine.train_log import TrainLog, step_record

Tensor = torch.Tensor


class _Parameters(nn.Module):
    """Parameters that live inside another module (the fake score's LoRA on the shared base), registered here so
    that DDP averages exactly these."""

    def __init__(self, params: list[nn.Parameter]):
        super().__init__()
        self.params = nn.ParameterList(params)


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


def _data_parallel(module: nn.Module, device: torch.device, ignore: list[nn.Parameter] = ()):
    """DDP over ``module``'s trainable parameters except ``ignore`` (trained by another DDP module: the fake score's
    adapter inside the student's base)."""
    from torch.nn.parallel import DistributedDataParallel

    if ignore:
        ids = {id(p) for p in ignore}
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            module, [n for n, p in module.named_parameters() if id(p) in ids])
    ids = [device.index if device.index is not None else 0] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)


def progress_postfix(logs: dict[str, float]) -> dict[str, str]:
    """The progress bar's health line: the generator's loss, and each critic's where the recipe trains one (the
    discriminator's loss and accuracy, the fake score's flow-matching loss)."""
    shown = {"g": f"{logs['g_total']:.3f}"}
    if "d_loss" in logs:
        shown.update(d=f"{logs['d_loss']:.3f}", acc=f"{logs.get('d_accuracy', float('nan')):.2f}")
    if "fake_score_total" in logs:
        shown["fake"] = f"{logs['fake_score_total']:.3f}"
    return shown


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
        from twostep.engine.distributed import init_process_group, shards_student, world_size

        self.world, self.rank = world_size(), int(os.environ.get("RANK", "0"))
        self.accum = tc.grad_accum_steps
        self.sharded = shards_student(student.cfg.form)
        if self.world > 1:
            init_process_group()
            if tc.batch_size % (self.world * self.accum):
                raise TwostepError(f"config key 'train.batch_size' {tc.batch_size} (the global batch) must be a "
                                   f"multiple of the {self.world} processes x train.grad_accum_steps {self.accum}")
        self.uses_dmd = cfg.recipe.uses_dmd
        if self.uses_dmd and not student.has_fake_score:
            raise TwostepError("recipe.dmd_weight > 0 needs the student built with its fake-score network "
                               "(Student(..., fake_score=True))")
        if self.sharded:
            student.shard(tc.fsdp_param_dtype, tc.fsdp_reduce_dtype)
        self.groups = student.parameter_groups()
        names = {id(p): n for n, p in student.named_parameters()}
        self.named_groups = {g: [(names[id(p)], p) for p in ps] for g, ps in self.groups.items()}
        self.opt_g, self.opt_d, self.sched_g, self.sched_d = make_optimizers(tc, self.groups, disc)
        # distribution matching: the fake-score network and its own optimiser (DMD2's two time-scale updates)
        self.fake_params = student.fake_score_parameters() if self.uses_dmd else []
        self.named_fake = [(names[id(p)], p) for p in self.fake_params]
        self.opt_f, self.sched_f = adamw(self.fake_params, tc.fake_lr or tc.g_lr, tc) if self.uses_dmd else (None,
                                                                                                           None)
        self.ema = EMA(self.groups, tc.ema_decay, before_write=student.reshard if self.sharded else None)
        self.generator = torch.Generator().manual_seed(tc.seed)  # batch indices: the same stream on every rank
        # noise: a run started under torchrun draws each rank's noise from its own stream, reseeded at every step
        # (kept on a resume with any process count, so the batches' order does not change); a run started in one
        # process draws noise and batch indices from one stream, as it always did
        self.per_rank_noise = self.world > 1
        self.noise_generator = torch.Generator() if self.per_rank_noise else self.generator
        if self.world > 1:
            self.g_loss = self._generator_loss if self.sharded else _data_parallel(
                _LossModule(student, self._generator_loss), self.device, ignore=self.fake_params)
            self.d_loss = _data_parallel(_LossModule(disc, self._discriminator_loss), self.device)
            self.f_loss = self._fake_score_loss if self.sharded or not self.uses_dmd else _data_parallel(
                _LossModule(_Parameters(self.fake_params), self._fake_score_loss), self.device)
        else:
            self.g_loss, self.d_loss, self.f_loss = self._generator_loss, self._discriminator_loss, self._fake_score_loss
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
        fake = {"fake_score": fake_score_state(self.student), "opt_f": self.opt_f.state_dict(),
                "sched_f": self.sched_f.state_dict()} if self.uses_dmd else {}
        return {**fake, "student": trainable_state(self.student), "disc": self.disc.state_dict(),
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
        targets: dict[str, Tensor] = {}

        def fit(value, template: Tensor, dtype=None):
            if isinstance(value, ShardedRef):
                targets[str(value)] = torch.zeros_like(template, dtype=dtype)
                return targets[str(value)]
            if isinstance(value, Tensor) and value.shape == template.shape:
                return like_layout(value, template)
            return value  # a mismatch: load_state_dict names it

        for part in ("student", "fake_score"):
            if part in state:
                state[part] = {n: fit(v, own[n]) if n in own else v for n, v in state[part].items()}
        state["ema"] = {g: [fit(v, p, torch.float32) for v, p in zip(values, self.groups.get(g, []))]
                        for g, values in state["ema"].items()}
        for opt, optimizer in (("opt_g", self.opt_g), ("opt_f", self.opt_f)):
            if opt not in state or optimizer is None:
                continue
            params = [p for group in optimizer.param_groups for p in group["params"]]
            for index, entry in state[opt]["state"].items():
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in entry and int(index) < len(params):
                        entry[key] = fit(entry[key], params[int(index)])
        if targets:
            if folder is None:
                raise CheckpointError("a sharded checkpoint needs its folder to load")
            load_sharded(folder, targets)

    def load_state_dict(self, state: dict, folder: str | None = None) -> None:
        if self.uses_dmd != ("fake_score" in state):
            raise TwostepError("the checkpoint was " + ("" if "fake_score" in state else "not ") + "written with a "
                               "fake-score network (recipe.dmd_weight > 0) and this config "
                               + ("has none" if "fake_score" in state else "has one") + "; resume with the config "
                               "the run was made with")
        self._fit_layout(state, folder)
        own = dict(self.student.named_parameters())
        with torch.no_grad():
            for name, value in (*state["student"].items(), *state.get("fake_score", {}).items()):
                if name not in own or own[name].shape != value.shape:
                    raise TwostepError(f"checkpoint tensor '{name}' does not fit this student; resume with the "
                                       "config the run was made with")
                own[name].copy_(value)
        if self.uses_dmd:
            self.opt_f.load_state_dict(state["opt_f"])
            self.sched_f.load_state_dict(state["sched_f"])
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
        """This step's full state as a checkpoint (:func:`~twostep.engine.run_folder.write_checkpoint`)."""
        tc = self.cfg.train
        self.last_checkpoint = write_checkpoint(self.run_dir, self.step, self.state_dict(), tc.keep_last,
                                                tc.keep_every)
        return self.last_checkpoint

    # ------------------------------------------------------------------ one iteration

    def _batch(self, inputs_only: bool = False) -> tuple[dict[str, Tensor], object]:
        """A batch of the data and its conditioning; ``inputs_only``: just the noise and prompts where the data can
        give them without running a teacher (online mode)."""
        index = torch.randint(0, len(self.data), (self.cfg.train.batch_size,), generator=self.generator)
        if self.world > 1:  # this rank's slice of the global batch
            local = len(index) // self.world
            index = index[self.rank * local:(self.rank + 1) * local]
        fetch = getattr(self.data, "inputs", self.data.batch) if inputs_only else self.data.batch
        batch = {k: v.to(self.device, non_blocking=True) for k, v in fetch(index).items()}
        return batch, self.prompt_table[batch["prompt_index"].cpu()].to(self.device)

    def _micro_batches(self, inputs_only: bool = False):
        """This rank's slice of one global batch, split into ``train.grad_accum_steps`` micro-batches:
        ``[(batch, cond, is_last)]``."""
        batch, cond = self._batch(inputs_only)
        size = len(cond) // self.accum
        return [({k: v[i * size:(i + 1) * size] for k, v in batch.items()}, cond[i * size:(i + 1) * size],
                 i == self.accum - 1) for i in range(self.accum)]

    @contextmanager
    def _gradient_sync(self, loss_fn, last: bool):
        """Gradients are reduced over the ranks on the last micro-batch only (the earlier ones accumulate)."""
        if last or self.world == 1:
            yield
        elif self.sharded and loss_fn in (self.g_loss, self.f_loss):
            copies = ([c.transformer for c in self.student.copies] if loss_fn is self.g_loss else
                      [self.student.fake_copy.transformer])
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
        """:func:`~twostep.engine.callbacks.clip_and_step`; a skipped update is added to :attr:`problems`. Returns
        whether it applied."""
        problem = clip_and_step(optimizer, named_params, logs, norm, self.cfg.train.grad_clip, self.world > 1)
        if problem is not None:
            self.problems.append(f"{what}: {problem}")
        return problem is None

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
        """The critic-only updates still due (``train.d_warmup_steps``), one at a time: the discriminator's (when a
        loss is adversarial) and the fake score's (with distribution matching); the student is not touched. Returns
        the last update's health as ``d_warmup/...`` (empty once the warm-up is done)."""
        remaining = self.cfg.train.d_warmup_steps - self.d_warmup_done
        if remaining <= 0:
            return {}
        logs: dict[str, float] = {}
        for _ in progress(range(remaining), total=remaining, desc="critic warm-up", leave=False):
            if self._stop_requested():
                break  # the warm-up can outlast a grace period: stop between two of its updates
            self._seed_noise(-1 - self.d_warmup_done)  # warm-up update i has its own stream, below step 0's
            logs = {**(self.d_step(updates=1) if self.uses_discriminator else {}),
                    **(self.fake_step(updates=1) if self.uses_dmd else {})}
            self.d_warmup_done += 1
        return {f"d_warmup/{k}": logs[k] for k in ("d_loss", "d_accuracy", "d_logit_gap", "fake_score_total")
                if k in logs}

    def fake_step(self, updates: int | None = None) -> dict[str, float]:
        """``updates`` (default ``fake_steps_per_g``) updates of the fake-score network on fresh student outputs
        (the student only runs under no_grad)."""
        logs: dict[str, float] = {}
        own_chain = self.cfg.recipe.student_inputs == "own"  # the student's outputs need only noise and prompts
        for _ in range(self.cfg.train.fake_steps_per_g if updates is None else updates):
            micro = self._micro_batches(inputs_only=own_chain)
            self.opt_f.zero_grad(set_to_none=True)
            f_logs = self._accumulate(self.f_loss, micro, lambda batch, cond: (batch, cond))
            f_logs["grad_norm/fake_score"] = grad_norm(self.fake_params)
            self._apply(self.opt_f, self.named_fake, f_logs, f_logs["grad_norm/fake_score"], "fake-score update")
            logs.update(f_logs)
        self.sched_f.step()
        return logs

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

    def _fake_score_loss(self, batch, cond):
        return fake_score_step_loss(self.student, batch, cond, self.cfg.recipe, self.noise_generator)

    def _discriminator_loss(self, batch, real, cond):
        return discriminator_loss(self.student, self.disc, batch, real, cond, self.noise_generator,
                                  rc=self.cfg.recipe)

    def _seed_noise(self, offset: int) -> None:
        """Under torchrun, this rank's noise for one update (``offset``: the generator step, or ``-1 - i`` for
        warm-up update ``i``) is a function of the seed, the rank and the progress alone, so a resumed run draws
        what an uninterrupted one would, whatever the process count. One process keeps one saved stream."""
        if self.per_rank_noise:
            self.noise_generator.manual_seed(self.cfg.train.seed + 1_000_003 * (self.rank + 1) + offset)

    def _stop_requested(self) -> bool:
        """A signal reached this process (under torchrun: any process; all stop at the same step)."""
        requested = self.stop is not None and self.stop.requested
        return any_rank(requested) if self.world > 1 else requested

    @property
    def uses_discriminator(self) -> bool:
        """False without an adversarial term anywhere: the D step would cost time and change nothing."""
        return self.cfg.recipe.uses_discriminator

    def train_step(self) -> dict[str, float] | None:
        """One generator step: any discriminator warm-up still due, ``d_steps_per_g`` D updates, one G update.

        Updates with a non-finite loss or gradient are skipped (see :meth:`_apply`); ``train.max_bad_steps``
        steps in a row with a skipped update raise :class:`NonFiniteTraining`."""
        self.problems = []
        critics = self.uses_discriminator or self.uses_dmd
        warm = self.d_warmup() if critics else {}
        if critics and self.d_warmup_done < self.cfg.train.d_warmup_steps:
            return None  # a signal stopped the warm-up: no generator step; fit() saves and stops
        self._seed_noise(self.step)
        logs = {**warm, **(self.d_step() if self.uses_discriminator else {}),
                **(self.fake_step() if self.uses_dmd else {}), **self.g_step()}
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
        bar = progress(range(self.step, tc.steps), total=tc.steps, initial=self.step, desc="distill")
        started = time.perf_counter() - self.elapsed
        with StopOnSignal("training") as stop, TrainLog(self.run_dir, self.step, enabled=main) as log:
            self.stop = stop
            for _ in bar:
                step_started = time.perf_counter()
                logs = self.train_step()
                self.elapsed = time.perf_counter() - started
                if logs is not None:  # the price of one generator step with its critic updates (no evaluation)
                    logs["time/step_s"] = time.perf_counter() - step_started
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
                evaluated = (not stopping and every_rank and self.eval_fn is not None
                             and is_due(self.step, tc.eval_every, tc.steps))
                if evaluated:
                    with self.ema.applied():
                        logs.update({f"eval/{k}": v for k, v in self.eval_fn(self.student).items()})
                if is_due(self.step, tc.log_every, tc.steps) or self.problems or stopping or evaluated:
                    # a stop logs the step it saves
                    log.write(step_record(self.step, self.elapsed, self.sched_g.get_last_lr()[0], logs,
                                          self.problems), logs)
                    bar.set_postfix(progress_postfix(logs))
                if stopping:
                    if every_rank:
                        self.save_checkpoint()
                    raise Preempted(f"stopped by {stop.signal_name} at step {self.step} of {tc.steps}; state "
                                    f"saved in {self.last_checkpoint}; continue exactly with `--resume latest` "
                                    "(the same command, without --overwrite)")
                if every_rank and self.sample_fn is not None and is_due(self.step, tc.sample_every, tc.steps):
                    with self.ema.applied():
                        self.sample_fn(self.student, os.path.join(self.run_dir, "samples", f"step_{self.step:06d}.png"))
                if every_rank and is_due(self.step, tc.checkpoint_every, tc.steps):
                    self.save_checkpoint()


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
