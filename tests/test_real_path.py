"""The real Z-Image path end to end on a tiny random pipeline saved in diffusers format (issue 5 bars).

prompts file -> text cache -> teacher latents -> a few training steps -> export (diffusers | lora | comfyui |
merged) -> stock ``ZImagePipeline`` with a per-step adapter switch reproduces our own 2-step sampler.
"""

import json
import math
import os
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from twostep.cli import DEFAULT_ZIMAGE_CONFIG, main
from twostep.testing import tiny_zimage_pipeline

RES = 32  # tiny VAE downsamples 2x, patch 2: latents (16, 16, 16), 64 image tokens
PROMPTS = ["a red cat on a sofa", "a photo of a small house", "the city at night"]
TRAIN = ["train.steps=3", "train.batch_size=2", "train.warmup_steps=1", "train.sample_every=3",
         "train.checkpoint_every=2", "train.bf16=false", "model.dtype=float32", "discriminator.blocks=[0,1]",
         "discriminator.hidden=16", "student.lora_rank=4", "student.lora_alpha=8", "train.g_lr=0.01"]

# ComfyUI's Z-Image LoRA loader: comfy/lora.py `model_lora_keys_unet`, Lumina2 branch (Comfy-Org/ComfyUI, PR
# #10978) registers `diffusion_model.{diffusers module}` for every key of comfy/utils.py `z_image_to_diffusers`
# (layers.N / noise_refiner.N / context_refiner.N: attention.to_q|to_k|to_v|to_out.0, feed_forward.w1|w2|w3,
# adaLN_modulation.0 except in context_refiner); comfy/weight_adapter/lora.py reads `.lora_A.weight`,
# `.lora_B.weight` and comfy/lora.py `load_lora` an optional scalar `.alpha`.
COMFY_KEY = re.compile(r"^diffusion_model\.(layers\.\d+|noise_refiner\.\d+|context_refiner\.\d+)\."
                       r"(attention\.(to_q|to_k|to_v|to_out\.0)|feed_forward\.w[123]|adaLN_modulation\.0)\."
                       r"(lora_A\.weight|lora_B\.weight|alpha)$")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    pipe_dir = str(root / "pipe")
    tiny_zimage_pipeline(seed=0).save_pretrained(pipe_dir)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    data, run = str(root / "data"), str(root / "run")
    assert main(["teacher-data", "--teacher", pipe_dir, "--prompts", str(prompts), "--resolution", str(RES),
                 "--out", data, "teacher_data.samples_per_prompt=2", "teacher_data.shard_size=4",
                 "teacher_data.batch_size=2", "teacher_data.previews=2"]) == 0
    assert main(["train", "--config", DEFAULT_ZIMAGE_CONFIG, "--data", data, "--out", run, *TRAIN]) == 0
    exports = {}
    for fmt in ("diffusers", "lora", "comfyui", "merged"):
        exports[fmt] = str(root / f"export_{fmt}")
        assert main(["export", run, "--format", fmt, "--out", exports[fmt], "--dtype", "float32"]) == 0
    return {"root": root, "pipe": pipe_dir, "prompts": str(prompts), "data": data, "run": run, **exports}


