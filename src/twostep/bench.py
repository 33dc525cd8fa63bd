"""``twostep bench``: the paper's ablations on the offline world, at one equal training budget per arm.

Every arm is the paper's recipe (``PAPER``, set explicitly) with one change (``ARMS``), except ``defaults``, which
is the shipped config as it is; each runs for ``seeds`` seeds and is scored on the
same 1,000 noises and prompts as the teacher references. Output: ``OUT/results.json``, ``OUT/gap_closure.png``
and, with ``--results``, a regenerated section of ``docs/results.md`` with an automatic reading of which
claims reproduce (a difference counts only when it exceeds the spread over seeds).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from dataclasses import dataclass

from twostep.core.config import load_config, require, to_dict
from twostep.core.errors import TwostepError
from twostep.core.reports import save_figure, update_section
from twostep.core.utils import (
    ensure_writable_dir,
    platform_summary,
    progress,
    read_json_object,
    read_jsonl_file,
    write_text,
)
from twostep.offline.distill import (
    DistillConfig,
    evaluate_student,
    gap_closure,
    load_student,
    make_teacher_data,
    teacher_references,
    train_student,
)
from twostep.offline.evaluate import build_evaluator, eval_set
from twostep.offline.ship import matching_shipped_teacher
from twostep.offline.teacher import load_teacher, train_teacher

# The recipe as the paper states it, set explicitly so the ablations mean the same thing whatever the defaults
# in configs/ become (they are chosen by this bench: the "defaults" arm). Includes the discriminator fixes of the
# adversarial core (issue 9): D-only warm-up, a ramp on the adversarial weight, approximate R1.
PAPER = ["student.params=decoupled", "student.form=lora", "student.renoise=euler", "recipe.real_source=teacher",
         "recipe.end_to_end=true", "recipe.step1_loss=intermediate", "recipe.adv_weight=1.0",
         "recipe.final_reg_weight=0.0", "recipe.student_inputs=own", "train.d_warmup_steps=20",
         "recipe.adv_ramp_steps=50", "discriminator.r1=approx", "discriminator.r1_weight=0.1"]
FULL = "full recipe"
DEFAULTS = "defaults"
LADD = "LADD"
REGRESSION = "regression only"
DMD2 = "DMD2"
DMD2_GAN = "DMD2 + GAN"

# name -> (overrides on top of PAPER, what it tests); DEFAULTS takes the config as it is
ARMS: dict[str, tuple[list[str], str]] = {
    FULL: ([], "all three components as the paper states them (with the discriminator fixes)"),
    "real_source=data": (["recipe.real_source=data"], "component 1 removed: GAN reals are dataset images"),
    "params=shared": (["student.params=shared"], "component 2 removed: one parameter set for both steps"),
    "end_to_end=false": (["recipe.end_to_end=false"], "component 3 removed: detach between steps"),
    "step1_loss=none": (["recipe.step1_loss=none"], "component 3 removed: no step-1 regulariser"),
    "step1_loss=final": (["recipe.step1_loss=final"], "step-1 variant: regress x̂1 to the teacher's final"),
    "step1_loss=adversarial": (["recipe.step1_loss=adversarial"], "step-1 variant: GAN loss on x̂1 (D sees x̂1)"),
    "renoise=fresh": (["student.renoise=fresh"], "transition with fresh noise instead of Euler"),
    "form=full": (["student.form=full"], "decoupled by full per-step copies instead of LoRA"),
    "+ final_reg": (["recipe.final_reg_weight=1.0"], "the paper's recipe plus MSE of x̂2 to the teacher's output"),
    REGRESSION: (["recipe.adv_weight=0.0", "recipe.step1_loss=none", "recipe.final_reg_weight=1.0",
                  "discriminator.r1_weight=0.0"],
                 "reference: MSE to the teacher output through both steps, no GAN"),
    LADD: (["recipe.student_inputs=teacher_renoised", "recipe.step1_loss=adversarial", "recipe.final_reg_weight=0.0",
            "recipe.end_to_end=false"],
           "reference (LADD): step k's input is the teacher's output renoised to σ_k; adversarial loss only"),
    DEFAULTS: ([], "the shipped defaults of this world's config, chosen from this bench"),
    # DMD2 (issue 21), at the same budget: the distribution matching gradient on every step's output of the student's
    # own chain (backward simulation), a fake-score LoRA trained 5x per generator step; PAPER's D-only warm-up
    # becomes the fake score's warm-up
    DMD2: (["recipe.kind=dmd2", "recipe.dmd_weight=1.0", "recipe.adv_weight=0.0", "recipe.step1_loss=none",
            "recipe.end_to_end=false", "recipe.adv_ramp_steps=0", "discriminator.r1_weight=0.0"],
           "reference (DMD2): distribution matching with a fake-score LoRA, backward simulation, no GAN"),
    # DMD2's GAN: on dataset images, at a weight scaled from DMD2's (5e-3 on SDXL's 65,536 latent values, 3e-3 on
    # ImageNet's 12,288) by the number of values per image: the DMD term's gradient per value is 1 / numel
    DMD2_GAN: (["recipe.kind=dmd2", "recipe.dmd_weight=1.0", "recipe.adv_weight=0.1", "recipe.step1_loss=none",
                "recipe.end_to_end=false", "recipe.real_source=data"],
               "reference (DMD2 + GAN): DMD2 with its GAN term on dataset images (weight 0.1)"),
    "DMD2 end-to-end": (["recipe.kind=dmd2", "recipe.dmd_weight=1.0", "recipe.adv_weight=0.0",
                         "recipe.step1_loss=none", "recipe.end_to_end=true", "recipe.adv_ramp_steps=0",
                         "discriminator.r1_weight=0.0"],
                        "DMD2 trained end to end as Turbo++ (DMD on the final output only, gradient through both "
                        "steps)"),
    "Turbo++ + DMD": (["recipe.dmd_weight=1.0"], "the paper's recipe plus DMD2's distribution matching term"),
    # the discriminator's strength and placement (issue 21): it ends near chance in every arm with teacher reals
    "D: every block": (["discriminator.blocks=[0,1,2,3]"], "heads on all 4 teacher blocks instead of blocks 1 and 3"),
    "D: wider heads": (["discriminator.hidden=128"], "heads twice as wide (128 channels)"),
    "D: lower σ_d": (["discriminator.sigma_mean=-2.0"], "σ_d logit-normal centred at -2 instead of -1 (less noise)"),
    "D: 2 updates per G": (["train.d_steps_per_g=2"], "two discriminator updates per generator update"),
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
    curve_every: int = 0  # evaluate every N generator steps (learning curves); 0 = endpoint only
    curve_samples: int = 500

    def validate(self) -> None:
        require(self.seeds >= 1, "seeds", "must be at least 1")
        require(self.steps >= 1, "steps", "must be at least 1")
        require(self.batch_size >= 1, "batch_size", "must be at least 1")
        require(self.eval_samples >= 20, "eval_samples", "must be at least 20 (two per prompt)")
        require(self.curve_samples >= 20, "curve_samples", "must be at least 20 (two per prompt)")
        require(self.curve_every >= 0, "curve_every", "must be >= 0 (0 = endpoint only)")


@dataclass
class WorldBench:
    """What ``twostep bench --world NAME`` runs by default: its config, arms and budget."""

    config: str
    arms: list[str]
    budget: BenchConfig
    quick_overrides: list[str]
    quick: BenchConfig  # --quick's budget: a few steps, and curves only where the full budget has them
    # other questions at the same budget (`--suite NAME`, their own section of docs/results.md): name -> arms
    suites: dict[str, list[str]] = dataclasses.field(default_factory=dict)


SUITE_DEFAULT = "ablations"
SUITE_TITLES = {"dmd2": "DMD2 against the paper's recipe",
                "discriminator": "The discriminator's strength and placement in the paper's recipe"}


QUICK = BenchConfig(seeds=1, steps=4, batch_size=8, eval_samples=40, curve_every=0, curve_samples=40)
QUICK_TEACHER = ["teacher.model.dim=32", "teacher.model.n_heads=2", "teacher.model.axes_dims=[4,6,6]",
                 "teacher.model.n_layers=4", "teacher.text.hidden_size=8", "teacher.train.steps=30",
                 "teacher.train.batch_size=32", "teacher.train.warmup_steps=5", "teacher_data.num_samples=64",
                 "teacher_data.shard_size=64", "teacher_data.batch_size=64", "student.lora_rank=4",
                 "discriminator.hidden=16", "teacher.eval.throughput_batch=8", "teacher.eval.throughput_repeats=1"]
# --quick shrinks PAPER's warm-ups to the 4-step budget; set after PAPER (and before the user's overrides and the
# arm's own change), or PAPER's 20 D-only updates would cost more than the 4 generator steps
QUICK_WARMUPS = ["train.d_warmup_steps=1", "recipe.adv_ramp_steps=2"]
WORLD_BENCHES = {
    # digits: the original ablation table (endpoints; 100 steps x 3 seeds)
    "digits": WorldBench("toy_demo", [a for a in ARMS if a not in (DMD2_GAN, "DMD2 end-to-end", "Turbo++ + DMD")
                                      and not a.startswith("D: ")], BenchConfig(), QUICK_TEACHER, QUICK),
    # detail: learning curves on the world where blur is measurable, 2 seeds. A detail step costs ~6x a digits step
    # on 2 CPU cores (64 image tokens, RGB), so 500 steps at batch 16 is what fits the 90-minute bar: 5x the digits
    # budget in generator steps, 2.5x in samples
    "detail": WorldBench("detail_demo",
                         [FULL, REGRESSION, "params=shared", "end_to_end=false", "real_source=data", LADD],
                         BenchConfig(seeds=2, steps=500, batch_size=16, eval_samples=1000, curve_every=50,
                                     curve_samples=500),
                         QUICK_TEACHER + ["teacher.model.axes_lens=[64,16,16]"],
                         dataclasses.replace(QUICK, curve_every=2),
                         # DMD2 against the paper's recipe (issue 21): the detail block's budget and seeds
                         suites={"dmd2": [FULL, DMD2, DMD2_GAN],
                                 "discriminator": [FULL, "D: every block", "D: wider heads", "D: lower σ_d",
                                                   "D: 2 updates per G"]}),
}
CURVE_METRICS = ["gap_closure", "high_band_ratio", "d_accuracy", "d_logit_gap", "fake_score_loss",
                 "dmd_real_fake_gap"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan")
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else 0.0)


def _curves(log_path: str, refs: dict[str, dict[str, float]] | None) -> dict[str, list[tuple[int, float]]]:
    """Learning curves of one run from its train log: gap closure and high-band ratio of the periodic evaluations
    (recomputed from their raw FD and high-band power against ``refs``, the clean teacher's 8-step and naive
    rows on the same noise, so every arm is measured against one reference) and the discriminator's health."""
    curves: dict[str, list[tuple[int, float]]] = {m: [] for m in CURVE_METRICS}
    for record in read_jsonl_file(log_path, what="training log"):
        if refs and "eval/fd_real" in record:
            curves["gap_closure"].append((record["step"], gap_closure(record["eval/fd_real"], refs)))
            if "eval/high_band" in record:
                high_teacher = next(iter(refs.values()))["high_band"]
                curves["high_band_ratio"].append((record["step"], record["eval/high_band"] / high_teacher))
        if "d_accuracy" in record:
            curves["d_accuracy"].append((record["step"], record["d_accuracy"]))
            curves["d_logit_gap"].append((record["step"], record["d_real_logit"] - record["d_fake_logit"]))
        if "fake_score_total" in record:  # the fake score's health: its flow-matching loss, and how far it is
            curves["fake_score_loss"].append((record["step"], record["fake_score_total"]))  # from the teacher
            curves["dmd_real_fake_gap"].append((record["step"], record["dmd_real_fake_gap"]))
    return {m: c for m, c in curves.items() if c}


