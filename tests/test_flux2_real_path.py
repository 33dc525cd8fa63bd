"""The FLUX.2 klein path end to end on a tiny random ``Flux2KleinPipeline`` saved in diffusers format, with the same
commands as Z-Image: the family is read from the folder's own ``model_index.json`` (no flag), teacher-data picks
the family's packaged recipe, and train, export (4 formats), generate and evaluate run on it.
"""

import json
import os

import numpy as np
import pytest
import torch

from twostep.cli import main
from twostep.core.errors import TwostepError
from twostep.engine import flow
from twostep.families.flux2.pipeline_io import schedule_shift
from twostep.testing import tiny_flux2_klein_pipeline

FORMATS = os.environ.get("TWOSTEP_FLUX2_FORMATS", "diffusers,lora,comfyui,merged").split(",")
RES = 32  # tiny VAE 2x, 2x2 patches: engine latents (16, 8, 8), 64 image tokens
PROMPTS = ["a red cat on a sofa", "a photo of a small house", "the city at night"]
SHIFT = schedule_shift(64, 4)  # exp(compute_empirical_mu(64, 4)): the tiny pipeline's 4-step schedule
SIGMA2 = round(float(flow.turbo_sigmas(4, SHIFT)[2]), 6)  # the teacher's state after 2 of 4 steps
SCHEDULE = [f"teacher_data.shift={SHIFT}", f"teacher_data.student_sigmas=[1.0,{SIGMA2}]", "teacher_data.max_length=512",
            f"student.sigmas=[1.0,{SIGMA2}]"]
TRAIN = ["train.steps=2", "train.batch_size=2", "train.warmup_steps=1", "train.d_warmup_steps=0",
         "train.sample_every=2", "train.checkpoint_every=2", "train.bf16=false", "model.dtype=float32",
         "discriminator.blocks=[0,2]", "discriminator.hidden=16", "student.lora_rank=4", "student.lora_alpha=8",
         "train.g_lr=0.01", *SCHEDULE]


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux2")
    pipe = str(root / "pipe")
    tiny_flux2_klein_pipeline(seed=0).save_pretrained(pipe)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    data, run = str(root / "data"), str(root / "run")
    assert main(["teacher-data", "--teacher", pipe, "--prompts", str(prompts), "--resolution", str(RES), "--out", data,
                 "teacher_data.shard_size=4", "teacher_data.batch_size=2", "teacher_data.previews=1",
                 *SCHEDULE]) == 0
    assert main(["train", "--data", data, "--out", run, *TRAIN]) == 0  # the recipe comes from the data's record
    exports = {}
    for fmt in FORMATS:
        exports[fmt] = str(root / f"export_{fmt}")
        assert main(["export", run, "--format", fmt, "--out", exports[fmt], "--dtype", "float32"]) == 0
    return {"root": root, "pipe": pipe, "prompts": str(prompts), "data": data, "run": run, **exports}


def test_a_klein_cache_at_another_prompt_length_is_refused_before_anything_is_written(klein, tmp_path, capsys):
    """klein's transformer reads the padded prompt unmasked: a cache at 256 tokens would train the student on
    prompts that generate, evaluate and ComfyUI (always 512) never give it."""
    out = tmp_path / "data"
    assert main(["teacher-data", "--teacher", klein["pipe"], "--prompts", klein["prompts"], "--resolution", str(RES),
                 "--out", str(out), *SCHEDULE, "teacher_data.max_length=256"]) == 2
    err = capsys.readouterr().err
    assert "teacher_data.max_length=256" in err and "set teacher_data.max_length=512" in err and not out.exists()


