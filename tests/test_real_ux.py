"""Real-path user experience on a tiny random pipeline (issue 15): labelled preview grids, warnings for a teacher-data
cache too small for the run, and the cache's bytes per sample that `twostep plan` extrapolates (docs/sizing.md)."""

import json
import os
import struct

import pytest

from twostep.cli import DEFAULT_ZIMAGE_CONFIG, main
from twostep.errors import TwostepError
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
    from twostep.plan import cache_bytes_per_sample
    from twostep.worlds.zimage.data import ZImageDataConfig

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
    import twostep.worlds.zimage.train as real_train

    def stop(*args, **kwargs):
        raise TwostepError("stopped before the model loads")

    monkeypatch.setattr(real_train, "build_real_student", stop)
    assert main(["train", "--config", DEFAULT_ZIMAGE_CONFIG, "--data", cache["data"], "--out", str(tmp_path / "run"),
                 *SMALL, *extra]) == 2
    captured = capsys.readouterr()
    assert "stopped before the model loads" in captured.err
    return captured.out


def test_train_warns_when_the_batch_exceeds_the_cache(cache, tmp_path, monkeypatch, capsys):
    out = _train_until_the_model_loads(cache, tmp_path, monkeypatch, capsys, "train.batch_size=8")
    assert "twostep: warning: train.batch_size 8 exceeds the 6 cached samples" in out
    monkeypatch.setattr("twostep.plan.MIN_REAL_SAMPLES", 6)  # only the batch is the problem below
    out = _train_until_the_model_loads(cache, tmp_path, monkeypatch, capsys, "train.batch_size=6")
    assert "warning" not in out


def test_train_warns_when_the_cache_is_below_a_real_runs_minimum(cache, tmp_path, monkeypatch, capsys):
    from twostep.plan import MIN_REAL_SAMPLES

    assert MIN_REAL_SAMPLES == 1000  # the number docs/sizing.md states
    out = _train_until_the_model_loads(cache, tmp_path, monkeypatch, capsys, "train.batch_size=2")
    assert f"twostep: warning: the teacher-data cache holds 6 samples, fewer than the {MIN_REAL_SAMPLES:,}" in out
    assert "exceeds" not in out
    monkeypatch.setattr("twostep.plan.MIN_REAL_SAMPLES", 6)
    assert "warning" not in _train_until_the_model_loads(cache, tmp_path, monkeypatch, capsys, "train.batch_size=2")
