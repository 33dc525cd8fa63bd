"""`twostep plan`: exact parameter counts on the meta device, activation scaling, and the bad-input errors."""

import argparse
import json
import os

import pytest

from twostep.core.errors import TwostepError
from twostep.real.plan import GIB, PlanRequest, add_plan_arguments, cmd_plan, format_plan, plan_memory
from twostep.testing import tiny_transformer_config

ZIMAGE_PARAMS = 6.155e9  # Z-Image-Turbo's published size (DESIGN §1)


def _lora_count(dim: int, blocks: int, rank: int) -> int:
    """Per block: to_q/k/v/out (dim -> dim) and SwiGLU w1, w3 (dim -> ffn), w2 (ffn -> dim); r*(in+out) each."""
    ffn = int(dim / 3 * 8)  # Z-Image's feed-forward width
    return blocks * rank * (4 * (dim + dim) + 3 * (dim + ffn))


@pytest.fixture(scope="module")
def turbo_lora():
    return plan_memory(PlanRequest(model="zimage-turbo", mode="lora", resolution=1024, batch=2, lora_rank=16))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from diffusers import ZImageTransformer2DModel

    path = tmp_path_factory.mktemp("tiny_plan")
    ZImageTransformer2DModel(**tiny_transformer_config()).save_pretrained(str(path / "transformer"))
    return path


def test_turbo_lora_weights_and_total(turbo_lora):
    parts = turbo_lora["components"]
    base = parts["frozen base (bf16, = teacher)"]
    assert base == pytest.approx(ZIMAGE_PARAMS * 2, rel=0.01)
    # 30 main layers + 2 noise + 2 context refiners, rank 16, two per-step adapters
    assert turbo_lora["params"]["trainable"] == 2 * _lora_count(3840, 34, 16)
    assert parts["LoRA adapters + grads + AdamW (fp32)"] == turbo_lora["params"]["trainable"] * 16
    assert turbo_lora["tokens"]["image"] == (1024 // 8 // 2) ** 2
    assert turbo_lora["total_bytes"] == sum(parts.values())
    assert base + 2 * GIB < turbo_lora["total_bytes"] < 48 * GIB
    assert turbo_lora["fits"] == {k: turbo_lora["total_bytes"] <= float(k) * GIB for k in turbo_lora["fits"]}
    assert turbo_lora["fits"]["80"]


def test_activations_scale_with_batch_and_tokens(turbo_lora):
    act = lambda plan: sum(v for k, v in plan["components"].items() if k.startswith("activations"))  # noqa: E731
    double = plan_memory(PlanRequest(model="zimage-turbo", mode="lora", resolution=1024, batch=4))
    assert act(double) == 2 * act(turbo_lora)
    # checkpointed inputs are linear in tokens: 512 px has 1024 image tokens instead of 4096 (+512 caption each)
    half = plan_memory(PlanRequest(model="zimage-turbo", mode="lora", resolution=512, batch=2))
    key = "activations: checkpointed block inputs (estimate)"
    assert half["components"][key] * (4096 + 512) == turbo_lora["components"][key] * (1024 + 512)


def test_full_mode_shards_optimizer_state():
    key = "student copies: bf16 + fp32 master/grads/AdamW (sharded)"
    one = plan_memory(PlanRequest(model="zimage-turbo", mode="full", resolution=512, batch=1, gpus=1))
    eight = plan_memory(PlanRequest(model="zimage-turbo", mode="full", resolution=512, batch=1, gpus=8))
    # 2 copies x (bf16 weight + fp32 master + fp32 grad + 2 fp32 Adam states) = 2 x 18 bytes per parameter
    assert one["components"][key] == pytest.approx(2 * 18 * ZIMAGE_PARAMS, rel=0.01)
    assert eight["components"][key] == pytest.approx(one["components"][key] / 8, rel=1e-6)
    assert eight["total_bytes"] < one["total_bytes"]
    assert not one["fits"]["141"]  # ~206 GiB of optimizer state alone


def test_lora_count_matches_peft_on_a_tiny_folder(tiny_folder):
    from twostep.engine.student import Student, StudentConfig
    from twostep.families.zimage.adapter import ZImageBackbone

    plan = plan_memory(PlanRequest(model=str(tiny_folder), mode="lora", resolution=128, batch=1, lora_rank=4))
    student = Student(ZImageBackbone.from_pretrained(str(tiny_folder), dtype=None), StudentConfig(lora_rank=4))
    peft_count = sum(p.numel() for ps in student.parameter_groups().values() for p in ps)
    cfg = tiny_transformer_config()
    assert plan["params"]["trainable"] == peft_count
    assert peft_count == 2 * _lora_count(cfg["dim"], cfg["n_layers"] + 2 * cfg["n_refiner_layers"], 4)
    # a bare transformer folder reads the same config
    bare = plan_memory(PlanRequest(model=str(tiny_folder / "transformer"), mode="lora", resolution=128, batch=1))
    assert bare["params"]["base"] == plan["params"]["base"]


def test_bad_inputs(tmp_path):
    with pytest.raises(TwostepError, match="16"):
        plan_memory(PlanRequest(model="zimage-turbo", resolution=1000))
    with pytest.raises(TwostepError, match="config.json"):
        plan_memory(PlanRequest(model=str(tmp_path)))
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "in_channels": 3}))
    with pytest.raises(TwostepError, match="not a Z-Image"):
        plan_memory(PlanRequest(model=str(tmp_path)))
    with pytest.raises(TwostepError, match="zimage-turbo"):
        plan_memory(PlanRequest(model="no-such-org/no-such-model-xyz"))
    with pytest.raises(TwostepError, match="mode"):
        plan_memory(PlanRequest(mode="qlora"))


