"""``twostep evaluate``: a 2-step Z-Image student against its 8-step teacher, on a prompt set, with a report.

1. **Checks** (nothing loads, nothing is written): prompts, the student (run or export), the teacher pipeline and
   its fingerprint, the resolution, prompt lengths, the metric models' ids, ``--real`` images, the output folder.
2. **Sampling**, resumable by shard like ``teacher-data``: sample ``i`` uses prompt ``i % P`` and the noise of seed
   ``seed + i``; teacher (8 steps), naive teacher (the student's 2 sigmas) and student (2 steps) run on the same
   prompt embedding and noise; the decoded images (uint8) and per-image latencies go to
   ``OUT/shard-NNNNN.safetensors``, listed with their sha256 in ``OUT/manifest.json``. A rerun skips finished
   shards; SIGTERM / Ctrl-C stops at a shard boundary (exit 75) and the same command finishes the rest.
3. **Metrics** (:func:`score`) over all shards, then ``OUT/metrics.json``, ``OUT/report.md``, ``OUT/report.html``
   and ``OUT/grids/`` (:mod:`twostep.real.evaluation.report`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file

from twostep.core.config import require, require_seed, to_dict
from twostep.core.errors import TwostepError
from twostep.core.utils import (
    atomic_path,
    check_device_name,
    check_output_dir,
    ensure_writable_dir,
    file_sha256,
    progress,
    read_json_file,
    write_text,
)
from twostep.real.evaluation import metrics as M
from twostep.real.evaluation.feature_models import (
    ClipModel,
    DinoModel,
    MetricModelUnavailable,
    check_available,
    is_disabled,
)
from twostep.real.evaluation.sampling import SAMPLERS, Samplers, StudentSource, read_student

Tensor = torch.Tensor
MANIFEST = "manifest.json"
KIND = "twostep-evaluate"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
PSNR_CAP = 100.0  # dB for identical images (PSNR is infinite there), so a mean stays a number


@dataclass
class EvalModelsConfig:
    """Metric model ids (hub ids or local folders); ``""`` or ``none`` turns a model's metrics off."""

    clip: str = "openai/clip-vit-large-patch14"
    dino: str = "facebook/dinov2-large"
    preference: str = "yuvalkirstain/PickScore_v1"  # optional: skipped with a note when it cannot be loaded
    preference_processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore's processor; "" = its own
    batch_size: int = 16

    def validate(self) -> None:
        require(self.batch_size >= 1, "batch_size", "must be at least 1")


