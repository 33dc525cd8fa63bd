"""Distribution matching (DMD, Yin et al. 2024; DMD2, 2024) in the conventions of ``flow.py``: losses only, no I/O.

The generator's outputs ``x`` (clean images, ``(B, C, H, W)``) are pushed down the gradient of
``KL(p_fake || p_real)``, where ``p_real`` is the teacher's distribution and ``p_fake`` the student's own, each seen
through its denoiser at a noise level ``sigma``::

    x_sigma = (1 - sigma) * x + sigma * eps                         renoise the student's output
    x0_real = x_sigma - sigma * v_teacher(x_sigma, sigma)           the teacher's clean estimate
    x0_fake = x_sigma - sigma * v_fake(x_sigma, sigma)              the fake-score network's clean estimate
    grad    = (x0_fake - x0_real) / mean|x - x0_real|               per sample, over (C, H, W)  (DMD eq. 8)
    L_dmd   = 0.5 * mean((x - sg(x - grad))^2)                      d L / d x = grad / numel(x)

Why the sign: a score is ``s(x_sigma) = ((1 - sigma) * x0(x_sigma) - x_sigma) / sigma^2``, so
``s_real - s_fake = (1 - sigma) * (x0_real - x0_fake) / sigma^2`` and descending ``grad`` moves ``x`` toward where the
teacher's denoiser points and away from where the student already is. The normaliser makes the step size
independent of how far off the student is (DMD's ``w_t``); it is held constant (no gradient through it).

The fake-score network learns ``p_fake`` by ordinary flow matching on the generator's detached outputs
(:func:`fake_score_loss`); DMD2 updates it several times per generator step (two time-scale updates).
``tests/test_dmd.py`` pins the sign and the scale on a 2-D Gaussian mixture whose denoisers are exact.
"""

from __future__ import annotations

from typing import Callable

import torch

from twostep.engine import flow

Tensor = torch.Tensor
# x0_fn(x_sigma: (B, C, H, W), sigma: (B,)) -> clean estimate (B, C, H, W)
CleanFn = Callable[[Tensor, Tensor], Tensor]


def dmd_gradient(x: Tensor, x0_real: Tensor, x0_fake: Tensor, eps: float = 1e-6) -> Tensor:
    """DMD's normalised gradient on the generator's outputs ``x`` ``(B, ...)``: ``(x0_fake - x0_real)`` divided,
    per sample, by the mean absolute error of the teacher's estimate, ``mean|x - x0_real|``. No graph."""
    x, x0_real, x0_fake = x.detach().float(), x0_real.detach().float(), x0_fake.detach().float()
    dims = tuple(range(1, x.ndim))
    weight = (x - x0_real).abs().mean(dim=dims, keepdim=True).clamp_min(eps)
    return torch.nan_to_num((x0_fake - x0_real) / weight)


def dmd_loss(x: Tensor, sigma: Tensor, noise: Tensor, real_x0: CleanFn, fake_x0: CleanFn) -> tuple[Tensor, dict]:
    """The generator's DMD loss at ``sigma`` ``(B,)`` with renoising ``noise`` (``x``'s shape): its gradient with
    respect to ``x`` is :func:`dmd_gradient` over ``x.numel()``. ``real_x0`` / ``fake_x0`` are the teacher's and the
    fake-score network's clean estimates (run without a graph: neither network is trained by this loss).
    Returns ``(loss, logs)``."""
    with torch.no_grad():
        x_sigma = flow.add_noise(x.detach(), noise, sigma)
        x0_real, x0_fake = real_x0(x_sigma, sigma), fake_x0(x_sigma, sigma)
        grad = dmd_gradient(x, x0_real, x0_fake)
        target = x.detach().float() - grad
    loss = 0.5 * torch.mean((x.float() - target) ** 2)
    logs = {"dmd_loss": float(loss.detach()), "dmd_grad_norm": float(grad.flatten(1).norm(dim=1).mean()),
            "dmd_real_fake_gap": float((x0_fake.float() - x0_real.float()).abs().mean())}
    return loss, logs


def fake_score_loss(x: Tensor, sigma: Tensor, noise: Tensor, fake_velocity: Callable[[Tensor, Tensor], Tensor]
                    ) -> Tensor:
    """Flow matching of the fake-score network on the generator's outputs ``x`` (detached): the mean squared error
    of ``fake_velocity(x_sigma, sigma)`` against ``v = eps - x`` (DESIGN §2)."""
    x = x.detach()
    x_sigma = flow.add_noise(x, noise, sigma)
    return torch.mean((fake_velocity(x_sigma, sigma).float() - flow.velocity_target(x, noise).float()) ** 2)


def sample_dmd_sigmas(n: int, low: float, high: float, generator: torch.Generator | None = None,
                      shift: float = 1.0) -> Tensor:
    """``(n,)`` noise levels ``shift_sigma(u, shift)`` of ``u`` uniform in ``[low, high]`` (DMD draws t uniformly over
    the teacher's range; DMD2 trims the ends: ``low`` > 0 keeps the teacher's estimate informative, ``high`` < 1
    keeps some of ``x`` in ``x_sigma``; a ``shift`` > 1 moves the levels toward noise, as flow-matching ports of DMD
    shift their timesteps like the sampling schedule)."""
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"need 0 <= low < high <= 1, got {low}, {high}")
    return flow.shift_sigma(low + (high - low) * torch.rand(n, generator=generator), shift)
