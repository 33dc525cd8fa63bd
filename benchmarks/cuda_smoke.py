"""The real path's commands on the tiny random Z-Image pipeline, on whatever device ``model.device: auto`` picks:
teacher data -> training (bf16 base, autocast, evaluation during training with tiny CLIP / DINOv2) -> export ->
``generate`` -> ``evaluate``. The CPU tests run the same chain; this script is for a CUDA machine, where device
placement bugs (a tensor left on the CPU, a dtype the GPU kernels refuse) would show. Seconds on CPU or GPU.

    python benchmarks/cuda_smoke.py --out runs/cuda_smoke      # writes OUT/cuda_smoke.json and each stage's files
    python benchmarks/cuda_smoke.py --record runs/cuda_smoke/cuda_smoke.json --results docs/results.md
                                        # the section of docs/results.md, from a record made on the GPU machine
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

try:
    import twostep  # noqa: F401  (only probes whether the package is importable)
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch

from twostep.cli import DEFAULT_ZIMAGE_CONFIG
from twostep.cli import main as twostep
from twostep.testing import save_tiny_clip, save_tiny_dinov2, tiny_zimage_pipeline

PROMPTS = ["a red cat on a sofa", "a photo of a small house", "the city at night", "a blue tree in the sky"]
TRAIN = ["train.steps=4", "train.batch_size=2", "train.warmup_steps=1", "train.d_warmup_steps=1",
         "train.sample_every=4", "train.checkpoint_every=2", "train.eval_every=2", "evaluation.count=2",
         "model.dtype=bfloat16", "train.bf16=true", "discriminator.blocks=[0,1]", "discriminator.hidden=16",
         "student.lora_rank=4", "student.lora_alpha=8"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/cuda_smoke", help="folder for every stage and cuda_smoke.json")
    parser.add_argument("--results", help="also write the outcome into a marked section of this markdown file")
    parser.add_argument("--record", help="write --results from this cuda_smoke.json instead of running the chain")
    args = parser.parse_args(argv)
    if args.record:
        record = json.loads(Path(args.record).read_text())
        return write_results(record, args.results) if args.results else 0
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    record = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "stages": {}}
    pipe, prompts, data, run, export = (str(root / n) for n in ("pipe", "prompts.txt", "data", "run", "export"))
    clip, dino = str(root / "clip"), str(root / "dino")

    def prepare():
        tiny_zimage_pipeline(seed=0).save_pretrained(pipe)
        Path(prompts).write_text("\n".join(PROMPTS) + "\n")
        save_tiny_clip(clip, seed=1)
        save_tiny_dinov2(dino, seed=2)
        return 0

    stages = [
        ("prepare", prepare),
        ("teacher-data", lambda: twostep(["teacher-data", "--teacher", pipe, "--prompts", prompts, "--resolution",
                                          "64", "--out", data, "teacher_data.shard_size=4",
                                          "teacher_data.batch_size=2", "teacher_data.previews=2"])),
        ("train", lambda: twostep(["train", "--config", DEFAULT_ZIMAGE_CONFIG, "--data", data, "--out", run, *TRAIN,
                                   f"evaluation.clip={clip}", f"evaluation.dino={dino}"])),
        ("export", lambda: twostep(["export", run, "--format", "diffusers", "--out", export, "--samples", "2"])),
        ("generate", lambda: twostep(["generate", "a red cat on a sofa", "--model", export, "--out",
                                      str(root / "generated.png"), "--resolution", "64"])),
        ("evaluate", lambda: twostep(["evaluate", "--model", export, "--teacher", pipe, "--prompts", prompts,
                                      "--resolution", "64", "--out", str(root / "evaluation"), "shard_size=2",
                                      f"models.clip={clip}", f"models.dino={dino}", "models.preference=none"])),
    ]
    for name, stage in stages:
        start = time.perf_counter()
        try:
            code = stage()
            error = None
        except Exception:  # noqa: BLE001 - a smoke check reports every failure and goes on
            code, error = 1, traceback.format_exc()[-3000:]
        record["stages"][name] = {"exit": code, "seconds": round(time.perf_counter() - start, 2), "error": error}
        print(f"{name}: exit {code} in {record['stages'][name]['seconds']}s", flush=True)
        if code != 0:
            print(error or "(see the message above)", flush=True)
            break
    log = Path(run) / "train_log.jsonl"
    if log.exists():
        last = json.loads(log.read_text().splitlines()[-1])
        record["train_last_log"] = {k: v for k, v in last.items() if k.startswith(("eval/", "g_total", "d_loss"))}
    metrics = root / "evaluation" / "metrics.json"
    if metrics.exists():
        record["evaluate"] = json.loads(metrics.read_text())["samplers"]
    record["passed"] = passed(record)
    (root / "cuda_smoke.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {root / 'cuda_smoke.json'}")
    if args.results:
        write_results(record, args.results)
    return 0 if record["passed"] else 1


def passed(record: dict) -> bool:
    """Every stage ran (the last is evaluate) and exited 0."""
    return "evaluate" in record["stages"] and all(s["exit"] == 0 for s in record["stages"].values())


def write_results(record: dict, path: str) -> int:
    from twostep.core.reports import update_section

    stages = ", ".join(f"{name} {'ok' if s['exit'] == 0 else 'FAILED'} ({s['seconds']:.1f} s)"
                       for name, s in record["stages"].items())
    logged = record.get("train_last_log", {})
    text = ["### Real path on CUDA (`benchmarks/cuda_smoke.py`)", "",
            f"Written by `python benchmarks/cuda_smoke.py --record cuda_smoke.json --results {path}` from the record of "
            f"`python benchmarks/cuda_smoke.py --out runs/cuda_smoke` on {record['device']}, torch {record['torch']}: "
            "the tiny random pipeline through every real-path command with `model.device: auto`, a bf16 base under "
            "bf16 autocast and evaluation during training (tiny CLIP / DINOv2).", "",
            f"- {'**Every stage passed**' if passed(record) else '**A stage failed**'}: {stages}.",
            "- Last training log: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(logged.items())) + ".",
            "- Tiny random models: the metric values only show that each metric is computed on the GPU; they say "
            "nothing about distillation quality."]
    update_section(path, "cuda-smoke", "\n".join(text))
    print(f"updated {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