def test_teacher_data_is_the_stock_pipelines_output_at_the_same_noise(klein):
    from diffusers import Flux2KleinPipeline

    from twostep.engine.teacher_data import TeacherData
    from twostep.families.flux2.pipeline_io import from_vae_latents
    from twostep.real.evaluation.sampling import Samplers, read_student
    from twostep.real.text_cache import PromptEmbeds

    data = TeacherData(klein["data"])
    assert data.provenance["teacher_id"] == "flux2" and data.provenance["sample_shape"] == [16, 8, 8]
    batch = data.batch(torch.arange(2))
    embeds = PromptEmbeds(os.path.join(klein["data"], "text"))
    assert embeds.get(0).shape == (512, 48)  # the full padded prompt, three hidden layers
    pipe = Flux2KleinPipeline.from_pretrained(klein["pipe"])
    for i in range(2):
        prompt = int(batch["prompt_index"][i])
        out = pipe(prompt_embeds=embeds.get(prompt)[None].float(), latents=batch["noise"][i:i + 1].float(),
                   num_inference_steps=4, height=RES, width=RES, output_type="latent").images
        expected = from_vae_latents(pipe.vae, out)
        # the cache stores bf16 finals: compare at that precision
        assert (batch["final"][i:i + 1].float() - expected).abs().max() < 2e-2
    assert os.path.isfile(os.path.join(klein["data"], "previews", "00000.png"))
    record = open(os.path.join(klein["data"], "teacher_data.yaml")).read()
    assert "recipe: flux2_klein_4b_2step_lora" in record


def test_the_run_trained_the_klein_targets_and_records_its_family(klein):
    meta = json.load(open(os.path.join(klein["run"], "meta.json")))
    assert meta["kind"] == "flux2-student" and meta["family"] == "flux2" and meta["steps"] == 2
    from safetensors.torch import load_file

    state = load_file(os.path.join(klein["run"], "student.safetensors"))
    modules = {k.split(".lora_")[0] for k in state}
    # a LoRA on every double-stream attention/FFN linear and on both single-stream linears (attn.to_out there is
    # a linear; in double-stream blocks it is a ModuleList and only its to_out.0 is wrapped)
    assert "base.transformer.single_transformer_blocks.0.attn.to_out" in modules
    assert "base.transformer.single_transformer_blocks.1.attn.to_qkv_mlp_proj" in modules
    assert "base.transformer.transformer_blocks.0.attn.to_out.0" in modules
    assert "base.transformer.transformer_blocks.0.ff_context.linear_out" in modules
    assert "base.transformer.transformer_blocks.0.attn.to_out" not in modules


@pytest.mark.parametrize("fmt", ["diffusers", "lora", "merged"])
def test_every_klein_export_card_runs_both_steps_in_stock_diffusers(klein, tmp_path, monkeypatch, fmt):
    import re

    card = open(os.path.join(klein[fmt], "README.md"), encoding="utf-8").read()
    assert "Flux2KleinPipeline" in card and "num_inference_steps=2" in card
    (code,) = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    code = (code.replace('"path/to/this/export"', repr(klein[fmt])).replace('.to("cuda")', "")
            .replace("torch.bfloat16", "torch.float32").replace('"path/to/pipe"', repr(klein["pipe"])))
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(code, "snippet", "exec"), ns)  # noqa: S102 - our own generated code
    assert (tmp_path / "image.png").is_file()
    sigmas = [round(float(s), 5) for s in ns["pipe"].scheduler.sigmas]
    assert sigmas == [1.0, round(SIGMA2, 5), 0.0]  # exactly the student's sigmas: two real steps


def test_the_stock_pipeline_with_the_switch_equals_our_2_step_sampler(klein):
    from twostep.families.flux2.pipeline_io import from_vae_latents
    from twostep.real.export import apply_step_loras, load_step_loras
    from twostep.real.pipeline import load_two_step_pipeline
    from twostep.real.text_cache import PromptEmbeds
    from twostep.real.train import build_real_student, load_real_run

    cfg, meta, _ = load_real_run(klein["run"])
    embeds = PromptEmbeds(os.path.join(klein["data"], "text"))
    student, _ = build_real_student(cfg, meta["teacher"], embeds.width, torch.device("cpu"))
    info = json.load(open(os.path.join(klein["diffusers"], "twostep.json")))
    apply_step_loras(student, load_step_loras([os.path.join(klein["diffusers"], f) for f in info["lora_files"]]))
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(7))
    cond = embeds[torch.tensor([1])]
    with torch.no_grad():
        ours = student.sample(noise, cond.to(dtype=torch.float32))["final"]
    pipe, switch = load_two_step_pipeline(klein["diffusers"], device="cpu")
    switch.reset(pipe)
    out = pipe(prompt_embeds=cond.embeds.float(), latents=noise.clone(), height=RES, width=RES, output_type="latent",
               **switch.call_kwargs()).images
    assert (from_vae_latents(pipe.vae, out) - ours).abs().max() < 1e-4


