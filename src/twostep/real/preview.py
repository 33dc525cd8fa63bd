"""Preview grids during training: the teacher's and the student's images side by side on fixed noise."""

from __future__ import annotations

import os
import re

import torch

from twostep.core.utils import is_main_process
from twostep.engine import flow
from twostep.engine.student import Student
from twostep.families.registry import detect_family
from twostep.real.teacher_data import ZImageDataConfig
from twostep.real.text_cache import PromptEmbeds

PREVIEW_MAX_FONT = 48  # px; the font is 1/32 of the image height, at least 10 px


def _step_label(path: str) -> str:
    """``step 250`` for ``.../step_000250.png`` (the trainer's naming); the file name otherwise."""
    match = re.search(r"step_(\d+)", os.path.basename(path))
    return f"step {int(match.group(1))}" if match else os.path.splitext(os.path.basename(path))[0]


def wrap_text(text: str, font, width: int, max_lines: int) -> list[str]:
    """``text`` in lines no wider than ``width`` px (words kept whole when they fit), at most ``max_lines``; a cut
    text ends in ``...``."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        trial = f"{line} {word}" if line else word
        if font.getlength(trial) <= width:
            line = trial
            continue
        if line:
            lines.append(line)
        line = word
        while font.getlength(line) > width and len(line) > 1:  # a word wider than the column: cut it
            cut = len(line) - 1
            while cut > 1 and font.getlength(line[:cut]) > width:
                cut -= 1
            lines.append(line[:cut])
            line = line[cut:]
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max(1, max_lines)]
        last = lines[-1]
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        lines[-1] = last + "..."
    return lines


def compose_preview(title: str, prompts: list[str], teacher: list, student: list,
                    teacher_label: str = "teacher", student_label: str = "student"):
    """A labelled grid: a header (``title`` and the column names), then one row per prompt: its text (wrapped,
    cut to the row's height), the teacher's image, the student's. Returns ``(image, layout)``; ``layout`` gives
    every cell's box ``(left, top, right, bottom)`` (``rows[i]["teacher"|"student"|"prompt"]``)."""
    from PIL import Image, ImageDraw, ImageFont

    w, h = teacher[0].size
    size = max(10, min(PREVIEW_MAX_FONT, h // 32))
    font = ImageFont.load_default(size=size)
    pad = max(2, size // 3)
    line_h = size + pad // 2
    text_w = max(w // 2, 16 * size)
    header = 2 * line_h + 2 * pad
    grid = Image.new("RGB", (text_w + 2 * w, header + len(prompts) * h), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((pad, pad), title, fill="black", font=font)
    for x, label in ((pad, "prompt"), (text_w + pad, teacher_label), (text_w + w + pad, student_label)):
        draw.text((x, pad + line_h), label, fill="black", font=font)
    rows = []
    for i, (prompt, t_image, s_image) in enumerate(zip(prompts, teacher, student)):
        top = header + i * h
        draw.line([(0, top), (text_w - 1, top)], fill=(200, 200, 200))  # row separator in the text column
        lines = wrap_text(prompt, font, text_w - 2 * pad, max(1, (h - pad) // line_h))
        for j, line in enumerate(lines):
            draw.text((pad, top + pad // 2 + j * line_h), line, fill="black", font=font)
        grid.paste(t_image, (text_w, top))
        grid.paste(s_image, (text_w + w, top))
        rows.append({"prompt": (0, top, text_w, top + h), "teacher": (text_w, top, text_w + w, top + h),
                     "student": (text_w + w, top, text_w + 2 * w, top + h), "lines": lines})
    return grid, {"header": (0, 0, grid.width, header), "rows": rows}


@torch.no_grad()
def teacher_latents(student: Student, noise: torch.Tensor, cond, steps: int, shift: float, device) -> torch.Tensor:
    """The frozen base's ``steps``-step Turbo-schedule latents (every adapter off) from ``noise`` ``(N, C, h, w)``
    and conditioning ``cond``, one sample at a time (the smallest activations), on CPU."""
    sigmas = flow.turbo_sigmas(steps, shift)
    finals = []
    with student.teacher() as teacher:
        for i in range(noise.shape[0]):
            x, c = noise[i:i + 1].to(device), cond[i:i + 1].to(device)
            final = flow.euler_sample(lambda x_, s, _: teacher.velocity(x_, s.to(device), c), x, sigmas)
            finals.append(final.cpu())
    return torch.cat(finals)


def preview_writer(folder: str, embeds: PromptEmbeds, latent_shape, device, data_cfg: ZImageDataConfig | None = None,
                   count: int = 4, seed: int = 0):
    """``write(student, path)``: a labelled grid of the first prompts (see :func:`compose_preview`), the teacher's
    ``data_cfg.teacher_steps``-step image and the student's 2-step image on the same fixed noise (seed ``seed``,
    not a training sample's), the step number from ``path`` in the header. The teacher column is sampled once, at
    the first grid, by the frozen base with every adapter off (``student.teacher()``), decoded and kept as images;
    the VAE is loaded per grid and freed, so it is never resident during training. Returns the grid's layout."""
    data_cfg = data_cfg or ZImageDataConfig()
    family = detect_family(folder)
    count = min(count, len(embeds))
    noise = torch.randn((count, *latent_shape), generator=torch.Generator().manual_seed(seed))
    cond = embeds[torch.arange(count)]
    prompts = list(embeds.prompts[:count])
    teacher_images: list = []
    sampled_teacher: list = []
    steps = data_cfg.teacher_steps

    def write(student: Student, path: str, title: str | None = None) -> dict:
        latents = student.sample(noise.to(device), cond.to(device), batch_size=1)["final"]
        first = teacher_latents(student, noise, cond, steps, data_cfg.shift, device) if not sampled_teacher else None
        sampled_teacher.append(True)
        if not is_main_process():  # FSDP2: every rank samples (the forward is a collective); rank 0 draws
            return {}
        vae = family.load_vae(folder, device, torch.float32)  # loaded per grid and freed: not resident during training
        if first is not None:
            teacher_images.extend(family.decode_images(vae, first[i:i + 1])[0] for i in range(count))
        images = [family.decode_images(vae, latents[i:i + 1])[0] for i in range(count)]
        del vae
        title_ = title or f"{_step_label(path)}: same noise per row"
        grid, layout = compose_preview(title_, prompts, teacher_images, images,
                                       teacher_label=f"teacher, {steps} steps",
                                       student_label=f"student, {student.cfg.num_steps} steps")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        grid.save(path)
        return layout

    return write
