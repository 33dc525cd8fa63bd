"""The ComfyUI workflow every ``comfyui`` export ships (``workflow_api.json``), checked against ComfyUI's own node
definitions, and its sigma split against the student's schedule.

Node table provenance (read through the code index; "id" is the stored file version when no commit was reported):

- Comfy-Org/ComfyUI ``nodes.py`` @ 02217e36a45bcbe2dd8fa24187aa5e053d9aea2e: UNETLoader, CLIPLoader, CLIPTextEncode,
  VAELoader, VAEDecode, SaveImage, LoraLoaderModelOnly (``INPUT_TYPES`` / ``RETURN_TYPES``), MAX_RESOLUTION.
- Comfy-Org/ComfyUI ``comfy_extras/nodes_custom_sampler.py`` @ 4be318aa1a66b91c028028cb587b6c27848fb6bf:
  SamplerCustomAdvanced, BasicGuider, KSamplerSelect, BasicScheduler, SplitSigmas, RandomNoise, DisableNoise,
  ManualSigmas (``define_schema``); the same inputs and outputs in comfyanonymous/ComfyUI @
  065c1df017d017aaffce13e2666b2b6eb56393d6.
- Comfy-Org/ComfyUI ``comfy_extras/nodes_model_advanced.py`` @ 691e82787be231880314d980b49b06a8105c5de6:
  ModelSamplingAuraFlow (``ModelSamplingSD3.patch`` with ``multiplier=1.0``).
- Comfy-Org/ComfyUI ``comfy_extras/nodes_sd3.py`` @ 45e9c52c5ef96f95ac2230975e72f6b470e10042: EmptySD3LatentImage.
- Comfy-Org/ComfyUI ``comfy_extras/nodes_flux.py`` (newest stored copy, found by find_string): EmptyFlux2LatentImage
  (the same width/height/batch_size inputs; 128-channel latents at 1/16 of the size).
- Comfy-Org/ComfyUI ``comfy/samplers.py`` @ 311c01406130b2acbe8ab291043502de26cf3871: KSAMPLER_NAMES,
  SAMPLER_NAMES, SCHEDULER_HANDLERS, ``calculate_sigmas``, ``simple_scheduler``.
- Comfy-Org/ComfyUI ``comfy/model_sampling.py`` @ 2fd2083913be0894287f5f1d2abef8c5f94d1d0a: ``time_snr_shift``,
  ``ModelSamplingDiscreteFlow.set_parameters`` / ``sigma`` (the sigma table ``simple`` indexes).
- Comfy-Org/ComfyUI ``comfy/sd.py`` @ 033046cc4fac82d954c6daedccf1c8128433c4f1: ``TEModel.QWEN3_4B`` builds
  ``comfy.text_encoders.z_image.te`` for every CLIP type except ``flux``/``flux2``.
- Comfy-Org/workflow_templates ``templates/image_z_image_turbo.json`` @ 0cbd31a4dfac3c039b12817fa08207fd64fbaa83
  and comfyanonymous/ComfyUI_examples ``z_image/README.md`` @ f9431bb000ce792094ff345446e22cac1ea6cef3: the file
  names (z_image_turbo_bf16, qwen_3_4b, ae), CLIPLoader type ``lumina2``, ModelSamplingAuraFlow shift 3,
  EmptySD3LatentImage, the model folders.
- Comfy-Org/ComfyUI_frontend ``src/scripts/app.ts`` @ 000beb7a76aa9f0505e47065399fc799eaf07552 and the newest
  stored version (id 57500547425), ``src/scripts/metadata/json.ts`` @ ef940b5224aceb50ef1fe0096f1421bbc9d945cf:
  a dropped/opened JSON whose values all have ``class_type`` (and, newest, an ``inputs`` object) goes to
  ``loadApiJson``, which creates the nodes, connects ``[id, slot]`` links and sets widgets by input name.
"""

import copy
import json
import re

import pytest
import torch

