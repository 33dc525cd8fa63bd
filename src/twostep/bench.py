"""``twostep bench``: the paper's ablations on the offline world, at one equal training budget per arm.

Every arm is the paper's recipe (``PAPER``, set explicitly) with one change (``ARMS``), except ``defaults``, which
is the shipped config as it is; each runs for ``seeds`` seeds and is scored on the
same 1,000 noises and prompts as the teacher references. Output: ``OUT/results.json``, ``OUT/gap_closure.png``
and, with ``--results``, a regenerated section of ``docs/results.md`` with an automatic reading of which
claims reproduce (a difference counts only when it exceeds the spread over seeds).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import dataclass

from .config import load_config, require, to_dict
from .distill import evaluate_student, load_student, make_teacher_data, teacher_references, train_student
from .evaluate import build_evaluator
from .reports import save_figure, update_section
from .teacher import load_teacher, platform_summary, train_teacher
from .train import DistillConfig
from .utils import ensure_writable_dir, progress, write_text

# The recipe as the paper states it, set explicitly so the ablations mean the same thing whatever the defaults
# in configs/ become (they are chosen by this bench: the "defaults" arm).
PAPER = ["student.params=decoupled", "student.form=lora", "student.renoise=euler", "recipe.real_source=teacher",
         "recipe.end_to_end=true", "recipe.step1_loss=intermediate", "recipe.adv_weight=1.0",
         "recipe.final_reg_weight=0.0"]
FULL = "full recipe"
DEFAULTS = "defaults"

# name -> (overrides on top of PAPER, what it tests); DEFAULTS takes the config as it is
ARMS: dict[str, tuple[list[str], str]] = {
    FULL: ([], "all three components as the paper states them"),
    "real_source=data": (["recipe.real_source=data"], "component 1 removed: GAN reals are dataset images"),
    "params=shared": (["student.params=shared"], "component 2 removed: one parameter set for both steps"),
    "end_to_end=false": (["recipe.end_to_end=false"], "component 3 removed: detach between steps"),
    "step1_loss=none": (["recipe.step1_loss=none"], "component 3 removed: no step-1 regulariser"),
    "step1_loss=final": (["recipe.step1_loss=final"], "step-1 variant: regress x̂1 to the teacher's final"),
    "step1_loss=adversarial": (["recipe.step1_loss=adversarial"], "step-1 variant: GAN loss on x̂1"),
    "renoise=fresh": (["student.renoise=fresh"], "transition with fresh noise instead of Euler"),
    "form=full": (["student.form=full"], "decoupled by full per-step copies instead of LoRA"),
    "+ final_reg": (["recipe.final_reg_weight=1.0"], "the paper's recipe plus MSE of x̂2 to the teacher's output"),
    "regression only": (["recipe.adv_weight=0.0", "recipe.step1_loss=none", "recipe.final_reg_weight=1.0"],
                        "reference: MSE to the teacher output through both steps, no GAN"),
    "LADD/DMD2-style per-step GAN": (["recipe.real_source=data", "recipe.end_to_end=false",
                                      "recipe.step1_loss=adversarial"],
                                     "reference: GAN on natural images, each step on detached inputs"),
    DEFAULTS: ([], "the shipped defaults (configs/toy_demo.yaml), chosen from this bench"),
}
ABLATIONS = ["real_source=data", "params=shared", "end_to_end=false", "step1_loss=none"]


def arm_overrides(name: str, common: list[str] | tuple = ()) -> list[str]:
    """PAPER (not for DEFAULTS), then the overrides ``common`` to every arm, then the arm's own change."""
    return ([] if name == DEFAULTS else list(PAPER)) + list(common) + list(ARMS[name][0])


@dataclass
class BenchConfig:
    seeds: int = 3
    steps: int = 100
    batch_size: int = 32
    eval_samples: int = 1000

    def validate(self) -> None:
        require(self.seeds >= 1 and self.steps >= 1, "seeds", "and steps must be >= 1")
        require(self.eval_samples >= 20, "eval_samples", "must be >= 20")


QUICK = BenchConfig(seeds=1, steps=4, batch_size=8, eval_samples=40)
QUICK_TEACHER = ["teacher.model.dim=32", "teacher.model.n_heads=2", "teacher.model.axes_dims=[4,6,6]",
                 "teacher.model.n_layers=4", "teacher.text.hidden_size=8", "teacher.train.steps=30",
                 "teacher.train.batch_size=32", "teacher.train.warmup_steps=5", "teacher_data.num_samples=64",
                 "teacher_data.shard_size=64", "teacher_data.batch_size=64", "student.lora_rank=4",
                 "discriminator.hidden=16", "teacher.eval.throughput_batch=8", "teacher.eval.throughput_repeats=1"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan")
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else 0.0)