def _student(run):
    """The trained student (EMA weights) and the conditioning of PROMPTS, built by our own code."""
    from twostep.real.text_cache import PromptEmbeds
    from twostep.real.train import build_real_student, load_real_run

    cfg, meta, state = load_real_run(run)
    embeds = PromptEmbeds(os.path.join(cfg.data_dir, "text"))
    student, _ = build_real_student(cfg, meta["teacher"], embeds.width, torch.device("cpu"))
    params = dict(student.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
    return student.eval(), embeds


def _noise(seed):
    return torch.randn((1, 16, RES // 2, RES // 2), generator=torch.Generator().manual_seed(seed))


def test_teacher_cache_is_the_pipelines_own_8_step_trajectory(chain):
    from diffusers import ZImagePipeline

    from twostep.engine.teacher_data import TeacherData

    data = TeacherData(chain["data"])
    assert len(data) == 6 and data.provenance["resolution"] == RES and data.provenance["dtype"] == "bfloat16"
    batch = data.batch(torch.tensor([0, 4]))
    assert batch["prompt_index"].tolist() == [0, 1]
    pipe = ZImagePipeline.from_pretrained(chain["pipe"])
    for row, prompt_index in enumerate(batch["prompt_index"].tolist()):
        after = {}

        def capture(p, i, t, kw):
            after[i] = kw["latents"].clone()
            return kw

        latents = pipe(PROMPTS[prompt_index], height=RES, width=RES, num_inference_steps=8, guidance_scale=0.0,
                       latents=batch["noise"][row:row + 1], output_type="latent", callback_on_step_end=capture).images
        # final stored in bf16: equal up to bf16 rounding, and clearly not the noise
        torch.testing.assert_close(batch["final"][row:row + 1], latents.float(), atol=2e-2, rtol=1e-2)
        assert (batch["final"][row] - batch["noise"][row]).abs().mean() > 0.1
        # the step-1 target: the state after 4 of 8 steps (sigma 0.75), kept in fp32. Tolerance: the cache's prompt
        # embeddings are bf16 (the real encoder's dtype on a GPU); this CPU pipeline encodes in fp32.
        assert batch["states"].dtype == torch.float32
        torch.testing.assert_close(batch["states"][row, 1], after[3][0].float(), atol=1e-3, rtol=1e-3)
        assert (batch["states"][row, 1] - after[4][0].float()).abs().max() > 1e-2  # not off by one step
        torch.testing.assert_close(batch["states"][row, 0], batch["noise"][row])
    assert sorted(os.listdir(os.path.join(chain["data"], "previews"))) == ["00000.png", "00001.png", "index.json"]
    text = json.load(open(os.path.join(chain["data"], "text", "manifest.json")))
    assert text["prompts"] == PROMPTS


def test_text_cache_matches_the_pipelines_prompt_encoding(chain):
    from diffusers import ZImagePipeline

    from twostep.real.text_cache import PromptEmbeds

    pipe = ZImagePipeline.from_pretrained(chain["pipe"])
    embeds = PromptEmbeds(os.path.join(chain["data"], "text"))
    reference, _ = pipe.encode_prompt(PROMPTS[1], device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(embeds.get(1).float(), reference[0].float(), atol=2e-2, rtol=1e-2)  # bf16 cache


def test_training_ran_and_moved_every_step_adapter(chain):
    log = [json.loads(line) for line in open(os.path.join(chain["run"], "train_log.jsonl"))]
    assert log[-1]["step"] == 3 and all(k in log[-1] for k in ("d_accuracy", "grad_norm/step0", "grad_norm/step1"))
    state = load_file(os.path.join(chain["run"], "student.safetensors"))
    for adapter in ("step0", "step1"):
        b = [v for k, v in state.items() if f".lora_B.{adapter}." in k]
        assert b and max(float(v.abs().max()) for v in b) > 0  # trained away from the zero init
    assert os.path.isfile(os.path.join(chain["run"], "samples", "step_000003.png"))


def test_stock_pipeline_with_the_step_switch_equals_our_2_step_sampler(chain):
    from diffusers import ZImagePipeline

    from twostep.engine.backbone import Conditioning

    info = json.load(open(os.path.join(chain["diffusers"], "twostep.json")))
    assert info["num_steps"] == 2 and info["default_schedule"]
    # the three documented lines, with nothing from twostep
    pipe = ZImagePipeline.from_pretrained(chain["diffusers"])
    for k in (1, 2):
        pipe.load_lora_weights(os.path.join(chain["diffusers"], "twostep_lora"), weight_name=f"step{k}_lora.safetensors",
                               adapter_name=f"step{k}")
    pipe.set_adapters("step1")

    def next_step(p, i, t, kw):
        p.set_adapters("step2" if i == 0 else "step1")
        return kw

    student, _ = _student(chain["run"])
    for seed, prompt in enumerate(PROMPTS[:2]):
        latents = pipe(prompt, height=RES, width=RES, num_inference_steps=2, guidance_scale=0.0,
                       generator=torch.Generator().manual_seed(seed), output_type="latent",
                       callback_on_step_end=next_step).images
        feats, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        ours = student.sample(_noise(seed), Conditioning.from_list(feats))["final"]
        assert (latents.float() - ours).abs().max() <= 1e-4
    # the adapters matter: without the switch (step-1 adapter for both steps) the result differs
    plain = pipe(PROMPTS[0], height=RES, width=RES, num_inference_steps=2, guidance_scale=0.0,
                 generator=torch.Generator().manual_seed(0), output_type="latent").images
    feats, _ = pipe.encode_prompt(PROMPTS[0], device="cpu", do_classifier_free_guidance=False)
    assert (plain.float() - student.sample(_noise(0), Conditioning.from_list(feats))["final"]).abs().max() > 1e-3


def test_lora_export_round_trips_into_the_student(chain):
    from twostep.real.export import apply_step_loras, load_step_loras
    from twostep.real.train import build_real_student, load_real_run

    student, embeds = _student(chain["run"])
    cfg, meta, _ = load_real_run(chain["run"])
    fresh, _ = build_real_student(cfg, meta["teacher"], embeds.width, torch.device("cpu"))
    paths = [os.path.join(chain["lora"], f"step{k}_lora.safetensors") for k in (1, 2)]
    apply_step_loras(fresh, load_step_loras(paths))
    cond = embeds[torch.tensor([0, 2])]
    noise = torch.cat([_noise(5), _noise(6)])
    torch.testing.assert_close(fresh.eval().sample(noise, cond)["final"], student.sample(noise, cond)["final"],
                               atol=1e-5, rtol=1e-5)
    assert all(k.startswith("transformer.") for k in load_file(paths[0]))


def test_comfyui_keys_match_the_loader_pattern_and_load_in_diffusers(chain):
    from diffusers import ZImagePipeline

    files = [os.path.join(chain["comfyui"], f"step{k}_lora_comfyui.safetensors") for k in (1, 2)]
    for path in files:
        keys = list(load_file(path))
        assert keys and all(COMFY_KEY.match(k) for k in keys), [k for k in keys if not COMFY_KEY.match(k)][:3]
        assert any(k.endswith(".alpha") for k in keys)
    assert "two-sampler" in open(os.path.join(chain["comfyui"], "README.md")).read().lower()
    # diffusers' Z-Image converter reads the same file; it equals the diffusers-format export
    outs = []
    for folder, name in ((chain["comfyui"], "step2_lora_comfyui.safetensors"), (chain["lora"], "step2_lora.safetensors")):
        pipe = ZImagePipeline.from_pretrained(chain["pipe"])
        pipe.load_lora_weights(folder, weight_name=name, adapter_name="step2")
        outs.append(pipe(PROMPTS[0], height=RES, width=RES, num_inference_steps=2, guidance_scale=0.0,
                         generator=torch.Generator().manual_seed(1), output_type="latent").images)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    base = ZImagePipeline.from_pretrained(chain["pipe"])(PROMPTS[0], height=RES, width=RES, num_inference_steps=2,
                                                          guidance_scale=0.0, generator=torch.Generator().manual_seed(1),
                                                          output_type="latent").images
    assert (outs[0] - base).abs().max() > 1e-3  # the LoRA was really applied


def test_comfyui_export_ships_a_workflow_for_its_own_files_and_schedule(chain):
    from test_comfy_workflow import check_student, check_workflow

    folder = chain["comfyui"]
    with open(os.path.join(folder, "twostep.json")) as f:
        info = json.load(f)
    with open(os.path.join(folder, info["workflow"])) as f:
        graph = json.load(f)
    written = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    assert written == info["files"] == ["step1_lora_comfyui.safetensors", "step2_lora_comfyui.safetensors"]
    assert check_workflow(graph) == []
    check_student(graph, info, info["files"])  # LoRA names, sigma split = twostep.json's sigmas, shift, RES
    assert info["student_sigmas"] == [1.0, 0.75] and info["resolution"] == RES
    card = open(os.path.join(folder, "README.md")).read()
    assert "workflow_api.json" in card and "`models/loras/`" in card and "`models/vae/`" in card
    assert all(f"`{n['class_type']}`" in card for n in graph.values())


def test_merged_export_is_one_plain_transformer_per_step(chain):
    from twostep.engine.student import MergedStudent
    from twostep.families.zimage.adapter import ZImageBackbone

    student, embeds = _student(chain["run"])
    steps = [ZImageBackbone.from_pretrained(os.path.join(chain["merged"], f"transformer_step{k}"), dtype=torch.float32)
             for k in (1, 2)]
    info = json.load(open(os.path.join(chain["merged"], "twostep.json")))
    assert info["merge_rounding"][0] < 1e-5 and info["renoise"] == "euler"  # float32 storage keeps the update
    merged = MergedStudent(steps, student.cfg)
    cond, noise = embeds[torch.tensor([1])], _noise(3)
    assert (merged.sample(noise, cond)["final"] - student.sample(noise, cond)["final"]).abs().max() <= 1e-4


def test_generate_is_reproducible_per_seed(chain, tmp_path):
    one, two = str(tmp_path / "a.png"), str(tmp_path / "b.png")
    for out in (one, two):
        assert main(["generate", "--model", chain["diffusers"], "a red cat", "--seed", "3", "--out", out,
                     "--device", "cpu"]) == 0
    assert open(one, "rb").read() == open(two, "rb").read()
    other = str(tmp_path / "c.png")
    assert main(["generate", "--model", chain["diffusers"], "a red cat", "--seed", "4", "--out", other]) == 0
    assert open(one, "rb").read() != open(other, "rb").read()  # the seed is used
    folder = str(tmp_path / "batch")
    assert main(["generate", "--model", chain["diffusers"], "--prompts", chain["prompts"], "--seed", "3",
                 "--out", folder]) == 0
    index = json.load(open(os.path.join(folder, "index.json")))
    assert [v["prompt"] for v in index.values()] == PROMPTS and [v["seed"] for v in index.values()] == [3, 4, 5]
    single = str(tmp_path / "d.png")  # image i of a batch = the same prompt alone with seed SEED+i
    assert main(["generate", "--model", chain["diffusers"], PROMPTS[1], "--seed", "4", "--out", single]) == 0
    assert open(single, "rb").read() == open(os.path.join(folder, "00001.png"), "rb").read()


# --------------------------------------------------------------------------- bad input, before expensive work


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def test_bad_inputs_fail_in_one_line_before_any_model_loads(chain, tmp_path, capsys, monkeypatch):
    import twostep.real.teacher_data as real_data
    import twostep.real.train as real_train

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(real_data, "encode_prompt_cache", forbidden)
    monkeypatch.setattr(real_train, "build_real_student", forbidden)
    good = chain["prompts"]
    base = ["teacher-data", "--out", str(tmp_path / "d")]
    other = tmp_path / "sd"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert "not a ZImagePipeline" in _error(capsys, base + ["--teacher", str(other), "--prompts", good])
    assert "not a Z-Image pipeline folder" in _error(capsys, base + ["--teacher", str(tmp_path), "--prompts", good])
    assert "multiple of 4" in _error(capsys, base + ["--teacher", chain["pipe"], "--prompts", good, "--resolution",
                                                     "30"])
    empty_line = tmp_path / "p.txt"
    empty_line.write_text("a cat\n\na dog\n")
    assert "p.txt:2: empty line" in _error(capsys, base + ["--teacher", chain["pipe"], "--prompts", str(empty_line)])
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a cat"}\n{"text": "a dog"}\n')
    assert "p.jsonl:2: missing the string field 'prompt'" in _error(
        capsys, base + ["--teacher", chain["pipe"], "--prompts", str(jsonl)])
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.table({"caption": ["a cat"]}), parquet)
    assert "no 'prompt' column" in _error(capsys, base + ["--teacher", chain["pipe"], "--prompts", str(parquet)])
    # a cache made with another schedule, or by another teacher, than the training config names
    train = ["train", "--config", DEFAULT_ZIMAGE_CONFIG, "--data", chain["data"], "--out", str(tmp_path / "r"), *TRAIN]
    assert "made with teacher_steps=8, not 4" in _error(capsys, train + ["teacher_data.teacher_steps=4"])
    other_pipe = str(tmp_path / "other_pipe")
    tiny_zimage_pipeline(seed=1).save_pretrained(other_pipe)
    assert "was made by another teacher" in _error(capsys, train + ["--teacher", other_pipe])
    # a rerun into a finished folder with other prompts is refused before its text cache is touched
    text_manifest = os.path.join(chain["data"], "text", "manifest.json")
    before = open(text_manifest).read()
    fewer = tmp_path / "fewer.txt"
    fewer.write_text(PROMPTS[0] + "\n")
    assert "from another prompt set (3 prompts there, 1 in fewer.txt now)" in _error(capsys, ["teacher-data", "--teacher", chain["pipe"], "--prompts", str(fewer),
                                               "--resolution", str(RES), "--out", chain["data"],
                                               "teacher_data.samples_per_prompt=2", "teacher_data.shard_size=4"])
    assert open(text_manifest).read() == before
    assert "neither a local folder nor a reachable hub model" in _error(
        capsys, base + ["--teacher", "no-such-org/no-such-model", "--prompts", good])


def test_bf16_base_with_autocast_trains_fp32_adapters(chain, tmp_path):
    """The real configuration's precision: frozen bf16 base, bf16 autocast, fp32 LoRA adapters and heads."""
    from twostep.real.train import build_real_student, load_real_run

    run = str(tmp_path / "bf16")
    args = [a for a in TRAIN if not a.startswith(("model.dtype", "train.bf16", "train.steps"))]
    # no --config: a Z-Image teacher-data folder selects the real path's packaged recipe
    assert main(["train", "--data", chain["data"], "--out", run, *args,
                 "train.steps=2", "model.dtype=bfloat16", "train.bf16=true"]) == 0
    log = [json.loads(line) for line in open(os.path.join(run, "train_log.jsonl"))]
    assert all(math.isfinite(log[-1][k]) and log[-1][k] > 0 for k in ("grad_norm/step0", "grad_norm/step1"))
    cfg, meta, state = load_real_run(run)
    assert all(v.dtype == torch.float32 for v in state.values())
    student, _ = build_real_student(cfg, meta["teacher"], 32, torch.device("cpu"))
    assert student.base.dtype == torch.bfloat16
    assert {p.dtype for p in student.parameters() if p.requires_grad} == {torch.float32}


def test_export_refuses_what_stock_samplers_cannot_reproduce(chain, tmp_path, capsys):
    import shutil

    import yaml

    run = str(tmp_path / "fresh_run")
    shutil.copytree(chain["run"], run)
    config = yaml.safe_load(open(os.path.join(run, "config.yaml")))
    config["student"]["renoise"] = "fresh"
    open(os.path.join(run, "config.yaml"), "w").write(yaml.safe_dump(config))
    assert "renoise=fresh" in _error(capsys, ["export", run, "--format", "diffusers", "--out", str(tmp_path / "e")])
    assert not os.path.exists(tmp_path / "e")


def test_text_cache_resumes_by_shard_and_reads_across_shards(tmp_path):
    from twostep.real.text_cache import PromptEmbeds, encode_prompt_cache

    pipe_dir = str(tmp_path / "pipe")
    tiny_zimage_pipeline(seed=0).save_pretrained(pipe_dir)
    out = str(tmp_path / "text")
    encode_prompt_cache(pipe_dir, PROMPTS, out, shard_size=2)
    whole = PromptEmbeds(out)
    assert len(whole) == 3 and len(os.listdir(out)) == 3  # two shards + manifest
    # an interrupted run: the manifest lists only the first shard and is not complete
    manifest_path = os.path.join(out, "manifest.json")
    manifest = json.load(open(manifest_path))
    first_shard = os.path.join(out, manifest["shards"][0]["name"])
    stamp = os.path.getmtime(first_shard)
    manifest["complete"], manifest["shards"] = False, manifest["shards"][:1]
    json.dump(manifest, open(manifest_path, "w"))
    os.remove(os.path.join(out, "embeds-00001.safetensors"))
    with pytest.raises(Exception, match="unfinished"):
        PromptEmbeds(out)
    encode_prompt_cache(pipe_dir, PROMPTS, out, shard_size=2)
    assert os.path.getmtime(first_shard) == stamp  # finished shard kept
    again = PromptEmbeds(out)
    for i in range(3):
        torch.testing.assert_close(again.get(i), whole.get(i))
    cond = again[torch.tensor([2, 0])]
    assert cond.embeds.shape[0] == 2 and cond.mask.sum(1).tolist() == [whole.get(2).shape[0], whole.get(0).shape[0]]


# --------------------------------------------------------------------------- cards, usage code, refusals


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _run_snippet(code: str, chain, tmp_path, monkeypatch, folder: str) -> dict:
    """Execute usage code as a user would, with only the device, dtype, base model and folder swapped in."""
    code = (code.replace('"path/to/this/export"', repr(folder)).replace('.to("cuda")', "")
            .replace("torch.bfloat16", "torch.float32").replace('"path/to/pipe"', repr(chain["pipe"])))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "snippet", "exec"), namespace)  # noqa: S102 - our own generated code
    assert (tmp_path / "image.png").is_file()
    return namespace


@pytest.mark.parametrize("fmt", ["diffusers", "lora", "merged"])
def test_every_exports_card_carries_usage_code_that_runs_both_steps(chain, tmp_path, monkeypatch, fmt):
    from twostep.real.pipeline import generate_images, load_two_step_pipeline

    card = open(os.path.join(chain[fmt], "README.md"), encoding="utf-8").read()
    assert card.startswith("---\nlibrary_name: diffusers\npipeline_tag: text-to-image\n") and "\n---\n" in card
    for name in ("README.md", "twostep.json"):  # no absolute local path anywhere
        text = open(os.path.join(chain[fmt], name), encoding="utf-8").read()
        assert str(chain["root"]) not in text and "/tmp" not in text, name
    (code,) = _python_blocks(card)
    assert "sigmas=[1.0, 0.5]" in code and f"height={RES}, width={RES}" in code
    ns = _run_snippet(code, chain, tmp_path, monkeypatch, chain[fmt])
    pipe = ns["pipe"]
    assert [round(float(s), 6) for s in pipe.scheduler.sigmas] == [1.0, 0.75, 0.0]  # two real steps
    image = torch.from_numpy(np.array(ns["image"])).float()
    # the second step's parameters matter: without the switch (step 1's for both steps) the image differs
    call = dict(sigmas=[1.0, 0.5], guidance_scale=0.0, height=RES, width=RES)
    if fmt == "merged":
        pipe.transformer = ns["steps"][0]
    else:
        pipe.set_adapters("step1")
    plain = pipe(ns["prompt"], **call).images[0]
    assert (torch.from_numpy(np.array(plain)).float() - image).abs().max() > 0
    if fmt == "diffusers":  # the same image as `twostep generate`'s pipeline (same default noise: seedless CPU RNG)
        twostep_pipe, switch = load_two_step_pipeline(chain[fmt], device="cpu")
        torch.manual_seed(0)
        ours = twostep_pipe(ns["prompt"], height=RES, width=RES, generator=torch.Generator().manual_seed(0),
                            **switch.call_kwargs()).images[0]
        switch.reset(pipe)
        theirs = pipe(ns["prompt"], height=RES, width=RES, generator=torch.Generator().manual_seed(0),
                      callback_on_step_end=ns["next_step"], sigmas=[1.0, 0.5], guidance_scale=0.0).images[0]
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))
        assert generate_images  # the CLI's path is covered by test_generate_is_reproducible_per_seed


