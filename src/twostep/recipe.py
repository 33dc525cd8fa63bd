"""The Turbo++ training step (DESIGN §3): losses only, no I/O. Each component sits behind a switch.

Generator (student) step, for a batch of cached teacher trajectories (noise ``eps``, teacher states, final)::

    x_hat_1 = eps - v_theta1(eps, 1)                          step 1
    x_s2    = euler(eps -> sigma2) = s2*eps + (1-s2)*x_hat_1   transition (``end_to_end: false`` detaches here)
    x_hat_2 = x_s2 - s2 * v_theta2(x_s2, s2)                   step 2
    L_G = adv_weight * g_loss(D(x_hat_2)) + step1_weight * L_step1 + final_reg_weight * |x_hat_2 - x_T|^2

``step1_loss``: ``intermediate`` = |x_hat_1 - x_tilde|^2 with x_tilde = (x_T@s2 - s2*eps)/(1-s2), the clean image
implied by the teacher's own state at s2 (same minimiser as a loss on x_s2, without the (1-s2)^2 shrink);
``final`` = |x_hat_1 - x_T|^2; ``adversarial`` = g_loss(D(x_hat_1)); ``none``. With K > 2 steps the same loss
applies to every non-final step k against the teacher state at sigma_{k+1}.

Discriminator step: real = teacher 8-step outputs (``real_source: teacher``) or dataset images (``data``);
fake = sg(x_hat_K); the same sigma_d and noise for both; hinge or non-saturating; optional R1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch.nn import functional as F

from . import flow
from .backbones.base import Conditioning
from .config import require
from .discriminator import Discriminator, d_loss, g_loss, r1_penalty
from .student import Student

Tensor = torch.Tensor


@dataclass
class RecipeConfig:
    real_source: Literal["teacher", "data"] = "teacher"
    end_to_end: bool = True
    step1_loss: Literal["intermediate", "final", "adversarial", "none"] = "intermediate"
    adv_weight: float = 1.0
    step1_weight: float = 1.0
    final_reg_weight: float = 0.0

    def validate(self) -> None:
        require(self.adv_weight >= 0 and self.step1_weight >= 0 and self.final_reg_weight >= 0, "adv_weight",
                "and the other loss weights must be >= 0")


def sample_sigma_d(batch: int, disc: Discriminator, generator: torch.Generator, device=None) -> Tensor:
    cfg = disc.cfg
    return flow.sample_logit_normal(batch, cfg.sigma_mean, cfg.sigma_std, generator=generator).to(device)


def _randn_like(x: Tensor, generator: torch.Generator) -> Tensor:
    return torch.randn(x.shape, generator=generator).to(device=x.device, dtype=x.dtype)


def generator_loss(student: Student, disc: Discriminator, batch: dict[str, Tensor], cond: Conditioning,
                   rc: RecipeConfig, generator: torch.Generator) -> tuple[Tensor, dict[str, float], dict]:
    """Total generator loss, scalar logs, and the student's outputs (``x_hat`` per step)."""
    noise = batch["noise"]
    out = student.run(noise, cond, detach_between=not rc.end_to_end, generator=generator)
    x_hats = out["x_hat"]
    final = x_hats[-1]
    sigma_d = sample_sigma_d(noise.shape[0], disc, generator, noise.device)
    d_noise = _randn_like(final, generator)
    with student.teacher() as teacher:
        fake_logits = disc.score(teacher.features, final, sigma_d, d_noise, cond)
        adv = g_loss(fake_logits, disc.cfg.loss)
        step1 = final.new_zeros(())
        for k, x_hat in enumerate(x_hats[:-1]):
            if rc.step1_loss == "intermediate":
                s_next = student.cfg.sigmas[k + 1]
                target = flow.x0_from_state(batch["states"][:, k + 1], noise, s_next)
                step1 = step1 + F.mse_loss(x_hat, target)
            elif rc.step1_loss == "final":
                step1 = step1 + F.mse_loss(x_hat, batch["final"])
            elif rc.step1_loss == "adversarial":
                step1 = step1 + g_loss(disc.score(teacher.features, x_hat, sigma_d, d_noise, cond), disc.cfg.loss)
    reg = F.mse_loss(final, batch["final"]) if rc.final_reg_weight > 0 else final.new_zeros(())
    total = rc.adv_weight * adv + rc.step1_weight * step1 + rc.final_reg_weight * reg
    logs = {"g_adv": adv.item(), "g_step1": step1.item(), "g_reg": reg.item(), "g_total": total.item(),
            "g_fake_logit": fake_logits.mean().item(), "out_mean": final.mean().item(), "out_std": final.std().item(),
            "step1_mse_to_teacher": F.mse_loss(x_hats[0].detach(), flow.x0_from_state(
                batch["states"][:, 1], noise, student.cfg.sigmas[1])).item() if len(x_hats) > 1 else 0.0}
    return total, logs, out


def discriminator_loss(student: Student, disc: Discriminator, batch: dict[str, Tensor], real: Tensor,
                       cond: Conditioning, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
    """Hinge / non-saturating D loss on real vs sg(student output) at a shared sigma_d and noise."""
    with torch.no_grad():
        fake = student.run(batch["noise"], cond)["x_hat"][-1]
    sigma_d = sample_sigma_d(real.shape[0], disc, generator, real.device)
    d_noise = _randn_like(real, generator)
    blocks = disc.cfg.blocks
    with student.teacher() as teacher:
        with torch.no_grad():
            fake_feats = teacher.features(flow.renoise(fake, d_noise, sigma_d), sigma_d, cond, blocks)
        if disc.cfg.r1_weight > 0:
            real_noisy = flow.renoise(real, d_noise, sigma_d).requires_grad_(True)
            real_feats = teacher.features(real_noisy, sigma_d, cond, blocks)
        else:
            with torch.no_grad():
                real_feats = teacher.features(flow.renoise(real, d_noise, sigma_d), sigma_d, cond, blocks)
    real_logits = disc(real_feats, sigma_d, cond)
    fake_logits = disc(fake_feats, sigma_d, cond)
    loss = d_loss(real_logits, fake_logits, disc.cfg.loss)
    r1 = r1_penalty(real_logits, real_noisy) if disc.cfg.r1_weight > 0 else loss.new_zeros(())
    total = loss + disc.cfg.r1_weight * r1
    accuracy = 0.5 * ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean())
    logs = {"d_loss": loss.item(), "d_r1": r1.item(), "d_accuracy": accuracy.item(),
            "d_real_logit": real_logits.mean().item(), "d_fake_logit": fake_logits.mean().item()}
    return total, logs