@dataclass
class EvaluateConfig:
    resolution: int = 0  # pixels; 0 = the resolution the student was trained at (1024 if unknown)
    seed: int = 0  # sample i starts from the noise of seed (seed + i)
    samples_per_prompt: int = 1
    max_prompts: int = 0  # 0 = every prompt of the set
    teacher_steps: int = 0  # 0 = the step count the student was distilled from (else the family's own)
    shard_size: int = 16  # samples per shard: the unit a rerun resumes from
    dtype: str = "auto"  # pipeline dtype: auto = bfloat16 on a GPU, float32 on CPU
    device: str = "auto"
    grids: int = 0  # prompts shown side by side in the report (0 = every prompt)
    worst: int = 8  # prompts listed as the student's worst (lowest paired PSNR to the teacher)
    kid_subset_size: int = 1000
    kid_subsets: int = 100
    models: EvalModelsConfig = field(default_factory=EvalModelsConfig)

    def validate(self) -> None:
        require(self.resolution == 0 or 16 <= self.resolution <= 8192, "resolution",
                "must be 0 (the student's) or in [16, 8192] pixels (a multiple of 16 for Z-Image)")
        require_seed(self.seed, "seed")
        require(self.samples_per_prompt >= 1, "samples_per_prompt", "must be at least 1")
        require(self.max_prompts >= 0, "max_prompts", "must be >= 0 (0 = all)")
        require(0 <= self.teacher_steps <= 1000, "teacher_steps", "must be 0 (the student's teacher's) or in [1, 1000]")
        require(self.shard_size >= 1, "shard_size", "must be at least 1")
        require(self.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype",
                "must be auto, float32, bfloat16 or float16")
        require(check_device_name(self.device), "device", f"must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        require(self.grids >= 0, "grids", "must be >= 0 (0 = every prompt)")
        require(self.worst >= 0, "worst", "must be >= 0")
        require(self.kid_subset_size >= 2, "kid_subset_size", "must be at least 2")
        require(self.kid_subsets >= 1, "kid_subsets", "must be at least 1")


@dataclass
class Plan:
    """Everything :func:`prepare` checked; nothing has been loaded or written yet."""

    cfg: EvaluateConfig
    out: str
    teacher_id: str  # as given (hub id or folder)
    prompts: list[str]
    prompts_path: str
    student: StudentSource
    teacher_folder: str
    latent_shape: tuple[int, int, int]
    resolution: int
    real: list[str]
    skipped: dict[str, str]  # metric model kind -> why its metrics are missing
    provenance: dict

    @property
    def num_samples(self) -> int:
        return len(self.prompts) * self.cfg.samples_per_prompt

    def labels(self, short: bool = False) -> dict[str, str]:
        k = self.student.num_steps
        cfg = f", guidance {self.student.guidance_scale:g}" if "teacher_guidance" in self.provenance else ""
        return {"teacher": f"teacher, {self.cfg.teacher_steps} steps{cfg}",
                "naive": f"{'naive' if short else 'teacher naive'}, {k} steps{cfg}", "student": f"student, {k} steps"}

    def steps(self) -> dict[str, int]:
        return {"teacher": self.cfg.teacher_steps, "naive": self.student.num_steps, "student": self.student.num_steps}


# --------------------------------------------------------------------------- checks


def real_image_files(path: str) -> list[str]:
    """The images (.png/.jpg/.jpeg/.webp) directly in folder ``path``, sorted; each header is read (cheap), so a
    bad file is named now and not after hours of sampling."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isdir(path):
        raise TwostepError(f"--real {path}: no such folder; give a folder of reference images (.png, .jpg, .webp)")
    files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS)
                   and os.path.isfile(os.path.join(path, n)))
    if len(files) < 2:
        raise TwostepError(f"--real {path} holds {len(files)} images (.png, .jpg, .webp); distances need at least 2")
    for name in files:
        try:
            with Image.open(name) as image:
                image.size  # noqa: B018 - reads the header only
        except (OSError, UnidentifiedImageError) as err:
            raise TwostepError(f"--real: {name} is not a readable image ({type(err).__name__}); remove it") from None
    return files


def _read_manifest(out: str) -> dict | None:
    path = os.path.join(out, MANIFEST)
    if not os.path.isfile(path):
        return None
    manifest = read_json_file(path, what="evaluation manifest", hint=f"delete {out} and evaluate again")
    if not (isinstance(manifest, dict) and manifest.get("kind") == KIND and isinstance(manifest.get("provenance"),
                                                                                    dict)
            and isinstance(manifest.get("shards"), dict)
            and all(isinstance(entry, dict) for entry in manifest["shards"].values())):
        raise TwostepError(f"{path} is not a twostep evaluation manifest; use another --out")
    return manifest


def _check_out(out: str, provenance: dict) -> dict | None:
    """The folder's manifest when it is an evaluation of the same samples (to resume); refuses anything else."""
    check_output_dir(out, what="evaluation folder")
    manifest = _read_manifest(out) if os.path.isdir(out) else None
    if manifest is None:
        if os.path.isdir(out) and os.listdir(out):
            raise TwostepError(f"evaluation folder {out!r} is not empty and holds no evaluation; choose a new --out")
        return None
    made = manifest["provenance"]
    for key in provenance:
        if made.get(key) != provenance[key]:
            raise TwostepError(f"{out} holds an evaluation made with {key}={made.get(key)!r}, not "
                               f"{provenance[key]!r}; use another --out (or delete it)")
    return manifest


def prepare(model: str, teacher: str | None, prompts: str, out: str, cfg: EvaluateConfig,
            real: str | None = None) -> Plan:
    """Every check of ``twostep evaluate``; loads no model and writes nothing."""
    from twostep.core.prompts import prompts_sha256, read_prompts
    from twostep.real.evaluation.prompt_sets import resolve_prompt_file
    from twostep.real.teacher_data import resolve_teacher
    from twostep.real.text_cache import check_prompt_lengths

    prompts_path = resolve_prompt_file(prompts)
    prompt_list = read_prompts(prompts_path)
    if cfg.max_prompts:
        prompt_list = prompt_list[:cfg.max_prompts]
    student = read_student(model)
    teacher_id = teacher or student.default_teacher
    if not teacher_id:
        raise TwostepError(f"{model} does not record a teacher that can be loaded here; pass --teacher (e.g. "
                           "Tongyi-MAI/Z-Image-Turbo)")
    resolution = cfg.resolution or student.resolution or 1024
    need = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    resolved = resolve_teacher(teacher_id, resolution, need=need, shift=student.shift,
                               teacher_steps=cfg.teacher_steps or student.teacher_steps)
    if student.teacher_fingerprint and resolved.fingerprint != student.teacher_fingerprint:
        raise TwostepError(f"the teacher {teacher_id} is not the one {model} was trained on (transformer "
                           "fingerprint differs); pass --teacher with the original weights")
    check_prompt_lengths(resolved.folder, prompt_list, resolved.family.max_sequence_length, prompts_path)
    cfg = dataclasses.replace(cfg, teacher_steps=cfg.teacher_steps or student.teacher_steps
                              or resolved.family.default_teacher_steps)
    real_files = real_image_files(real) if real else []
    skipped = {}
    for kind, model_id in (("CLIP", cfg.models.clip), ("DINOv2", cfg.models.dino)):
        if is_disabled(model_id):
            skipped[kind] = "turned off (models." + ("clip" if kind == "CLIP" else "dino") + "=none)"
        else:
            check_available(kind, model_id)  # required when asked for: fail now, not after the sampling
    if is_disabled(cfg.models.preference):
        skipped["preference"] = "turned off (models.preference=none)"
    else:
        try:
            check_available("preference", cfg.models.preference)
            if cfg.models.preference_processor:  # PickScore's processor lives in another repository
                check_available("preference", cfg.models.preference_processor)
        except MetricModelUnavailable as err:
            skipped["preference"] = str(err)
    provenance = {"teacher_fingerprint": resolved.fingerprint, "student_sha256": student.identity,
                  "prompts_sha256": prompts_sha256(prompt_list), "num_prompts": len(prompt_list),
                  "samples_per_prompt": cfg.samples_per_prompt, "resolution": resolution, "seed": cfg.seed,
                  "teacher_steps": cfg.teacher_steps, "student_sigmas": student.sigmas, "shift": student.shift,
                  "shard_size": cfg.shard_size, **_resolved_precision(cfg)}
    if resolved.family.check_guidance(resolved.folder, student.guidance_scale):  # recorded only when on
        provenance["teacher_guidance"] = {"scale": student.guidance_scale, "negative_prompt": student.negative_prompt}
    _check_out(out, provenance)
    return Plan(cfg, out, teacher_id, prompt_list, prompts_path, student, resolved.folder, resolved.latent_shape, resolution,
                real_files, skipped, provenance)


# --------------------------------------------------------------------------- sampling


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _shard_ranges(plan: Plan) -> list[tuple[int, int]]:
    size = plan.cfg.shard_size
    return [(start, min(size, plan.num_samples - start)) for start in range(0, plan.num_samples, size)]


def _finished(out: str, manifest: dict, name: str) -> bool:
    entry = manifest["shards"].get(name)
    path = os.path.join(out, name)
    return bool(entry) and os.path.isfile(path) and file_sha256(path) == entry.get("sha256")


def noise_for(sample: int, seed: int, shape: tuple[int, int, int]) -> Tensor:
    """The starting latents of sample ``sample``: ``(1, C, h, w)`` from a CPU generator (the same on any device)."""
    return torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed + sample))


