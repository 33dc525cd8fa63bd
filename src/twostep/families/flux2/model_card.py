"""The export's ``README.md`` for a FLUX.2 klein student, and the usage code it shows (run by a test on the tiny
pipeline).

Every student call passes its sigmas and its step count explicitly: ``Flux2KleinPipeline`` shifts the given
sigmas by ``compute_empirical_mu(image tokens, num_inference_steps)``, so the unshifted sigmas below are right for
this step count and resolution only. Guidance stays off (``guidance_scale=1.0``): the student runs one forward per
step.
"""

from __future__ import annotations

from twostep.families.flux2.pipeline_io import schedule_shift

TESTED_DIFFUSERS = "0.42.1"
PEFT_NOTE = "PEFT's 'Already found a peft_config' warning is expected"
EXAMPLE_PROMPT = "a red fox standing in fresh snow at golden hour, detailed fur"
DEFAULT_BASE = "black-forest-labs/FLUX.2-klein-4B"


def pipeline_sigmas(student_sigmas: list[float], image_tokens: int) -> list[float]:
    """The ``sigmas=`` that make ``Flux2KleinPipeline`` (with ``num_inference_steps=len(student_sigmas)``) run
    exactly ``student_sigmas`` on an image of ``image_tokens`` latent tokens: its size-dependent shift undone."""
    shift = schedule_shift(image_tokens, len(student_sigmas))
    return [round(s / (shift - (shift - 1) * s), 6) for s in student_sigmas]


