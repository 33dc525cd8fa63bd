"""Cost of ``teacher_data.mode: online`` against the cache, per training step, on the offline digits world.

Both modes train the same student config from the shipped digits teacher in one process: steps alternate
between a cached-mode trainer and an online-mode trainer (so machine noise hits both alike), and the result is the
ratio of their median step times. Online mode runs ``teacher_steps`` teacher forwards per sample drawn, under
no_grad, on top of the usual step.

    python benchmarks/online_cost.py [--steps 30] [--results docs/results.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

try:
    import twostep  # noqa: F401  (only probes whether the package is importable)
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch

from twostep.core.config import load_config
from twostep.core.packaged_configs import packaged_config
from twostep.engine.train import Trainer
from twostep.offline.distill import (
    DistillConfig,
    build_student,
    load_teacher_data,
    make_teacher_data,
    online_teacher_data,
)
from twostep.offline.shipped import shipped_teacher_dir


def step_times(args) -> dict:
    teacher_dir = shipped_teacher_dir("digits")
    overrides = [f"train.batch_size={args.batch_size}", "train.eval_every=0", "train.sample_every=100000",
                 f"teacher_data.num_samples={args.num_samples}", f"teacher_data.shard_size={args.num_samples}",
                 f"teacher_data.batch_size={args.batch_size}"]
    cfg = load_config(DistillConfig, packaged_config("toy_demo"), overrides)
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        make_teacher_data(teacher_dir, cfg, f"{tmp}/cache")
        for mode in ("cached", "online"):
            student, disc, base = build_student(teacher_dir, cfg)
            data = load_teacher_data(base, cfg, f"{tmp}/cache") if mode == "cached" else \
                online_teacher_data(student, base, cfg)
            trainers[mode] = Trainer(cfg, student, disc, data, base.prompt_table, None, f"{tmp}/{mode}")
        times: dict[str, list[float]] = {"cached": [], "online": []}
        for step in range(args.steps + 2):  # two warm-up steps each, not timed
            for mode, trainer in trainers.items():
                t0 = time.perf_counter()
                trainer.train_step()
                if step >= 2:
                    times[mode].append(time.perf_counter() - t0)
    medians = {mode: statistics.median(values) for mode, values in times.items()}
    return {"steps": args.steps, "batch_size": args.batch_size, "teacher_steps": cfg.teacher_data.teacher_steps,
            "cached_s": medians["cached"], "online_s": medians["online"],
            "ratio": medians["online"] / medians["cached"], "threads": torch.get_num_threads()}


def section(result: dict, command: str) -> str:
    return "\n".join([
        "### Online teacher mode: cost per training step (digits world)", "",
        f"Written by `{command}` ({result['threads']} CPU threads). The same student config trained from the "
        f"shipped digits teacher, batch {result['batch_size']}, cached and online steps alternating in one process, "
        f"medians of {result['steps']} steps each:", "",
        f"- cached: {result['cached_s'] * 1e3:.1f} ms per step; online ({result['teacher_steps']} teacher steps per "
        f"sample drawn): {result['online_s'] * 1e3:.1f} ms per step: **{result['ratio']:.2f}×** the cached cost.",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per mode (default 30)")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch (default 32)")
    parser.add_argument("--num-samples", type=int, default=512, help="cached samples (default 512)")
    parser.add_argument("--results", help="also write the section into this markdown file")
    args = parser.parse_args(argv)
    result = step_times(args)
    command = "python benchmarks/online_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = section(result, command.strip())
    print(text)
    if args.results:
        from twostep.core.reports import update_section

        update_section(args.results, "online-cost", text)
        print(f"updated {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
