"""The distillation engine on a tiny teacher: gradient routing, frozen parts, LoRA = teacher, resume, cache."""

import json
import os

import pytest
import torch

from twostep.cli import main
from twostep.core.config import load_config
from twostep.core.errors import TwostepError
from twostep.engine import flow
from twostep.engine.recipe import generator_loss
from twostep.engine.teacher_data import TeacherData
from twostep.engine.train import Trainer
from twostep.offline.distill import DistillConfig, build_student, load_teacher_data, make_teacher_data
from twostep.offline.teacher import load_teacher

TEACHER = ["teacher.model.dim=32", "teacher.model.n_heads=2", "teacher.model.axes_dims=[4,6,6]",
           "teacher.model.n_layers=4", "teacher.text.hidden_size=8", "teacher.train.steps=3",
           "teacher.train.batch_size=16", "teacher.train.warmup_steps=1"]
DISTILL = ["teacher_data.num_samples=48", "teacher_data.shard_size=16", "teacher_data.batch_size=16",
           "student.lora_rank=4", "student.params=decoupled", "discriminator.hidden=16", "train.batch_size=8",
           "train.steps=5", "train.log_every=1", "train.sample_every=100", "train.checkpoint_every=2"]


def strip_prefix(overrides, prefix="teacher."):
    return [o[len(prefix):] for o in overrides]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    teacher_dir, data_dir = str(root / "teacher"), str(root / "data")
    assert main(["train-teacher", "--out", teacher_dir, *strip_prefix(TEACHER)]) == 0
    cfg = load_config(DistillConfig, None, TEACHER + DISTILL)
    make_teacher_data(teacher_dir, cfg, data_dir)
    return {"root": root, "teacher": teacher_dir, "data": data_dir, "cfg": cfg}


def make_cfg(*extra):
    return load_config(DistillConfig, None, TEACHER + DISTILL + list(extra))


def make_trainer(world, *extra):
    cfg = make_cfg(*extra)
    student, disc, base = build_student(world["teacher"], cfg)
    data = load_teacher_data(base, cfg, world["data"])
    return Trainer(cfg, student, disc, data, base.prompt_table, None, str(world["root"] / "run")), student, disc


def perturb_lora(student, scale=0.05):
    torch.manual_seed(0)
    with torch.no_grad():
        for params in student.parameter_groups().values():
            for p in params:
                p.add_(torch.randn_like(p) * scale)


# --------------------------------------------------------------------------- teacher data


def test_cache_holds_the_teachers_own_trajectory(world):
    teacher = load_teacher(world["teacher"])
    cache = TeacherData(world["data"])
    assert cache.in_memory  # a few kB: held in RAM
    lazy = TeacherData(world["data"], in_memory=False)
    data = cache.batch(torch.arange(len(cache)))
    from_shards = lazy.batch(torch.arange(len(lazy)))
    for key in data:  # the memory-mapped reader returns the same batches
        torch.testing.assert_close(from_shards[key], data[key])
    assert len(cache) == 48 and data["states"].shape[1:] == (2, 1, 8, 8)
    idx = torch.arange(10)
    cond = teacher.prompt_table[data["prompt_index"][idx]]
    final, states = flow.euler_sample(lambda x, s, i: teacher.backbone.velocity(x, s, cond), data["noise"][idx],
                                      flow.turbo_sigmas(8), return_states=True)
    torch.testing.assert_close(data["final"][idx], final)
    torch.testing.assert_close(data["states"][idx, 0], data["noise"][idx])  # sigma = 1: the noise itself
    torch.testing.assert_close(data["states"][idx, 1], states[4])  # sigma = 0.75: after 4 of 8 steps
    # the seed reproduces the noise, and "real" samples are teacher outputs, not noise
    torch.testing.assert_close(data["noise"][3], torch.randn((1, 8, 8), generator=torch.Generator().manual_seed(
        int(cache.noise_seed[3]))))
    assert not torch.allclose(data["final"], data["noise"])
    manifest = json.load(open(os.path.join(world["data"], "manifest.json")))
    prov = manifest["provenance"]
    assert prov["teacher_steps"] == 8 and prov["shift"] == 3.0 and prov["state_indices"] == [0, 4]
    assert len(prov["teacher_weights_sha256"]) == 64 and len(manifest["shards"]) == 3


