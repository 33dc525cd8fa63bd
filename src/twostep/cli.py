"""``twostep`` command line. Each subcommand takes a few flags plus dotted config overrides (``train.lr=3e-4``).

Errors a user can fix are printed as one line (``twostep: error: ...``) with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import warnings

from .errors import TwostepError

DEFAULT_TEACHER_CONFIG = "configs/toy_teacher.yaml"
DEFAULT_DEMO_CONFIG = "configs/toy_demo.yaml"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _steps_list(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated step counts like 1,2,8, got {text!r}") from None
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"step counts must be positive integers, got {text!r}")
    return steps


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _config_path(path: str | None, default: str = DEFAULT_TEACHER_CONFIG) -> str | None:
    """The given config, else the repo's default when run from a checkout, else built-in defaults."""
    if path:
        return path
    return default if os.path.isfile(default) else None


def _command_line(args) -> str:
    return "twostep " + " ".join(shlex.quote(a) for a in args.argv)


# --------------------------------------------------------------------------- subcommands


def cmd_train_teacher(args) -> None:
    from .config import load_config
    from .teacher import TeacherConfig, train_teacher

    cfg = load_config(TeacherConfig, _config_path(args.config), args.overrides)
    meta = train_teacher(cfg, args.out, resume=args.resume)
    print(f"teacher trained in {meta['train_wall_s']:.0f}s -> {os.path.join(args.out, 'teacher.safetensors')}")


def cmd_sample(args) -> None:
    from .reports import image_grid, save_image
    from .sampling import generate, make_noise
    from .teacher import load_teacher
    from .toy.data import NUM_CLASSES
    from .utils import ensure_parent_writable

    import torch

    ensure_parent_writable(args.out, what="grid image")
    teacher = load_teacher(args.model)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(args.per_prompt)
    noise = make_noise(len(labels), teacher.image_shape, args.seed)
    images = generate(teacher.backbone, noise, teacher.cond(labels), args.steps, teacher.config.sampling.shift)
    grid = image_grid(images, ncols=args.per_prompt, row_labels=[str(d) for d in range(NUM_CLASSES)])
    save_image(grid, args.out)
    print(f"wrote {args.out} ({args.steps} steps, {args.per_prompt} samples per prompt, seed {args.seed})")


