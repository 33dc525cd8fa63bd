"""``twostep teacher-data --teacher PATH_OR_ID --prompts FILE``: the real path's cache.

The teacher's model family is read from the pipeline folder (``families/registry.py``). Stage 1 encodes the
prompts once with the pipeline's text encoder (``OUT/text/``) and frees it. Stage 2 runs the teacher transformer
exactly as its stock pipeline does (for Z-Image: guidance 0, Turbo schedule, shift 3; same latents in, same latents
out: see tests/test_real_path.py) and writes the sharded trajectory cache of ``engine/teacher_data.py`` (latents in
bf16 by default). Stage 3 decodes a few teacher outputs with the VAE to ``OUT/previews/`` so a person can look at
what the discriminator will call "real".
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import torch

from twostep.core.config import require
from twostep.core.dtypes import torch_dtype
from twostep.core.errors import TwostepError
from twostep.core.prompts import prompts_sha256, read_prompts
from twostep.core.utils import ensure_writable_dir, is_main_process, progress, write_text
from twostep.engine.distributed import barrier, init_process_group, rank_device
from twostep.engine.teacher_data import (
    TeacherData,
    TeacherDataConfig,
    TeacherSource,
    cache_provenance,
    existing_cache,
    generate_teacher_data,
)
from twostep.families.base import ModelFamily
from twostep.families.folders import (
    MAX_RESOLUTION,
    MIN_RESOLUTION,
    component_fingerprint,
    pick_device,
    resolve_pipeline_dir,
)
from twostep.families.registry import detect_family
from twostep.real.text_cache import PromptEmbeds, check_prompt_lengths, encode_prompt_cache, text_provenance

TEXT_DIR = "text"
NEGATIVE_TEXT_DIR = "text_negative"  # the guided teacher's negative prompt, one entry
MAX_SEQUENCE_LENGTH = 512  # the longest prompt any family's pipeline encodes


@dataclass
class ZImageDataConfig(TeacherDataConfig):
    """Teacher data for the real model. ``num_samples`` 0 = ``samples_per_prompt`` for every prompt."""

    prompts: str = ""  # .txt | .jsonl | .parquet
    resolution: int = 1024
    num_samples: int = 0
    samples_per_prompt: int = 1
    shard_size: int = 256
    batch_size: int = 4
    dtype: str = "bfloat16"
    text_batch_size: int = 16
    max_length: int = 512  # text tokens, as the pipeline's max_sequence_length (512 for Z-Image)
    previews: int = 4
    # classifier-free guidance of the teacher, by its pipeline's own rule and threshold (Z-Image: on above 0,
    # FLUX.2 klein base: above 1); the student is trained guidance-free, one forward per step
    guidance_scale: float = 0.0
    negative_prompt: str = ""  # the guidance's unconditional prompt, cached like the prompts (OUT/text_negative)

    def validate(self) -> None:
        require(self.num_samples >= 0, "num_samples", "must be >= 0 (0 = samples_per_prompt per prompt)")
        require(self.samples_per_prompt >= 1, "samples_per_prompt", "must be at least 1")
        # the exact rule (a multiple of the VAE grid x patch size) is checked against the pipeline folder
        require(MIN_RESOLUTION <= self.resolution <= MAX_RESOLUTION, "resolution",
                f"must be in [{MIN_RESOLUTION}, {MAX_RESOLUTION}] pixels (a multiple of the model's grid: 16 for "
                "Z-Image)")
        require(self.text_batch_size >= 1, "text_batch_size", "must be at least 1")
        require(16 <= self.max_length <= MAX_SEQUENCE_LENGTH, "max_length",
                f"must be in [16, {MAX_SEQUENCE_LENGTH}] tokens (the longest max_sequence_length of the pipelines "
                "twostep reads; the teacher's own limit is checked against its folder)")
        require(self.previews >= 0, "previews", "must be >= 0")
        require(self.guidance_scale >= 0, "guidance_scale", "must be >= 0 (0 = no guidance)")
        require(not self.guidance_scale or self.mode != "online", "guidance_scale",
                "a guided teacher runs in `mode: cached` only (online trajectories are unguided)")
        probe = dataclasses.replace(self, num_samples=max(1, self.num_samples))
        TeacherDataConfig.validate(probe)


@dataclass
class RealTeacher:
    """A resolved teacher pipeline: folder, model family, latent shape for the configured resolution, identity."""

    folder: str
    latent_shape: tuple[int, int, int]
    fingerprint: str
    family: ModelFamily


def resolve_teacher(path_or_id: str, resolution: int, need=("transformer",), shift: float | None = None,
                    teacher_steps: int | None = None) -> RealTeacher:
    """Checks that cost nothing (folder, class, resolution, schedule) before any model loads; ``teacher_steps``
    None = the family's own."""
    folder = resolve_pipeline_dir(path_or_id, need)
    family = detect_family(folder)
    family.check_pipeline(folder, need=need)
    if shift is not None:
        family.check_schedule(folder, shift, resolution, teacher_steps or family.default_teacher_steps)
    shape = family.latent_shape(folder, resolution)
    return RealTeacher(folder, shape, component_fingerprint(folder, "transformer"), family)


