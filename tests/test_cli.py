"""The commands end to end on tiny configs, and their bad-input behaviour."""

import json
import os

import pytest
import torch

from twostep.cli import main

TINY = ["model.dim=32", "model.n_heads=2", "model.axes_dims=[4,6,6]", "model.n_layers=2", "text.hidden_size=8",
        "train.steps=4", "train.batch_size=16", "train.warmup_steps=2", "train.log_every=1",
        "train.checkpoint_every=2", "eval.num_samples=20", "eval.batch_size=20", "eval.throughput_batch=8",
        "eval.throughput_repeats=1"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "teacher")
    assert main(["train-teacher", "--out", out, *TINY]) == 0
    return out


def test_train_teacher_writes_a_complete_run(teacher_run):
    names = set(os.listdir(teacher_run))
    assert {"config.yaml", "teacher.safetensors", "prompt_embeds.safetensors", "train_log.jsonl", "meta.json",
            "text"} <= names
    assert "checkpoints" not in names, "a finished run keeps no resume state"
    assert not [n for n in names if n.endswith(".tmp")]
    log = [json.loads(line) for line in open(os.path.join(teacher_run, "train_log.jsonl"))]
    assert [r["step"] for r in log] == [0, 1, 2, 3]


def test_sample_and_eval(teacher_run, tmp_path, capsys):
    grid = str(tmp_path / "grid.png")
    assert main(["sample", "--model", teacher_run, "--steps", "2", "--out", grid, "--per-prompt", "3"]) == 0
    from PIL import Image

    assert Image.open(grid).size[0] > 3 * 32
    out = str(tmp_path / "eval.json")
    results = str(tmp_path / "results.md")
    assert main(["eval", "--model", teacher_run, "--steps", "1,2,8", "--out", out, "--results", results]) == 0
    data = json.load(open(out))
    assert set(data["steps"]) == {"1", "2", "8"}
    for row in data["steps"].values():
        assert {"fd_real", "class_accuracy", "diversity", "samples_per_s"} <= set(row)
    text = open(results).read()
    assert "<!-- twostep:teacher:begin -->" in text and "twostep eval" in text
    assert "teacher, 8 steps" in text
    # rewriting replaces the block instead of appending a second one
    assert main(["eval", "--model", teacher_run, "--steps", "2", "--out", out, "--results", results]) == 0
    assert open(results).read().count("twostep:teacher:begin") == 1


def test_teacher_resume_continues_to_the_same_weights(tmp_path, monkeypatch):
    """Stop after step 2 (a checkpoint), resume, and end with the same weights as one uninterrupted run."""
    from safetensors.torch import load_file

    import twostep.offline.teacher as teacher_mod

    full = str(tmp_path / "full")
    assert main(["train-teacher", "--out", full, *TINY]) == 0

    broken = str(tmp_path / "broken")
    real_update = teacher_mod.ema_update
    calls = []

    def crash_after_two(ema, model, decay):
        real_update(ema, model, decay)
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(teacher_mod, "ema_update", crash_after_two)
    assert main(["train-teacher", "--out", broken, *TINY]) == 130
    assert os.path.isfile(os.path.join(broken, "checkpoints", "step_000002", "MANIFEST.json"))
    monkeypatch.setattr(teacher_mod, "ema_update", real_update)
    assert main(["train-teacher", "--out", broken, "--resume", *TINY]) == 0
    a = load_file(os.path.join(full, "teacher.safetensors"))
    b = load_file(os.path.join(broken, "teacher.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)


# --------------------------------------------------------------------------- bad input


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_unknown_option_and_bad_values(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--stepz", "2"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --stepz" in one_line_error(capsys)
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--steps", "two"])
    assert exc.value.code == 2 and "step counts" in one_line_error(capsys)


def test_bad_config_key_and_file(tmp_path, capsys):
    assert main(["train-teacher", "--out", str(tmp_path / "r"), "train.stepz=3"]) == 2
    assert "train.stepz" in one_line_error(capsys)
    assert main(["train-teacher", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "r")]) == 2
    assert "does not exist" in one_line_error(capsys)


def test_missing_model_and_wrong_shape_checkpoint(teacher_run, tmp_path, capsys):
    assert main(["sample", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "g.png")]) == 2
    assert "train-teacher" in one_line_error(capsys)
    other = tmp_path / "other.yaml"
    other.write_text("model:\n  dim: 48\n  n_heads: 2\n  n_layers: 2\n  axes_dims: [8, 8, 8]\n")
    from twostep.core.errors import TwostepError
    from twostep.offline.teacher import load_teacher

    with pytest.raises(TwostepError, match="does not fit this model.*shape"):
        load_teacher(teacher_run, config_path=str(other))
    assert not os.path.exists(tmp_path / "g.png")


def test_unwritable_output_leaves_nothing(teacher_run, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(["sample", "--model", teacher_run, "--out", str(blocker / "grid.png")]) == 2
    assert "cannot write" in one_line_error(capsys)
    assert main(["train-teacher", "--out", str(blocker / "run"), *TINY]) == 2
    assert "cannot write" in one_line_error(capsys)
    assert blocker.read_text() == "not a folder"
