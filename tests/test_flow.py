"""Pins DESIGN §2 conventions against diffusers before anything is built on them."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from twostep.engine import flow


def diffusers_sigmas(n: int, shift: float = 3.0) -> torch.Tensor:
    """What ZImagePipeline does: sigmas=linspace(1, 1/N, N), static shift, terminal 0 appended."""
    sched = FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=False)
    sched.set_timesteps(sigmas=torch.linspace(1.0, 1 / n, n).tolist(), mu=0.5)
    return sched.sigmas


@pytest.mark.parametrize("n", list(range(1, 17)) + [32, 50])
def test_turbo_sigmas_match_diffusers(n):
    ours = flow.turbo_sigmas(n, 3.0)
    assert ours.shape == (n + 1,)
    torch.testing.assert_close(ours, diffusers_sigmas(n), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shift", [1.0, 2.0, 3.0, 6.0])
def test_turbo_sigmas_other_shifts_match_diffusers(shift):
    torch.testing.assert_close(flow.turbo_sigmas(8, shift), diffusers_sigmas(8, shift), atol=1e-6, rtol=0)


def test_turbo_schedule_values_from_design():
    eight = [1, 0.9545, 0.9, 0.8333, 0.75, 0.6429, 0.5, 0.3, 0]
    assert flow.turbo_sigmas(8).tolist() == pytest.approx(eight, abs=1e-4)
    assert flow.turbo_sigmas(2).tolist() == pytest.approx([1, 0.75, 0], abs=1e-6)
    # the student's sigma_2 = 0.75 is exactly the teacher's state after 4 of 8 steps
    assert flow.turbo_sigmas(8)[4].item() == pytest.approx(flow.turbo_sigmas(2)[1].item(), abs=1e-7)


def test_sigma_direction_one_is_noise():
    x, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    torch.testing.assert_close(flow.add_noise(x, eps, 1.0), eps)
    torch.testing.assert_close(flow.add_noise(x, eps, 0.0), x)
    mixed = flow.add_noise(x, eps, torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(mixed[1], 0.5 * x[1] + 0.5 * eps[1])


def test_velocity_sign_and_clean_estimate():
    x, eps = torch.randn(4, 2, 4, 4), torch.randn(4, 2, 4, 4)
    sigma = torch.rand(4) * 0.9 + 0.05
    v = flow.velocity_target(x, eps)
    torch.testing.assert_close(v, eps - x)
    xs = flow.add_noise(x, eps, sigma)
    torch.testing.assert_close(flow.x0_from_velocity(xs, v, sigma), x, atol=1e-6, rtol=0)
    torch.testing.assert_close(flow.noise_from_velocity(xs, v, sigma), eps, atol=1e-6, rtol=0)
    torch.testing.assert_close(flow.velocity_from_x0(xs, x, sigma), v, atol=1e-5, rtol=0)
    torch.testing.assert_close(flow.x0_from_state(xs, eps, sigma), x, atol=1e-5, rtol=0)
    # an Euler step to sigma=0 lands on the clean estimate
    torch.testing.assert_close(flow.euler_step(xs, v, sigma, 0.0), x, atol=1e-6, rtol=0)


def test_euler_step_matches_diffusers_scheduler_step():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
    sched.set_timesteps(sigmas=torch.linspace(1.0, 1 / 8, 8).tolist(), mu=0.5)
    x = torch.randn(2, 4, 8, 8)
    ours = x.clone()
    sigmas = flow.turbo_sigmas(8)
    for i, t in enumerate(sched.timesteps):
        v = torch.randn_like(x)
        x = sched.step(v, t, x, return_dict=False)[0]
        ours = flow.euler_step(ours, v, sigmas[i], sigmas[i + 1])
        torch.testing.assert_close(ours, x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("n", [1, 2, 8])
def test_euler_sampler_follows_straight_path_exactly(n):
    """With the true velocity of a single target, every schedule lands on it: no off-by-one anywhere."""
    target, eps = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    calls = []

    def velocity(x, sigma, i):
        calls.append(i)
        assert sigma.shape == (2,)
        torch.testing.assert_close(x, flow.add_noise(target, eps, sigma), atol=1e-5, rtol=0)
        return eps - target

    out, states = flow.euler_sample(velocity, eps, flow.turbo_sigmas(n), return_states=True)
    assert calls == list(range(n))
    assert len(states) == n + 1
    torch.testing.assert_close(out, target, atol=1e-5, rtol=0)


def test_logit_normal_sigmas_in_range_and_shifted_up():
    g = torch.Generator().manual_seed(0)
    plain = flow.sample_logit_normal(4000, generator=g)
    shifted = flow.sample_logit_normal(4000, shift=3.0, generator=torch.Generator().manual_seed(0))
    assert plain.min() > 0 and plain.max() < 1
    assert shifted.mean() > plain.mean() + 0.1
