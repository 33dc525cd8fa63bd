"""The recipe's adversarial part on a tiny teacher: what the discriminator sees as fake, approximate vs exact R1,
the discriminator warm-up and the adversarial ramp, wrong-prompt fakes, and the LADD reference arm's inputs."""

import copy
import math

import pytest
import torch
from test_engine import make_cfg, make_trainer, perturb_lora, world  # noqa: F401  (world is a fixture)

from twostep.core.config import ConfigError
from twostep.engine import flow
from twostep.engine.discriminator import Discriminator, wrong_prompt_pairs
from twostep.engine.recipe import adv_ramp, discriminator_loss, generator_loss, implied_clean, student_outputs
from twostep.families.zimage.adapter import ZImageBackbone

LADD = ["recipe.student_inputs=teacher_renoised", "recipe.step1_loss=adversarial", "recipe.final_reg_weight=0",
        "recipe.end_to_end=false"]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def spies(monkeypatch):
    """Record every renoise input (clean images handed to the discriminator) and every teacher feature call."""
    record = {"renoised": [], "features": []}
    real_renoise, real_features = flow.renoise, ZImageBackbone.features

    def renoise(x, noise, sigma):
        record["renoised"].append(x.detach().clone())
        return real_renoise(x, noise, sigma)

    def features(self, x, sigma, cond, blocks):
        record["features"].append({"grad": torch.is_grad_enabled(), "sigma": sigma.detach().clone(),
                                   "x": x})
        return real_features(self, x, sigma, cond, blocks)

    monkeypatch.setattr(flow, "renoise", renoise)
    monkeypatch.setattr(ZImageBackbone, "features", features)
    return record


def d_batch(trainer, student):
    batch, cond = trainer._batch()
    with torch.no_grad():
        x_hats = student_outputs(student, batch, cond, trainer.cfg.recipe, gen())["x_hat"]
    return batch, cond, x_hats


def seen(record, x):
    return any(r.shape == x.shape and torch.allclose(r, x, atol=1e-6) for r in record["renoised"])


# --------------------------------------------------------------------------- every scored output feeds the D


@pytest.mark.parametrize("step1_loss", ["adversarial", "final", "intermediate"])
def test_discriminator_fakes_include_step1_exactly_when_it_is_scored(world, spies, step1_loss):
    trainer, student, disc = make_trainer(world, f"recipe.step1_loss={step1_loss}", "student.params=decoupled")
    perturb_lora(student)
    batch, cond, (x1, x2) = d_batch(trainer, student)
    _, logs = discriminator_loss(student, disc, batch, batch["final"], cond, gen(), rc=trainer.cfg.recipe)
    adversarial = step1_loss == "adversarial"
    assert seen(spies, x2), "the final output is always a fake"
    assert seen(spies, x1) == adversarial
    assert logs["d_fake_batches"] == (2 if adversarial else 1)
    assert ("d_accuracy/step1" in logs) == adversarial and ("d_logit_gap/step1" in logs) == adversarial
    assert "d_accuracy" in logs and "d_logit_gap" in logs
    if adversarial:  # x̂1 is judged at sigma_d in [sigma2, 1], in the D step and in the G step alike
        sigma2 = student.cfg.sigmas[1]
        assert sum(bool((c["sigma"] >= sigma2).all()) for c in spies["features"]) >= 2  # its fake and real passes
        spies["features"].clear()
        generator_loss(student, disc, batch, cond, trainer.cfg.recipe, gen())
        assert len(spies["features"]) == 2 and bool((spies["features"][1]["sigma"] >= sigma2).all())


def test_step1_reals_are_the_stated_ones(world, spies):
    trainer, student, disc = make_trainer(world, "recipe.step1_loss=adversarial", "recipe.step1_adv_real=implied")
    batch, cond, _ = d_batch(trainer, student)
    discriminator_loss(student, disc, batch, batch["final"], cond, gen(), rc=trainer.cfg.recipe)
    assert seen(spies, implied_clean(batch, student, 0)) and seen(spies, batch["final"])
    with pytest.raises(ConfigError, match="recipe.step1_adv_real"):
        make_cfg("recipe.step1_loss=adversarial", "recipe.step1_adv_real=implied", "recipe.real_source=data")


