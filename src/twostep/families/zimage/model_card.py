"""The ``README.md`` model card every export writes, and the usage code it shows.

One source for the usage code: the card, ``docs/zimage.md`` and the README show :func:`usage_snippet`'s output,
and a test runs it on the tiny pipeline. Every 2-step call passes its sigmas explicitly: diffusers releases before
PR #13730 ("Fix redundant Z-Image terminal timestep") space ``num_inference_steps=2`` down to 0 and would run a
single real step without a word. The card records no absolute path: the teacher is named by its hub id, or by its
folder's name and fingerprint.
"""

from __future__ import annotations

from twostep.engine.flow import turbo_sigmas
from twostep.families.folders import teacher_name  # noqa: F401  (re-exported: the card's one name for it)

TESTED_DIFFUSERS = "0.42.1"  # the release the exports are tested with (pinned in pyproject.toml)
# PEFT warns "Already found a `peft_config` attribute in the model" when the second adapter loads: expected here
PEFT_NOTE = "PEFT's 'Already found a peft_config' warning is expected"
EXAMPLE_PROMPT = "a red fox standing in fresh snow at golden hour, detailed fur"


def pipeline_sigmas(student_sigmas: list[float], shift: float) -> list[float]:
    """The ``sigmas=`` to give ``ZImagePipeline``: its scheduler applies the shift to them, so these are the
    student's sigmas with the shift undone (``[1.0, 0.5]`` for ``[1.0, 0.75]`` at shift 3)."""
    return [round(s / (shift - (shift - 1) * s), 6) for s in student_sigmas]


def base_reference(info: dict) -> str:
    """What ``from_pretrained`` gets for the base model: its hub id, or ``path/to/NAME`` for a local teacher."""
    base = info.get("base_model") or "Tongyi-MAI/Z-Image-Turbo"
    return f"path/to/{base.split(' (')[0]}" if " (local folder" in base else base


def usage_snippet(fmt: str, info: dict, folder: str = "path/to/this/export") -> str:
    """Complete, runnable Python for ``fmt`` (imports, a prompt, the trained resolution, the step switch)."""
    sigmas = pipeline_sigmas(info["student_sigmas"], info["shift"])
    res = info.get("resolution") or 1024
    steps = list(range(1, info["num_steps"] + 1))
    switch = ('def next_step(pipe, i, t, kwargs):  # after step i: the adapter of step i + 1 (step 1 after the last)\n'
              f'    pipe.set_adapters(f"step{{i + 2}}" if i + 1 < {len(steps)} else "step1")\n'
              '    return kwargs\n')
    call = (f'prompt = "{EXAMPLE_PROMPT}"\n'
            'pipe.set_adapters("step1")  # before every call: an interrupted call can leave another step active\n'
            f'image = pipe(prompt, sigmas={sigmas}, guidance_scale=0.0, height={res}, width={res},\n'
            '             callback_on_step_end=next_step).images[0]\n'
            'image.save("image.png")\n')
    if fmt == "diffusers":
        return ('import torch\n'
                'from diffusers import ZImagePipeline\n\n'
                f'export = "{folder}"  # this folder, or its hub id once uploaded\n'
                'pipe = ZImagePipeline.from_pretrained(export, dtype=torch.bfloat16).to("cuda")\n'
                f'for step in {tuple(steps)}:  # one LoRA adapter per student step ({PEFT_NOTE})\n'
                '    pipe.load_lora_weights(export, subfolder="twostep_lora", weight_name=f"step{step}_lora.safetensors",\n'
                '                           adapter_name=f"step{step}")\n\n\n'
                f'{switch}\n\n{call}')
    base = base_reference(info)
    if fmt == "lora":
        return ('import torch\n'
                'from diffusers import ZImagePipeline\n\n'
                f'loras = "{folder}"  # this folder, or its hub id once uploaded\n'
                f'pipe = ZImagePipeline.from_pretrained("{base}", dtype=torch.bfloat16).to("cuda")\n'
                f'for step in {tuple(steps)}:  # one LoRA adapter per student step ({PEFT_NOTE})\n'
                '    pipe.load_lora_weights(loras, weight_name=f"step{step}_lora.safetensors", adapter_name=f"step{step}")\n'
                '\n\n'
                f'{switch}\n\n{call}')
    if fmt == "merged":
        return ('import torch\n'
                'from diffusers import ZImagePipeline, ZImageTransformer2DModel\n\n'
                f'export = "{folder}"\n'
                'steps = [ZImageTransformer2DModel.from_pretrained(export, subfolder=f"transformer_step{k}", '
                'dtype=torch.bfloat16)\n'
                f'         .to("cuda") for k in {tuple(steps)}]  # one full transformer per student step\n'
                f'pipe = ZImagePipeline.from_pretrained("{base}", transformer=steps[0], dtype=torch.bfloat16)\n'
                'pipe = pipe.to("cuda")\n'
                '\n\n'
                'def next_step(pipe, i, t, kwargs):  # after step i: the transformer of step i + 1\n'
                '    pipe.transformer = steps[(i + 1) % len(steps)]\n'
                '    return kwargs\n\n\n'
                f'prompt = "{EXAMPLE_PROMPT}"\n'
                'pipe.transformer = steps[0]  # before every call\n'
                f'image = pipe(prompt, sigmas={sigmas}, guidance_scale=0.0, height={res}, width={res},\n'
                '             callback_on_step_end=next_step).images[0]\n'
                'image.save("image.png")\n')
    return ""  # comfyui: a workflow, described in the card


