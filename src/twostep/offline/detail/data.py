"""The detail world's images: sharp, high-frequency 16x16 RGB content in ten prompted classes, made on the fly.

Built so that a 2-step sampler's failure mode is *blur*: every class has a random phase or sub-pixel position
(stripes, checkerboards, rings, dot lattices), or sharp anti-aliased edges (lines, squares, discs, cell walls), so
the posterior mean a one-step jump regresses to is a smeared average. Images are ``(N, 3, 16, 16)`` float32 in
[-1, 1]. Everything is drawn from a caller's ``torch.Generator``: the same seed gives the same images.

Rendering is 4x supersampled then box-filtered, so edges are anti-aliased at sub-pixel positions (sharp but
not aliased). Each pattern class has its own two colours, which keeps the teacher's job small enough to learn on
two CPU cores: what varies within a class is phase, angle, frequency and position, exactly what a 2-step sampler
averages into blur.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

Tensor = torch.Tensor

SIZE = 16
SUPERSAMPLE = 4
CLASS_NAMES = ["stripes", "checkerboard", "thin lines", "rings", "dots", "square", "disc", "cells", "noise texture",
               "photo crop"]
NUM_CLASSES = len(CLASS_NAMES)
SHAPE_CLASSES = (5, 6)  # where edge width is measured: one clean edge between two colours
PROMPT_TEMPLATE = "a picture of {}"
# saturated, well-separated colours in [-1, 1]
PALETTE = torch.tensor([[-0.9, -0.9, -0.9], [0.9, 0.9, 0.9], [0.9, -0.8, -0.8], [-0.8, 0.8, -0.7],
                        [-0.8, -0.6, 0.9], [0.9, 0.8, -0.8], [-0.7, 0.8, 0.9], [0.9, -0.6, 0.8]])


def class_prompts() -> list[str]:
    return [PROMPT_TEMPLATE.format(name) for name in CLASS_NAMES]


def _uniform(n: int, low: float, high: float, g: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=g)


def _grid(n: int) -> tuple[Tensor, Tensor]:
    """Supersampled pixel coordinates in pixel units, ``(1, S, S)`` each (x to the right, y down)."""
    s = SIZE * SUPERSAMPLE
    coords = (torch.arange(s, dtype=torch.float32) + 0.5) / SUPERSAMPLE
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    return x[None], y[None]


# (foreground, background) palette indices per pattern class: one colour pair per class keeps the teacher's job
# to the *patterns* (what blurs), which a small model learns in minutes; randomness stays in phase and position.
CLASS_COLOURS = [(5, 0), (2, 6), (1, 4), (7, 1), (0, 5), (3, 0), (1, 2), (6, 0), (4, 1)]


def _paint(mask: Tensor, g: torch.Generator) -> Tensor:
    """Supersampled mask ``(n, S, S)`` -> anti-aliased coverage ``(n, 1, 16, 16)`` in [0, 1] (painted later)."""
    return F.avg_pool2d(mask[:, None].float(), SUPERSAMPLE)


def _angles(n: int, g: torch.Generator, choices: int = 4) -> Tensor:
    return torch.randint(0, choices, (n,), generator=g).float() * (math.pi / choices)


def stripes(n: int, g: torch.Generator) -> Tensor:
    x, y = _grid(n)
    freq = _uniform(n, 0.25, 0.33, g)[:, None, None]
    theta = _angles(n, g)[:, None, None]
    phase = _uniform(n, 0, 1, g)[:, None, None]
    u = x * torch.cos(theta) + y * torch.sin(theta)
    return _paint(torch.remainder(freq * u + phase, 1.0) < 0.5, g)


def checkerboard(n: int, g: torch.Generator) -> Tensor:
    x, y = _grid(n)
    freq = _uniform(n, 0.15, 0.2, g)[:, None, None]  # cells of 2.5-3.3 px
    theta = _angles(n, g, choices=2)[:, None, None]
    px, py = _uniform(n, 0, 1, g)[:, None, None], _uniform(n, 0, 1, g)[:, None, None]
    u = x * torch.cos(theta) + y * torch.sin(theta)
    v = -x * torch.sin(theta) + y * torch.cos(theta)
    a = torch.remainder(freq * u + px, 1.0) < 0.5
    b = torch.remainder(freq * v + py, 1.0) < 0.5
    return _paint(a ^ b, g)


def thin_lines(n: int, g: torch.Generator) -> Tensor:
    """Three 1-px lines, each horizontal or vertical, at sub-pixel offsets."""
    x, y = _grid(n)
    mask = torch.zeros(n, *x.shape[1:], dtype=torch.bool)
    for _ in range(3):
        vertical = (torch.rand(n, generator=g) < 0.5)[:, None, None]
        offset = _uniform(n, 2.0, SIZE - 3.0, g)[:, None, None]
        coord = torch.where(vertical, x, y)
        mask |= (coord >= offset) & (coord < offset + 1.0)
    return _paint(mask, g)


def rings(n: int, g: torch.Generator) -> Tensor:
    x, y = _grid(n)
    cx, cy = _uniform(n, 5, 11, g)[:, None, None], _uniform(n, 5, 11, g)[:, None, None]
    freq = _uniform(n, 0.25, 0.33, g)[:, None, None]
    r = torch.sqrt((x - cx) ** 2 + (y - cy) ** 2)
    return _paint(torch.remainder(freq * r, 1.0) < 0.5, g)


def dots(n: int, g: torch.Generator) -> Tensor:
    x, y = _grid(n)
    period = _uniform(n, 3.5, 4.5, g)[:, None, None]
    ox, oy = _uniform(n, 0, 4, g)[:, None, None], _uniform(n, 0, 4, g)[:, None, None]
    dx = torch.remainder(x - ox, period) - period / 2
    dy = torch.remainder(y - oy, period) - period / 2
    return _paint(dx ** 2 + dy ** 2 < 1.1 ** 2, g)


def square(n: int, g: torch.Generator) -> Tensor:
    x, y = _grid(n)
    side = _uniform(n, 5, 9, g)[:, None, None]
    cx, cy = _uniform(n, 6, 10, g)[:, None, None], _uniform(n, 6, 10, g)[:, None, None]
    return _paint(((x - cx).abs() < side / 2) & ((y - cy).abs() < side / 2), g)


def disc(n: int, g: torch.Generator) -> Tensor:
    x, y = _grid(n)
    radius = _uniform(n, 3, 6, g)[:, None, None]
    cx, cy = _uniform(n, 6, 10, g)[:, None, None], _uniform(n, 6, 10, g)[:, None, None]
    return _paint((x - cx) ** 2 + (y - cy) ** 2 < radius ** 2, g)


def cells(n: int, g: torch.Generator, seeds: int = 7) -> Tensor:
    """Voronoi cell walls: where the nearest and second-nearest seed are (almost) equally far."""
    x, y = _grid(n)
    sx = _uniform(n * seeds, 0, SIZE, g).view(n, seeds, 1, 1)
    sy = _uniform(n * seeds, 0, SIZE, g).view(n, seeds, 1, 1)
    d = torch.sqrt((x[:, None] - sx) ** 2 + (y[:, None] - sy) ** 2)
    two = d.topk(2, dim=1, largest=False).values
    return _paint(two[:, 1] - two[:, 0] < 0.9, g)


def noise_texture(n: int, g: torch.Generator) -> Tensor:
    """1/f noise, thresholded at its median into two colours (sharp-edged blobs at every scale)."""
    white = torch.randn(n, SIZE * SUPERSAMPLE, SIZE * SUPERSAMPLE, generator=g)
    fy = torch.fft.fftfreq(SIZE * SUPERSAMPLE)[:, None]
    fx = torch.fft.fftfreq(SIZE * SUPERSAMPLE)[None, :]
    f = torch.sqrt(fx ** 2 + fy ** 2)
    amplitude = torch.where(f > 0, 1.0 / f.clamp_min(1e-6), torch.zeros(()))
    amplitude = amplitude * (f < 0.5 / SUPERSAMPLE)  # nothing above the 16-px Nyquist
    field = torch.fft.ifft2(torch.fft.fft2(white) * amplitude).real
    median = field.flatten(1).median(dim=1).values[:, None, None]
    return _paint(field > median, g)


_PHOTOS: Tensor | None = None


def _photos() -> Tensor:
    """scikit-learn's two bundled photos, downscaled 6x: ``(2, 3, H, W)`` in [-1, 1]."""
    global _PHOTOS
    if _PHOTOS is None:
        from sklearn.datasets import load_sample_images

        images = [torch.from_numpy(im.copy()).permute(2, 0, 1).float() / 127.5 - 1 for im in load_sample_images().images]
        h = min(im.shape[1] for im in images)
        w = min(im.shape[2] for im in images)
        stacked = torch.stack([im[:, :h, :w] for im in images])
        _PHOTOS = F.avg_pool2d(stacked, 6)
    return _PHOTOS