# --------------------------------------------------------------------------- R1


def _graph_leaves(tensor):
    """Every leaf tensor (AccumulateGrad variable) the autograd graph of ``tensor`` reaches."""
    leaves, stack, visited = [], [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        if hasattr(node, "variable"):
            leaves.append(node.variable)
        stack.extend(n for n, _ in node.next_functions)
    return leaves


@pytest.mark.parametrize("mode", ["approx", "exact"])
def test_approximate_r1_never_differentiates_through_the_teacher(world, spies, mode):
    trainer, student, disc = make_trainer(world, "discriminator.r1_weight=1.0", f"discriminator.r1={mode}")
    batch, cond, _ = d_batch(trainer, student)
    total, logs = discriminator_loss(student, disc, batch, batch["final"], cond, gen(), rc=trainer.cfg.recipe)
    heads = {id(p) for p in disc.parameters()}
    foreign = [leaf for leaf in _graph_leaves(total) if id(leaf) not in heads]
    grad_calls = [c for c in spies["features"] if c["grad"]]
    if mode == "approx":
        assert not grad_calls, "approx R1: every teacher feature pass of the D step runs under no_grad"
        assert not foreign, "approx R1: the loss's graph reaches the heads only"
        assert len(spies["features"]) == 3  # fake, real, perturbed real
    else:
        assert len(grad_calls) == 1, "exact R1 keeps a graph through the teacher for the real pass"
        assert any(leaf.shape == batch["final"].shape for leaf in foreign), "and differentiates to the real input"
    total.backward()
    assert all(p.grad is not None for p in disc.parameters() if p.requires_grad)
    assert logs["d_r1"] > 0 and torch.isfinite(torch.tensor(logs["d_r1"]))


def test_approximate_r1_is_a_finite_difference(world):
    trainer, student, disc = make_trainer(world, "discriminator.r1_weight=1.0")
    perturb_lora(student)
    batch, cond, _ = d_batch(trainer, student)
    values = {}
    for sigma in (1e-2, 1e-3, 1e-7):
        disc.cfg.r1_sigma = sigma
        values[sigma] = discriminator_loss(student, disc, batch, batch["final"], cond, gen(), rc=trainer.cfg.recipe)[1][
            "d_r1"]
    assert values[1e-2] > 0
    assert 30 < values[1e-2] / values[1e-3] < 300, values  # quadratic in the perturbation size
    assert values[1e-7] < 1e-6 * values[1e-2]


# --------------------------------------------------------------------------- warm-up and ramp


def test_discriminator_warmup_trains_only_the_heads_and_survives_resume(world):
    trainer, student, disc = make_trainer(world, "train.d_warmup_steps=3", "train.d_lr=0.01", "train.warmup_steps=1")
    student_before = {n: p.detach().clone() for n, p in student.named_parameters()}
    disc_before = {n: p.detach().clone() for n, p in disc.named_parameters()}
    logs = trainer.d_warmup()
    assert trainer.d_warmup_done == 3 and trainer.step == 0, "warm-up updates are not generator steps"
    assert "d_warmup/d_accuracy" in logs
    assert all(torch.equal(p, student_before[n]) for n, p in student.named_parameters())
    assert any(not torch.equal(p, disc_before[n]) for n, p in disc.named_parameters())
    assert trainer.d_warmup() == {}, "done once"

    calls = []
    real_d_step = trainer.d_step
    trainer.d_step = lambda updates=None: calls.append(updates) or real_d_step(updates)
    trainer.train_step()
    assert trainer.step == 1 and calls == [None], "a train step after the warm-up runs the usual D:G schedule"

    state = trainer.state_dict()
    assert state["d_warmup_done"] == 3
    fresh, _, _ = make_trainer(world, "train.d_warmup_steps=3")
    fresh.load_state_dict(state)
    assert fresh.d_warmup_done == 3 and fresh.d_warmup() == {}, "a resumed run does not repeat the warm-up"


class _StopAfter:
    """A stop signal that arrives after ``n`` checks (the trainer checks before each warm-up update)."""

    def __init__(self, n):
        self.checks, self.n = 0, n

    @property
    def requested(self):
        self.checks += 1
        return self.checks > self.n


def test_a_run_stopped_inside_the_warmup_resumes_exactly_with_per_rank_noise(world):
    """Under torchrun each rank seeds its noise per update; a warm-up cut short must not replay its first draws."""
    extra = ("train.d_warmup_steps=3", "train.d_lr=0.01", "train.warmup_steps=1")
    whole, _, whole_disc = make_trainer(world, *extra)
    cut, _, _ = make_trainer(world, *extra)
    for trainer in (whole, cut):  # a torchrun run's noise, in one process
        trainer.per_rank_noise, trainer.noise_generator = True, torch.Generator()
    whole.train_step()
    cut.stop = _StopAfter(1)
    assert cut.train_step() is None and cut.d_warmup_done == 1, "stopped after one warm-up update"
    resumed, _, resumed_disc = make_trainer(world, *extra)
    resumed.load_state_dict(copy.deepcopy(cut.state_dict()))
    assert resumed.per_rank_noise, "the checkpoint says its noise was per rank"
    resumed.train_step()
    assert resumed.step == whole.step == 1
    for (name, p), q in zip(whole_disc.named_parameters(), resumed_disc.parameters()):
        assert torch.equal(p, q), f"discriminator {name} differs after a resumed warm-up"


def test_adversarial_ramp_weights(world):
    cfg = make_cfg("recipe.adv_ramp_steps=4", "recipe.adv_weight=2.0")
    assert [adv_ramp(cfg.recipe, s) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert adv_ramp(make_cfg().recipe, 0) == 1.0, "no ramp by default"
    trainer, _, _ = make_trainer(world, "recipe.adv_ramp_steps=4", "recipe.adv_weight=2.0")
    logs = trainer.g_step()
    assert logs["adv_weight_eff"] == 0.0 and logs["adv_ramp"] == 0.0
    assert logs["g_total"] == pytest.approx(logs["g_step1"] + logs["g_reg"], rel=1e-5), "no adversarial term yet"
    trainer.step = 2
    assert trainer.g_step()["adv_weight_eff"] == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="recipe.adv_ramp_steps"):
        make_cfg("recipe.adv_ramp_steps=-1")
    with pytest.raises(ConfigError, match="train.d_warmup_steps"):
        make_cfg("train.d_warmup_steps=-1")


# --------------------------------------------------------------------------- wrong-prompt fakes


def test_wrong_prompt_pairs_always_differ():
    for labels in ([0, 0, 1, 2, 2, 2], [0, 0, 0, 1], list(range(8)), [5, 5, 5, 5, 5, 5, 5, 9]):
        index = torch.tensor(labels)
        for seed in range(5):
            rows, partners = wrong_prompt_pairs(index, gen(seed))
            assert rows.tolist() == list(range(len(labels))), "every sample with some other prompt is used"
            assert (index[rows] != index[partners]).all()
    rows, partners = wrong_prompt_pairs(torch.tensor([3, 3, 3]), gen())
    assert rows.numel() == 0 and partners.numel() == 0, "no different prompt in the batch: skipped"


def test_wrong_prompt_fakes_in_the_discriminator_loss(world, monkeypatch):
    import twostep.engine.recipe as recipe

    trainer, student, disc = make_trainer(world, "discriminator.wrong_prompt_weight=0.5")
    batch, cond, _ = d_batch(trainer, student)
    pairs, conds = [], []
    real_pairs, real_forward = recipe.wrong_prompt_pairs, Discriminator.forward

    def spy_pairs(index, generator):
        pairs.append(real_pairs(index, generator))
        return pairs[-1]

    def spy_forward(self, features, sigma, c):
        conds.append(c)
        return real_forward(self, features, sigma, c)

    monkeypatch.setattr(recipe, "wrong_prompt_pairs", spy_pairs)
    monkeypatch.setattr(Discriminator, "forward", spy_forward)
    total, logs = discriminator_loss(student, disc, batch, batch["final"], cond, gen(), rc=trainer.cfg.recipe)
    ((rows, partners),) = pairs
    index = batch["prompt_index"]
    assert rows.numel() > 0 and (index[rows] != index[partners]).all()
    assert torch.equal(conds[-1].embeds, cond[partners].embeds), "the last head call sees the partners' prompts"
    assert "d_wrong_prompt" in logs and torch.isfinite(total)
    disc.cfg.wrong_prompt_weight = 0.0
    pairs.clear()
    without = discriminator_loss(student, disc, batch, batch["final"], cond, gen(), rc=trainer.cfg.recipe)[1]
    assert "d_wrong_prompt" not in without and not pairs, "off: no pairs drawn, no term"


# --------------------------------------------------------------------------- LADD reference arm


def test_ladd_inputs_are_the_teachers_output_renoised(world, spies):
    trainer, student, disc = make_trainer(world, *LADD, "student.params=decoupled")
    perturb_lora(student)
    rc = trainer.cfg.recipe
    batch, cond = trainer._batch()
    with torch.no_grad():
        out = student_outputs(student, batch, cond, rc, gen(7))
        own = student.run(batch["noise"], cond)
    (n,) = out["input_noise"]
    assert torch.equal(n, torch.randn(batch["final"].shape, generator=gen(7))), "fresh noise, drawn first"
    sigma2 = student.cfg.sigmas[1]
    torch.testing.assert_close(out["states"][1], flow.add_noise(batch["final"], n, sigma2))
    assert torch.equal(out["states"][0], batch["noise"]), "step 1 still starts from the noise"
    assert not torch.allclose(out["states"][1], own["states"][1]), "not the student's own transition"
    with torch.no_grad():
        v = student.velocity(1, out["states"][1], student.step_sigma(1, n.shape[0]), cond)
    torch.testing.assert_close(out["x_hat"][1], flow.x0_from_velocity(out["states"][1], v, sigma2))

    # the D trains on every step's output; the G loss is adversarial only and reaches both parameter sets
    _, logs = discriminator_loss(student, disc, batch, batch["final"], cond, gen(7), rc=rc)
    assert logs["d_fake_batches"] == 2 and seen(spies, out["x_hat"][0]) and seen(spies, out["x_hat"][1])
    loss, g_logs, _ = generator_loss(student, disc, batch, cond, rc, gen(3))
    assert g_logs["g_reg"] == 0.0 and g_logs["g_total"] == pytest.approx(g_logs["g_adv"] + g_logs["g_step1"], rel=1e-5)
    loss.backward()
    for name, params in student.parameter_groups().items():
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), name


