"""benchmarks/gpu_check.py runs end to end with --tiny on CPU and writes every number it promises."""

import importlib.util
import json
import math
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_all_measurements(tmp_path, capsys):
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n")
    assert _load().main(["--tiny", "--end-to-end", "--repeats", "2", "--out", str(tmp_path), "--results",
                         str(doc)]) == 0
    section = doc.read_text()
    assert "<!-- twostep:gpu-check-tiny:begin -->" in section and "Written by `python benchmarks/gpu_check.py --tiny" in section
    assert "×** faster" in section and "training step at 128², batch 2" in section
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    sampling, training = record["sampling"], record["training"]
    assert record["skipped"] == []
    assert record["environment"]["torch"] and record["environment"]["diffusers"]
    assert sampling["latency_2"] > 0 and sampling["latency_8"] > 0
    assert sampling["ratio"] == sampling["latency_8"] / sampling["latency_2"]
    assert len(sampling["latency_8_all"]) == 2
    for res, size in ((64, 1), (64, 2), (128, 1), (128, 2)):
        entry = training[f"train_step_{res}_b{size}"]
        assert entry["step_s"] > 0 and entry["latent_shape"] == [size, 16, res // 8, res // 8]
        assert entry["peak_bytes"] is None  # CPU: no allocator peak to report
        assert entry["plan_bytes_without_overhead"] > 0
        assert all(abs(entry[k]) < float("inf") for k in ("d_loss", "g_total"))
    e2e = record["end_to_end"]
    assert all(e2e[k] > 0 for k in ("pipeline_2", "pipeline_8", "text_encoder", "vae_decode"))
    assert e2e["ratio"] == e2e["pipeline_8"] / e2e["pipeline_2"] and "as a user sees it" in section
    assert "8-step / 2-step latency" in capsys.readouterr().out


def test_tiny_klein_run_measures_2_against_its_4_teacher_steps(tmp_path):
    """--family flux2: klein's random transformer, its packaged recipe (LoRA on its modules, 4 teacher steps, its
    image-size shift), latents at 16 px per cell, and klein's own pipeline end to end."""
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n")
    assert _load().main(["--tiny", "--family", "flux2", "--end-to-end", "--repeats", "1", "--out", str(tmp_path),
                         "--results", str(doc)]) == 0
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    sampling, training = record["sampling"], record["training"]
    assert record["model"]["family"] == "flux2" and record["environment"]["family"] == "flux2"
    assert sampling["teacher_steps"] == 4 and "latency_8" not in sampling
    assert sampling["ratio"] == sampling["latency_4"] / sampling["latency_2"]
    assert sampling["shift"] > 3.0 and sampling["latent_shape"] == [1, 16, 128 // 16, 128 // 16]
    assert training["lora_params"] > 0
    assert training["train_step_128_b2"]["latent_shape"] == [2, 16, 8, 8]
    assert math.isfinite(training["train_step_128_b2"]["g_total"])
    assert record["skipped"] == []
    e2e = record["end_to_end"]  # klein's own pipeline: 2 against its 4 teacher steps
    assert e2e["teacher_steps"] == 4 and all(e2e[k] > 0 for k in ("pipeline_2", "pipeline_4", "text_encoder",
                                                                     "vae_decode"))
    assert e2e["ratio"] == e2e["pipeline_4"] / e2e["pipeline_2"]
    section = doc.read_text()
    assert "twostep:gpu-check-flux2-tiny:begin" in section and "GPU check, FLUX.2 klein" in section
    assert "4 steps" in section and "×** faster" in section and "as a user sees it" in section


def test_full_size_targets_are_each_familys_published_model_and_recipe():
    """What a GPU run builds: the published transformer and packaged recipe of each family; klein reads its 512
    padded prompt tokens, and the plan gpu_check compares against is `twostep plan`'s for the release."""
    from twostep.real.plan import PlanRequest, plan_memory

    module = _load()
    zimage, klein = module.make_target("zimage", False), module.make_target("flux2", False)
    assert (zimage.teacher_steps, zimage.caption_tokens, zimage.latent_down) == (8, 128, 8)
    assert (klein.teacher_steps, klein.caption_tokens, klein.latent_down) == (4, 512, 16)
    assert klein.config == klein.family.published_config() and klein.shift == klein.cfg.teacher_data.shift
    request = PlanRequest(model="flux2-klein-4b", mode="lora", resolution=1024, batch=1, caption_tokens=512,
                          lora_rank=klein.cfg.student.lora_rank, lora_targets=klein.cfg.student.lora_targets,
                          discriminator=klein.cfg.discriminator)
    assert plan_memory(request, klein.config, klein.family)["total_bytes"] == plan_memory(request)["total_bytes"]


def test_budget_skips_and_full_size_needs_cuda(tmp_path):
    gpu_check = _load()
    assert gpu_check.main(["--tiny", "--repeats", "1", "--budget-s", "0", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    assert "latency_2" not in record["sampling"] and "train_step_64_b1" not in record["training"]
    assert len(record["skipped"]) == 5  # latency_2 (the loop stops there), 2 resolutions x 2 batches
    import torch

    if not torch.cuda.is_available():
        assert gpu_check.main(["--out", str(tmp_path / "full")]) == 2


def test_full_size_components_have_the_published_sizes():
    """The end-to-end check builds each release's pipeline from its published configs (on meta here): Qwen3-4B's
    4.02B parameters for both, Z-Image's 6.15B transformer and 16-channel AutoencoderKL (84M), klein's 3.88B
    transformer and the FLUX.2 VAE (32 latent channels at 8x)."""
    import torch

    from twostep.families.registry import family_named

    def count(module):
        return sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        zimage = family_named("zimage").random_pipeline(["a"], full=True)
        klein = family_named("flux2").random_pipeline(["a"], full=True)
    sizes = {name: (round(count(p.text_encoder) / 1e9, 2), round(count(p.transformer) / 1e9, 2))
             for name, p in (("zimage", zimage), ("klein", klein))}
    assert sizes == {"zimage": (4.02, 6.15), "klein": (4.02, 3.88)}, sizes
    assert round(count(zimage.vae) / 1e6) == 84 and zimage.vae.config.latent_channels == 16
    assert klein.vae.config.latent_channels == 32 and klein.vae_scale_factor == 8


def test_cuda_smoke_runs_every_real_path_stage_and_reports_a_failure(tmp_path):
    """benchmarks/cuda_smoke.py (run on a GPU machine) passes on CPU, and a failing stage is reported as such."""
    spec = importlib.util.spec_from_file_location("cuda_smoke", SCRIPT.parent / "cuda_smoke.py")
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    assert smoke.main(["--out", str(tmp_path / "ok")]) == 0
    record = json.loads((tmp_path / "ok" / "cuda_smoke.json").read_text())
    assert record["passed"] and list(record["stages"])[-1] == "evaluate"
    assert "eval/psnr" in record["train_last_log"] and "student" in record["evaluate"]
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n")
    record["stages"]["export"]["exit"] = 2
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(record))
    assert smoke.main(["--record", str(broken), "--results", str(doc)]) == 0
    assert "**A stage failed**" in doc.read_text() and "export FAILED" in doc.read_text()
