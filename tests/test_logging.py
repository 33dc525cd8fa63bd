"""Logs that read well anywhere: plain progress lines when stderr is not a terminal, no third-party warnings."""

import io
import logging
import sys
import warnings
from contextlib import contextmanager

import pytest
import torch

from twostep.core.utils import PlainProgress, progress


@pytest.fixture
def log_stream(monkeypatch, capsys):
    """stderr captured by a non-terminal stream (capsys), progress enabled (conftest sets TQDM_DISABLE=1)."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert not sys.stderr.isatty()
    return lambda: capsys.readouterr().err


def test_not_a_terminal_gives_plain_lines_with_eta_and_postfix(log_stream):
    bar = progress(range(1000), total=1000, desc="teacher")
    assert isinstance(bar, PlainProgress)
    for step in bar:
        if step % 50 == 0:
            bar.set_postfix(g=f"{1 / (step + 1):.3f}", d="0.500", acc="0.75")
    text = log_stream()
    assert "\r" not in text
    lines = text.splitlines()
    assert 10 <= len(lines) <= 11, lines  # every 10% and the final line
    assert all(line.startswith("teacher: ") and "ETA" in line and "elapsed" in line for line in lines)
    assert lines[-1].startswith("teacher: 100% 1000/1000") and "g=0.001, d=0.500, acc=0.75" in lines[-1]


def test_time_interval_resume_offset_and_write():
    stream = io.StringIO()
    bar = PlainProgress(range(5, 20), total=20, initial=5, desc="distill", file=stream, every_fraction=1.0,
                        every_s=0.0)
    for _ in bar:
        bar.set_postfix(loss="0.1")
    bar.write("a message")
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("distill:  30% 6/20") and lines[-2].startswith("distill: 100% 20/20")
    assert len(lines) == 16 and lines[-1] == "a message"  # every update (every_s=0), final line once
    # a transient inner bar (leave=False) prints no per-10% lines and no final line
    quiet = io.StringIO()
    for _ in PlainProgress(range(100), desc="samples", leave=False, file=quiet):
        pass
    assert quiet.getvalue() == ""


def test_disabled_by_env_or_rank(log_stream, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert list(progress(range(7), desc="x")) == list(range(7))
    monkeypatch.delenv("TQDM_DISABLE")
    monkeypatch.setenv("RANK", "1")
    bar = progress(range(7), desc="x")
    bar.set_postfix(loss=1)
    assert list(bar) == list(range(7))
    assert log_stream() == ""


def test_a_terminal_still_gets_tqdm(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Tty())
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    from tqdm import tqdm

    bar = progress(range(3), desc="x")
    assert isinstance(bar, tqdm)
    bar.close()


# --------------------------------------------------------------------------- third-party warnings


@contextmanager
def diffusers_log(caplog):
    """diffusers' loggers do not propagate to the root logger: attach pytest's handler to theirs."""
    logger = logging.getLogger("diffusers")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="diffusers"):
            yield caplog
    finally:
        logger.removeHandler(caplog.handler)


@pytest.fixture(scope="module")
def tiny_student():
    from twostep.engine.student import Student, StudentConfig
    from twostep.families.zimage.adapter import ZImageBackbone
    from twostep.testing import tiny_transformer_config

    backbone = ZImageBackbone.from_config(tiny_transformer_config(cap_feat_dim=8, in_channels=1), seed=0)
    return Student(backbone, StudentConfig(lora_rank=2))


def test_merge_student_raises_no_warning(tiny_student, caplog):
    from diffusers import ZImageTransformer2DModel

    from twostep.engine.student import merge_student
    from twostep.testing import tiny_transformer_config

    with diffusers_log(caplog):  # control: this capture does see the keep-in-float32 warning of `.to(dtype)`
        ZImageTransformer2DModel(**tiny_transformer_config(cap_feat_dim=8, in_channels=1)).to(torch.float32)
    assert "kept in float32" in caplog.text
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught, diffusers_log(caplog):
        warnings.simplefilter("always")
        merged = merge_student(tiny_student)
    assert not caught, [str(w.message) for w in caught]
    assert not caplog.records, caplog.text
    assert all(p.dtype == torch.float32 for p in merged.parameters())


def test_the_progress_bar_shows_the_critics_a_recipe_trains():
    from twostep.engine.train import progress_postfix

    assert progress_postfix({"g_total": 0.5, "d_loss": 1.25, "d_accuracy": 0.56}) == {"g": "0.500", "d": "1.250",
                                                                                     "acc": "0.56"}
    assert progress_postfix({"g_total": 0.5, "fake_score_total": 0.031}) == {"g": "0.500", "fake": "0.031"}
    assert progress_postfix({"g_total": 0.5}) == {"g": "0.500"}, "regression: no critic, no nan columns"