def test_format_and_cli(capsys):
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    args = parser.parse_args(["--resolution", "512", "--batch", "1", "--card-gib", "24"])
    cmd_plan(args)
    out = capsys.readouterr().out
    assert "total per GPU" in out and "estimate" in out and "80 GiB" in out and "verdict: fits a 24 GiB" in out
    big = plan_memory(PlanRequest(model="zimage-turbo", mode="full", resolution=1024, batch=8, card_gib=80))
    assert "does NOT fit a 80 GiB card" in format_plan(big)


def test_plan_command_writes_its_section(tmp_path, capsys):
    from twostep.cli import main

    doc = tmp_path / "zimage.md"
    doc.write_text("# Z-Image\n\nhand-written text stays\n")
    assert main(["plan", "--resolution", "512", "--batch", "2", "--results", str(doc)]) == 0
    text = doc.read_text()
    assert "hand-written text stays" in text and "<!-- twostep:plan-lora-512-b2-g1:begin -->" in text
    assert "Written by `twostep plan --resolution 512 --batch 2" in text and "total per GPU" in text
    assert main(["plan", "--resolution", "1000"]) == 2
    assert "multiple of 16" in capsys.readouterr().err


# --------------------------------------------------------------------------- settings from a config (issue 15)


def _plan(capsys, *argv) -> str:
    from twostep.cli import main

    assert main(["plan", *argv]) == 0
    return capsys.readouterr().out


def _component(out: str, name: str) -> float:
    return float(next(line for line in out.splitlines() if line.startswith(name)).split()[-1])


def test_plan_defaults_come_from_the_packaged_config(capsys):
    from twostep.core.config import load_config
    from twostep.core.packaged_configs import resolve_config
    from twostep.real.train import ZImageDistillConfig

    cfg = load_config(ZImageDistillConfig, resolve_config("zimage_turbo_2step_lora"))
    out = _plan(capsys)
    header = out.splitlines()[0]
    assert header == (f"zimage-turbo | lora | {cfg.teacher_data.resolution}px | batch {cfg.train.batch_size}/GPU | "
                      f"1 GPU(s) | 2 student steps | LoRA rank {cfg.student.lora_rank}")
    assert cfg.train.batch_size == 4  # not the old flag default of 2
    assert "config: zimage_turbo_2step_lora |" in out and "flags over the config" not in out
    # the same numbers as the request built by hand from the config's values
    by_hand = plan_memory(PlanRequest(resolution=1024, batch=4, lora_rank=64))
    assert f"{'total per GPU'}" in out and f"{by_hand['total_bytes'] / GIB:8.2f}" in out


