"""Metrics on the offline world: FD to held-out real digits, class accuracy, diversity, speed.

All samples of one evaluation share one noise tensor (seeded), so different step counts and different
models are compared on the same noise, prompt by prompt.
"""

from __future__ import annotations

import statistics
import time
from typing import Sequence

import torch

from twostep.core.reports import image_grid
from twostep.core.utils import progress
from twostep.offline.sampling import generate, make_noise
from twostep.offline.teacher import Teacher
from twostep.offline.worlds import Evaluator


def build_evaluator(teacher: Teacher) -> Evaluator:
    return teacher.world.build_evaluator(teacher.config.eval.evaluator_seed)


def eval_set(teacher: Teacher, num_samples: int):
    """The fixed evaluation set: ``(labels (N,), noise (N, C, H, W), cond)``, prompts balanced over classes."""
    labels = torch.arange(num_samples) % teacher.num_classes
    noise = make_noise(num_samples, teacher.image_shape, teacher.config.eval.seed)
    return labels, noise, teacher.cond(labels)


def measure_throughput(fn, num_items: int, repeats: int) -> float:
    """Items per second of ``fn()``: one warm-up call, then the median of ``repeats`` timed calls."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return num_items / statistics.median(times)


def evaluate_teacher_steps(teacher: Teacher, steps: Sequence[int], num_samples: int | None = None,
                           evaluator: Evaluator | None = None, measure_speed: bool = True) -> dict:
    """Score the teacher sampled with each step count in ``steps`` on the same noise and prompts."""
    ec = teacher.config.eval
    num_samples = num_samples or ec.num_samples
    evaluator = evaluator or build_evaluator(teacher)
    labels, noise, cond = eval_set(teacher, num_samples)
    shift = teacher.config.sampling.shift
    result = {
        "num_samples": num_samples, "heldout_real": len(evaluator.heldout), "noise_seed": ec.seed,
        "shift": shift, "real_floor": evaluator.real_floor(num_samples),
        "evaluator_heldout_accuracy": evaluator.heldout_accuracy, "steps": {},
    }
    for n in progress(list(steps), desc="eval"):
        images = generate(teacher.backbone, noise, cond, n, shift, batch_size=ec.batch_size)
        row = evaluator.score(images, labels)
        if measure_speed:
            b = ec.throughput_batch
            tn, tc = noise[:b], cond[:b]
            row["samples_per_s"] = measure_throughput(
                lambda: generate(teacher.backbone, tn, tc, n, shift, batch_size=b), b, ec.throughput_repeats)
        row["mean"], row["std"] = float(images.mean()), float(images.std())
        result["steps"][str(n)] = row
    return result


def format_table(result: dict) -> str:
    """Markdown table of :func:`evaluate_teacher_steps` output."""
    lines = ["| sampler | FD to held-out real ↓ | class accuracy ↑ | per-prompt diversity | samples/s |",
             "|---|---:|---:|---:|---:|"]
    for n, row in result["steps"].items():
        speed = f"{row['samples_per_s']:.0f}" if "samples_per_s" in row else "–"
        lines.append(f"| teacher, {n} steps | {row['fd_real']:.3f} | {row['class_accuracy']:.3f} | "
                     f"{row['diversity']:.3f} | {speed} |")
    floor = result["real_floor"]
    lines.append(f"| real training images (floor) | {floor['fd_real']:.3f} | {floor['class_accuracy']:.3f} | "
                 f"{floor['diversity']:.3f} | – |")
    return "\n".join(lines)


def comparison_grid(images: dict[str, torch.Tensor], labels: torch.Tensor, per_prompt: int,
                    class_names: list[str]):
    """Rows = prompts 0..9; one block of ``per_prompt`` columns per sampler, same noise in every block."""
    names = list(images)
    shape = next(iter(images.values())).shape[1:]
    blocks = []
    for name in names:
        imgs = images[name]
        picked = torch.stack([imgs[labels == c][:per_prompt] for c in range(len(class_names))])  # (K, P, C, H, W)
        blocks.append(picked)
    gap = torch.ones(len(class_names), 1, *shape)
    rows = torch.cat([b if i == 0 else torch.cat([gap, b], 1) for i, b in enumerate(blocks)], dim=1)
    header = []
    for i, name in enumerate(names):
        header += [name.replace("_", " ")] + [""] * (per_prompt - 1) + ([""] if i < len(names) - 1 else [])
    return image_grid(rows.reshape(-1, *shape), ncols=rows.shape[1], row_labels=class_names,
                      col_labels=header, scale=4)
