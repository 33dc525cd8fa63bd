"""Reliability (issue 12): no pickle, checksummed atomic checkpoints with fallback, preemption, the non-finite
guard, and resume config checks. Tiny toy runs; the malformed-input table lives in test_bad_inputs.py."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from twostep.cli import main
from twostep.core.config import load_config
from twostep.engine import checkpoint as ckpt
from twostep.engine.preemption import EXIT_CODE
from twostep.offline.distill import DistillConfig, make_teacher_data

TEACHER = ["teacher.model.dim=32", "teacher.model.n_heads=2", "teacher.model.axes_dims=[4,6,6]",
           "teacher.model.n_layers=4", "teacher.text.hidden_size=8", "teacher.train.steps=3",
           "teacher.train.batch_size=16", "teacher.train.warmup_steps=1"]
DISTILL = ["teacher_data.num_samples=32", "teacher_data.shard_size=16", "teacher_data.batch_size=8",
           "student.lora_rank=4", "discriminator.hidden=16", "train.batch_size=8", "train.steps=6",
           "train.log_every=1", "train.sample_every=100", "train.eval_every=0", "train.checkpoint_every=2",
           "train.warmup_steps=2"]
TEACHER_RUN = [o[len("teacher."):] for o in TEACHER] + ["train.steps=6", "train.checkpoint_every=2",
                                                         "train.log_every=1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    teacher, data = str(root / "teacher"), str(root / "data")
    assert main(["train-teacher", "--out", teacher, *[o[len("teacher."):] for o in TEACHER]]) == 0
    make_teacher_data(teacher, load_config(DistillConfig, None, TEACHER + DISTILL), data)
    return {"teacher": teacher, "data": data, "args": ["--teacher", teacher, "--data", data, *TEACHER, *DISTILL]}


def train(world, out, *extra) -> int:
    return main(["train", "--out", str(out), *world["args"], *extra])


def tree(folder) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder`` (folders as '<dir>')."""
    found = {}
    for base, dirs, files in os.walk(folder):
        for d in dirs:
            found[os.path.relpath(os.path.join(base, d), folder)] = "<dir>"
        for f in files:
            path = os.path.join(base, f)
            found[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return found


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def finished(world, tmp_path_factory):
    """One uninterrupted 6-step run: the reference every interrupted run must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train(world, out) == 0
    return out


# --------------------------------------------------------------------------- the format


def test_training_state_round_trips_without_pickle(tmp_path):
    import random

    import numpy as np

    state = {"w": torch.randn(3, 4), "bf": torch.randn(2).bfloat16(), "opt": {"state": {0: {"step": torch.tensor(3.)}},
             "param_groups": [{"betas": (0.0, 0.99), "lr": 1e-4, "params": [0]}]},
             "rng": ckpt.rng_state(), "step": 7, "name": "x", "none": None, "ratio": 0.1 + 0.2}
    np.random.rand(), random.random()  # move the global RNGs, then restore them from the saved state
    ckpt.save_state(str(tmp_path / "step_000007"), state)
    assert sorted(os.listdir(tmp_path / "step_000007")) == ["MANIFEST.json", "state.json", "tensors.safetensors"]
    back = ckpt.load_state(str(tmp_path / "step_000007"))
    assert torch.equal(back["w"], state["w"]) and back["bf"].dtype == torch.bfloat16
    assert back["opt"]["state"][0]["step"].item() == 3 and back["opt"]["param_groups"][0]["betas"] == (0.0, 0.99)
    assert back["ratio"] == state["ratio"] and back["none"] is None and back["step"] == 7
    ckpt.set_rng_state(back["rng"])
    expected = (torch.rand(1).item(), np.random.rand(), random.random())
    ckpt.set_rng_state(state["rng"])
    assert (torch.rand(1).item(), np.random.rand(), random.random()) == expected


def test_no_unpickling_anywhere_in_the_package():
    src = os.path.join(os.path.dirname(__file__), "..", "src", "twostep")
    for base, _, files in os.walk(src):
        for name in files:
            if name.endswith(".py"):
                text = open(os.path.join(base, name), encoding="utf-8").read()
                assert "weights_only=False" not in text and "pickle.load" not in text, name
                for line in text.splitlines():
                    assert "torch.load(" not in line or "weights_only=True" in line, (name, line)


class _Boom:
    """Unpickling this writes a marker file: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("route", ["train_path", "train_latest", "teacher"])
def test_a_crafted_pickle_state_runs_nothing_on_any_resume_route(world, tmp_path, capsys, route):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    if route == "teacher":
        run.mkdir()
        torch.save({"step": 1, "x": _Boom(str(marker))}, run / "state.pt")
        argv = ["train-teacher", "--out", str(run), "--resume", *TEACHER_RUN]
    else:
        (run / "checkpoints").mkdir(parents=True)
        bad = run / "checkpoints" / "step_000002.pt"
        torch.save({"step": 2, "x": _Boom(str(marker))}, bad)
        argv = ["train", "--out", str(run), *world["args"], "--resume", str(bad) if route == "train_path" else "latest"]
    before = tree(tmp_path)
    assert main(argv) == 2
    assert "old pickle format" in one_line(capsys)
    assert not marker.exists(), "the crafted state ran code"
    assert tree(tmp_path) == before


def test_a_flipped_byte_is_detected_and_resume_falls_back(world, finished, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    assert train(world, run, "train.steps=4") == 0  # checkpoints at steps 2 and 4
    newest = run / "checkpoints" / "step_000004" / "tensors.safetensors"
    data = bytearray(newest.read_bytes())
    data[-3] ^= 0x01
    newest.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        ckpt.load_state(str(newest.parent))
    capsys.readouterr()
    # an explicit path is refused; `latest` says so and falls back to step 2
    before = tree(run)
    assert train(world, run, "--resume", str(newest.parent), "--allow-config-change") == 2
    assert "does not match its checksum" in one_line(capsys)
    assert tree(run) == before
    assert train(world, run, "--resume", "latest", "--allow-config-change") == 0
    out = capsys.readouterr().out
    assert "step_000004 is corrupt" in out and "falling back to step_000002" in out
    assert load_file(run / "student.safetensors").keys() == load_file(finished / "student.safetensors").keys()
    shutil.rmtree(run / "checkpoints")


def test_an_incomplete_checkpoint_is_skipped(tmp_path):
    root = tmp_path / "checkpoints"
    ckpt.save_state(str(root / "step_000002"), {"a": torch.ones(2), "step": 2})
    ckpt.save_state(str(root / "step_000004"), {"a": torch.ones(2), "step": 4})
    os.remove(root / "step_000004" / "MANIFEST.json")
    messages = []
    assert ckpt.find_resumable(str(root), report=messages.append) == str(root / "step_000002")
    assert "incomplete" in messages[0] and "falling back to step_000002" in messages[0]


def test_a_manifest_cannot_point_outside_and_an_unlisted_shard_is_refused(tmp_path):
    """Sharded checkpoints list their shard files in the manifest; DCP reads every file in ``sharded/``, so one the
    manifest does not vouch for is refused, and a manifest may not name a file outside the checkpoint."""
    import json

    folder = tmp_path / "step_000001"
    ckpt.save_state(str(folder), {"a": torch.ones(2), "step": 1})
    (folder / "sharded").mkdir()
    (folder / "sharded" / "shard-00001-model-00001-of-00001.safetensors").write_bytes(b"planted")
    with pytest.raises(ckpt.CheckpointError, match="not in its MANIFEST"):
        ckpt.verify_state(str(folder))
    (folder / "sharded" / "shard-00001-model-00001-of-00001.safetensors").unlink()
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    manifest["files"]["../outside.bin"] = {"bytes": 1, "sha256": "0"}
    (folder / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match="outside the checkpoint"):
        ckpt.verify_state(str(folder))


def test_retention_keeps_the_newest_and_every_nth(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8, 10, 12):
        ckpt.save_state(str(root / f"step_{step:06d}"), {"step": step})
        ckpt.prune_checkpoints(str(root), keep_last=2, keep_every=4)
    assert [s for s, _ in ckpt.list_checkpoints(str(root))] == [4, 8, 10, 12]


def test_a_non_finite_tensor_is_never_saved(tmp_path):
    with pytest.raises(ckpt.NonFiniteError, match="'w'"):
        ckpt.save_state(str(tmp_path / "step_000001"), {"w": torch.tensor([1.0, float("nan")])})
    with pytest.raises(ckpt.NonFiniteError):
        ckpt.save_tensors({"w": torch.tensor([float("inf")])}, str(tmp_path / "w.safetensors"), what="weights")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- kills and signals


def _signal_at_step(monkeypatch, step: int, signum=signal.SIGTERM):
    """The real handler sees a real signal, sent to this process while step ``step`` runs."""
    import twostep.engine.train as train_mod

    real_step = train_mod.Trainer.train_step

    def step_then_signal(self):
        logs = real_step(self)
        if self.step == step:
            os.kill(os.getpid(), signum)
        return logs

    monkeypatch.setattr(train_mod.Trainer, "train_step", step_then_signal)
    return real_step


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_and_resume_is_bit_identical(world, finished, tmp_path, monkeypatch, capsys,
                                                                 signum):
    import twostep.engine.train as train_mod

    run = tmp_path / "run"
    real_step = _signal_at_step(monkeypatch, 3, signum)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    assert train(world, run) == EXIT_CODE
    err = capsys.readouterr().err
    assert f"{signal.Signals(signum).name} received" in err and "step 3 of 6" in err and "--resume latest" in err
    assert sorted(os.listdir(run / "checkpoints")) == ["step_000002", "step_000003"]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers  # restored
    monkeypatch.setattr(train_mod.Trainer, "train_step", real_step)
    assert train(world, run, "--resume", "latest") == 0
    assert (run / "student.safetensors").read_bytes() == (finished / "student.safetensors").read_bytes()
    final = ckpt.load_state(str(run / "checkpoints" / "step_000006"))
    reference = ckpt.load_state(str(finished / "checkpoints" / "step_000006"))
    for name, value in reference["opt_g"]["state"].items():
        assert torch.equal(final["opt_g"]["state"][name]["exp_avg"], value["exp_avg"])


def test_sigterm_from_outside_saves_and_exits_with_the_documented_code(world, tmp_path):
    """A real process, a real SIGTERM at an arbitrary moment (after its first log record)."""
    import time

    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "twostep", "train", "--out", str(run), *world["args"],
                             "train.steps=100000", "train.checkpoint_every=100000"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run / "train_log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and log.read_text().strip()) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_CODE, err
    steps = [s for s, _ in ckpt.list_checkpoints(str(run / "checkpoints"))]
    assert len(steps) == 1 and "SIGTERM received" in err and f"step {steps[0]} of 100000" in err
    ckpt.verify_state(str(run / "checkpoints" / f"step_{steps[0]:06d}"))


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one(world, finished, tmp_path, capsys):
    run = tmp_path / "run"
    script = f"""
import os, signal, sys
import torch
torch.set_num_threads({torch.get_num_threads()})  # the same reductions as the resumed run in this process
import twostep.engine.checkpoint as ckpt
real = ckpt.save_file
def save_then_die(tensors, path, *a, **k):
    real(tensors, path, *a, **k)
    if "step_000004" in path:
        os.kill(os.getpid(), signal.SIGKILL)
ckpt.save_file = save_then_die
from twostep.cli import main
sys.exit(main({["train", "--out", str(run), *world["args"]]!r}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = sorted(os.listdir(run / "checkpoints"))
    assert left[-1] == "step_000002" and left[0].startswith(".step_000004.") and left[0].endswith(".tmp")
    assert train(world, run, "--resume", "latest") == 0
    out = capsys.readouterr().out
    assert "interrupted checkpoint write; it is ignored" in out and "resumed from" in out
    assert "step_000002 at step 2" in out
    assert not [n for n in os.listdir(run / "checkpoints") if n.startswith(".")], "stale temporary not removed"
    assert (run / "student.safetensors").read_bytes() == (finished / "student.safetensors").read_bytes()


def test_teacher_sigterm_and_resume_end_with_the_same_weights(tmp_path, monkeypatch, capsys):
    import twostep.offline.teacher as teacher_mod

    full, broken = tmp_path / "full", tmp_path / "broken"
    assert main(["train-teacher", "--out", str(full), *TEACHER_RUN]) == 0
    real_update, calls = teacher_mod.ema_update, []

    def update_then_signal(ema, model, decay):
        real_update(ema, model, decay)
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(teacher_mod, "ema_update", update_then_signal)
    assert main(["train-teacher", "--out", str(broken), *TEACHER_RUN]) == EXIT_CODE
    assert "teacher step 3 of 6" in capsys.readouterr().err
    monkeypatch.setattr(teacher_mod, "ema_update", real_update)
    assert main(["train-teacher", "--out", str(broken), "--resume", *TEACHER_RUN]) == 0
    assert (full / "teacher.safetensors").read_bytes() == (broken / "teacher.safetensors").read_bytes()
    log = [json.loads(line)["step"] for line in open(broken / "train_log.jsonl")]
    assert log == list(range(6)), "a resumed teacher log must hold each step once"


def test_teacher_data_sigterm_then_rerun_is_byte_identical(world, tmp_path, monkeypatch, capsys):
    import twostep.engine.flow as flow

    cfg = load_config(DistillConfig, None, TEACHER + DISTILL)
    reference, broken = tmp_path / "reference", tmp_path / "broken"
    make_teacher_data(world["teacher"], cfg, str(reference))
    real_sample, calls = flow.euler_sample, []

    def sample_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the first batch of the second shard
            os.kill(os.getpid(), signal.SIGTERM)
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(flow, "euler_sample", sample_then_signal)
    argv = ["teacher-data", "--teacher", world["teacher"], "--out", str(broken), *TEACHER, *DISTILL]
    assert main(argv) == EXIT_CODE
    assert "1 of 2 shards" in capsys.readouterr().err
    assert not json.load(open(broken / "manifest.json"))["complete"]
    monkeypatch.setattr(flow, "euler_sample", real_sample)
    assert main(argv) == 0
    assert tree(broken) == tree(reference)


# --------------------------------------------------------------------------- the non-finite guard


def _nan_gradient_at(student, steps: set[int], counter: list[int]):
    """A hook that turns one LoRA gradient into NaN on the listed student updates (the loss stays finite)."""
    name, param = next((n, p) for n, p in student.named_parameters() if p.requires_grad)

    def hook(grad):
        counter[0] += 1
        return grad * float("nan") if counter[0] - 1 in steps else grad

    param.register_hook(hook)
    return name


def test_a_non_finite_gradient_skips_the_update_and_the_run_continues(world, tmp_path, monkeypatch):
    import twostep.engine.train as train_mod

    real_init, calls = train_mod.Trainer.__init__, [0]
    seen = {}

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        seen["name"] = _nan_gradient_at(self.student, {2}, calls)
        seen["trainer"] = self

    real_step = train_mod.Trainer.train_step

    def step(self):
        before = {n: p.detach().clone() for n, p in self.student.named_parameters() if p.requires_grad}
        ema = [s.clone() for shadow in self.ema.shadow.values() for s in shadow]
        logs = real_step(self)
        if self.step == 3:  # the third student update got the NaN: nothing moved
            assert self.problems and seen["name"] in self.problems[0]
            assert all(torch.equal(p, before[n]) for n, p in self.student.named_parameters() if p.requires_grad)
            assert all(torch.equal(a, b) for a, b in zip(ema, [s for sh in self.ema.shadow.values() for s in sh]))
        else:
            assert not self.problems
        return logs

    monkeypatch.setattr(train_mod.Trainer, "__init__", init)
    monkeypatch.setattr(train_mod.Trainer, "train_step", step)
    run = tmp_path / "run"
    assert train(world, run) == 0
    log = [json.loads(line) for line in open(run / "train_log.jsonl")]
    assert [r["step"] for r in log if "skipped" in r] == [3]
    assert "student update: gradient of" in log[2]["skipped"][0]
    for base, _, files in os.walk(run):
        for name in files:
            if name.endswith(".safetensors"):
                for key, value in load_file(os.path.join(base, name)).items():
                    assert not value.is_floating_point() or torch.isfinite(value).all(), (name, key)


def test_too_many_bad_steps_stop_the_run_and_keep_the_last_good_checkpoint(world, tmp_path, monkeypatch, capsys):
    import twostep.engine.train as train_mod

    real_init, calls = train_mod.Trainer.__init__, [0]

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        _nan_gradient_at(self.student, set(range(2, 100)), calls)

    monkeypatch.setattr(train_mod.Trainer, "__init__", init)
    run = tmp_path / "run"
    assert train(world, run, "train.max_bad_steps=3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line.split(":")[0] for line in err[:-1]] == ["step 3", "step 4"]  # each skipped update is reported
    assert "3 steps in a row (up to step 5)" in err[-1] and "step_000004" in err[-1]
    assert [s for s, _ in ckpt.list_checkpoints(str(run / "checkpoints"))] == [2, 4]
    assert not (run / "student.safetensors").exists()
    for _, folder in ckpt.list_checkpoints(str(run / "checkpoints")):
        state = ckpt.load_state(folder)  # written during the bad streak, yet every tensor is finite
        assert all(torch.isfinite(v).all() for v in state["student"].values())


# --------------------------------------------------------------------------- resume compares configs


@pytest.mark.parametrize("change, refused", [
    (["student.lora_rank=8"], "student.lora_rank"),
    (["discriminator.hidden=32"], "discriminator.hidden"),
    (["train.g_lr=1e-3"], "--allow-config-change"),
    (["teacher_data.seed=5"], "teacher_data.seed"),
])
def test_a_refused_resume_changes_nothing(world, tmp_path, capsys, change, refused):
    run = tmp_path / "run"
    assert train(world, run, "train.steps=2") == 0
    capsys.readouterr()
    before = tree(run)
    assert train(world, run, "--resume", "latest", *change) == 2
    assert refused in one_line(capsys)
    assert tree(run) == before


def test_resume_takes_the_runs_config_and_lists_allowed_changes(world, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(world, run, "train.steps=2", "recipe.adv_weight=0.5") == 0
    capsys.readouterr()
    # nothing repeated: RUN/config.yaml is the config, RUN/meta.json names the teacher and the data; a changed
    # step count needs the flag and is listed
    assert main(["train", "--out", str(run), "--resume", "latest", "train.steps=3", "--allow-config-change"]) == 0
    assert "train.steps: 2 -> 3" in capsys.readouterr().out
    log = [json.loads(line)["step"] for line in open(run / "train_log.jsonl")]
    assert log == [1, 2, 3]
    assert "adv_weight: 0.5" in (run / "config.yaml").read_text()


def test_a_key_the_checkpoint_predates_is_no_change_at_its_default_and_refused_otherwise():
    """A run written by an older twostep lacks the keys added since; resuming it with their defaults (the behaviour
    before them) goes on and says so, while a non-default value is a change like any other."""
    from twostep.core.errors import TwostepError
    from twostep.engine.run_folder import check_config_change

    defaults = {"teacher_data": {"guidance_scale": 0.0, "seed": 0}, "train": {"g_lr": 1e-4}}
    saved = {"teacher_data": {"seed": 0}, "train": {"g_lr": 1e-4}}
    notes = check_config_change(saved, defaults, "step_000002", False, defaults=defaults)
    assert notes == ["teacher_data.guidance_scale: (absent: step_000002 predates it) -> 0.0, its default"]
    with pytest.raises(TwostepError, match="teacher_data.guidance_scale"):  # an identity key, now guided
        check_config_change(saved, {**defaults, "teacher_data": {"guidance_scale": 4.0, "seed": 0}}, "step_000002",
                            True, defaults=defaults)
    with pytest.raises(TwostepError, match="teacher_data.guidance_scale"):  # without the class's defaults
        check_config_change(saved, defaults, "step_000002", True)


def test_a_refused_teacher_resume_changes_nothing(tmp_path, monkeypatch, capsys):
    import twostep.offline.teacher as teacher_mod

    run = tmp_path / "teacher"
    real_update, calls = teacher_mod.ema_update, []

    def interrupt(ema, model, decay):  # after step 0 saved its checkpoint
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_update(ema, model, decay)

    monkeypatch.setattr(teacher_mod, "ema_update", interrupt)
    assert main(["train-teacher", "--out", str(run), *TEACHER_RUN, "train.checkpoint_every=1"]) == 130
    capsys.readouterr()
    before = tree(run)
    assert main(["train-teacher", "--out", str(run), "--resume", "model.dim=64", "model.axes_dims=[8,12,12]"]) == 2
    assert "model.dim" in one_line(capsys)
    assert tree(run) == before


def test_a_partial_last_log_line_is_dropped_with_a_warning(world, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(world, run, "train.steps=2") == 0
    with open(run / "train_log.jsonl", "a") as f:
        f.write('{"step": 3, "g_to')
    assert train(world, run, "--resume", "latest", "train.steps=3", "--allow-config-change") == 0
    assert "dropped a partial last record" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in open(run / "train_log.jsonl")] == [1, 2, 3]


# --------------------------------------------------------------------------- no command destroys what it did not write


def test_train_never_replaces_a_run_or_files_it_did_not_write(world, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(world, run, "train.steps=2") == 0
    capsys.readouterr()
    before = tree(run)
    assert train(world, run, "train.steps=2") == 2  # a second fresh run into a finished one
    assert "already holds a training run; continue it with --resume latest" in one_line(capsys)
    assert tree(run) == before
    assert train(world, run, "--resume", "latest", "--overwrite") == 2
    assert "cannot be combined" in one_line(capsys)

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert train(world, mine, "train.steps=2") == 2
    assert "not empty and is not a run" in one_line(capsys)
    assert (mine / "notes.txt").read_text() == "keep me"
    # --overwrite: the old contents go aside while the new run trains, and are deleted once it has finished
    # never the working folder, nor a folder holding the teacher or the data
    assert train(world, os.path.dirname(world["data"]), "--overwrite") == 2
    assert "would replace" in one_line(capsys)
    assert train(world, run, "train.steps=2", "--overwrite") == 0
    assert "were moved to" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["mine", "run"]
    assert (run / "student.safetensors").exists()


def test_a_resume_continues_on_one_branch_and_retention_never_drops_the_new_checkpoint(tmp_path):
    root = str(tmp_path / "checkpoints")
    for step in (100, 200):
        ckpt.save_state(ckpt.checkpoint_dir(root, step), {"step": step})
    # resumed from step 100 (200 skipped as corrupt, or abandoned by --resume PATH): 200 is another branch
    messages = []
    ckpt.drop_later_checkpoints(root, 100, report=messages.append)
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [100] and "another branch" in messages[0]
    ckpt.save_state(ckpt.checkpoint_dir(root, 150), {"step": 150})
    ckpt.save_state(ckpt.checkpoint_dir(root, 300), {"step": 300})  # e.g. written by a process of another run
    ckpt.prune_checkpoints(root, keep_last=1, current=150)
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [150, 300]


def test_stale_temporaries_are_only_twosteps_own(tmp_path):
    for name in (".step_000004.abc123.tmp", ".shard-00001.safetensors.x_y.tmp", ".config.yaml.k2.tmp",
                 ".notes.tmp", ".backup.old", "draft.tmp"):
        (tmp_path / name).write_text("x")
    removed = sorted(os.path.basename(p) for p in ckpt.remove_stale_temporaries(str(tmp_path)))
    assert removed == [".config.yaml.k2.tmp", ".shard-00001.safetensors.x_y.tmp", ".step_000004.abc123.tmp"]
    assert sorted(os.listdir(tmp_path)) == [".backup.old", ".notes.tmp", "draft.tmp"]


def test_a_fresh_teacher_run_never_continues_or_drops_an_unfinished_one(tmp_path, monkeypatch, capsys):
    import twostep.offline.teacher as teacher_mod

    run = tmp_path / "teacher"
    real_update, calls = teacher_mod.ema_update, []

    def interrupt(ema, model, decay):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_update(ema, model, decay)

    monkeypatch.setattr(teacher_mod, "ema_update", interrupt)
    assert main(["train-teacher", "--out", str(run), *TEACHER_RUN]) == 130
    capsys.readouterr()
    before = tree(run)
    assert main(["train-teacher", "--out", str(run), *TEACHER_RUN]) == 2
    assert "unfinished teacher run" in one_line(capsys) and tree(run) == before


def test_a_signal_during_the_discriminator_warm_up_saves_and_resumes_exactly(world, tmp_path, monkeypatch,
                                                                             capsys):
    import twostep.engine.train as train_mod

    args = ("train.d_warmup_steps=4", "train.steps=2")
    full = tmp_path / "full"
    assert train(world, full, *args) == 0
    real_d_step, calls = train_mod.Trainer.d_step, []

    def d_step_then_signal(self, updates=None):
        logs = real_d_step(self, updates)
        calls.append(1)
        if len(calls) == 2:  # the second warm-up update
            os.kill(os.getpid(), signal.SIGTERM)
        return logs

    monkeypatch.setattr(train_mod.Trainer, "d_step", d_step_then_signal)
    run = tmp_path / "run"
    assert train(world, run, *args) == EXIT_CODE
    assert "during the discriminator warm-up (2 of 4 updates)" in capsys.readouterr().err
    monkeypatch.setattr(train_mod.Trainer, "d_step", real_d_step)
    assert train(world, run, "--resume", "latest", *args) == 0
    assert (run / "student.safetensors").read_bytes() == (full / "student.safetensors").read_bytes()


def test_resume_auto_starts_continues_and_restarts_a_run_left_without_checkpoints(world, tmp_path, capsys):
    """One command for a job script that is requeued: no folder -> a fresh run; a checkpoint -> resume (here the
    run, extended); a folder an attempt left before its first checkpoint -> started again."""
    run = tmp_path / "run"
    assert train(world, run, "train.steps=2", "--resume", "auto") == 0
    assert [s for s, _ in ckpt.list_checkpoints(str(run / "checkpoints"))] == [2]
    assert train(world, run, "train.steps=4", "--resume", "auto", "--allow-config-change") == 0
    assert "resumed from" in capsys.readouterr().out
    assert json.loads((run / "train_log.jsonl").read_text().splitlines()[-1])["step"] == 4
    shutil.rmtree(run / "checkpoints")  # as if killed before its first checkpoint
    assert train(world, run, "train.steps=2", "--resume", "auto") == 0
    assert "holds no checkpoint; starting the run again" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()] == [1, 2]
