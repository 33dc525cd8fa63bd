import os

import pytest

from twostep.core.config import ConfigError, load_config, save_config, to_dict
from twostep.core.errors import TwostepError
from twostep.offline.teacher import TeacherConfig


def test_defaults_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 42\nmodel:\n  dim: 64\n  axes_dims: [4, 6, 6]\n")
    cfg = load_config(TeacherConfig, str(path), ["train.lr=3e-4", "sampling.shift=2", "seed=7"])
    assert (cfg.train.steps, cfg.train.lr, cfg.sampling.shift, cfg.seed, cfg.model.dim) == (42, 3e-4, 2.0, 7, 64)
    assert cfg.train.batch_size == TeacherConfig().train.batch_size


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(TeacherConfig, None, ["train.steps=5"])
    save_config(cfg, str(tmp_path / "resolved.yaml"))
    assert load_config(TeacherConfig, str(tmp_path / "resolved.yaml")) == cfg


@pytest.mark.parametrize("override, key", [
    ("train.stepz=3", "train.stepz"),
    ("train.steps=many", "train.steps"),
    ("train.steps=0", "train.steps"),
    ("model.dim=90", "model.dim"),
    ("model.dim=100", "model.axes_dims"),
    ("trian.steps=3", "trian"),
    ("train.lr=true", "train.lr"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}"):
        load_config(TeacherConfig, None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TeacherConfig, str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(TeacherConfig, str(bad))
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(TeacherConfig, None, ["train.steps"])


def test_shipped_configs_load_and_agree():
    from twostep.offline.distill import DistillConfig

    teacher = load_config(TeacherConfig, "configs/toy_teacher.yaml")
    assert teacher == TeacherConfig(), "toy_teacher.yaml and the code defaults must not drift apart"
    demo = load_config(DistillConfig, "configs/toy_demo.yaml")
    assert demo.teacher == teacher, "the demo must train (and so reuse) the same teacher as train-teacher"
    assert demo.student.sigmas == demo.teacher_data.student_sigmas == [1.0, 0.75]


def test_demo_yaml_equals_engine_defaults():
    """configs/toy_demo.yaml spells out the defaults; the two must not drift apart."""
    from twostep.offline.distill import DistillConfig

    demo = load_config(DistillConfig, "configs/toy_demo.yaml")
    defaults = DistillConfig()
    for section in ("teacher_data", "student", "discriminator", "recipe"):
        assert getattr(demo, section) == getattr(defaults, section), section


def test_zimage_yaml_equals_the_real_paths_defaults():
    """configs/zimage_turbo_2step_lora.yaml spells out ZImageDistillConfig's defaults (gpu_check and plan use them)."""
    from twostep.real.train import ZImageDistillConfig, is_real_config

    shipped = load_config(ZImageDistillConfig, "configs/zimage_turbo_2step_lora.yaml")
    assert to_dict(shipped) == to_dict(ZImageDistillConfig())
    assert is_real_config("configs/zimage_turbo_2step_lora.yaml") and not is_real_config("configs/toy_demo.yaml")


def test_a_section_given_in_part_keeps_the_rest_of_its_default(tmp_path):
    """The config's own section defaults (default factories) fill what a YAML section or an override leaves out, not
    the section class's: `student.lora_rank=32` on the Z-Image config keeps its lora_alpha 64, and
    `recipe.adv_weight=0.5` on the toy config keeps its step-1 loss and final regression."""
    from twostep.offline.distill import DistillConfig
    from twostep.real.train import ZImageDistillConfig

    real = load_config(ZImageDistillConfig, overrides=["student.lora_rank=32"])
    assert (real.student.lora_rank, real.student.lora_alpha) == (32, 64.0)
    assert real.discriminator.blocks == [7, 15, 23, 26]
    yaml = tmp_path / "partial.yaml"
    yaml.write_text("discriminator:\n  hidden: 128\n")
    assert load_config(ZImageDistillConfig, str(yaml)).discriminator.blocks == [7, 15, 23, 26]
    toy = load_config(DistillConfig, overrides=["recipe.adv_weight=0.5"])
    assert (toy.recipe.adv_weight, toy.recipe.step1_loss, toy.recipe.final_reg_weight) == (0.5, "final", 1.0)
    assert to_dict(load_config(DistillConfig, overrides=["student.params=decoupled"]).student) == \
        {**to_dict(DistillConfig().student), "params": "decoupled"}


def test_packaged_configs_are_found_by_name_from_any_folder(tmp_path, monkeypatch, capsys):
    from twostep.cli import main
    from twostep.core.packaged_configs import packaged_configs, resolve_config

    monkeypatch.chdir(tmp_path)  # outside the checkout
    names = packaged_configs()
    assert {"toy_teacher", "toy_demo", "detail_teacher", "detail_demo", "zimage_turbo_2step_lora"} <= set(names)
    assert resolve_config("zimage_turbo_2step_lora") == resolve_config("zimage_turbo_2step_lora.yaml")
    (tmp_path / "mine.yaml").write_text("seed: 3\n")
    assert resolve_config("mine.yaml") == "mine.yaml"  # a path still wins
    with pytest.raises(TwostepError, match="twostep configs"):
        resolve_config("zimage_turbo")
    assert main(["configs"]) == 0
    listing = capsys.readouterr().out.splitlines()
    for name in names:  # one line each, with what it is for
        line = next(line for line in listing if line.startswith(name + " "))
        assert len(line.split(None, 1)) == 2, line
    readme = open(os.path.join(os.path.dirname(names["toy_demo"]), "README.md"), encoding="utf-8").read()
    assert all(f"`{name}.yaml`" in readme for name in names), "configs/README.md lists every config"


def test_a_config_written_before_a_key_existed_is_the_same_config_at_its_default():
    from twostep.core.config import same_config

    defaults = {"recipe": {"kind": "turbo", "shift": 1.0}}
    saved = {"recipe": {"kind": "dmd2"}}
    assert same_config(saved, {"recipe": {"kind": "dmd2", "shift": 1.0}}, defaults)
    assert not same_config(saved, {"recipe": {"kind": "dmd2", "shift": 3.0}}, defaults), "a new key set apart"
    assert not same_config(saved, {"recipe": {"kind": "turbo", "shift": 1.0}}, defaults)
    assert not same_config({"recipe": {"kind": "dmd2", "gone": 1}}, {"recipe": {"kind": "dmd2", "shift": 1.0}},
                           defaults), "a key the current config lacks"