@pytest.mark.parametrize("extra,key", [
    (["recipe.end_to_end=true"], "recipe.end_to_end"),
    (["recipe.step1_loss=none"], "recipe.step1_loss"),
    (["recipe.adv_weight=0.0"], "recipe.adv_weight"),
])
def test_nonsense_recipes_name_the_key(extra, key):
    make_cfg(*LADD)  # the LADD arm as the lead sets it is valid
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        make_cfg(*LADD, *extra)


# --------------------------------------------------------------------------- DMD2 (issue 21)

DMD2 = ["recipe.kind=dmd2", "train.fake_steps_per_g=2", "train.warmup_steps=1", "train.g_lr=0.01"]


def make_dmd_trainer(world, *extra):
    from twostep.engine.train import Trainer
    from twostep.offline.distill import build_student, load_teacher_data

    cfg = make_cfg(*DMD2, *extra)
    student, disc, base = build_student(world["teacher"], cfg, for_training=True)
    data = load_teacher_data(base, cfg, world["data"])
    return Trainer(cfg, student, disc, data, base.prompt_table, None, str(world["root"] / "run")), student, disc


def assert_fake_score_is_the_teacher(trainer, student):
    """A fresh fake score (LoRA B = 0) predicts exactly what the frozen teacher does."""
    batch, cond = trainer._batch()
    x, sigma = batch["states"][:, 1], torch.full((len(cond),), 0.75)
    with torch.no_grad():
        with student.teacher() as teacher:
            v_teacher = teacher.velocity(x, sigma, cond)
        with student.fake_score() as fake:
            torch.testing.assert_close(fake.velocity(x, sigma, cond), v_teacher)


