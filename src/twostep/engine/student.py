"""The K-step student: step ``k`` starts at ``sigmas[k]`` and has its own parameters ``theta_k``.

Parameter forms (DESIGN §1.2):

- ``decoupled`` + ``lora``: one frozen base (the teacher's weights) plus one PEFT LoRA adapter per step.
  With adapters disabled the module *is* the teacher, which also serves as the discriminator's backbone,
  so a 6B model is held once.
- ``decoupled`` + ``full``: one trainable full copy per step (under torchrun: FSDP2, see :meth:`Student.shard`).
- ``shared``: one parameter set (one adapter, or one copy) for every step: the ablation baseline.

With ``fake_score=True`` (distribution matching, ``recipe.dmd_weight > 0``) the student also holds DMD's fake-score
network, initialised as the teacher: one more LoRA adapter on the same frozen base (``lora``), or one more full copy
(``full``). It is trained by its own optimiser (:meth:`Student.fake_score_parameters`), never exported.

Sampling (:meth:`Student.sample`): ``x_hat_k = x - sigma_k * v_k``; between steps the state moves to
``sigma_{k+1}`` by the deterministic Euler step (``renoise="euler"``; from sigma=1 that is exactly
``sigma2 * eps + (1 - sigma2) * x_hat_1``) or by fresh noise (``renoise="fresh"``).
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.utils.checkpoint
from torch import nn

from twostep.core.config import require
from twostep.core.errors import TwostepError
from twostep.engine import flow
from twostep.engine.backbone import Backbone, Conditioning

Tensor = torch.Tensor


@dataclass
class StudentConfig:
    sigmas: list[float] = field(default_factory=lambda: [1.0, 0.75])
    params: Literal["decoupled", "shared"] = "decoupled"
    form: Literal["lora", "full"] = "lora"
    lora_rank: int = 16
    lora_alpha: float = 16.0
    # DMD's fake-score LoRA (form: lora): its rank, 0 = lora_rank; its scale stays lora_alpha / lora_rank. DMD2 trains
    # a full copy: a fake score that lags the student's distribution biases the DMD gradient
    fake_score_rank: int = 0
    # attention and feed-forward linears of every block (module-name suffixes, as peft matches them)
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"])
    renoise: Literal["euler", "fresh"] = "euler"

    def validate(self) -> None:
        require(len(self.sigmas) >= 1 and self.sigmas[0] == 1.0, "sigmas", "must start at 1.0")
        require(all(0 < b < a for a, b in zip(self.sigmas, self.sigmas[1:])), "sigmas",
                "must be strictly decreasing and above 0")
        require(self.lora_rank >= 1, "lora_rank", "must be at least 1")
        require(self.lora_alpha > 0, "lora_alpha", "must be positive (the LoRA scale is lora_alpha / lora_rank)")
        require(self.fake_score_rank >= 0, "fake_score_rank", "must be >= 0 (0 = lora_rank)")
        require(len(self.lora_targets) >= 1 and all(t.strip() for t in self.lora_targets), "lora_targets",
                "must name at least one module (no empty names)")

    @property
    def num_steps(self) -> int:
        return len(self.sigmas)

    @property
    def fake_score_lora_rank(self) -> int:
        return self.fake_score_rank or self.lora_rank


def lora_target_names(transformer: nn.Module, suffixes: list[str]) -> list[str]:
    """Full names of the ``nn.Linear`` modules whose name is one of ``suffixes`` or ends in ``.suffix`` (peft's
    rule, restricted to linears: a suffix may also name a container elsewhere, e.g. FLUX.2's ``attn.to_out`` is a
    linear in single-stream blocks and a ModuleList in double-stream ones)."""
    return [name for name, module in transformer.named_modules() if isinstance(module, nn.Linear)
            and any(name == s or name.endswith("." + s) for s in suffixes)]


class KStepSampler:
    """The K-step sampling procedure, shared by the trainable :class:`Student` and :class:`MergedStudent`.

    Subclasses provide ``cfg`` (a :class:`StudentConfig`) and ``velocity(step, x, sigma, cond)``.
    """

    cfg: StudentConfig

    def velocity(self, step: int, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        raise NotImplementedError

    def step_sigma(self, step: int, batch: int, device=None) -> Tensor:
        return torch.full((batch,), float(self.cfg.sigmas[step]), device=device)

    def transition(self, x_hat: Tensor, x: Tensor, v: Tensor, step: int,
                   fresh_noise: Tensor | None = None) -> Tensor:
        """The state at ``sigmas[step + 1]`` from step ``step``'s clean estimate."""
        s_next = self.cfg.sigmas[step + 1]
        if self.cfg.renoise == "fresh":
            return flow.renoise(x_hat, fresh_noise, s_next)
        return flow.euler_step(x, v, self.cfg.sigmas[step], s_next)

    def run(self, noise: Tensor, cond: Conditioning, detach_between: bool = False,
            generator: torch.Generator | None = None) -> dict[str, list[Tensor]]:
        """All K steps with autograd on. Returns ``{"x_hat": [K x (B,C,H,W)], "states": [K x (B,C,H,W)]}``.

        ``states[k]`` is the input of step ``k`` (``states[0]`` = noise). With ``detach_between`` no gradient
        crosses from step ``k+1`` into step ``k`` (the classic per-step scheme).
        """
        x, x_hats, states = noise, [], [noise]
        for k in range(self.cfg.num_steps):
            sigma = self.step_sigma(k, x.shape[0], x.device)
            v = self.velocity(k, x, sigma, cond)
            x_hat = flow.x0_from_velocity(x, v, sigma)
            x_hats.append(x_hat)
            if k + 1 < self.cfg.num_steps:
                fresh = None
                if self.cfg.renoise == "fresh":
                    fresh = torch.randn(x.shape, generator=generator).to(x.device)
                if detach_between:
                    x_hat_in, x_in, v_in = x_hat.detach(), x.detach(), v.detach()
                else:
                    x_hat_in, x_in, v_in = x_hat, x, v
                x = self.transition(x_hat_in, x_in, v_in, k, fresh)
                states.append(x)
        return {"x_hat": x_hats, "states": states}

    @torch.no_grad()
    def sample(self, noise: Tensor, cond: Conditioning, batch_size: int = 500,
               generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Inference in batches: ``{"final": x_hat_K, "step1": x_hat_1}``, on CPU."""
        finals, firsts = [], []
        for start in range(0, noise.shape[0], batch_size):
            out = self.run(noise[start:start + batch_size], cond[start:start + batch_size], generator=generator)
            finals.append(out["x_hat"][-1].cpu())
            firsts.append(out["x_hat"][0].cpu())
        return {"final": torch.cat(finals), "step1": torch.cat(firsts)}


class Student(KStepSampler, nn.Module):
    """``velocity(k, x, sigma, cond)`` with parameter set ``k``; ``teacher()`` gives the frozen base view."""

    FAKE_SCORE = "fake_score"  # the fake-score network's adapter name (LoRA)

    def __init__(self, teacher: Backbone, cfg: StudentConfig, fake_score: bool = False):
        super().__init__()
        self.cfg = cfg
        self.has_fake_score = fake_score
        self.num_sets = cfg.num_steps if cfg.params == "decoupled" else 1
        self._active: str | None = "<unset>"  # LoRA routing: adapter name, or None for the teacher
        teacher.requires_grad_(False)
        if cfg.form == "lora":
            from peft import LoraConfig

            self.base = teacher
            targets = lora_target_names(teacher.transformer, cfg.lora_targets)
            if not targets:
                raise TwostepError(f"config key 'student.lora_targets' {list(cfg.lora_targets)} matches no linear "
                                   "layer of the transformer")
            lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=targets,
                              init_lora_weights=True)
            fake_rank = cfg.fake_score_lora_rank
            fake_lora = LoraConfig(r=fake_rank, lora_alpha=cfg.lora_alpha * fake_rank / cfg.lora_rank,
                                   target_modules=targets, init_lora_weights=True)
            with warnings.catch_warnings():  # peft warns on every adapter after the first: several are the point
                warnings.filterwarnings("ignore", message=".*Already found a `peft_config`.*")
                for name in self.adapter_names:
                    teacher.transformer.add_adapter(lora, adapter_name=name)
                if fake_score:
                    teacher.transformer.add_adapter(fake_lora, adapter_name=self.FAKE_SCORE)
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._lora_params = {name: [p for n, p in teacher.named_parameters() if f".{name}." in n]
                                 for name in self.adapter_names}
            self._fake_params = [p for n, p in teacher.named_parameters() if f".{self.FAKE_SCORE}." in n]
            for params in (*self._lora_params.values(), self._fake_params):
                for p in params:
                    p.data = p.data.float()  # adapters train in fp32 on a bf16 base (peft casts inputs to match)
                    p.requires_grad_(True)
            self._tuner_layers = [m for m in teacher.transformer.modules() if isinstance(m, BaseTunerLayer)]
            self._teacher_view = teacher
            self.copies = None
            self.fake_copy = None
            self._set_adapter_state(self.adapter_names[0])
        else:
            self.base = None
            self.copies = nn.ModuleList(copy.deepcopy(teacher).requires_grad_(True) for _ in range(self.num_sets))
            self.fake_copy = copy.deepcopy(teacher).requires_grad_(True) if fake_score else None
            self._fake_params = list(self.fake_copy.parameters()) if fake_score else []
            for p in (*self.copies.parameters(), *self._fake_params):  # fp32 master weights on a bf16 base
                p.data = p.data.float()
            self._teacher_view = teacher  # a frozen submodule (moves with .to()), never in parameter_groups()

    # ------------------------------------------------------------------ parameter sets

    @property
    def adapter_names(self) -> list[str]:
        return [f"step{k}" for k in range(self.num_sets)]

    def set_index(self, step: int) -> int:
        return step if self.num_sets > 1 else 0

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters per step set: ``{"step0": [...], "step1": [...]}`` (or one ``step0``)."""
        if self.cfg.form == "lora":
            return {name: list(params) for name, params in self._lora_params.items()}
        return {f"step{k}": list(c.parameters()) for k, c in enumerate(self.copies)}

    def fake_score_parameters(self) -> list[nn.Parameter]:
        """The fake-score network's trainable parameters (empty without one)."""
        return list(self._fake_params)

    def _select(self, step: int) -> Backbone:
        index = self.set_index(step)
        if self.cfg.form == "full":
            return self.copies[index]
        self._set_adapter_state(self.adapter_names[index])
        return self.base

    def _set_adapter_state(self, name: str | None) -> None:
        """Route every LoRA layer to adapter ``name`` (None: all adapters off = the teacher).

        Set on the layers directly rather than with peft's ``set_adapter``, which also flips ``requires_grad``:
        every step's adapter keeps training, and a recomputed checkpoint must not change anyone's flags.
        """
        if name == self._active:
            return
        for layer in self._tuner_layers:
            layer._disable_adapters = name is None
            if name is not None:
                layer._active_adapter = [name]
        self._active = name

    @contextmanager
    def _adapter_state(self, name: str | None):
        previous = self._active
        self._set_adapter_state(name)
        try:
            yield
        finally:
            self._set_adapter_state(previous)

    @contextmanager
    def teacher(self):
        """The frozen teacher (LoRA: the same module with every adapter off)."""
        if self.cfg.form == "lora":
            with self._adapter_state(None):
                yield self.base
        else:
            yield self._teacher_view

    @contextmanager
    def fake_score(self):
        """DMD's fake-score network (LoRA: the shared base with the fake-score adapter on)."""
        if not self.has_fake_score:
            raise TwostepError("this student has no fake-score network (build it with fake_score=True)")
        if self.cfg.form == "lora":
            with self._adapter_state(self.FAKE_SCORE):
                yield self.base
        else:
            yield self.fake_copy

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Checkpoint transformer blocks. For LoRA the recompute in backward reruns a block with the adapter
        that was active in its forward (steps and the teacher share one module)."""
        if self.cfg.form == "full":
            for backbone in (*self.copies, *([self.fake_copy] if self.has_fake_score else [])):
                backbone.set_gradient_checkpointing(enabled)
            return
        if not enabled:
            self.base.set_gradient_checkpointing(False)
            return

        def checkpoint_with_adapter(block, *args):
            state = self._active

            def run(*inner):
                with self._adapter_state(state):
                    return block(*inner)

            return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)

        self.base.transformer.enable_gradient_checkpointing(checkpoint_with_adapter)

    def shard(self, param_dtype: str = "float32", reduce_dtype: str = "float32") -> None:
        """FSDP2 under torchrun (``form: full``): each step copy and the frozen teacher, sharded per transformer
        block. Call before any optimizer is built: the parameters become sharded ``DTensor``s."""
        from twostep.engine.distributed import shard_backbone

        if self.cfg.form != "full":
            raise ValueError("only student.form=full is sharded (LoRA trains with DDP over the adapters)")
        for backbone in (*self.copies, *([self.fake_copy] if self.has_fake_score else []), self._teacher_view):
            shard_backbone(backbone, param_dtype, reduce_dtype)
        if self.has_fake_score:
            self._fake_params = list(self.fake_copy.parameters())  # now sharded DTensors

    def reshard(self) -> None:
        """FSDP2 keeps a root's gathered parameters after a forward (and after one stopped early): free them, so the
        next forward gathers the sharded values again. Needed before the parameters are written outside an
        optimizer step (EMA weights swapped in and out)."""
        from torch.distributed.fsdp import FSDPModule

        for backbone in (*(self.copies or ()), *([self.fake_copy] if self.fake_copy is not None else []),
                         self._teacher_view):
            for module in backbone.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()

    # ------------------------------------------------------------------ calls

    def velocity(self, step: int, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        return self._select(step).velocity(x, sigma, cond)



class MergedStudent(KStepSampler, nn.Module):
    """Deployable form: one plain backbone per step (LoRA merged into a copy of the base). Same outputs as the
    :class:`Student` it came from, at exactly the teacher's cost per step."""

    def __init__(self, backbones: list[Backbone], cfg: StudentConfig):
        super().__init__()
        self.cfg = cfg
        self.backbones = nn.ModuleList(backbones)

    def velocity(self, step: int, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        return self.backbones[step].velocity(x, sigma, cond)


def merge_student(student: Student) -> MergedStudent:
    """Per-step plain transformers: ``W + delta_k`` for every LoRA layer (``full``: the copies themselves)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    cfg = student.cfg
    if cfg.form == "full":
        return MergedStudent([student.copies[student.set_index(k)] for k in range(cfg.num_steps)], cfg)
    transformer = student.base.transformer
    base_state = {k.replace(".base_layer.", "."): v for k, v in transformer.state_dict().items() if "lora_" not in k}
    merged_sets = []
    for index, name in enumerate(student.adapter_names):
        state = {k: v.clone() for k, v in base_state.items()}
        with torch.no_grad():
            for module_name, module in transformer.named_modules():
                if isinstance(module, BaseTunerLayer) and name in module.lora_A:
                    key = f"{module_name}.weight"
                    state[key] = state[key] + module.get_delta_weight(name).to(state[key].dtype)
        # assign=True: the parameters become the merged tensors, in the student's dtype and device (a
        # `.to(dtype)` on a diffusers model logs a keep-in-float32 warning, even when it changes nothing)
        plain = type(transformer).from_config(transformer.config)  # the same diffusers class, without adapters
        plain.load_state_dict(state, assign=True)
        merged_sets.append(type(student.base)(plain.eval().requires_grad_(False)))
    return MergedStudent([merged_sets[student.set_index(k)] for k in range(cfg.num_steps)], cfg)


def _named_copies(student: Student, params) -> dict[str, Tensor]:
    ids = {id(p) for p in params}
    return {n: p.detach().clone() for n, p in student.named_parameters() if id(p) in ids}


def trainable_state(student: Student) -> dict[str, Tensor]:
    """Only what the student trains (LoRA adapters, or the per-step copies); sharded under FSDP2."""
    return _named_copies(student, [p for params in student.parameter_groups().values() for p in params])


def fake_score_state(student: Student) -> dict[str, Tensor]:
    """The fake-score network's trainable parameters by name (empty without one); sharded under FSDP2."""
    return _named_copies(student, student.fake_score_parameters())