def test_interrupted_cache_rerun_equals_uninterrupted(world, tmp_path, monkeypatch):
    import twostep.engine.teacher_data as td

    cfg = world["cfg"]
    real_make = td._make_shard
    calls = []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_make(*args, **kwargs)

    monkeypatch.setattr(td, "_make_shard", crash_on_second)
    out = str(tmp_path / "data")
    with pytest.raises(KeyboardInterrupt):
        make_teacher_data(world["teacher"], cfg, out)
    assert sorted(f for f in os.listdir(out) if f.startswith("shard")) == ["shard-00000.safetensors"]
    monkeypatch.setattr(td, "_make_shard", real_make)
    make_teacher_data(world["teacher"], cfg, out)
    ours = json.load(open(os.path.join(out, "manifest.json")))
    reference = json.load(open(os.path.join(world["data"], "manifest.json")))
    assert ours["shards"] == reference["shards"]  # same files, byte for byte (sha256)


def test_corrupt_and_foreign_caches_are_named(world, tmp_path):
    import shutil

    copy = str(tmp_path / "copy")
    shutil.copytree(world["data"], copy)
    with open(os.path.join(copy, "shard-00001.safetensors"), "r+b") as f:
        f.seek(-8, 2)
        f.write(b"garbage!")
    with pytest.raises(TwostepError, match="shard-00001.safetensors.*corrupt"):
        TeacherData(copy)
    TeacherData(copy, verify="size")  # same size: only the full hash sees flipped bytes
    with open(os.path.join(copy, "shard-00001.safetensors"), "ab") as f:
        f.write(b"trailing")
    with pytest.raises(TwostepError, match="shard-00001.safetensors.*corrupt"):
        TeacherData(copy, in_memory=False, verify="size")  # a large cache's default check
    teacher = load_teacher(world["teacher"])
    with pytest.raises(TwostepError, match="made with seed"):
        load_teacher_data(teacher, make_cfg("teacher_data.seed=5"), world["data"])
    with pytest.raises(TwostepError, match="not on the teacher's 8-step grid"):
        load_teacher_data(teacher, make_cfg("teacher_data.shift=2.0"), world["data"])


# --------------------------------------------------------------------------- student / recipe


def test_lora_student_with_adapters_disabled_is_the_teacher(world):
    cfg = make_cfg()
    student, _, _ = build_student(world["teacher"], cfg)
    perturb_lora(student)
    reference = load_teacher(world["teacher"]).backbone
    x, sigma = torch.randn(4, 1, 8, 8), torch.full((4,), 0.75)
    cond = load_teacher(world["teacher"]).prompt_table[torch.tensor([0, 1, 2, 3])]
    with torch.no_grad():
        with student.teacher() as teacher_view:
            assert torch.equal(teacher_view.velocity(x, sigma, cond), reference.velocity(x, sigma, cond))
        assert not torch.equal(student.velocity(1, x, sigma, cond), reference.velocity(x, sigma, cond))
        # the two step adapters are different parameter sets
        assert not torch.equal(student.velocity(0, x, sigma, cond), student.velocity(1, x, sigma, cond))


@pytest.mark.parametrize("form", ["lora", "full"])
@pytest.mark.parametrize("end_to_end", [True, False])
def test_final_loss_reaches_step1_only_end_to_end(world, form, end_to_end):
    trainer, student, disc = make_trainer(world, f"student.form={form}", f"recipe.end_to_end={end_to_end}",
                                          "recipe.step1_weight=0.0")
    perturb_lora(student) if form == "lora" else None
    batch, cond = trainer._batch()
    loss, _, _ = generator_loss(student, disc, batch, cond, trainer.cfg.recipe, torch.Generator().manual_seed(0))
    loss.backward()
    groups = student.parameter_groups()
    step0 = sum(float(p.grad.abs().sum()) for p in groups["step0"] if p.grad is not None)
    step1 = sum(float(p.grad.abs().sum()) for p in groups["step1"] if p.grad is not None)
    assert step1 > 0
    if end_to_end:
        assert step0 > 0
    else:
        assert step0 == 0.0