def test_kind_dmd2_is_dmd2_as_published_and_explicit_keys_win():
    from twostep.core.config import from_dict
    from twostep.engine.recipe import RecipeConfig

    turbo, dmd2 = RecipeConfig(), from_dict(RecipeConfig, {"kind": "dmd2"})
    assert (turbo.end_to_end, turbo.step1_loss, turbo.adv_weight, turbo.dmd_weight) == (True, "intermediate", 1.0,
                                                                                        0.0)
    assert (dmd2.end_to_end, dmd2.step1_loss, dmd2.adv_weight, dmd2.dmd_weight) == (False, "none", 0.0, 1.0)
    assert from_dict(RecipeConfig, {"kind": "dmd2", "adv_weight": 0.1}).adv_weight == 0.1  # DMD2 + GAN
    assert make_cfg("recipe.kind=dmd2", "recipe.step1_loss=final").recipe.step1_loss == "final", "set keys stay"
    with pytest.raises(ConfigError, match=r"recipe\.dmd_weight"):
        make_cfg("recipe.kind=dmd2", "recipe.dmd_weight=0")
    with pytest.raises(ConfigError, match=r"recipe\.dmd_sigma_max"):
        make_cfg("recipe.kind=dmd2", "recipe.dmd_sigma_min=0.9", "recipe.dmd_sigma_max=0.5")
    with pytest.raises(ConfigError, match=r"train\.fake_steps_per_g"):
        make_cfg("recipe.kind=dmd2", "train.fake_steps_per_g=0")