from twostep.engine.flow import turbo_sigmas
from twostep.families.zimage.comfy_workflow import (
    CLIP_TYPE,
    DEFAULT_TEXT_ENCODER,
    DEFAULT_UNET,
    DEFAULT_VAE,
    MODEL_FOLDERS,
    build_workflow,
    card_text,
    comfy_simple_sigmas,
    draw_workflow,
    layout,
    workflow_for_export,
)
from twostep.families.zimage.model_card import EXAMPLE_PROMPT

MAX_RESOLUTION = 16384  # nodes.py
KSAMPLER_NAMES = [  # comfy/samplers.py
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "exp_heun_2_x0",
    "exp_heun_2_x0_sde", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm",
    "lcm", "ipndm", "ipndm_v", "deis", "cfgpp_ud10_ab", "res_multistep", "res_multistep_cfg_pp",
    "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp",
    "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece"]
SAMPLER_NAMES = KSAMPLER_NAMES + ["ddim", "uni_pc", "uni_pc_bh2"]
SCHEDULER_NAMES = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                   "linear_quadratic", "kl_optimal"]
CLIP_TYPES = ["stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi", "ltxv", "pixart", "cosmos",
              "lumina2", "wan", "hidream", "chroma", "ace", "omnigen2", "qwen_image", "hunyuan_image", "flux2", "ovis",
              "longcat_image", "cogvideox", "lens", "pixeldit", "ideogram4", "boogu", "krea2", "joyimage", "mage",
              "minimax", "yue2"]
LINK_TYPES = {"MODEL", "CLIP", "CONDITIONING", "VAE", "LATENT", "IMAGE", "NOISE", "GUIDER", "SAMPLER", "SIGMAS"}
U64 = 0xffffffffffffffff


def link(kind):
    return {"kind": kind}


def combo(choices=None, folder=None):
    """A choice widget; ``folder``: the choices are the files of that ComfyUI model folder (unknown here)."""
    return {"kind": "COMBO", "choices": choices, "folder": folder}


def integer(lo, hi, step=None):
    return {"kind": "INT", "min": lo, "max": hi, "step": step}


def number(lo, hi):
    return {"kind": "FLOAT", "min": lo, "max": hi}


def string():
    return {"kind": "STRING"}


# class -> required inputs (name -> type), optional inputs, output types; from the sources in the docstring
NODES = {
    "UNETLoader": {"required": {"unet_name": combo(folder="diffusion_models"),
                                "weight_dtype": combo(["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"])},
                   "optional": {}, "outputs": ["MODEL"]},
    "ModelSamplingAuraFlow": {"required": {"model": link("MODEL"), "shift": number(0.0, 100.0)},
                              "optional": {"sampling": combo(["flow", "img_to_img_velocity"])}, "outputs": ["MODEL"]},
    "LoraLoaderModelOnly": {"required": {"model": link("MODEL"), "lora_name": combo(folder="loras"),
                                         "strength_model": number(-100.0, 100.0)},
                            "optional": {}, "outputs": ["MODEL"]},
    "CLIPLoader": {"required": {"clip_name": combo(folder="text_encoders"), "type": combo(CLIP_TYPES)},
                   "optional": {"device": combo(["default", "cpu"])}, "outputs": ["CLIP"]},
    "CLIPTextEncode": {"required": {"text": string(), "clip": link("CLIP")}, "optional": {},
                       "outputs": ["CONDITIONING"]},
    "BasicGuider": {"required": {"model": link("MODEL"), "conditioning": link("CONDITIONING")}, "optional": {},
                    "outputs": ["GUIDER"]},
    "KSamplerSelect": {"required": {"sampler_name": combo(SAMPLER_NAMES)}, "optional": {}, "outputs": ["SAMPLER"]},
    "BasicScheduler": {"required": {"model": link("MODEL"), "scheduler": combo(SCHEDULER_NAMES),
                                    "steps": integer(1, 10000), "denoise": number(0.0, 1.0)},
                       "optional": {}, "outputs": ["SIGMAS"]},
    "SplitSigmas": {"required": {"sigmas": link("SIGMAS"), "step": integer(0, 10000)}, "optional": {},
                    "outputs": ["SIGMAS", "SIGMAS"]},  # high_sigmas, low_sigmas
    "ManualSigmas": {"required": {"sigmas": string()}, "optional": {}, "outputs": ["SIGMAS"]},
    "RandomNoise": {"required": {"noise_seed": integer(0, U64)}, "optional": {}, "outputs": ["NOISE"]},
    "DisableNoise": {"required": {}, "optional": {}, "outputs": ["NOISE"]},
    "EmptySD3LatentImage": {"required": {"width": integer(16, MAX_RESOLUTION, 16),
                                         "height": integer(16, MAX_RESOLUTION, 16),
                                         "batch_size": integer(1, 4096)},
                            "optional": {}, "outputs": ["LATENT"]},
    "EmptyFlux2LatentImage": {"required": {"width": integer(16, MAX_RESOLUTION, 16),
                                           "height": integer(16, MAX_RESOLUTION, 16),
                                           "batch_size": integer(1, 4096)},
                              "optional": {}, "outputs": ["LATENT"]},
    "SamplerCustomAdvanced": {"required": {"noise": link("NOISE"), "guider": link("GUIDER"),
                                           "sampler": link("SAMPLER"), "sigmas": link("SIGMAS"),
                                           "latent_image": link("LATENT")},
                              "optional": {}, "outputs": ["LATENT", "LATENT"]},  # output, denoised_output
    "VAELoader": {"required": {"vae_name": combo(folder="vae")}, "optional": {}, "outputs": ["VAE"]},
    "VAEDecode": {"required": {"samples": link("LATENT"), "vae": link("VAE")}, "optional": {}, "outputs": ["IMAGE"]},
    # RETURN_TYPES ("IMAGE",) in the version read; older releases return nothing (no link reads it here)
    "SaveImage": {"required": {"images": link("IMAGE"), "filename_prefix": string()}, "optional": {},
                  "outputs": ["IMAGE"]},
}