def model_card(fmt: str, info: dict, config_summary: dict, comfy_text: str = "") -> str:
    """``README.md`` for an export: Hugging Face metadata header, what it is, usage, schedule, training summary."""
    base = info.get("base_model") or "Tongyi-MAI/Z-Image-Turbo"
    hub_base = base if "(" not in base else None  # a local teacher has no hub id to link
    default = turbo_sigmas(info["num_steps"], info["shift"]).tolist()[:-1]
    header = ["---", "library_name: diffusers", "pipeline_tag: text-to-image",
              "tags:", "  - twostep", "  - z-image", "  - distillation", "  - few-step"]
    if fmt in ("lora", "comfyui", "diffusers"):
        header.append("  - lora")
    if hub_base:
        header += [f"base_model: {hub_base}", "base_model_relation: adapter" if fmt != "merged" else
                   "base_model_relation: merge"]
    header.append("---")
    what = {
        "diffusers": "a complete `ZImagePipeline` folder (the base model's components) plus one LoRA adapter per "
                     "student step in `twostep_lora/`",
        "lora": "one LoRA per student step (`step{k}_lora.safetensors`, diffusers/PEFT names, scale baked in: load "
                "at strength 1)",
        "comfyui": "one LoRA per student step for ComfyUI (`step{k}_lora_comfyui.safetensors`, `diffusion_model.` "
                   "keys with `.alpha` = rank: load at strength 1)",
        "merged": "one full `ZImageTransformer2DModel` per student step (`transformer_step{k}/`, base + LoRA merged)",
    }[fmt]
    lines = header + [
        "", f"# {info['num_steps']}-step {base}", "",
        f"A {info['num_steps']}-step student of `{base}` (8 steps), distilled with "
        "[twostep](https://github.com/twostep/twostep) (Z-Image Turbo++ recipe: per-step parameters, end-to-end "
        f"training, adversarial loss against the teacher's own samples). This folder is the `{fmt}` export: {what}.",
    ] + (["", f"![teacher 8 steps and this student's 2 steps on the same noise]({info['samples']})"]
         if info.get("samples") else []) + [
        "", "## Schedule", "",
        f"Student step k starts at sigma {info['student_sigmas']} (then 0), shift {info['shift']}; step k uses adapter "
        f"`step{{k}}`. Pass these sigmas explicitly (`sigmas={pipeline_sigmas(info['student_sigmas'], info['shift'])}`"
        ", before the pipeline's shift): diffusers releases before PR #13730 turn `num_inference_steps=2` into one "
        "real step. " + ("This is the default Turbo schedule at 2 steps." if all(
            abs(a - b) < 1e-6 for a, b in zip(info["student_sigmas"], default)) else
            "**This is not the default schedule**: the sigmas above are required."),
        "", "## Usage", "",
    ]
    snippet = usage_snippet(fmt, info)
    if snippet:
        lines += [f"Tested with diffusers {TESTED_DIFFUSERS} (`dtype=`; older releases take `torch_dtype=`). "
                  "Guidance stays off (Z-Image-Turbo is guidance-distilled).", "", "```python", snippet.rstrip(),
                  "```", ""]
    if fmt == "diffusers":
        lines += ["With twostep installed: `twostep generate --model THIS_FOLDER \"a prompt\"`, or "
                  "`pipe, switch = twostep.real.pipeline.load_two_step_pipeline(THIS_FOLDER)` then "
                  "`pipe(prompt, **switch.call_kwargs())`.", ""]
    if comfy_text:
        lines += [comfy_text.strip(), ""]
    lines += ["## Training", "", "| | |", "|---|---|",
              f"| base model | {base} |", f"| teacher fingerprint | `{str(info.get('teacher_fingerprint'))[:16]}` |"]
    for key, value in config_summary.items():
        lines.append(f"| {key} | {value} |")
    lines += ["", "Generated by `twostep export`; `twostep.json` holds the same facts for scripts.", ""]
    return "\n".join(lines)