def test_dmd_outputs_are_every_step_in_backward_simulation_and_the_final_end_to_end():
    from twostep.engine.recipe import dmd_outputs

    assert dmd_outputs(make_cfg("recipe.kind=dmd2").recipe, 2) == [0, 1]
    assert dmd_outputs(make_cfg("recipe.kind=dmd2", "recipe.end_to_end=true").recipe, 2) == [1]
    assert dmd_outputs(make_cfg().recipe, 2) == [], "Turbo++ has no DMD term unless dmd_weight > 0"
    assert dmd_outputs(make_cfg("recipe.dmd_weight=0.5").recipe, 2) == [1]


def test_the_fake_score_starts_as_the_teacher_and_each_network_trains_apart(world):
    trainer, student, disc = make_dmd_trainer(world)
    fake_ids = {id(p) for p in student.fake_score_parameters()}
    assert fake_ids and not fake_ids & {id(p) for ps in student.parameter_groups().values() for p in ps}
    assert_fake_score_is_the_teacher(trainer, student)

    def snapshot():
        return {n: p.detach().clone() for n, p in [*student.named_parameters(), *disc.named_parameters()]}

    def moved(before):
        return {n for n, p in [*student.named_parameters(), *disc.named_parameters()] if not torch.equal(p, before[n])}

    before = snapshot()
    logs = trainer.fake_step(updates=1)
    names = {id(p): n for n, p in student.named_parameters()}
    fake_names = {names[i] for i in fake_ids}
    changed = moved(before)
    assert changed <= fake_names and {n for n in fake_names if "lora_B" in n} <= changed, "the fake score only"
    assert {"fake_score_loss", "fake_score_loss/step1"} <= logs.keys()  # backward simulation: both outputs
    before = snapshot()
    g_logs = trainer.g_step()
    changed = moved(before)
    assert changed and not changed & fake_names, "the generator update leaves the fake score"
    assert all(n in changed for ps in trainer.named_groups.values() for n, _ in ps if "lora_B" in n)
    assert {"dmd_loss", "dmd_loss/step1", "dmd_grad_norm", "dmd_real_fake_gap"} <= g_logs.keys()
    assert math.isfinite(g_logs["g_total"]) and g_logs["dmd_real_fake_gap"] > 0


def test_a_dmd2_trainer_state_resumes_its_fake_score_and_refuses_a_turbo_checkpoint(world):
    from twostep.core.errors import TwostepError

    trainer, student, _ = make_dmd_trainer(world)
    trainer.train_step()
    state = copy.deepcopy(trainer.state_dict())  # (the live one shares the optimisers' tensors)
    assert {"fake_score", "opt_f", "sched_f"} <= state.keys() and state["fake_score"]
    assert not any("fake_score" in n for n in state["student"]), "the student's weights exclude the fake score"
    fresh, fresh_student, _ = make_dmd_trainer(world)
    fresh.load_state_dict(state)
    own = dict(fresh_student.named_parameters())
    assert all(torch.equal(own[n], v) for n, v in state["fake_score"].items())
    a, b = trainer.train_step(), fresh.train_step()
    assert a["g_total"] == b["g_total"] and a["fake_score_total"] == b["fake_score_total"]
    turbo, _, _ = make_trainer(world)
    with pytest.raises(TwostepError, match="fake-score network"):
        turbo.load_state_dict(state)


