"""What ``twostep evaluate`` writes for people and scripts: ``report.md``, ``report.html`` (the demo report's style;
its images are the PNG files in ``grids/`` beside it, so it opens from the folder with no server),
``metrics.json`` and ``grids/sample_NNNNN.png``.

Each grid shows one sample: the prompt, then teacher (8 steps) | naive teacher (2 steps) | student (2 steps) from
the same noise, and under each image the same centre crop enlarged with nearest-neighbour pixels, where blur
cannot hide.
"""

from __future__ import annotations

import html
import json
import os

from twostep.core.utils import write_text
from twostep.real.evaluation.sampling import SAMPLERS

METRICS = "metrics.json"

# which library computes each metric (docs/zimage.md shows the same table)
METRIC_SOURCES = {
    "clip_score": "transformers CLIPModel embeddings; torchmetrics CLIPScore's formula, max(mean 100·cos, 0) "
                  "(torchmetrics 1.9's CLIPScore class itself fails on transformers 5's feature outputs)",
    "preference": "PickScore through transformers CLIPModel: exp(logit_scale)·cos(image, prompt)",
    "fd_dino / fd_clip": "torchmetrics FrechetInceptionDistance with a pass-through feature module on DINOv2 "
                         "(transformers Dinov2Model, CLS feature) or CLIP image embeddings",
    "kid_dino / kid_clip": "torchmetrics KernelInceptionDistance, same features (cubic polynomial kernel, unbiased)",
    "psnr": "torchmetrics peak_signal_noise_ratio, per image against the teacher on the same noise",
    "ssim": "torchmetrics structural_similarity_index_measure (Gaussian 11x11, sigma 1.5), per image",
    "sharpness_ratio": "twostep: the detail world's high-band spectral energy (worlds/detail/evaluator.py, "
                       "above 0.25 cycles/px) over the teacher's",
    "seconds_per_image": "twostep: wall time of the pipeline's denoising loop per image (batch 1, prompt embedding "
                         "given), median, all samplers in one process; decoding is timed separately",
}

# (key, header, format); "→ teacher" columns are paired or distributional distances to the 8-step teacher
COLUMNS = [
    ("steps", "steps", "{:d}"),
    ("seconds_per_image", "s / image", "{:.3f}"),
    ("clip_score", "CLIP score ↑", "{:.2f}"),
    ("preference", "preference ↑", "{:.3f}"),
    ("fd_dino", "FD-DINOv2 → teacher ↓", "{:.3f}"),
    ("kid_dino", "KID-DINOv2 → teacher ↓", "{:.4f}"),
    ("fd_clip", "FD-CLIP → teacher ↓", "{:.3f}"),
    ("kid_clip", "KID-CLIP → teacher ↓", "{:.4f}"),
    ("psnr", "PSNR → teacher (dB) ↑", "{:.2f}"),
    ("ssim", "SSIM → teacher ↑", "{:.3f}"),
    ("sharpness_ratio", "sharpness vs teacher", "{:.3f}"),
    ("fd_dino_real", "FD-DINOv2 → real ↓", "{:.3f}"),
    ("kid_dino_real", "KID-DINOv2 → real ↓", "{:.4f}"),
    ("fd_clip_real", "FD-CLIP → real ↓", "{:.3f}"),
    ("kid_clip_real", "KID-CLIP → real ↓", "{:.4f}"),
]
TO_TEACHER = {"fd_dino", "kid_dino", "fd_clip", "kid_clip", "psnr", "ssim"}

READING = [
    "Each row is one sampler on the same prompts and the same starting noise: the teacher as users run it, the same "
    "teacher cut to the student's steps (what distillation must beat), and the student.",
    "→ teacher: FD and KID compare the *distribution* of images with the teacher's (lower is closer; KID is unbiased "
    "and the one to trust on small sets, FD grows with fewer samples); PSNR and SSIM compare each image with the "
    "teacher's image from the same noise (higher is closer). A good student sits near the teacher and well past the "
    "naive row.",
    "CLIP score (prompt alignment) and preference (PickScore, a human-preference proxy) are absolute: compare them "
    "with the teacher's row.",
    "Sharpness is the high-band spectral energy over the teacher's: 1 = as much fine detail, below 1 = blurrier "
    "(the usual 2-step failure); far above 1 can be noise or artefacts, so look at the zoomed crops.",
    "Absolute values depend on the metric models, the resolution and the number of samples: compare runs only "
    "with the same prompt set, resolution and models.",
]


