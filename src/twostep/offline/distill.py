"""Wires the offline world into the engine: teacher data, student training, loading, evaluation.

The engine (``student``, ``discriminator``, ``recipe``, ``train``) knows nothing of digits; this module
supplies the teacher run, the cached prompt table, the real images for ``real_source: data`` and the metrics.
"""

from __future__ import annotations

import dataclasses

import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file

from twostep.core.config import load_config, require
from twostep.core.errors import TwostepError
from twostep.core.reports import image_grid, save_image
from twostep.core.utils import file_sha256, is_main_process, read_json_object
from twostep.engine.discriminator import Discriminator, DiscriminatorConfig
from twostep.engine.distributed import barrier, init_process_group
from twostep.engine.recipe import RecipeConfig
from twostep.engine.run_folder import check_run_dir, discard_replaced, start_run, write_meta
from twostep.engine.student import Student, StudentConfig, merge_student
from twostep.engine.teacher_data import (
    OnlineTeacherData,
    TeacherData,
    TeacherDataConfig,
    TeacherSource,
    cache_provenance,
    generate_teacher_data,
    warn_small_cache,
)
from twostep.engine.train import Trainer, resume_trainer, save_student_weights
from twostep.engine.train_config import DistillTrainConfig
from twostep.offline.digits.evaluator import frechet_distance
from twostep.offline.evaluate import build_evaluator, eval_set, measure_throughput
from twostep.offline.sampling import generate, make_noise
from twostep.offline.teacher import Teacher, TeacherConfig, load_teacher
from twostep.offline.worlds import Evaluator

STUDENT_WEIGHTS = "student.safetensors"


@dataclass
class DistillConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)  # the teacher run's recipe (demo trains it)
    teacher_data: TeacherDataConfig = field(default_factory=TeacherDataConfig)
    # measured on the offline world (`twostep bench`, docs/results.md): one shared parameter set, x̂1 regressed to the
    # teacher's final, plus MSE of x̂2 to it beat the paper's settings there. The classes keep the paper's recipe.
    student: StudentConfig = field(default_factory=lambda: StudentConfig(params="shared"))
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    recipe: RecipeConfig = field(default_factory=lambda: RecipeConfig(step1_loss="final", final_reg_weight=1.0))
    train: DistillTrainConfig = field(default_factory=DistillTrainConfig)

    def validate(self) -> None:
        require(list(self.student.sigmas) == list(self.teacher_data.student_sigmas), "student.sigmas",
                "must equal teacher_data.student_sigmas (the cache holds the teacher states there)")


def teacher_source(teacher: Teacher) -> TeacherSource:
    table = teacher.prompt_table
    return TeacherSource(
        velocity=lambda x, s, p: teacher.backbone.velocity(x, s, table[p]),
        teacher_id=f"toy:{os.path.basename(os.path.normpath(teacher.run_dir))}",  # identity is the hash
        weights_sha256=file_sha256(os.path.join(teacher.run_dir, "teacher.safetensors")),
        sample_shape=teacher.image_shape, num_prompts=len(teacher.prompts))


def make_teacher_data(teacher_run: str, cfg: DistillConfig, out_dir: str) -> dict:
    teacher = load_teacher(teacher_run)
    return generate_teacher_data(cfg.teacher_data, teacher_source(teacher), out_dir)


def load_teacher_data(teacher: Teacher, cfg: DistillConfig, data_dir: str) -> TeacherData:
    """The cache, checked to come from this teacher and this schedule before anything is trained."""
    expected = cache_provenance(cfg.teacher_data, teacher_source(teacher))
    return TeacherData(data_dir, expected=expected)


def online_teacher_data(student: Student, teacher: Teacher, cfg: DistillConfig) -> OnlineTeacherData:
    """``teacher_data.mode: online``: trajectories from the student's frozen base with its adapters off (the
    teacher's weights; no second copy in memory)."""
    return OnlineTeacherData.from_student(cfg.teacher_data, student, teacher_source(teacher),
                                          cond=lambda prompt_index: teacher.prompt_table[prompt_index])