def _resolved_precision(cfg) -> dict:
    """What the samples depend on beyond the config's words: the device kind and dtype ``auto`` resolves to (a
    folder begun on CPU in float32 is not finished on a GPU in bf16, nor are its latencies pooled)."""
    from twostep.core.utils import resolve_device

    device = resolve_device(cfg.device)
    return {"dtype": str(_pick_dtype(cfg.dtype, device)).replace("torch.", ""), "device": device.type}


def _pick_dtype(name: str, device: torch.device) -> torch.dtype:
    from twostep.core.dtypes import torch_dtype

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch_dtype(name)


def sample_shards(plan: Plan) -> dict:
    """Generate every shard the folder lacks (see the module docstring); returns the complete manifest."""
    from twostep.core.utils import resolve_device
    from twostep.engine.checkpoint import remove_stale_temporaries
    from twostep.engine.preemption import Preempted, StopOnSignal

    out, cfg = plan.out, plan.cfg
    manifest = _check_out(out, plan.provenance) or {"kind": KIND, "provenance": plan.provenance, "shards": {},
                                                    "complete": False}
    ensure_writable_dir(out, what="evaluation folder")
    for path in remove_stale_temporaries(out):
        print(f"twostep: removed {path}, left by an interrupted write")
    ranges = _shard_ranges(plan)
    todo = [k for k in range(len(ranges)) if not _finished(out, manifest, shard_name(k))]
    if not todo:
        if not manifest.get("complete"):  # stopped between the last shard and this flag
            manifest["complete"] = True
            write_text(os.path.join(out, MANIFEST), json.dumps(manifest, indent=2) + "\n")
        return manifest
    for k in range(len(ranges)):  # only verified shards stay listed
        if k in todo:
            manifest["shards"].pop(shard_name(k), None)
    manifest["complete"] = False
    device = resolve_device(cfg.device)
    samplers = Samplers(plan.teacher_folder, plan.student, device, _pick_dtype(cfg.dtype, device), plan.resolution,
                        cfg.teacher_steps)
    done = sum(count for k, (_, count) in enumerate(ranges) if k not in todo)
    bar = progress(total=plan.num_samples, initial=done, desc="evaluate (teacher, naive, student per sample)")
    warm = False
    with StopOnSignal("evaluation") as stop, bar:
        for k in todo:
            start, count = ranges[k]
            if not warm:  # first calls pay for allocations and kernel selection: not a sampler's latency
                embed = samplers.encode([plan.prompts[start % len(plan.prompts)]])[0]
                for name in SAMPLERS:
                    samplers.sample(name, embed, noise_for(start, cfg.seed, plan.latent_shape))
                warm = True
            tensors = _make_shard(plan, samplers, start, count, bar)
            path = os.path.join(out, shard_name(k))
            with atomic_path(path) as tmp:
                save_file(tensors, tmp, metadata={"provenance": json.dumps(plan.provenance, sort_keys=True)})
            manifest["shards"][shard_name(k)] = {"first_index": start, "count": count, "sha256": file_sha256(path),
                                                 "bytes": os.path.getsize(path)}
            write_text(os.path.join(out, MANIFEST), json.dumps(manifest, indent=2) + "\n")
            if stop.requested and k != todo[-1]:
                raise Preempted(f"stopped by {stop.signal_name}: {len(manifest['shards'])} of {len(ranges)} shards "
                                f"of {out} are done; rerun the same command to finish the rest")
    del samplers
    manifest["complete"] = True
    manifest["shards"] = dict(sorted(manifest["shards"].items()))
    write_text(os.path.join(out, MANIFEST), json.dumps(manifest, indent=2) + "\n")
    return manifest


