"""``twostep demo``: the main job on the offline world, start to finish, with a report to look at.

1. start from the shipped toy teacher (``twostep/shipped/``) when the config's teacher section is the one it was
   trained with; otherwise (or with ``--train-teacher``) train one into ``OUT/teacher`` (reused when made with
   the same config);
2. build the teacher-data cache (finished shards are kept);
3. distil the 2-step student with the shipped defaults (reused when ``OUT/student`` has the same config);
4. evaluate teacher 8-step, naive teacher 2-step, student 2-step and its step-1 estimate on the same noise;
5. write ``OUT/report.md``, ``OUT/report.html`` (self-contained), ``OUT/metrics.json``, grids and loss curves.
"""

from __future__ import annotations

import base64
import html
import json
import os
import shutil

import torch

from twostep.core.config import load_config, read_yaml, to_dict
from twostep.core.reports import save_figure, save_image
from twostep.core.utils import ensure_writable_dir, platform_summary, read_json_object, read_jsonl_file, write_text
from twostep.engine.teacher_data import CacheMismatch
from twostep.offline.distill import (
    STUDENT_WEIGHTS,
    DistillConfig,
    evaluate_student,
    load_student,
    make_teacher_data,
    train_student,
)
from twostep.offline.evaluate import build_evaluator, comparison_grid, evaluate_teacher_steps
from twostep.offline.results import distill_bars, metrics_table, write_distill_section, write_teacher_section
from twostep.offline.ship import matching_shipped_teacher
from twostep.offline.shipped import read_provenance
from twostep.offline.teacher import load_teacher, train_teacher

EVAL_STEPS = [1, 2, 4, 8, 16]


def same_config(run_dir: str, cfg_dict: dict, required_file: str) -> bool:
    """A finished run made with exactly this (resolved) config can be reused."""
    path = os.path.join(run_dir, "config.yaml")
    if not (os.path.isfile(path) and os.path.isfile(os.path.join(run_dir, required_file))):
        return False
    return read_yaml(path) == cfg_dict