def test_generate_and_evaluate_run_on_the_klein_export(klein, tmp_path, capsys):
    image = tmp_path / "cat.png"
    assert main(["generate", "a red cat", "--model", klein["diffusers"], "--out", str(image), "--device", "cpu"]) == 0
    assert image.is_file()
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", klein["diffusers"], "--prompts", klein["prompts"], "--out", str(out),
                 "models.clip=none", "models.dino=none", "models.preference=none", "device=cpu"]) == 0
    result = json.load(open(out / "metrics.json"))
    rows = result["samplers"]
    assert [rows[n]["steps"] for n in ("teacher", "naive", "student")] == [4, 2, 2]  # klein's own 4 teacher steps
    assert rows["student"]["psnr"] is not None


def test_a_schedule_that_is_not_the_pipelines_is_refused_with_the_value_to_set(klein, tmp_path, capsys):
    assert main(["teacher-data", "--teacher", klein["pipe"], "--prompts", klein["prompts"], "--resolution", str(RES),
                 "--out", str(tmp_path / "d")]) == 2  # the packaged 1024px shift does not fit 32px
    err = capsys.readouterr().err
    assert f"teacher_data.shift={SHIFT:.6f}" in err and not os.path.exists(tmp_path / "d")
    with pytest.raises(TwostepError, match="not on the teacher's 4-step grid"):
        from twostep.engine.teacher_data import state_indices

        state_indices(flow.turbo_sigmas(4, SHIFT), [1.0, 0.75])


def test_plan_counts_klein_from_its_published_config():
    from twostep.real.plan import PlanRequest, plan_memory

    plan = plan_memory(PlanRequest(model="flux2-klein-4b", resolution=1024, batch=1))
    assert plan["params"]["base"] == 3_875_544_576  # FLUX.2 klein 4B's 3.88B, counted on the meta device
    assert plan["tokens"]["image"] == 4096 and plan["tokens"]["blocks"] == 25
    assert np.isfinite(plan["total_bytes"])


def test_comfyui_export_uses_comfyuis_flux2_names_and_ships_a_valid_workflow(klein):
    import re

    from safetensors.torch import load_file
    from test_comfy_workflow import check_workflow

    from twostep.families.flux2.comfy_workflow import comfy_lora

    folder = klein["comfyui"]
    info = json.load(open(os.path.join(folder, "twostep.json")))
    assert info["files"] == ["step1_lora_comfyui.safetensors", "step2_lora_comfyui.safetensors"]
    # the names ComfyUI's own FLUX.2 model holds (comfy/lora.py maps "diffusion_model." + any parameter name)
    native = re.compile(r"diffusion_model\.(double_blocks\.\d+\.(img_attn\.(qkv|proj)|txt_attn\.(qkv|proj)|"
                        r"img_mlp\.[02]|txt_mlp\.[02])|single_blocks\.\d+\.linear[12])\.(lora_A\.weight|lora_B\.weight|alpha)")
    step1 = load_file(os.path.join(folder, info["files"][0]))
    assert step1 and all(native.fullmatch(k) for k in step1), sorted(k for k in step1 if not native.fullmatch(k))[:3]
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight" in step1
    assert "diffusion_model.single_blocks.1.linear1.lora_B.weight" in step1

    # the fused qkv LoRA is the three diffusers updates stacked, at ComfyUI's strength alpha / rank
    g = torch.Generator().manual_seed(0)
    lora = {f"transformer_blocks.0.attn.to_{n}.lora_{ab}.weight": torch.randn(shape, generator=g)
            for n in "qkv" for ab, shape in (("A", (4, 8)), ("B", (6, 4)))}
    fused = comfy_lora(lora)
    prefix = "diffusion_model.double_blocks.0.img_attn.qkv"
    a, b = fused[f"{prefix}.lora_A.weight"], fused[f"{prefix}.lora_B.weight"]
    scale = fused[f"{prefix}.alpha"].item() / a.shape[0]
    up, down = (f"transformer_blocks.0.attn.to_{{}}.lora_{ab}.weight" for ab in "BA")
    parts = [lora[up.format(n)] @ lora[down.format(n)] for n in "qkv"]
    torch.testing.assert_close(scale * (b @ a), torch.cat(parts))
    with pytest.raises(ValueError, match="no ComfyUI FLUX.2 name"):
        comfy_lora({"x_embedder.lora_A.weight": torch.zeros(4, 8), "x_embedder.lora_B.weight": torch.zeros(8, 4)})

    graph = json.load(open(os.path.join(folder, info["workflow"])))
    assert check_workflow(graph) == []
    by_class = {}
    for node in graph.values():
        by_class.setdefault(node["class_type"], []).append(node["inputs"])
    assert [n["lora_name"] for n in by_class["LoraLoaderModelOnly"]] == info["files"]
    assert by_class["CLIPLoader"][0]["type"] == "flux2" and "EmptyFlux2LatentImage" in by_class
    (manual,) = by_class["ManualSigmas"]
    assert [float(s) for s in manual["sigmas"].split(",")] == pytest.approx([*info["student_sigmas"], 0.0], abs=1e-6)
    assert len(by_class["SamplerCustomAdvanced"]) == 2 and "ModelSamplingAuraFlow" not in by_class
    card = open(os.path.join(folder, "README.md")).read()
    assert "workflow_api.json" in card and all(f"`{n['class_type']}`" in card for n in graph.values())


