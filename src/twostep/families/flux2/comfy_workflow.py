"""The ComfyUI side of a FLUX.2 klein ``comfyui`` export: LoRA keys in ComfyUI's own parameter names, and the
one-sampler-per-step workflow (``workflow_api.json``) with its model-card text.

**Keys.** ComfyUI holds FLUX.2 in Black Forest Labs' layout (``double_blocks.N.img_attn.qkv``, ``single_blocks.N.
linear1``, ...), and its LoRA loader maps ``diffusion_model.`` + any parameter name of the model onto that parameter
(``comfy/lora.py`` ``model_lora_keys_unet``), reading ``.lora_A.weight`` / ``.lora_B.weight`` and an optional
``.alpha`` (``comfy/weight_adapter/lora.py``). So the files use those names directly, whatever diffusers-name
mapping a ComfyUI release carries. diffusers splits a double-stream block's fused ``qkv`` into ``to_q``/``to_k``/
``to_v`` (``add_*_proj`` for the text stream); their three LoRAs become one exactly: ``A`` stacked (rank 3r) and
``B`` block-diagonal, so ``B·A`` is the three updates one above the other, with ``alpha`` = 3r for strength 1.

**Graph.** As for Z-Image (``families/zimage/comfy_workflow.py``), one ``SamplerCustomAdvanced`` per student step,
each on its own LoRA branch; the schedule is given as numbers (``ManualSigmas``): ComfyUI's ``Flux2Scheduler`` makes
the pipeline's ``N``-step schedule, and the student's sigma 2 is the teacher's 4-step grid point, not the 2-step
one. ``EmptyFlux2LatentImage`` gives the 128-channel latents at 1/16 of the size; ``CLIPLoader`` type ``flux2``
loads klein's Qwen3-4B.
"""

from __future__ import annotations

import torch

from twostep.families.comfy_graph import count, number
from twostep.families.flux2.model_card import EXAMPLE_PROMPT

Tensor = torch.Tensor
DEFAULT_UNET = "flux-2-klein-4b.safetensors"  # the names ComfyUI's FLUX.2 klein examples use for the split files
DEFAULT_TEXT_ENCODER = "qwen_3_4b.safetensors"
DEFAULT_VAE = "flux2-vae.safetensors"
CLIP_TYPE = "flux2"
WORKFLOW_FILE = "workflow_api.json"
MODEL_FOLDERS = {"diffusion model": "models/diffusion_models", "LoRA": "models/loras",
                 "text encoder": "models/text_encoders", "VAE": "models/vae"}

# diffusers module (under transformer_blocks.N.) -> ComfyUI/BFL parameter (under double_blocks.N.); a tuple is fused
DOUBLE_BLOCK = {("attn.to_q", "attn.to_k", "attn.to_v"): "img_attn.qkv", "attn.to_out.0": "img_attn.proj",
                ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"): "txt_attn.qkv",
                "attn.to_add_out": "txt_attn.proj", "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
                "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2"}
SINGLE_BLOCK = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}  # single_transformer_blocks.N.