def loss_curves(log_path: str, out_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl_file(log_path, what="training log")
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for key in ["g_adv", "g_step1", "d_loss"]:
        axes[0].plot(steps, [r.get(key, float("nan")) for r in records], label=key)
    axes[0].set_title("losses")
    axes[1].plot(steps, [r.get("d_accuracy", float("nan")) for r in records], label="D accuracy")
    axes[1].plot(steps, [r.get("d_real_logit", float("nan")) for r in records], label="real logit")
    axes[1].plot(steps, [r.get("d_fake_logit", float("nan")) for r in records], label="fake logit")
    axes[1].set_title("discriminator")
    axes[2].plot(steps, [r["out_std"] for r in records], label="output std")
    axes[2].plot(steps, [r["step1_mse_to_teacher"] for r in records], label="step-1 MSE to teacher")
    axes[2].set_title("student outputs")
    evals = [r for r in records if "eval/fd_real" in r]
    axes[3].plot([r["step"] for r in evals], [r["eval/fd_real"] for r in evals], "o-", label="FD to held-out real")
    axes[3].set_title("periodic eval (EMA, 500 samples)")
    for ax in axes:
        ax.set_xlabel("generator step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out_path)


def _img_tag(path: str, alt: str) -> str:
    data = base64.b64encode(open(path, "rb").read()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}" style="max-width:100%">'


def markdown_to_html_table(md: str) -> str:
    rows = [r.strip().strip("|").split("|") for r in md.strip().splitlines()]
    head, body = rows[0], rows[2:]
    out = ["<table><tr>" + "".join(f"<th>{html.escape(c.strip())}</th>" for c in head) + "</tr>"]
    for r in body:
        out.append("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>")
    return "\n".join(out) + "</table>"


def _wall_line(meta: dict) -> str:
    """Each stage's wall time and the machine; a shipped teacher costs no training time."""
    teacher = (f"teacher 0 s (shipped: {meta['teacher_dir']}; `twostep demo --train-teacher` trains it)"
               if meta.get("teacher_source") == "shipped" else f"teacher {meta['teacher_wall_s']:.0f} s (trained)")
    total = sum(meta[k] for k in ("teacher_wall_s", "data_wall_s", "student_wall_s", "eval_wall_s"))
    return (f"Wall time on {meta.get('machine', 'this machine')}: {teacher}, teacher data {meta['data_wall_s']:.0f} s, "
            f"student {meta['student_wall_s']:.0f} s, evaluation {meta['eval_wall_s']:.0f} s; {total:.0f} s in all.")


def write_reports(out: str, result: dict, bars: list[str], meta: dict) -> str:
    table = metrics_table(result)
    md = "\n".join([
        "# twostep demo: 2-step distillation on the offline world", "",
        f"Teacher: tiny `ZImageTransformer2DModel`, {meta['teacher_steps']} steps on the Turbo schedule. Student: "
        f"{meta['student']} trained {meta['student_steps']} generator steps with the full Turbo++ recipe "
        f"({meta['recipe']}).", "",
        "Same prompts (rows: prompts) and same noise in every block:", "",
        "![comparison](comparison.png)", "",
        table, "",
        f"Gap closure (FD_naive2 − FD_student2) / (FD_naive2 − FD_teacher8) = **{result['gap_closure']:.3f}**", "",
        *bars, "",
        "Training curves:", "", "![loss curves](loss_curves.png)", "",
        _wall_line(meta),
    ])
    write_text(os.path.join(out, "report.md"), md + "\n")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>twostep demo</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}</style></head><body>
<h1>twostep demo: 2-step distillation on the offline world</h1>
<p>Teacher {meta['teacher_steps']} steps vs naive 2 steps vs the 2-step student ({html.escape(meta['student'])}) and
its step-1 estimate, same prompts (rows: prompts) and same noise.</p>
{_img_tag(os.path.join(out, 'comparison.png'), 'comparison grid')}
<h2>Metrics</h2>{markdown_to_html_table(table)}
<p>Gap closure: <b>{result['gap_closure']:.3f}</b></p>
<ul>{''.join('<li>' + html.escape(b.lstrip('- ').replace('**', '')) + '</li>' for b in bars)}</ul>
<h2>Training</h2>{_img_tag(os.path.join(out, 'loss_curves.png'), 'loss curves')}
<p>{html.escape(_wall_line(meta).replace('`', ''))}</p>
</body></html>"""
    write_text(os.path.join(out, "report.html"), page)
    return os.path.join(out, "report.md")


def run_demo(out: str, config_path: str | None = None, overrides=(), results_path: str | None = None,
             retrain_teacher: bool = False) -> str:
    """``retrain_teacher``: train the teacher from scratch even when the shipped one has the same config."""
    import time

    cfg = load_config(DistillConfig, config_path, overrides)
    ensure_writable_dir(out, what="demo folder")
    teacher_dir, data_dir, student_dir = (os.path.join(out, n) for n in ("teacher", "teacher_data", "student"))

    walls_path = os.path.join(out, "stage_walls.json")
    walls = (read_json_object(walls_path, what="stage record", hint="delete it (the demo then redoes every stage)")
             if os.path.isfile(walls_path) else {})

    started = time.perf_counter()
    shipped, why = (None, "--train-teacher") if retrain_teacher else matching_shipped_teacher(to_dict(cfg.teacher))
    if shipped:  # as a real user starts from a downloaded Z-Image-Turbo
        print(f"starting from the shipped teacher {shipped} (same config; `twostep demo --train-teacher` trains one)")
        weights = read_provenance(shipped)["sha256"]["teacher.safetensors"]
        if walls.get("teacher_source") != "shipped" or walls.get("teacher_sha256") != weights:
            walls.pop("student", None)  # the student was distilled from another teacher
        walls.update(teacher=0.0, teacher_source="shipped", teacher_sha256=weights)
        teacher_dir = shipped
    elif (same_config(teacher_dir, to_dict(cfg.teacher), "teacher.safetensors") and "teacher" in walls
          and walls.get("teacher_source", "trained") == "trained"):
        print(f"reusing the teacher in {teacher_dir} (same config)")
    else:
        print(f"training the teacher into {teacher_dir} ({why})")
        train_teacher(cfg.teacher, teacher_dir, restart=True)  # this folder is ours: an unfinished run starts over
        walls["teacher"], walls["teacher_source"] = time.perf_counter() - started, "trained"
        walls.pop("student", None)

    started = time.perf_counter()
    try:
        make_teacher_data(teacher_dir, cfg, data_dir)
    except CacheMismatch:
        print(f"teacher data in {data_dir} belongs to another teacher or schedule; regenerating it")
        shutil.rmtree(data_dir)
        make_teacher_data(teacher_dir, cfg, data_dir)
    if time.perf_counter() - started > 2 or "teacher_data" not in walls:  # a cache hit takes milliseconds
        walls["teacher_data"] = time.perf_counter() - started

    started = time.perf_counter()
    if same_config(student_dir, to_dict(cfg), STUDENT_WEIGHTS) and "student" in walls:
        print(f"reusing the student in {student_dir} (same config)")
    else:
        print(f"distilling the student into {student_dir}")
        train_student(teacher_dir, data_dir, cfg, student_dir, overwrite=True)  # the demo owns its folders
        walls["student"] = time.perf_counter() - started
    write_text(walls_path, json.dumps(walls, indent=2) + "\n")

    started = time.perf_counter()
    student, teacher, _ = load_student(student_dir, teacher_run=teacher_dir)
    evaluator = build_evaluator(teacher)
    result, images = evaluate_student(student, teacher, cfg.teacher.eval.num_samples, evaluator=evaluator)
    eval_wall = time.perf_counter() - started
    steps_result = None
    if results_path:  # the teacher's step sweep goes into docs/results.md only
        steps_result = evaluate_teacher_steps(load_teacher(teacher_dir), EVAL_STEPS, evaluator=evaluator)

    class_names = teacher.world.class_names
    labels = torch.arange(len(next(iter(images.values())))) % len(class_names)
    save_image(comparison_grid(images, labels, per_prompt=5, class_names=class_names),
               os.path.join(out, "comparison.png"))
    loss_curves(os.path.join(student_dir, "train_log.jsonl"), os.path.join(out, "loss_curves.png"))
    sc = cfg.student
    meta = {"teacher_steps": cfg.teacher.sampling.steps, "student_steps": cfg.train.steps,
            "student": f"{sc.num_steps}-step {sc.params}/{sc.form}" + (f" (rank {sc.lora_rank})" if sc.form == "lora"
                                                                       else ""),
            "recipe": f"real_source={cfg.recipe.real_source}, end_to_end={cfg.recipe.end_to_end}, "
                      f"step1_loss={cfg.recipe.step1_loss}, renoise={cfg.student.renoise}",
            "teacher_wall_s": walls["teacher"], "data_wall_s": walls["teacher_data"],
            "student_wall_s": walls["student"], "eval_wall_s": eval_wall,
            "teacher_source": walls.get("teacher_source", "trained"), "teacher_dir": teacher_dir,
            "machine": platform_summary()}
    result["command"] = ("twostep demo" + (f" --out {out}" if out != "runs/demo" else "")
                         + (" --train-teacher" if retrain_teacher else ""))
    if steps_result is not None:
        result["teacher_steps_eval"] = steps_result
    result["walls"] = meta
    write_text(os.path.join(out, "metrics.json"), json.dumps(result, indent=2) + "\n")
    bars = distill_bars(result)
    report = write_reports(out, result, bars, meta)
    if results_path:
        steps_result["command"] = result["command"] + f" --results {results_path}"
        write_teacher_section(results_path, steps_result, teacher)
        write_distill_section(results_path, result, bars, meta)
    return report

