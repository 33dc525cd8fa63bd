"""The shipped toy teachers: checksums, loading into the config they claim, refusal of altered files, rebuilding."""

import json
import os
import shlex
import shutil

import pytest

from twostep.cli import main
from twostep.core.config import load_config, to_dict
from twostep.core.errors import TwostepError
from twostep.offline.ship import matching_shipped_teacher
from twostep.offline.shipped import PROVENANCE, WORLDS, folder_sha256s, shipped_teacher_dir, verify_shipped
from twostep.offline.teacher import load_teacher

FD_TOLERANCE = 0.10  # a retrained digits teacher's 8-step FD is within ±10% (relative) of the shipped one's
TINY = ["model.dim=32", "model.n_heads=2", "model.axes_dims=[4,6,6]", "model.n_layers=2", "text.hidden_size=8",
        "train.steps=3", "train.batch_size=16", "train.warmup_steps=1", "eval.num_samples=20", "eval.batch_size=20",
        "eval.throughput_batch=8", "eval.throughput_repeats=1"]


@pytest.mark.parametrize("world", WORLDS)
def test_shipped_teacher_checksums_and_loads_into_its_config(world):
    folder = shipped_teacher_dir(world)  # verifies every sha256
    prov = verify_shipped(folder)
    assert set(prov["sha256"]) == set(folder_sha256s(folder)), "every file in the folder has a checksum"
    assert {"teacher.safetensors", "config.yaml", "prompt_embeds.safetensors", "eval.json", "eval.md"} <= \
        set(prov["sha256"])
    for key in ("config", "seed", "steps", "command", "reproduce", "torch", "machine", "train_wall_s"):
        assert prov.get(key) is not None, key
    teacher = load_teacher(folder)  # builds the backbone from config.yaml, loads the weights strictly
    # equal, except keys added after it was trained that do not change what training computes
    from twostep.offline.shipped import config_difference
    from twostep.offline.teacher import OPERATIONAL_KEYS

    assert set(config_difference(to_dict(teacher.config), prov["config"])) <= set(OPERATIONAL_KEYS)
    assert prov["seed"] == teacher.config.seed and prov["steps"] == teacher.config.train.steps
    tc = teacher.backbone.transformer.config
    assert (tc.dim, tc.n_layers) == (teacher.config.model.dim, teacher.config.model.n_layers)
    evaluation = json.load(open(os.path.join(folder, "eval.json")))
    assert evaluation["steps"]["8"]["fd_real"] == pytest.approx(prov["eval_8_step_fd"])
    assert evaluation["steps"]["2"]["fd_real"] > evaluation["steps"]["8"]["fd_real"]


def test_the_demo_config_starts_from_the_shipped_digits_teacher():
    from twostep.offline.distill import DistillConfig

    teacher_cfg = to_dict(load_config(DistillConfig, "configs/toy_demo.yaml").teacher)
    assert matching_shipped_teacher(teacher_cfg) == (shipped_teacher_dir("digits"), "")
    teacher_cfg["train"]["steps"] = 10
    folder, why = matching_shipped_teacher(teacher_cfg)
    assert folder is None and "train.steps" in why


def corrupted_copy(tmp_path):
    copy = str(tmp_path / "digits")
    shutil.copytree(shipped_teacher_dir("digits"), copy)
    path = os.path.join(copy, "teacher.safetensors")
    with open(path, "r+b") as f:  # flip one byte of tensor data: the file still parses, only the checksum fails
        f.seek(-100, os.SEEK_END)
        byte = f.read(1)
        f.seek(-100, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    return copy, path


def test_a_corrupted_copy_is_refused(tmp_path, capsys):
    copy, path = corrupted_copy(tmp_path)
    with pytest.raises(TwostepError) as err:
        load_teacher(copy)
    message = str(err.value)
    assert "\n" not in message and path in message and "sha256" in message and "train-teacher" in message
    with pytest.raises(TwostepError, match="teacher.safetensors fails its sha256"):
        verify_shipped(copy)
    capsys.readouterr()
    grid = str(tmp_path / "grid.png")
    assert main(["sample", "--model", copy, "--steps", "1", "--per-prompt", "1", "--out", grid]) == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and stderr.startswith("twostep: error: ") and "teacher.safetensors" in stderr
    assert not os.path.exists(grid)


def test_a_missing_file_is_refused(tmp_path):
    copy = str(tmp_path / "digits")
    shutil.copytree(shipped_teacher_dir("digits"), copy)
    os.remove(os.path.join(copy, "prompt_embeds.safetensors"))
    with pytest.raises(TwostepError, match="prompt_embeds.safetensors is missing"):
        load_teacher(copy)


def test_train_teacher_records_provenance_and_ship_teacher_rebuilds_a_folder(tmp_path, capsys):
    run, shipped = str(tmp_path / "run"), str(tmp_path / "shipped")
    assert main(["train-teacher", "--out", run, *TINY]) == 0
    prov = json.load(open(os.path.join(run, PROVENANCE)))
    assert prov["command"] == shlex.join(["twostep", "train-teacher", "--out", run, *TINY])
    assert prov["steps"] == 3 and prov["config"]["model"]["dim"] == 32 and prov["final_loss"] is not None
    assert set(prov["sha256"]) == set(folder_sha256s(run))
    load_teacher(run)  # its own record checks out

    assert main(["ship-teacher", run, "--world", "digits", "--out", shipped, "--steps", "1,8"]) == 0
    assert "shipped the digits teacher" in capsys.readouterr().out
    record = verify_shipped(shipped)
    assert sorted(os.listdir(shipped)) == ["config.yaml", "eval.json", "eval.md", "prompt_embeds.safetensors",
                                           PROVENANCE, "teacher.safetensors", "text"]
    assert record["command"] == prov["command"] and record["train_wall_s"] == prov["train_wall_s"]
    assert record["sha256"]["teacher.safetensors"] == prov["sha256"]["teacher.safetensors"]
    assert set(json.load(open(os.path.join(shipped, "eval.json")))["steps"]) == {"1", "8"}
    assert "| teacher, 8 steps |" in open(os.path.join(shipped, "eval.md")).read()
    assert to_dict(load_teacher(shipped).config) == record["config"]


@pytest.mark.slow
def test_retraining_the_digits_teacher_reproduces_its_8_step_fd(tmp_path):
    """`make bench`: retrain from the shipped config (~10 min on 2 cores); 8-step FD within FD_TOLERANCE."""
    from twostep.offline.evaluate import evaluate_teacher_steps
    from twostep.offline.teacher import TeacherConfig, train_teacher

    folder = shipped_teacher_dir("digits")
    shipped_fd = json.load(open(os.path.join(folder, "eval.json")))["steps"]["8"]["fd_real"]
    cfg = load_config(TeacherConfig, os.path.join(folder, "config.yaml"))
    train_teacher(cfg, str(tmp_path / "teacher"))
    result = evaluate_teacher_steps(load_teacher(str(tmp_path / "teacher")), [8], measure_speed=False)
    fd = result["steps"]["8"]["fd_real"]
    assert abs(fd - shipped_fd) <= FD_TOLERANCE * shipped_fd, (fd, shipped_fd)
