"""Run folders: the checks before a run writes anything, starting and replacing a run, checkpoint scheduling, resume
with a config comparison, and reading a checkpoint's student weights.

The folder itself is described in ``train.py``; the checkpoint format in ``checkpoint.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import torch

from twostep.core.config import class_defaults, flatten, predated_keys, save_config, to_dict
from twostep.core.errors import TwostepError
from twostep.core.utils import (
    check_output_dir,
    check_replaceable_dir,
    ensure_writable_dir,
    is_main_process,
    write_text,
)
from twostep.engine.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    find_resumable,
    prune_checkpoints,
    read_state_json,
    remove_stale_temporaries,
    save_state,
    verify_state,
)
from twostep.engine.train_config import RunConfig

Tensor = torch.Tensor


def is_due(step: int, every: int, last_step: int) -> bool:
    """Whether a periodic action (log, sample, evaluation, checkpoint every ``every`` steps) runs after ``step``;
    the last step always gets one. ``every`` 0 turns it off."""
    return every > 0 and (step % every == 0 or step == last_step)


def write_checkpoint(run_dir: str, step: int, state: dict, keep_last: int, keep_every: int) -> str:
    """``RUN/checkpoints/step_XXXXXX/`` (checksummed, atomic; refused when any tensor is non-finite), then retention:
    the newest ``keep_last`` and every multiple of ``keep_every`` stay. Rank 0 calls it; under FSDP2 every rank does
    (each writes its shards). Returns the folder."""
    root = os.path.join(run_dir, "checkpoints")
    path = checkpoint_dir(root, step)
    save_state(path, state, what=f"checkpoint at step {step}")
    if is_main_process():
        prune_checkpoints(root, keep_last, keep_every, current=step)
    return path


# Config keys that define what a checkpoint's tensors are (or the teacher and data they were fitted to): a resume
# that changes one is refused. A trailing "." covers a whole section.
IDENTITY_KEYS = ("student.sigmas", "student.params", "student.form", "student.lora_rank", "student.fake_score_rank",
                 "student.lora_targets", "discriminator.blocks", "discriminator.hidden", "teacher.", "teacher_data.",
                 "model.path")
# Keys that do not change what a run computes: a resume may change them freely.
OPERATIONAL_KEYS = ("train.threads", "train.log_every", "train.checkpoint_every", "train.keep_last",
                    "train.keep_every", "train.max_bad_steps")


def _matches(key: str, patterns) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def check_config_change(saved: dict, new: dict, where: str, allow_change: bool, identity_keys=IDENTITY_KEYS,
                        operational_keys=OPERATIONAL_KEYS, defaults: dict | None = None) -> list[str]:
    """Compare a checkpoint's config with the one a resume would use. Identity keys that differ are refused;
    other differences are refused unless ``allow_change`` (``--allow-config-change``). A key the checkpoint
    predates (written by an older twostep) that the resume leaves at its default in ``defaults`` (the config
    class's defaults) is no change: new keys default to the behaviour before them. Returns the changes accepted
    and the keys taken at their default, as ``"key: old -> new"``."""
    old, cur, default = flatten(saved), flatten(new), flatten(defaults or {})
    predates = predated_keys(old, cur, default)
    changed = [k for k in sorted(set(old) | set(cur)) if old.get(k) != cur.get(k) and k not in predates]
    fixed = [f"'{k}' ({old.get(k)!r} in {where}, {cur.get(k)!r} now)" for k in changed if _matches(k, identity_keys)]
    if fixed:
        raise TwostepError(f"--resume: config key {', '.join(fixed)} differs; "
                           + ("it defines" if len(fixed) == 1 else "they define") + " the checkpoint's tensors (or the "
                           "teacher and data they fit), so the run cannot continue; start a new run in another --out")
    notable = [f"{k}: {old.get(k)!r} -> {cur.get(k)!r}" for k in changed if not _matches(k, operational_keys)]
    if notable and not allow_change:
        raise TwostepError(f"--resume: the config differs from {where} in " + ", ".join(notable)
                           + "; add --allow-config-change to continue with the new values")
    return notable + [f"{k}: (absent: {where} predates it) -> {cur[k]!r}, its default" for k in predates]


def prepare_resume(cfg: RunConfig, run_dir: str, resume: str | None, allow_config_change: bool = False,
                   identity_keys=IDENTITY_KEYS, operational_keys=OPERATIONAL_KEYS) -> str | None:
    """Checks only, writes nothing: the verified checkpoint to resume from (None for a fresh run), after
    comparing its config with ``cfg`` (:func:`check_config_change`). ``--resume latest`` falls back past an
    incomplete or corrupt newest checkpoint and says so. Under torchrun rank 0 checks (reading every file of a
    sharded checkpoint once, not once per process) and the other ranks take its answer."""
    from twostep.engine.distributed import broadcast_object, is_distributed

    if not resume:
        return None
    args = (cfg, run_dir, resume, allow_config_change, identity_keys, operational_keys)
    if not is_distributed():
        return _verified_resume(*args)
    outcome, error = None, None
    if is_main_process():
        try:
            outcome = ("checkpoint", _verified_resume(*args))
        except TwostepError as err:
            outcome, error = ("error", str(err)), err
    kind, value = broadcast_object(outcome)
    if error is not None:
        raise error
    if kind == "error":
        raise TwostepError(value)
    return value


def _verified_resume(cfg: RunConfig, run_dir: str, resume: str, allow_config_change: bool, identity_keys,
                     operational_keys) -> str:
    if os.path.isfile(run_dir):
        raise TwostepError(f"--resume: {run_dir} is a file, not a run folder")
    root = os.path.join(run_dir, "checkpoints")
    if resume == "latest":
        checkpoint = find_resumable(root, report=lambda message: print(f"twostep: {message}"))
        if checkpoint is None:
            raise TwostepError(f"--resume latest: no checkpoint in {root}; start without --resume")
    else:
        checkpoint = resume
        verify_state(checkpoint)
    saved = read_state_json(checkpoint).get("config")
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {checkpoint} records no config")
    defaults = class_defaults(type(cfg))
    changes = check_config_change(saved, to_dict(cfg), os.path.basename(checkpoint), allow_config_change,
                                  identity_keys=identity_keys, operational_keys=operational_keys,
                                  defaults=None if defaults is None else to_dict(defaults))
    for change in changes:
        print(f"twostep: resuming with a changed config: {change}")
    return checkpoint


RUN_FILES = ("config.yaml", "train_log.jsonl", "checkpoints", "student.safetensors", "meta.json", "replaced.txt")


def check_fresh_run_dir(run_dir: str, overwrite: bool, protected: tuple[str, ...] = ()) -> None:
    """Checks only, for a run started without ``--resume``: its folder must be new or empty, unless ``overwrite``
    (which never replaces the working folder or a ``protected`` one, e.g. the teacher or the data, or a parent)."""
    check_output_dir(run_dir, what="training run folder")
    if overwrite:
        check_replaceable_dir(run_dir, True, "training run folder", protected=protected)
    if not os.path.isdir(run_dir) or not os.listdir(run_dir) or overwrite:
        return
    if any(os.path.exists(os.path.join(run_dir, name)) for name in RUN_FILES):
        raise TwostepError(f"{run_dir} already holds a training run; continue it with --resume latest (add "
                           "train.steps=N --allow-config-change to extend it), choose another --out, or pass "
                           "--overwrite to replace it")
    raise TwostepError(f"training run folder {run_dir} is not empty and is not a run; choose another --out, or pass "
                       "--overwrite to replace its contents")


def start_run(cfg: RunConfig, run_dir: str, overwrite: bool = False) -> str | None:
    """After every check passed: create the run folder, save the resolved config, remove what killed writes left.

    With ``overwrite``, a non-empty folder is first moved aside to ``RUN.replaced-TIME`` (returned): the caller
    deletes it with :func:`discard_replaced` once the new run has finished, so a failed new run loses nothing."""
    backup = None
    if overwrite and os.path.isdir(run_dir) and os.listdir(run_dir) and is_main_process():
        backup = f"{os.path.normpath(run_dir)}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(run_dir, backup)
        print(f"twostep: the previous contents of {run_dir} were moved to {backup}; they are deleted when this run "
              "finishes")
    ensure_writable_dir(run_dir, what="training run folder")
    if backup:  # recorded, so that a preempted and resumed run still deletes it when it finishes
        write_text(os.path.join(run_dir, REPLACED), os.path.abspath(backup) + "\n")
    if is_main_process():
        for folder in (run_dir, os.path.join(run_dir, "checkpoints")):
            for path in remove_stale_temporaries(folder):
                print(f"twostep: removed {path}, left by an interrupted write")
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
    return backup


REPLACED = "replaced.txt"  # the folder an --overwrite run moved aside, deleted when the run finishes


def discard_replaced(run_dir: str) -> None:
    """Delete what ``--overwrite`` moved aside (recorded in ``RUN/replaced.txt``), once the new run has finished."""
    record = os.path.join(run_dir, REPLACED)
    if is_main_process() and os.path.isfile(record):
        backup = open(record, encoding="utf-8").read().strip()
        if backup.startswith(os.path.normpath(os.path.abspath(run_dir)) + ".replaced-"):  # only ever that folder
            shutil.rmtree(backup, ignore_errors=True)
        os.remove(record)


def check_run_dir(cfg: RunConfig, run_dir: str, resume: str | None, allow_config_change: bool = False,
                  overwrite: bool = False, protected: tuple[str, ...] = ()) -> str | None:
    """Every check on the run folder before a run writes anything: :func:`prepare_resume` with ``--resume``,
    else :func:`check_fresh_run_dir`. Returns the checkpoint to resume from (or None)."""
    if overwrite and resume:
        raise TwostepError("--overwrite replaces a run; it cannot be combined with --resume")
    if allow_config_change and not resume:
        raise TwostepError("--allow-config-change only applies with --resume")
    if resume:
        return prepare_resume(cfg, run_dir, resume, allow_config_change)
    check_fresh_run_dir(run_dir, overwrite, protected)
    return None


def checkpoint_student_weights(run_dir: str, checkpoint: str) -> tuple[str, dict[str, Tensor]]:
    """``(folder, EMA weights of the trainable parameters by name)`` from a checkpoint (``latest`` or a folder),
    what :func:`save_student_weights` would have written at its step; an FSDP2 checkpoint's shards are gathered
    whole in this process."""
    from twostep.engine.checkpoint import load_whole_state

    if checkpoint == "latest":
        root = os.path.join(run_dir, "checkpoints")
        folder = find_resumable(root, report=lambda message: print(f"twostep: {message}"))
        if folder is None:
            raise TwostepError(f"--checkpoint latest: no checkpoint in {root}")
    else:
        folder = checkpoint
    state = load_whole_state(folder)
    names, ema = state.get("ema_names"), state.get("ema")
    if not isinstance(names, dict) or not isinstance(ema, dict) or set(names) != set(ema):
        raise CheckpointError(f"checkpoint {folder} does not record its EMA weights' names (written by an older "
                              "twostep); export the finished run's student.safetensors instead")
    weights = {}
    for group, group_names in names.items():
        if len(group_names) != len(ema[group]):
            raise CheckpointError(f"checkpoint {folder}: EMA group {group!r} has {len(ema[group])} tensors for "
                                  f"{len(group_names)} names")
        weights.update({name: value.float() for name, value in zip(group_names, ema[group])})
    return folder, weights


def write_meta(run_dir: str, meta: dict) -> None:
    if is_main_process():
        write_text(os.path.join(run_dir, "meta.json"), json.dumps(meta, indent=2) + "\n")