def build_student(teacher_run: str, cfg: DistillConfig, for_training: bool = False
                  ) -> tuple[Student, Discriminator, Teacher]:
    """A fresh student on its own copy of the teacher's weights, plus the discriminator heads (``for_training``:
    with the fake-score network that distribution matching trains)."""
    base = load_teacher(teacher_run)  # the student owns (and, for LoRA, wraps) this copy
    student = Student(base.backbone, cfg.student, fake_score=for_training and cfg.recipe.uses_dmd)
    blocks = cfg.discriminator.blocks
    if max(blocks) >= base.backbone.num_blocks:
        raise TwostepError(f"config key 'discriminator.blocks' {blocks}: the teacher has only "
                           f"{base.backbone.num_blocks} blocks")
    torch.manual_seed(cfg.train.seed)
    disc = Discriminator(base.backbone.transformer.config.dim, base.prompt_table.embeds.shape[-1], cfg.discriminator)
    return student, disc, base


def grid_writer(teacher: Teacher, per_prompt: int = 6, seed: int = 0):
    labels = torch.arange(teacher.num_classes).repeat_interleave(per_prompt)
    noise = make_noise(len(labels), teacher.image_shape, seed)
    cond = teacher.cond(labels)

    def write(student: Student, path: str) -> None:
        images = student.sample(noise, cond)["final"]
        if is_main_process():  # FSDP2: every rank samples (the forward is a collective); rank 0 writes
            save_image(image_grid(images, ncols=per_prompt, row_labels=teacher.world.class_names), path)

    return write


def gap_closure(fd: float, refs: dict[str, dict[str, float]]) -> float:
    """(FD_naive - FD) / (FD_naive - FD_teacher) with ``refs`` = :func:`teacher_references`' rows, scored."""
    fd_teacher, fd_naive = (row["fd_real"] for row in refs.values())
    return (fd_naive - fd) / (fd_naive - fd_teacher) if fd_naive != fd_teacher else float("nan")


def quick_eval(teacher: Teacher, num_samples: int = 500, evaluator: Evaluator | None = None):
    """Periodic metrics during training (EMA weights) on a fixed noise set: FD to held-out real, class accuracy,
    diversity, world-specific metrics, and gap closure (plus high-band ratio where measured) against the teacher's
    8-step and naive K-step samples of the same noise."""
    evaluator = evaluator or build_evaluator(teacher)
    labels, noise, cond = eval_set(teacher, num_samples)
    refs: dict[str, dict[str, float]] = {}

    def run(student: Student) -> dict[str, float]:
        if not refs:  # the clean teacher: `teacher.backbone` carries the student's LoRA layers here
            with student.teacher() as clean:
                images = teacher_references(teacher, num_samples, student.cfg.num_steps, backbone=clean)
            refs.update({name: evaluator.score(imgs, labels) for name, imgs in images.items()})
        row = evaluator.score(student.sample(noise, cond)["final"], labels)
        row["gap_closure"] = gap_closure(row["fd_real"], refs)
        if "high_band" in row:
            row["high_band_ratio"] = row["high_band"] / next(iter(refs.values()))["high_band"]
        return row

    run.references = refs  # filled at the first call: {"teacher_8": row, "teacher_naive_2": row}
    return run


def real_image_sampler(teacher: Teacher):
    """``real_source: data``: a real training image of the same class for every prompt in the batch."""
    return teacher.world.sample_real


def train_student(teacher_run: str, data_dir: str, cfg: DistillConfig, out_dir: str,
                  resume: str | None = None, evaluator: Evaluator | None = None, eval_samples: int = 500,
                  allow_config_change: bool = False, overwrite: bool = False) -> dict:
    """Distil the toy teacher into ``cfg.student`` in ``out_dir``; returns the run's meta. Every check (resume,
    teacher, data, output folder) runs before anything is written."""
    init_process_group()  # torchrun: every rank checks before any rank writes (barrier below)
    checkpoint = check_run_dir(cfg, out_dir, resume, allow_config_change, overwrite, protected=(teacher_run, data_dir))
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    student, disc, base = build_student(teacher_run, cfg, for_training=True)
    online = cfg.teacher_data.mode == "online"
    data = online_teacher_data(student, base, cfg) if online else load_teacher_data(base, cfg, data_dir)
    warn_small_cache(len(data), cfg.train.batch_size)  # no minimum: the toy worlds' caches are small on purpose
    barrier()
    start_run(cfg, out_dir, overwrite)
    inputs = {"teacher_run": os.path.abspath(teacher_run),
              "teacher_data": "online" if online else os.path.abspath(data_dir)}
    write_meta(out_dir, {"kind": "toy-student", "status": "training", **inputs})  # `--resume` reads them back
    trainer = Trainer(cfg, student, disc, data, base.prompt_table, real_image_sampler(base), out_dir,
                      sample_fn=grid_writer(base),
                      eval_fn=quick_eval(base, eval_samples, evaluator) if cfg.train.eval_every else None)
    resume_trainer(trainer, checkpoint)
    trainer.fit()
    state = save_student_weights(trainer, os.path.join(out_dir, STUDENT_WEIGHTS))
    discard_replaced(out_dir)
    meta = {"kind": "toy-student", "status": "finished", "steps": trainer.step,
            "train_wall_s": round(trainer.elapsed, 1), **inputs,
            "trainable_parameters": sum(v.numel() for v in state.values()), "torch_threads": torch.get_num_threads()}
    write_meta(out_dir, meta)
    return meta