def _make_shard(plan: Plan, samplers: Samplers, start: int, count: int, bar) -> dict[str, Tensor]:
    images = {name: [] for name in SAMPLERS}
    seconds = {name: [] for name in SAMPLERS}
    decode = []
    embeds: dict[int, Tensor] = {}
    for i in range(start, start + count):
        p = i % len(plan.prompts)
        if p not in embeds:
            embeds[p] = samplers.encode([plan.prompts[p]])[0]
        noise = noise_for(i, plan.cfg.seed, plan.latent_shape)
        for name in SAMPLERS:
            latents, s = samplers.sample(name, embeds[p], noise)
            image, d = samplers.decode(latents)
            images[name].append(image)
            seconds[name].append(s)
            decode.append(d)
        bar.update(1)
    tensors = {name: torch.cat(images[name]).contiguous() for name in SAMPLERS}
    tensors.update({f"seconds/{name}": torch.tensor(seconds[name], dtype=torch.float64) for name in SAMPLERS})
    tensors["seconds/decode"] = torch.tensor(decode, dtype=torch.float64)
    tensors["sample"] = torch.arange(start, start + count, dtype=torch.int64)
    return tensors


def read_shards(plan: Plan, manifest: dict):
    """Yield each shard's tensors in sample order (checked against the manifest's sha256)."""
    for k in range(len(_shard_ranges(plan))):
        name = shard_name(k)
        path = os.path.join(plan.out, name)
        if not _finished(plan.out, manifest, name):
            raise TwostepError(f"{path} is missing or does not match {MANIFEST}; rerun the same command to remake it")
        yield load_file(path)


