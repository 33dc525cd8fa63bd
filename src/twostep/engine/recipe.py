"""The Turbo++ training step (DESIGN §3): losses only, no I/O. Each component sits behind a switch.

Generator (student) step, for a batch of cached teacher trajectories (noise ``eps``, teacher states, final)::

    x_hat_1 = eps - v_theta1(eps, 1)                          step 1
    x_s2    = euler(eps -> sigma2) = s2*eps + (1-s2)*x_hat_1   transition (``end_to_end: false`` detaches here)
    x_hat_2 = x_s2 - s2 * v_theta2(x_s2, s2)                   step 2
    L_G = r * adv_weight * g_loss(D(x_hat_2)) + step1_weight * L_step1 + final_reg_weight * |x_hat_2 - x_T|^2

``r`` is the adversarial ramp (``adv_ramp_steps``: 0 -> 1 linearly over the first generator steps; 1 without a
ramp): a freshly initialised discriminator's gradients are noise, so the generator should not follow them at full
weight from step one.

``step1_loss``: ``intermediate`` = |x_hat_1 - x_tilde|^2 with x_tilde = (x_T@s2 - s2*eps)/(1-s2), the clean image
implied by the teacher's own state at s2 (same minimiser as a loss on x_s2, without the (1-s2)^2 shrink);
``final`` = |x_hat_1 - x_T|^2; ``adversarial`` = r * g_loss(D(x_hat_1)); ``none``. With K > 2 steps the same loss
applies to every non-final step k against the teacher state at sigma_{k+1}.

``student_inputs``: ``own`` (above: step k+1 starts from step k's transition) or ``teacher_renoised`` (the LADD
reference arm: step k > 0 starts from the teacher's final x_T renoised to sigma_k with fresh noise, step 0 from
``eps``; no step feeds the next, so ``end_to_end`` must be false).

Discriminator step: it trains on every output that the generator scores adversarially, so no output can drift to
where the heads never looked (the hinge generator loss has no lower bound). Output k's fakes are sg(x_hat_k)
(recomputed without a graph from the D step's own batch); its reals are

- the final output: teacher 8-step outputs (``real_source: teacher``) or dataset images (``data``);
- a non-final x_hat_k (``step1_loss: adversarial``): ``step1_adv_real: final`` = the same reals as the final output,
  or ``implied`` = x_tilde, the clean image implied by the teacher's state at sigma_{k+1}.

Distribution matching (``kind: dmd2``, or ``dmd_weight > 0`` on Turbo++; DMD2, Yin et al. 2024; ``dmd.py``): a
fake-score network (``Student.fake_score``) learns the student's own output distribution by flow matching
(:func:`fake_score_step_loss`, ``train.fake_steps_per_g`` updates per generator step), and each output in
:func:`dmd_outputs` gets ``dmd_weight * L_dmd`` at a renoising level uniform in ``[dmd_sigma_min, dmd_sigma_max]``.
With ``end_to_end: false`` that is every step's output (DMD2's backward simulation: step k's input is the student's
own chain, detached); with ``end_to_end: true`` only the final output (the gradient flows back through every step,
as in Turbo++). DMD2's GAN is ``adv_weight > 0`` on the same discriminator heads as Turbo++'s (DMD2 puts its heads on
the fake-score network's features; ours read the frozen teacher's), with ``real_source: data`` as DMD2 has it.

Each output is seen at noise levels that suit it: x_hat_k only has to be right at the coarse level that survives
renoising to sigma_{k+1}, so its sigma_d = sigma_{k+1} + (1 - sigma_{k+1}) * u with u logit-normal (the final
output: sigma_{k+1} = 0, plain logit-normal), drawn the same way in the G and the D terms; real and fake of one
output share sigma_d and noise. Hinge or non-saturating; optional R1 (approximate or exact, on the final output's
reals) and wrong-prompt fakes (real images with another sample's prompt), see ``discriminator.py``.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
from torch.nn import functional as F

from twostep.core.config import require
from twostep.engine import flow
from twostep.engine.backbone import Conditioning
from twostep.engine.dmd import dmd_loss, fake_score_loss, sample_dmd_sigmas
from twostep.engine.discriminator import (
    Discriminator,
    approx_r1_penalty,
    d_fake_loss,
    d_loss,
    g_loss,
    perturb,
    r1_penalty,
    twice_differentiable_attention,
    wrong_prompt_pairs,
)
from twostep.engine.student import Student

Tensor = torch.Tensor


# the keys whose default depends on `kind` (None in a config = the kind's default, resolved on load)
KIND_DEFAULTS = {
    "turbo": {"end_to_end": True, "step1_loss": "intermediate", "adv_weight": 1.0, "dmd_weight": 0.0},
    # DMD2 as published: the distribution matching gradient on every step's output (backward simulation), no GAN
    "dmd2": {"end_to_end": False, "step1_loss": "none", "adv_weight": 0.0, "dmd_weight": 1.0},
}


@dataclass
class RecipeConfig:
    # `turbo`: the adversarial loss on the final output is the main loss (the paper's recipe). `dmd2`: the
    # distribution matching gradient is (adv_weight > 0 adds DMD2's GAN term)
    kind: Literal["turbo", "dmd2"] = "turbo"
    real_source: Literal["teacher", "data"] = "teacher"
    end_to_end: bool | None = None
    step1_loss: Literal["intermediate", "final", "adversarial", "none"] | None = None
    adv_weight: float | None = None
    step1_weight: float = 1.0
    final_reg_weight: float = 0.0
    # the discriminator's reals for a non-final output with an adversarial loss: `final` = the final output's reals
    # (real_source), `implied` = the clean image implied by the teacher's state at sigma_{k+1} (teacher only)
    step1_adv_real: Literal["final", "implied"] = "final"
    # adversarial weights rise linearly from 0 to their value over this many generator steps (0 = no ramp)
    adv_ramp_steps: int = 0
    # `own`: each step starts from the previous step's transition (the recipe). `teacher_renoised`: step k > 0 starts
    # from the teacher's final renoised to sigma_k with fresh noise (LADD's inputs; needs end_to_end false)
    student_inputs: Literal["own", "teacher_renoised"] = "own"
    # distribution matching (dmd.py): its weight, and the range of the renoising level of the scored outputs
    # (DMD2 trims both ends of the teacher's range)
    dmd_weight: float | None = None
    dmd_sigma_min: float = 0.02
    dmd_sigma_max: float = 0.98
    # the time shift of those levels (flow.shift_sigma on the uniform draw; 1 = uniform, > 1 = more at high noise),
    # for the generator's gradient and the fake score's training alike, as flow-matching DMD ports shift them
    dmd_sigma_shift: float = 1.0

    def __post_init__(self) -> None:
        for key, value in KIND_DEFAULTS.get(self.kind, KIND_DEFAULTS["turbo"]).items():
            if getattr(self, key) is None:
                setattr(self, key, value)

    @property
    def uses_dmd(self) -> bool:
        """A fake-score network is trained and the generator gets the distribution matching gradient."""
        return self.dmd_weight > 0

    @property
    def uses_discriminator(self) -> bool:
        """Some output gets an adversarial loss. Without one (plain regression, DMD2 without its GAN) no
        discriminator is trained, and scoring the outputs would cost a teacher forward for an untrained head."""
        return self.adv_weight > 0 or (self.step1_loss == "adversarial" and self.step1_weight > 0)

    def validate(self) -> None:
        for key in ("adv_weight", "step1_weight", "final_reg_weight", "dmd_weight"):
            require(getattr(self, key) >= 0, key, "must be >= 0 (a loss weight)")
        if self.kind == "dmd2":
            require(self.dmd_weight > 0, "dmd_weight", "must be > 0 with kind=dmd2 (its main loss)")
            require(self.student_inputs == "own", "student_inputs",
                    "must be own with kind=dmd2 (DMD2 trains each step on the student's own chain)")
        require(self.adv_weight > 0 or self.final_reg_weight > 0 or self.dmd_weight > 0, "adv_weight",
                "is 0, and so are final_reg_weight and dmd_weight: the final output would get no loss")
        if self.kind == "dmd2" and self.end_to_end and self.step1_loss == "intermediate" and self.adv_weight >= 1:
            warnings.warn("recipe.kind=dmd2 keeps the Turbo++ settings this config sets (end_to_end: true, "
                          "step1_loss: intermediate, adv_weight >= 1): that is DMD plus Turbo++'s losses, not DMD2 as "
                          "published; use --config zimage_turbo_2step_dmd2, or set those keys", stacklevel=2)
        require(0 <= self.dmd_sigma_min < 1, "dmd_sigma_min", "must be in [0, 1) (a noise level)")
        require(0 < self.dmd_sigma_max <= 1, "dmd_sigma_max", "must be in (0, 1] (a noise level)")
        require(self.dmd_sigma_min < self.dmd_sigma_max, "dmd_sigma_max",
                f"must be above dmd_sigma_min ({self.dmd_sigma_min})")
        require(self.dmd_sigma_shift > 0, "dmd_sigma_shift", "must be > 0 (1 = no shift)")
        require(self.adv_ramp_steps >= 0, "adv_ramp_steps", "must be >= 0 (0 = no ramp)")
        if self.student_inputs == "teacher_renoised":
            require(not self.end_to_end, "end_to_end", "must be false with student_inputs=teacher_renoised (no step "
                    "feeds the next, there is nothing to back-propagate through)")
            require(self.step1_loss != "none" and self.step1_weight > 0, "step1_loss",
                    "must give step 1 a loss with student_inputs=teacher_renoised (its output feeds nothing else)")
        if self.step1_loss == "adversarial" and self.step1_adv_real == "implied":
            require(self.real_source == "teacher", "step1_adv_real",
                    "=implied is the teacher's own state: it needs real_source=teacher")


# --------------------------------------------------------------------------- pieces


def adv_ramp(rc: RecipeConfig, generator_step: int) -> float:
    """Factor on every adversarial generator term at 0-based generator step ``generator_step``: ``step / N`` over
    the first ``N = adv_ramp_steps`` steps (0 at the first), 1 afterwards and without a ramp."""
    if rc.adv_ramp_steps <= 0:
        return 1.0
    return min(1.0, generator_step / rc.adv_ramp_steps)


def adversarial_outputs(rc: RecipeConfig, num_steps: int) -> list[int]:
    """Indices k of the outputs x_hat_k scored by the discriminator, the final one first.

    The final output is whenever a discriminator is trained (its D logs are the run's health signal even when
    ``adv_weight`` is 0); the earlier ones when ``step1_loss`` is adversarial; none without a discriminator. The
    generator and the discriminator step both follow this list.
    """
    if not rc.uses_discriminator:
        return []
    final = [num_steps - 1]
    if rc.step1_loss == "adversarial" and rc.step1_weight > 0:
        return final + list(range(num_steps - 1))
    return final


def dmd_outputs(rc: RecipeConfig, num_steps: int) -> list[int]:
    """Indices k of the outputs that get the distribution matching loss (and train the fake score): every step's
    with ``end_to_end: false`` (DMD2's backward simulation), the final one only with ``end_to_end: true``."""
    if not rc.uses_dmd:
        return []
    return list(range(num_steps)) if not rc.end_to_end else [num_steps - 1]


def clean_estimate(backbone, x_sigma: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
    return flow.x0_from_velocity(x_sigma, backbone.velocity(x_sigma, sigma, cond), sigma)


def sigma_floor(student: Student, k: int) -> float:
    """The lowest sigma_d at which output k is judged: sigma_{k+1} (0 for the final output)."""
    sigmas = student.cfg.sigmas
    return float(sigmas[k + 1]) if k + 1 < len(sigmas) else 0.0


def sample_sigma_d(batch: int, disc: Discriminator, generator: torch.Generator, device=None,
                   floor: float = 0.0) -> Tensor:
    """``floor + (1 - floor) * u``, ``u`` logit-normal (``discriminator.sigma_mean/std``): in ``[floor, 1]``."""
    cfg = disc.cfg
    u = flow.sample_logit_normal(batch, cfg.sigma_mean, cfg.sigma_std, generator=generator)
    return (floor + (1 - floor) * u).to(device)


def _randn_like(x: Tensor, generator: torch.Generator) -> Tensor:
    return torch.randn(x.shape, generator=generator).to(device=x.device, dtype=x.dtype)


def implied_clean(batch: dict[str, Tensor], student: Student, k: int) -> Tensor:
    """x_tilde: the clean image implied by the teacher's state at sigma_{k+1} on the straight path of the noise."""
    return flow.x0_from_state(batch["states"][:, k + 1], batch["noise"], student.cfg.sigmas[k + 1])


def student_outputs(student: Student, batch: dict[str, Tensor], cond: Conditioning, rc: RecipeConfig,
                    generator: torch.Generator) -> dict[str, list[Tensor]]:
    """The K clean estimates ``x_hat`` and each step's input ``states`` (``states[0]`` = the noise).

    ``own``: :meth:`Student.run` (the transition of step k feeds step k+1). ``teacher_renoised``: step k > 0 gets
    ``renoise(x_T, sigma_k, n_k)``; the fresh ``n_k`` (returned as ``input_noise``) are drawn from ``generator``
    first, for k = 1..K-1 in order.
    """
    if rc.student_inputs == "own":
        return student.run(batch["noise"], cond, detach_between=not rc.end_to_end, generator=generator)
    final = batch["final"]
    sigmas = student.cfg.sigmas
    input_noise = [_randn_like(final, generator) for _ in sigmas[1:]]
    states = [batch["noise"]] + [flow.renoise(final, n, s) for n, s in zip(input_noise, sigmas[1:])]
    x_hats = []
    for k, x in enumerate(states):
        sigma = student.step_sigma(k, x.shape[0], x.device)
        x_hats.append(flow.x0_from_velocity(x, student.velocity(k, x, sigma, cond), sigma))
    return {"x_hat": x_hats, "states": states, "input_noise": input_noise}


def _suffix(k: int, num_steps: int) -> str:
    """Log-key suffix of output k: none for the final output, ``/step{k+1}`` for the others (1-based, as x_hat_1)."""
    return "" if k == num_steps - 1 else f"/step{k + 1}"


# --------------------------------------------------------------------------- losses


def generator_loss(student: Student, disc: Discriminator, batch: dict[str, Tensor], cond: Conditioning,
                   rc: RecipeConfig, generator: torch.Generator,
                   adv_scale: float = 1.0) -> tuple[Tensor, dict[str, float], dict]:
    """Total generator loss, scalar logs, and the student's outputs (``x_hat`` per step).

    ``adv_scale`` multiplies every adversarial term (the ramp, :func:`adv_ramp`).
    """
    noise = batch["noise"]
    out = student_outputs(student, batch, cond, rc, generator)
    x_hats = out["x_hat"]
    final = x_hats[-1]
    num = len(x_hats)

    # adversarial terms: every scored output, the final one first, each at its own sigma_d range
    # (a term with weight 0, the final output's without a GAN, is only logged: no graph through the teacher)
    adv_terms, fake_logits = {}, {}
    with student.teacher() as teacher:
        for k in adversarial_outputs(rc, num):
            sigma_d = sample_sigma_d(noise.shape[0], disc, generator, noise.device, floor=sigma_floor(student, k))
            d_noise = _randn_like(final, generator)
            with torch.set_grad_enabled(torch.is_grad_enabled() and (rc.adv_weight if k == num - 1 else 1.0) > 0):
                fake_logits[k] = disc.score(teacher.features, x_hats[k], sigma_d, d_noise, cond)
                adv_terms[k] = g_loss(fake_logits[k], disc.cfg.loss)
    adv = adv_terms.get(num - 1, final.new_zeros(()))
    dmd, dmd_logs = distribution_matching(student, x_hats, cond, rc, generator)

    # step-1 regulariser on every non-final output
    step1 = final.new_zeros(())
    for k, x_hat in enumerate(x_hats[:-1]):
        if rc.step1_loss == "intermediate":
            step1 = step1 + F.mse_loss(x_hat, implied_clean(batch, student, k))
        elif rc.step1_loss == "final":
            step1 = step1 + F.mse_loss(x_hat, batch["final"])
        elif rc.step1_loss == "adversarial":
            step1 = step1 + adv_scale * adv_terms[k]

    reg = F.mse_loss(final, batch["final"]) if rc.final_reg_weight > 0 else final.new_zeros(())
    total = adv_scale * rc.adv_weight * adv + rc.step1_weight * step1 + rc.final_reg_weight * reg
    if rc.uses_dmd:
        total = total + rc.dmd_weight * dmd

    logs = {"g_adv": adv.item(), "g_step1": step1.item(), "g_reg": reg.item(), "g_total": total.item(),
            "adv_ramp": float(adv_scale), "adv_weight_eff": float(adv_scale * rc.adv_weight),
            "out_mean": final.mean().item(), "out_std": final.std().item(),
            "step1_mse_to_teacher": F.mse_loss(x_hats[0].detach(), implied_clean(batch, student, 0)).item()
            if num > 1 else 0.0}
    logs.update({f"g_fake_logit{_suffix(k, num)}": v.mean().item() for k, v in fake_logits.items()})
    logs.update(dmd_logs)
    return total, logs, out


def dmd_sigmas(rc: RecipeConfig, x: Tensor, generator: torch.Generator) -> Tensor:
    """``(B,)`` renoising levels for DMD's outputs ``x``: ``shift_sigma(u, dmd_sigma_shift)`` of ``u`` uniform in
    ``[dmd_sigma_min, dmd_sigma_max]``, the same for the generator's gradient and the fake score's training."""
    return sample_dmd_sigmas(x.shape[0], rc.dmd_sigma_min, rc.dmd_sigma_max, generator,
                             shift=rc.dmd_sigma_shift).to(x.device)


def distribution_matching(student: Student, x_hats: list[Tensor], cond: Conditioning, rc: RecipeConfig,
                          generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
    """The sum of :func:`~twostep.engine.dmd.dmd_loss` over :func:`dmd_outputs` (0 and no logs without DMD): the
    teacher's and the fake score's clean estimates at :func:`dmd_sigmas`, drawn from ``generator`` (sigmas, then
    noise, per output)."""
    outputs = dmd_outputs(rc, len(x_hats))
    total = x_hats[-1].new_zeros((), dtype=torch.float32)
    if not outputs:
        return total, {}
    logs: dict[str, float] = {}

    def real_x0(x_sigma, sigma):
        with student.teacher() as teacher:
            return clean_estimate(teacher, x_sigma, sigma, cond)

    def fake_x0(x_sigma, sigma):
        with student.fake_score() as fake:
            return clean_estimate(fake, x_sigma, sigma, cond)

    for k in outputs:
        x = x_hats[k]
        sigma = dmd_sigmas(rc, x, generator)
        loss, part = dmd_loss(x, sigma, _randn_like(x, generator), real_x0, fake_x0)
        total = total + loss
        sfx = _suffix(k, len(x_hats))
        logs.update({f"{key}{sfx}": value for key, value in part.items()})
    return total, logs


def fake_score_step_loss(student: Student, batch: dict[str, Tensor], cond: Conditioning, rc: RecipeConfig,
                         generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
    """One update of the fake-score network: flow matching on sg(x_hat_k) of every output in :func:`dmd_outputs`
    (fresh student outputs of this batch, computed without a graph), each at :func:`dmd_sigmas`. Returns
    ``(loss, logs)``."""
    with torch.no_grad():
        x_hats = student_outputs(student, batch, cond, rc, generator)["x_hat"]
    total = x_hats[-1].new_zeros((), dtype=torch.float32)
    logs: dict[str, float] = {}
    with student.fake_score() as fake:
        for k in dmd_outputs(rc, len(x_hats)):
            x = x_hats[k]
            sigma = dmd_sigmas(rc, x, generator)
            loss = fake_score_loss(x, sigma, _randn_like(x, generator),
                                   lambda x_sigma, s: fake.velocity(x_sigma, s, cond))
            total = total + loss
            logs[f"fake_score_loss{_suffix(k, len(x_hats))}"] = loss.item()
    logs["fake_score_total"] = total.item()
    return total, logs


def discriminator_loss(student: Student, disc: Discriminator, batch: dict[str, Tensor], real: Tensor,
                       cond: Conditioning, generator: torch.Generator,
                       rc: RecipeConfig | None = None) -> tuple[Tensor, dict[str, float]]:
    """D loss: for every output the generator scores, real vs sg(x_hat_k) at a shared sigma_d and noise.

    ``real`` is the final output's real batch (teacher finals or dataset images, per ``real_source``). Adds R1 on
    the final output's reals (``r1: approx`` runs the teacher under no_grad twice; ``exact`` keeps a graph through
    it) and wrong-prompt fakes. ``rc`` defaults to :class:`RecipeConfig`'s defaults.
    """
    rc = rc or RecipeConfig()
    cfg = disc.cfg
    with torch.no_grad():
        x_hats = student_outputs(student, batch, cond, rc, generator)["x_hat"]
    num = len(x_hats)
    total = real.new_zeros((), dtype=torch.float32)
    d_total = real.new_zeros((), dtype=torch.float32)
    logs: dict[str, float] = {}
    with student.teacher() as teacher:

        def feats(x: Tensor, sigma: Tensor, c: Conditioning, keep_graph: bool = False) -> list[Tensor]:
            with torch.set_grad_enabled(keep_graph):
                return teacher.features(x, sigma, c, cfg.blocks)

        for k in adversarial_outputs(rc, num):
            is_final = k == num - 1
            real_k = real if is_final or rc.step1_adv_real == "final" else implied_clean(batch, student, k)
            sigma_d = sample_sigma_d(real.shape[0], disc, generator, real.device, floor=sigma_floor(student, k))
            d_noise = _randn_like(real_k, generator)
            fake_logits = disc(feats(flow.renoise(x_hats[k], d_noise, sigma_d), sigma_d, cond), sigma_d, cond)
            exact_r1 = is_final and cfg.r1_weight > 0 and cfg.r1 == "exact"
            real_in = flow.renoise(real_k, d_noise, sigma_d).detach().requires_grad_(exact_r1)
            with twice_differentiable_attention() if exact_r1 else nullcontext():
                real_logits = disc(feats(real_in, sigma_d, cond, keep_graph=exact_r1), sigma_d, cond)
                r1_exact = r1_penalty(real_logits, real_in) if exact_r1 else None
            loss = d_loss(real_logits, fake_logits, cfg.loss)
            d_total = d_total + loss
            sfx = _suffix(k, num)
            if not is_final:
                logs[f"d_loss{sfx}"] = loss.item()
            logs.update({
                f"d_accuracy{sfx}": (0.5 * ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean())).item(),
                f"d_logit_gap{sfx}": (real_logits.mean() - fake_logits.mean()).item(),
                f"d_real_logit{sfx}": real_logits.mean().item(), f"d_fake_logit{sfx}": fake_logits.mean().item()})
            if not is_final:
                continue
            # regularisers: on the final output's reals only
            if cfg.r1_weight > 0:
                if exact_r1:
                    r1 = r1_exact
                else:
                    shaken = perturb(real_in.detach(), cfg.r1_sigma, generator)
                    r1 = approx_r1_penalty(real_logits, disc(feats(shaken, sigma_d, cond), sigma_d, cond))
                total = total + cfg.r1_weight * r1
                logs["d_r1"] = r1.item()
            if cfg.wrong_prompt_weight > 0:
                rows, partners = wrong_prompt_pairs(batch["prompt_index"], generator)
                if rows.numel() > 0:
                    rows, partners = rows.to(real.device), partners.to(real.device)
                    wrong = cond[partners]
                    w_logits = disc(feats(real_in.detach()[rows], sigma_d[rows], wrong), sigma_d[rows], wrong)
                    w_loss = d_fake_loss(w_logits, cfg.loss)
                    d_total = d_total + cfg.wrong_prompt_weight * w_loss
                    logs.update({"d_wrong_prompt": w_loss.item(), "d_wrong_prompt_logit": w_logits.mean().item()})
    total = total + d_total
    # d_loss: every adversarial term (all outputs and wrong-prompt fakes) without R1; d_fake_batches: outputs seen
    logs.update({"d_loss": d_total.item(), "d_r1": logs.get("d_r1", 0.0),
                 "d_fake_batches": float(len(adversarial_outputs(rc, num)))})
    return total, logs
