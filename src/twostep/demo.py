"""``twostep demo``: the main job on the offline world, start to finish, with a report to look at.

Today (foundation): train or reuse the toy teacher, compare it at 8 and 2 steps on the same noise,
evaluate every step count, and write ``OUT/report.md`` + ``OUT/metrics.json``. The distillation stage
plugs in after the teacher.
"""

from __future__ import annotations

import json
import os

import torch
import yaml

from .config import load_config, to_dict
from .evaluate import build_evaluator, evaluate_teacher_steps, format_table
from .reports import image_grid, save_image
from .results import read_meta, teacher_bars, write_teacher_section
from .sampling import generate, make_noise
from .teacher import TeacherConfig, load_teacher, train_teacher
from .toy.data import NUM_CLASSES
from .utils import ensure_writable_dir, write_text

EVAL_STEPS = [1, 2, 4, 8, 16]


def teacher_is_current(run_dir: str, cfg: TeacherConfig) -> bool:
    """A finished teacher run made with exactly this config can be reused."""
    path = os.path.join(run_dir, "config.yaml")
    if not (os.path.isfile(path) and os.path.isfile(os.path.join(run_dir, "teacher.safetensors"))):
        return False
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) == to_dict(cfg)


def comparison_grid(teacher, steps: list[int], per_prompt: int = 6, seed: int = 0):
    """Rows = prompts 0..9; column blocks = step counts, all from the same noise."""
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_prompt)
    noise = make_noise(len(labels), teacher.image_shape, seed)
    blocks = [generate(teacher.backbone, noise, teacher.cond(labels), n, teacher.config.sampling.shift)
              .reshape(NUM_CLASSES, per_prompt, *teacher.image_shape) for n in steps]
    gap = torch.ones(NUM_CLASSES, 1, *teacher.image_shape)  # a white column between blocks
    rows = torch.cat([b if i == 0 else torch.cat([gap, b], 1) for i, b in enumerate(blocks)], dim=1)
    ncols = rows.shape[1]
    header = []
    for i, n in enumerate(steps):
        header += [f"{n} steps"] + [""] * (per_prompt - 1) + ([""] if i < len(steps) - 1 else [])
    return image_grid(rows.reshape(-1, *teacher.image_shape), ncols=ncols,
                      row_labels=[str(d) for d in range(NUM_CLASSES)], col_labels=header)


def run_demo(out: str, config_path: str | None = None, overrides=(), results_path: str | None = None) -> str:
    cfg = load_config(TeacherConfig, config_path, overrides)
    ensure_writable_dir(out, what="demo folder")
    teacher_dir = os.path.join(out, "teacher")
    if teacher_is_current(teacher_dir, cfg):
        print(f"reusing the teacher in {teacher_dir} (same config)")
    else:
        print(f"training the teacher into {teacher_dir}")
        train_teacher(cfg, teacher_dir)
    teacher = load_teacher(teacher_dir)

    save_image(comparison_grid(teacher, [8, 2]), os.path.join(out, "teacher_8_vs_2_steps.png"))
    result = evaluate_teacher_steps(teacher, EVAL_STEPS, evaluator=build_evaluator(teacher))
    result["command"] = "twostep demo" + (f" --out {out}" if out != "runs/demo" else "")
    write_text(os.path.join(out, "metrics.json"), json.dumps(result, indent=2) + "\n")

    report = "\n".join([
        "# twostep demo: the offline world",
        "",
        "Teacher (tiny `ZImageTransformer2DModel`, flow matching, Turbo schedule shift 3) at 8 steps and naively "
        "at 2 steps, same prompts (rows: digit 0..9) and same noise:",
        "",
        "![teacher 8 vs 2 steps](teacher_8_vs_2_steps.png)",
        "",
        format_table(result),
        "",
        *teacher_bars(result, read_meta(teacher_dir)),
        "",
        "The 2-step student (distillation) is not part of this build yet.",
    ])
    report_path = os.path.join(out, "report.md")
    write_text(report_path, report + "\n")
    if results_path:
        write_teacher_section(results_path, result, teacher)
    return report_path