def test_lora_files_say_which_step_and_schedule_they_are(chain):
    from safetensors import safe_open

    for fmt, name in (("lora", "step{k}_lora.safetensors"), ("comfyui", "step{k}_lora_comfyui.safetensors")):
        for k in (1, 2):
            with safe_open(os.path.join(chain[fmt], name.format(k=k)), framework="pt") as f:
                meta = f.metadata()
            assert meta["twostep.step"] == str(k) and meta["twostep.num_steps"] == "2"
            assert json.loads(meta["twostep.sigmas"]) == [1.0, 0.75] and meta["twostep.shift"] == "3.0"
            assert meta["twostep.base_model"].startswith("pipe (local folder, fingerprint ")


def test_the_docs_show_the_code_the_cards_carry():
    from twostep.families.zimage.model_card import usage_snippet

    info = {"num_steps": 2, "student_sigmas": [1.0, 0.75], "shift": 3.0, "resolution": 1024,
            "base_model": "Tongyi-MAI/Z-Image-Turbo"}
    expected = usage_snippet("diffusers", info, folder="exports/zimage-2step")
    root = os.path.join(os.path.dirname(__file__), "..")
    for doc in ("README.md", "docs/zimage.md"):
        blocks = [b for b in _python_blocks(open(os.path.join(root, doc), encoding="utf-8").read())
                  if "ZImagePipeline" in b]
        assert blocks and all(b == expected for b in blocks), doc


