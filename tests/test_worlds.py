"""The World interface and the detail world: data, metrics that see blur, configs."""

import os

import pytest
import torch
import yaml

from twostep.core.config import load_config, to_dict
from twostep.offline.detail.data import CLASS_NAMES, NUM_CLASSES, gaussian_blur, generate
from twostep.offline.detail.evaluator import DetailEvaluator, edge_width, high_band_energy
from twostep.offline.distill import DistillConfig
from twostep.offline.teacher import TeacherConfig
from twostep.offline.worlds import DetailWorld, DigitsWorld, get_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_detail_images_are_seeded_sharp_and_in_range():
    labels = torch.arange(NUM_CLASSES).repeat(4)
    a = generate(labels, torch.Generator().manual_seed(0))
    b = generate(labels, torch.Generator().manual_seed(0))
    assert a.shape == (40, 3, 16, 16) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    # every class varies from image to image (random phase / position / colour)
    for c in range(NUM_CLASSES):
        assert (a[labels == c][0] - a[labels == c][1]).abs().max() > 0.1, CLASS_NAMES[c]


def test_blur_lowers_high_band_and_widens_edges():
    images = generate(torch.arange(NUM_CLASSES).repeat(20), torch.Generator().manual_seed(1))
    bands = [high_band_energy(gaussian_blur(images, s)) for s in (0.0, 0.5, 0.7, 1.0)]
    assert bands == sorted(bands, reverse=True) and bands[2] < 0.5 * bands[0]
    shapes = generate(torch.tensor([5, 6] * 30), torch.Generator().manual_seed(2))
    widths = [edge_width(gaussian_blur(shapes, s)) for s in (0.0, 0.5, 0.7)]
    assert widths == sorted(widths) and widths[0] < 1.6


@pytest.fixture(scope="module")
def detail_evaluator():
    return DetailEvaluator(seed=0, heldout_samples=300, classifier_steps=100)


def test_a_repeated_classifier_is_trained_once_and_leaves_the_rng_as_training_does():
    from twostep.offline.detail.evaluator import train_classifier
    from twostep.offline.digits.evaluator import _TRAINED

    _TRAINED.pop(("detail", 3, 4, 8), None)
    first = train_classifier(seed=3, steps=4, batch_size=8)
    draws_after_training = torch.rand(5)
    torch.manual_seed(12345)
    again = train_classifier(seed=3, steps=4, batch_size=8)
    assert again is first and torch.equal(torch.rand(5), draws_after_training)
    assert train_classifier(seed=4, steps=4, batch_size=8) is not first


def test_calibration_rows_order_blur(detail_evaluator):
    """The detail evaluator's FD and high-band energy rank 0.5 px and 0.7 px blur worse than sharp images."""
    labels = torch.arange(300) % NUM_CLASSES
    images = generate(labels, torch.Generator().manual_seed(3))
    rows = [detail_evaluator.score(gaussian_blur(images, s), labels) for s in (0.0, 0.5, 0.7)]
    fds = [r["fd_real"] for r in rows]
    highs = [r["high_band"] for r in rows]
    assert fds[0] < fds[1] < fds[2], fds
    assert highs[0] > highs[1] > highs[2], highs
    assert rows[0]["class_accuracy"] > 0.25  # chance is 0.1


def test_worlds_answer_the_same_interface():
    g = torch.Generator().manual_seed(0)
    for world, shape in ((get_world("digits"), (1, 8, 8)), (get_world("detail"), (3, 16, 16))):
        assert len(world.prompts()) == len(world.class_names) == 10
        images, labels = world.training_batch(6, g)
        assert images.shape == (6, *shape) and labels.shape == (6,)
        assert world.sample_real(labels, g).shape == (6, *shape)
    with pytest.raises(Exception, match="unknown world"):
        get_world("nope")


def test_digits_training_batches_keep_the_shipped_teachers_order():
    """Digits teachers draw training images by index exactly as before the World interface (reproducibility)."""
    world = DigitsWorld()
    images, labels = world.training_batch(16, torch.Generator().manual_seed(0))
    index = torch.randint(0, len(world.train), (16,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(images, world.train.images[index]) and torch.equal(labels, world.train.labels[index])
    assert isinstance(get_world("detail"), DetailWorld)


def test_detail_demo_config_carries_the_detail_teacher_config():
    teacher = load_config(TeacherConfig, os.path.join(ROOT, "configs", "detail_teacher.yaml"))
    demo = load_config(DistillConfig, os.path.join(ROOT, "configs", "detail_demo.yaml"))
    assert to_dict(demo.teacher) == to_dict(teacher) and teacher.world == "detail"
    with open(os.path.join(ROOT, "configs", "detail_demo.yaml")) as f:
        assert yaml.safe_load(f)["teacher"]["world"] == "detail"


def test_unknown_world_is_a_config_error():
    with pytest.raises(Exception, match="world"):
        load_config(TeacherConfig, None, ["world=mars"])


def test_detail_demo_runs_end_to_end(tmp_path):
    """`twostep demo --world detail` on a tiny teacher: report, comparison grid, high-band ratio per row."""
    import json

    from twostep.cli import main

    out = str(tmp_path / "demo")
    tiny = ["teacher.model.dim=32", "teacher.model.n_heads=2", "teacher.model.axes_dims=[4,6,6]",
            "teacher.model.n_layers=2", "teacher.text.hidden_size=8", "teacher.train.steps=3",
            "teacher.train.batch_size=8", "teacher.train.warmup_steps=1", "teacher_data.num_samples=32",
            "teacher_data.shard_size=32", "teacher_data.batch_size=32", "discriminator.blocks=[0,1]",
            "discriminator.hidden=16", "train.batch_size=4", "train.steps=3", "train.d_warmup_steps=1",
            "recipe.adv_ramp_steps=2", "train.eval_every=3", "train.sample_every=100", "teacher.eval.num_samples=20",
            "teacher.eval.batch_size=20", "teacher.eval.throughput_batch=4", "teacher.eval.throughput_repeats=1"]
    assert main(["demo", "--world", "detail", "--out", out, *tiny]) == 0
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert all("high_band_ratio" in row for row in metrics["rows"].values())
    assert os.path.getsize(os.path.join(out, "comparison.png")) > 1000
    assert main(["demo", "--world", "detail", "--results", str(tmp_path / "r.md"), "--out", out, *tiny]) == 2
