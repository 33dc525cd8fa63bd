"""Real-path user experience on a tiny random pipeline (issue 15): labelled preview grids, warnings for a teacher-data
cache too small for the run, and the cache's bytes per sample that `twostep plan` extrapolates (docs/sizing.md)."""

import json
import os
import struct

import numpy as np
import pytest
import torch

from twostep.cli import DEFAULT_ZIMAGE_CONFIG, main
from twostep.core.errors import TwostepError
from twostep.testing import tiny_zimage_pipeline

RES = 32  # tiny VAE downsamples 2x: latents (16, 16, 16), images 32x32
PROMPTS = ["a red cat on a sofa", "a photo of a small house", "the city at night"]
SMALL = ["discriminator.blocks=[0,1]", "discriminator.hidden=16", "student.lora_rank=4", "student.lora_alpha=8",
         "model.dtype=float32", "train.bf16=false"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_ux")
    pipe = str(root / "pipe")
    tiny_zimage_pipeline(seed=0).save_pretrained(pipe)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    data = str(root / "data")
    assert main(["teacher-data", "--teacher", pipe, "--prompts", str(prompts), "--resolution", str(RES), "--out", data,
                 "teacher_data.samples_per_prompt=2", "teacher_data.shard_size=4", "teacher_data.batch_size=2",
                 "teacher_data.previews=0"]) == 0
    return {"root": root, "pipe": pipe, "data": data, "prompts": str(prompts)}


# --------------------------------------------------------------------------- disk size of the cache


def _tensor_bytes(path: str) -> int:
    """A safetensors file's data section: the file minus its 8-byte length prefix and JSON header."""
    with open(path, "rb") as f:
        (header,) = struct.unpack("<Q", f.read(8))
    return os.path.getsize(path) - 8 - header


def test_cache_bytes_per_sample_is_the_real_shard_size(cache):
    from twostep.real.plan import cache_bytes_per_sample
    from twostep.real.teacher_data import ZImageDataConfig

    manifest = json.load(open(os.path.join(cache["data"], "manifest.json")))
    prov = manifest["provenance"]
    assert prov["sample_shape"] == [16, RES // 2, RES // 2] and prov["dtype"] == "bfloat16"
    cfg = ZImageDataConfig(dtype=prov["dtype"], student_sigmas=prov["student_sigmas"])
    per_sample = cache_bytes_per_sample(RES, cfg, channels=16, downsample=2)
    # noise + final in bf16 (2 + 2 bytes), two fp32 states (8 bytes), two int64 per sample
    assert per_sample == 16 * 16 * 16 * 12 + 16
    assert sorted(manifest["shards"]) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    for name, entry in manifest["shards"].items():
        path = os.path.join(cache["data"], name)
        assert _tensor_bytes(path) == entry["count"] * per_sample, name
        assert entry["bytes"] == os.path.getsize(path)
    # another storage dtype or more student steps change it the way the shard layout does
    assert cache_bytes_per_sample(RES, ZImageDataConfig(dtype="float32"), 16, 2) == 16 ** 3 * 16 + 16
    three = ZImageDataConfig(student_sigmas=[1.0, 0.9, 0.75])
    assert cache_bytes_per_sample(RES, three, 16, 2) == per_sample + 16 ** 3 * 4
    # Z-Image itself: 16 channels, 8x VAE
    assert cache_bytes_per_sample(1024, ZImageDataConfig()) == 16 * 128 * 128 * 12 + 16


# --------------------------------------------------------------------------- warnings for small caches


def _train_until_the_model_loads(cache, tmp_path, monkeypatch, capsys, *extra) -> str:
    import twostep.real.train as real_train

    def stop(*args, **kwargs):
        raise TwostepError("stopped before the model loads")

    monkeypatch.setattr(real_train, "build_real_student", stop)
    run = tmp_path / f"run{len(list(tmp_path.iterdir()))}"  # a new folder per call: train refuses a used one
    assert main(["train", "--config", DEFAULT_ZIMAGE_CONFIG, "--data", cache["data"], "--out", str(run),
                 *SMALL, *extra]) == 2
    captured = capsys.readouterr()
    assert "stopped before the model loads" in captured.err
    return captured.out


def test_train_warns_when_the_batch_exceeds_the_cache(cache, tmp_path, monkeypatch, capsys):
    out = _train_until_the_model_loads(cache, tmp_path, monkeypatch, capsys, "train.batch_size=8")
    assert "twostep: warning: train.batch_size 8 exceeds the 6 cached samples" in out
    monkeypatch.setattr("twostep.engine.teacher_data.MIN_REAL_SAMPLES", 6)  # only the batch is the problem below
    out = _train_until_the_model_loads(cache, tmp_path, monkeypatch, capsys, "train.batch_size=6")
    assert "warning" not in out


def test_train_warns_when_the_cache_is_below_a_real_runs_minimum(cache, tmp_path, monkeypatch, capsys):
    from twostep.engine.teacher_data import MIN_REAL_SAMPLES

    assert MIN_REAL_SAMPLES == 1000  # the number docs/sizing.md states
    out = _train_until_the_model_loads(cache, tmp_path, monkeypatch, capsys, "train.batch_size=2")
    assert f"twostep: warning: the teacher-data cache holds 6 samples, fewer than the {MIN_REAL_SAMPLES:,}" in out
    assert "exceeds" not in out
    monkeypatch.setattr("twostep.engine.teacher_data.MIN_REAL_SAMPLES", 6)
    assert "warning" not in _train_until_the_model_loads(cache, tmp_path, monkeypatch, capsys, "train.batch_size=2")


# --------------------------------------------------------------------------- labelled preview grids


def _pixels(image, box=None) -> np.ndarray:
    return np.asarray(image.crop(box) if box else image, dtype=np.int16)


def test_preview_grid_rows_are_prompt_teacher_student(cache, tmp_path):
    from diffusers import ZImagePipeline
    from PIL import Image

    from twostep.core.config import load_config
    from twostep.core.packaged_configs import resolve_config
    from twostep.real.text_cache import PromptEmbeds
    from twostep.real.train import ZImageDistillConfig, build_real_student, preview_writer

    cfg = load_config(ZImageDistillConfig, resolve_config(DEFAULT_ZIMAGE_CONFIG),
                      [*SMALL, f"model.path={cache['pipe']}"])
    embeds = PromptEmbeds(os.path.join(cache["data"], "text"))
    student, _ = build_real_student(cfg, cache["pipe"], embeds.width, torch.device("cpu"))
    torch.manual_seed(1)
    with torch.no_grad():  # a student that is not the teacher (LoRA B starts at zero)
        for params in student.parameter_groups().values():
            for p in params:
                p.add_(torch.randn_like(p) * 0.05)
    calls = []
    original = student.teacher

    def counted():
        calls.append(1)
        return original()

    student.teacher = counted
    write = preview_writer(cache["pipe"], embeds, (16, RES // 2, RES // 2), torch.device("cpu"), cfg.teacher_data,
                           count=4, seed=0)
    first_path = str(tmp_path / "samples" / "step_000007.png")
    layout = write(student, first_path)
    assert os.path.isfile(first_path)
    grid = Image.open(first_path).convert("RGB")
    rows = layout["rows"]
    assert len(rows) == len(PROMPTS)  # one row per prompt (count 4 capped at the 3 prompts)
    header_bottom = layout["header"][3]
    assert grid.height == header_bottom + len(PROMPTS) * RES
    assert [" ".join(row["lines"]) for row in rows] == PROMPTS  # short prompts: whole, on one line each

    # the teacher column is the stock pipeline's 8-step image on the same noise and cached prompt embedding
    pipe = ZImagePipeline.from_pretrained(cache["pipe"])
    noise = torch.randn((3, 16, RES // 2, RES // 2), generator=torch.Generator().manual_seed(0))
    for i, row in enumerate(rows):
        reference = pipe(prompt_embeds=[embeds.get(i).float()], height=RES, width=RES, num_inference_steps=8,
                         guidance_scale=0.0, latents=noise[i:i + 1], output_type="pil").images[0]
        teacher_cell, student_cell = _pixels(grid, row["teacher"]), _pixels(grid, row["student"])
        assert teacher_cell.shape == (RES, RES, 3)
        assert np.abs(teacher_cell - _pixels(reference)).max() <= 1, f"row {i}: teacher column"
        assert np.abs(student_cell - _pixels(reference)).mean() > 2, f"row {i}: student column equals the teacher"
        prompt_cell = _pixels(grid, row["prompt"])
        assert (prompt_cell < 128).any(), f"row {i}: no prompt text drawn"

    # later grids reuse the teacher images: one teacher pass in all; the header names the step
    second_path = str(tmp_path / "samples" / "step_000014.png")
    assert write(student, second_path) == layout
    again = Image.open(second_path).convert("RGB")
    assert len(calls) == 1
    for row in rows:
        assert np.array_equal(_pixels(again, row["teacher"]), _pixels(grid, row["teacher"]))
    header = (0, 0, grid.width, header_bottom)
    assert (_pixels(grid, header) < 128).any()
    assert not np.array_equal(_pixels(grid, header), _pixels(again, header)), "the header must show the step"


def test_long_prompts_are_wrapped_and_cut_to_the_row():
    from PIL import ImageFont

    from twostep.real.preview import _step_label
    from twostep.real.preview import wrap_text as _wrap

    font = ImageFont.load_default(size=12)
    text = "a very long prompt about " + "a lighthouse on a cliff at dawn, " * 20 + "and a supercalifragilistic" * 4
    lines = _wrap(text, font, 150, 4)
    assert len(lines) == 4 and lines[-1].endswith("...")
    assert all(font.getlength(line) <= 150 for line in lines)
    assert _wrap("short one", font, 150, 4) == ["short one"]
    word = _wrap("x" * 200, font, 100, 50)  # one word wider than the column is cut, not overflowing
    assert len(word) > 1 and "".join(word) == "x" * 200 and all(font.getlength(line) <= 100 for line in word)
    assert _step_label("/run/samples/step_000250.png") == "step 250"