def test_export_never_replaces_what_it_did_not_write(chain, tmp_path, capsys, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    argv = ["export", chain["run"], "--format", "lora", "--out", str(mine)]
    assert "not empty and was not written by this command" in _error(capsys, argv)
    assert (mine / "notes.txt").read_text() == "keep me"
    monkeypatch.chdir(mine)
    assert "would replace" in _error(capsys, ["export", chain["run"], "--format", "lora", "--out", ".", "--overwrite"])
    assert "would replace" in _error(capsys, ["export", chain["run"], "--format", "lora", "--out", chain["run"],
                                              "--overwrite"])
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--overwrite"]) == 0
    assert not (mine / "notes.txt").exists() and (mine / "step1_lora.safetensors").exists()
    assert main(argv) == 0  # an earlier export's folder is replaced without asking
    assert "a 'merged' export" in _error(capsys, ["generate", "--model", chain["merged"], "a cat", "--out",
                                                 str(tmp_path / "x.png")])


def test_train_checks_the_vae_its_previews_need_before_anything(chain, tmp_path, capsys):
    import shutil

    no_vae = tmp_path / "no_vae"
    shutil.copytree(chain["pipe"], no_vae)
    shutil.rmtree(no_vae / "vae")
    run = tmp_path / "run"
    assert "lacks vae/" in _error(capsys, ["train", "--data", chain["data"], "--teacher", str(no_vae), "--out",
                                           str(run), *TRAIN])
    assert not run.exists()


def test_online_mode_on_the_real_path(chain, tmp_path):
    """teacher-data in online mode stores only the text cache; training computes trajectories equal to the
    cache's (same seed and prompt) from the frozen base with its adapters off."""
    from twostep.core.config import load_config
    from twostep.engine.teacher_data import TeacherData
    from twostep.real.teacher_data import resolve_teacher
    from twostep.real.text_cache import PromptEmbeds
    from twostep.real.train import ZImageDistillConfig, build_real_student, load_real_run, online_teacher_data

    data = tmp_path / "online"
    assert main(["teacher-data", "--teacher", chain["pipe"], "--prompts", chain["prompts"], "--resolution",
                 str(RES), "--out", str(data), "teacher_data.samples_per_prompt=2", "teacher_data.shard_size=4",
                 "teacher_data.batch_size=2", "teacher_data.mode=online"]) == 0
    assert not list(data.glob("shard-*")) and (data / "text").is_dir()
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), *TRAIN]) == 0
    cfg, meta, _ = load_real_run(str(run))
    assert cfg.teacher_data.mode == "online"

    cfg = load_config(ZImageDistillConfig, str(os.path.join(chain["run"], "config.yaml")))
    teacher = resolve_teacher(cfg.model.path, RES)
    embeds = PromptEmbeds(os.path.join(chain["data"], "text"))
    student, _ = build_real_student(cfg, teacher.folder, embeds.width, torch.device("cpu"))
    with torch.no_grad():
        for params in student.parameter_groups().values():
            for p in params:
                p.add_(0.05)
    online = online_teacher_data(student, cfg, teacher, embeds, torch.device("cpu"))
    index = torch.tensor([5, 0, 2])
    a, b = TeacherData(chain["data"]).batch(index), online.batch(index)
    for key in ("noise", "states", "final"):
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=2e-3)


