"""The three samplers ``twostep evaluate`` compares, on one stock ``ZImagePipeline`` (the teacher held once):

- ``teacher``: the pipeline as users run it, ``num_inference_steps = teacher_steps`` (8), every adapter off;
- ``naive``: the same teacher on the student's sigmas (2 steps: ``[1, .75]`` after the shift), adapters off;
  a guided teacher (its data made with CFG) runs both rows at its guidance, the student none;
- ``student``: the student's per-step LoRA adapters switched by :class:`~twostep.real.pipeline.StepAdapterSwitch`, on
  the same explicit sigmas, exactly as ``twostep generate`` and the export's usage code run it.

The student comes from a training run (``RUN/student.safetensors``: its EMA weights, turned into per-step LoRAs in
memory as ``twostep export`` would) or from a ``diffusers`` / ``lora`` export (its LoRA files). Every call gets
the same cached prompt embedding and the same starting latents, so the three images of a sample differ only by
sampler. Nothing here forks diffusers code.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field

import torch

from twostep.core.errors import TwostepError
from twostep.core.utils import file_sha256, read_json_object

Tensor = torch.Tensor
SAMPLERS = ("teacher", "naive", "student")


@dataclass
class StudentSource:
    """What is needed of a student before any model loads. ``loras[k]``: step ``k + 1``'s LoRA in diffusers naming
    (``transformer.{module}.lora_A.weight``, scale baked into ``lora_B``)."""

    path: str
    kind: str  # "run" | "export"
    sigmas: list[float]
    shift: float
    identity: str  # sha256 of the weights: what the evaluation folder's shards were made with
    teacher_fingerprint: str | None = None
    default_teacher: str | None = None  # what --teacher defaults to
    resolution: int | None = None
    loras: list[dict[str, Tensor]] = field(default_factory=list, repr=False)
    teacher_steps: int | None = None  # the teacher's step count in training (None: not recorded)
    guidance_scale: float = 0.0  # the teacher's CFG scale when its data was made (0: none)
    negative_prompt: str = ""  # and its unconditional prompt

    @property
    def num_steps(self) -> int:
        return len(self.sigmas)


def _inside(folder: str, relative: str, record: str) -> str:
    """``folder/relative`` when it stays inside ``folder`` (a record is a user file: ``../`` is refused)."""
    path = os.path.realpath(os.path.join(folder, relative))
    if not (isinstance(relative, str) and path.startswith(os.path.realpath(folder) + os.sep)):
        raise TwostepError(f"{record}: file {relative!r} lies outside the export folder; export again")
    return path


def _load_lora(path: str) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise TwostepError(f"LoRA file {path} is missing; export again")
    try:
        tensors = load_file(path)
    except Exception as err:  # noqa: BLE001 - any parse failure: not a usable safetensors file
        raise TwostepError(f"{path}: not a readable safetensors LoRA file ({type(err).__name__}); export again") \
            from None
    if not tensors or not all(k.startswith("transformer.") for k in tensors):
        raise TwostepError(f"{path}: not a diffusers-named LoRA (keys 'transformer.*'); evaluate a "
                           "diffusers or lora export, or the training run")
    return {k: v.float() for k, v in tensors.items()}


def _read_export(folder: str) -> StudentSource:
    from twostep.real.pipeline import INFO, read_export_info

    record = os.path.join(folder, INFO)
    info = read_json_object(record, what="export record", hint="export again")
    fmt = info.get("format", "diffusers")
    if fmt == "diffusers":
        info = read_export_info(folder)  # every field generate relies on, checked
        files = info["lora_files"]
    elif fmt == "lora":
        files = info.get("files")
        sigmas = info.get("student_sigmas")
        if not (isinstance(files, list) and isinstance(sigmas, list) and len(files) == len(sigmas) >= 1
                and all(isinstance(s, (int, float)) for s in sigmas)
                and isinstance(info.get("shift"), (int, float))):
            raise TwostepError(f"{record}: export record needs 'files' and 'student_sigmas' (one per step) and "
                               "'shift'; export again")
    else:
        raise TwostepError(f"{folder} is a '{fmt}' export; evaluate reads a training run or a 'diffusers' or 'lora' "
                           "export (`twostep export RUN --format diffusers`)")
    paths = [_inside(folder, f, record) for f in files]
    base = info.get("base_model")
    default = folder if fmt == "diffusers" else (base if isinstance(base, str) and "(local folder" not in base
                                                  else None)
    identity = file_sha256_of(paths)
    resolution = info.get("resolution") if isinstance(info.get("resolution"), int) else None
    guidance = info.get("teacher_guidance", {})
    if not (isinstance(guidance, dict) and isinstance(guidance.get("scale", 0.0), (int, float))
            and isinstance(guidance.get("negative_prompt", ""), str)):
        raise TwostepError(f"{record}: 'teacher_guidance' must be {{\"scale\": number, \"negative_prompt\": text}}; "
                           "export again")
    return StudentSource(folder, "export", [float(s) for s in info["student_sigmas"]], float(info["shift"]), identity,
                         info.get("teacher_fingerprint"), default, resolution, [_load_lora(p) for p in paths],
                         info.get("teacher_steps") if isinstance(info.get("teacher_steps"), int) else None,
                         float(guidance.get("scale", 0.0)), guidance.get("negative_prompt", ""))


def file_sha256_of(paths: list[str]) -> str:
    import hashlib

    h = hashlib.sha256()
    for path in paths:
        h.update(file_sha256(path).encode())
    return h.hexdigest()


def _read_run(run_dir: str) -> StudentSource:
    from twostep.real.export import lora_files
    from twostep.real.train import STUDENT_WEIGHTS, load_real_run

    cfg, meta, state = load_real_run(run_dir)
    if cfg.student.form != "lora":
        raise TwostepError(f"{run_dir} trained full per-step copies (student.form=full); evaluate reads LoRA "
                           "students (a run or its diffusers export)")
    if cfg.student.renoise != "euler":
        raise TwostepError(f"{run_dir} was trained with student.renoise={cfg.student.renoise}; the pipeline moves "
                           "between steps by the Euler step, so evaluate (like export) needs renoise=euler")
    loras = lora_files(state, cfg.student, torch.float32)
    recorded = meta.get("teacher")
    default = recorded if isinstance(recorded, str) and os.path.isdir(recorded) else cfg.model.path
    return StudentSource(run_dir, "run", [float(s) for s in cfg.student.sigmas], float(cfg.teacher_data.shift),
                         file_sha256(os.path.join(run_dir, STUDENT_WEIGHTS)), meta.get("teacher_fingerprint"),
                         default, cfg.teacher_data.resolution, loras, cfg.teacher_data.teacher_steps,
                         float(cfg.teacher_data.guidance_scale), cfg.teacher_data.negative_prompt)


def read_student(path: str) -> StudentSource:
    """A training run folder (``student.safetensors``) or an export folder (``twostep.json``); checked, nothing
    heavy loaded."""
    from twostep.real.pipeline import INFO

    if not os.path.isdir(path):
        raise TwostepError(f"--model {path}: no such folder; give a `twostep train` run folder (a real-model config) or "
                           "a `twostep export` folder")
    if os.path.isfile(os.path.join(path, INFO)):
        return _read_export(path)
    if os.path.isfile(os.path.join(path, "config.yaml")):
        return _read_run(path)
    raise TwostepError(f"--model {path} is neither a training run (no config.yaml) nor an export (no {INFO})")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Samplers:
    """The teacher pipeline with the student's adapters loaded; :meth:`sample` runs one sampler on one sample."""

    def __init__(self, teacher_folder: str, student: StudentSource, device: torch.device, dtype: torch.dtype,
                 resolution: int, teacher_steps: int = 8):
        from twostep.families.registry import detect_family
        from twostep.real.pipeline import StepAdapterSwitch

        self.device, self.resolution, self.teacher_steps = device, resolution, teacher_steps
        self.family = family = detect_family(teacher_folder)
        self.pipe = family.load_pipeline(teacher_folder, dtype).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        adapters = [f"step{k}" for k in range(1, student.num_steps + 1)]
        with warnings.catch_warnings():  # one adapter per step on one model is the design, not a mistake
            warnings.filterwarnings("ignore", message=".*Already found a `peft_config` attribute.*")
            for name, lora in zip(adapters, student.loras):
                self.pipe.load_lora_weights(dict(lora), adapter_name=name)  # a copy: diffusers may consume the dict
        _, height, width = family.latent_shape(teacher_folder, resolution)
        sigmas = family.pipeline_sigmas(student.sigmas, student.shift, height * width)
        self.switch = StepAdapterSwitch(adapters, student.num_steps, sigmas,
                                        family.pipeline_call_kwargs(student.num_steps))
        # a guided teacher (its data made with CFG) is sampled as the data was, at its 8 steps and on the student's
        # sigmas alike: the student is measured against the teacher it learned from
        self.guidance: dict = {}
        if family.check_guidance(teacher_folder, student.guidance_scale):
            negative = self.encode([student.negative_prompt])[0]
            self.guidance = family.guidance_call_kwargs(student.guidance_scale, negative)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> list[Tensor]:
        """Prompt embeddings exactly as the pipeline computes them, once per prompt for all three samplers."""
        return self.family.encode_with_pipeline(self.pipe, prompts, self.device)

    def _kwargs(self, name: str) -> dict:
        if name == "teacher":
            self.pipe.disable_lora()
            return {**self.family.pipeline_call_kwargs(self.teacher_steps), "num_inference_steps": self.teacher_steps,
                    **self.guidance}
        if name == "naive":
            self.pipe.disable_lora()
            return {"sigmas": list(self.switch.sigmas), **self.switch.extra, **self.guidance}
        self.pipe.enable_lora()
        self.switch.reset(self.pipe)
        return self.switch.call_kwargs()

    @torch.no_grad()
    def sample(self, name: str, embed: Tensor, noise: Tensor) -> tuple[Tensor, float]:
        """``(latents (1, C, h, w) on CPU, seconds)`` of sampler ``name`` from ``noise`` ``(1, C, h, w)``; the time
        covers the denoising loop only (the embedding is given; decoding is timed by :meth:`decode`)."""
        kwargs = self._kwargs(name)
        sync(self.device)
        start = time.perf_counter()
        latents = self.family.pipeline_latents(self.pipe, embed, noise.to(self.device), self.resolution, **kwargs)
        sync(self.device)
        return latents.float().cpu(), time.perf_counter() - start

    @torch.no_grad()
    def decode(self, latents: Tensor) -> tuple[Tensor, float]:
        """``(uint8 (N, 3, H, W), seconds)``: the VAE decode the pipeline does."""
        sync(self.device)
        start = time.perf_counter()
        images = self.family.decode_to_uint8(self.pipe.vae, latents)
        sync(self.device)
        return images, time.perf_counter() - start