def test_steps_update_only_their_side_and_the_teacher_never_changes(world):
    trainer, student, disc = make_trainer(world, "train.g_lr=0.01", "train.d_lr=0.01", "train.warmup_steps=1")
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if not p.requires_grad}
    assert frozen, "the base (teacher) weights must be frozen"
    student_before = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
    disc_before = {n: p.detach().clone() for n, p in disc.named_parameters()}

    trainer.d_step()
    assert all(torch.equal(p, student_before[n]) for n, p in student.named_parameters() if p.requires_grad)
    assert any(not torch.equal(p, disc_before[n]) for n, p in disc.named_parameters())

    disc_after_d = {n: p.detach().clone() for n, p in disc.named_parameters()}
    trainer.g_step()
    assert all(torch.equal(p, disc_after_d[n]) for n, p in disc.named_parameters())
    assert any(not torch.equal(p, student_before[n]) for n, p in student.named_parameters() if p.requires_grad)
    for n, p in student.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"teacher weight {n} changed"


def test_gradient_checkpointing_keeps_lora_gradients(world):
    grads = []
    for ckpt in (False, True):
        trainer, student, disc = make_trainer(world)
        perturb_lora(student)
        student.set_gradient_checkpointing(ckpt)
        batch, cond = trainer._batch()
        loss, _, _ = generator_loss(student, disc, batch, cond, trainer.cfg.recipe, torch.Generator().manual_seed(0))
        loss.backward()
        grads.append([p.grad.clone() for ps in student.parameter_groups().values() for p in ps])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_resume_gives_the_same_next_losses(world, tmp_path, monkeypatch):
    import twostep.engine.train as train_mod

    full = str(tmp_path / "full")
    args = ["train", "--teacher", world["teacher"], "--data", world["data"], *TEACHER, *DISTILL]
    assert main([*args, "--out", full]) == 0
    reference = {r["step"]: r for r in map(json.loads, open(os.path.join(full, "train_log.jsonl")))}

    broken = str(tmp_path / "broken")
    real_step = _crash_at_step(monkeypatch, 3)
    assert main([*args, "--out", broken]) == 130
    assert sorted(os.listdir(os.path.join(broken, "checkpoints"))) == ["step_000002"]
    monkeypatch.setattr(train_mod.Trainer, "train_step", real_step)
    assert main([*args, "--out", broken, "--resume", "latest"]) == 0
    resumed = {r["step"]: r for r in map(json.loads, open(os.path.join(broken, "train_log.jsonl")))}
    for step in (3, 4, 5):
        for key in ("g_total", "d_loss", "g_adv", "g_step1", "d_accuracy"):
            assert resumed[step][key] == reference[step][key], (step, key)
    assert os.path.isfile(os.path.join(broken, "student.safetensors"))


def test_bad_inputs_for_train(world, tmp_path, capsys):
    assert main(["train", "--teacher", world["teacher"], "--data", str(tmp_path / "none"), "--out",
                 str(tmp_path / "r"), *TEACHER, *DISTILL]) == 2
    assert "teacher-data" in capsys.readouterr().err
    assert main(["train", "--teacher", world["teacher"], "--data", world["data"], "--out", str(tmp_path / "r2"),
                 "--resume", "latest", *TEACHER, *DISTILL]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["train", "--teacher", world["teacher"], "--data", world["data"], "--out", str(tmp_path / "r3"),
                 "student.sigmas=[1.0,0.5]", *TEACHER, *DISTILL]) == 2
    assert "student.sigmas" in capsys.readouterr().err


