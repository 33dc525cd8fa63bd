"""``twostep bench``: the paper's ablations on an offline world, at one equal training budget per arm.

Every arm (``offline/bench/arms.py``) runs for ``seeds`` seeds and is scored on the same noises and prompts as the
teacher references; runs go one per worker process, and a finished run (same config) is read back, not retrained.
Output: ``OUT/results.json``, the pictures (``offline/bench/figures.py``) and, with ``--results``, a regenerated
block of ``docs/results.md`` (``offline/bench/report.py``) with a generated reading of which claims reproduce (a
difference counts only when it exceeds the spread over seeds; ``offline/bench/reading.py``).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time

from twostep.core.config import load_config, same_config, to_dict
from twostep.core.errors import TwostepError
from twostep.core.utils import (
    ensure_writable_dir,
    platform_summary,
    progress,
    read_json_object,
    read_jsonl_file,
    write_text,
)
from twostep.offline.bench.arms import (
    ARMS,
    CURVE_METRICS,
    QUICK_WARMUPS,
    SUITE_DEFAULT,
    WORLD_BENCHES,
    BenchConfig,
    arm_overrides,
    defaults_arm,
)
from twostep.offline.bench.figures import plot_curves, plot_gap_closure, samples_grid
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


# a finished run is read back when its config is this one; keys added to twostep since, at their defaults, count
# as the same (they default to the behaviour before them)
DEFAULT_CONFIG = to_dict(DistillConfig())


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
        if same_config(saved.get("config") or {}, to_dict(cfg), DEFAULT_CONFIG):
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
        if same_config(saved.get("config") or {}, to_dict(arm_cfg), DEFAULT_CONFIG) and os.path.isfile(images_path):
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