def test_export_writes_a_sample_grid_the_card_shows(chain, tmp_path):
    from PIL import Image

    out = tmp_path / "lora"
    assert main(["export", chain["run"], "--format", "lora", "--out", str(out), "--samples", "2"]) == 0
    grid = Image.open(out / "samples.png")
    assert grid.width > 3 * RES and grid.height > 2 * RES  # a text column + teacher + student, two rows
    assert json.load(open(out / "twostep.json"))["samples"] == "samples.png"
    assert "](samples.png)" in (out / "README.md").read_text()
    assert "samples.png" not in os.listdir(chain["lora"])  # on CPU no grid unless asked


def test_every_python_snippet_in_the_docs_runs_or_is_the_card_code(tmp_path, monkeypatch, capsys):
    """README.md and docs/*.md: a block is either the usage code every card carries (run above on each export
    format) or runs as shown here."""
    import glob

    from twostep.families.zimage.model_card import usage_snippet

    info = {"num_steps": 2, "student_sigmas": [1.0, 0.75], "shift": 3.0, "resolution": 1024,
            "base_model": "Tongyi-MAI/Z-Image-Turbo"}
    from twostep.families.flux2.model_card import usage_snippet as klein_snippet

    card_code = usage_snippet("diffusers", info, folder="exports/zimage-2step")
    klein_info = {"num_steps": 2, "student_sigmas": [1.0, 0.908144], "resolution": 1024, "latent_shape": [128, 64, 64]}
    klein_code = klein_snippet("diffusers", klein_info, folder="exports/flux2-klein-2step")  # docs/flux2.md
    root = os.path.join(os.path.dirname(__file__), "..")
    ran = 0
    for doc in ["README.md", *sorted(glob.glob(os.path.join(root, "docs", "*.md")))]:
        for block in _python_blocks(open(os.path.join(root, doc), encoding="utf-8").read()):
            if block in (card_code, klein_code):
                continue
            monkeypatch.chdir(tmp_path)
            exec(compile(block, doc, "exec"), {"__name__": "__snippet__"})  # noqa: S102 - our own docs
            ran += 1
    assert ran >= 1 and "bytes per latent element" in capsys.readouterr().out