def resolved_data_config(cfg: ZImageDataConfig, prompts: list[str]) -> ZImageDataConfig:
    count = cfg.num_samples or cfg.samples_per_prompt * len(prompts)
    return dataclasses.replace(cfg, num_samples=count)


def is_guided(cfg: ZImageDataConfig, teacher: RealTeacher) -> bool:
    """Whether the teacher samples with CFG at ``cfg.guidance_scale`` (its family's rule; refuses a scale the
    pipeline would ignore)."""
    return teacher.family.check_guidance(teacher.folder, cfg.guidance_scale)


def real_provenance_extra(cfg: ZImageDataConfig, teacher: RealTeacher, prompts: list[str]) -> dict:
    extra = {"resolution": cfg.resolution, "prompts_sha256": prompts_sha256(prompts),
             "text": text_provenance(teacher.folder, prompts, cfg.dtype, cfg.max_length)}
    if is_guided(cfg, teacher):  # recorded only when on: unguided caches keep the provenance they always had
        extra["guidance"] = {"scale": float(cfg.guidance_scale), "negative_prompt": cfg.negative_prompt}
    return extra


def pipeline_source(cfg: ZImageDataConfig, teacher: RealTeacher, prompts: list[str], backbone=None,
                    embeds: PromptEmbeds | None = None, device=None,
                    negative: PromptEmbeds | None = None) -> TeacherSource:
    """The teacher as a trajectory source; ``backbone``/``embeds`` may be None when only provenance is needed.
    ``negative`` (a one-prompt cache): the teacher is guided, two forwards per step combined by the family's rule."""
    def velocity(x, sigma, prompt_index):
        x, sigma = x.to(device), sigma.to(device)
        v = backbone.velocity(x, sigma, embeds[prompt_index].to(device)).float()
        if negative is not None:
            uncond = backbone.velocity(x, sigma, negative[torch.zeros_like(prompt_index)].to(device)).float()
            v = teacher.family.guided_velocity(v, uncond, cfg.guidance_scale)
        return v.cpu()

    return TeacherSource(velocity=velocity, teacher_id=teacher.family.name, weights_sha256=teacher.fingerprint,
                         sample_shape=teacher.latent_shape, num_prompts=len(prompts),
                         extra=real_provenance_extra(cfg, teacher, prompts))


def expected_provenance(cfg: ZImageDataConfig, teacher: RealTeacher) -> dict:
    """What a cache for this config and teacher must carry (checked before training loads the model)."""
    prompts = read_prompts(cfg.prompts)
    return {**cache_provenance(resolved_data_config(cfg, prompts), pipeline_source(cfg, teacher, prompts)),
            "_prompts_file": os.path.basename(cfg.prompts)}