def _add_curves(record: dict, run_dir: str, refs: dict | None, steps: int) -> None:
    curves = _curves(os.path.join(run_dir, "train_log.jsonl"), refs)
    for metric in ("d_accuracy", "d_logit_gap"):  # health over the last fifth of training
        tail = [v for step, v in curves.get(metric, []) if step > 0.8 * steps]
        record[f"final_{metric}"] = statistics.fmean(tail) if tail else float("nan")
    record["curves"] = curves


def run_bench(out: str, config_path: str | None, overrides=(), quick: bool = False, seeds: int | None = None,
              arms: list[str] | None = None, teacher_dir: str | None = None, steps: int | None = None,
              batch_size: int | None = None, world: str = "digits", workers: int = 1,
              suite: str = SUITE_DEFAULT) -> dict:
    if world not in WORLD_BENCHES:
        raise TwostepError(f"unknown world {world!r} for the bench; known: {', '.join(WORLD_BENCHES)}")
    spec = WORLD_BENCHES[world]
    if suite != SUITE_DEFAULT and suite not in spec.suites:
        raise TwostepError(f"unknown bench suite {suite!r} for the {world} world; known: "
                           f"{', '.join([SUITE_DEFAULT, *spec.suites])}")
    base = spec.quick if quick else spec.budget
    bc = BenchConfig(seeds=seeds or base.seeds, steps=steps or base.steps, batch_size=batch_size or base.batch_size,
                     eval_samples=base.eval_samples, curve_every=base.curve_every, curve_samples=base.curve_samples)
    base_overrides = spec.quick_overrides if quick else []
    cfg = load_config(DistillConfig, config_path, base_overrides + list(overrides))
    if cfg.teacher.world != world:
        raise TwostepError(f"--world {world}: the config's teacher is of world {cfg.teacher.world!r}; pass "
                           f"--config {spec.config}")
    unknown = [a for a in (arms or []) if a not in ARMS]
    if unknown:
        raise TwostepError(f"unknown bench arm {unknown[0]!r}; known: {', '.join(ARMS)}")
    ensure_writable_dir(out, what="bench folder")
    bench_started = time.perf_counter()
    arm_names = arms or (spec.suites[suite] if suite != SUITE_DEFAULT else spec.arms)

    if teacher_dir is None and not quick:
        teacher_dir = matching_shipped_teacher(to_dict(cfg.teacher))[0]
    teacher_dir = teacher_dir or os.path.join(out, "teacher")
    if not os.path.isfile(os.path.join(teacher_dir, "teacher.safetensors")):
        train_teacher(cfg.teacher, teacher_dir, restart=True)  # this folder is ours: an unfinished run starts over
    data_dir = os.path.join(out, "teacher_data")
    make_teacher_data(teacher_dir, cfg, data_dir)
    clean_teacher = load_teacher(teacher_dir)
    evaluator = build_evaluator(clean_teacher)
    reference_images = teacher_references(clean_teacher, bc.eval_samples, cfg.student.num_steps)

    budget = [f"train.steps={bc.steps}", f"train.batch_size={bc.batch_size}", f"train.eval_every={bc.curve_every}",
              f"train.sample_every={10 ** 9}", f"train.checkpoint_every={10 ** 9}"]
    common = (QUICK_WARMUPS if quick else []) + list(overrides)
    jobs = [(name, seed, base_overrides + arm_overrides(name, common) + budget + [f"train.seed={seed}"],
             os.path.join(out, "arms", _slug(name), f"seed{seed}")) for name in arm_names for seed in range(bc.seeds)]
    context = {"config_path": config_path, "teacher_dir": teacher_dir, "data_dir": data_dir, "bc": to_dict(bc)}
    results: dict[tuple[str, int], dict] = {}
    bar = progress(total=len(jobs), desc="bench runs")
    if workers <= 1:
        _WORKER.update(evaluator=evaluator, references=reference_images)
        for job in jobs:
            results[job[:2]] = _run_job(job, context)
            bar.update(1)
    else:  # independent runs in parallel processes, one thread each (tiny models scale poorly across threads)
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init_worker, initargs=(teacher_dir, reference_images)) as pool:
            futures = {pool.submit(_run_job, job, context): job for job in jobs}
            for future in as_completed(futures):
                results[futures[future][:2]] = future.result()
                bar.update(1)
    bar.close()
    curve_refs = None
    if bc.curve_every:  # one clean reference for every run's curves (500 samples, the periodic evaluation's noise)
        labels, _, _ = eval_set(clean_teacher, bc.curve_samples)
        curve_refs = {name: evaluator.score(images, labels) for name, images in
                      teacher_references(clean_teacher, bc.curve_samples, cfg.student.num_steps).items()}
    for name, seed, _, run_dir in jobs:
        _add_curves(results[(name, seed)]["record"], run_dir, curve_refs, bc.steps)
    runs = {name: [results[(name, seed)]["record"] for seed in range(bc.seeds)] for name in arm_names}
    references = dict(results[jobs[0][:2]]["references"])
    if world == "detail":
        references.update(calibration_rows(reference_images, evaluator, cfg.teacher.sampling.steps,
                                           clean_teacher.num_classes))
    arms_info = {n: {"overrides": arm_overrides(n, overrides), "what": ARMS[n][1]} for n in arm_names}
    if suite != SUITE_DEFAULT:  # the price of each arm's step, measured one arm after the other in this process
        for name, seed, job_overrides, run_dir in jobs:
            if seed == 0:
                cost = _probe_cost(config_path, job_overrides, teacher_dir, data_dir, run_dir, quick)
                for record in runs[name]:
                    record["memory_mib"] = cost["total_mib"]
                    record["activations_mib"] = cost["activations_peak_mib"]
                    record["step_s"] = cost["step_s"]
    summary = {name: {metric: _mean_std([r[metric] for r in rs]) for metric in rs[0] if metric not in
                      ("seed", "curves")} for name, rs in runs.items()}
    report = {"world": world, "suite": suite, "bench": to_dict(bc), "quick": quick, "arms": arms_info,
              "config": config_path,
              "defaults_arm": defaults_arm(config_path, arm_names),
              "references": references, "runs": runs, "summary": summary, "machine": platform_summary(),
              "total_wall_s": time.perf_counter() - bench_started}
    reused = [r["record"]["train_wall_s"] for r in results.values() if r.get("reused")]
    if reused:  # this invocation reused finished runs: add their recorded training time, spread over the workers
        report["reused_runs"] = len(reused)
        report["invocation_wall_s"] = report["total_wall_s"]
        report["total_wall_s"] += sum(reused) / max(1, min(workers, len(jobs)))
    write_text(os.path.join(out, "results.json"), json.dumps(report, indent=2) + "\n")
    plot_gap_closure(summary, os.path.join(out, "gap_closure.png"))
    if bc.curve_every:
        plot_curves(runs, os.path.join(out, "curves.png"))
    samples_grid(out, {name: results[(name, 0)]["images"] for name in arm_names}, reference_images, clean_teacher)
    return report