def check_workflow(graph) -> list[str]:
    """Every way ``graph`` breaks ComfyUI's contract, as messages (empty: the graph fits the node table)."""
    errors = []
    if not isinstance(graph, dict) or not graph:
        return ["the workflow is not a non-empty JSON object"]
    for node_id, node in graph.items():
        where = f"node {node_id}"
        # the frontend's isApiJson: every top-level value is a node with a class_type string and an inputs object
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str) \
                or not isinstance(node.get("inputs"), dict):
            errors.append(f"{where}: not an API-format node (class_type string + inputs object)")
            continue
        spec = NODES.get(node["class_type"])
        if spec is None:
            errors.append(f"{where}: class {node['class_type']!r} is not in the node table")
            continue
        where = f"node {node_id} ({node['class_type']})"
        inputs = node["inputs"]
        for name in spec["required"]:
            if name not in inputs:
                errors.append(f"{where}: required input {name!r} is not set")
        for name, value in inputs.items():
            kind = {**spec["required"], **spec["optional"]}.get(name)
            if kind is None:
                errors.append(f"{where}: {name!r} is not an input of this class")
            elif kind["kind"] in LINK_TYPES:
                errors += [f"{where}: {name!r}: {e}" for e in _check_link(graph, value, kind["kind"])]
            else:
                errors += [f"{where}: {name!r}: {e}" for e in _check_widget(value, kind)]
    if not errors:
        try:
            _order(graph)
        except ValueError as e:
            errors.append(str(e))
    return errors


def _check_link(graph, value, kind) -> list[str]:
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int) and not isinstance(value[1], bool)):
        return [f"expects a {kind} link [node_id, output_index], got {value!r}"]
    src, index = value
    if src not in graph:
        return [f"links to missing node {src}"]
    outputs = NODES.get(graph[src].get("class_type"), {}).get("outputs", [])
    if not 0 <= index < len(outputs):
        return [f"links to output {index} of node {src}, which has {len(outputs)} outputs"]
    if outputs[index] != kind:
        return [f"needs {kind} but node {src} output {index} is {outputs[index]}"]
    return []


