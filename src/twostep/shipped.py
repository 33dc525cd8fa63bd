"""Shipped toy teachers: trained once, checked in with their provenance and evaluation table.

A real user starts from a downloaded Z-Image-Turbo; the offline worlds start from these. Each world's teacher
lives in ``twostep/shipped/<world>/`` and holds what :func:`twostep.teacher.load_teacher` reads::

    teacher.safetensors, config.yaml, prompt_embeds.safetensors, text/   the teacher run (EMA weights, config)
    eval.json, eval.md                                                  its step sweep (`twostep eval`)
    provenance.json   config, seed, steps, the command that made it, torch version, machine, train wall time,
                      and the sha256 of every other file in the folder

``twostep ship-teacher RUN --world W`` builds such a folder from a finished ``twostep train-teacher`` run
(which writes the same ``provenance.json`` into its run folder). A file that fails its checksum is refused.
"""

from __future__ import annotations

import json
import os
import shutil

from .errors import TwostepError
from .utils import atomic_dir, file_sha256, read_json_object, read_jsonl_file, write_text

SHIPPED_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shipped")
WORLDS = ("digits", "detail")
PROVENANCE = "provenance.json"
TEACHER_FILES = ("teacher.safetensors", "config.yaml", "prompt_embeds.safetensors")  # what load_teacher reads
EXTRA_DIRS = ("text",)  # the tiny tokenizer + text encoder the prompt embeddings came from (~100 kB)
EVAL_STEPS = [1, 2, 4, 8, 16]
RETRAIN_HINT = "reinstall or retrain with `twostep train-teacher`"


def folder_sha256s(folder: str) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder`` except ``provenance.json`` and hidden files."""
    hashes = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if rel != PROVENANCE and not name.startswith("."):
                hashes[rel] = file_sha256(os.path.join(root, name))
    return hashes


def read_provenance(folder: str) -> dict:
    path = os.path.join(folder, PROVENANCE)
    try:
        with open(path, encoding="utf-8") as f:
            prov = json.load(f)
    except FileNotFoundError:
        raise TwostepError(f"{path} is missing; {RETRAIN_HINT}") from None
    except (OSError, ValueError) as err:
        raise TwostepError(f"{path} cannot be read ({err}); {RETRAIN_HINT}") from None
    if not isinstance(prov, dict) or not isinstance(prov.get("sha256"), dict):
        raise TwostepError(f"{path} has no sha256 table; {RETRAIN_HINT}")
    return prov


def verify_shipped(folder: str, files=None) -> dict:
    """Check the sha256 of every file listed in ``folder/provenance.json`` (or only those in ``files``).

    Returns the provenance; a missing or altered file raises a one-line :class:`TwostepError` naming it.
    """
    prov = read_provenance(folder)
    for rel, expected in prov["sha256"].items():
        if files is not None and rel not in files:
            continue
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            raise TwostepError(f"teacher file {path} is missing (listed in {PROVENANCE}); {RETRAIN_HINT}")
        got = file_sha256(path)
        if got != expected:
            raise TwostepError(f"teacher file {path} fails its sha256 check (expected {expected[:16]}…, "
                               f"got {got[:16]}…); {RETRAIN_HINT}")
    return prov


def shipped_teacher_dir(world: str = "digits") -> str:
    """The verified folder of ``world``'s shipped teacher (raises :class:`TwostepError` if absent or altered)."""
    if world not in WORLDS:
        raise TwostepError(f"no shipped teacher for world {world!r} (shipped: {', '.join(WORLDS)}); train one "
                           f"with `twostep train-teacher`")
    path = os.path.join(SHIPPED_ROOT, world)
    if not os.path.isdir(path):
        raise TwostepError(f"the shipped {world} teacher ({path}) is not installed; {RETRAIN_HINT}")
    verify_shipped(path)
    return path


def resolved_teacher_config(path: str) -> dict:
    """A teacher ``config.yaml`` resolved to a full dict (keys added since it was written take their defaults)."""
    from .config import load_config, to_dict
    from .teacher import TeacherConfig

    return to_dict(load_config(TeacherConfig, path))


def shipped_config(world: str = "digits") -> dict:
    """The resolved teacher config the shipped teacher was trained with (its ``config.yaml``), unverified."""
    return resolved_teacher_config(os.path.join(SHIPPED_ROOT, world, "config.yaml"))


def config_difference(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    keys = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += config_difference(va, vb, f"{prefix}{key}.")
        elif va != vb:
            keys.append(f"{prefix}{key}")
    return keys


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


def write_provenance(folder: str, config: dict, train_wall_s: float | None, command: str,
                     reproduce: str | None = None, machine: str | None = None, torch_version: str | None = None,
                     **extra) -> dict:
    """Write ``folder/provenance.json``: how the teacher was made (``machine``, ``torch_version``: where it was
    trained, default this one) and the sha256 of every file in ``folder``."""
    import torch

    from .teacher import platform_summary

    extra.setdefault("final_loss", last_logged_loss(folder))
    prov = {
        "config": config, "seed": config.get("seed"), "steps": config.get("train", {}).get("steps"),
        "command": command, "reproduce": reproduce or command, "torch": torch_version or torch.__version__,
        "machine": machine or platform_summary(), "train_wall_s": train_wall_s, **extra,
        "sha256": folder_sha256s(folder),
    }
    write_text(os.path.join(folder, PROVENANCE), json.dumps(prov, indent=2) + "\n")
    return prov


def ship_teacher(run_dir: str, world: str, out: str | None = None, command: str | None = None,
                 steps=EVAL_STEPS, num_samples: int | None = None) -> dict:
    """Build a shipped-teacher folder from a finished ``train-teacher`` run: copy, evaluate, record.

    The training record (command, machine, wall time) comes from ``RUN/provenance.json`` when the run has one,
    else from ``RUN/meta.json`` plus ``command``. Returns the new folder's provenance.
    """
    import yaml

    from .evaluate import evaluate_teacher_steps, format_table
    from .teacher import load_teacher, platform_summary

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


def last_logged_loss(run_dir: str) -> float | None:
    """The last training loss in ``RUN/train_log.jsonl`` (None without a log)."""
    path = os.path.join(run_dir, "train_log.jsonl")
    if not os.path.isfile(path):
        return None
    records = read_jsonl_file(path, what="training log")
    return records[-1].get("loss") if records else None


def _shown(path: str) -> str:
    """A path as a command should show it: relative to the checkout when inside it, else absolute."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(SHIPPED_ROOT)))
    rel = os.path.relpath(os.path.abspath(path), repo)
    return rel if not rel.startswith("..") else os.path.abspath(path)
