"""`twostep bench --quick`: the whole ablation table is produced (smoke test, part of `make test`)."""

import json
import math
import os

import pytest

from twostep.cli import main
from twostep.offline.bench.arms import ABLATIONS, ARMS, DEFAULTS, DMD2, FULL, REGRESSION
from twostep.offline.bench.reading import reading


# `make test` runs these arms (the paper's recipe, the defaults, the regression reference and an ablation the
# reading judges); the every-arm runs are slow-marked (`make bench`), and every arm's config is checked either way
DIGITS_SUBSET = [FULL, DEFAULTS, REGRESSION, "real_source=data"]
DETAIL_SUBSET = [FULL, REGRESSION]


def _arm_flags(arms):
    return [flag for arm in arms for flag in ("--arm", arm)]


def test_every_arm_of_every_world_is_a_valid_config_that_changes_the_recipe():
    from twostep.offline.bench.arms import WORLD_BENCHES, arm_overrides
    from twostep.core.config import load_config, to_dict
    from twostep.core.packaged_configs import resolve_config
    from twostep.offline.distill import DistillConfig

    for world, spec in WORLD_BENCHES.items():
        path = resolve_config(spec.config)
        full = to_dict(load_config(DistillConfig, path, arm_overrides(FULL)))
        for arm in {*spec.arms, *(a for arms in spec.suites.values() for a in arms)}:
            cfg = to_dict(load_config(DistillConfig, path, arm_overrides(arm)))
            assert cfg["teacher"]["world"] == world
            assert arm in (FULL, DEFAULTS) or cfg != full, f"{world}: arm {arm!r} changes nothing"


@pytest.mark.parametrize("arms", [pytest.param(DIGITS_SUBSET, id="subset"),
                                  pytest.param(list(ARMS), id="every-arm", marks=pytest.mark.slow)])
def test_bench_quick_produces_the_table_and_plot(tmp_path, capsys, arms):
    out, results = str(tmp_path / "bench"), tmp_path / "docs" / "results.md"
    results.parent.mkdir()
    results.write_text("# Results\n\nhand-written text stays\n")
    assert main(["bench", "--quick", "--steps", "2", *_arm_flags(arms), "--out", out, "--results", str(results)]) == 0
    report = json.load(open(os.path.join(out, "results.json")))
    assert set(report["runs"]) == set(arms)
    import yaml

    full = yaml.safe_load(open(os.path.join(out, "arms", "full_recipe", "seed0", "config.yaml")))
    assert (full["train"]["d_warmup_steps"], full["recipe"]["adv_ramp_steps"]) == (1, 2)  # --quick's, not PAPER's
    assert full["discriminator"]["r1"] == "approx" and full["recipe"]["real_source"] == "teacher"  # PAPER's rest
    for runs in report["runs"].values():
        assert all(math.isfinite(r["fd_real"]) and math.isfinite(r["fd_step1"]) for r in runs)
    text = results.read_text()
    assert "hand-written text stays" in text and "twostep:bench:begin" in text and "twostep bench --quick --steps 2" in text
    for arm in arms:
        assert f"| {arm} |" in text, arm
    assert "| teacher 8 |" in text and "| teacher naive 2 |" in text
    assert (results.parent / "img" / "bench_gap_closure.png").stat().st_size > 1000
    assert "Reading (generated" in text


def test_reading_compares_against_the_spread():
    summary = {"full recipe": {"gap_closure": (0.9, 0.02)},
               "real_source=data": {"gap_closure": (0.5, 0.05)},
               "params=shared": {"gap_closure": (0.89, 0.05)},
               "end_to_end=false": {"gap_closure": (1.0, 0.01)}}
    lines = dict(zip([a for a in ABLATIONS if a in summary], reading(summary)))
    assert "reproduces" in lines["real_source=data"] and "NOT" not in lines["real_source=data"]
    assert "not distinguishable" in lines["params=shared"]
    assert "does NOT reproduce" in lines["end_to_end=false"]