def probe_step_cost(teacher_run: str, data_dir: str, cfg: DistillConfig, scratch_dir: str, timed_steps: int = 5,
                    metered_steps: int = 2) -> dict[str, float]:
    """The price of one generator step of ``cfg`` with its critic updates (no warm-up, no evaluation), measured in
    this process: ``step_s``, the median wall time of ``timed_steps`` steps after one untimed step, and the training
    memory in MiB over ``metered_steps`` more: the persistent state (weights, gradients, optimisers, EMA) and the
    peak of the activations autograd saves (:mod:`twostep.engine.memory`; metered apart, the hooks cost time).
    ``scratch_dir`` is the trainer's folder (nothing is saved there)."""
    import statistics
    import time

    from twostep.engine.memory import SavedActivationMeter, training_state_bytes

    if cfg.train.gradient_checkpointing:  # the recomputed activations are saved by checkpoint's hooks, not ours
        raise TwostepError("train.gradient_checkpointing=true: the step's price meters the activations autograd "
                           "saves, which checkpointing hides from it; measure with train.gradient_checkpointing=false")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, d_warmup_steps=0, eval_every=0))
    student, disc, base = build_student(teacher_run, cfg, for_training=True)
    trainer = Trainer(cfg, student, disc, load_teacher_data(base, cfg, data_dir), base.prompt_table,
                      real_image_sampler(base), scratch_dir)
    trainer.train_step()  # first-call costs (allocations, lazy imports) stay out of the timing
    times = []
    for _ in range(timed_steps):
        started = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - started)
    with SavedActivationMeter(exclude=[*student.parameters(), *disc.parameters()]) as meter:
        for _ in range(metered_steps):
            trainer.train_step()
    state = training_state_bytes([student, disc], [trainer.opt_g, trainer.opt_d, trainer.opt_f],
                                 [t for group in trainer.ema.shadow.values() for t in group])
    cost = {f"state_{k}_mib": v / 2 ** 20 for k, v in state.items()}
    cost["activations_peak_mib"] = meter.peak / 2 ** 20
    cost["total_mib"] = sum(state.values()) / 2 ** 20 + cost["activations_peak_mib"]
    cost["step_s"] = statistics.median(times)
    return cost


def load_student(run_dir: str, teacher_run: str | None = None) -> tuple[Student, Teacher, DistillConfig]:
    """A trained student (EMA weights) from its run folder."""
    weights = os.path.join(run_dir, STUDENT_WEIGHTS)
    if not os.path.isfile(weights):
        raise TwostepError(f"{run_dir} holds no trained student ({STUDENT_WEIGHTS} missing); run `twostep train`")
    cfg = load_config(DistillConfig, os.path.join(run_dir, "config.yaml"))
    if teacher_run is None:
        meta_path = os.path.join(run_dir, "meta.json")
        if not os.path.isfile(meta_path):
            raise TwostepError(f"{run_dir} has no meta.json (the run did not finish); rerun `twostep train`")
        teacher_run = read_json_object(meta_path, what="run record").get("teacher_run")
        if not isinstance(teacher_run, str):
            raise TwostepError(f"{meta_path}: run record lacks 'teacher_run'; give the teacher run explicitly")
    student, _, _ = build_student(teacher_run, cfg)
    state = load_file(weights)
    own = dict(student.named_parameters())
    for name, value in state.items():
        if name not in own or own[name].shape != value.shape:
            raise TwostepError(f"{weights} does not fit the student its config builds ('{name}'); use the run's "
                               "own config")
        with torch.no_grad():
            own[name].copy_(value)
    student.eval()
    # a separate, untouched teacher: the student's base carries its LoRA layers and must not stand in for it
    return student, load_teacher(teacher_run), cfg