def cmd_eval(args) -> None:
    from .evaluate import evaluate_teacher_steps, format_table
    from .teacher import load_teacher
    from .utils import ensure_parent_writable, write_text

    out = args.out or os.path.join(args.model, "eval.json")
    ensure_parent_writable(out, what="metrics file")
    if args.results:
        ensure_parent_writable(args.results, what="results document")
    teacher = load_teacher(args.model)
    result = evaluate_teacher_steps(teacher, args.steps, num_samples=args.num_samples)
    result["command"] = _command_line(args)
    write_text(out, json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    print(f"wrote {out}")
    if args.results:
        from .results import write_teacher_section

        write_teacher_section(args.results, result, teacher)
        print(f"updated {args.results}")


def cmd_teacher_data(args) -> None:
    from .config import load_config
    from .distill import make_teacher_data
    from .train import DistillConfig

    cfg = load_config(DistillConfig, _config_path(args.config, DEFAULT_DEMO_CONFIG), args.overrides)
    manifest = make_teacher_data(args.teacher, cfg, args.out)
    print(f"teacher data: {manifest['provenance']['num_samples']} trajectories in {len(manifest['shards'])} shards "
          f"-> {args.out}")


def cmd_train(args) -> None:
    from .config import load_config
    from .distill import train_student
    from .train import DistillConfig

    cfg = load_config(DistillConfig, _config_path(args.config, DEFAULT_DEMO_CONFIG), args.overrides)
    meta = train_student(args.teacher, args.data, cfg, args.out, resume=args.resume)
    print(f"student trained ({meta['steps']} steps, {meta['train_wall_s']:.0f}s) -> {args.out}")


def cmd_bench(args) -> None:
    from .bench import run_bench, write_bench_section

    report = run_bench(args.out, _config_path(args.config, DEFAULT_DEMO_CONFIG), args.overrides, quick=args.quick,
                       seeds=args.seeds, arms=args.arm, teacher_dir=args.teacher, steps=args.steps,
                       batch_size=args.batch_size)
    from .bench import bench_section

    print(bench_section(report, _command_line(args), os.path.join(args.out, "gap_closure.png")))
    if args.results:
        write_bench_section(args.results, report, _command_line(args), os.path.join(args.out, "gap_closure.png"))
        print(f"updated {args.results}")


def cmd_demo(args) -> None:
    from .demo import run_demo

    report = run_demo(args.out, config_path=_config_path(args.config, DEFAULT_DEMO_CONFIG),
                      overrides=args.overrides, results_path=args.results)
    html = os.path.splitext(report)[0] + ".html"
    print(f"report: {report} (open {html} in a browser)")


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="twostep", description="Distil an 8-step flow-matching text-to-image model into 2 steps.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train-teacher", help="train the offline world's 8-step teacher")
    p.add_argument("--config", help=f"YAML config (default: {DEFAULT_TEACHER_CONFIG} if present)")
    p.add_argument("--out", default="runs/teacher", help="run folder (default: runs/teacher)")
    p.add_argument("--resume", action="store_true", help="continue from RUN/state.pt")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. train.steps=500")
    p.set_defaults(func=cmd_train_teacher)

    p = sub.add_parser("sample", help="write a grid of samples (rows = prompts 0..9)")
    p.add_argument("--model", default="runs/teacher", help="teacher run folder")
    p.add_argument("--steps", type=_positive_int, default=8, help="sampling steps (default 8)")
    p.add_argument("--out", default="grid.png", help="output image (PNG)")
    p.add_argument("--per-prompt", type=_positive_int, default=8, help="samples per prompt (columns)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="FD, class accuracy, diversity and speed per step count")
    p.add_argument("--model", default="runs/teacher", help="teacher run folder")
    p.add_argument("--steps", type=_steps_list, default=[1, 2, 4, 8, 16], help="comma-separated, e.g. 1,2,4,8,16")
    p.add_argument("--num-samples", type=_positive_int, default=None, help="samples per step count (default: config)")
    p.add_argument("--out", help="metrics JSON (default: MODEL/eval.json)")
    p.add_argument("--results", help="also rewrite the teacher section of this markdown file (docs/results.md)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("teacher-data", help="cache teacher trajectories (noise, states at the student sigmas, final)")
    p.add_argument("--config", help=f"YAML config (default: {DEFAULT_DEMO_CONFIG} if present)")
    p.add_argument("--teacher", default="runs/teacher", help="teacher run folder")
    p.add_argument("--out", default="runs/teacher_data", help="cache folder; a rerun finishes what is missing")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. teacher_data.num_samples=2000")
    p.set_defaults(func=cmd_teacher_data)

    p = sub.add_parser("train", help="distil the teacher into a 2-step student (Turbo++ recipe)")
    p.add_argument("--config", help=f"YAML config (default: {DEFAULT_DEMO_CONFIG} if present)")
    p.add_argument("--teacher", default="runs/teacher", help="teacher run folder")
    p.add_argument("--data", default="runs/teacher_data", help="teacher-data cache folder")
    p.add_argument("--out", default="runs/student", help="run folder")
    p.add_argument("--resume", metavar="latest|PATH", help="continue from the newest (or a given) checkpoint")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. recipe.end_to_end=false train.steps=200")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("bench", help="ablations of the recipe at equal budget, several seeds (make bench)")
    p.add_argument("--config", help=f"YAML config (default: {DEFAULT_DEMO_CONFIG} if present)")
    p.add_argument("--out", default="runs/bench", help="bench folder (default: runs/bench)")
    p.add_argument("--teacher", help="reuse this teacher run (default: train one into OUT/teacher)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny teacher, one seed, a few steps")
    p.add_argument("--seeds", type=_positive_int, help="seeds per arm (default 3; 1 with --quick)")
    p.add_argument("--arm", action="append", help="run only this arm (repeatable)")
    p.add_argument("--steps", type=_positive_int, help="generator steps per arm (default 100; 4 with --quick)")
    p.add_argument("--batch-size", type=_positive_int, help="batch per arm (default 32; 8 with --quick)")
    p.add_argument("--results", help="also rewrite the bench section of this markdown file (docs/results.md)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="applied to every arm")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="the main job on the offline world (make demo)")
    p.add_argument("--config", help=f"YAML config (default: {DEFAULT_DEMO_CONFIG} if present)")
    p.add_argument("--out", default="runs/demo", help="demo folder (default: runs/demo)")
    p.add_argument("--results", help="also rewrite the sections of this markdown file (docs/results.md)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    warnings.filterwarnings("ignore", message=".*Matrix is singular.*")
    try:
        args.func(args)
    except TwostepError as err:
        print(f"twostep: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("twostep: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
