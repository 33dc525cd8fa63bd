"""``twostep train --config configs/zimage_turbo_2step_lora.yaml``: the recipe on a real Z-Image teacher.

Same engine as the offline world (``student``, ``discriminator``, ``recipe``, ``train``); this module supplies
the pipeline's transformer (one frozen bf16 base: with adapters off it is the teacher and the discriminator's
feature network), the cached prompt embeddings and teacher latents, and decoded preview grids.
Every check (config, pipeline folder, cache provenance) runs before the transformer loads.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file

from ...backbones.zimage import ZImageBackbone
from ...config import load_config, require
from ...engine import flow
from ...engine.distributed import barrier, init_process_group, rank_device, shards_student
from ...engine.discriminator import Discriminator, DiscriminatorConfig
from ...engine.recipe import RecipeConfig
from ...engine.student import Student, StudentConfig
from ...engine.teacher_data import DTYPES, OnlineTeacherData, TeacherData
from ...engine.checkpoint import read_state_json
from ...engine.train import DistillTrainConfig, Trainer, check_run_dir, checkpoint_student_weights, discard_replaced, \
    resume_trainer, save_student_weights, start_run, write_meta
from ...errors import TwostepError
from ...evaluation.training import TrainEvalConfig
from ... import plan
from ...utils import check_device_name, is_main_process, read_json_object
from .data import TEXT_DIR, ZImageDataConfig, expected_provenance, resolve_teacher
from .pipeline_io import decode_latents, load_vae, pick_device, torch_dtype
from .text_cache import PromptEmbeds

STUDENT_WEIGHTS = "student.safetensors"


@dataclass
class ZImageModelConfig:
    path: str = "Tongyi-MAI/Z-Image-Turbo"  # diffusers pipeline folder or hub id
    dtype: str = "bfloat16"  # the frozen base; LoRA adapters and discriminator heads train in fp32
    device: str = "auto"

    def validate(self) -> None:
        require(self.dtype in DTYPES, "dtype", f"must be one of {sorted(DTYPES)}")
        require(check_device_name(self.device), "device",
                f"must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        require(bool(self.path.strip()), "path", "must name a Z-Image pipeline folder or hub id")


def _real_train_defaults() -> DistillTrainConfig:
    return DistillTrainConfig(steps=2000, batch_size=4, g_lr=1e-4, d_lr=2e-4, warmup_steps=100, bf16=True,
                              gradient_checkpointing=True, log_every=10, sample_every=250, eval_every=0,
                              checkpoint_every=250, ema_decay=0.999, d_warmup_steps=50, fsdp_param_dtype="bfloat16")


@dataclass
class ZImageDistillConfig:
    model: ZImageModelConfig = field(default_factory=ZImageModelConfig)
    data_dir: str = "runs/zimage/teacher_data"  # written by `twostep teacher-data --prompts ...`
    teacher_data: ZImageDataConfig = field(default_factory=ZImageDataConfig)
    student: StudentConfig = field(default_factory=lambda: StudentConfig(lora_rank=64, lora_alpha=64.0))
    # heads on early, middle and late blocks of 30 (block 26 is ~87% deep: fine detail); see the YAML
    discriminator: DiscriminatorConfig = field(default_factory=lambda: DiscriminatorConfig(
        blocks=[7, 15, 23, 26], hidden=256, text_norm=True, r1="approx", r1_weight=0.1))
    # the paper's recipe with the discriminator fixes, as measured on the detail world (docs/results.md)
    recipe: RecipeConfig = field(default_factory=lambda: RecipeConfig(adv_ramp_steps=200))
    train: DistillTrainConfig = field(default_factory=_real_train_defaults)
    # what `train.eval_every` evaluates (the smoke set, a few metrics; see twostep.evaluation.training); unset = the
    # defaults, so configs saved before this section existed still resume without a config change
    evaluation: TrainEvalConfig | None = None

    def validate(self) -> None:
        require(list(self.student.sigmas) == list(self.teacher_data.student_sigmas), "student.sigmas",
                "must equal teacher_data.student_sigmas (the cache holds the teacher states there)")
        require(self.recipe.real_source == "teacher", "recipe.real_source",
                "must be 'teacher' on the real path (no natural-image set is wired in)")


def is_real_config(path: str | None) -> bool:
    """A YAML with a top-level ``model:`` section (a pipeline ``path``/``dtype``/``device``) or a ``data_dir``
    configures the real path. The toy's has ``teacher:``; a toy *teacher* config's ``model:`` holds network sizes
    and is not a distillation config at all (loading it as one names the bad key)."""
    if not path or not os.path.isfile(path):
        return False
    from ...config import read_yaml

    data = read_yaml(path) or {}
    model = data.get("model")
    toy_model = isinstance(model, dict) and bool(set(model) & {"dim", "n_layers", "n_heads", "patch_size"})
    return "teacher" not in data and (("model" in data and not toy_model) or "data_dir" in data)


PREVIEW_MAX_FONT = 48  # px; the font is 1/32 of the image height, at least 10 px


def _step_label(path: str) -> str:
    """``step 250`` for ``.../step_000250.png`` (the trainer's naming); the file name otherwise."""
    match = re.search(r"step_(\d+)", os.path.basename(path))
    return f"step {int(match.group(1))}" if match else os.path.splitext(os.path.basename(path))[0]


def _wrap(text: str, font, width: int, max_lines: int) -> list[str]:
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
        lines = _wrap(prompt, font, text_w - 2 * pad, max(1, (h - pad) // line_h))
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
        vae = load_vae(folder, device, torch.float32)  # loaded per grid and freed: not resident during training
        if first is not None:
            teacher_images.extend(decode_latents(vae, first[i:i + 1])[0] for i in range(count))
        images = [decode_latents(vae, latents[i:i + 1])[0] for i in range(count)]
        del vae
        title_ = title or f"{_step_label(path)}: same noise per row"
        grid, layout = compose_preview(title_, prompts, teacher_images, images,
                                       teacher_label=f"teacher, {steps} steps",
                                       student_label=f"student, {student.cfg.num_steps} steps")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        grid.save(path)
        return layout

    return write


def build_real_student(cfg: ZImageDistillConfig, folder: str, text_width: int, device) -> tuple[Student, Discriminator]:
    backbone = ZImageBackbone.from_pretrained(folder, dtype=torch_dtype(cfg.model.dtype)).to(device)
    blocks = cfg.discriminator.blocks
    if max(blocks) >= backbone.num_blocks:
        raise TwostepError(f"config key 'discriminator.blocks' {blocks}: the transformer has only "
                           f"{backbone.num_blocks} blocks")
    torch.manual_seed(cfg.train.seed)  # LoRA A init and the heads: a fresh run is reproducible
    student = Student(backbone, cfg.student)
    disc = Discriminator(backbone.transformer.config.dim, text_width, cfg.discriminator).to(device)
    return student, disc


def online_teacher_data(student: Student, cfg: ZImageDistillConfig, teacher, embeds: PromptEmbeds,
                        device) -> OnlineTeacherData:
    """``teacher_data.mode: online``: each batch's trajectories from the student's frozen base with its adapters
    off, on the training device; the data folder holds only the text cache."""
    from ...prompts import read_prompts
    from .data import pipeline_source, resolved_data_config

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
                              shift=cfg.teacher_data.shift)
    device = rank_device(pick_device(cfg.model.device))  # torchrun: cuda:LOCAL_RANK
    expected = expected_provenance(cfg.teacher_data, teacher)
    online = cfg.teacher_data.mode == "online"
    data = None if online else TeacherData(cfg.data_dir, expected=expected)  # online: built on the student below
    embeds = PromptEmbeds(os.path.join(cfg.data_dir, TEXT_DIR), expected=expected["text"])
    plan.warn_small_cache(expected["num_samples"], cfg.train.batch_size, plan.MIN_REAL_SAMPLES)  # before loading
    evaluator = None
    # rank 0 scores; under FSDP2 every rank samples with it (the student's forward is a collective)
    if cfg.train.eval_every and (is_main_process() or shards_student(cfg.student.form)):  # checks its prompts now: a bad file refuses the run
        from ...evaluation.training import TrainingEvaluator

        evaluator = TrainingEvaluator(cfg.evaluation or TrainEvalConfig(), teacher.folder, teacher.latent_shape,
                                      cfg.teacher_data, device)
    barrier()
    start_run(cfg, out_dir, overwrite)
    inputs = {"teacher": teacher.folder, "teacher_fingerprint": teacher.fingerprint,
              "teacher_data": os.path.abspath(cfg.data_dir)}
    write_meta(out_dir, {"kind": "zimage-student", "status": "training", **inputs})  # `export --checkpoint` reads it
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if evaluator is not None:
        evaluator.setup()  # the text encoder comes and goes before the student takes the memory
    student, disc = build_real_student(cfg, teacher.folder, embeds.width, device)
    if online:
        data = online_teacher_data(student, cfg, teacher, embeds, device)
    trainer = Trainer(cfg, student, disc, data, embeds, None, out_dir,
                      sample_fn=preview_writer(teacher.folder, embeds, teacher.latent_shape, device, cfg.teacher_data),
                      eval_fn=evaluator, device=device)
    resume_trainer(trainer, checkpoint)
    trainer.fit()
    state = save_student_weights(trainer, os.path.join(out_dir, STUDENT_WEIGHTS))
    discard_replaced(out_dir)
    meta = {"kind": "zimage-student", "status": "finished", "steps": trainer.step,
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
                           "with a Z-Image config first, or export a checkpoint with --checkpoint latest")
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