# --------------------------------------------------------------------------- evaluation


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean per-image PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    mse = (a.clamp(-1, 1) - b.clamp(-1, 1)).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(4.0 / mse)).mean())


def teacher_references(teacher: Teacher, num_samples: int, student_steps: int,
                       backbone=None) -> dict[str, torch.Tensor]:
    """The teacher at its own step count and naively at the student's, on the evaluation noise and prompts.

    ``backbone``: the network to sample (default ``teacher.backbone``; a student's clean teacher view otherwise).
    """
    ec = teacher.config.eval
    backbone = backbone or teacher.backbone
    _, noise, cond = eval_set(teacher, num_samples)
    shift, steps = teacher.config.sampling.shift, teacher.config.sampling.steps
    return {f"teacher_{steps}": generate(backbone, noise, cond, steps, shift, ec.batch_size),
            f"teacher_naive_{student_steps}": generate(backbone, noise, cond, student_steps, shift, ec.batch_size)}


def evaluate_student(student: Student, teacher: Teacher, num_samples: int, evaluator: Evaluator | None = None,
                     measure_speed: bool = True, references: dict | None = None) -> tuple[dict, dict]:
    """Teacher 8-step, teacher naive 2-step, student 2-step and its step-1 estimate, on the same noise.

    ``teacher`` must be a clean teacher (not the student's LoRA-carrying base). Speed is measured on the
    deployable form (:func:`merge_student`: per-step merged weights) against the teacher, same batch.
    """
    ec = teacher.config.eval
    evaluator = evaluator or build_evaluator(teacher)
    labels, noise, cond = eval_set(teacher, num_samples)
    shift = teacher.config.sampling.shift
    teacher_steps = teacher.config.sampling.steps
    k = student.cfg.num_steps
    images = dict(references) if references is not None else teacher_references(teacher, num_samples, k)
    out = student.sample(noise, cond, batch_size=ec.batch_size)
    images[f"student_{k}"] = out["final"]
    images["student_step1_estimate"] = out["step1"]
    reference = images[f"teacher_{teacher_steps}"]
    ref_feats = evaluator.features(reference)
    rows = {}
    for name, imgs in images.items():
        row = evaluator.score(imgs, labels)
        row["fd_teacher"] = frechet_distance(evaluator.features(imgs), ref_feats)
        row["psnr_vs_teacher"] = psnr(imgs, reference) if name != f"teacher_{teacher_steps}" else float("inf")
        row["mean"], row["std"] = float(imgs.mean()), float(imgs.std())
        rows[name] = row
    if "high_band" in rows[f"teacher_{teacher_steps}"]:  # worlds that measure detail: 1.0 = as sharp as the teacher
        for row in rows.values():
            row["high_band_ratio"] = row["high_band"] / rows[f"teacher_{teacher_steps}"]["high_band"]
    refs = {name: rows[name] for name in (f"teacher_{teacher_steps}", f"teacher_naive_{k}")}
    result = {"num_samples": num_samples, "heldout_real": len(evaluator.heldout), "noise_seed": ec.seed,
              "rows": rows, "real_floor": evaluator.real_floor(num_samples),
              "gap_closure": gap_closure(rows[f"student_{k}"]["fd_real"], refs)}
    if measure_speed:
        b = ec.throughput_batch
        tn, tc = noise[:b], cond[:b]
        t_speed = measure_throughput(lambda: generate(teacher.backbone, tn, tc, teacher_steps, shift, b), b,
                                     ec.throughput_repeats)
        merged = merge_student(student)
        s_speed = measure_throughput(lambda: merged.sample(tn, tc, batch_size=b), b, ec.throughput_repeats)
        result["speed"] = {f"teacher_{teacher_steps}_samples_per_s": t_speed, f"student_{k}_samples_per_s": s_speed,
                           "speedup": s_speed / t_speed, "batch": b}
    return result, images

