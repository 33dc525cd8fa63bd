"""DMD's gradient (engine/dmd.py) on a problem whose answer is known: a 2-D Gaussian-mixture teacher.

Every denoiser here is exact: for a mixture of isotropic Gaussians, ``E[x0 | x_sigma]`` under
``x_sigma = (1 - sigma) x0 + sigma eps`` is closed-form, so the teacher's and the fake score's clean estimates carry
no learning error and the test sees only the sign and the scale of the gradient.
"""

import math

import torch

from twostep.engine import flow
from twostep.engine.dmd import dmd_gradient, dmd_loss, fake_score_loss, sample_dmd_sigmas

MODES = torch.tensor([[-2.0, 0.0], [2.0, 0.0]])
MODE_STD = 0.3


def to_points(images: torch.Tensor) -> torch.Tensor:
    """``(B, 2, H, W)`` -> ``(B·H·W, 2)``: each "image" holds H·W independent 2-D points, so DMD's per-image
    normaliser averages over many of them, as it averages over pixels."""
    return images.permute(0, 2, 3, 1).reshape(-1, 2)


def from_points(points: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    b, _, h, w = like.shape
    return points.reshape(b, h, w, 2).permute(0, 3, 1, 2)


def mixture_x0(means: torch.Tensor, std: float):
    """The exact clean estimate of an equal-weight mixture of ``N(mean_k, std^2 I)`` in 2-D, for images of points."""
    def x0(x_sigma: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        per_image = x_sigma.shape[-2] * x_sigma.shape[-1]
        x, s = to_points(x_sigma), sigma.repeat_interleave(per_image).reshape(-1, 1, 1)  # (N, 2), (N, 1, 1)
        alpha = 1 - s
        var = alpha ** 2 * std ** 2 + s ** 2  # of x_sigma given component k
        diff = x[:, None, :] - alpha * means[None]  # (N, K, 2)
        logits = -(diff ** 2).sum(-1) / (2 * var[..., 0])  # equal weights, equal variances: the norms cancel
        post = torch.softmax(logits, dim=1)[..., None]  # (N, K, 1)
        per_mode = means[None] + alpha * std ** 2 / var * diff
        return from_points((post * per_mode).sum(1), x_sigma)
    return x0


def nearest_mode_distance(images: torch.Tensor) -> float:
    return float(torch.cdist(to_points(images), MODES).min(dim=1).values.mean())


def student_samples(generator: torch.Generator, images: int = 4) -> torch.Tensor:
    """``images`` images of 16 x 16 points from N((0.5, 2.5), 0.3^2 I): off both teacher modes."""
    points = torch.tensor([0.5, 2.5]) + 0.3 * torch.randn(images * 256, 2, generator=generator)
    return from_points(points, torch.empty(images, 2, 16, 16))


def run_dmd(steps: int = 60, lr: float = 0.1, swap: bool = False, seed: int = 0) -> tuple[float, float]:
    """The student's samples follow the DMD gradient; the fake score is the exact denoiser of the current samples'
    kernel density (what a converged fake-score network gives). ``swap`` exchanges the two estimates: the
    gradient with its sign flipped."""
    g = torch.Generator().manual_seed(seed)
    images = student_samples(g)
    start = nearest_mode_distance(images)
    teacher = mixture_x0(MODES, MODE_STD)
    for _ in range(steps):
        fake = mixture_x0(to_points(images), MODE_STD)
        x = images.clone().requires_grad_(True)
        sigma = sample_dmd_sigmas(len(x), 0.02, 0.98, generator=g)
        noise = torch.randn(x.shape, generator=g)
        real_fn, fake_fn = (fake, teacher) if swap else (teacher, fake)
        loss, logs = dmd_loss(x, sigma, noise, real_fn, fake_fn)
        loss.backward()
        assert math.isfinite(logs["dmd_loss"]) and logs["dmd_grad_norm"] > 0
        images = images - lr * x.grad * x.numel()  # descend the normalised DMD gradient itself
    return start, nearest_mode_distance(images)


def test_the_dmd_gradient_moves_a_student_off_the_modes_onto_them():
    start, end = run_dmd()
    assert start > 2.0 and end < 0.5, (start, end)  # 0.38 = the mean distance of the teacher's own samples


def test_the_flipped_gradient_moves_it_away_so_the_test_above_can_fail():
    start, end = run_dmd(swap=True)
    assert end > start + 0.5, (start, end)


def test_gradient_scale_is_the_estimates_gap_over_the_teachers_error_per_sample():
    g = torch.Generator().manual_seed(1)
    x, real, fake = (torch.randn(4, 3, 5, 5, generator=g) for _ in range(3))
    grad = dmd_gradient(x, real, fake)
    expected = (fake - real) / (x - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(grad, expected)
    farther = x - 2 * (x - real)  # the teacher twice as far off, the same gap between the estimates: half the step
    torch.testing.assert_close(dmd_gradient(x, farther, farther + (fake - real)), grad / 2)


def test_the_losss_gradient_is_the_dmd_gradient_over_numel_and_trains_neither_network():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 4, 4, generator=g).requires_grad_(True)
    sigma, noise = torch.full((3,), 0.3), torch.randn(3, 2, 4, 4, generator=g)  # not 0.5: σ and 1 - σ differ
    weight = torch.nn.Parameter(torch.tensor(0.7))
    teacher = lambda xs, s: weight * xs  # noqa: E731  (a network with a parameter: must get no gradient)
    fake = lambda xs, s: 0.2 * xs  # noqa: E731
    loss, _ = dmd_loss(x, sigma, noise, teacher, fake)
    loss.backward()
    x_sigma = 0.7 * x.detach() + 0.3 * noise  # DESIGN §2, written out: x_σ = (1 - σ) x + σ ε
    expected = dmd_gradient(x, teacher(x_sigma, sigma), fake(x_sigma, sigma)) / x.numel()
    torch.testing.assert_close(x.grad, expected)
    assert weight.grad is None


def test_the_fake_score_loss_is_lowest_for_the_denoiser_of_the_students_own_samples():
    """Flow matching on the student's samples: the student's own (exact) denoiser beats the teacher's there."""
    g = torch.Generator().manual_seed(3)
    points = student_samples(g, images=8)
    sigma = sample_dmd_sigmas(len(points), 0.02, 0.98, generator=g)
    noise = torch.randn(points.shape, generator=g)
    as_velocity = lambda x0_fn: (lambda xs, s: flow.velocity_from_x0(xs, x0_fn(xs, s), s))  # noqa: E731
    own = fake_score_loss(points, sigma, noise, as_velocity(mixture_x0(torch.tensor([[0.5, 2.5]]), 0.3)))  # p_fake
    teachers = fake_score_loss(points, sigma, noise, as_velocity(mixture_x0(MODES, MODE_STD)))
    assert own < 0.8 * teachers, (float(own), float(teachers))