def image_tokens(info: dict) -> int:
    """Latent tokens of the export's image (its recorded latent shape; klein's 16 px per token otherwise)."""
    shape = info.get("latent_shape")
    if isinstance(shape, list) and len(shape) == 3:
        return int(shape[1]) * int(shape[2])
    return ((info.get("resolution") or 1024) // 16) ** 2


def base_reference(info: dict) -> str:
    base = info.get("base_model") or DEFAULT_BASE
    return f"path/to/{base.split(' (')[0]}" if " (local folder" in base else base


def _call(info: dict, sigmas: list[float], callback: str) -> str:
    res = info.get("resolution") or 1024
    return (f'prompt = "{EXAMPLE_PROMPT}"\n'
            f'image = pipe(prompt=prompt, sigmas={sigmas}, num_inference_steps={info["num_steps"]}, '
            'guidance_scale=1.0,\n'
            f'             height={res}, width={res}, callback_on_step_end={callback}).images[0]\n'
            'image.save("image.png")\n')


def usage_snippet(fmt: str, info: dict, folder: str = "path/to/this/export") -> str:
    """Complete, runnable Python for ``fmt`` (imports, a prompt, the trained resolution, the step switch)."""
    sigmas = pipeline_sigmas(info["student_sigmas"], image_tokens(info))
    steps = tuple(range(1, info["num_steps"] + 1))
    base = base_reference(info)
    switch = ('def next_step(pipe, i, t, kwargs):  # after step i: the adapter of step i + 1 (step 1 after the last)\n'
              f'    pipe.set_adapters(f"step{{i + 2}}" if i + 1 < {len(steps)} else "step1")\n'
              '    return kwargs\n\n\n'
              'pipe.set_adapters("step1")  # before every call: an interrupted call can leave another step active\n')
    if fmt in ("diffusers", "lora"):
        source = ('export = "{folder}"  # this folder, or its hub id once uploaded\n'
                  'pipe = Flux2KleinPipeline.from_pretrained(export, dtype=torch.bfloat16).to("cuda")\n'
                  if fmt == "diffusers" else
                  'loras = "{folder}"  # this folder, or its hub id once uploaded\n'
                  f'pipe = Flux2KleinPipeline.from_pretrained("{base}", dtype=torch.bfloat16).to("cuda")\n')
        load = ('    pipe.load_lora_weights(export, subfolder="twostep_lora", '
                'weight_name=f"step{step}_lora.safetensors",\n'
                '                           adapter_name=f"step{step}")\n' if fmt == "diffusers" else
                '    pipe.load_lora_weights(loras, weight_name=f"step{step}_lora.safetensors", '
                'adapter_name=f"step{step}")\n')
        return ('import torch\n'
                'from diffusers import Flux2KleinPipeline\n\n'
                + source.format(folder=folder)
                + f'for step in {steps}:  # one LoRA adapter per student step ({PEFT_NOTE})\n' + load + '\n\n'
                + switch + _call(info, sigmas, "next_step"))
    if fmt == "merged":
        return ('import torch\n'
                'from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel\n\n'
                f'export = "{folder}"\n'
                'steps = [Flux2Transformer2DModel.from_pretrained(export, subfolder=f"transformer_step{k}", '
                'dtype=torch.bfloat16)\n'
                f'         .to("cuda") for k in {steps}]  # one full transformer per student step\n'
                f'pipe = Flux2KleinPipeline.from_pretrained("{base}", transformer=steps[0], dtype=torch.bfloat16)\n'
                'pipe = pipe.to("cuda")\n\n\n'
                'def next_step(pipe, i, t, kwargs):  # after step i: the transformer of step i + 1\n'
                '    pipe.transformer = steps[(i + 1) % len(steps)]\n'
                '    return kwargs\n\n\n'
                'pipe.transformer = steps[0]  # before every call\n'
                + _call(info, sigmas, "next_step"))
    return ""  # comfyui: a workflow, described in the card


def model_card(fmt: str, info: dict, config_summary: dict, comfy_text: str = "") -> str:
    """``README.md`` for an export: Hugging Face metadata header, what it is, usage, schedule, training summary."""
    base = info.get("base_model") or DEFAULT_BASE
    hub_base = base if "(" not in base else None
    res = info.get("resolution") or 1024
    header = ["---", "library_name: diffusers", "pipeline_tag: text-to-image",
              "tags:", "  - twostep", "  - flux2", "  - distillation", "  - few-step"]
    if fmt in ("lora", "comfyui", "diffusers"):
        header.append("  - lora")
    if hub_base:
        header += [f"base_model: {hub_base}", "base_model_relation: adapter" if fmt != "merged" else
                   "base_model_relation: merge"]
    header.append("---")
    what = {
        "diffusers": "a complete `Flux2KleinPipeline` folder (the base model's components) plus one LoRA adapter "
                     "per student step in `twostep_lora/`",
        "lora": "one LoRA per student step (`step{k}_lora.safetensors`, diffusers/PEFT names, scale baked in: load "
                "at strength 1)",
        "comfyui": "one LoRA per student step for ComfyUI (`step{k}_lora_comfyui.safetensors`, ComfyUI's FLUX.2 "
                   "key names with `.alpha` = rank: load at strength 1)",
        "merged": "one full `Flux2Transformer2DModel` per student step (`transformer_step{k}/`, base + LoRA merged)",
    }[fmt]
    teacher_steps = info.get("teacher_steps") or 4
    lines = header + [
        "", f"# {info['num_steps']}-step {base}", "",
        f"A {info['num_steps']}-step student of `{base}` ({teacher_steps} steps), distilled with "
        "[twostep](https://github.com/twostep/twostep) (Z-Image Turbo++ recipe: per-step parameters, end-to-end "
        f"training, adversarial loss against the teacher's own samples). This folder is the `{fmt}` export: {what}.",
    ] + ([f"", f"![teacher and this student on the same noise]({info['samples']})"] if info.get("samples") else []) + [
        "", "## Schedule", "",
        f"Student step k starts at sigma {info['student_sigmas']} (then 0) and uses adapter `step{{k}}`. At "
        f"{res}px pass `sigmas={pipeline_sigmas(info['student_sigmas'], image_tokens(info))}` with "
        f"`num_inference_steps={info['num_steps']}`: the pipeline shifts them by the image size "
        "(`compute_empirical_mu`), so other resolutions need other values (`twostep generate` computes them).",
        "", "## Usage", "",
    ]
    snippet = usage_snippet(fmt, info)
    if snippet:
        lines += [f"Tested with diffusers {TESTED_DIFFUSERS}. Guidance stays off (`guidance_scale=1.0`: one forward "
                  "per step).", "", "```python", snippet.rstrip(), "```", ""]
    if fmt == "diffusers":
        lines += ["With twostep installed: `twostep generate --model THIS_FOLDER \"a prompt\"`, or "
                  "`pipe, switch = twostep.real.pipeline.load_two_step_pipeline(THIS_FOLDER)` then "
                  "`pipe(prompt=prompt, **switch.call_kwargs())`.", ""]
    if comfy_text:
        lines += [comfy_text.strip(), ""]
    lines += ["## Training", "", "| | |", "|---|---|",
              f"| base model | {base} |", f"| teacher fingerprint | `{str(info.get('teacher_fingerprint'))[:16]}` |"]
    lines += [f"| {key} | {value} |" for key, value in config_summary.items()]
    lines += ["", "Generated by `twostep export`; `twostep.json` holds the same facts for scripts.", ""]
    return "\n".join(lines)