def test_a_real_run_resumes_from_its_own_config_outside_the_checkout(chain, tmp_path, monkeypatch, capsys):
    """From a folder with no configs/: `--config NAME` finds the packaged recipe, and `--resume latest` with no
    --config continues a finished real run from its config.yaml (here extended by one step)."""
    import shutil

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run = elsewhere / "run"
    assert main(["train", "--config", "zimage_turbo_2step_lora", "--data", chain["data"], "--out", str(run),
                 *TRAIN]) == 0
    copy = elsewhere / "copy"
    shutil.copytree(run, copy)
    capsys.readouterr()
    assert main(["train", "--out", str(copy), "--resume", "latest", "train.steps=4", "--allow-config-change"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "step_000003" in out and "train.steps: 3 -> 4" in out
    steps = [json.loads(line)["step"] for line in open(copy / "train_log.jsonl")]
    assert steps[-1] == 4 and "teacher" not in capsys.readouterr().err


def test_dmd2_trains_resumes_exactly_and_exports_only_the_student(chain, tmp_path):
    """`recipe.kind: dmd2` on the real path (the packaged zimage_turbo_2step_dmd2: a fake-score LoRA on the shared
    base): a run stopped at step 2 and resumed equals the uninterrupted one bit for bit (student and fake score),
    and the export carries the student's adapters only."""
    from twostep.engine.checkpoint import load_state

    args = ["train", "--config", "zimage_turbo_2step_dmd2", "--data", chain["data"], *TRAIN,
            "train.fake_steps_per_g=2", "train.d_warmup_steps=1", "train.log_every=1", "train.sample_every=100",
            "student.fake_score_rank=16"]  # 4x the tiny student's rank, as the packaged 256 is 4x its 64
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main([*args, "--out", str(straight)]) == 0
    assert main([*args, "train.steps=2", "--out", str(resumed)]) == 0
    assert main(["train", "--out", str(resumed), "--resume", "latest", "train.steps=3", "--allow-config-change"]) == 0
    assert (resumed / "student.safetensors").read_bytes() == (straight / "student.safetensors").read_bytes()
    a, b = (load_state(str(run / "checkpoints" / "step_000003")) for run in (straight, resumed))
    assert a["fake_score"] and all(torch.equal(a["fake_score"][n], b["fake_score"][n]) for n in a["fake_score"])
    log = [json.loads(line) for line in open(straight / "train_log.jsonl")]
    assert all(k in log[-1] for k in ("dmd_loss", "dmd_loss/step1", "fake_score_total", "time/step_s"))
    assert "d_loss" not in log[-1], "DMD2 without its GAN trains no discriminator"
    out = str(tmp_path / "lora")
    assert main(["export", str(straight), "--format", "lora", "--out", out, "--dtype", "float32"]) == 0
    for k in (1, 2):
        keys = load_file(os.path.join(out, f"step{k}_lora.safetensors")).keys()
        assert keys and not any("fake" in key for key in keys)
