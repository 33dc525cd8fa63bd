"""Command-written sections of ``docs/results.md``: tables plus the bars they are held to, with verdicts.

Nothing here holds an expected number: each verdict compares a measured value with the bar of its issue.
"""

from __future__ import annotations

import datetime
import os

from twostep.core.reports import update_section
from twostep.core.utils import platform_summary, read_json_object
from twostep.offline.evaluate import format_table
from twostep.offline.teacher import Teacher

TEACHER_FD_BAR = 2.0
NAIVE_GAP_BAR = 3.0
TEACHER_TRAIN_BAR_S = 8 * 60


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**NOT met**"


def teacher_bars(result: dict, meta: dict | None) -> list[str]:
    steps = result["steps"]
    lines = []
    if "8" in steps:
        fd8 = steps["8"]["fd_real"]
        lines.append(f"- 8-step teacher FD to held-out real ≤ {TEACHER_FD_BAR} at {result['num_samples']} samples: "
                     f"{fd8:.3f} — {_verdict(fd8 <= TEACHER_FD_BAR)} "
                     f"(real-vs-real floor at the same count: {result['real_floor']['fd_real']:.3f})")
        if "2" in steps:
            ratio = steps["2"]["fd_real"] / fd8
            lines.append(f"- naive 2-step FD ≥ {NAIVE_GAP_BAR}× the 8-step FD: {steps['2']['fd_real']:.3f} / "
                         f"{fd8:.3f} = {ratio:.2f}× — {_verdict(ratio >= NAIVE_GAP_BAR)}")
            if "samples_per_s" in steps["2"] and "samples_per_s" in steps["8"]:
                speed = steps["2"]["samples_per_s"] / steps["8"]["samples_per_s"]
                lines.append(f"- 2-step vs 8-step sampling throughput (same batch, same process): {speed:.2f}×")
    if meta:
        wall = meta["train_wall_s"]
        lines.append(f"- teacher training ≤ {TEACHER_TRAIN_BAR_S // 60} min on this machine: {wall:.0f} s "
                     f"({meta['steps']} steps, {meta['torch_threads']} threads) — "
                     f"{_verdict(wall <= TEACHER_TRAIN_BAR_S)}")
    return lines


def read_meta(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, "meta.json")
    return read_json_object(path, what="run record") if os.path.isfile(path) else None


def teacher_section(result: dict, teacher: Teacher) -> str:
    meta = read_meta(teacher.run_dir)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([
        "### Teacher on the offline digits world",
        "",
        f"Written by `{result.get('command', 'twostep eval')}` on {date}; machine: {platform_summary()}.",
        f"{result['num_samples']} samples per row (balanced over the ten prompts, noise seed {result['noise_seed']}), "
        f"FD against {result['heldout_real']} held-out real digits in the evaluator's 64-d feature space "
        f"(evaluator accuracy on held-out real digits: {result['evaluator_heldout_accuracy']:.3f}).",
        "",
        format_table(result),
        "",
        "Bars (issue: foundation):",
        "",
        *teacher_bars(result, meta),
    ])


def write_teacher_section(path: str, result: dict, teacher: Teacher) -> None:
    update_section(path, "teacher", teacher_section(result, teacher))


def metrics_table(result: dict) -> str:
    lines = ["| sampler | FD to held-out real ↓ | FD to teacher-8 ↓ | class accuracy ↑ | per-prompt diversity | "
             "PSNR vs teacher-8 (dB) |", "|---|---:|---:|---:|---:|---:|"]
    for name, row in result["rows"].items():
        psnr = "–" if row["psnr_vs_teacher"] == float("inf") else f"{row['psnr_vs_teacher']:.2f}"
        lines.append(f"| {name.replace('_', ' ')} | {row['fd_real']:.3f} | {row['fd_teacher']:.3f} | "
                     f"{row['class_accuracy']:.3f} | {row['diversity']:.3f} | {psnr} |")
    floor = result["real_floor"]
    lines.append(f"| real training digits (floor) | {floor['fd_real']:.3f} | – | {floor['class_accuracy']:.3f} | "
                 f"{floor['diversity']:.3f} | – |")
    return "\n".join(lines)


def distill_bars(result: dict) -> list[str]:
    rows = result["rows"]
    teacher = next(row for name, row in rows.items() if name.startswith("teacher_") and "naive" not in name)
    student = next(row for name, row in rows.items() if name.startswith("student_") and "step1" not in name)
    verdict = _verdict
    gc = result["gap_closure"]
    acc_gap = (teacher["class_accuracy"] - student["class_accuracy"]) * 100
    div_ratio = student["diversity"] / teacher["diversity"]
    lines = [
        f"- gap closure ≥ 0.8: {gc:.3f} — {verdict(gc >= 0.8)}",
        f"- class accuracy within 2 points of the teacher's: student {student['class_accuracy']:.3f} vs teacher "
        f"{teacher['class_accuracy']:.3f} ({acc_gap:+.1f} points below) — {verdict(acc_gap <= 2.0)}",
        f"- per-prompt diversity ≥ 0.9× the teacher's: {div_ratio:.3f}× — {verdict(div_ratio >= 0.9)}",
    ]
    if "speed" in result:
        sp = result["speed"]["speedup"]
        lines.append(f"- 2-step throughput ≥ 3.5× the 8-step teacher's (batch {result['speed']['batch']}, same "
                     f"process): {sp:.2f}× — {verdict(sp >= 3.5)}")
    return lines


def distill_section(result: dict, bars: list[str], meta: dict) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    speed = result.get("speed", {})
    return "\n".join([
        "### 2-step student (shipped defaults, configs/toy_demo.yaml) on the offline digits world",
        "",
        f"Written by `{result.get('command', 'twostep demo')}` on {date}; machine: {platform_summary()}.",
        f"Student: {meta['student']}, {meta['student_steps']} generator steps; recipe: {meta['recipe']}. "
        f"{result['num_samples']} samples per row, same noise and prompts for every row.",
        "",
        metrics_table(result),
        "",
        f"Gap closure: **{result['gap_closure']:.3f}**. Throughput (batch {speed.get('batch', '–')}): "
        + ", ".join(f"{k} {v:.1f}" for k, v in speed.items() if k.endswith("per_s")) + ".",
        "",
        "Bars (issue: distillation engine):",
        "",
        *bars,
        f"- `make demo` ≤ 15 min from a clean clone (after installation); each stage as measured when it last ran "
        f"on this machine: teacher {meta['teacher_wall_s']:.0f} s + "
        f"teacher data {meta['data_wall_s']:.0f} s + student {meta['student_wall_s']:.0f} s + evaluation "
        f"{meta['eval_wall_s']:.0f} s = {total_min(meta):.1f} min — {'**met**' if total_min(meta) <= 15 else '**NOT met**'}",
    ])


def total_min(meta: dict) -> float:
    return sum(meta[k] for k in meta if k.endswith("_wall_s")) / 60


def write_distill_section(path: str, result: dict, bars: list[str], meta: dict) -> None:
    update_section(path, "distill", distill_section(result, bars, meta))