def photo_crop(n: int, g: torch.Generator) -> Tensor:
    photos = _photos()
    _, _, h, w = photos.shape
    which = torch.randint(0, len(photos), (n,), generator=g)
    top = torch.randint(0, h - SIZE + 1, (n,), generator=g)
    left = torch.randint(0, w - SIZE + 1, (n,), generator=g)
    return torch.stack([photos[i, :, t:t + SIZE, l:l + SIZE] for i, t, l in zip(which.tolist(), top.tolist(),
                                                                                left.tolist())])


GENERATORS = [stripes, checkerboard, thin_lines, rings, dots, square, disc, cells, noise_texture, photo_crop]


def generate(labels: Tensor, generator: torch.Generator) -> Tensor:
    """Images ``(N, 3, 16, 16)`` in [-1, 1], image i of class ``labels[i]``."""
    out = torch.empty(len(labels), 3, SIZE, SIZE)
    for c in labels.unique().tolist():
        index = (labels == c).nonzero().flatten()
        drawn = GENERATORS[c](len(index), generator)
        if drawn.shape[1] == 1:  # a coverage map: paint it in the class's two colours
            fg, bg = PALETTE[CLASS_COLOURS[c][0]], PALETTE[CLASS_COLOURS[c][1]]
            drawn = bg[None, :, None, None] + drawn * (fg - bg)[None, :, None, None]
        out[index] = drawn.clamp(-1, 1)
    return out


def gaussian_blur(images: Tensor, sigma_px: float) -> Tensor:
    """Separable Gaussian blur of ``(N, C, H, W)`` images, reflect padding: the calibration's reference blur."""
    if sigma_px <= 0:
        return images
    radius = max(1, math.ceil(3 * sigma_px))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-t ** 2 / (2 * sigma_px ** 2))
    kernel = (kernel / kernel.sum()).to(images.dtype)
    c = images.shape[1]
    x = F.pad(images, (radius, radius, 0, 0), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.pad(x, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
