"""``twostep`` command line. Each subcommand takes a few flags plus dotted config overrides (``train.lr=3e-4``).

Errors a user can fix are printed as one line (``twostep: error: ...``) with exit code 2. A run stopped by
SIGTERM/SIGINT saves its state and exits with code 75 (``engine.preemption.EXIT_CODE``); ``--resume`` continues it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import sys
import warnings

from twostep.core.errors import TwostepError
from twostep.core.utils import is_main_process
from twostep.engine.preemption import Preempted

# packaged configs (offline/configs and families/*/configs, `twostep configs`): found by name from any folder
DEFAULT_TEACHER_CONFIG = "toy_teacher"
DEFAULT_DEMO_CONFIG = "toy_demo"
DEFAULT_ZIMAGE_CONFIG = "zimage_turbo_2step_lora"
DATA_RECORD = "teacher_data.yaml"  # how a real teacher-data folder was made; `train --data` reuses it


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


def _config_path(path: str | None, default: str = DEFAULT_TEACHER_CONFIG) -> str:
    """The given config (a YAML path, or a packaged config's name), else the packaged default."""
    from twostep.core.packaged_configs import resolve_config

    return resolve_config(path or default)


def _family_config(teacher: str | None) -> str:
    """The packaged recipe of the teacher's model family: read from a local pipeline folder's own files, or a
    release's hub id; Z-Image's when neither tells (the folder's checks report what is wrong with it later)."""
    from twostep.families.registry import all_families, detect_family

    if teacher and os.path.isdir(teacher):
        try:
            return detect_family(teacher).default_config
        except TwostepError:
            return DEFAULT_ZIMAGE_CONFIG
    return next((f.default_config for f in all_families() if teacher == f.default_model), DEFAULT_ZIMAGE_CONFIG)


def _local_path(path: str) -> str:
    """Absolute when it names something on disk (recorded in run files read from elsewhere); a hub id as it is."""
    return os.path.abspath(path) if os.path.exists(path) else path


def _command_line(args) -> str:
    return "twostep " + " ".join(shlex.quote(a) for a in args.argv)


# --------------------------------------------------------------------------- subcommands


def cmd_train_teacher(args) -> None:
    from twostep.core.config import load_config
    from twostep.offline.teacher import TeacherConfig, train_teacher

    config = _resume_config(args.config, args.out) if args.resume else _config_path(args.config)
    cfg = load_config(TeacherConfig, config, args.overrides)
    meta = train_teacher(cfg, args.out, resume=args.resume, command=_command_line(args),
                         allow_config_change=args.allow_config_change)
    print(f"teacher trained in {meta['train_wall_s']:.0f}s -> {os.path.join(args.out, 'teacher.safetensors')}")


def cmd_ship_teacher(args) -> None:
    from twostep.offline.ship import SHIPPED_ROOT, ship_teacher

    prov = ship_teacher(args.run, args.world, out=args.out, command=args.command, steps=args.steps)
    fd = prov["eval_8_step_fd"]
    print(f"shipped the {args.world} teacher -> {args.out or os.path.join(SHIPPED_ROOT, args.world)} ("
          + (f"8-step FD {fd:.3f}, " if fd is not None else "") + f"{len(prov['sha256'])} files checksummed)")


def cmd_sample(args) -> None:
    import torch

    from twostep.core.reports import image_format, image_grid, save_image
    from twostep.core.utils import check_output_file
    from twostep.offline.sampling import generate, make_noise
    from twostep.offline.teacher import load_teacher

    check_output_file(args.out, what="grid image")
    image_format(args.out)
    teacher = load_teacher(args.model)
    labels = torch.arange(teacher.num_classes).repeat_interleave(args.per_prompt)
    noise = make_noise(len(labels), teacher.image_shape, args.seed)
    images = generate(teacher.backbone, noise, teacher.cond(labels), args.steps, teacher.config.sampling.shift)
    grid = image_grid(images, ncols=args.per_prompt, row_labels=teacher.world.class_names)
    save_image(grid, args.out)
    print(f"wrote {args.out} ({args.steps} steps, {args.per_prompt} samples per prompt, seed {args.seed})")


def cmd_eval(args) -> None:
    from twostep.core.reports import check_markdown_target
    from twostep.core.utils import check_output_file, write_text
    from twostep.offline.evaluate import evaluate_teacher_steps, format_table
    from twostep.offline.teacher import load_teacher

    out = args.out or os.path.join(args.model, "eval.json")
    check_output_file(out, what="metrics file")
    if args.results:
        check_markdown_target(args.results)
    teacher = load_teacher(args.model)
    result = evaluate_teacher_steps(teacher, args.steps, num_samples=args.num_samples)
    result["command"] = _command_line(args)
    write_text(out, json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    print(f"wrote {out}")
    if args.results:
        from twostep.offline.results import write_teacher_section

        write_teacher_section(args.results, result, teacher)
        print(f"updated {args.results}")


def cmd_teacher_data(args) -> None:
    from twostep.core.config import load_config

    if args.prompts:
        return _real_teacher_data(args)
    from twostep.offline.distill import DistillConfig, make_teacher_data

    cfg = load_config(DistillConfig, _config_path(args.config, DEFAULT_DEMO_CONFIG), args.overrides)
    out = args.out or "runs/teacher_data"
    manifest = make_teacher_data(args.teacher or "runs/teacher", cfg, out)

    if is_main_process():
        print(f"teacher data: {manifest['provenance']['num_samples']} trajectories in {len(manifest['shards'])} "
              f"shards -> {out}")


def _real_teacher_data(args) -> None:
    import yaml

    from twostep.core.config import load_config, to_dict
    from twostep.core.utils import write_text
    from twostep.real.teacher_data import make_real_teacher_data
    from twostep.real.train import ZImageDistillConfig

    update = {"teacher_data": {"prompts": os.path.abspath(args.prompts)}}
    if args.teacher:  # local folders recorded absolute: train and export may run from elsewhere
        update["model"] = {"path": _local_path(args.teacher)}
    if args.resolution:
        update["teacher_data"]["resolution"] = args.resolution
    recipe = args.config or _family_config(args.teacher)
    cfg = load_config(ZImageDistillConfig, _config_path(recipe), args.overrides, update)
    out = args.out or cfg.data_dir
    manifest = make_real_teacher_data(cfg.teacher_data, cfg.model.path, out, dtype=cfg.model.dtype,
                                      device=cfg.model.device)

    if not is_main_process():  # torchrun: rank 0 writes the record and reports
        return
    # `train --data OUT` reads this: the teacher, the cache settings and the recipe they were made for
    record = {"recipe": _local_path(recipe) if os.path.isfile(recipe) else recipe, "model": {"path": cfg.model.path},
              "teacher_data": to_dict(cfg.teacher_data)}
    write_text(os.path.join(out, DATA_RECORD), yaml.safe_dump(record, sort_keys=False))
    if manifest.get("mode") == "online":
        print(f"teacher data (online mode): the text cache of {manifest['provenance']['num_prompts']} prompts -> "
              f"{out}; training computes the trajectories")
        return
    print(f"teacher data: {manifest['provenance']['num_samples']} latent trajectories at "
          f"{cfg.teacher_data.resolution}px in {len(manifest['shards'])} shards -> {out}")


def _resume_config(config: str | None, run_dir: str | None) -> str | None:
    """On ``--resume`` the run's own saved config is the default, so no override has to be repeated."""
    if config or not run_dir:
        return config
    saved = os.path.join(run_dir, "config.yaml")
    return saved if os.path.isfile(saved) else None


def _recorded_inputs(run_dir: str) -> dict:
    """The teacher and data folders a toy run recorded in its ``meta.json`` (empty when there is none)."""
    from twostep.core.utils import read_json_object

    path = os.path.join(run_dir, "meta.json")
    return read_json_object(path, what="run record") if os.path.isfile(path) else {}


DEFAULT_RUN_DIRS = ("runs/student", "runs/zimage/student")  # where `train` writes without --out (toy, Z-Image)


def _resolve_auto_resume(args) -> None:
    """``--resume auto`` (one command for a first submission and every requeue): ``latest`` when the run folder has
    a checkpoint; otherwise a fresh run, which may replace a run folder that an earlier attempt left without any
    checkpoint (nothing in it can be continued)."""
    from twostep.engine.checkpoint import list_checkpoints
    from twostep.engine.run_folder import RUN_FILES

    out = args.out or next((d for d in DEFAULT_RUN_DIRS
                            if list_checkpoints(os.path.join(d, "checkpoints"))), None)
    if out and list_checkpoints(os.path.join(out, "checkpoints")):
        args.resume = "latest"
        return
    args.resume, args.allow_config_change = None, False
    if out and os.path.isfile(os.path.join(out, "config.yaml")) and set(os.listdir(out)) <= {*RUN_FILES, "tb", "samples"}:
        if is_main_process():
            print(f"twostep: --resume auto: {out} holds no checkpoint; starting the run again")
        args.overwrite = True


def cmd_train(args) -> None:
    from twostep.core.config import load_config

    if args.resume == "auto":
        _resolve_auto_resume(args)
    if args.resume and not args.out:  # the default run folder of whichever kind of run is there
        args.out = next((d for d in DEFAULT_RUN_DIRS
                         if os.path.isfile(os.path.join(d, "config.yaml"))), "runs/student")
    config = _resume_config(args.config, args.out) if args.resume else None
    if config is None and not args.config and args.data and os.path.isfile(os.path.join(args.data, DATA_RECORD)):
        config = _config_path(_recorded_recipe(args.data))  # a real teacher-data folder: the recipe it was made for
    config = config or _config_path(args.config, DEFAULT_DEMO_CONFIG)
    from twostep.real.train import is_real_config

    if is_real_config(config):
        return _real_train(args, config)
    from twostep.offline.distill import DistillConfig, train_student

    cfg = load_config(DistillConfig, config, args.overrides)
    out = args.out or "runs/student"
    recorded = _recorded_inputs(out) if args.resume else {}  # a resumed run keeps its teacher and data
    teacher = args.teacher or recorded.get("teacher_run") or "runs/teacher"
    data = args.data or (recorded.get("teacher_data") if recorded.get("teacher_data") != "online" else None) \
        or "runs/teacher_data"
    meta = train_student(teacher, data, cfg, out,
                         resume=args.resume, allow_config_change=args.allow_config_change, overwrite=args.overwrite)
    if is_main_process():
        print(f"student trained ({meta['steps']} steps, {meta['train_wall_s']:.0f}s) -> {out}")


def _recorded_recipe(data_dir: str) -> str:
    """The recipe a real teacher-data folder was made for (its record; Z-Image's for folders made before)."""
    from twostep.core.config import read_yaml

    recipe = (read_yaml(os.path.join(data_dir, DATA_RECORD)) or {}).get("recipe")
    return recipe if isinstance(recipe, str) and recipe else DEFAULT_ZIMAGE_CONFIG


def _real_train(args, config: str) -> None:
    from twostep.core.config import load_config, read_yaml
    from twostep.real.train import ZImageDistillConfig, train_zimage_student

    data_dir = os.path.abspath(args.data or load_config(ZImageDistillConfig, config).data_dir)
    update = {"data_dir": data_dir}
    record = os.path.join(data_dir, DATA_RECORD)
    if os.path.isfile(record):  # the teacher and prompts the cache was made from
        for section, values in read_yaml(record).items():
            if isinstance(values, dict):
                update.setdefault(section, {}).update(values)
    if args.teacher:
        update.setdefault("model", {})["path"] = _local_path(args.teacher)
    cfg = load_config(ZImageDistillConfig, config, args.overrides, update)
    out = args.out or "runs/zimage/student"
    meta = train_zimage_student(cfg, out, resume=args.resume, allow_config_change=args.allow_config_change,
                                overwrite=args.overwrite)
    if is_main_process():
        print(f"student trained ({meta['steps']} steps, {meta['train_wall_s']:.0f}s on {meta['device']}) -> {out}")


def cmd_export(args) -> None:
    from twostep.real.export import export_run

    out = args.out or os.path.join(args.run, f"export_{args.format}")
    paths = export_run(args.run, out, args.format, dtype=args.dtype, overwrite=args.overwrite, samples=args.samples,
                       checkpoint=args.checkpoint)
    print(f"exported {args.format}: " + ", ".join(os.path.relpath(p) for p in paths))


def cmd_generate(args) -> None:
    from twostep.core.prompts import check_prompt_sizes, read_prompts
    from twostep.core.reports import image_format
    from twostep.core.utils import check_output_dir, check_output_file, resolve_device, write_text
    from twostep.families.registry import detect_family
    from twostep.real.pipeline import check_generate_prompts, generate_images, load_two_step_pipeline, read_export_info

    single = args.prompt is not None
    if single == bool(args.prompts):
        raise TwostepError("give either one prompt (positional) or --prompts FILE")
    if single and not args.prompt.strip():
        raise TwostepError("the prompt is empty; give the text to draw, e.g. twostep generate "
                           "\"a red cat on a sofa\" --model ...")
    if single:
        check_prompt_sizes([args.prompt.strip()])
    prompts = [args.prompt.strip()] if single else read_prompts(args.prompts)
    args.out = args.out or ("image.png" if single else "images")
    info = read_export_info(args.model)
    resolution = args.resolution or info.get("resolution") or 1024
    key = "--resolution" if args.resolution else "the export's resolution"
    detect_family(args.model).check_resolution(args.model, resolution, key=key)
    if single:
        check_output_file(args.out, what="image")
        image_format(args.out)
    else:
        check_output_dir(args.out, what="image folder")
    device = resolve_device(args.device)
    check_generate_prompts(args.model, prompts, None if single else args.prompts)
    pipe, switch = load_two_step_pipeline(args.model, device=device, resolution=resolution)
    images = generate_images(pipe, switch, prompts, seed=args.seed, resolution=resolution)
    if single:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        images[0].save(args.out, format=image_format(args.out))
        print(f"wrote {args.out} ({info['num_steps']} steps, seed {args.seed})")
        return
    os.makedirs(args.out, exist_ok=True)
    index = {}
    for i, image in enumerate(images):
        name = f"{i:05d}.png"
        image.save(os.path.join(args.out, name))
        index[name] = {"prompt": prompts[i], "seed": args.seed + i}
    write_text(os.path.join(args.out, "index.json"), json.dumps(index, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {len(images)} images to {args.out} ({info['num_steps']} steps, seeds {args.seed}..)")


def cmd_evaluate(args) -> None:
    from twostep.core.config import load_config
    from twostep.real.evaluation.run import EvaluateConfig, run_evaluation

    update = {}
    if args.resolution:
        update["resolution"] = args.resolution
    if args.device:
        update["device"] = args.device
    cfg = load_config(EvaluateConfig, args.config, args.overrides, update)
    report = run_evaluation(args.model, args.teacher, args.prompts, args.out, cfg, real=args.real,
                            command=_command_line(args))
    print(f"report: {report} (metrics.json and report.md beside it)")


def cmd_configs(args) -> None:
    from twostep.core.packaged_configs import describe, packaged_configs

    configs = packaged_configs()
    width = max(len(name) for name in configs)
    for name, path in configs.items():
        print(f"{name:<{width}}  {describe(path)}")
    print(f"(in {os.path.dirname(next(iter(configs.values())))}; use `--config NAME`, or copy one and pass its path)")


def cmd_plan(args) -> None:
    from twostep.real.plan import cmd_plan as run_plan

    run_plan(args)


def cmd_bench(args) -> None:
    from twostep.bench import run_bench
    from twostep.offline.bench.arms import WORLD_BENCHES
    from twostep.offline.bench.report import bench_images, bench_section, write_bench_section

    if args.world not in WORLD_BENCHES:
        raise TwostepError(f"--world {args.world}: known worlds are {', '.join(WORLD_BENCHES)}")
    config = _config_path(args.config, WORLD_BENCHES[args.world].config)
    if args.results:
        from twostep.core.reports import check_markdown_target

        check_markdown_target(args.results)
    report = run_bench(args.out, config, args.overrides, quick=args.quick, seeds=args.seeds, arms=args.arm,
                       teacher_dir=args.teacher, steps=args.steps, batch_size=args.batch_size, world=args.world,
                       workers=args.workers, suite=args.suite)
    print(bench_section(report, _command_line(args), bench_images(args.out, args.world, args.suite)))
    if args.results:
        write_bench_section(args.results, report, _command_line(args), args.out)
        print(f"updated {args.results}")


def cmd_demo(args) -> None:
    from twostep.demo import run_demo
    from twostep.offline.bench.arms import WORLD_BENCHES

    if args.world not in WORLD_BENCHES:
        raise TwostepError(f"--world {args.world}: known worlds are {', '.join(WORLD_BENCHES)}")
    if args.results and args.world != "digits":
        raise TwostepError("--results writes the digits world's sections; the detail world's results come from "
                           "`twostep bench --world detail --results docs/results.md`")
    if args.results:
        from twostep.core.reports import check_markdown_target

        check_markdown_target(args.results)
    out = args.out or ("runs/demo" if args.world == "digits" else f"runs/demo_{args.world}")
    report = run_demo(out, config_path=_config_path(args.config, WORLD_BENCHES[args.world].config),
                      overrides=args.overrides, results_path=args.results,
                      retrain_teacher=args.train_teacher)
    html = os.path.splitext(report)[0] + ".html"
    print(f"report: {report} (open {html} in a browser)")


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="twostep", description="Distil an 8-step flow-matching text-to-image model into 2 steps.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train-teacher", help="train the offline world's 8-step teacher")
    p.add_argument("--config", help=f"YAML file or packaged config name (default: {DEFAULT_TEACHER_CONFIG}; "
                                    "`twostep configs` lists them)")
    p.add_argument("--out", default="runs/teacher", help="run folder (default: runs/teacher)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest good checkpoint in RUN/checkpoints (RUN/config.yaml is the default "
                        "config)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: accept config values that differ from the checkpoint's (listed)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. train.steps=500")
    p.set_defaults(func=cmd_train_teacher)

    p = sub.add_parser("ship-teacher", help="make a shipped teacher folder (weights, eval, provenance) from a run")
    p.add_argument("run", help="finished `twostep train-teacher` run folder")
    p.add_argument("--world", default="digits", help="which world's shipped teacher it becomes (default digits)")
    p.add_argument("--out", help="folder to write (default: the package's shipped/WORLD; replaced atomically)")
    p.add_argument("--command", help="the command that trained RUN (default: from RUN/provenance.json)")
    p.add_argument("--steps", type=_steps_list, default=[1, 2, 4, 8, 16], help="eval step counts (default 1,2,4,8,16)")
    p.set_defaults(func=cmd_ship_teacher)

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

    p = sub.add_parser("teacher-data", help="cache teacher trajectories (toy run, or a Z-Image pipeline with --prompts)")
    p.add_argument("--config", help=f"YAML file or packaged config name (default: {DEFAULT_DEMO_CONFIG}; with "
                                    f"--prompts {DEFAULT_ZIMAGE_CONFIG})")
    p.add_argument("--teacher", help="toy teacher run folder (default runs/teacher), or with --prompts a Z-Image "
                                     "pipeline folder / hub id")
    p.add_argument("--prompts", help="real path: prompt file (.txt one per line, .jsonl {'prompt'}, .parquet 'prompt')")
    p.add_argument("--resolution", type=_positive_int, help="real path: image size in pixels (multiple of 16)")
    p.add_argument("--out", help="cache folder (default runs/teacher_data, real: the config's data_dir); a rerun "
                                 "finishes what is missing")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. teacher_data.num_samples=2000")
    p.set_defaults(func=cmd_teacher_data)

    p = sub.add_parser("train", help="distil the teacher into a 2-step student (Turbo++ recipe)")
    p.add_argument("--config", help=f"YAML file or packaged config name (default: {DEFAULT_DEMO_CONFIG}; "
                                    f"{DEFAULT_ZIMAGE_CONFIG} when --data is a Z-Image teacher-data folder; on "
                                    "--resume the run's config.yaml). A config with a pipeline `model:` section "
                                    "trains on Z-Image")
    p.add_argument("--teacher", help="toy teacher run (default runs/teacher); real: overrides model.path")
    p.add_argument("--data", help="teacher-data folder (default runs/teacher_data; real: the config's data_dir)")
    p.add_argument("--out", help="run folder (default runs/student; real: runs/zimage/student)")
    p.add_argument("--resume", metavar="latest|auto|PATH",
                   help="continue from the newest good checkpoint (or a given step_NNNNNN folder); the run's own "
                        "config.yaml is the default config. auto: latest if there is a checkpoint, else start (for "
                        "job scripts that are requeued)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: accept config values that differ from the checkpoint's (listed)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace what --out holds (a finished run, or other files): moved aside when the new run "
                        "starts, deleted when it finishes")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. recipe.end_to_end=false train.steps=200")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="write a trained Z-Image student as diffusers / lora / comfyui / merged")
    p.add_argument("run", help="training run folder (twostep train with a Z-Image config)")
    p.add_argument("--format", required=True, choices=["diffusers", "lora", "comfyui", "merged"])
    p.add_argument("--out", help="output folder (default RUN/export_FORMAT); built beside it and swapped in. A "
                                 "non-empty folder that an earlier export did not write is refused")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out that is not an export")
    p.add_argument("--samples", type=int, metavar="N",
                   help="prompts in samples.png, teacher 8 steps beside the student's 2 on the same noise (default: 4 "
                        "on a GPU, 0 on CPU; 0 = none)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of exported weights (default bfloat16)")
    p.add_argument("--checkpoint", metavar="latest|PATH",
                   help="export this checkpoint's EMA weights instead of the finished run's (FSDP2 shards are "
                        "gathered whole); the run need not have finished")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="2-step images from an exported model (diffusers export)")
    p.add_argument("prompt", nargs="?", help="one prompt (or use --prompts)")
    p.add_argument("--model", required=True, help="folder written by `twostep export --format diffusers`")
    p.add_argument("--prompts", help="prompt file: one image per prompt, prompt i with seed SEED+i")
    p.add_argument("--seed", type=int, default=0, help="noise seed (CPU generator: the same noise on any device; images match "
                                                             "closely, not bit for bit, across devices)")
    p.add_argument("--out", help="image path (one prompt; default image.png) or folder (--prompts; default images/)")
    p.add_argument("--resolution", type=_positive_int, help="pixels (default: the resolution trained at)")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu | cuda:N")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("evaluate", help="score a 2-step Z-Image student against its 8-step teacher (report.html, "
                                        "metrics.json)")
    p.add_argument("--model", required=True, help="`twostep train` run folder (Z-Image) or `twostep export` folder "
                                                  "(diffusers or lora)")
    p.add_argument("--teacher", help="Z-Image pipeline folder or hub id, e.g. Tongyi-MAI/Z-Image-Turbo (default: "
                                     "the one the student records)")
    p.add_argument("--prompts", required=True, help="builtin:smoke | builtin:parti, or a .txt / .jsonl / .parquet "
                                                    "prompt file")
    p.add_argument("--out", required=True, help="evaluation folder; a rerun of the same command finishes what is "
                                                "missing")
    p.add_argument("--resolution", type=_positive_int, help="pixels (default: the student's training resolution)")
    p.add_argument("--real", help="folder of reference images: adds FD/KID to real images")
    p.add_argument("--device", help="auto | cuda | cpu | cuda:N (default auto)")
    p.add_argument("--config", help="YAML file with evaluation settings (keys as the overrides)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="e.g. shard_size=8 samples_per_prompt=4 models.preference=none")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("configs", help="list the packaged configs (`--config NAME` finds them from any folder)")
    p.set_defaults(func=cmd_configs)

    p = sub.add_parser("plan", help="estimated GPU memory of a training configuration")
    from twostep.real.plan import add_plan_arguments

    add_plan_arguments(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("bench", help="ablations of the recipe at equal budget, several seeds (make bench)")
    p.add_argument("--config", help=f"YAML file or packaged config name (default: the world's, {DEFAULT_DEMO_CONFIG} "
                                    "for digits)")
    p.add_argument("--world", default="digits", help="digits (default) | detail: the world to bench on")
    p.add_argument("--workers", type=_positive_int, default=1,
                   help="runs trained in parallel, one CPU thread each (default 1); finished runs are reused")
    p.add_argument("--out", default="runs/bench", help="bench folder (default: runs/bench)")
    p.add_argument("--teacher", help="reuse this teacher run (default: train one into OUT/teacher)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny teacher, one seed, a few steps")
    p.add_argument("--seeds", type=_positive_int, help="seeds per arm (default 3; 1 with --quick)")
    p.add_argument("--suite", default="ablations",
                   help="ablations (default) | dmd2 | discriminator (detail world: DMD2 against the paper's "
                        "recipe; the discriminator's strength): which question, and which block of --results it "
                        "writes")
    p.add_argument("--arm", action="append", help="run only this arm (repeatable)")
    p.add_argument("--steps", type=_positive_int, help="generator steps per arm (default 100; 4 with --quick)")
    p.add_argument("--batch-size", type=_positive_int, help="batch per arm (default 32; 8 with --quick)")
    p.add_argument("--results", help="also rewrite the bench section of this markdown file (docs/results.md)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="applied to every arm")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="the main job on the offline world (make demo)")
    p.add_argument("--world", default="digits", help="digits (default) | detail")
    p.add_argument("--config", help=f"YAML file or packaged config name (default: the world's, {DEFAULT_DEMO_CONFIG} "
                                    "for digits)")
    p.add_argument("--out", help="demo folder (default: runs/demo, runs/demo_detail for the detail world)")
    p.add_argument("--results", help="also rewrite the sections of this markdown file (docs/results.md)")
    p.add_argument("--train-teacher", action="store_true",
                   help="train the teacher from scratch instead of starting from the shipped one")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.set_defaults(func=cmd_demo)
    return parser


def _leave_process_group() -> None:
    """Under torchrun: wait for every rank (rank 0 writes the last files), then close the process group. A gloo
    process that exits with its group open can abort at interpreter shutdown, failing the whole job. The collection
    first: a DDP module caught in a reference cycle keeps the group alive through its reducer until the interpreter
    tears down, where gloo's threads abort the process ("terminate called without an active exception")."""
    dist = sys.modules.get("torch.distributed")  # never imported: no group to leave
    if dist is not None and dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # dotted overrides may sit on both sides of an option (`... a.b=1 --resume latest c.d=2`): argparse only takes
    # one run of positionals, so the rest are collected here
    stray = [a for a in extra if not (hasattr(args, "overrides") and "=" in a and not a.startswith("-"))]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    args.argv = argv
    warnings.filterwarnings("ignore", message=".*Matrix is singular.*")
    try:
        args.func(args)
        _leave_process_group()
    except Preempted as err:
        print(f"twostep: {err}", file=sys.stderr)
        return err.exit_code
    except TwostepError as err:
        print(f"twostep: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("twostep: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