def test_demo_end_to_end_writes_the_report_and_reuses_work(tmp_path, capsys):
    out = str(tmp_path / "demo")
    results = str(tmp_path / "results.md")
    small_eval = ["teacher.eval.num_samples=20", "teacher.eval.batch_size=20", "teacher.eval.throughput_batch=8",
                  "teacher.eval.throughput_repeats=1"]
    assert main(["demo", "--out", out, "--results", results, *TEACHER, *DISTILL, *small_eval]) == 0
    for name in ["report.md", "report.html", "metrics.json", "comparison.png", "loss_curves.png",
                 "teacher/teacher.safetensors", "teacher_data/manifest.json", "student/student.safetensors"]:
        assert os.path.isfile(os.path.join(out, name)), name
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert set(metrics["rows"]) == {"teacher_8", "teacher_naive_2", "student_2", "student_step1_estimate"}
    assert "gap_closure" in metrics and metrics["speed"]["speedup"] > 0
    html = open(os.path.join(out, "report.html")).read()
    assert html.count("data:image/png;base64,") == 2, "the page must open with no server and no side files"
    text = open(results).read()
    assert "twostep:distill:begin" in text and "twostep:teacher:begin" in text and "gap closure" in text
    capsys.readouterr()
    assert main(["demo", "--out", out, *TEACHER, *DISTILL, *small_eval]) == 0
    printed = capsys.readouterr().out
    assert "reusing the teacher" in printed and "reusing the student" in printed


@pytest.mark.parametrize("extra", [[], ["student.params=shared"], ["student.form=full"]])
def test_merged_student_matches_the_trained_one(world, extra):
    from twostep.engine.student import merge_student

    cfg = make_cfg(*extra)
    student, _, base = build_student(world["teacher"], cfg)
    perturb_lora(student)
    merged = merge_student(student)
    noise = torch.randn(6, 1, 8, 8)
    cond = base.prompt_table[torch.arange(6) % 10]
    a, b = student.sample(noise, cond), merged.sample(noise, cond)
    torch.testing.assert_close(b["final"], a["final"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b["step1"], a["step1"], atol=1e-5, rtol=1e-4)
    lora_params = sum(p.numel() for n, p in merged.named_parameters() if "lora" in n)
    assert lora_params == 0, "the merged form is plain transformers"


def test_student_evaluation_uses_the_real_teacher(world, tmp_path):
    """Regression: the teacher rows must come from the untouched teacher, not the LoRA-carrying base."""
    from twostep.offline.digits.data import balanced_labels
    from twostep.offline.distill import evaluate_student, load_student
    from twostep.offline.sampling import generate, make_noise

    run = str(tmp_path / "student")
    assert main(["train", "--teacher", world["teacher"], "--data", world["data"], "--out", run, *TEACHER, *DISTILL,
                 "train.g_lr=0.05"]) == 0
    student, teacher, _ = load_student(run, teacher_run=world["teacher"])
    result, images = evaluate_student(student, teacher, 20, measure_speed=True)
    fresh = load_teacher(world["teacher"])
    labels = balanced_labels(20)
    noise = make_noise(20, fresh.image_shape, fresh.config.eval.seed)
    expected = generate(fresh.backbone, noise, fresh.cond(labels), 8, fresh.config.sampling.shift)
    assert torch.equal(images["teacher_8"], expected)
    assert not torch.allclose(images["student_2"], images["teacher_naive_2"]), "the student must have moved"
    assert result["speed"]["speedup"] > 0


def test_bf16_autocast_and_checkpointing_train(world, tmp_path):
    run = str(tmp_path / "bf16")
    assert main(["train", "--teacher", world["teacher"], "--data", world["data"], "--out", run, *TEACHER, *DISTILL,
                 "train.steps=2", "train.bf16=true", "train.gradient_checkpointing=true", "train.eval_every=0"]) == 0
    log = [json.loads(line) for line in open(os.path.join(run, "train_log.jsonl"))]
    assert [r["step"] for r in log] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["g_total"])) for r in log)
    assert os.path.isdir(os.path.join(run, "tb")), "TensorBoard events are written next to the JSONL log"


def test_resumed_log_has_each_step_once(world, tmp_path, monkeypatch):
    import twostep.engine.train as train_mod

    run = str(tmp_path / "run")
    args = ["train", "--teacher", world["teacher"], "--data", world["data"], "--out", run, *TEACHER, *DISTILL,
            "train.eval_every=0"]
    real_step = _crash_at_step(monkeypatch, 3)
    assert main(args) == 130
    monkeypatch.setattr(train_mod.Trainer, "train_step", real_step)
    assert main([*args, "--resume", "latest"]) == 0
    steps = [json.loads(line)["step"] for line in open(os.path.join(run, "train_log.jsonl"))]
    assert steps == [1, 2, 3, 4, 5]