def test_comfyui_names_map_back_to_each_diffusers_module_through_diffusers_own_converter():
    """Which module goes to which ComfyUI name, pinned by diffusers' converter from the original (BFL / ComfyUI)
    layout: every exported update, read back into diffusers names, is its own module's ``B @ A`` (same-shaped
    swaps, img_mlp with txt_mlp or linear1 with linear2, would load silently in ComfyUI)."""
    from diffusers import Flux2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    from twostep.families.flux2.comfy_workflow import comfy_lora
    from twostep.families.flux2.tiny import tiny_transformer_config

    model = Flux2Transformer2DModel(**tiny_transformer_config())
    g = torch.Generator().manual_seed(0)
    lora, expected = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "blocks." in name:
            a, b = torch.randn(4, module.in_features, generator=g), torch.randn(module.out_features, 4, generator=g)
            lora[f"{name}.lora_A.weight"], lora[f"{name}.lora_B.weight"] = a, b
            expected[f"{name}.weight"] = b @ a
    exported = comfy_lora(lora)
    original = {}
    for key, down in exported.items():
        if key.endswith(".lora_A.weight"):
            stem = key[len("diffusion_model."):-len(".lora_A.weight")]
            up, alpha = exported[key.replace("lora_A", "lora_B")], exported[key.replace("lora_A.weight", "alpha")]
            original[f"{stem}.weight"] = alpha.item() / down.shape[0] * (up @ down)
    back = convert_flux2_transformer_checkpoint_to_diffusers(original)
    assert set(back) == set(expected), sorted(set(back) ^ set(expected))[:4]
    for key, weight in expected.items():
        torch.testing.assert_close(back[key], weight, msg=key)



def test_plan_of_a_klein_model_reads_the_klein_recipe(klein, capsys):
    outs = {}
    for model in ("flux2-klein-4b", klein["pipe"]):  # the release's alias and a pipeline folder: no --config
        assert main(["plan", "--model", model, "--resolution", "1024", "--batch", "4"]) == 0
        outs[model] = out = capsys.readouterr().out
        assert "config: flux2_klein_4b_2step_lora" in out and "discriminator blocks [6, 12, 19, 22]" in out
        assert "to_qkv_mlp_proj" in out and "x 4 forwards" in out  # klein's 4 teacher steps
    assert "params: base 3.876B" in outs["flux2-klein-4b"]
    # disk: 32 VAE channels at 1/8 (= 128 packed at 1/16), prompts padded to 512 x 7680
    assert "latents 32x128x128" in outs["flux2-klein-4b"] and "512 tokens x 7680" in outs["flux2-klein-4b"]


