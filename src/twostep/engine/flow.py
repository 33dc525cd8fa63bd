"""Flow-matching conventions (DESIGN §2), as pure functions.

Every other module goes through these; nothing else decides a sign or a direction.

- Noise level ``sigma`` in [0, 1]; ``sigma = 1`` is pure noise.
- Forward process:   ``x_sigma = (1 - sigma) * x + sigma * eps``
- Velocity:          ``v = eps - x``          (what diffusers' scheduler calls ``noise_pred``)
- Clean estimate:    ``x_hat = x_sigma - sigma * v``
- Euler step:        ``x_next = x_sigma + (sigma_next - sigma) * v``

Shapes: images/latents are ``(B, C, H, W)``; a per-sample ``sigma`` is ``(B,)`` and is broadcast here.
"""

from __future__ import annotations

from typing import Callable

import torch

Tensor = torch.Tensor
# velocity_fn(x: (B,C,H,W), sigma: (B,), step_index: int) -> v: (B,C,H,W)
VelocityFn = Callable[[Tensor, Tensor, int], Tensor]


def _expand(sigma: Tensor | float, like: Tensor) -> Tensor:
    """Broadcast a scalar or ``(B,)`` sigma against ``like`` of shape ``(B, ...)``."""
    if not torch.is_tensor(sigma):
        return torch.tensor(float(sigma), dtype=like.dtype, device=like.device)
    sigma = sigma.to(device=like.device, dtype=like.dtype)
    if sigma.ndim == 0:
        return sigma
    return sigma.reshape(-1, *([1] * (like.ndim - 1)))


# --------------------------------------------------------------------------- schedules


def shift_sigma(s: Tensor | float, shift: float) -> Tensor | float:
    """Time shift of SD3/Flux/Z-Image: ``shift * s / (1 + (shift - 1) * s)`` (identity at shift=1)."""
    return shift * s / (1 + (shift - 1) * s)


def turbo_sigmas(num_steps: int, shift: float = 3.0) -> Tensor:
    """The shifted flow-matching sampling schedule: ``num_steps + 1`` sigmas from 1 down to a final 0.

    Same as ``ZImagePipeline`` with ``FlowMatchEulerDiscreteScheduler(shift, use_dynamic_shifting=False)``:
    ``s = linspace(1, 1/N, N)``, ``sigma_i = shift_sigma(s_i)``, then 0 appended. Pipelines that shift by the
    image size (FLUX.2's ``compute_empirical_mu``) run the same rule with ``shift = exp(mu)``: the family computes
    the shift, this function the schedule.
    N=8 gives ``[1, .9545, .9, .8333, .75, .6429, .5, .3, 0]``; N=2 gives ``[1, .75, 0]``.

    Returns: ``(N + 1,)`` float32.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    s = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float32).double()
    sigmas = shift_sigma(s, shift)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


# --------------------------------------------------------------------------- conversions


def add_noise(x: Tensor, noise: Tensor, sigma: Tensor | float) -> Tensor:
    """``x_sigma = (1 - sigma) * x + sigma * noise``. Used for training inputs and for renoising."""
    s = _expand(sigma, x)
    return (1 - s) * x + s * noise


renoise = add_noise  # same map; the name reads better where a clean estimate is pushed back up to sigma


def velocity_target(x: Tensor, noise: Tensor) -> Tensor:
    """Flow-matching regression target ``v = noise - x`` (independent of sigma)."""
    return noise - x


def x0_from_velocity(x_sigma: Tensor, v: Tensor, sigma: Tensor | float) -> Tensor:
    """Clean estimate ``x_hat = x_sigma - sigma * v``."""
    return x_sigma - _expand(sigma, x_sigma) * v


def noise_from_velocity(x_sigma: Tensor, v: Tensor, sigma: Tensor | float) -> Tensor:
    """Noise estimate ``eps_hat = x_sigma + (1 - sigma) * v``."""
    return x_sigma + (1 - _expand(sigma, x_sigma)) * v


def velocity_from_x0(x_sigma: Tensor, x0: Tensor, sigma: Tensor | float) -> Tensor:
    """Inverse of :func:`x0_from_velocity` (undefined at sigma = 0)."""
    return (x_sigma - x0) / _expand(sigma, x_sigma)


def euler_step(x_sigma: Tensor, v: Tensor, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
    """One Euler step of the probability-flow ODE: ``x_sigma + (sigma_next - sigma) * v``."""
    return x_sigma + (_expand(sigma_next, x_sigma) - _expand(sigma, x_sigma)) * v


def x0_from_state(x_sigma: Tensor, noise: Tensor, sigma: Tensor | float) -> Tensor:
    """The clean image implied by a state on the straight path of ``noise``: ``(x_sigma - sigma*noise)/(1-sigma)``.

    DESIGN §3 writes the step-1 loss against this target: same minimiser as a loss on ``x_sigma``,
    but not shrunk by ``(1 - sigma)^2``.
    """
    s = _expand(sigma, x_sigma)
    return (x_sigma - s * noise) / (1 - s)


# --------------------------------------------------------------------------- sampling


def sample_logit_normal(n: int, mean: float = 0.0, std: float = 1.0, shift: float = 1.0,
                        generator: torch.Generator | None = None, device=None) -> Tensor:
    """Training noise levels: ``sigmoid(N(mean, std))``, then :func:`shift_sigma`. Returns ``(n,)``."""
    u = torch.randn(n, generator=generator, device=device) * std + mean
    return shift_sigma(torch.sigmoid(u), shift)


@torch.no_grad()
def euler_sample(velocity_fn: VelocityFn, noise: Tensor, sigmas: Tensor,
                 return_states: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Euler-integrate from ``noise`` (at ``sigmas[0]``) down the given schedule.

    Works over any backbone: ``velocity_fn(x, sigma_batch, i)`` returns ``v = eps - x``. The last Euler step
    to sigma = 0 equals the clean estimate, so this matches ``ZImagePipeline`` exactly.

    Args:
        noise: ``(B, C, H, W)`` starting state.
        sigmas: ``(N + 1,)`` decreasing, e.g. :func:`turbo_sigmas`.
        return_states: also return the states at every ``sigmas[i]`` (``N + 1`` tensors, first = noise).
    """
    x = noise
    states = [x]
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i].expand(x.shape[0]).to(x.device)
        v = velocity_fn(x, sigma, i)
        x = euler_step(x, v.to(x.dtype), sigmas[i], sigmas[i + 1])
        states.append(x)
    return (x, states) if return_states else x