def make_real_teacher_data(cfg: ZImageDataConfig, model: str, out_dir: str, dtype: str = "bfloat16",
                           device: str = "auto") -> dict:
    """All three stages into ``out_dir``; every check runs before the first model loads. Returns the manifest."""
    cfg.validate()
    if not cfg.prompts:
        raise TwostepError("no prompt file: pass --prompts FILE (or set teacher_data.prompts in the config)")
    prompts = read_prompts(cfg.prompts)
    teacher = resolve_teacher(model, cfg.resolution, need=("transformer", "text_encoder", "tokenizer", "vae"),
                              shift=cfg.shift, teacher_steps=cfg.teacher_steps)
    dev = pick_device(device)
    limit = teacher.family.max_sequence_length
    if cfg.max_length > limit:
        raise TwostepError(f"teacher_data.max_length={cfg.max_length} is more than {teacher.family.title}'s pipeline "
                           f"encodes ({limit} tokens); set teacher_data.max_length={limit}")
    if teacher.family.prompt_padded and cfg.max_length != limit:
        raise TwostepError(f"teacher_data.max_length={cfg.max_length}: {teacher.family.title}'s transformer reads "
                           f"the prompt padded to {limit} tokens with no mask, and its pipeline and ComfyUI always "
                           f"pad to {limit}; a cache at another length trains the student on prompts it never sees "
                           f"at inference; set teacher_data.max_length={limit}")
    check_prompt_lengths(teacher.folder, prompts, cfg.max_length, cfg.prompts)
    if is_guided(cfg, teacher):
        check_prompt_lengths(teacher.folder, [cfg.negative_prompt], cfg.max_length)
    ensure_writable_dir(out_dir, what="teacher-data folder")
    cfg = resolved_data_config(cfg, prompts)
    # a folder made from another teacher, prompt set or schedule is refused before its text cache is touched
    manifest = existing_cache(out_dir, {**cache_provenance(cfg, pipeline_source(cfg, teacher, prompts)),
                                        "_prompts_file": os.path.basename(cfg.prompts)})
    if manifest is not None and manifest.get("complete") and cfg.mode == "cached":
        return manifest
    compute = torch_dtype(dtype) if dev.type == "cuda" else torch.float32
    # under torchrun: one GPU per process; the (small) text cache is encoded once, by rank 0, before the shards
    init_process_group()
    dev = rank_device(dev)
    text_dir = os.path.join(out_dir, TEXT_DIR)
    guided = is_guided(cfg, teacher)
    negative_dir = os.path.join(out_dir, NEGATIVE_TEXT_DIR)
    if is_main_process():
        encode_prompt_cache(teacher.folder, prompts, text_dir, dtype=cfg.dtype, batch_size=cfg.text_batch_size,
                            max_length=cfg.max_length, device=dev)
        if guided:
            encode_prompt_cache(teacher.folder, [cfg.negative_prompt], negative_dir, dtype=cfg.dtype,
                                batch_size=1, max_length=cfg.max_length, device=dev)
    barrier()
    if cfg.mode == "online":  # training computes the trajectories itself: only the text cache is stored
        return {"provenance": cache_provenance(cfg, pipeline_source(cfg, teacher, prompts)), "shards": {},
                "complete": True, "mode": "online"}
    embeds = PromptEmbeds(text_dir)
    backbone = teacher.family.load_backbone(teacher.folder, compute).to(dev).eval().requires_grad_(False)
    source = pipeline_source(cfg, teacher, prompts, backbone, embeds, dev,
                             negative=PromptEmbeds(negative_dir) if guided else None)
    manifest = generate_teacher_data(cfg, source, out_dir)
    del source, backbone  # the closure holds the transformer: free it before the VAE loads
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    if cfg.previews and is_main_process():
        write_previews(teacher.folder, out_dir, prompts, cfg.previews, dev, teacher.family)
    return manifest


@torch.no_grad()
def write_previews(folder: str, out_dir: str, prompts: list[str], count: int, device,
                   family: ModelFamily | None = None) -> list[str]:
    """Decode the first ``count`` teacher outputs to ``OUT/previews/NNNNN.png`` (+ ``index.json`` of prompts)."""
    data = TeacherData(out_dir, verify=False)
    count = min(count, len(data))
    family = family or detect_family(folder)
    vae = family.load_vae(folder, device, torch.float32)
    batch = data.batch(torch.arange(count))
    preview_dir = os.path.join(out_dir, "previews")
    os.makedirs(preview_dir, exist_ok=True)
    paths, index = [], {}
    for i in progress(range(count), desc="previews"):
        image = family.decode_images(vae, batch["final"][i:i + 1])[0]
        path = os.path.join(preview_dir, f"{i:05d}.png")
        image.save(path)
        paths.append(path)
        index[os.path.basename(path)] = prompts[int(batch["prompt_index"][i])]
    write_text(os.path.join(preview_dir, "index.json"), json.dumps(index, indent=2, ensure_ascii=False) + "\n")
    return paths