def _check_widget(value, kind) -> list[str]:
    if isinstance(value, list):
        return [f"is a {kind['kind']} widget, not a link"]
    if kind["kind"] == "INT":
        if not isinstance(value, int) or isinstance(value, bool):
            return [f"INT widget holds {type(value).__name__} {value!r}"]
    elif kind["kind"] == "FLOAT":
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
            return [f"FLOAT widget holds {type(value).__name__} {value!r}"]
    elif not isinstance(value, str):
        return [f"{kind['kind']} widget holds {type(value).__name__} {value!r}"]
    if kind["kind"] in ("INT", "FLOAT") and not kind["min"] <= value <= kind["max"]:
        return [f"{value} is outside [{kind['min']}, {kind['max']}]"]
    if kind["kind"] == "INT" and kind["step"] and value % kind["step"]:
        return [f"{value} is not a multiple of {kind['step']}"]
    if kind["kind"] == "COMBO":
        if kind["choices"] is not None and value not in kind["choices"]:
            return [f"{value!r} is not one of the choices"]
        if kind["folder"] and not value.endswith(".safetensors"):
            return [f"{value!r} is not a .safetensors file for models/{kind['folder']}"]
    return []


def _order(graph) -> list[str]:
    done, order = set(), []
    while len(order) < len(graph):
        ready = [n for n, node in graph.items() if n not in done
                 and all(v[0] in done for v in node["inputs"].values() if isinstance(v, list))]
        if not ready:
            raise ValueError("the workflow has a cycle")
        order += ready
        done.update(ready)
    return order


# ComfyUI's schedule, re-derived with its own arithmetic (float32 torch), not with twostep.families.zimage.comfy_workflow's
def comfy_flow_sigma_table(shift, multiplier=1.0, timesteps=1000):
    """``ModelSamplingDiscreteFlow.set_parameters``: ``sigma((arange(1, T + 1) / T) · multiplier)`` with
    ``sigma(t) = time_snr_shift(shift, t / multiplier)``; ModelSamplingAuraFlow passes ``multiplier=1.0``."""
    t = (torch.arange(1, timesteps + 1, 1) / timesteps) * multiplier
    t = t / multiplier
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


def comfy_basic_scheduler(shift, scheduler, steps, denoise):
    """``BasicScheduler.execute`` with ``calculate_sigmas(..., "simple", ...)``."""
    assert scheduler == "simple"
    total = steps if denoise >= 1.0 else int(steps / denoise)
    table = comfy_flow_sigma_table(shift)
    ss = len(table) / total
    sigmas = torch.FloatTensor([float(table[-(1 + int(x * ss))]) for x in range(total)] + [0.0])
    return sigmas[-(steps + 1):]


def evaluate_sigmas(graph, ref):
    """The SIGMAS a link ``[node, output]`` carries when ComfyUI runs the graph."""
    node = graph[ref[0]]
    inputs = node["inputs"]
    if node["class_type"] == "BasicScheduler":
        model = graph[inputs["model"][0]]
        while model["class_type"] == "LoraLoaderModelOnly":  # LoRAs leave model_sampling alone
            model = graph[model["inputs"]["model"][0]]
        assert model["class_type"] == "ModelSamplingAuraFlow", "the scheduler's model has no flow shift"
        return comfy_basic_scheduler(model["inputs"]["shift"], inputs["scheduler"], inputs["steps"],
                                     inputs["denoise"])
    if node["class_type"] == "ManualSigmas":
        return torch.FloatTensor([float(s) for s in re.findall(r"[-+]?(?:\d*\.*\d+)", inputs["sigmas"])])
    if node["class_type"] == "SplitSigmas":
        sigmas, step = evaluate_sigmas(graph, inputs["sigmas"]), inputs["step"]
        return sigmas[:step + 1] if ref[1] == 0 else sigmas[step:]
    raise AssertionError(f"no SIGMAS from {node['class_type']}")


