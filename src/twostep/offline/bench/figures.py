"""The bench's pictures: each arm's samples beside the teacher's, learning curves, gap closure per arm."""

from __future__ import annotations

import os

from twostep.core.reports import save_figure
from twostep.offline.bench.arms import ABLATIONS, CURVE_METRICS, DEFAULTS, FULL


def samples_grid(out: str, arm_images: dict, reference_images: dict, teacher) -> None:
    """Teacher 8-step, naive 2-step and each arm's final samples (seed 0), same noise: OUT/samples.png."""
    import torch

    from twostep.core.reports import save_image
    from twostep.offline.evaluate import comparison_grid

    blocks = {name.replace("_", " "): imgs for name, imgs in reference_images.items()}
    blocks.update(arm_images)
    n = min(len(v) for v in blocks.values())
    blocks = {k: v[:n] for k, v in blocks.items()}
    labels = torch.arange(n) % teacher.num_classes
    save_image(comparison_grid(blocks, labels, per_prompt=3, class_names=teacher.world.class_names),
               os.path.join(out, "samples.png"))


def plot_curves(runs: dict[str, list[dict]], path: str) -> None:
    """One panel per metric, one line per arm (mean over seeds) with a band spanning the seeds' min..max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    titles = {"gap_closure": "gap closure (FD, 500 samples) ↑", "high_band_ratio": "high-band ratio vs teacher-8 → 1",
              "d_accuracy": "discriminator accuracy", "d_logit_gap": "D real − fake logit",
              "fake_score_loss": "fake score: flow-matching loss", "dmd_real_fake_gap": "DMD: |x̂0 fake − x̂0 real|"}
    present = [m for m in CURVE_METRICS if any(m in r["curves"] for rs in runs.values() for r in rs)]
    fig, axes = plt.subplots(1, len(present), figsize=(4.6 * len(present), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], present):
        for i, (name, rs) in enumerate(runs.items()):
            series = [r["curves"].get(metric, []) for r in rs]
            if not all(series):
                continue
            length = min(len(s) for s in series)
            steps = np.array([p[0] for p in series[0][:length]])
            values = np.array([[p[1] for p in s[:length]] for s in series])
            if metric not in ("gap_closure", "high_band_ratio") and length > 8:  # logged every few steps: smoothed
                kernel = np.ones(5) / 5
                values = np.stack([np.convolve(v, kernel, mode="valid") for v in values])
                steps = steps[2:-2]
            color = f"C{i}"
            ax.plot(steps, values.mean(0), color=color, label=name, lw=1.5)
            ax.fill_between(steps, values.min(0), values.max(0), color=color, alpha=0.2)
        ax.set_title(titles[metric], fontsize=10)
        ax.set_xlabel("generator step")
        ax.grid(alpha=0.3)
        if metric == "high_band_ratio":
            ax.axhline(1.0, color="black", lw=0.8, ls="--")
        if metric == "d_accuracy":
            ax.axhline(0.5, color="black", lw=0.8, ls="--")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def plot_gap_closure(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    means = [summary[n]["gap_closure"][0] for n in names]
    stds = [summary[n]["gap_closure"][1] for n in names]
    fig, ax = plt.subplots(figsize=(10, 3.8))
    colors = ["tab:green" if n == FULL else "tab:purple" if n == DEFAULTS else ("tab:red" if n in ABLATIONS else
              "tab:blue") for n in names]
    ax.bar(range(len(names)), means, yerr=stds, capsize=4, color=colors)
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.axhline(0.0, color="gray", lw=0.8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("gap closure (mean ± std over seeds)")
    fig.tight_layout()
    save_figure(fig, path)
