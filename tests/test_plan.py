"""`twostep plan`: exact parameter counts on the meta device, activation scaling, and the bad-input errors."""

import argparse
import json

import pytest

from twostep.errors import TwostepError
from twostep.plan import GIB, PlanRequest, add_plan_arguments, cmd_plan, format_plan, plan_memory
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
    from twostep.backbones.zimage import ZImageBackbone
    from twostep.engine.student import Student, StudentConfig

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