def sampler_chain(graph) -> list[str]:
    """The SamplerCustomAdvanced nodes from the empty latent to VAEDecode, in order."""
    decode = [n for n, node in graph.items() if node["class_type"] == "VAEDecode"]
    assert len(decode) == 1
    chain, ref = [], graph[decode[0]]["inputs"]["samples"]
    while graph[ref[0]]["class_type"] == "SamplerCustomAdvanced":
        assert ref[1] == 0, "a step must continue from the previous sampler's `output`, not `denoised_output`"
        chain.insert(0, ref[0])
        ref = graph[ref[0]]["inputs"]["latent_image"]
    assert graph[ref[0]]["class_type"] == "EmptySD3LatentImage"
    return chain


def check_student(graph, info, lora_files):
    """The graph runs the student of ``info`` (an export's twostep.json): step k = LoRA k on the shifted base model,
    on sigmas [s_k, s_k+1], Euler, fresh noise only before step 1, at the trained resolution."""
    schedule = list(info["student_sigmas"]) + [0.0]
    chain = sampler_chain(graph)
    assert len(chain) == info["num_steps"] == len(lora_files)
    ran = []
    for k, node_id in enumerate(chain):
        inputs = graph[node_id]["inputs"]
        got = evaluate_sigmas(graph, inputs["sigmas"])
        assert got.tolist() == pytest.approx(schedule[k:k + 2], abs=1e-6), (k, got.tolist())
        ran += got.tolist()[:1]
        assert graph[inputs["noise"][0]]["class_type"] == ("RandomNoise" if k == 0 else "DisableNoise")
        assert graph[inputs["sampler"][0]]["inputs"]["sampler_name"] == "euler"
        guider = graph[inputs["guider"][0]]
        assert guider["class_type"] == "BasicGuider"
        lora = graph[guider["inputs"]["model"][0]]
        assert lora["class_type"] == "LoraLoaderModelOnly"
        assert lora["inputs"]["lora_name"] == lora_files[k] and lora["inputs"]["strength_model"] == 1.0
        shifted = graph[lora["inputs"]["model"][0]]
        assert shifted["class_type"] == "ModelSamplingAuraFlow" and shifted["inputs"]["shift"] == info["shift"]
        assert graph[shifted["inputs"]["model"][0]]["class_type"] == "UNETLoader"
        text = graph[guider["inputs"]["conditioning"][0]]
        assert text["class_type"] == "CLIPTextEncode"
        clip = graph[text["inputs"]["clip"][0]]
        assert clip["inputs"]["type"] not in ("flux", "flux2")  # comfy/sd.py: anything else = Z-Image's encoder
    assert ran + [0.0] == pytest.approx(schedule, abs=1e-6)
    latent = graph[graph[chain[0]]["inputs"]["latent_image"][0]]["inputs"]
    assert latent["width"] == latent["height"] == (info.get("resolution") or 1024)
    assert sorted(n["inputs"]["lora_name"] for n in graph.values()
                  if n["class_type"] == "LoraLoaderModelOnly") == sorted(lora_files)


LORAS = ["step1_lora_comfyui.safetensors", "step2_lora_comfyui.safetensors"]
INFO = {"num_steps": 2, "student_sigmas": [1.0, 0.75], "shift": 3.0, "resolution": 1024}


def test_comfyui_simple_scheduler_on_the_shifted_model_is_the_student_schedule():
    # 2 steps at shift 3: the table entries t = 1 and t = 0.5 -> 3·0.5/(1 + 2·0.5) = 0.75
    assert comfy_basic_scheduler(3.0, "simple", 2, 1.0).tolist() == [1.0, 0.75, 0.0]
    assert comfy_basic_scheduler(3.0, "simple", 2, 1.0).tolist() == turbo_sigmas(2, 3.0).tolist()
    assert comfy_basic_scheduler(3.0, "simple", 4, 1.0).tolist() == pytest.approx(turbo_sigmas(4, 3.0).tolist(),
                                                                                   abs=1e-6)
    # 3 steps: simple's int(x·1000/3) truncation lands on t = 0.667, 0.334 instead of 2/3, 1/3
    assert (comfy_basic_scheduler(3.0, "simple", 3, 1.0) - turbo_sigmas(3, 3.0)).abs().max() > 1e-4
    for shift in (1.0, 2.5, 3.0, 6.0):
        for steps in (1, 2, 3, 4, 8):
            assert comfy_simple_sigmas(shift, steps) == pytest.approx(
                comfy_basic_scheduler(shift, "simple", steps, 1.0).tolist(), abs=1e-6)


