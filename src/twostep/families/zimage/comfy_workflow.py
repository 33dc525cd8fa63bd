"""The ComfyUI workflow shipped with every ``comfyui`` export (``workflow_api.json``), its model-card text and a
picture of it.

The graph is ComfyUI's API ("prompt") format, ``{node_id: {"class_type", "inputs", "_meta": {"title"}}}``, a link
being ``[source_node_id, output_index]``. ComfyUI's app opens such a file when it is dropped on the window or
opened from the Workflow menu: its file loader calls every JSON object whose values all carry ``class_type`` (and
an ``inputs`` object) an API workflow and builds the graph from it with ``loadApiJson``, which creates the nodes,
connects the links, sets the widgets by name and arranges the nodes (Comfy-Org/ComfyUI_frontend
``src/scripts/app.ts`` ``handleFile``/``isApiJson``/``loadApiJson``, ``src/scripts/metadata/json.ts``). The same
file can be POSTed to a ComfyUI server's ``/prompt`` as is. So the top level holds nodes only: no metadata key.

One student step per sampler (``N`` = the student's number of steps, 2 for the default student)::

    UNETLoader -> ModelSamplingAuraFlow(shift) -+-> LoraLoaderModelOnly(step k LoRA, 1.0) -> BasicGuider_k
                                               +-> BasicScheduler(simple, N, 1.0) -> SplitSigmas(1) [-> ...]
    CLIPLoader(qwen_3_4b, lumina2) -> CLIPTextEncode(prompt) -> BasicGuider_k (conditioning)
    SamplerCustomAdvanced_k(noise = RandomNoise for k = 1 else DisableNoise, guider_k, KSamplerSelect(euler),
                            sigmas of step k, latent = EmptySD3LatentImage for k = 1 else sampler_{k-1}'s output)
    VAELoader(ae) + last sampler -> VAEDecode -> SaveImage

ComfyUI's ``simple`` scheduler on the shifted model gives the student's sigmas exactly when they are the default
Turbo schedule at 2 (or 4) steps (:func:`comfy_simple_sigmas`); any other schedule is given to the samplers as
numbers by a ``ManualSigmas`` node (ComfyUI core, marked experimental there) split the same way.

``python -m twostep.families.zimage.comfy_workflow --draw docs/img/comfyui_workflow.png`` draws the default workflow;
``--out FILE`` writes it.
"""

from __future__ import annotations

import argparse
import json

from twostep.engine.flow import shift_sigma
from twostep.families.comfy_graph import count, draw_workflow, layout, links, number, topological_order  # noqa: F401
from twostep.families.zimage.model_card import EXAMPLE_PROMPT

DEFAULT_UNET = "z_image_turbo_bf16.safetensors"   # the file names of ComfyUI's Z-Image-Turbo example and template
DEFAULT_TEXT_ENCODER = "qwen_3_4b.safetensors"    # (Comfy-Org/z_image_turbo, split_files/...)
DEFAULT_VAE = "ae.safetensors"
# CLIPLoader type of ComfyUI's Z-Image template; comfy/sd.py makes Qwen3-4B the Z-Image encoder for any but flux/flux2
CLIP_TYPE = "lumina2"
WORKFLOW_FILE = "workflow_api.json"
DEFAULT_PROMPT = EXAMPLE_PROMPT  # the prompt of the card's diffusers code
MODEL_FOLDERS = {"diffusion model": "models/diffusion_models", "LoRA": "models/loras",
                 "text encoder": "models/text_encoders", "VAE": "models/vae"}
DOWNLOADS = "https://huggingface.co/Comfy-Org/z_image_turbo/resolve/main/split_files"
_TIMESTEPS = 1000  # entries in the sigma table of ComfyUI's ModelSamplingDiscreteFlow


def comfy_simple_sigmas(shift: float, steps: int) -> list[float]:
    """What ``BasicScheduler(scheduler="simple", steps, denoise=1)`` gives on a ``ModelSamplingAuraFlow(shift)``
    model: ``steps + 1`` sigmas ending in 0.

    The model's table is ``sigmas[i] = shift_sigma((i + 1) / 1000, shift)`` (ComfyUI's ``time_snr_shift``), ``i = 0..999`` (AuraFlow's multiplier
    1 cancels); ``simple`` takes ``sigmas[-(1 + int(x · 1000 / steps))]`` for ``x = 0..steps-1`` and appends 0.
    2 steps at shift 3: ``[1.0, 0.75, 0.0]``.
    """
    table = [shift_sigma((i + 1) / _TIMESTEPS, shift) for i in range(_TIMESTEPS)]
    ss = len(table) / steps
    return [table[-(1 + int(x * ss))] for x in range(steps)] + [0.0]


