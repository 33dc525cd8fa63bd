"""2-step inference with stock diffusers: the family's pipeline (``ZImagePipeline``, ...) plus one LoRA adapter per
student step.

The pipeline runs its usual loop; :class:`StepAdapterSwitch` (a ``callback_on_step_end``) activates the next
step's adapter after each step and goes back to the first after the last, so the same pipeline object can be
called again. Nothing here forks diffusers code.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import torch

from twostep.core.errors import TwostepError

INFO = "twostep.json"


@dataclass
class StepAdapterSwitch:
    """``callback_on_step_end`` that puts adapter ``adapters[i + 1]`` in place after step ``i``."""

    adapters: list[str]
    num_inference_steps: int
    # pipeline sigmas (before the scheduler's shift), passed explicitly on every call: diffusers releases before
    # PR #13730 turn num_inference_steps=2 into [1, 0, 0], one real step
    sigmas: list[float]
    # the family's guidance-free call arguments (Z-Image: guidance_scale=0)
    extra: dict = field(default_factory=dict)

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        following = step + 1
        pipe.set_adapters(self.adapters[following] if following < len(self.adapters) else self.adapters[0])
        return callback_kwargs

    def reset(self, pipe) -> None:
        """First step's adapter: call before every generation (an interrupted call may have left step 2 active)."""
        pipe.set_adapters(self.adapters[0])

    def call_kwargs(self) -> dict:
        """What every 2-step call needs: the sigmas (always explicit), no guidance, the switch."""
        return {"sigmas": list(self.sigmas), **self.extra, "callback_on_step_end": self}


def read_export_info(folder: str) -> dict:
    """The export's ``twostep.json``, checked for what :func:`load_two_step_pipeline` and ``generate`` use."""
    from twostep.core.utils import read_json_object

    path = os.path.join(folder, INFO)
    redo = "run `twostep export RUN --format diffusers --out FOLDER` again"
    if not os.path.isfile(path):
        raise TwostepError(f"{folder} is not a twostep diffusers export ({INFO} missing); run "
                           "`twostep export RUN --format diffusers --out FOLDER` first")
    info = read_json_object(path, what="export record", hint=redo)
    if info.get("format", "diffusers") != "diffusers":
        raise TwostepError(f"{folder} is a '{info['format']}' export; `generate` and load_two_step_pipeline run a "
                           "'diffusers' export (`twostep export RUN --format diffusers`); the usage code for this "
                           f"one is in {os.path.join(folder, 'README.md')}")
    adapters, files = info.get("adapters"), info.get("lora_files")
    if not (isinstance(adapters, list) and adapters and all(isinstance(a, str) for a in adapters)
            and isinstance(files, list) and len(files) == len(adapters) and all(isinstance(f, str) for f in files)):
        raise TwostepError(f"{path}: export record needs matching lists 'adapters' and 'lora_files'; {redo}")
    if not (isinstance(info.get("num_steps"), int) and info["num_steps"] >= 1):
        raise TwostepError(f"{path}: export record needs a positive integer 'num_steps'; {redo}")
    resolution = info.get("resolution")
    if resolution is not None and not (isinstance(resolution, int) and not isinstance(resolution, bool)):
        raise TwostepError(f"{path}: export record's 'resolution' must be an integer; {redo}")
    sigmas, shift = info.get("student_sigmas"), info.get("shift")
    if not (isinstance(sigmas, list) and len(sigmas) == info["num_steps"]
            and all(isinstance(s, (int, float)) for s in sigmas) and isinstance(shift, (int, float))):
        raise TwostepError(f"{path}: export record needs 'student_sigmas' (one per step) and 'shift'; {redo}")
    return info


def check_generate_prompts(folder: str, prompts: list[str], path: str | None = None) -> None:
    """Prompts the export's tokenizer would cut off (over the pipeline's max_sequence_length) are refused, by line."""
    from twostep.families.registry import detect_family
    from twostep.real.text_cache import check_prompt_lengths

    check_prompt_lengths(folder, prompts, detect_family(folder).max_sequence_length, path)


def load_two_step_pipeline(folder: str, device=None, dtype: torch.dtype | None = None, resolution: int | None = None):
    """``(pipe, switch)`` for an export folder: the family's stock pipeline + per-step LoRA adapters, first active.
    ``resolution`` (default: the trained one) matters for families whose pipeline shifts by the image size."""
    from twostep.families.registry import detect_family

    info = read_export_info(folder)
    family = detect_family(folder)
    from twostep.core.utils import resolve_device

    device = device if isinstance(device, torch.device) else resolve_device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    pipe = family.load_pipeline(folder, dtype).to(device)
    with warnings.catch_warnings():  # one adapter per step on one model is the design, not a mistake
        warnings.filterwarnings("ignore", message=".*Already found a `peft_config` attribute.*")
        for adapter, path in zip(info["adapters"], info["lora_files"]):
            pipe.load_lora_weights(os.path.join(folder, os.path.dirname(path)), weight_name=os.path.basename(path),
                                   adapter_name=adapter)
    pipe.set_adapters(info["adapters"][0])
    _, height, width = family.latent_shape(folder, resolution or info.get("resolution") or 1024)
    sigmas = family.pipeline_sigmas(info["student_sigmas"], info["shift"], height * width)
    return pipe, StepAdapterSwitch(info["adapters"], info["num_steps"], sigmas,
                                   family.pipeline_call_kwargs(info["num_steps"]))


def generate_images(pipe, switch: StepAdapterSwitch, prompts: list[str], seed: int = 0, resolution: int = 1024,
                    output_type: str = "pil"):
    """One image per prompt; prompt ``i`` uses seed ``seed + i`` (a CPU generator: the same noise on any device)."""
    from twostep.core.utils import progress

    images = []
    for i, prompt in enumerate(progress(prompts, desc="generate")):
        generator = torch.Generator("cpu").manual_seed(seed + i)
        switch.reset(pipe)
        result = pipe(prompt=prompt, height=resolution, width=resolution, generator=generator, output_type=output_type,
                      **switch.call_kwargs())
        images.append(result.images[0])
    return images