def test_default_workflow_fits_comfyui_and_runs_the_student():
    graph = workflow_for_export(INFO, LORAS)
    assert check_workflow(graph) == []
    check_student(graph, INFO, LORAS)
    classes = sorted({n["class_type"] for n in graph.values()})
    assert "BasicScheduler" in classes and "ManualSigmas" not in classes
    loaders = {n["class_type"]: n["inputs"] for n in graph.values()}
    assert loaders["UNETLoader"]["unet_name"] == DEFAULT_UNET == "z_image_turbo_bf16.safetensors"
    assert loaders["CLIPLoader"]["clip_name"] == DEFAULT_TEXT_ENCODER == "qwen_3_4b.safetensors"
    assert loaders["CLIPLoader"]["type"] == CLIP_TYPE == "lumina2"
    assert loaders["VAELoader"]["vae_name"] == DEFAULT_VAE == "ae.safetensors"
    assert loaders["CLIPTextEncode"]["text"] == EXAMPLE_PROMPT  # the prompt of the card's diffusers snippets


def test_workflow_is_the_api_format_the_frontend_loads():
    graph = json.loads(json.dumps(workflow_for_export(INFO, LORAS)))
    # app.ts isApiJson: every top-level value is a node (class_type string, inputs object): no metadata keys
    assert all(isinstance(v.get("class_type"), str) and isinstance(v.get("inputs"), dict) for v in graph.values())
    assert all(k.isdigit() for k in graph)  # loadApiJson: node.id = +id for numeric ids
    assert all(isinstance(v["_meta"]["title"], str) for v in graph.values())


@pytest.mark.parametrize("info", [
    {"num_steps": 2, "student_sigmas": [1.0, 0.8], "shift": 3.0, "resolution": 512},     # moved intermediate sigma
    {"num_steps": 3, "student_sigmas": [1.0, 0.9, 0.6], "shift": 3.0, "resolution": 768},
    {"num_steps": 3, "student_sigmas": turbo_sigmas(3, 3.0).tolist()[:-1], "shift": 3.0, "resolution": 1024},
    {"num_steps": 4, "student_sigmas": turbo_sigmas(4, 3.0).tolist()[:-1], "shift": 3.0, "resolution": 1024},
    {"num_steps": 1, "student_sigmas": [1.0], "shift": 3.0, "resolution": 1024},
])
def test_other_schedules_split_into_one_sampler_per_step(info):
    files = [f"step{k}_lora_comfyui.safetensors" for k in range(1, info["num_steps"] + 1)]
    graph = workflow_for_export(info, files)
    assert check_workflow(graph) == []
    check_student(graph, info, files)
    manual = any(n["class_type"] == "ManualSigmas" for n in graph.values())
    simple = comfy_basic_scheduler(3.0, "simple", info["num_steps"], 1.0).tolist()
    assert manual == (simple != pytest.approx(info["student_sigmas"] + [0.0], abs=1e-6))


def _node(graph, class_type, k=0):
    return [n for n in graph.values() if n["class_type"] == class_type][k]


def _id(graph, class_type, k=0):
    return [i for i, n in graph.items() if n["class_type"] == class_type][k]


