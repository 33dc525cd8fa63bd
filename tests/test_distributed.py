"""Scale-out on PyTorch distributed (issue 11): two gloo processes on CPU, started by torchrun."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

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
    assert main(["teacher-data", "--teacher", teacher, "--out", two, *TEACHER, *DATA]) == 0  # one process this time
    assert _files(two) == _files(one)
    assert all(os.stat(os.path.join(two, n)).st_mtime_ns == t for n, t in before.items()), "finished shards redone"


# --------------------------------------------------------------------------- online teacher mode


def test_online_batches_are_the_cached_trajectories(teacher, tmp_path):
    """Sample i online = sample i of the cache (same seed, same prompt): the frozen base with adapters off."""
    import torch

    from twostep.core.config import load_config
    from twostep.offline.distill import (
        DistillConfig,
        build_student,
        load_teacher_data,
        make_teacher_data,
        online_teacher_data,
    )

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
    inputs = online.inputs(index)  # what a fake-score update draws: the same noise and prompts, no teacher run
    assert inputs.keys() == {"noise", "prompt_index"} and torch.equal(inputs["noise"], b["noise"])
    assert torch.equal(inputs["prompt_index"], b["prompt_index"])


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


# --------------------------------------------------------------------------- DDP training (lora)


def test_a_ddp_lora_step_on_two_processes_equals_one_process_with_the_global_batch(teacher, tmp_path):
    """Global batch 8: two processes of 4 each (accumulated over 2 micro-batches of 2, without a DDP reduction on
    the first), gradients averaged by DDP, give the gradient of one process with 8. Compared on the step's gradient
    (AdamW's first moment with beta1 = 0, saved in the step-1 checkpoint):
    Adam's first update is about lr * sign(g), so the weights would amplify float reduction-order differences in
    near-zero gradients into lr-sized ones. A regression recipe: no noise is drawn (the adversarial recipe draws
    each rank's noise from its own stream)."""
    import torch

    from twostep.engine.checkpoint import load_state

    data = str(tmp_path / "data")
    assert main(["teacher-data", "--teacher", teacher, "--out", data, *TEACHER, *DATA]) == 0
    args = ["train", "--teacher", teacher, "--data", data, *TEACHER, *DATA, "student.lora_rank=4",
            "discriminator.blocks=[0,1]", "discriminator.hidden=16", "recipe.adv_weight=0", "train.steps=1",
            "train.batch_size=8", "train.eval_every=0", "train.sample_every=100", "train.betas=[0.0,0.99]"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    two = torchrun(2, *args, "train.grad_accum_steps=2", "--out", str(tmp_path / "two"))  # 2 micro-batches of 2
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_state(str(tmp_path / "one" / "checkpoints" / "step_000001"))["opt_g"]["state"]
    b = load_state(str(tmp_path / "two" / "checkpoints" / "step_000001"))["opt_g"]["state"]
    assert a.keys() == b.keys()
    assert sum(bool(v["exp_avg"].abs().max() > 0) for v in a.values()) >= len(a) // 2  # every lora_B moved (A: 0)
    for key in a:
        torch.testing.assert_close(b[key]["exp_avg"], a[key]["exp_avg"], rtol=1e-4, atol=1e-6,
                                   msg=f"parameter {key}")
    log = [json.loads(line) for line in open(tmp_path / "two" / "train_log.jsonl")]
    assert [r["step"] for r in log] == [1]  # one log, written by rank 0


def test_the_adversarial_recipe_trains_under_ddp_and_resumes(teacher, tmp_path):
    """Discriminator and student both under DDP (the heads' requires_grad flips every step), then a resume."""
    data = str(tmp_path / "data")
    assert main(["teacher-data", "--teacher", teacher, "--out", data, *TEACHER, *DATA]) == 0
    args = ["train", "--teacher", teacher, "--data", data, *TEACHER, *DATA, "student.lora_rank=4",
            "discriminator.blocks=[0,1]", "discriminator.hidden=16", "train.steps=2", "train.batch_size=4",
            "train.eval_every=0", "train.sample_every=100", "train.d_warmup_steps=1", "train.log_every=1",
            "--out", str(tmp_path / "r")]
    proc = torchrun(2, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in open(tmp_path / "r" / "train_log.jsonl")]
    assert [r["step"] for r in log] == [1, 2] and all("d_loss" in r for r in log)
    proc = torchrun(2, "train", "--out", str(tmp_path / "r"), "--resume", "latest", "train.steps=3",
                    "--allow-config-change")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(open(tmp_path / "r" / "train_log.jsonl").read().splitlines()[-1])["step"] == 3


@pytest.mark.slow  # one more 2-process launch (~10 s on 2 cores): `make bench` runs it
def test_a_refused_resume_is_refused_by_every_rank(teacher, tmp_path):
    """Rank 0 checks the checkpoint (reading it once) and every rank takes its refusal: no rank waits for the
    others."""
    data = str(tmp_path / "data")
    assert main(["teacher-data", "--teacher", teacher, "--out", data, *TEACHER, *DATA]) == 0
    assert main(["train", "--teacher", teacher, "--data", data, *TEACHER, *DATA, "student.lora_rank=4",
                 "discriminator.blocks=[0,1]", "discriminator.hidden=16", "train.steps=1", "train.batch_size=4",
                 "train.eval_every=0", "train.sample_every=100", "--out", str(tmp_path / "r")]) == 0
    proc = torchrun(2, "train", "--out", str(tmp_path / "r"), "--resume", "latest", "student.lora_rank=8")
    assert proc.returncode != 0 and proc.stderr.count("'student.lora_rank' (4 in step_000001, 8 now)") == 2


# --------------------------------------------------------------------------- FSDP2 (student.form: full)

FULL = ["student.form=full", "student.params=decoupled", "discriminator.blocks=[0,1]", "discriminator.hidden=16",
        "train.batch_size=8",
        "train.eval_every=0", "train.sample_every=100", "train.log_every=1"]


def _log(run) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run, "train_log.jsonl"))]


