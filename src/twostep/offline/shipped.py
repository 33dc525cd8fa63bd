"""Shipped toy teachers: trained once, checked in with their provenance and evaluation table.

A real user starts from a downloaded Z-Image-Turbo; the offline worlds start from these. Each world's teacher
lives in ``twostep/offline/shipped/<world>/`` and holds what :func:`twostep.offline.teacher.load_teacher` reads::

    teacher.safetensors, config.yaml, prompt_embeds.safetensors, text/   the teacher run (EMA weights, config)
    eval.json, eval.md                                                  its step sweep (`twostep eval`)
    provenance.json   config, seed, steps, the command that made it, torch version, machine, train wall time,
                      and the sha256 of every other file in the folder

``twostep ship-teacher RUN --world W`` builds such a folder from a finished ``twostep train-teacher`` run
(which writes the same ``provenance.json`` into its run folder; see :mod:`twostep.offline.ship`). A file that fails
its checksum is refused.
"""

from __future__ import annotations

import json
import os

from twostep.core.errors import TwostepError
from twostep.core.utils import file_sha256, platform_summary, read_jsonl_file, write_text

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


def write_provenance(folder: str, config: dict, train_wall_s: float | None, command: str,
                     reproduce: str | None = None, machine: str | None = None, torch_version: str | None = None,
                     **extra) -> dict:
    """Write ``folder/provenance.json``: how the teacher was made (``machine``, ``torch_version``: where it was
    trained, default this one) and the sha256 of every file in ``folder``."""
    import torch

    extra.setdefault("final_loss", last_logged_loss(folder))
    prov = {
        "config": config, "seed": config.get("seed"), "steps": config.get("train", {}).get("steps"),
        "command": command, "reproduce": reproduce or command, "torch": torch_version or torch.__version__,
        "machine": machine or platform_summary(), "train_wall_s": train_wall_s, **extra,
        "sha256": folder_sha256s(folder),
    }
    write_text(os.path.join(folder, PROVENANCE), json.dumps(prov, indent=2) + "\n")
    return prov


def last_logged_loss(run_dir: str) -> float | None:
    """The last training loss in ``RUN/train_log.jsonl`` (None without a log)."""
    path = os.path.join(run_dir, "train_log.jsonl")
    if not os.path.isfile(path):
        return None
    records = read_jsonl_file(path, what="training log")
    return records[-1].get("loss") if records else None