def run_bench(out: str, config_path: str | None, overrides=(), quick: bool = False, seeds: int | None = None,
              arms: list[str] | None = None, teacher_dir: str | None = None, steps: int | None = None,
              batch_size: int | None = None) -> dict:
    base = QUICK if quick else BenchConfig()
    bc = BenchConfig(seeds=seeds or base.seeds, steps=steps or base.steps, batch_size=batch_size or base.batch_size,
                     eval_samples=base.eval_samples)
    base_overrides = QUICK_TEACHER if quick else []
    cfg = load_config(DistillConfig, config_path, base_overrides + list(overrides))
    ensure_writable_dir(out, what="bench folder")
    bench_started = time.perf_counter()
    unknown = [a for a in (arms or []) if a not in ARMS]
    if unknown:
        from .errors import TwostepError

        raise TwostepError(f"unknown bench arm {unknown[0]!r}; known: {', '.join(ARMS)}")
    arm_names = arms or list(ARMS)

    teacher_dir = teacher_dir or os.path.join(out, "teacher")
    if not os.path.isfile(os.path.join(teacher_dir, "teacher.safetensors")):
        train_teacher(cfg.teacher, teacher_dir)
    data_dir = os.path.join(out, "teacher_data")
    make_teacher_data(teacher_dir, cfg, data_dir)
    clean_teacher = load_teacher(teacher_dir)
    evaluator = build_evaluator(clean_teacher)
    reference_images = teacher_references(clean_teacher, bc.eval_samples, cfg.student.num_steps)

    budget = [f"train.steps={bc.steps}", f"train.batch_size={bc.batch_size}", "train.eval_every=0",
              f"train.sample_every={10 ** 9}", f"train.checkpoint_every={10 ** 9}"]
    runs: dict[str, list[dict]] = {}
    references: dict | None = None
    for name in progress(arm_names, desc="bench arms"):
        runs[name] = []
        for seed in range(bc.seeds):
            arm_cfg = load_config(DistillConfig, config_path,
                                  base_overrides + arm_overrides(name, overrides) + budget + [f"train.seed={seed}"])
            run_dir = os.path.join(out, "arms", name.replace(" ", "_").replace("/", "-"), f"seed{seed}")
            started = time.perf_counter()
            train_student(teacher_dir, data_dir, arm_cfg, run_dir)
            wall = time.perf_counter() - started
            student, teacher, _ = load_student(run_dir, teacher_run=teacher_dir)
            result, _ = evaluate_student(student, teacher, bc.eval_samples, evaluator=evaluator, measure_speed=False,
                                         references=reference_images)
            rows = result["rows"]
            if references is None:
                references = {k: rows[k] for k in rows if k.startswith("teacher")}
                references["real_floor"] = result["real_floor"]
            student_row = rows[[k for k in rows if k.startswith("student_") and "step1" not in k][0]]
            runs[name].append({
                "seed": seed, "gap_closure": result["gap_closure"], "fd_real": student_row["fd_real"],
                "fd_teacher": student_row["fd_teacher"], "fd_step1": rows["student_step1_estimate"]["fd_real"],
                "class_accuracy": student_row["class_accuracy"], "diversity": student_row["diversity"],
                "psnr_vs_teacher": student_row["psnr_vs_teacher"], "train_wall_s": wall})
    summary = {name: {metric: _mean_std([r[metric] for r in rs]) for metric in rs[0] if metric != "seed"}
               for name, rs in runs.items()}
    arms_info = {n: {"overrides": arm_overrides(n, overrides), "what": ARMS[n][1]} for n in arm_names}
    report = {"bench": to_dict(bc), "quick": quick, "arms": arms_info,
              "references": references, "runs": runs, "summary": summary, "machine": platform_summary(),
              "total_wall_s": time.perf_counter() - bench_started}
    write_text(os.path.join(out, "results.json"), json.dumps(report, indent=2) + "\n")
    plot_gap_closure(summary, os.path.join(out, "gap_closure.png"))
    return report


