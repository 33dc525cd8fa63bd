"""The bench's blocks of ``docs/results.md``: the tables, the pictures beside them and the generated reading."""

from __future__ import annotations

import os

from twostep.core.reports import update_section
from twostep.offline.bench.arms import SUITE_DEFAULT, SUITE_TITLES
from twostep.offline.bench.reading import (
    detail_reading,
    discriminator_health,
    mean_spread,
    reading,
    suite_reading,
    value_cell,
)


# A table column: (header, summary key, kind, decimals). Kinds: "seeds", the mean ± spread over seeds (a reference
# row shows its own value); "once", one measurement per arm (references: none).
GAP_COLUMNS = [("gap closure ↑", "gap_closure", "seeds", 3), ("FD real ↓", "fd_real", "seeds", 3),
               ("FD to teacher ↓", "fd_teacher", "seeds", 3)]
DETAIL_QUALITY = [("high-band ratio (→ 1)", "high_band_ratio", "seeds", 3), ("edge width px ↓", "edge_width", "seeds", 2)]
TRAIN_SECONDS = ("train s", "train_wall_s", "once", 0)
DIGITS_COLUMNS = [*GAP_COLUMNS, ("FD of x̂1 ↓", "fd_step1", "seeds", 3), ("class acc ↑", "class_accuracy", "seeds", 3),
                  ("diversity", "diversity", "seeds", 3), ("PSNR vs teacher", "psnr_vs_teacher", "seeds", 2),
                  TRAIN_SECONDS]
DETAIL_COLUMNS = [*GAP_COLUMNS, *DETAIL_QUALITY, ("class acc ↑", "class_accuracy", "seeds", 3),
                  ("PSNR vs teacher", "psnr_vs_teacher", "seeds", 2), ("D acc (end)", "final_d_accuracy", "once", 2),
                  ("D logit gap (end)", "final_d_logit_gap", "once", 2), TRAIN_SECONDS]
SUITE_COLUMNS = [*GAP_COLUMNS, *DETAIL_QUALITY, ("PSNR vs teacher", "psnr_vs_teacher", "seeds", 2),
                 ("D acc (end)", "final_d_accuracy", "once", 2), ("s / step ↓", "step_s", "once", 3),
                 ("memory MiB ↓", "memory_mib", "once", 1), ("of it activations", "activations_mib", "once", 1),
                 TRAIN_SECONDS]