_WORKER: dict = {}


def _probe_cost(config_path: str | None, overrides: list[str], teacher_dir: str, data_dir: str,
                run_dir: str, quick: bool = False) -> dict[str, float]:
    """Time and memory of one step of an arm (:func:`~twostep.offline.distill.probe_step_cost`), on one thread as
    the runs train, every arm in this process one after the other; cached beside its run (keyed by its config)."""
    import tempfile

    import torch

    from twostep.offline.distill import probe_step_cost

    cfg = load_config(DistillConfig, config_path, overrides)
    path = os.path.join(run_dir, "bench_cost.json")
    if os.path.isfile(path):
        saved = read_json_object(path, what="bench cost record", hint=f"delete {path} to measure it again")
        if saved.get("config") == to_dict(cfg):
            return saved["cost"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            cost = probe_step_cost(teacher_dir, data_dir, cfg, scratch, **({"timed_steps": 1, "metered_steps": 1}
                                                                             if quick else {}))
    finally:
        torch.set_num_threads(threads)
    write_text(path, json.dumps({"config": to_dict(cfg), "cost": cost}, indent=2) + "\n")
    return cost


def _init_worker(teacher_dir: str, reference_images: dict) -> None:
    import torch

    torch.set_num_threads(1)
    _WORKER.update(evaluator=build_evaluator(load_teacher(teacher_dir)), references=reference_images)


def _run_job(job: tuple, context: dict) -> dict:
    """Train one arm for one seed and score it; a finished run (same config) is read back instead of retrained."""
    name, seed, arm_overrides_, run_dir = job
    bc = BenchConfig(**context["bc"])
    arm_cfg = load_config(DistillConfig, context["config_path"], arm_overrides_)
    record_path = os.path.join(run_dir, "bench_record.json")
    if os.path.isfile(record_path):
        saved = read_json_object(record_path, what="bench record", hint=f"delete {run_dir} to retrain this arm")
        images_path = os.path.join(run_dir, "bench_samples.safetensors")
        if saved.get("config") == to_dict(arm_cfg) and os.path.isfile(images_path):
            from safetensors.torch import load_file

            return {**saved, "images": load_file(images_path)["images"], "reused": True}
    evaluator, reference_images = _WORKER["evaluator"], _WORKER["references"]
    started = time.perf_counter()
    train_student(context["teacher_dir"], context["data_dir"], arm_cfg, run_dir, evaluator=evaluator,
                  eval_samples=bc.curve_samples, overwrite=True)  # the bench owns its run folders
    wall = time.perf_counter() - started
    student, teacher, _ = load_student(run_dir, teacher_run=context["teacher_dir"])
    result, images = evaluate_student(student, teacher, bc.eval_samples, evaluator=evaluator, measure_speed=False,
                                      references=reference_images)
    rows = result["rows"]
    student_key = [k for k in rows if k.startswith("student_") and "step1" not in k][0]
    student_row = rows[student_key]
    record = {"seed": seed, "gap_closure": result["gap_closure"], "fd_real": student_row["fd_real"],
              "fd_teacher": student_row["fd_teacher"], "fd_step1": rows["student_step1_estimate"]["fd_real"],
              "class_accuracy": student_row["class_accuracy"], "diversity": student_row["diversity"],
              "psnr_vs_teacher": student_row["psnr_vs_teacher"], "train_wall_s": wall}
    for extra in ("high_band_ratio", "edge_width"):
        if extra in student_row:
            record[extra] = student_row[extra]
    references = {k: rows[k] for k in rows if k.startswith("teacher")}
    references["real_floor"] = result["real_floor"]
    out = {"record": record, "references": references, "config": to_dict(arm_cfg)}
    write_text(record_path, json.dumps(out, indent=2) + "\n")
    save_tensor_grid(images[student_key], os.path.join(run_dir, "bench_samples.safetensors"))
    return {**out, "images": images[student_key][:100]}


def _slug(name: str) -> str:
    return name.replace(" ", "_").replace("/", "-").replace("+", "plus")


def save_tensor_grid(images, path: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({"images": images[:100].contiguous()}, path)


def calibration_rows(reference_images: dict, evaluator, teacher_steps: int, num_classes: int) -> dict:
    """The teacher's own samples blurred by a known amount: the metrics must order these correctly."""
    import torch

    from twostep.offline.detail.data import gaussian_blur
    from twostep.offline.digits.evaluator import frechet_distance

    reference = reference_images[f"teacher_{teacher_steps}"]
    labels = torch.arange(len(reference)) % num_classes
    ref_row = evaluator.score(reference, labels)
    ref_feats = evaluator.features(reference)
    rows = {}
    for blur in (0.5, 0.7):
        blurred = gaussian_blur(reference, blur)
        row = evaluator.score(blurred, labels)
        row["fd_teacher"] = frechet_distance(evaluator.features(blurred), ref_feats)
        row["high_band_ratio"] = row["high_band"] / ref_row["high_band"]
        rows[f"teacher_{teacher_steps}_blurred_{blur}px"] = row
    return rows


def samples_grid(out: str, arm_images: dict, reference_images: dict, teacher) -> None:
    """Teacher 8-step, naive 2-step and each arm's final samples (seed 0), same noise: OUT/samples.png."""
    import torch

    from twostep.core.reports import save_image
    from twostep.demo import comparison_grid

    blocks = {name.replace("_", " "): imgs for name, imgs in reference_images.items()}
    blocks.update(arm_images)
    n = min(len(v) for v in blocks.values())
    blocks = {k: v[:n] for k, v in blocks.items()}
    labels = torch.arange(n) % teacher.num_classes
    save_image(comparison_grid(blocks, labels, per_prompt=3, class_names=teacher.world.class_names),
               os.path.join(out, "samples.png"))


def plot_curves(runs: dict[str, list[dict]], path: str) -> None:
    """One panel per metric, one line per arm (mean over seeds) with a band spanning the seeds' min..max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    titles = {"gap_closure": "gap closure (FD, 500 samples) ↑", "high_band_ratio": "high-band ratio vs teacher-8 → 1",
              "d_accuracy": "discriminator accuracy", "d_logit_gap": "D real − fake logit",
              "fake_score_loss": "fake score: flow-matching loss", "dmd_real_fake_gap": "DMD: |x̂0 fake − x̂0 real|"}
    present = [m for m in CURVE_METRICS if any(m in r["curves"] for rs in runs.values() for r in rs)]
    fig, axes = plt.subplots(1, len(present), figsize=(4.6 * len(present), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], present):
        for i, (name, rs) in enumerate(runs.items()):
            series = [r["curves"].get(metric, []) for r in rs]
            if not all(series):
                continue
            length = min(len(s) for s in series)
            steps = np.array([p[0] for p in series[0][:length]])
            values = np.array([[p[1] for p in s[:length]] for s in series])
            if metric not in ("gap_closure", "high_band_ratio") and length > 8:  # logged every few steps: smoothed
                kernel = np.ones(5) / 5
                values = np.stack([np.convolve(v, kernel, mode="valid") for v in values])
                steps = steps[2:-2]
            color = f"C{i}"
            ax.plot(steps, values.mean(0), color=color, label=name, lw=1.5)
            ax.fill_between(steps, values.min(0), values.max(0), color=color, alpha=0.2)
        ax.set_title(titles[metric], fontsize=10)
        ax.set_xlabel("generator step")
        ax.grid(alpha=0.3)
        if metric == "high_band_ratio":
            ax.axhline(1.0, color="black", lw=0.8, ls="--")
        if metric == "d_accuracy":
            ax.axhline(0.5, color="black", lw=0.8, ls="--")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


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


def compare(summary: dict, a: str, b: str, metric: str, higher_is_better: bool = True) -> tuple[str, float, float]:
    """``better`` / ``worse`` / ``tie`` for arm ``a`` against arm ``b`` on ``metric``, beyond the seeds' spread."""
    (ma, sa), (mb, sb) = summary[a][metric], summary[b][metric]
    delta = (ma - mb) if higher_is_better else (mb - ma)
    margin = max(sa, sb)
    return ("better" if delta > margin else "worse" if delta < -margin else "tie"), delta, margin


def detail_reading(summary: dict) -> list[str]:
    """The detail world's questions: does the GAN recipe beat plain regression on FD and on detail, and which
    component matters. Same rule as :func:`reading`: a difference counts only beyond the seeds' spread."""
    lines = []
    if FULL in summary and REGRESSION in summary:
        for metric, label, higher in (("gap_closure", "gap closure (FD to held-out real)", True),
                                      ("fd_teacher", "FD to the teacher's 8-step samples (lower is better)", False),
                                      ("high_band_ratio", "high-band ratio (|1 − r|, detail)", None)):
            if metric == "high_band_ratio":  # closeness to the teacher's detail: 1.0 is best, over-sharpening too
                dist = {n: ((abs(1 - v[metric][0])), v[metric][1]) for n, v in summary.items() if metric in v}
                verdict, delta, margin = compare({n: {metric: d} for n, d in dist.items()}, FULL, REGRESSION, metric,
                                                 higher_is_better=False)
            else:
                verdict, delta, margin = compare(summary, FULL, REGRESSION, metric, higher_is_better=higher)
            word = {"better": "**beats**", "worse": "**loses to**", "tie": "does **not** differ from"}[verdict]
            lines.append(f"- On {label}, the paper's recipe ({_ms(summary[FULL][metric])}) {word} regression only "
                         f"({_ms(summary[REGRESSION][metric])}); difference {delta:+.3f}, spread ±{margin:.3f}.")
    for name in [n for n in summary if n not in (FULL, REGRESSION)]:
        if FULL not in summary:
            break
        verdict, delta, margin = compare(summary, name, FULL, "gap_closure")
        word = {"better": "higher than", "worse": "lower than", "tie": "within the spread of"}[verdict]
        t_verdict, t_delta, _ = compare(summary, name, FULL, "fd_teacher", higher_is_better=False)
        t_word = {"better": "closer to", "worse": "further from", "tie": "as close to"}[t_verdict]
        lines.append(f"- `{name}` ({ARMS[name][1]}): gap closure {_ms(summary[name]['gap_closure'])}, {word} the "
                     f"paper's recipe ({delta:+.3f}); FD to the teacher {_ms(summary[name]['fd_teacher'])}, {t_word} "
                     f"the teacher than the paper's recipe; high-band ratio {_ms(summary[name]['high_band_ratio'])}.")
    lines += discriminator_health({n: v for n, v in summary.items() if n != REGRESSION})
    ranked = sorted(((v["gap_closure"][0], n) for n, v in summary.items() if math.isfinite(v["gap_closure"][0])),
                    reverse=True)
    if ranked:
        lines.append(f"- Highest mean gap closure: `{ranked[0][1]}` ({_ms(summary[ranked[0][1]]['gap_closure'])}).")
    return lines


def defaults_arm(config_path: str | None, arm_names: list[str]) -> str | None:
    """The arm whose recipe the config's defaults are (student, discriminator, recipe and D schedule equal)."""
    def recipe_of(cfg) -> dict:
        d = to_dict(cfg)
        return {"student": d["student"], "discriminator": d["discriminator"], "recipe": d["recipe"],
                "d_warmup_steps": d["train"]["d_warmup_steps"]}

    shipped = recipe_of(load_config(DistillConfig, config_path))
    for name in arm_names:
        if name != DEFAULTS and recipe_of(load_config(DistillConfig, config_path, arm_overrides(name))) == shipped:
            return name
    return None


def _num(value, p: int = 3) -> str:
    """A table cell: the value, or a dash when there is none."""
    return "–" if value is None or not math.isfinite(value) else f"{value:.{p}f}"


def _ms(ms, p: int = 3) -> str:
    return f"{ms[0]:.{p}f} ± {ms[1]:.{p}f}"


# A table column: (header, summary key, kind, decimals). Kinds: "seeds", the mean ± spread over seeds (a reference
# row shows its own value); "once", one measurement per arm (references: none).
GAP_COLUMNS = [("gap closure ↑", "gap_closure", "seeds", 3), ("FD real ↓", "fd_real", "seeds", 3),
               ("FD to teacher ↓", "fd_teacher", "seeds", 3)]
DETAIL_QUALITY = [("high-band ratio (→ 1)", "high_band_ratio", "seeds", 3), ("edge width px ↓", "edge_width", "seeds", 2)]
TRAIN_SECONDS = ("train s", "train_wall_s", "once", 0)
DIGITS_COLUMNS = [*GAP_COLUMNS, ("FD of x̂1 ↓", "fd_step1", "seeds", 3), ("class acc ↑", "class_accuracy", "seeds", 3),
                  ("diversity", "diversity", "seeds", 3), ("PSNR vs teacher", "psnr_vs_teacher", "seeds", 2),
                  TRAIN_SECONDS]
DETAIL_COLUMNS = [*GAP_COLUMNS, *DETAIL_QUALITY, ("class acc ↑", "class_accuracy", "seeds", 3),
                  ("PSNR vs teacher", "psnr_vs_teacher", "seeds", 2), ("D acc (end)", "final_d_accuracy", "once", 2),
                  ("D logit gap (end)", "final_d_logit_gap", "once", 2), TRAIN_SECONDS]
SUITE_COLUMNS = [*GAP_COLUMNS, *DETAIL_QUALITY, ("PSNR vs teacher", "psnr_vs_teacher", "seeds", 2),
                 ("D acc (end)", "final_d_accuracy", "once", 2), ("s / step ↓", "step_s", "once", 3),
                 ("memory MiB ↓", "memory_mib", "once", 1), ("of it activations", "activations_mib", "once", 1),
                 TRAIN_SECONDS]


def results_table(columns: list, references: dict[str, dict], summary: dict[str, dict]) -> list[str]:
    """A markdown table: one row per reference (its measured values; ``–`` where it has none), then one per arm."""
    lines = ["| arm | " + " | ".join(c[0] for c in columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, row in references.items():
        cells = [_num(row.get(key), p) if kind == "seeds" else "–" for _, key, kind, p in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, arm in summary.items():
        cells = [_ms(arm[key], p) if kind == "seeds" else _num(arm.get(key, (float("nan"),))[0], p)
                 for _, key, kind, p in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _reference_rows(refs: dict, keep) -> dict[str, dict]:
    return {name.replace("_", " "): row for name, row in refs.items() if keep(name)}


def bench_section(report: dict, command: str, images: dict[str, str]) -> str:
    if report.get("suite", SUITE_DEFAULT) != SUITE_DEFAULT:
        return suite_section(report, command, images)
    refs, world = report["references"], report.get("world", "digits")
    detail = world == "detail"
    minutes, bar_min = report["total_wall_s"] / 60, (90 if detail else 60)
    lines = [
        f"### Ablations on the {world} world (`twostep bench{' --world detail' if detail else ''}`)", "",
        f"Written by `{command}`; machine: {report['machine']}. Budget per arm: {report['bench']['steps']} "
        f"generator steps at batch {report['bench']['batch_size']}, {report['bench']['seeds']} seed(s), "
        f"{report['bench']['eval_samples']} evaluation samples (same noise and prompts for every arm)"
        + (f"; learning curves every {report['bench']['curve_every']} steps on {report['bench']['curve_samples']} "
           "samples" if report["bench"].get("curve_every") else "")
        + f". Whole bench: {minutes:.1f} min"
        + (f" (estimated: this invocation took {report['invocation_wall_s'] / 60:.1f} min and reused {report['reused_runs']} "
           f"finished runs of an earlier one, whose recorded training time is added per worker)"
           if report.get("reused_runs") else "")
        + ("" if report["quick"] else f" (bar: ≤ {bar_min} min — {'**met**' if minutes <= bar_min else '**NOT met**'})")
        + ".", "",
    ]
    if detail:
        references = _reference_rows(refs, lambda name: name != "real_floor")
        if "real_floor" in refs:
            references["real images (floor)"] = refs["real_floor"]
        lines += results_table(DETAIL_COLUMNS, references, report["summary"])
        lines += ["", "Same noise and prompts in every block (rows: classes; teacher 8 steps, naive 2 steps, each arm's "
                  "seed 0):", "", f"![samples per arm]({images['samples']})", "",
                  "Learning curves (mean over seeds; band: min..max) and the discriminator's health:", "",
                  f"![learning curves]({images['curves']})", "", "Reading (generated from the numbers above):", "",
                  *detail_reading(report["summary"])]
        chosen = report.get("defaults_arm")
        lines.append(f"- The shipped detail config (`{report.get('config')}`) is the arm `{chosen}`." if chosen else
                     f"- The shipped detail config (`{report.get('config')}`) matches none of these arms.")
        return "\n".join(lines)
    lines += results_table(DIGITS_COLUMNS, _reference_rows(refs, lambda name: name != "real_floor"), report["summary"])
    lines += ["", f"![gap closure per arm]({images['gap_closure']})", "", "Reading (generated from the numbers above):",
              "", *reading(report["summary"])]
    return "\n".join(lines)


def bench_images(out: str, world: str = "digits", suite: str = SUITE_DEFAULT) -> dict[str, str]:
    """The pictures a world's bench section shows, in its output folder, by kind."""
    kinds = ("curves", "samples") if world == "detail" or suite != SUITE_DEFAULT else ("gap_closure",)
    return {kind: os.path.join(out, f"{kind}.png") for kind in kinds}


def section_name(world: str, suite: str = SUITE_DEFAULT) -> str:
    """The marker of a bench's block in docs/results.md: ``bench``, ``bench-detail``, ``bench-detail-dmd2``."""
    name = "bench" if world == "digits" else f"bench-{world}"
    return name if suite == SUITE_DEFAULT else f"{name}-{suite}"


def write_bench_section(path: str, report: dict, command: str, out: str) -> None:
    """Rewrite this bench's block of ``path``; its pictures are copied next to it (``img/``)."""
    import shutil

    world, suite = report.get("world", "digits"), report.get("suite", SUITE_DEFAULT)
    image_dir = os.path.join(os.path.dirname(os.path.abspath(path)), "img")
    os.makedirs(image_dir, exist_ok=True)
    prefix = section_name(world, suite).replace("-", "_")
    rel = {}
    for kind, src in bench_images(out, world, suite).items():
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(image_dir, f"{prefix}_{kind}.png"))
            rel[kind] = f"img/{prefix}_{kind}.png"
    update_section(path, section_name(world, suite), bench_section(report, command, rel))


# the measures of the DMD2 comparison: (summary key, label, direction): True = higher is better, False = lower,
# "one" = closest to 1 (the teacher's detail)
DMD2_MEASURES = [("gap_closure", "gap closure (FD to held-out real)", True),
                 ("fd_teacher", "FD to the teacher's 8-step samples", False),
                 ("high_band_ratio", "high-band ratio (detail; 1 = the teacher's)", "one"),
                 ("edge_width", "edge width (px)", False),
                 ("psnr_vs_teacher", "PSNR to the teacher, same noise", True),
                 ("step_s", "time per generator step", False),
                 ("memory_mib", "training memory per step", False)]


def _versus(summary: dict, a: str, b: str, metric: str, direction) -> tuple[str, float, float]:
    """:func:`compare` for ``a`` against ``b``; ``direction == "one"`` compares the distance to 1."""
    if direction == "one":
        dist = {n: {metric: (abs(1 - summary[n][metric][0]), summary[n][metric][1])} for n in (a, b)}
        return compare(dist, a, b, metric, higher_is_better=False)
    return compare(summary, a, b, metric, higher_is_better=direction)


def suite_reading(summary: dict) -> list[str]:
    """Metric by metric: where the paper's recipe beats each other arm, where it loses, and whether the difference
    exceeds the seeds' spread (time and memory: beyond 5 %, they are one measurement per arm)."""
    lines = []
    if FULL not in summary:
        return [f"- The paper's recipe (`{FULL}`) was not among the arms run; nothing to compare against."]
    fidelity = {"fd_teacher", "high_band_ratio"}
    for rival in [n for n in summary if n != FULL]:
        wins, losses, ties = [], [], []
        for metric, label, direction in DMD2_MEASURES:
            if metric not in summary[FULL] or metric not in summary[rival]:
                continue
            if not (math.isfinite(summary[FULL][metric][0]) and math.isfinite(summary[rival][metric][0])):
                continue
            verdict, delta, margin = _versus(summary, FULL, rival, metric, direction)
            if metric in ("step_s", "memory_mib"):  # one measurement per arm: no ±, under 5 % is a tie
                scale = abs(summary[rival][metric][0]) or 1.0
                verdict = "tie" if abs(delta) <= 0.05 * scale else verdict
                text = f"{label}: {_num(summary[FULL][metric][0])} vs {_num(summary[rival][metric][0])}"
            else:
                text = (f"{label}: {_ms(summary[FULL][metric])} vs {_ms(summary[rival][metric])} "
                        f"(spread ±{margin:.3f})")
            {"better": wins, "worse": losses, "tie": ties}[verdict].append(text)
        lines.append(f"- **`{FULL}` vs `{rival}`** ({ARMS[rival][1]}):")
        lines.append("  - the paper's recipe wins on " + ("; ".join(wins) if wins else "nothing") + ".")
        lines.append("  - it loses on " + ("; ".join(losses) if losses else "nothing") + ".")
        lines.append("  - within the spread: " + ("; ".join(ties) if ties else "nothing") + ".")
        ahead = [label for m, label, d in DMD2_MEASURES if m in fidelity and m in summary[rival]
                 and _versus(summary, FULL, rival, m, d)[0] == "worse"]
        behind = [label for m, label, d in DMD2_MEASURES if m in fidelity and m in summary[rival]
                  and _versus(summary, FULL, rival, m, d)[0] == "better"]
        lines.append(f"  - on the measures that decide a distillation (FD to the teacher, high-band ratio): `{rival}` "
                     f"is ahead of the paper's recipe beyond the spread on {len(ahead)} of 2"
                     + (f" ({'; '.join(ahead)})" if ahead else "") + f", behind on {len(behind)} of 2"
                     + (f" ({'; '.join(behind)})" if behind else "") + ".")
    return lines


def suite_section(report: dict, command: str, images: dict[str, str]) -> str:
    """A suite's block (DMD2, the discriminator): every detail column, the price of a step in time and memory, and
    the paper's recipe against each other arm, metric by metric."""
    refs, bench, suite = report["references"], report["bench"], report["suite"]
    minutes = report["total_wall_s"] / 60
    lines = [
        f"### {SUITE_TITLES.get(suite, suite)} on the {report.get('world', 'detail')} world", "",
        f"Written by `{command}`; machine: {report['machine']}. Budget per arm: {bench['steps']} generator steps at "
        f"batch {bench['batch_size']}, {bench['seeds']} seed(s), {bench['eval_samples']} evaluation samples (same "
        "noise and prompts for every arm)"
        + (f"; learning curves every {bench['curve_every']} steps on {bench['curve_samples']} samples"
           if bench.get("curve_every") else "")
        + f". Whole bench: {minutes:.1f} min"
        + (f" (this invocation took {report['invocation_wall_s'] / 60:.1f} min and reused {report['reused_runs']} "
           "finished runs, whose recorded training time is added per worker)" if report.get("reused_runs") else "")
        + ". The price of a step is measured after training, every arm in one process one after the other on one "
          "thread: s / step is the median of 5 generator steps with their critic updates (discriminator, fake "
          "score); memory is the weights, gradients, optimiser and EMA state plus the peak of the activations "
          "autograd saves over two steps (`engine/memory.py`; on a GPU the allocator's peak measures the same). "
          "`train s` is each run's wall time, two runs at a time on a shared machine: read it as a rough total.", "",
        *results_table(SUITE_COLUMNS, _reference_rows(refs, lambda n: n != "real_floor" and "blurred" not in n),
                       report["summary"])]
    lines += ["", "Same noise and prompts in every block (rows: classes; teacher 8 steps, naive 2 steps, each arm's "
              "seed 0):", "", f"![samples per arm]({images.get('samples', '')})", "",
              "Learning curves (mean over seeds; band: min..max), the discriminator's and the fake score's health:",
              "", f"![learning curves]({images.get('curves', '')})", "", "Reading (generated from the numbers above; a "
              "quality difference counts only beyond the seeds' spread"
              + ("; with one seed there is no spread, so read every difference as indicative only" if bench["seeds"] < 2
                 else "") + "):", "", *suite_reading(report["summary"])]
    return "\n".join(lines + discriminator_health(report["summary"]))


def discriminator_health(summary: dict) -> list[str]:
    """The discriminator's accuracy at the end of each arm that has one, stated as a measurement and not a verdict:
    a stronger critic is a means, and whether it helped is what the quality measures above say."""
    health = [f"`{n}` {v['final_d_accuracy'][0]:.2f}" for n, v in summary.items()
              if math.isfinite(v.get("final_d_accuracy", (float("nan"),))[0])]
    return (["- Discriminator accuracy over the last fifth of training (0.5 = chance): " + ", ".join(health) + "."]
            if health else [])
