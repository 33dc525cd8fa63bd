"""The bench's generated readings: which claims reproduce, and where one arm beats another. A difference counts
only beyond the seeds' spread (the larger of the two arms' standard deviations over seeds)."""

from __future__ import annotations

import math

from twostep.offline.bench.arms import ABLATIONS, ARMS, DEFAULTS, FULL, REGRESSION, VARIANT_OF


def reading(summary: dict) -> list[str]:
    """Which claims reproduce: an ablation differs from the full recipe only beyond the seeds' spread."""
    if FULL not in summary:
        return [f"- The paper's recipe (`{FULL}`) was not among the arms run; nothing to compare against."]
    full_mean, full_std = summary[FULL]["gap_closure"]
    lines = []
    for name in ABLATIONS:
        if name not in summary:
            continue
        mean, std = summary[name]["gap_closure"]
        margin = max(full_std, std)
        delta = full_mean - mean
        if delta > margin:
            verdict = f"reproduces: the full recipe closes {delta:.3f} more of the gap"
        elif delta < -margin:
            verdict = f"does NOT reproduce: removing it closes {-delta:.3f} more of the gap"
        else:
            verdict = f"not distinguishable here (difference {delta:+.3f} within the spread ±{margin:.3f})"
        lines.append(f"- {ARMS[name][1]} (`{name}`): {verdict}.")
    ranked = sorted(((v["gap_closure"][0], n) for n, v in summary.items() if math.isfinite(v["gap_closure"][0])),
                    reverse=True)
    if ranked:
        best_mean, best = ranked[0]
        best_std = summary[best]["gap_closure"][1]
        tie = best == FULL or best_mean - full_mean <= max(best_std, full_std)
        lines.append(f"- Highest mean gap closure: `{best}` ({best_mean:.3f} ± {best_std:.3f}); "
                     + ("not better than the paper's recipe beyond the spread." if tie else
                        "better than the paper's recipe beyond the spread."))
    if DEFAULTS in summary:
        mean, std = summary[DEFAULTS]["gap_closure"]
        delta = mean - full_mean
        margin = max(std, full_std)
        verdict = ("better than" if delta > margin else "worse than" if delta < -margin else "not distinguishable from")
        lines.append(f"- The shipped defaults (`{DEFAULTS}`): {mean:.3f} ± {std:.3f}, {verdict} the paper's recipe "
                     f"({delta:+.3f}).")
    return lines


def compare(summary: dict, a: str, b: str, metric: str, higher_is_better: bool = True) -> tuple[str, float, float]:
    """``better`` / ``worse`` / ``tie`` for arm ``a`` against arm ``b`` on ``metric``, beyond the seeds' spread."""
    (ma, sa), (mb, sb) = summary[a][metric], summary[b][metric]
    delta = (ma - mb) if higher_is_better else (mb - ma)
    margin = max(sa, sb)
    return ("better" if delta > margin else "worse" if delta < -margin else "tie"), delta, margin


def detail_reading(summary: dict) -> list[str]:
    """The detail world's questions: does the GAN recipe beat plain regression on FD and on detail, and which
    component matters. Same rule as :func:`reading`: a difference counts only beyond the seeds' spread."""
    lines = []
    if FULL in summary and REGRESSION in summary:
        for metric, label, higher in (("gap_closure", "gap closure (FD to held-out real)", True),
                                      ("fd_teacher", "FD to the teacher's 8-step samples (lower is better)", False),
                                      ("high_band_ratio", "high-band ratio (|1 − r|, detail)", None)):
            if metric == "high_band_ratio":  # closeness to the teacher's detail: 1.0 is best, over-sharpening too
                dist = {n: ((abs(1 - v[metric][0])), v[metric][1]) for n, v in summary.items() if metric in v}
                verdict, delta, margin = compare({n: {metric: d} for n, d in dist.items()}, FULL, REGRESSION, metric,
                                                 higher_is_better=False)
            else:
                verdict, delta, margin = compare(summary, FULL, REGRESSION, metric, higher_is_better=higher)
            word = {"better": "**beats**", "worse": "**loses to**", "tie": "does **not** differ from"}[verdict]
            lines.append(f"- On {label}, the paper's recipe ({mean_spread(summary[FULL][metric])}) {word} regression only "
                         f"({mean_spread(summary[REGRESSION][metric])}); difference {delta:+.3f}, spread ±{margin:.3f}.")
    for name in [n for n in summary if n not in (FULL, REGRESSION)]:
        if FULL not in summary:
            break
        verdict, delta, margin = compare(summary, name, FULL, "gap_closure")
        word = {"better": "higher than", "worse": "lower than", "tie": "within the spread of"}[verdict]
        t_verdict, t_delta, _ = compare(summary, name, FULL, "fd_teacher", higher_is_better=False)
        t_word = {"better": "closer to", "worse": "further from", "tie": "as close to"}[t_verdict]
        lines.append(f"- `{name}` ({ARMS[name][1]}): gap closure {mean_spread(summary[name]['gap_closure'])}, {word} the "
                     f"paper's recipe ({delta:+.3f}); FD to the teacher {mean_spread(summary[name]['fd_teacher'])}, {t_word} "
                     f"the teacher than the paper's recipe; high-band ratio {mean_spread(summary[name]['high_band_ratio'])}.")
    lines += discriminator_health({n: v for n, v in summary.items() if n != REGRESSION})
    ranked = sorted(((v["gap_closure"][0], n) for n, v in summary.items() if math.isfinite(v["gap_closure"][0])),
                    reverse=True)
    if ranked:
        lines.append(f"- Highest mean gap closure: `{ranked[0][1]}` ({mean_spread(summary[ranked[0][1]]['gap_closure'])}).")
    return lines