def results_table(columns: list, references: dict[str, dict], summary: dict[str, dict]) -> list[str]:
    """A markdown table: one row per reference (its measured values; ``–`` where it has none), then one per arm."""
    lines = ["| arm | " + " | ".join(c[0] for c in columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, row in references.items():
        cells = [value_cell(row.get(key), p) if kind == "seeds" else "–" for _, key, kind, p in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, arm in summary.items():
        cells = [mean_spread(arm[key], p) if kind == "seeds" else value_cell(arm.get(key, (float("nan"),))[0], p)
                 for _, key, kind, p in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _reference_rows(refs: dict, keep) -> dict[str, dict]:
    return {name.replace("_", " "): row for name, row in refs.items() if keep(name)}


def bench_section(report: dict, command: str, images: dict[str, str]) -> str:
    if report.get("suite", SUITE_DEFAULT) != SUITE_DEFAULT:
        return suite_section(report, command, images)
    refs, world = report["references"], report.get("world", "digits")
    detail = world == "detail"
    minutes, bar_min = report["total_wall_s"] / 60, (90 if detail else 60)
    lines = [
        f"### Ablations on the {world} world (`twostep bench{' --world detail' if detail else ''}`)", "",
        f"Written by `{command}`; machine: {report['machine']}. Budget per arm: {report['bench']['steps']} "
        f"generator steps at batch {report['bench']['batch_size']}, {report['bench']['seeds']} seed(s), "
        f"{report['bench']['eval_samples']} evaluation samples (same noise and prompts for every arm)"
        + (f"; learning curves every {report['bench']['curve_every']} steps on {report['bench']['curve_samples']} "
           "samples" if report["bench"].get("curve_every") else "")
        + f". Whole bench: {minutes:.1f} min"
        + (f" (estimated: this invocation took {report['invocation_wall_s'] / 60:.1f} min and reused {report['reused_runs']} "
           f"finished runs of an earlier one, whose recorded training time is added per worker)"
           if report.get("reused_runs") else "")
        + ("" if report["quick"] else f" (bar: ≤ {bar_min} min — {'**met**' if minutes <= bar_min else '**NOT met**'})")
        + ".", "",
    ]
    if detail:
        references = _reference_rows(refs, lambda name: name != "real_floor")
        if "real_floor" in refs:
            references["real images (floor)"] = refs["real_floor"]
        lines += results_table(DETAIL_COLUMNS, references, report["summary"])
        lines += ["", "Same noise and prompts in every block (rows: classes; teacher 8 steps, naive 2 steps, each arm's "
                  "seed 0):", "", f"![samples per arm]({images['samples']})", "",
                  "Learning curves (mean over seeds; band: min..max) and the discriminator's health:", "",
                  f"![learning curves]({images['curves']})", "", "Reading (generated from the numbers above):", "",
                  *detail_reading(report["summary"])]
        chosen = report.get("defaults_arm")
        lines.append(f"- The shipped detail config (`{report.get('config')}`) is the arm `{chosen}`." if chosen else
                     f"- The shipped detail config (`{report.get('config')}`) matches none of these arms.")
        return "\n".join(lines)
    lines += results_table(DIGITS_COLUMNS, _reference_rows(refs, lambda name: name != "real_floor"), report["summary"])
    lines += ["", f"![gap closure per arm]({images['gap_closure']})", "", "Reading (generated from the numbers above):",
              "", *reading(report["summary"])]
    return "\n".join(lines)


def bench_images(out: str, world: str = "digits", suite: str = SUITE_DEFAULT) -> dict[str, str]:
    """The pictures a world's bench section shows, in its output folder, by kind."""
    kinds = ("curves", "samples") if world == "detail" or suite != SUITE_DEFAULT else ("gap_closure",)
    return {kind: os.path.join(out, f"{kind}.png") for kind in kinds}


def section_name(world: str, suite: str = SUITE_DEFAULT) -> str:
    """The marker of a bench's block in docs/results.md: ``bench``, ``bench-detail``, ``bench-detail-dmd2``."""
    name = "bench" if world == "digits" else f"bench-{world}"
    return name if suite == SUITE_DEFAULT else f"{name}-{suite}"


def write_bench_section(path: str, report: dict, command: str, out: str) -> None:
    """Rewrite this bench's block of ``path``; its pictures are copied next to it (``img/``)."""
    import shutil

    world, suite = report.get("world", "digits"), report.get("suite", SUITE_DEFAULT)
    image_dir = os.path.join(os.path.dirname(os.path.abspath(path)), "img")
    os.makedirs(image_dir, exist_ok=True)
    prefix = section_name(world, suite).replace("-", "_")
    rel = {}
    for kind, src in bench_images(out, world, suite).items():
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(image_dir, f"{prefix}_{kind}.png"))
            rel[kind] = f"img/{prefix}_{kind}.png"
    update_section(path, section_name(world, suite), bench_section(report, command, rel))


def suite_section(report: dict, command: str, images: dict[str, str]) -> str:
    """A suite's block (DMD2, the discriminator): every detail column, the price of a step in time and memory, and
    the paper's recipe against each other arm, metric by metric."""
    refs, bench, suite = report["references"], report["bench"], report["suite"]
    minutes = report["total_wall_s"] / 60
    lines = [
        f"### {SUITE_TITLES.get(suite, suite)} on the {report.get('world', 'detail')} world", "",
        f"Written by `{command}`; machine: {report['machine']}. Budget per arm: {bench['steps']} generator steps at "
        f"batch {bench['batch_size']}, {bench['seeds']} seed(s), {bench['eval_samples']} evaluation samples (same "
        "noise and prompts for every arm)"
        + (f"; learning curves every {bench['curve_every']} steps on {bench['curve_samples']} samples"
           if bench.get("curve_every") else "")
        + f". Whole bench: {minutes:.1f} min"
        + (f" (this invocation took {report['invocation_wall_s'] / 60:.1f} min and reused {report['reused_runs']} "
           "finished runs, whose recorded training time is added per worker)" if report.get("reused_runs") else "")
        + ". The price of a step is measured after training, every arm in one process one after the other on one "
          "thread: s / step is the median of 5 generator steps with their critic updates (discriminator, fake "
          "score); memory is the weights, gradients, optimiser and EMA state plus the peak of the activations "
          "autograd saves over two steps (`engine/memory.py`; on a GPU the allocator's peak measures the same). "
          "`train s` is each run's wall time, two runs at a time on a shared machine: read it as a rough total.", "",
        *results_table(SUITE_COLUMNS, _reference_rows(refs, lambda n: n != "real_floor" and "blurred" not in n),
                       report["summary"])]
    lines += ["", "Same noise and prompts in every block (rows: classes; teacher 8 steps, naive 2 steps, each arm's "
              "seed 0):", "", f"![samples per arm]({images.get('samples', '')})", "",
              "Learning curves (mean over seeds; band: min..max), the discriminator's and the fake score's health:",
              "", f"![learning curves]({images.get('curves', '')})", "", "Reading (generated from the numbers above; a "
              "quality difference counts only beyond the seeds' spread"
              + ("; with one seed there is no spread, so read every difference as indicative only" if bench["seeds"] < 2
                 else "") + "):", "", *suite_reading(report["summary"])]
    return "\n".join(lines + discriminator_health(report["summary"]))