BREAKS = {
    "dangling link": (lambda g: _node(g, "SamplerCustomAdvanced")["inputs"].update(guider=["99", 0]),
                      "missing node 99"),
    "wrong output type": (lambda g: _node(g, "SamplerCustomAdvanced")["inputs"].update(
        guider=[_id(g, "LoraLoaderModelOnly"), 0]), "needs GUIDER but node"),
    "output index out of range": (lambda g: _node(g, "VAEDecode")["inputs"].update(
        vae=[_id(g, "VAELoader"), 1]), "has 1 outputs"),
    "missing required input": (lambda g: _node(g, "SamplerCustomAdvanced", 1)["inputs"].pop("sigmas"),
                               "required input 'sigmas' is not set"),
    "unknown input": (lambda g: _node(g, "BasicGuider")["inputs"].update(cfg=1.0), "'cfg' is not an input"),
    "unknown class": (lambda g: _node(g, "DisableNoise").update(class_type="KSamplerAdvanced"),
                      "not in the node table"),
    "sampler not a choice": (lambda g: _node(g, "KSamplerSelect")["inputs"].update(sampler_name="Euler"),
                             "not one of the choices"),
    "clip type not a choice": (lambda g: _node(g, "CLIPLoader")["inputs"].update(type="z_image"),
                               "not one of the choices"),
    "int as string": (lambda g: _node(g, "BasicScheduler")["inputs"].update(steps="2"), "INT widget holds str"),
    "float out of range": (lambda g: _node(g, "BasicScheduler")["inputs"].update(denoise=1.5), "outside"),
    "latent size off the grid": (lambda g: _node(g, "EmptySD3LatentImage")["inputs"].update(width=1000),
                                 "multiple of 16"),
    "widget given a link": (lambda g: _node(g, "RandomNoise")["inputs"].update(
        noise_seed=[_id(g, "KSamplerSelect"), 0]), "not a link"),
    "cycle": (lambda g: _node(g, "ModelSamplingAuraFlow")["inputs"].update(
        model=[_id(g, "LoraLoaderModelOnly"), 0]), "cycle"),
}


@pytest.mark.parametrize("name", list(BREAKS))
def test_a_broken_graph_fails_the_check(name):
    graph = copy.deepcopy(workflow_for_export(INFO, LORAS))
    breaker, message = BREAKS[name]
    breaker(graph)
    errors = check_workflow(graph)
    assert errors and any(message in e for e in errors), errors


def test_a_wrong_split_or_lora_order_fails_the_student_check():
    graph = copy.deepcopy(workflow_for_export(INFO, LORAS))
    _node(graph, "SplitSigmas")["inputs"]["step"] = 0  # high = [1.0], low = the whole schedule
    assert check_workflow(graph) == []
    with pytest.raises(AssertionError):
        check_student(graph, INFO, LORAS)
    graph = copy.deepcopy(workflow_for_export(INFO, LORAS))
    assert check_workflow(graph) == []
    with pytest.raises(AssertionError):
        check_student(graph, INFO, LORAS[::-1])
    graph = workflow_for_export({**INFO, "shift": 2.0}, LORAS)  # the scheduler then gives another schedule
    with pytest.raises(AssertionError):
        check_student(graph, INFO, LORAS)


def test_card_text_walks_the_shipped_graph_and_says_where_files_go():
    graph = workflow_for_export(INFO, LORAS)
    text = card_text(INFO, LORAS, graph)
    for class_type in {n["class_type"] for n in graph.values()}:
        assert f"`{class_type}`" in text, class_type
    for folder in MODEL_FOLDERS.values():
        assert f"`{folder}/`" in text
    for name in LORAS + [DEFAULT_UNET, DEFAULT_TEXT_ENCODER, DEFAULT_VAE, "workflow_api.json"]:
        assert name in text
    assert "two-sampler" in text and "[1, 0.75, 0]" in text and "[1, 0.75], [0.75, 0]" in text
    manual = card_text({**INFO, "student_sigmas": [1.0, 0.8]}, LORAS,
                       workflow_for_export({**INFO, "student_sigmas": [1.0, 0.8]}, LORAS))
    assert "`ManualSigmas`" in manual and "`BasicScheduler`" not in manual


def test_build_workflow_refuses_a_mismatched_export():
    with pytest.raises(ValueError, match="one LoRA file per student step"):
        build_workflow(LORAS[:1], [1.0, 0.75])
    with pytest.raises(ValueError, match="decrease"):
        build_workflow(LORAS, [1.0, 1.0])


def test_drawing_lays_links_left_to_right(tmp_path):
    graph = workflow_for_export(INFO, LORAS)
    pos = layout(graph)
    for node_id, node in graph.items():
        for value in node["inputs"].values():
            if isinstance(value, list):
                assert pos[value[0]][0] < pos[node_id][0]
    path = tmp_path / "graph.png"
    draw_workflow(graph, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
