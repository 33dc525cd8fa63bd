"""Scale-out on PyTorch distributed (issue 11): two gloo processes on CPU, started by torchrun."""

import json
import os
import socket
import subprocess
import sys

import pytest

from twostep.cli import main

TEACHER = ["teacher.model.dim=32", "teacher.model.n_heads=2", "teacher.model.axes_dims=[4,6,6]",
           "teacher.model.n_layers=2", "teacher.text.hidden_size=8", "teacher.train.steps=2",
           "teacher.train.batch_size=8", "teacher.train.warmup_steps=1"]
DATA = ["teacher_data.num_samples=40", "teacher_data.shard_size=8", "teacher_data.batch_size=4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(_free_port()), "-m", "twostep", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dist") / "teacher")
    assert main(["train-teacher", "--out", out, *[o[len("teacher."):] for o in TEACHER]]) == 0
    return out


def _files(folder) -> dict[str, bytes]:
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def test_teacher_data_on_two_processes_covers_every_prompt_once_and_equals_one_process(teacher, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert main(["teacher-data", "--teacher", teacher, "--out", one, *TEACHER, *DATA]) == 0
    proc = torchrun(2, "teacher-data", "--teacher", teacher, "--out", two, *TEACHER, *DATA)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _files(two) == _files(one)  # every shard byte-identical, the same manifest, no per-rank records left
    manifest = json.load(open(os.path.join(two, "manifest.json")))
    firsts = sorted((e["first_index"], e["count"]) for e in manifest["shards"].values())
    assert [f for f, _ in firsts] == list(range(0, 40, 8)) and sum(c for _, c in firsts) == 40

    # a rank died after its first shard: a rerun (any process count) makes only what is missing
    os.remove(os.path.join(two, "shard-00003.safetensors"))
    manifest["complete"] = False
    del manifest["shards"]["shard-00003.safetensors"]
    open(os.path.join(two, "manifest.json"), "w").write(json.dumps(manifest))
    before = {n: os.stat(os.path.join(two, n)).st_mtime_ns for n in os.listdir(two) if n.startswith("shard")}
    proc = torchrun(2, "teacher-data", "--teacher", teacher, "--out", two, *TEACHER, *DATA)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _files(two) == _files(one)
    assert all(os.stat(os.path.join(two, n)).st_mtime_ns == t for n, t in before.items()), "finished shards redone"


# --------------------------------------------------------------------------- online teacher mode


def test_online_batches_are_the_cached_trajectories(teacher, tmp_path):
    """Sample i online = sample i of the cache (same seed, same prompt): the frozen base with adapters off."""
    import torch

    from twostep.config import load_config
    from twostep.distill import DistillConfig, build_student, load_teacher_data, make_teacher_data, \
        online_teacher_data

    cfg = load_config(DistillConfig, None, TEACHER + DATA + ["student.lora_rank=4", "discriminator.blocks=[0,1]"])
    make_teacher_data(teacher, cfg, str(tmp_path / "cache"))
    student, _, base = build_student(teacher, cfg)
    with torch.no_grad():  # adapters that are not zero: the online teacher must not see them
        for params in student.parameter_groups().values():
            for p in params:
                p.add_(0.1)
    cached = load_teacher_data(base, cfg, str(tmp_path / "cache"))
    online = online_teacher_data(student, base, cfg)
    index = torch.tensor([3, 17, 0, 39, 17])
    a, b = cached.batch(index), online.batch(index)
    assert len(online) == len(cached) and torch.equal(a["prompt_index"], b["prompt_index"])
    for key in ("noise", "states", "final"):
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5)


def test_training_in_online_mode_needs_no_cache(teacher, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--teacher", teacher, "--out", str(run), *TEACHER, *DATA, "teacher_data.mode=online",
                 "student.lora_rank=4", "discriminator.blocks=[0,1]", "discriminator.hidden=16", "train.steps=2",
                 "train.batch_size=4", "train.eval_every=0", "train.sample_every=10"]) == 0
    assert (run / "student.safetensors").exists()
    assert json.load(open(run / "meta.json"))["teacher_data"] == "online"


def test_online_cost_benchmark_runs_and_reports_a_ratio(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "online_cost.py"
    spec = importlib.util.spec_from_file_location("online_cost", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n")
    assert module.main(["--steps", "1", "--batch-size", "4", "--num-samples", "8", "--results", str(doc)]) == 0
    text = doc.read_text()
    assert "<!-- twostep:online-cost:begin -->" in text and "×** the cached cost" in text