def test_arms_are_relative_to_the_papers_recipe_and_defaults_are_the_config():
    from twostep.offline.bench.arms import PAPER, arm_overrides
    from twostep.core.config import load_config
    from twostep.offline.distill import DistillConfig

    paper = load_config(DistillConfig, None, arm_overrides(FULL))
    assert (paper.student.params, paper.recipe.step1_loss, paper.recipe.final_reg_weight) == ("decoupled",
                                                                                            "intermediate", 0.0)
    assert arm_overrides(DEFAULTS) == [] and arm_overrides("params=shared")[:len(PAPER)] == PAPER
    summary = {FULL: {"gap_closure": (0.6, 0.05)}, DEFAULTS: {"gap_closure": (0.8, 0.02)}}
    assert "better than the paper's recipe (+0.200)" in reading(summary)[-1]


@pytest.mark.parametrize("arms", [pytest.param(DETAIL_SUBSET, id="subset"),
                                  pytest.param(None, id="every-arm", marks=pytest.mark.slow)])
def test_detail_bench_quick_writes_curves_samples_and_reading(tmp_path, arms):
    """`twostep bench --world detail --quick`: the arms run, with curves, D health and calibration rows."""
    from twostep.offline.bench.arms import WORLD_BENCHES

    arms = arms or WORLD_BENCHES["detail"].arms
    out, results = str(tmp_path / "bench"), tmp_path / "results.md"
    assert main(["bench", "--world", "detail", "--quick", "--steps", "2", *_arm_flags(arms), "--out", out,
                 "--results", str(results)]) == 0
    report = json.load(open(os.path.join(out, "results.json")))
    assert report["world"] == "detail" and set(report["runs"]) == set(arms)
    for name, runs in report["runs"].items():
        run = runs[0]
        assert math.isfinite(run["high_band_ratio"]) and run["curves"]["gap_closure"], name
        if name != "regression only":  # pure regression trains no discriminator
            assert run["curves"]["d_accuracy"], name
    assert any("blurred_0.5px" in k for k in report["references"])
    text = results.read_text()
    assert "twostep:bench-detail:begin" in text and "high-band ratio" in text
    assert "regression only" in text and "Reading (generated" in text
    for image in ("bench_detail_curves.png", "bench_detail_samples.png"):
        assert (tmp_path / "img" / image).stat().st_size > 1000
    if arms != DETAIL_SUBSET:
        return
    # the DMD2 suite in the same folder: the paper's arm is reused, DMD2's arms train, each arm's step is priced
    assert main(["bench", "--world", "detail", "--suite", "dmd2", "--quick", "--steps", "2", "--out", out,
                 *_arm_flags([FULL, DMD2]), "--results", str(results)]) == 0
    report = json.load(open(os.path.join(out, "results.json")))
    assert report["suite"] == "dmd2" and report.get("reused_runs") == 1
    for name in (FULL, DMD2):
        run = report["runs"][name][0]
        assert run["step_s"] > 0 and run["memory_mib"] > run["activations_mib"] > 0, name
    assert report["runs"][DMD2][0]["curves"]["fake_score_loss"] and "d_accuracy" not in report["runs"][DMD2][0]["curves"]
    text = results.read_text()
    assert "twostep:bench-detail:begin" in text, "the ablation block stays"
    block = text.split("twostep:bench-detail-dmd2:begin")[1]
    assert "s / step" in block and f"**`{FULL}` vs `{DMD2}`**" in block and "decide a distillation" in block
    assert (tmp_path / "img" / "bench_detail_dmd2_curves.png").stat().st_size > 1000