def test_overrides_change_what_is_planned(capsys):
    base = _plan(capsys)
    out = _plan(capsys, "train.batch_size=8", "student.lora_rank=32")
    assert "batch 8/GPU" in out and "LoRA rank 32" in out
    assert "config: zimage_turbo_2step_lora + train.batch_size=8 student.lora_rank=32 |" in out
    key = "activations: checkpointed block inputs (estimate)"
    assert _component(out, key) == pytest.approx(2 * _component(base, key), abs=0.01)
    lora = "LoRA adapters + grads + AdamW (fp32)"
    assert _component(out, lora) == pytest.approx(_component(base, lora) / 2, abs=0.01)
    # LoRA targets, parameter form, discriminator heads, checkpointing and precision are read too
    narrow = _plan(capsys, "student.lora_targets=[to_q,to_k,to_v,to_out.0]")
    assert _component(narrow, lora) < _component(base, lora) / 2
    shared = _plan(capsys, "student.params=shared")
    assert "one shared parameter set" in shared
    assert _component(shared, lora) == pytest.approx(_component(base, lora) / 2, abs=0.01)
    disc = "discriminator heads + grads + AdamW (fp32)"
    assert _component(_plan(capsys, "discriminator.blocks=[26]"), disc) < _component(base, disc)
    off = _plan(capsys, "train.gradient_checkpointing=false")
    assert "gradient checkpointing off" in off and key not in off
    assert _component(off, "total per GPU") > 2 * _component(base, "total per GPU")
    fp32 = _plan(capsys, "model.dtype=float32", "train.bf16=false")
    assert _component(fp32, "frozen base (fp32, = teacher)") == pytest.approx(
        2 * _component(base, "frozen base (bf16, = teacher)"), abs=0.01)
    assert _component(fp32, key) == pytest.approx(2 * _component(base, key), abs=0.01)


def test_flags_win_over_the_config_and_are_named(capsys):
    out = _plan(capsys, "--batch", "2", "--resolution", "512", "train.batch_size=8")
    assert "batch 2/GPU" in out and "512px" in out
    assert "flags over the config: --resolution 512 (config: 1024), --batch 2 (config: 8)" in out


def test_docs_plan_blocks_are_reproduced(capsys):
    """Every line of docs/zimage.md's plan blocks comes out of the command written next to it, in order."""
    import re
    import shlex

    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "zimage.md"), encoding="utf-8").read()
    blocks = re.findall(r"Written by `twostep (plan [^`]*)`:\n\n```\n(.*?)\n```", doc, re.S)
    assert len(blocks) >= 2
    for command, text in blocks:
        argv = [a for a in shlex.split(command)[1:]]
        if "--results" in argv:  # print only; the doc is not rewritten here
            i = argv.index("--results")
            del argv[i:i + 2]
        out = _plan(capsys, *argv).splitlines()
        at = 0
        for line in text.splitlines():
            assert line in out[at:], f"`twostep {command}` no longer prints: {line}"
            at = out.index(line, at) + 1