def _fuse(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """One LoRA ``(A, B)`` equal to the given ones stacked along the output: ``B·A = [B_1 A_1; B_2 A_2; ...]``."""
    a = torch.cat([p[0] for p in parts], dim=0)
    b = torch.block_diag(*[p[1] for p in parts])
    return a, b


def comfy_lora(lora: dict[str, Tensor]) -> dict[str, Tensor]:
    """One step's LoRA (``{diffusers module}.lora_A/B.weight``, scale in B) in ComfyUI's FLUX.2 parameter names,
    with the ``.alpha`` (= rank) that gives strength 1. A LoRA on part of a fused ``qkv`` gets zeros for the rest."""
    pairs = {key[:-len(".lora_A.weight")]: (value, lora[key.replace(".lora_A.", ".lora_B.")])
             for key, value in lora.items() if key.endswith(".lora_A.weight")}
    out: dict[str, Tensor] = {}

    def put(name: str, a: Tensor, b: Tensor) -> None:
        out[f"diffusion_model.{name}.lora_A.weight"] = a.contiguous()
        out[f"diffusion_model.{name}.lora_B.weight"] = b.contiguous()
        out[f"diffusion_model.{name}.alpha"] = torch.tensor(float(a.shape[0]))

    used = set()
    blocks = sorted({int(k.split(".")[1]) for k in pairs if k.startswith("transformer_blocks.")})
    for n in blocks:
        for source, target in DOUBLE_BLOCK.items():
            names = [f"transformer_blocks.{n}.{s}" for s in (source if isinstance(source, tuple) else (source,))]
            found = [pairs.get(name) for name in names]
            if not any(found):
                continue
            like = next(f for f in found if f is not None)
            rank, width = like[0].shape
            parts = [f if f is not None else (torch.zeros(rank, width, dtype=like[0].dtype),
                                              torch.zeros(like[1].shape, dtype=like[1].dtype)) for f in found]
            a, b = _fuse(parts) if len(parts) > 1 else parts[0]
            put(f"double_blocks.{n}.{target}", a, b)
            used.update(names)
    for key, (a, b) in pairs.items():
        if key.startswith("single_transformer_blocks."):
            _, n, rest = key.split(".", 2)
            if rest in SINGLE_BLOCK:
                put(f"single_blocks.{n}.{SINGLE_BLOCK[rest]}", a, b)
                used.add(key)
    missing = sorted(set(pairs) - used)
    if missing:
        raise ValueError(f"no ComfyUI FLUX.2 name for LoRA modules {missing[:4]}; export --format lora instead")
    return out


def build_workflow(lora_files: list[str], sigmas: list[float], resolution: int = 1024, prompt: str = EXAMPLE_PROMPT,
                   seed: int = 0, unet: str = DEFAULT_UNET, text_encoder: str = DEFAULT_TEXT_ENCODER,
                   vae: str = DEFAULT_VAE, filename_prefix: str = "twostep") -> dict:
    """The API-format graph: student step ``k`` samples from ``sigmas[k]`` to the next sigma (0 after the last)
    with ``lora_files[k]`` on the base model. ``sigmas``: the student's start sigmas as ``twostep.json`` records
    them (the schedule itself, no shift left to apply)."""
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

    schedule = list(sigmas) + [0.0]
    unet_node = add("UNETLoader", "Load FLUX.2 klein", unet_name=unet, weight_dtype="default")
    loras = [add("LoraLoaderModelOnly", f"Step {k + 1} LoRA", model=[unet_node, 0], lora_name=name,
                 strength_model=1.0) for k, name in enumerate(lora_files)]
    clip = add("CLIPLoader", "Load Qwen3-4B text encoder", clip_name=text_encoder, type=CLIP_TYPE)
    text = add("CLIPTextEncode", "Prompt", text=prompt, clip=[clip, 0])
    guiders = [add("BasicGuider", f"Step {k + 1} guider", model=[lora, 0], conditioning=[text, 0])
               for k, lora in enumerate(loras)]
    sampler = add("KSamplerSelect", "Euler", sampler_name="euler")
    rest = [add("ManualSigmas", "Student schedule", sigmas=", ".join(number(s) for s in schedule)), 0]
    step_sigmas = []
    for k in range(steps - 1):
        split = add("SplitSigmas", f"Split after step {k + 1}", sigmas=rest, step=1)
        step_sigmas.append([split, 0])
        rest = [split, 1]
    step_sigmas.append(rest)
    noise = add("RandomNoise", "Noise (seed)", noise_seed=int(seed))
    no_noise = add("DisableNoise", "No new noise") if steps > 1 else None
    latent = [add("EmptyFlux2LatentImage", f"Empty latent {resolution}x{resolution}", width=int(resolution),
                  height=int(resolution), batch_size=1), 0]
    for k in range(steps):
        span = f"sigma {number(schedule[k])} -> {number(schedule[k + 1])}"
        latent = [add("SamplerCustomAdvanced", f"Step {k + 1} sampler ({span})",
                      noise=[noise if k == 0 else no_noise, 0], guider=[guiders[k], 0], sampler=[sampler, 0],
                      sigmas=step_sigmas[k], latent_image=latent), 0]
    vae_node = add("VAELoader", "Load FLUX.2 VAE", vae_name=vae)
    image = add("VAEDecode", "Decode", samples=latent, vae=[vae_node, 0])
    add("SaveImage", "Save", images=[image, 0], filename_prefix=filename_prefix)
    return graph


def workflow_for_export(info: dict, lora_files: list[str], **kwargs) -> dict:
    return build_workflow(lora_files, list(info["student_sigmas"]), resolution=int(info.get("resolution") or 1024),
                          **kwargs)


def card_text(info: dict, lora_files: list[str], graph: dict, workflow_file: str = WORKFLOW_FILE) -> str:
    """The model card's ComfyUI section: where each file goes, how to open the workflow, what each node does."""
    nodes = {n["class_type"]: n["inputs"] for n in graph.values()}
    steps = len(lora_files)
    sigmas = list(info["student_sigmas"]) + [0.0]
    res = nodes["EmptyFlux2LatentImage"]["width"]
    pretty = "[" + ", ".join(number(s) for s in sigmas) + "]"
    lines = [
        "## ComfyUI", "",
        f"`{workflow_file}` is the {count(steps)}-sampler workflow for these LoRAs (ComfyUI builds with FLUX.2 "
        "klein support). Put each file in its ComfyUI folder, then drag the workflow onto the ComfyUI window (or "
        "Workflow > Open); edit the prompt and the seed and run. The model file names are those of ComfyUI's "
        "klein examples: pick yours in the loaders if they differ.", "",
        "| file | ComfyUI folder |", "|---|---|",
        f"| {', '.join(f'`{name}`' for name in lora_files)} (this folder) | `{MODEL_FOLDERS['LoRA']}/` |",
        f"| `{nodes['UNETLoader']['unet_name']}` | `{MODEL_FOLDERS['diffusion model']}/` |",
        f"| `{nodes['CLIPLoader']['clip_name']}` | `{MODEL_FOLDERS['text encoder']}/` |",
        f"| `{nodes['VAELoader']['vae_name']}` | `{MODEL_FOLDERS['VAE']}/` |", "",
        "Node by node:", "",
        "1. `UNETLoader` loads FLUX.2 klein; " + f"`LoraLoaderModelOnly` x{steps}: one branch per student step, "
        "LoRA at strength 1.0 (keys in ComfyUI's own FLUX.2 names; the scale is baked into `lora_B`, `.alpha` = "
        "rank).",
        f"2. `CLIPLoader` (type `{CLIP_TYPE}`: klein's Qwen3-4B) -> `CLIPTextEncode` (the prompt) -> `BasicGuider` "
        f"x{steps}: no negative prompt and no CFG (one forward per step, as the student was trained).",
        f"3. `ManualSigmas` gives the student's sigmas {pretty}; " + (
            f"`SplitSigmas` cuts them into one pair per step. " if steps > 1 else "")
        + "ComfyUI's `Flux2Scheduler` would give the pipeline's own schedule for this step count, which is not the "
        "student's.",
        f"4. `KSamplerSelect` (`euler`), `RandomNoise` (the seed) for the first sampler"
        + (", `DisableNoise` after it" if steps > 1 else "") + f"; `EmptyFlux2LatentImage` at {res}x{res}, the "
        "trained resolution.",
        f"5. `SamplerCustomAdvanced` x{steps}, each continuing from the previous one's `output` latent: "
        + "; ".join(f"`{name}` on sigma {number(sigmas[k])} -> {number(sigmas[k + 1])}"
                    for k, name in enumerate(lora_files)) + ".",
        "6. `VAELoader` (the FLUX.2 VAE) -> `VAEDecode` -> `SaveImage`.",
    ]
    return "\n".join(lines) + "\n"