def test_detail_reading_compares_recipe_and_regression_beyond_the_spread():
    from twostep.offline.bench.reading import detail_reading

    summary = {FULL: {"gap_closure": (0.9, 0.02), "high_band_ratio": (0.95, 0.02), "final_d_accuracy": (0.7, 0),
                      "fd_teacher": (2.0, 0.1)},
               REGRESSION: {"gap_closure": (0.7, 0.02), "high_band_ratio": (0.6, 0.03),
                            "final_d_accuracy": (float("nan"), 0), "fd_teacher": (0.5, 0.1)}}
    lines = detail_reading(summary)
    assert "**beats** regression only" in lines[0] and "**beats** regression only" in lines[2]
    assert "**loses to** regression only" in lines[1]  # FD to the teacher: regression imitates it more closely
    summary["params=shared"] = {"gap_closure": (0.8, 0.01), "high_band_ratio": (0.9, 0.01), "fd_teacher": (3.0, 0.1),
                                "final_d_accuracy": (0.6, 0)}
    shared = [line for line in detail_reading(summary) if line.startswith("- `params=shared`")][0]
    assert "lower than the paper's recipe" in shared and "further from the teacher" in shared
    summary[REGRESSION]["gap_closure"] = (0.89, 0.05)
    assert "does **not** differ from" in detail_reading(summary)[0]


def test_suite_reading_names_wins_losses_and_ties_beyond_the_spread():
    from twostep.offline.bench.reading import suite_reading

    base = {"gap_closure": (1.0, 0.01), "fd_teacher": (2.0, 0.2), "high_band_ratio": (0.99, 0.01),
            "edge_width": (1.4, 0.02), "psnr_vs_teacher": (23.0, 0.1), "step_s": (1.0, 0.0), "memory_mib": (100, 0)}
    rival = {**base, "fd_teacher": (1.0, 0.1), "high_band_ratio": (0.90, 0.01), "step_s": (4.0, 0.0),
             "memory_mib": (103, 0)}
    lines = suite_reading({FULL: base, DMD2: rival})
    wins, losses, ties, verdict = lines[1], lines[2], lines[3], lines[4]
    assert "high-band ratio" in wins and "time per generator step" in wins
    assert "FD to the teacher" in losses
    assert "gap closure" in ties and "training memory" in ties  # memory within 5 %: one measurement per arm
    assert "ahead of the paper's recipe beyond the spread on 1 of 2" in verdict and "behind on 1 of 2" in verdict


def test_a_variant_is_read_against_the_arm_it_changes():
    from twostep.offline.bench.arms import VARIANT_OF
    from twostep.offline.bench.reading import suite_reading

    variant = next(v for v, base in VARIANT_OF.items() if base == DMD2)
    base = {"fd_teacher": (40.0, 5.0), "high_band_ratio": (1.22, 0.01)}
    lines = suite_reading({FULL: {"fd_teacher": (2.0, 0.5), "high_band_ratio": (0.99, 0.01)}, DMD2: base,
                           variant: {"fd_teacher": (30.0, 4.0), "high_band_ratio": (1.225, 0.01)}})
    (line,) = [line for line in lines if line.startswith(f"- **`{variant}` vs `{DMD2}`**")]
    assert f"FD to the teacher's 8-step samples 30.000 ± 4.000, better than `{DMD2}`'s" in line
    assert f"within the spread of `{DMD2}`'s 1.220 ± 0.010" in line  # 0.005 farther from 1: within ±0.01


def test_discriminator_accuracy_is_reported_as_a_measurement_not_as_a_win_or_loss():
    from twostep.offline.bench.reading import discriminator_health, suite_reading

    base = {"gap_closure": (1.0, 0.0), "fd_teacher": (2.0, 0.0), "final_d_accuracy": (0.56, 0.0)}
    summary = {FULL: base, DMD2: {**base, "final_d_accuracy": (0.71, 0.0)},
               REGRESSION: {**base, "final_d_accuracy": (float("nan"), 0.0)}}
    assert not any("iscriminator" in line for line in suite_reading(summary))
    (health,) = discriminator_health(summary)
    assert f"`{FULL}` 0.56" in health and f"`{DMD2}` 0.71" in health and REGRESSION not in health
