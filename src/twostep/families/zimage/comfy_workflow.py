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


def _number(value: float) -> str:
    """A sigma as ComfyUI's ManualSigmas parses it (digits and a point, no exponent)."""
    text = f"{value:.10f}".rstrip("0").rstrip(".")
    return text or "0"


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
        return f"sigma {_number(sigmas[k])} -> {_number(end)}"

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
        sigma_node = add("ManualSigmas", "Student schedule", sigmas=", ".join(_number(s) for s in schedule))
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


def _count(n: int) -> str:
    return {1: "one", 2: "two", 3: "three", 4: "four"}.get(n, str(n))


def card_text(info: dict, lora_files: list[str], graph: dict, workflow_file: str = WORKFLOW_FILE) -> str:
    """The model card's ComfyUI section: where each file goes, how to open the workflow, what each node does."""
    nodes = {n["class_type"]: n["inputs"] for n in graph.values()}
    steps = len(lora_files)
    sigmas = list(info["student_sigmas"]) + [0.0]
    res = nodes["EmptySD3LatentImage"]["width"]
    shift = nodes["ModelSamplingAuraFlow"]["shift"]
    pretty = "[" + ", ".join(_number(s) for s in sigmas) + "]"
    lora_list = ", ".join(f"`{name}`" for name in lora_files)
    lines = [
        "## ComfyUI", "",
        f"`{workflow_file}` is the {_count(steps)}-sampler workflow for these LoRAs (ComfyUI builds with Z-Image "
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
        pieces = ", ".join("[" + _number(sigmas[k]) + ", " + _number(sigmas[k + 1]) + "]" for k in range(steps))
        lines[-1] += f"`SplitSigmas` (step 1{', chained' if steps > 2 else ''}) cuts it into {pieces}."
    lines += [
        "6. `KSamplerSelect` (`euler`: the deterministic step the student was trained with); `RandomNoise` (the "
        "seed) for the first sampler" + (f", `DisableNoise` for the {'second' if steps == 2 else 'later ones'}"
                                         if steps > 1 else "") +
        f"; `EmptySD3LatentImage` at {res}x{res}, the trained resolution.",
        f"7. `SamplerCustomAdvanced` x{steps}, one per student step, each continuing from the previous one's "
        "`output` latent: " + "; ".join(f"`{name}` on sigma {_number(sigmas[k])} -> {_number(sigmas[k + 1])}"
                                        for k, name in enumerate(lora_files)) + ".",
        "8. `VAELoader` (the Z-Image/Flux VAE) -> `VAEDecode` -> `SaveImage`.",
    ]
    return "\n".join(lines) + "\n"


def links(graph: dict) -> list[tuple[str, int, str, str]]:
    """Every link as ``(source id, output index, target id, input name)``."""
    out = []
    for node_id, node in graph.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                out.append((str(value[0]), int(value[1]), node_id, name))
    return out


def topological_order(graph: dict) -> list[str]:
    """Node ids, every node after the nodes it reads from (ties by id). Raises on a cycle or a dangling link."""
    sources = {node_id: set() for node_id in graph}
    for src, _, dst, name in links(graph):
        if src not in graph:
            raise ValueError(f"node {dst} input {name!r} links to missing node {src}")
        sources[dst].add(src)
    order, done = [], set()
    while len(order) < len(graph):
        ready = sorted((n for n in graph if n not in done and sources[n] <= done), key=_id_key)
        if not ready:
            raise ValueError("the workflow has a cycle")
        order += ready
        done.update(ready)
    return order


def _id_key(node_id: str):
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def layout(graph: dict) -> dict[str, tuple[int, int]]:
    """``{node: (column, row)}``, left to right: a node sits one column right of its furthest input, a node with no
    inputs (a loader, a constant) one column left of its first use; rows follow the mean row of the neighbours."""
    order = topological_order(graph)
    edges = links(graph)
    consumers = {n: [dst for src, _, dst, _ in edges if src == n] for n in graph}
    producers = {n: [src for src, _, dst, _ in edges if dst == n] for n in graph}
    col = {}
    for n in order:
        col[n] = 1 + max((col[p] for p in producers[n]), default=-1)
    for n in order:
        if not producers[n] and consumers[n]:
            col[n] = min(col[c] for c in consumers[n]) - 1
    row = {n: float(i) for i, n in enumerate(order)}
    for _ in range(6):  # barycentre sweeps: each column sorted by the mean row of its neighbours
        for c in range(max(col.values()) + 1):
            members = [n for n in order if col[n] == c]
            key = {n: (sum(row[m] for m in producers[n] + consumers[n]) / len(producers[n] + consumers[n])
                       if producers[n] + consumers[n] else row[n], _id_key(n)) for n in members}
            for i, n in enumerate(sorted(members, key=lambda m: key[m])):
                row[n] = float(i)
    return {n: (col[n], int(row[n])) for n in graph}


_COLORS = {"MODEL": "#7c5cbf", "CLIP": "#d4a017", "CONDITIONING": "#c0722c", "GUIDER": "#3a7d44",
           "SAMPLER": "#2e86ab", "SIGMAS": "#1b998b", "NOISE": "#8d8d8d", "LATENT": "#d1495b", "VAE": "#e07a5f",
           "IMAGE": "#3d5a80"}
# output types per class, for the arrows' colours (the test holds the full table, from ComfyUI's source)
_OUTPUTS = {"UNETLoader": ["MODEL"], "ModelSamplingAuraFlow": ["MODEL"], "LoraLoaderModelOnly": ["MODEL"],
            "CLIPLoader": ["CLIP"], "CLIPTextEncode": ["CONDITIONING"], "BasicGuider": ["GUIDER"],
            "KSamplerSelect": ["SAMPLER"], "BasicScheduler": ["SIGMAS"], "ManualSigmas": ["SIGMAS"],
            "SplitSigmas": ["SIGMAS", "SIGMAS"], "RandomNoise": ["NOISE"], "DisableNoise": ["NOISE"],
            "EmptySD3LatentImage": ["LATENT"], "SamplerCustomAdvanced": ["LATENT", "LATENT"], "VAELoader": ["VAE"],
            "VAEDecode": ["IMAGE"]}


def _box_lines(node: dict) -> list[str]:
    lines = []
    for name, value in node["inputs"].items():
        if isinstance(value, list):
            continue
        text = f'"{value}"' if isinstance(value, str) else f"{value:g}" if isinstance(value, float) else str(value)
        if len(text) > 44:
            text = text[:41] + '..."'
        lines.append(f"{name}: {text}")
    return lines


def draw_workflow(graph: dict, path: str, title: str | None = None) -> None:
    """Draw ``graph`` to ``path`` (PNG): one box per node (title, class, widget values), one arrow per link
    coloured by its type, columns left to right in topological order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch

    pos = layout(graph)
    box_w, col_gap, line_h = 4.2, 0.9, 0.26
    n_links = {n: sum(isinstance(v, list) for v in graph[n]["inputs"].values()) for n in graph}
    heights = {n: max(2 + len(_box_lines(graph[n])), 1 + n_links[n]) * line_h + 0.25 for n in graph}
    columns = max(c for c, _ in pos.values()) + 1
    # rows: stack the boxes of a column top-down with a fixed gap
    top = {}
    for c in range(columns):
        y = 0.0
        for n in sorted((n for n in graph if pos[n][0] == c), key=lambda m: pos[m][1]):
            top[n] = y
            y -= heights[n] + 0.55
    depth = -min(top[n] - heights[n] for n in graph)
    x = {n: pos[n][0] * (box_w + col_gap) for n in graph}
    fig_w, fig_h = columns * (box_w + col_gap) * 0.62, (depth + 1.2) * 0.62
    fig, ax = plt.subplots(figsize=(fig_w, fig_h), dpi=150)
    used = set()
    for src, out, dst, name in links(graph):
        kind = _OUTPUTS.get(graph[src]["class_type"], ["?"] * (out + 1))[out]
        used.add(kind)
        start = (x[src] + box_w, top[src] - heights[src] / 2)
        linked = [k for k, v in graph[dst]["inputs"].items() if isinstance(v, list)]
        end = (x[dst], top[dst] - heights[dst] * (linked.index(name) + 1) / (len(linked) + 1))
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=9, lw=1.1,
                                     color=_COLORS.get(kind, "black"), connectionstyle="arc3,rad=0.0",
                                     shrinkA=0, shrinkB=0, zorder=1))
    for n, node in graph.items():
        h = heights[n]
        ax.add_patch(FancyBboxPatch((x[n], top[n] - h), box_w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                    fc="#f7f7f2", ec="#333333", lw=1.0, zorder=2))
        ax.text(x[n] + 0.1, top[n] - 0.08, f"#{n} {node['_meta']['title']}", fontsize=7.5, weight="bold",
                va="top", zorder=3)
        ax.text(x[n] + 0.1, top[n] - 0.08 - line_h, node["class_type"], fontsize=7, style="italic",
                color="#555555", va="top", zorder=3)
        for i, line in enumerate(_box_lines(node)):
            ax.text(x[n] + 0.1, top[n] - 0.08 - (i + 2) * line_h, line, fontsize=6.5, family="monospace",
                    va="top", zorder=3)
    ax.legend(handles=[Patch(color=_COLORS[k], label=k) for k in _COLORS if k in used], loc="lower right",
              fontsize=7, ncol=len(used) // 2 + 1, frameon=False)
    ax.set_xlim(-0.3, columns * (box_w + col_gap) - col_gap + 0.3)
    ax.set_ylim(-depth - 1.0, 0.4)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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