def plot_gap_closure(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    means = [summary[n]["gap_closure"][0] for n in names]
    stds = [summary[n]["gap_closure"][1] for n in names]
    fig, ax = plt.subplots(figsize=(10, 3.8))
    colors = ["tab:green" if n == FULL else "tab:purple" if n == DEFAULTS else ("tab:red" if n in ABLATIONS else
              "tab:blue") for n in names]
    ax.bar(range(len(names)), means, yerr=stds, capsize=4, color=colors)
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.axhline(0.0, color="gray", lw=0.8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("gap closure (mean ± std over seeds)")
    fig.tight_layout()
    save_figure(fig, path)


def reading(summary: dict) -> list[str]:
    """Which claims reproduce: an ablation differs from the full recipe only beyond the seeds' spread."""
    if FULL not in summary:
        return [f"- The paper's recipe (`{FULL}`) was not among the arms run; nothing to compare against."]
    full_mean, full_std = summary[FULL]["gap_closure"]
    lines = []
    for name in ABLATIONS:
        if name not in summary:
            continue
        mean, std = summary[name]["gap_closure"]
        margin = max(full_std, std)
        delta = full_mean - mean
        if delta > margin:
            verdict = f"reproduces: the full recipe closes {delta:.3f} more of the gap"
        elif delta < -margin:
            verdict = f"does NOT reproduce: removing it closes {-delta:.3f} more of the gap"
        else:
            verdict = f"not distinguishable here (difference {delta:+.3f} within the spread ±{margin:.3f})"
        lines.append(f"- {ARMS[name][1]} (`{name}`): {verdict}.")
    ranked = sorted(((v["gap_closure"][0], n) for n, v in summary.items() if math.isfinite(v["gap_closure"][0])),
                    reverse=True)
    if ranked:
        best_mean, best = ranked[0]
        best_std = summary[best]["gap_closure"][1]
        tie = best == FULL or best_mean - full_mean <= max(best_std, full_std)
        lines.append(f"- Highest mean gap closure: `{best}` ({best_mean:.3f} ± {best_std:.3f}); "
                     + ("not better than the paper's recipe beyond the spread." if tie else
                        "better than the paper's recipe beyond the spread."))
    if DEFAULTS in summary:
        mean, std = summary[DEFAULTS]["gap_closure"]
        delta = mean - full_mean
        margin = max(std, full_std)
        verdict = ("better than" if delta > margin else "worse than" if delta < -margin else "not distinguishable from")
        lines.append(f"- The shipped defaults (`{DEFAULTS}`): {mean:.3f} ± {std:.3f}, {verdict} the paper's recipe "
                     f"({delta:+.3f}).")
    return lines


def bench_section(report: dict, command: str, plot_rel: str) -> str:
    refs = report["references"]
    lines = [
        "### Ablations (`twostep bench`)", "",
        f"Written by `{command}`; machine: {report['machine']}. Budget per arm: {report['bench']['steps']} "
        f"generator steps at batch {report['bench']['batch_size']}, {report['bench']['seeds']} seed(s), "
        f"{report['bench']['eval_samples']} evaluation samples (same noise and prompts for every arm). "
        f"Whole bench: {report['total_wall_s'] / 60:.1f} min"
        + ("" if report["quick"] else f" (bar: ≤ 60 min — {'**met**' if report['total_wall_s'] <= 3600 else '**NOT met**'})")
        + ".", "",
        "| arm | gap closure ↑ | FD real ↓ | FD to teacher ↓ | FD of x̂1 ↓ | class acc ↑ | diversity | PSNR vs teacher | "
        "train s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for ref_name, row in refs.items():
        if ref_name == "real_floor":
            continue
        lines.append(f"| {ref_name.replace('_', ' ')} | – | {row['fd_real']:.3f} | {row['fd_teacher']:.3f} | – | "
                     f"{row['class_accuracy']:.3f} | {row['diversity']:.3f} | "
                     f"{'–' if row['psnr_vs_teacher'] == float('inf') else format(row['psnr_vs_teacher'], '.2f')} | – |")
    fmt = lambda ms, p=3: f"{ms[0]:.{p}f} ± {ms[1]:.{p}f}"  # noqa: E731
    for name, s in report["summary"].items():
        lines.append(f"| {name} | {fmt(s['gap_closure'])} | {fmt(s['fd_real'])} | {fmt(s['fd_teacher'])} | "
                     f"{fmt(s['fd_step1'])} | {fmt(s['class_accuracy'])} | {fmt(s['diversity'])} | "
                     f"{fmt(s['psnr_vs_teacher'], 2)} | {s['train_wall_s'][0]:.0f} |")
    lines += ["", f"![gap closure per arm]({plot_rel})", "", "Reading (generated from the numbers above):", "",
              *reading(report["summary"])]
    return "\n".join(lines)


def write_bench_section(path: str, report: dict, command: str, plot_path: str) -> None:
    """Rewrite the bench block of ``path``; the plot is copied next to it (``img/``) so the page shows it."""
    import shutil

    image_dir = os.path.join(os.path.dirname(os.path.abspath(path)), "img")
    os.makedirs(image_dir, exist_ok=True)
    shutil.copyfile(plot_path, os.path.join(image_dir, "bench_gap_closure.png"))
    update_section(path, "bench", bench_section(report, command, "img/bench_gap_closure.png"))