def build_workflow(lora_files: list[str], sigmas: list[float], shift: float = 3.0, resolution: int = 1024,
                   prompt: str = DEFAULT_PROMPT, seed: int = 0, unet: str = DEFAULT_UNET,
                   text_encoder: str = DEFAULT_TEXT_ENCODER, vae: str = DEFAULT_VAE,
                   filename_prefix: str = "twostep") -> dict:
    """The API-format graph: student step ``k`` samples from ``sigmas[k]`` to the next sigma (0 after the last)
    with ``lora_files[k]`` on the shifted base model.

    ``sigmas``: the student's start sigmas (``[1.0, 0.75]``), after the shift, as the export's ``twostep.json``
    records them. ``lora_files``: one file name per step, as they will sit in ``models/loras``.
    """
    steps = len(sigmas)
    if steps < 1 or len(lora_files) != steps:
        raise ValueError(f"need one LoRA file per student step: {len(lora_files)} files for {steps} steps")
    if any(not 0 < s <= 1 for s in sigmas) or any(b >= a for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError(f"student sigmas must decrease within (0, 1]: {sigmas}")
    graph: dict[str, dict] = {}

    def add(class_type: str, title: str, **inputs) -> str:
        node_id = str(len(graph) + 1)
        graph[node_id] = {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}
        return node_id

    def span(k: int) -> str:
        end = sigmas[k + 1] if k + 1 < steps else 0.0
        return f"sigma {number(sigmas[k])} -> {number(end)}"

    unet_node = add("UNETLoader", "Load Z-Image-Turbo", unet_name=unet, weight_dtype="default")
    shifted = add("ModelSamplingAuraFlow", f"Flow shift {shift:g}", model=[unet_node, 0], shift=float(shift))
    loras = [add("LoraLoaderModelOnly", f"Step {k + 1} LoRA", model=[shifted, 0], lora_name=name,
                 strength_model=1.0) for k, name in enumerate(lora_files)]
    clip = add("CLIPLoader", "Load Qwen3-4B text encoder", clip_name=text_encoder, type=CLIP_TYPE)
    text = add("CLIPTextEncode", "Prompt", text=prompt, clip=[clip, 0])
    guiders = [add("BasicGuider", f"Step {k + 1} guider", model=[lora, 0], conditioning=[text, 0])
               for k, lora in enumerate(loras)]
    sampler = add("KSamplerSelect", "Euler", sampler_name="euler")
    schedule = list(sigmas) + [0.0]
    if all(abs(a - b) < 1e-6 for a, b in zip(comfy_simple_sigmas(shift, steps), schedule)):
        sigma_node = add("BasicScheduler", "Student schedule", model=[shifted, 0], scheduler="simple", steps=steps,
                         denoise=1.0)
    else:
        sigma_node = add("ManualSigmas", "Student schedule", sigmas=", ".join(number(s) for s in schedule))
    step_sigmas, rest = [], [sigma_node, 0]
    for k in range(steps - 1):  # peel step k off the front: high = [s_k, s_k+1], low = the rest
        split = add("SplitSigmas", f"Split after step {k + 1}", sigmas=rest, step=1)
        step_sigmas.append([split, 0])
        rest = [split, 1]
    step_sigmas.append(rest)
    noise = add("RandomNoise", "Noise (seed)", noise_seed=int(seed))
    no_noise = add("DisableNoise", "No new noise") if steps > 1 else None
    latent = [add("EmptySD3LatentImage", f"Empty latent {resolution}x{resolution}", width=int(resolution),
                  height=int(resolution), batch_size=1), 0]
    for k in range(steps):
        latent = [add("SamplerCustomAdvanced", f"Step {k + 1} sampler ({span(k)})",
                      noise=[noise if k == 0 else no_noise, 0], guider=[guiders[k], 0], sampler=[sampler, 0],
                      sigmas=step_sigmas[k], latent_image=latent), 0]
    vae_node = add("VAELoader", "Load Z-Image VAE", vae_name=vae)
    image = add("VAEDecode", "Decode", samples=latent, vae=[vae_node, 0])
    add("SaveImage", "Save", images=[image, 0], filename_prefix=filename_prefix)
    return graph


def workflow_for_export(info: dict, lora_files: list[str], **kwargs) -> dict:
    """:func:`build_workflow` for an export's ``twostep.json`` facts (sigmas, shift, trained resolution)."""
    return build_workflow(lora_files, list(info["student_sigmas"]), shift=float(info["shift"]),
                          resolution=int(info.get("resolution") or 1024), **kwargs)


def card_text(info: dict, lora_files: list[str], graph: dict, workflow_file: str = WORKFLOW_FILE) -> str:
    """The model card's ComfyUI section: where each file goes, how to open the workflow, what each node does."""
    nodes = {n["class_type"]: n["inputs"] for n in graph.values()}
    steps = len(lora_files)
    sigmas = list(info["student_sigmas"]) + [0.0]
    res = nodes["EmptySD3LatentImage"]["width"]
    shift = nodes["ModelSamplingAuraFlow"]["shift"]
    pretty = "[" + ", ".join(number(s) for s in sigmas) + "]"
    lora_list = ", ".join(f"`{name}`" for name in lora_files)
    lines = [
        "## ComfyUI", "",
        f"`{workflow_file}` is the {count(steps)}-sampler workflow for these LoRAs (ComfyUI builds with Z-Image "
        "support, late Nov 2025 on). Put each file in its ComfyUI folder, then drag the workflow onto the ComfyUI "
        "window (or Workflow > Open): ComfyUI reads this API-format file and lays the nodes out. Edit the prompt "
        "(and the seed) and run.", "",
        "| file | ComfyUI folder |", "|---|---|",
        f"| {lora_list} (this folder) | `{MODEL_FOLDERS['LoRA']}/` |",
        f"| [`{nodes['UNETLoader']['unet_name']}`]({DOWNLOADS}/diffusion_models/{DEFAULT_UNET}) | "
        f"`{MODEL_FOLDERS['diffusion model']}/` |",
        f"| [`{nodes['CLIPLoader']['clip_name']}`]({DOWNLOADS}/text_encoders/{DEFAULT_TEXT_ENCODER}) | "
        f"`{MODEL_FOLDERS['text encoder']}/` |",
        f"| [`{nodes['VAELoader']['vae_name']}`]({DOWNLOADS}/vae/{DEFAULT_VAE}) | `{MODEL_FOLDERS['VAE']}/` |", "",
        "Node by node:", "",
        f"1. `UNETLoader` loads Z-Image-Turbo; `ModelSamplingAuraFlow` (shift {shift:g}) gives it the schedule "
        "the student was trained on.",
        f"2. `LoraLoaderModelOnly` x{steps}: one branch per student step, LoRA at strength 1.0 (the LoRA scale is "
        "baked into `lora_B`; `.alpha` = rank).",
        f"3. `CLIPLoader` (type `{nodes['CLIPLoader']['type']}`: the Z-Image Qwen3-4B encoder) -> "
        "`CLIPTextEncode` (the prompt).",
        f"4. `BasicGuider` x{steps}: each branch with the prompt; no negative prompt and no CFG (Z-Image-Turbo is "
        "guidance-distilled).",
    ]
    if "BasicScheduler" in nodes:
        lines.append(f"5. `BasicScheduler` (`simple`, {steps} steps, denoise 1.0, on the shifted model) gives "
                     f"sigmas {pretty}, the student's schedule; ")
    else:
        lines.append(f"5. `ManualSigmas` gives the student's sigmas {pretty} (this run's schedule is not what "
                     "ComfyUI's `simple` scheduler makes); ")
    if steps > 1:
        pieces = ", ".join("[" + number(sigmas[k]) + ", " + number(sigmas[k + 1]) + "]" for k in range(steps))
        lines[-1] += f"`SplitSigmas` (step 1{', chained' if steps > 2 else ''}) cuts it into {pieces}."
    lines += [
        "6. `KSamplerSelect` (`euler`: the deterministic step the student was trained with); `RandomNoise` (the "
        "seed) for the first sampler" + (f", `DisableNoise` for the {'second' if steps == 2 else 'later ones'}"
                                         if steps > 1 else "") +
        f"; `EmptySD3LatentImage` at {res}x{res}, the trained resolution.",
        f"7. `SamplerCustomAdvanced` x{steps}, one per student step, each continuing from the previous one's "
        "`output` latent: " + "; ".join(f"`{name}` on sigma {number(sigmas[k])} -> {number(sigmas[k + 1])}"
                                        for k, name in enumerate(lora_files)) + ".",
        "8. `VAELoader` (the Z-Image/Flux VAE) -> `VAEDecode` -> `SaveImage`.",
    ]
    return "\n".join(lines) + "\n"


def default_workflow() -> dict:
    """The workflow of a default export: 2 steps, sigmas [1.0, 0.75], shift 3, 1024 px."""
    return build_workflow(["step1_lora_comfyui.safetensors", "step2_lora_comfyui.safetensors"], [1.0, 0.75])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m twostep.families.zimage.comfy_workflow",
                                     description="Write or draw the ComfyUI workflow of a default comfyui export "
                                                 "(or of an export folder's twostep.json).")
    parser.add_argument("--draw", metavar="PNG", help="draw the graph to this image")
    parser.add_argument("--out", metavar="JSON", help="write the API-format workflow to this file")
    parser.add_argument("--export", metavar="DIR", help="use this comfyui export's twostep.json and LoRA files")
    args = parser.parse_args(argv)
    if not (args.draw or args.out):
        parser.error("give --draw PNG and/or --out JSON")
    if args.export:
        import os

        with open(os.path.join(args.export, "twostep.json"), encoding="utf-8") as f:
            info = json.load(f)
        graph = workflow_for_export(info, [os.path.basename(p) for p in info["files"]])
    else:
        graph = default_workflow()
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(json.dumps(graph, indent=2) + "\n")
    if args.draw:
        draw_workflow(graph, args.draw, title="twostep: the 2-step Z-Image student in ComfyUI (workflow_api.json)"
                      if not args.export else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
