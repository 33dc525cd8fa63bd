"""``twostep ship-teacher`` and the demo's question "is the shipped teacher the one this config trains?".

Kept apart from :mod:`twostep.offline.shipped` (checksums and provenance, which the teacher loader uses) because
this module needs the teacher and its evaluation.
"""

from __future__ import annotations

import json
import os
import shutil

from twostep.core.errors import TwostepError
from twostep.core.utils import atomic_dir, file_sha256, platform_summary, read_json_object, write_text
from twostep.offline.shipped import (
    EVAL_STEPS,
    EXTRA_DIRS,
    PROVENANCE,
    SHIPPED_ROOT,
    TEACHER_FILES,
    WORLDS,
    config_difference,
    last_logged_loss,
    read_provenance,
    shipped_teacher_dir,
    verify_shipped,
    write_provenance,
)


def resolved_teacher_config(path: str) -> dict:
    """A teacher ``config.yaml`` resolved to a full dict (keys added since it was written take their defaults)."""
    from twostep.core.config import load_config, to_dict
    from twostep.offline.teacher import TeacherConfig

    return to_dict(load_config(TeacherConfig, path))


def shipped_config(world: str = "digits") -> dict:
    """The resolved teacher config the shipped teacher was trained with (its ``config.yaml``), unverified."""
    return resolved_teacher_config(os.path.join(SHIPPED_ROOT, world, "config.yaml"))


def matching_shipped_teacher(teacher_cfg: dict, world: str | None = None) -> tuple[str | None, str]:
    """``(folder, "")`` when ``world``'s (default: the config's world) shipped teacher was trained with exactly
    the resolved teacher config ``teacher_cfg``, else ``(None, reason)``."""
    world = world or teacher_cfg.get("world", "digits")
    if world not in WORLDS or not os.path.isfile(os.path.join(SHIPPED_ROOT, world, "config.yaml")):
        return None, f"no shipped {world} teacher is installed"
    diff = config_difference(teacher_cfg, shipped_config(world))
    if diff:
        shown = ", ".join(diff[:4]) + (f" and {len(diff) - 4} more" if len(diff) > 4 else "")
        return None, f"the config's teacher section differs from the shipped {world} teacher's ({shown})"
    return shipped_teacher_dir(world), ""


def ship_teacher(run_dir: str, world: str, out: str | None = None, command: str | None = None,
                 steps=EVAL_STEPS, num_samples: int | None = None) -> dict:
    """Build a shipped-teacher folder from a finished ``train-teacher`` run: copy, evaluate, record.

    The training record (command, machine, wall time) comes from ``RUN/provenance.json`` when the run has one,
    else from ``RUN/meta.json`` plus ``command``. Returns the new folder's provenance.
    """
    import yaml

    from twostep.offline.evaluate import evaluate_teacher_steps, format_table
    from twostep.offline.teacher import load_teacher

    if world not in WORLDS:
        raise TwostepError(f"unknown world {world!r} for ship-teacher (known: {', '.join(WORLDS)})")
    out = os.path.abspath(out or os.path.join(SHIPPED_ROOT, world))
    load_teacher(run_dir)  # a complete, loadable run (verified when it has a provenance.json)
    run_prov = read_provenance(run_dir) if os.path.isfile(os.path.join(run_dir, PROVENANCE)) else {}
    meta_path = os.path.join(run_dir, "meta.json")
    meta = read_json_object(meta_path, what="run record") if os.path.isfile(meta_path) else {}
    command = command or run_prov.get("command")
    if not command:
        raise TwostepError(f"{run_dir} has no {PROVENANCE}; give the command that trained it with --command")
    final_loss = run_prov.get("final_loss", last_logged_loss(run_dir))
    trained_world = resolved_teacher_config(os.path.join(run_dir, "config.yaml")).get("world", "digits")
    if trained_world != world:
        raise TwostepError(f"{run_dir} is a {trained_world} teacher, not a {world} one; pass --world {trained_world}")

    with atomic_dir(out) as tmp:
        for name in TEACHER_FILES:
            shutil.copy2(os.path.join(run_dir, name), os.path.join(tmp, name))
        config = resolved_teacher_config(os.path.join(run_dir, "config.yaml"))
        write_text(os.path.join(tmp, "config.yaml"), yaml.safe_dump(config, sort_keys=False))  # every key explicit
        for name in EXTRA_DIRS:
            if os.path.isdir(os.path.join(run_dir, name)):
                shutil.copytree(os.path.join(run_dir, name), os.path.join(tmp, name))
        shipped = load_teacher(tmp)
        result = evaluate_teacher_steps(shipped, steps, num_samples=num_samples)
        result["command"] = (f"twostep eval --model {_shown(out)} --steps {','.join(map(str, steps))} --out "
                             f"{_shown(os.path.join(out, 'eval.json'))}")
        write_text(os.path.join(tmp, "eval.json"), json.dumps(result, indent=2) + "\n")
        write_text(os.path.join(tmp, "eval.md"), f"# Shipped {world} teacher: step sweep\n\n"
                   f"{result['num_samples']} samples per row, same noise (seed {result['noise_seed']}), shift "
                   f"{result['shift']}; samples/s measured on {platform_summary()}.\n"
                   f"Made by `{result['command']}`.\n\n{format_table(result)}\n")
        prov = write_provenance(
            tmp, config,
            run_prov.get("train_wall_s", meta.get("train_wall_s")), command,
            reproduce=f"twostep train-teacher --config {_shown(os.path.join(out, 'config.yaml'))} --out runs/teacher",
            machine=run_prov.get("machine") or meta.get("machine"), torch_version=run_prov.get("torch"),
            world=world, final_loss=final_loss, weights_sha256=file_sha256(os.path.join(tmp, "teacher.safetensors")),
            eval_8_step_fd=result["steps"].get("8", {}).get("fd_real"), evaluated_on=platform_summary())
    verify_shipped(out)
    return prov


def _shown(path: str) -> str:
    """A path as a command should show it: relative to the checkout when inside it, else absolute."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(SHIPPED_ROOT))))  # src/twostep/offline/shipped
    rel = os.path.relpath(os.path.abspath(path), repo)
    return rel if not rel.startswith("..") else os.path.abspath(path)