def test_fsdp2_full_run_saves_sharded_checkpoints_that_resume_on_one_or_two_processes(teacher, tmp_path):
    """Two processes shard each step copy and the teacher (FSDP2) for 5 steps; the step-3 checkpoint is DCP
    shards, one file per rank. Resumed from it on 2 processes, steps 4-5 are bit-identical to the uninterrupted
    run; on 1 process they agree to 1e-5 relative (only the order of float reductions differs, which a resume on
    another count cannot keep). A regression recipe, whose losses draw no noise: the comparison is of the state."""
    from twostep.engine.checkpoint import load_whole_state

    data = str(tmp_path / "data")
    assert main(["teacher-data", "--teacher", teacher, "--out", data, *TEACHER, *DATA]) == 0
    args = ["train", "--teacher", teacher, "--data", data, *TEACHER, *DATA, *FULL, "recipe.adv_weight=0"]
    full, one, two = (str(tmp_path / name) for name in ("full", "one", "two"))
    proc = torchrun(2, *args, "train.steps=5", "train.checkpoint_every=3", "--out", full)  # checkpoints 3 and 5
    assert proc.returncode == 0, proc.stderr[-3000:]
    step3 = os.path.join(full, "checkpoints", "step_000003")
    shards = sorted(os.listdir(os.path.join(step3, "sharded")))
    assert len(shards) == 2 and all(name.endswith(".safetensors") for name in shards)
    manifest = json.load(open(os.path.join(step3, "MANIFEST.json")))["files"]
    assert {f"sharded/{name}" for name in shards} <= set(manifest)  # checksummed like the rest
    whole = load_whole_state(step3)["student"]  # gathered in one process: every copy at the teacher's shapes
    base = load_file(os.path.join(teacher, "teacher.safetensors"))
    assert {f"copies.{k}.{name}" for k in (0, 1) for name in base} == set(whole)
    assert all(whole[f"copies.1.{name}"].shape == value.shape for name, value in base.items())
    for run in (one, two):  # each resumes from step 3 (the step-5 checkpoint of its copy is dropped: a new branch)
        shutil.copytree(full, run)
    proc = torchrun(2, "train", "--out", two, "--resume", os.path.join(two, "checkpoints", "step_000003"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(["train", "--out", one, "--resume", os.path.join(one, "checkpoints", "step_000003")]) == 0
    reference = _log(full)
    assert [r["step"] for r in reference] == [1, 2, 3, 4, 5]
    for name, run, tolerance in (("2 processes", two, 0.0), ("1 process", one, 1e-5)):
        for ref, got in zip(reference[3:], _log(run)[3:]):
            for key in ("g_total", "g_reg", "g_step1", "grad_norm/step0", "grad_norm/step1"):
                assert got[key] == pytest.approx(ref[key], rel=tolerance, abs=1e-7), (name, got["step"], key)


def test_fsdp2_adversarial_recipe_trains_evaluates_and_a_sigterm_saves_shards_on_every_rank(teacher, tmp_path):
    """The whole recipe under FSDP2: D warm-up, D and G steps over 2 micro-batches per rank, the EMA preview grid
    and periodic evaluation (every rank samples, rank 0 writes), all finite. Then SIGTERM to torchrun (as SLURM
    sends before a job's end): every rank stops at the same step, logs it, and the sharded checkpoint is written
    collectively and verifies (resuming one on any process count is the test above)."""
    import re
    import signal
    import time

    from twostep.engine.checkpoint import verify_state

    data = str(tmp_path / "data")
    assert main(["teacher-data", "--teacher", teacher, "--out", data, *TEACHER, *DATA]) == 0
    run = str(tmp_path / "adv")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "twostep", "train", "--teacher", teacher, "--data", data,
               *TEACHER, *DATA, *FULL, "train.steps=100000", "train.d_warmup_steps=1", "train.grad_accum_steps=2",
               "train.eval_every=2", "train.sample_every=2", "train.checkpoint_every=100000", "--out", run]
    proc = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log_path, deadline = os.path.join(run, "train_log.jsonl"), time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.isfile(log_path) and any(json.loads(line)["step"] >= 2 for line in open(log_path)):
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    stopped = re.findall(r"stopped by SIGTERM at step (\d+)", err)
    assert len(stopped) == 2 and stopped[0] == stopped[1], err[-3000:]  # both ranks, the same step
    step = int(stopped[0])
    checkpoint = os.path.join(run, "checkpoints", f"step_{step:06d}")
    verify_state(checkpoint)  # complete, every shard checksummed
    assert len(os.listdir(os.path.join(checkpoint, "sharded"))) == 2

    log = _log(run)
    assert [r["step"] for r in log] == list(range(1, step + 1))
    assert all(math.isfinite(r[k]) for r in log for k in ("d_loss", "g_adv", "g_total", "grad_norm/step1"))
    assert any(k.startswith("eval/") for k in log[1])
    assert "step_000002.png" in os.listdir(os.path.join(run, "samples"))


@pytest.fixture(scope="module")
def zimage_data(tmp_path_factory) -> str:
    """A tiny random Z-Image pipeline's teacher data (2 prompts x 2 samples at 32 px)."""
    from twostep.testing import tiny_zimage_pipeline

    root = tmp_path_factory.mktemp("zimage")
    pipe, prompts, data = (str(root / n) for n in ("pipe", "prompts.txt", "data"))
    tiny_zimage_pipeline(seed=0).save_pretrained(pipe)
    open(prompts, "w").write("a red cat on a sofa\nthe city at night\n")
    assert main(["teacher-data", "--teacher", pipe, "--prompts", prompts, "--resolution", "32", "--out", data,
                 "teacher_data.samples_per_prompt=2", "teacher_data.shard_size=4", "teacher_data.batch_size=2",
                 "teacher_data.previews=0"]) == 0
    return data


def test_zimage_full_student_under_fsdp2_exports_from_its_sharded_checkpoint(zimage_data, tmp_path):
    """The real path with full per-step copies on 2 processes (with evaluation during training): `export
    --checkpoint latest` gathers the sharded EMA weights whole and writes the same merged transformers as the export of the finished run's weights."""
    from twostep.cli import DEFAULT_ZIMAGE_CONFIG

    data, run = zimage_data, str(tmp_path / "run")
    proc = torchrun(2, "train", "--config", DEFAULT_ZIMAGE_CONFIG, "--data", data, "--out", run, "student.form=full",
                    "train.steps=2", "train.batch_size=2", "train.warmup_steps=1", "train.sample_every=100",
                    "train.bf16=false", "model.dtype=float32", "discriminator.blocks=[0,1]", "discriminator.hidden=16",
                    "train.eval_every=2", "evaluation.count=2", "evaluation.clip=none", "evaluation.dino=none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(os.listdir(os.path.join(run, "checkpoints", "step_000002", "sharded"))) == 2
    assert "eval/psnr" in _log(run)[-1]  # the smoke set sampled on both ranks, scored by rank 0
    assert proc.stdout.count("student trained") == 1  # reported by rank 0 only
    outs = {}
    for name, extra in (("finished", []), ("checkpoint", ["--checkpoint", "latest"])):
        outs[name] = str(tmp_path / name)
        assert main(["export", run, "--format", "merged", "--out", outs[name], "--dtype", "float32", *extra]) == 0
    for k in (1, 2):
        a = load_file(os.path.join(outs["finished"], f"transformer_step{k}", "diffusion_pytorch_model.safetensors"))
        b = load_file(os.path.join(outs["checkpoint"], f"transformer_step{k}", "diffusion_pytorch_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert json.load(open(os.path.join(outs["checkpoint"], "twostep.json")))["train_steps"] == 2


def test_zimage_dmd2_with_its_gan_trains_under_ddp_and_resumes(zimage_data, tmp_path):
    """`recipe.kind: dmd2` (zimage_turbo_2step_dmd2) plus a GAN term on 2 processes: the student's adapters, the
    fake-score adapter (its own DDP module over parameters that live in the shared base) and the heads train; the
    checkpoint resumes in one process."""
    run = str(tmp_path / "run")
    proc = torchrun(2, "train", "--config", "zimage_turbo_2step_dmd2", "--data", zimage_data, "--out", run,
                    "train.steps=2", "train.batch_size=4", "train.warmup_steps=1", "train.sample_every=100",
                    "train.bf16=false", "model.dtype=float32", "discriminator.blocks=[0,1]", "discriminator.hidden=16",
                    "student.lora_rank=4", "student.fake_score_rank=16", "train.fake_steps_per_g=2",
                    "train.d_warmup_steps=1", "train.log_every=1", "recipe.adv_weight=0.1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = _log(run)
    assert [r["step"] for r in log] == [1, 2]
    for key in ("dmd_loss", "dmd_loss/step1", "fake_score_total", "grad_norm/fake_score", "d_loss", "g_adv"):
        assert all(math.isfinite(r[key]) for r in log), key
    assert log[-1]["grad_norm/fake_score"] > 0 and log[-1]["grad_norm/step0"] > 0
    assert main(["train", "--out", run, "--resume", "latest", "train.steps=3", "--allow-config-change"]) == 0
    assert _log(run)[-1]["step"] == 3


def test_zimage_dmd2_with_full_copies_trains_under_ddp_and_resumes(zimage_data, tmp_path):
    """`recipe.kind: dmd2` with `student.form=full` on 2 processes: per-step full copies for the student and a full
    copy for the fake score, each its own DDP module; the checkpoint resumes in one process."""
    run = str(tmp_path / "run")
    proc = torchrun(2, "train", "--config", "zimage_turbo_2step_dmd2", "--data", zimage_data, "--out", run,
                    "student.form=full", "train.steps=2", "train.batch_size=4", "train.warmup_steps=1",
                    "train.sample_every=100", "train.bf16=false", "model.dtype=float32", "train.fake_steps_per_g=2",
                    "train.log_every=1", "discriminator.blocks=[0,1]", "discriminator.hidden=16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = _log(run)
    assert [r["step"] for r in log] == [1, 2]
    for key in ("dmd_loss", "fake_score_total", "grad_norm/fake_score"):
        assert all(math.isfinite(r[key]) for r in log), key
    assert log[-1]["grad_norm/fake_score"] > 0 and log[-1]["grad_norm/step0"] > 0
    assert main(["train", "--out", run, "--resume", "latest", "train.steps=3", "--allow-config-change"]) == 0
    assert _log(run)[-1]["step"] == 3
