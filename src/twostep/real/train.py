"""``twostep train --config configs/zimage_turbo_2step_lora.yaml``: the recipe on a real teacher pipeline.

Same engine as the offline world (``student``, ``discriminator``, ``recipe``, ``train``); this module supplies,
through the teacher's model family (read from its folder), the pipeline's transformer (one frozen bf16 base: with
adapters off it is the teacher and the discriminator's feature network), the cached prompt embeddings and teacher
latents, and decoded preview grids. Every check (config, pipeline folder, cache provenance) runs before the transformer loads.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

from twostep.core.config import load_config
from twostep.core.dtypes import torch_dtype
from twostep.core.errors import TwostepError
from twostep.core.utils import is_main_process, read_json_object
from twostep.engine import teacher_data as teacher_data_rules
from twostep.engine.checkpoint import read_state_json
from twostep.engine.discriminator import Discriminator
from twostep.engine.distributed import barrier, init_process_group, rank_device, shards_student
from twostep.engine.run_folder import check_run_dir, checkpoint_student_weights, discard_replaced, start_run, write_meta
from twostep.engine.student import Student
from twostep.engine.teacher_data import OnlineTeacherData, TeacherData
from twostep.engine.train import Trainer, resume_trainer, save_student_weights
from twostep.families.base import ModelFamily
from twostep.families.folders import pick_device
from twostep.families.registry import detect_family
from twostep.real.evaluation.training import TrainEvalConfig
from twostep.real.teacher_data import TEXT_DIR, expected_provenance, resolve_teacher
from twostep.real.text_cache import PromptEmbeds

STUDENT_WEIGHTS = "student.safetensors"


from twostep.real.config import ZImageDistillConfig, ZImageModelConfig, is_real_config  # noqa: F401  (the trainer's config)
from twostep.real.preview import preview_writer


def build_real_student(cfg: ZImageDistillConfig, folder: str, text_width: int, device,
                       family: ModelFamily | None = None, for_training: bool = False
                       ) -> tuple[Student, Discriminator]:
    """The student on the pipeline's transformer and the discriminator heads (``for_training``: with the
    fake-score network that distribution matching trains, a LoRA on the same base or a full copy)."""
    family = family or detect_family(folder)
    backbone = family.load_backbone(folder, torch_dtype(cfg.model.dtype)).to(device)
    blocks = cfg.discriminator.blocks
    if max(blocks) >= backbone.num_blocks:
        raise TwostepError(f"config key 'discriminator.blocks' {blocks}: the transformer has only "
                           f"{backbone.num_blocks} blocks")
    torch.manual_seed(cfg.train.seed)  # LoRA A init and the heads: a fresh run is reproducible
    student = Student(backbone, cfg.student, fake_score=for_training and cfg.recipe.uses_dmd)
    disc = Discriminator(family.hidden_width(backbone), text_width, cfg.discriminator).to(device)
    return student, disc


def online_teacher_data(student: Student, cfg: ZImageDistillConfig, teacher, embeds: PromptEmbeds,
                        device) -> OnlineTeacherData:
    """``teacher_data.mode: online``: each batch's trajectories from the student's frozen base with its adapters
    off, on the training device; the data folder holds only the text cache."""
    from twostep.core.prompts import read_prompts
    from twostep.real.teacher_data import pipeline_source, resolved_data_config

    prompts = read_prompts(cfg.teacher_data.prompts)
    data_cfg = resolved_data_config(cfg.teacher_data, prompts)

    # as `teacher-data` runs it: the base's dtype, no autocast
    return OnlineTeacherData.from_student(data_cfg, student, pipeline_source(data_cfg, teacher, prompts),
                                          cond=lambda prompt_index: embeds[prompt_index].to(device), device=device)


def train_zimage_student(cfg: ZImageDistillConfig, out_dir: str, resume: str | None = None,
                         allow_config_change: bool = False, overwrite: bool = False) -> dict:
    """Distil the pipeline's transformer into a 2-step student in ``out_dir``; returns the run's meta. The cheap
    checks (resume, teacher, cache, output folder) run before the model loads and before anything is written."""
    init_process_group()  # torchrun: every rank checks before any rank writes (barrier below)
    checkpoint = check_run_dir(cfg, out_dir, resume, allow_config_change, overwrite,
                               protected=(cfg.data_dir, cfg.model.path))
    # every component the run will use, resolved (and on the hub: fetched) before the model loads: the transformer,
    # and the VAE that decodes the preview grids (the last step always writes one)
    teacher = resolve_teacher(cfg.model.path, cfg.teacher_data.resolution, need=("transformer", "vae"),
                              shift=cfg.teacher_data.shift, teacher_steps=cfg.teacher_data.teacher_steps)
    device = rank_device(pick_device(cfg.model.device))  # torchrun: cuda:LOCAL_RANK
    expected = expected_provenance(cfg.teacher_data, teacher)
    online = cfg.teacher_data.mode == "online"
    data = None if online else TeacherData(cfg.data_dir, expected=expected)  # online: built on the student below
    embeds = PromptEmbeds(os.path.join(cfg.data_dir, TEXT_DIR), expected=expected["text"])
    teacher_data_rules.warn_small_cache(expected["num_samples"], cfg.train.batch_size,
                                         teacher_data_rules.MIN_REAL_SAMPLES)  # before loading
    evaluator = None
    # rank 0 scores; under FSDP2 every rank samples with it (the student's forward is a collective)
    if cfg.train.eval_every and (is_main_process() or shards_student(cfg.student.form)):  # checks its prompts now: a bad file refuses the run
        from twostep.real.evaluation.training import TrainingEvaluator

        evaluator = TrainingEvaluator(cfg.evaluation or TrainEvalConfig(), teacher.folder, teacher.latent_shape,
                                      cfg.teacher_data, device)
    barrier()
    start_run(cfg, out_dir, overwrite)
    inputs = {"teacher": teacher.folder, "teacher_fingerprint": teacher.fingerprint, "family": teacher.family.name,
              "teacher_data": os.path.abspath(cfg.data_dir)}
    write_meta(out_dir, {"kind": f"{teacher.family.name}-student", "status": "training", **inputs})  # `export --checkpoint` reads it
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if evaluator is not None:
        evaluator.setup()  # the text encoder comes and goes before the student takes the memory
    student, disc = build_real_student(cfg, teacher.folder, embeds.width, device, teacher.family, for_training=True)
    if online:
        data = online_teacher_data(student, cfg, teacher, embeds, device)
    trainer = Trainer(cfg, student, disc, data, embeds, None, out_dir,
                      sample_fn=preview_writer(teacher.folder, embeds, teacher.latent_shape, device, cfg.teacher_data),
                      eval_fn=evaluator, device=device)
    resume_trainer(trainer, checkpoint)
    trainer.fit()
    state = save_student_weights(trainer, os.path.join(out_dir, STUDENT_WEIGHTS))
    discard_replaced(out_dir)
    meta = {"kind": f"{teacher.family.name}-student", "status": "finished", "steps": trainer.step,
            "train_wall_s": round(trainer.elapsed, 1), **inputs, "device": str(device),
            "trainable_parameters": sum(v.numel() for v in state.values())}
    write_meta(out_dir, meta)
    return meta


def load_real_run(run_dir: str, checkpoint: str | None = None
                  ) -> tuple[ZImageDistillConfig, dict, dict[str, torch.Tensor]]:
    """``(config, meta, EMA trainable state)`` of a real run, without loading the model: the finished run's
    ``student.safetensors``, or with ``checkpoint`` (``latest`` or a ``step_*`` folder) that checkpoint's EMA
    weights, gathered whole from its shards when FSDP2 wrote it (any run, finished or not)."""
    if checkpoint is None and not os.path.isfile(os.path.join(run_dir, STUDENT_WEIGHTS)):
        raise TwostepError(f"{run_dir} holds no trained student ({STUDENT_WEIGHTS} missing); run `twostep train` "
                           "with a real-model config first, or export a checkpoint with --checkpoint latest")
    cfg = load_config(ZImageDistillConfig, os.path.join(run_dir, "config.yaml"))
    meta_path = os.path.join(run_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise TwostepError(f"{run_dir} has no meta.json: the run did not start or predates this twostep; rerun "
                           "`twostep train`")
    meta = read_json_object(meta_path, what="run record", hint="rerun `twostep train`")
    if checkpoint is None:
        return cfg, meta, load_file(os.path.join(run_dir, STUDENT_WEIGHTS))
    folder, weights = checkpoint_student_weights(run_dir, checkpoint)
    return cfg, {**meta, "steps": int(read_state_json(folder).get("step", 0)), "checkpoint": folder}, weights