def sample_images(plan: Plan, samples: list[int]):
    """Yield ``(sample, {sampler: uint8 (3, H, W)})`` for the listed samples (the report's grids), one shard in
    memory at a time."""
    wanted = set(samples)
    size = plan.cfg.shard_size
    for k in sorted({s // size for s in wanted}):
        tensors = load_file(os.path.join(plan.out, shard_name(k)))
        for row, s in enumerate(tensors["sample"].tolist()):
            if s in wanted:
                yield s, {name: tensors[name][row] for name in SAMPLERS}


# --------------------------------------------------------------------------- metrics


def _load_real(paths: list[str], resolution: int) -> Tensor:
    """uint8 ``(N, 3, R, R)``: each image centre-cropped to a square and resized to the evaluation resolution."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    out = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                side = min(image.size)
                left, top = (image.width - side) // 2, (image.height - side) // 2
                image = image.crop((left, top, left + side, top + side)).resize((resolution, resolution),
                                                                                Image.LANCZOS)
        except (OSError, UnidentifiedImageError) as err:
            raise TwostepError(f"--real: {path} is not a readable image ({type(err).__name__}); remove it") from None
        out.append(torch.from_numpy(np.array(image)).permute(2, 0, 1))
    return torch.stack(out)


def _real_features(plan: Plan, clip: ClipModel | None, dino: DinoModel | None, chunk: int = 64) -> dict:
    """``{"clip": (R, D) | None, "dino": (R, D) | None}`` of the ``--real`` images, read ``chunk`` at a time."""
    bs = plan.cfg.models.batch_size
    feats = {"clip": [], "dino": []}
    for start in range(0, len(plan.real), chunk):
        images = _load_real(plan.real[start:start + chunk], plan.resolution)
        if clip:
            feats["clip"].append(clip.image_embeds(images, bs))
        if dino:
            feats["dino"].append(dino.features(images, bs))
    return {space: torch.cat(f) if f else None for space, f in feats.items()}


def _load_models(plan: Plan, device) -> tuple[ClipModel | None, DinoModel | None, ClipModel | None]:
    m = plan.cfg.models
    clip = None if is_disabled(m.clip) else ClipModel(m.clip, device)
    dino = None if is_disabled(m.dino) else DinoModel(m.dino, device)
    pref = None
    if "preference" not in plan.skipped:
        try:
            pref = ClipModel(m.preference, device, processor_id=m.preference_processor or None, kind="preference")
        except MetricModelUnavailable as err:  # optional: reported, never fatal
            plan.skipped["preference"] = str(err)
    return clip, dino, pref


def _distances(a: Tensor, b: Tensor, cfg: EvaluateConfig, prefix: str, suffix: str = "") -> dict:
    if len(a) < 2 or len(b) < 2:
        return {}
    kid, kid_std = M.kernel_distance(a, b, subset_size=cfg.kid_subset_size, subsets=cfg.kid_subsets, seed=cfg.seed)
    return {f"fd_{prefix}{suffix}": M.frechet_distance(a, b), f"kid_{prefix}{suffix}": kid,
            f"kid_{prefix}{suffix}_std": kid_std}


def _mean(values) -> float | None:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else None


def score(plan: Plan, manifest: dict) -> dict:
    """Every metric, per sampler and per sample (see :data:`twostep.real.evaluation.report.METRIC_SOURCES`)."""
    from twostep.core.utils import resolve_device

    cfg = plan.cfg
    device = resolve_device(cfg.device)
    clip, dino, pref = _load_models(plan, device)
    bs = cfg.models.batch_size
    text = clip.text_embeds(plan.prompts, bs) if clip else None
    per = {name: {key: [] for key in ("clip_feats", "dino_feats", "clip_score", "preference", "psnr", "ssim",
                                      "high_band", "seconds")} for name in SAMPLERS}
    decode, samples = [], []
    bar = progress(total=plan.num_samples, desc="metrics")
    with bar:
        for tensors in read_shards(plan, manifest):
            index = tensors["sample"].tolist()
            samples += index
            prompts = [plan.prompts[i % len(plan.prompts)] for i in index]
            reference = tensors["teacher"]
            decode += tensors["seconds/decode"].tolist()
            for name in SAMPLERS:
                images, acc = tensors[name], per[name]
                acc["seconds"] += tensors[f"seconds/{name}"].tolist()
                acc["high_band"] += M.high_band(images).tolist()
                acc["psnr"] += M.psnr(images, reference).clamp(max=PSNR_CAP).tolist()
                acc["ssim"] += M.ssim(images, reference).tolist()
                if clip:
                    feats = clip.image_embeds(images, bs)
                    acc["clip_feats"].append(feats)
                    rows = torch.tensor([i % len(plan.prompts) for i in index])
                    acc["clip_score"] += M.clip_similarity(feats, text[rows]).tolist()
                if dino:
                    acc["dino_feats"].append(dino.features(images, bs))
                if pref:
                    acc["preference"] += pref.preference(images, prompts, bs).tolist()
            bar.update(len(index))
    real = _real_features(plan, clip, dino) if plan.real else {}
    feats = {name: {space: torch.cat(per[name][f"{space}_feats"]) if per[name][f"{space}_feats"] else None
                    for space in ("clip", "dino")} for name in SAMPLERS}
    teacher_band = _mean(per["teacher"]["high_band"])
    rows = {}
    labels, steps = plan.labels(), plan.steps()
    for name in SAMPLERS:
        acc = per[name]
        row = {"label": labels[name], "steps": steps[name], "seconds_per_image": statistics.median(acc["seconds"]),
               "decode_seconds_per_image": statistics.median(decode),
               "clip_score": M.clip_score(acc["clip_score"]) if acc["clip_score"] else None,
               "preference": _mean(acc["preference"]),
               "sharpness_ratio": (_mean(acc["high_band"]) / teacher_band) if teacher_band else None}
        if name != "teacher":  # distances to the teacher; the teacher is their reference
            row.update(psnr=_mean(acc["psnr"]), ssim=_mean(acc["ssim"]))
            for space in ("dino", "clip"):
                if feats[name][space] is not None:
                    row.update(_distances(feats[name][space], feats["teacher"][space], cfg, space))
        for space in ("dino", "clip"):
            if real.get(space) is not None:
                row.update(_distances(feats[name][space], real[space], cfg, space, "_real"))
        rows[name] = {k: (M.finite_or_none(v) if isinstance(v, float) else v) for k, v in row.items()}
    per_sample = []
    for j, s in enumerate(samples):
        entry = {"sample": s, "prompt_index": s % len(plan.prompts), "seed": cfg.seed + s}
        for name in SAMPLERS:
            acc = per[name]
            entry[name] = {"seconds": acc["seconds"][j], "high_band": acc["high_band"][j],
                           **({"clip_similarity": acc["clip_score"][j]} if acc["clip_score"] else {}),
                           **({"preference": acc["preference"][j]} if acc["preference"] else {}),
                           **({"psnr": acc["psnr"][j], "ssim": acc["ssim"][j]} if name != "teacher" else {})}
        per_sample.append(entry)
    return {"samplers": rows, "per_sample": per_sample,
            "speedup": rows["teacher"]["seconds_per_image"] / rows["student"]["seconds_per_image"]
            if rows["student"]["seconds_per_image"] else None,
            "device": str(device), "provenance_device": f"{plan.provenance['device']}, {plan.provenance['dtype']}"}


def worst_prompts(plan: Plan, result: dict) -> list[dict]:
    """The ``cfg.worst`` prompts where the student is furthest from the teacher on the same noise (lowest mean
    paired PSNR), with the naive 2-step's PSNR beside it for scale."""
    by_prompt: dict[int, list[dict]] = {}
    for entry in result["per_sample"]:
        by_prompt.setdefault(entry["prompt_index"], []).append(entry)
    rows = []
    for p, entries in by_prompt.items():
        band = _mean(e["teacher"]["high_band"] for e in entries)
        rows.append({"prompt_index": p, "prompt": plan.prompts[p], "sample": entries[0]["sample"],
                     "psnr_student": _mean(e["student"]["psnr"] for e in entries),
                     "psnr_naive": _mean(e["naive"]["psnr"] for e in entries),
                     "ssim_student": _mean(e["student"]["ssim"] for e in entries),
                     "sharpness_student": (_mean(e["student"]["high_band"] for e in entries) / band) if band else None})
    rows.sort(key=lambda r: r["psnr_student"])
    return rows[:plan.cfg.worst]


def run_evaluation(model: str, teacher: str | None, prompts: str, out: str, cfg: EvaluateConfig,
                   real: str | None = None, command: str = "") -> str:
    """The whole command; returns the path of ``report.html``."""
    import time

    from twostep.real.evaluation.report import METRIC_SOURCES, write_report

    plan = prepare(model, teacher, prompts, out, cfg, real)
    started = time.perf_counter()
    manifest = sample_shards(plan)
    sampling_s = time.perf_counter() - started
    started = time.perf_counter()
    result = score(plan, manifest)
    result["worst_prompts"] = worst_prompts(plan, result)
    m = cfg.models
    result.update({
        "command": command, "model": os.path.abspath(model), "model_kind": plan.student.kind,
        "teacher": plan.teacher_id,
        "prompts": prompts, "num_prompts": len(plan.prompts), "num_samples": plan.num_samples,
        "resolution": plan.resolution, "student_sigmas": plan.student.sigmas,
        "metric_models": {"clip": None if is_disabled(m.clip) else m.clip,
                          "dino": None if is_disabled(m.dino) else m.dino,
                          "preference": None if "preference" in plan.skipped else m.preference},
        "skipped": dict(plan.skipped), "sources": METRIC_SOURCES, "config": to_dict(cfg),
        "real_images": len(plan.real), "wall_s": {"sampling_this_run": round(sampling_s, 1),
                                                  "metrics": round(time.perf_counter() - started, 1)}})
    return write_report(plan, result, sample_images)