def _cell(name: str, key: str, row: dict, fmt: str) -> str:
    if name == "teacher" and key in TO_TEACHER:
        return "reference"
    value = row.get(key)
    if value is None:
        return "—"
    return fmt.format(value)


def metrics_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """``(header, rows)`` of the metrics table: one row per sampler, columns that any sampler has."""
    samplers = result["samplers"]
    columns = [(k, h, f) for k, h, f in COLUMNS if any(samplers[n].get(k) is not None for n in SAMPLERS)]
    header = ["sampler"] + [h for _, h, _ in columns]
    rows = [[samplers[n]["label"]] + [_cell(n, k, samplers[n], f) for k, _, f in columns] for n in SAMPLERS]
    return header, rows


def md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in r] for r in [header, *rows]]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in esc[1:]])


def html_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in header) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows]
    return "\n".join(out) + "</table>"


# --------------------------------------------------------------------------- grids

CELL_MIN, CELL_MAX = 128, 384  # px a grid image is shown at


def zoom_box(resolution: int) -> tuple[int, int, int, int]:
    """The centre crop the grids enlarge: an eighth of the side (at least 8 px)."""
    side = max(8, resolution // 8)
    left = (resolution - side) // 2
    return left, left, left + side, left + side


def comparison_grid(prompt: str, images: dict, labels: dict[str, str]):
    """One sample as a PIL image: the prompt, then per sampler its image (scaled to 128..384 px) over its centre
    crop enlarged with nearest-neighbour pixels. ``images``: ``{sampler: uint8 (3, H, W)}``."""
    from PIL import Image, ImageDraw, ImageFont

    from twostep.real.preview import wrap_text

    side = images["teacher"].shape[-1]
    cell = min(CELL_MAX, max(CELL_MIN, side))
    font = ImageFont.load_default(size=14)
    pad, line_h = 6, 18
    lines = wrap_text(prompt, font, len(SAMPLERS) * (cell + pad) - pad, 3)
    top = pad + line_h * (len(lines) + 1)
    grid = Image.new("RGB", (pad + len(SAMPLERS) * (cell + pad), top + 2 * cell + 2 * pad + line_h), "white")
    draw = ImageDraw.Draw(grid)
    for j, line in enumerate(lines):
        draw.text((pad, pad + j * line_h), line, fill="black", font=font)
    box = zoom_box(side)
    zoom = cell / (box[2] - box[0])
    for i, name in enumerate(SAMPLERS):
        image = Image.fromarray(images[name].permute(1, 2, 0).numpy())
        x = pad + i * (cell + pad)
        draw.text((x, pad + len(lines) * line_h), labels[name], fill="black", font=font)
        full = image.resize((cell, cell), Image.LANCZOS if side > cell else Image.NEAREST)
        grid.paste(full, (x, top))
        grid.paste(image.crop(box).resize((cell, cell), Image.NEAREST), (x, top + cell + pad))
    draw.text((pad, top + 2 * cell + 2 * pad), f"bottom row: centre crop {box[2] - box[0]} px, enlarged {zoom:.0f}x "
              "(nearest neighbour)", fill="black", font=font)
    return grid


def _grid_name(sample: int) -> str:
    return f"grids/sample_{sample:05d}.png"


# --------------------------------------------------------------------------- the report


def write_report(plan, result: dict, sample_images) -> str:
    """``metrics.json``, the grids, ``report.md`` and ``report.html`` in ``plan.out``; returns the HTML's path.
    ``sample_images(plan, samples)`` yields ``(sample, {sampler: uint8 (3, H, W)})`` for the grids."""
    from twostep.core.reports import save_image

    out = plan.out
    shown = list(range(min(plan.cfg.grids or len(plan.prompts), len(plan.prompts), plan.num_samples)))  # p: prompt p
    worst = result["worst_prompts"]
    wanted = sorted(set(shown) | {w["sample"] for w in worst})
    labels = plan.labels(short=True)
    for s, images in sample_images(plan, wanted):
        save_image(comparison_grid(plan.prompts[s % len(plan.prompts)], images, labels),
                   os.path.join(out, _grid_name(s)))
    result["grids"] = {str(s): _grid_name(s) for s in wanted}
    write_text(os.path.join(out, METRICS), json.dumps(result, indent=2, ensure_ascii=False) + "\n")

    header, rows = metrics_rows(result)
    student, teacher = result["samplers"]["student"], result["samplers"]["teacher"]
    speed = (f"Speed: the student's {student['steps']} steps take {student['seconds_per_image']:.3f} s per image, the "
             f"teacher's {teacher['steps']} steps {teacher['seconds_per_image']:.3f} s: "
             f"{result['speedup']:.2f}x faster (denoising loop, median per image, timed while the shards were "
             f"sampled, on {result['provenance_device']}, all in one pipeline: the student's time includes its "
             f"per-step adapter switch, the teacher rows run with the adapters disabled; the VAE decode adds "
             f"{student['decode_seconds_per_image']:.3f} s to each)."
             if result.get("speedup") else "")
    intro = (f"Student `{plan.student.path}` ({plan.student.kind}, {plan.student.num_steps} steps, sigmas "
             f"{plan.student.sigmas}); teacher `{plan.teacher_id}` ({plan.cfg.teacher_steps} steps). Prompts "
             f"`{result['prompts']}`: {len(plan.prompts)} prompts, {plan.num_samples} samples (seeds "
             f"{plan.cfg.seed}..{plan.cfg.seed + plan.num_samples - 1}), {plan.resolution}x{plan.resolution} px.")
    models = result["metric_models"]
    used = ", ".join(f"{k}: `{v}`" for k, v in models.items() if v)
    skipped = [f"{kind} not measured: {why}" for kind, why in result["skipped"].items()]
    worst_header = ["#", "prompt", "PSNR student (dB)", "PSNR naive (dB)", "SSIM student", "sharpness student",
                    "grid"]
    worst_rows = [[str(i + 1), w["prompt"], f"{w['psnr_student']:.2f}", f"{w['psnr_naive']:.2f}",
                   f"{w['ssim_student']:.3f}", "—" if w["sharpness_student"] is None else
                   f"{w['sharpness_student']:.3f}", _grid_name(w["sample"])] for i, w in enumerate(worst)]
    sources = [[k, v] for k, v in METRIC_SOURCES.items()]

    md = [f"# twostep evaluate: {os.path.basename(os.path.normpath(plan.student.path))} against its teacher", "",
          intro, "", "## Metrics", "", md_table(header, rows), "", speed, "",
          f"Metric models: {used or 'none'}." + ("" if not plan.real else f" Real images: {len(plan.real)}."), ""]
    md += [f"- {line}" for line in skipped] + ([""] if skipped else [])
    md += ["## How to read it", ""] + [f"- {line}" for line in READING] + [""]
    md += ["## Side by side: same prompt, same noise", ""]
    md += [f"![sample {s}]({_grid_name(s)})" for s in shown] + [""]
    md += ["## Worst prompts (lowest PSNR of the student to the teacher on the same noise)", "",
           md_table(worst_header, [r[:-1] + [f"[grid]({r[-1]})"] for r in worst_rows]), ""]
    md += ["## Where each metric comes from", "", md_table(["metric", "computed by"], sources), "",
           f"Numbers for scripts: `{METRICS}`. Command: `{result['command']}`"]
    write_text(os.path.join(out, "report.md"), "\n".join(md) + "\n")

    def img(path: str, alt: str) -> str:
        return f'<a href="{html.escape(path)}"><img alt="{html.escape(alt)}" src="{html.escape(path)}" ' \
               'style="max-width:100%"></a>'

    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>twostep evaluate</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}</style></head><body>
<h1>twostep evaluate: {html.escape(os.path.basename(os.path.normpath(plan.student.path)))} against its teacher</h1>
<p>{html.escape(intro.replace('`', ''))}</p>
<h2>Metrics</h2>{html_table(header, rows)}
<p>{html.escape(speed)}</p>
<p>Metric models: {html.escape(used.replace('`', '') or 'none')}.</p>
<ul>{''.join('<li>' + html.escape(line) + '</li>' for line in skipped)}</ul>
<h2>How to read it</h2><ul>{''.join('<li>' + html.escape(line) + '</li>' for line in READING)}</ul>
<h2>Side by side: same prompt, same noise</h2>
{''.join(img(_grid_name(s), f'sample {s}') for s in shown)}
<h2>Worst prompts (lowest PSNR of the student to the teacher on the same noise)</h2>
{html_table(worst_header, worst_rows)}
{''.join(img(_grid_name(w['sample']), w['prompt']) for w in worst)}
<h2>Where each metric comes from</h2>{html_table(['metric', 'computed by'], sources)}
<p>Numbers for scripts: {METRICS}. Command: <code>{html.escape(result['command'])}</code></p>
</body></html>"""
    path = os.path.join(out, "report.html")
    write_text(path, page)
    return path