def test_a_guided_klein_base_teacher_is_the_stock_pipeline_at_the_same_guidance(tmp_path, capsys):
    """klein base is a CFG model: the cached trajectory is its pipeline's at guidance 4 with the cached negative
    prompt (neg + g (pos - neg), two forwards per step); the distilled klein refuses a guidance it would ignore."""
    from diffusers import Flux2KleinPipeline

    from twostep.engine.teacher_data import TeacherData
    from twostep.families.flux2.pipeline_io import from_vae_latents
    from twostep.real.evaluation.sampling import Samplers, read_student
    from twostep.real.text_cache import PromptEmbeds

    base = str(tmp_path / "base")
    tiny_flux2_klein_pipeline(seed=1, distilled=False).save_pretrained(base)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")
    guided = ["teacher_data.guidance_scale=4", "teacher_data.negative_prompt=a blurry photo",
              "teacher_data.previews=0", "teacher_data.dtype=float32"]  # fp32: a tiny random model's guidance
    # moves its images by less than bf16 rounding
    data = str(tmp_path / "data")
    assert main(["teacher-data", "--teacher", base, "--prompts", str(prompts), "--resolution", str(RES), "--out", data,
                 "teacher_data.batch_size=2", *SCHEDULE, *guided]) == 0
    cache = TeacherData(data)
    assert cache.provenance["guidance"] == {"scale": 4.0, "negative_prompt": "a blurry photo"}
    batch = cache.batch(torch.arange(2))
    embeds, negative = PromptEmbeds(os.path.join(data, "text")), PromptEmbeds(os.path.join(data, "text_negative"))
    assert negative.prompts == ["a blurry photo"]
    pipe = Flux2KleinPipeline.from_pretrained(base)
    errors = {}
    # 1: no guidance; 5: Z-Image's rule pos + 4 (pos - neg) = klein's at 5; only 4 is the pipeline's own
    for scale in (4.0, 1.0, 5.0):
        out = pipe(prompt_embeds=embeds.get(0)[None].float(), negative_prompt_embeds=negative.get(0)[None].float(),
                   guidance_scale=scale, latents=batch["noise"][:1].float(), num_inference_steps=4, height=RES,
                   width=RES, output_type="latent").images
        errors[scale] = float((batch["final"][:1].float() - from_vae_latents(pipe.vae, out)).abs().max())
    assert errors[4.0] < 1e-4 and errors[1.0] > 1e-3 and errors[5.0] > 1e-3, errors

    # evaluate measures the student against the teacher it learned from: guided at 4, the same negative prompt
    run, export = str(tmp_path / "run"), str(tmp_path / "export")
    assert main(["train", "--data", data, "--out", run, *TRAIN]) == 0
    assert main(["export", run, "--format", "diffusers", "--out", export, "--dtype", "float32"]) == 0
    assert json.load(open(os.path.join(export, "twostep.json")))["teacher_guidance"] == cache.provenance["guidance"]
    samplers = Samplers(base, read_student(export), torch.device("cpu"), torch.float32, RES, teacher_steps=4)
    embed, negative_embed = samplers.encode([PROMPTS[0], "a blurry photo"])  # the pipeline's own, 512 tokens
    for name in ("teacher", "naive"):
        ours, _ = samplers.sample(name, embed, batch["noise"][:1].float())
        steps = ({"num_inference_steps": 4} if name == "teacher" else
                 {"num_inference_steps": 2, "sigmas": list(samplers.switch.sigmas)})  # the step count sets the shift
        for scale in (4.0, 1.0):
            out = pipe(prompt_embeds=embed[None], negative_prompt_embeds=negative_embed[None], guidance_scale=scale,
                       latents=batch["noise"][:1].float(), height=RES, width=RES, output_type="latent", **steps).images
            errors[name, scale] = float((ours - from_vae_latents(pipe.vae, out)).abs().max())
    assert errors["teacher", 4.0] < 1e-4 and errors["naive", 4.0] < 1e-4, errors
    assert errors["teacher", 1.0] > 1e-3 and errors["naive", 1.0] > 1e-3, errors
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", run, "--prompts", str(prompts), "--out", str(out), "models.clip=none",
                 "models.dino=none", "models.preference=none", "device=cpu", "dtype=float32"]) == 0
    assert json.load(open(out / "manifest.json"))["provenance"]["teacher_guidance"] == cache.provenance["guidance"]
    assert "teacher, 4 steps, guidance 4" in (out / "report.md").read_text()

    assert main(["teacher-data", "--teacher", base, "--prompts", str(prompts), "--resolution", str(RES),
                 "--out", str(tmp_path / "online"), *SCHEDULE, *guided, "teacher_data.mode=online"]) == 2
    assert "guidance_scale" in capsys.readouterr().err
    distilled = str(tmp_path / "distilled")
    tiny_flux2_klein_pipeline(seed=1).save_pretrained(distilled)
    assert main(["teacher-data", "--teacher", distilled, "--prompts", str(prompts), "--resolution", str(RES),
                 "--out", str(tmp_path / "d"), *SCHEDULE, *guided]) == 2
    err = capsys.readouterr().err
    assert "is_distilled" in err and not os.path.exists(tmp_path / "d")