def test_the_dmd_gradient_takes_the_teacher_as_real_and_the_fake_score_as_fake(world, monkeypatch):
    """The wiring of the distribution matching term: the callable handed to ``dmd_loss`` as the real score is the
    frozen teacher, the fake one the fake-score adapter (moved off the teacher here so that a swap shows), and the
    levels are drawn with ``dmd_sigma_shift``."""
    import twostep.engine.recipe as recipe
    from twostep.engine.recipe import clean_estimate, distribution_matching

    trainer, student, _ = make_dmd_trainer(world, "recipe.dmd_sigma_shift=3.0")
    with torch.no_grad():
        for p in student.fake_score_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen(1)))
    batch, cond, x_hats = d_batch(trainer, student)
    calls = []
    monkeypatch.setattr(recipe, "dmd_loss", lambda x, sigma, noise, real_x0, fake_x0: calls.append(
        (x, sigma, real_x0, fake_x0)) or (x.sum() * 0, {}))
    distribution_matching(student, x_hats, cond, trainer.cfg.recipe, gen(2))
    assert len(calls) == 2  # backward simulation: both outputs
    u = torch.rand(len(cond), generator=gen(2))  # the first draw of the same stream: the step-1 output's levels
    torch.testing.assert_close(calls[0][1], flow.shift_sigma(0.02 + 0.96 * u, 3.0))
    x, sigma, real_x0, fake_x0 = calls[-1]
    x_sigma = flow.add_noise(x, torch.randn(x.shape, generator=gen(3)), sigma)
    with torch.no_grad():
        with student.teacher() as teacher:
            expected_real = clean_estimate(teacher, x_sigma, sigma, cond)
        with student.fake_score() as fake:
            expected_fake = clean_estimate(fake, x_sigma, sigma, cond)
        assert not torch.allclose(expected_real, expected_fake, atol=1e-4)
        torch.testing.assert_close(real_x0(x_sigma, sigma), expected_real)
        torch.testing.assert_close(fake_x0(x_sigma, sigma), expected_fake)


def test_without_a_discriminator_the_generator_scores_no_output(world, spies):
    """Plain regression and DMD2 without its GAN train no discriminator: the generator step runs no teacher
    feature pass for an untrained head and logs no logit of one."""
    for extra in (["recipe.adv_weight=0", "recipe.step1_loss=none", "recipe.final_reg_weight=1.0"], []):
        trainer, student, _ = (make_trainer(world, *extra) if extra else make_dmd_trainer(world))
        spies["features"].clear()
        logs = trainer.g_step()
        assert spies["features"] == [] and not any(k.startswith("g_fake_logit") for k in logs), extra
        assert math.isfinite(logs["g_total"])


def test_the_fake_score_lora_takes_its_own_rank_at_the_students_scale(world):
    from twostep.engine.student import Student

    trainer, student, _ = make_dmd_trainer(world, "student.fake_score_rank=8")
    rank = trainer.cfg.student.lora_rank
    downs = [p for n, p in student.named_parameters() if f".{Student.FAKE_SCORE}." in n and "lora_A" in n]
    assert downs and all(p.shape[0] == 8 for p in downs) and rank != 8
    steps = [p for n, p in student.named_parameters() if ".step1." in n and "lora_A" in n]
    assert steps and all(p.shape[0] == rank for p in steps)
    layer = next(m for m in student.modules() if hasattr(m, "scaling") and Student.FAKE_SCORE in m.scaling)
    assert layer.scaling[Student.FAKE_SCORE] == pytest.approx(layer.scaling["step1"])  # alpha / rank, both
    assert_fake_score_is_the_teacher(trainer, student)