def _crash_at_step(monkeypatch, step: int):
    """Make ``Trainer.train_step`` raise KeyboardInterrupt at ``step``; returns the real method to restore."""
    import twostep.engine.train as train_mod

    real_step = train_mod.Trainer.train_step

    def crash(self):
        if self.step == step:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(train_mod.Trainer, "train_step", crash)
    return real_step


def test_periodic_eval_references_come_from_the_clean_teacher(world):
    """The student's base carries its LoRA layers: the periodic evaluation's teacher rows must not."""
    from twostep.offline.distill import build_student, quick_eval
    from twostep.offline.evaluate import build_evaluator, eval_set
    from twostep.offline.sampling import generate
    from twostep.offline.teacher import load_teacher

    student, _, base = build_student(world["teacher"], world["cfg"])
    with torch.no_grad():
        for params in student.parameter_groups().values():
            for p in params:
                p.add_(0.5)  # adapters far from zero: a LoRA-carrying "teacher" would now differ a lot
    clean = load_teacher(world["teacher"])
    evaluator = build_evaluator(clean)
    run = quick_eval(base, 20, evaluator)
    run(student)
    labels, noise, cond = eval_set(clean, 20)
    expected = evaluator.score(generate(clean.backbone, noise, cond, 8, clean.config.sampling.shift), labels)
    assert run.references["teacher_8"]["fd_real"] == pytest.approx(expected["fd_real"], rel=1e-4)


def test_train_warns_when_the_batch_exceeds_the_cache(world, tmp_path, capsys, monkeypatch):
    """48 cached samples, batch 64: a warning line on stdout before the run starts (the toy has no minimum)."""
    import twostep.offline.distill as distill

    def stop(*args, **kwargs):
        raise TwostepError("stopped before the run starts")

    monkeypatch.setattr(distill, "start_run", stop)
    argv = ["train", "--teacher", world["teacher"], "--data", world["data"], *TEACHER, *DISTILL]
    assert main([*argv[:5], "--out", str(tmp_path / "r"), *argv[5:], "train.batch_size=64"]) == 2
    out = capsys.readouterr().out
    assert "twostep: warning: train.batch_size 64 exceeds the 48 cached samples" in out
    assert main([*argv[:5], "--out", str(tmp_path / "r2"), *argv[5:], "train.batch_size=48"]) == 2
    assert "warning" not in capsys.readouterr().out


def test_the_activation_meter_counts_what_autograd_keeps_and_releases_it():
    """A matmul keeps both inputs (the parameter is not an activation), a sine keeps its input: 2 x 256 KiB at the
    peak; a storage saved twice counts once; backward releases all of it."""
    from twostep.engine.memory import SavedActivationMeter, training_state_bytes

    weight = torch.nn.Parameter(torch.randn(256, 256))
    x = torch.randn(256, 256)
    with SavedActivationMeter(exclude=[weight]) as meter:
        y = x @ weight
        loss = (y.sin() + y.sin()).sum()  # y saved by both sines: one storage
        assert meter.live == 2 * 256 * 256 * 4
        loss.backward()
    del loss, y
    assert meter.peak == 2 * 256 * 256 * 4 and meter.live == 0
    opt = torch.optim.AdamW([weight])
    opt.step()
    state = training_state_bytes([torch.nn.Linear(2, 2, bias=False).requires_grad_(False)], [opt], [x])
    assert state == {"weights": 16, "gradients": 0, "optimizer": 2 * 256 * 256 * 4 + 4, "ema": 256 * 256 * 4}


def test_the_step_price_refuses_gradient_checkpointing_which_hides_activations_from_the_meter(tmp_path):
    import dataclasses

    from twostep.offline.distill import probe_step_cost

    cfg = DistillConfig()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, gradient_checkpointing=True))
    with pytest.raises(TwostepError, match="train.gradient_checkpointing=true"):
        probe_step_cost(str(tmp_path / "teacher"), str(tmp_path / "data"), cfg, str(tmp_path / "scratch"))
    assert os.listdir(tmp_path) == []