def value_cell(value, p: int = 3) -> str:
    """A table cell: the value, or a dash when there is none."""
    return "–" if value is None or not math.isfinite(value) else f"{value:.{p}f}"


def mean_spread(ms, p: int = 3) -> str:
    return f"{ms[0]:.{p}f} ± {ms[1]:.{p}f}"


# the measures of the DMD2 comparison: (summary key, label, direction): True = higher is better, False = lower,
# "one" = closest to 1 (the teacher's detail)
DMD2_MEASURES = [("gap_closure", "gap closure (FD to held-out real)", True),
                 ("fd_teacher", "FD to the teacher's 8-step samples", False),
                 ("high_band_ratio", "high-band ratio (detail; 1 = the teacher's)", "one"),
                 ("edge_width", "edge width (px)", False),
                 ("psnr_vs_teacher", "PSNR to the teacher, same noise", True),
                 ("step_s", "time per generator step", False),
                 ("memory_mib", "training memory per step", False)]


def _versus(summary: dict, a: str, b: str, metric: str, direction) -> tuple[str, float, float]:
    """:func:`compare` for ``a`` against ``b``; ``direction == "one"`` compares the distance to 1."""
    if direction == "one":
        dist = {n: {metric: (abs(1 - summary[n][metric][0]), summary[n][metric][1])} for n in (a, b)}
        return compare(dist, a, b, metric, higher_is_better=False)
    return compare(summary, a, b, metric, higher_is_better=direction)


def suite_reading(summary: dict) -> list[str]:
    """Metric by metric: where the paper's recipe beats each other arm, where it loses, and whether the difference
    exceeds the seeds' spread (time and memory: beyond 5 %, they are one measurement per arm)."""
    lines = []
    if FULL not in summary:
        return [f"- The paper's recipe (`{FULL}`) was not among the arms run; nothing to compare against."]
    fidelity = {"fd_teacher", "high_band_ratio"}
    for rival in [n for n in summary if n != FULL]:
        wins, losses, ties = [], [], []
        for metric, label, direction in DMD2_MEASURES:
            if metric not in summary[FULL] or metric not in summary[rival]:
                continue
            if not (math.isfinite(summary[FULL][metric][0]) and math.isfinite(summary[rival][metric][0])):
                continue
            verdict, delta, margin = _versus(summary, FULL, rival, metric, direction)
            if metric in ("step_s", "memory_mib"):  # one measurement per arm: no ±, under 5 % is a tie
                scale = abs(summary[rival][metric][0]) or 1.0
                verdict = "tie" if abs(delta) <= 0.05 * scale else verdict
                text = f"{label}: {value_cell(summary[FULL][metric][0])} vs {value_cell(summary[rival][metric][0])}"
            else:
                text = (f"{label}: {mean_spread(summary[FULL][metric])} vs {mean_spread(summary[rival][metric])} "
                        f"(spread ±{margin:.3f})")
            {"better": wins, "worse": losses, "tie": ties}[verdict].append(text)
        lines.append(f"- **`{FULL}` vs `{rival}`** ({ARMS[rival][1]}):")
        lines.append("  - the paper's recipe wins on " + ("; ".join(wins) if wins else "nothing") + ".")
        lines.append("  - it loses on " + ("; ".join(losses) if losses else "nothing") + ".")
        lines.append("  - within the spread: " + ("; ".join(ties) if ties else "nothing") + ".")
        ahead = [label for m, label, d in DMD2_MEASURES if m in fidelity and m in summary[rival]
                 and _versus(summary, FULL, rival, m, d)[0] == "worse"]
        behind = [label for m, label, d in DMD2_MEASURES if m in fidelity and m in summary[rival]
                  and _versus(summary, FULL, rival, m, d)[0] == "better"]
        lines.append(f"  - on the measures that decide a distillation (FD to the teacher, high-band ratio): `{rival}` "
                     f"is ahead of the paper's recipe beyond the spread on {len(ahead)} of 2"
                     + (f" ({'; '.join(ahead)})" if ahead else "") + f", behind on {len(behind)} of 2"
                     + (f" ({'; '.join(behind)})" if behind else "") + ".")
    return lines + variant_reading(summary)


def variant_reading(summary: dict) -> list[str]:
    """Each variant of an arm (``VARIANT_OF``) against that arm on the measures that decide a distillation: did
    its one change help, beyond the seeds' spread?"""
    lines = []
    words = {"better": "better than", "worse": "worse than", "tie": "within the spread of"}
    for variant, base in VARIANT_OF.items():
        if variant not in summary or base not in summary:
            continue
        parts = []
        for metric, label, direction in DMD2_MEASURES:
            if metric in ("fd_teacher", "high_band_ratio") and metric in summary[variant]:
                verdict, _, margin = _versus(summary, variant, base, metric, direction)
                parts.append(f"{label} {mean_spread(summary[variant][metric])}, {words[verdict]} `{base}`'s "
                             f"{mean_spread(summary[base][metric])} (spread ±{margin:.3f})")
        lines.append(f"- **`{variant}` vs `{base}`** (its one change): " + "; ".join(parts) + ".")
    return lines


def discriminator_health(summary: dict) -> list[str]:
    """The discriminator's accuracy at the end of each arm that has one, stated as a measurement and not a verdict:
    a stronger critic is a means, and whether it helped is what the quality measures above say."""
    health = [f"`{n}` {v['final_d_accuracy'][0]:.2f}" for n, v in summary.items()
              if math.isfinite(v.get("final_d_accuracy", (float("nan"),))[0])]
    return (["- Discriminator accuracy over the last fifth of training (0.5 = chance): " + ", ".join(health) + "."]
            if health else [])
