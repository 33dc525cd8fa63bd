"""What the loop does around each update: the optimisers and their warm-up, gradient norms and clipping, the
non-finite guard, and the EMA of the student's weights.

Pure training mechanics with no knowledge of the method (``recipe.py``) or of run folders (``run_folder.py``).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from twostep.core.errors import TwostepError
from twostep.engine.distributed import any_rank, is_sharded, local_part

Tensor = torch.Tensor


def make_optimizers(tc, groups: dict[str, list[nn.Parameter]], disc: nn.Module):
    """``(opt_g, opt_d, sched_g, sched_d)``: AdamW for the student's parameter groups and for the discriminator's
    heads, each with a linear learning-rate warm-up over ``tc.warmup_steps`` updates (``tc``: the ``train``
    section)."""
    opt_g, sched_g = adamw([{"params": ps, "name": n} for n, ps in groups.items()], tc.g_lr, tc)
    opt_d, sched_d = adamw(disc.parameters(), tc.d_lr, tc)
    return opt_g, opt_d, sched_g, sched_d


def adamw(params, lr: float, tc):
    """``(optimizer, scheduler)``: AdamW with the ``train`` section's betas and weight decay, and a linear
    learning-rate warm-up over ``tc.warmup_steps`` updates."""
    optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    warm = lambda s: min(1.0, (s + 1) / max(1, tc.warmup_steps))  # noqa: E731
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warm)


def clip_and_step(optimizer, named_params, logs: dict[str, float], norm: float, grad_clip: float,
                  distributed: bool = False) -> str | None:
    """Clip and step ``optimizer`` unless a logged loss term or the gradient (norm ``norm``) is non-finite: then the
    gradient is dropped, nothing is applied, and the reason is returned (None when the update was applied). Under
    torchrun (``distributed``) every rank skips, or none does."""
    problem = nonfinite_loss(logs)
    if problem is None and not math.isfinite(norm):
        problem = f"gradient of '{first_nonfinite_grad(named_params)}' is non-finite"
    if distributed and any_rank(problem is not None) and problem is None:
        problem = "another process's loss is non-finite"
    if problem is not None:
        optimizer.zero_grad(set_to_none=True)
        return problem
    nn.utils.clip_grad_norm_([p for _, p in named_params], grad_clip)
    optimizer.step()
    return None


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
    """The global L2 norm of the gradients of `params` (summed over the ranks' shards under FSDP2)."""
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


class NonFiniteTraining(TwostepError):
    """``train.max_bad_steps`` consecutive steps had a non-finite loss or gradient."""