def test_disk_estimate_and_config_errors(tmp_path, capsys):
    from twostep.cli import main
    from twostep.real.plan import cache_bytes_per_sample
    from twostep.real.teacher_data import ZImageDataConfig

    per_sample = cache_bytes_per_sample(1024, ZImageDataConfig())
    out = _plan(capsys, "--num-prompts", "1000", "teacher_data.samples_per_prompt=2")
    assert f"{per_sample / 2 ** 20:.2f} MiB per sample at 1024px" in out
    assert "for 2,000 samples" in out and f"{2000 * per_sample / GIB:.1f} GiB of latents" in out
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\na bird\n")
    out = _plan(capsys, f"teacher_data.prompts={prompts}", "--resolution", "512")
    assert "for 3 samples (3 prompts from the prompts in" in out
    assert f"{cache_bytes_per_sample(512, ZImageDataConfig()) / 2 ** 20:.2f} MiB per sample at 512px" in out
    # no prompt count known: the run's own draws (train.steps x train.batch_size)
    assert "for 8,000 samples (train.steps x train.batch_size" in _plan(capsys)
    assert main(["plan", "--config", "toy_demo"]) == 2
    assert "real Z-Image path" in capsys.readouterr().err
    assert main(["plan", "--config", "toy_teacher"]) == 2
    assert "real Z-Image path" in capsys.readouterr().err
    partial = tmp_path / "mine.yaml"  # a Z-Image config with only the keys it changes: the rest are the defaults
    partial.write_text("model:\n  path: Tongyi-MAI/Z-Image-Turbo\ntrain:\n  batch_size: 6\n")
    assert "batch 6/GPU" in _plan(capsys, "--config", str(partial))
    assert main(["plan", "train.batch_size=1"]) == 2
    assert "train.batch_size" in capsys.readouterr().err
    assert main(["plan", "no_such.key=1"]) == 2
    assert "unknown config key" in capsys.readouterr().err
    assert main(["plan", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_plan_prints_hours_from_the_flops_formula(capsys):
    """The time line is the docs/sizing.md formula: F = 2·P·T + 4·L·T²·d per forward, 13.4 F per sample per step,
    at 30-50 % of an H100's 989 TFLOP/s."""
    import re

    out = _plan(capsys, "--resolution", "1024", "--batch", "4")
    tokens = 4096 + 128
    forward = 2 * 6_154_908_736 * tokens + 4 * 30 * tokens ** 2 * 3840
    assert f"one forward {forward:.2e} FLOPs" in out
    fast, slow = (2000 * 13.4 * 4 * forward / (mfu * 989e12) / 3600 for mfu in (0.5, 0.3))
    assert re.search(rf"2,000 steps take {fast:.1f}-{slow:.1f} h on one H100", out), out


def test_plan_says_which_parallel_mode_it_assumes(capsys):
    assert "parallelism: DDP over 8 GPUs" in _plan(capsys, "--gpus", "8")
    assert "parallelism: FSDP2 over 8 GPUs" in _plan(capsys, "--gpus", "8", "--mode", "full")
    assert "parallelism" not in _plan(capsys)


def test_online_teacher_mode_plans_no_latent_cache_and_the_teachers_forwards_in_every_step(capsys):
    cached = _plan(capsys, "--config", "zimage_turbo_2step_lora")
    online = _plan(capsys, "--config", "zimage_turbo_2step_lora", "teacher_data.mode=online")
    assert "no latents (teacher_data.mode online)" in online and "MiB per sample" in cached
    assert "13.4 training + 16 online-teacher" in online  # 8 teacher steps x (1 D + 1 G batch) per step

    def hours(text):
        line = next(line for line in text.splitlines() if line.startswith("time"))
        return float(line.split(" steps take ")[1].split("-")[0])

    assert hours(online) == pytest.approx(hours(cached) * 29.4 / 13.4, rel=0.05)


def test_dmd2_plans_its_fake_score_adapter_and_five_critic_updates_per_step(capsys):
    """zimage_turbo_2step_dmd2: one more LoRA (a step adapter's size) with gradients and AdamW, no EMA; two graph
    passes at the peak instead of Turbo++'s three (no discriminator graph); the step's forwards are the DMD2 terms
    of real/plan.py (5 fake-score updates of 2 + 3·2 forwards, 3·2 + 0.9 + 2·2 for the generator)."""
    from twostep.real.plan import load_plan_config, request_from_config

    turbo = plan_memory(request_from_config(load_plan_config("zimage_turbo_2step_lora")[0]))
    dmd2 = plan_memory(request_from_config(load_plan_config("zimage_turbo_2step_dmd2")[0]))
    # the packaged fake score is 4x the student's rank: its LoRA is 4x a step's
    assert dmd2["components"]["fake-score LoRA + grads + AdamW (fp32)"] == 4 * dmd2["params"]["lora_per_step"] * 16
    assert "fake-score LoRA + grads + AdamW (fp32)" not in turbo["components"]
    assert (turbo["graph_passes"], dmd2["graph_passes"]) == (3, 2)
    assert dmd2["step_forwards"] == pytest.approx(5 * (2 + 3 * 2) + 3 * 2 + 2 * 2)
    assert "discriminator heads' fp32 feature maps" not in " ".join(dmd2["components"])
    same = plan_memory(request_from_config(load_plan_config("zimage_turbo_2step_dmd2",
                                                            ["student.fake_score_rank=0"])[0]))
    assert same["components"]["fake-score LoRA + grads + AdamW (fp32)"] == dmd2["params"]["lora_per_step"] * 16
    gan = plan_memory(request_from_config(load_plan_config("zimage_turbo_2step_dmd2", ["recipe.adv_weight=0.1"])[0]))
    assert gan["graph_passes"] == 3 and gan["step_forwards"] == pytest.approx(13.4 + 5 * 8 + 4)
    out = _plan(capsys, "--config", "zimage_turbo_2step_dmd2")
    assert "fake-score LoRA" in out and "~50 forwards per sample (DMD2: 5 fake-score updates each)" in out
