"""Weights and resumable training state on disk. Nothing here unpickles: a checkpoint can never run code.

- weights: safetensors, loaded with shape checks that name the first bad tensor;
- training state: one folder per checkpoint::

      step_000100/tensors.safetensors   every tensor of the state (weights, optimizer moments, EMA, RNG states)
      step_000100/state.json            everything else (step, counters, optimizer hyper-parameters, Python and
                                        NumPy RNG states, the resolved config), with tensors by reference
      step_000100/MANIFEST.json         format version, size and sha256 of the two files; written last

  The folder is built under a temporary name and renamed into place, so a killed write leaves either the previous
  checkpoints untouched plus a ``.step_*.tmp`` folder (removed at the next start) or a complete new one.
  :func:`find_resumable` verifies the newest checkpoint and falls back to an older good one, saying so.

- sharded training state (FSDP2, ``student.form: full`` under torchrun): the tensors that are sharded over the
  ranks (``DTensor``: the student's copies, their EMA and AdamW moments) go to ``step_*/sharded/`` through
  ``torch.distributed.checkpoint`` (DCP) with its safetensors storage: one ``shard-0000R-*.safetensors`` per rank,
  each tensor's offset in the safetensors header (JSON). ``state.json`` refers to them by name and the manifest
  checksums them too. :func:`load_sharded` reads them into any layout: the same or another number of processes, or
  whole tensors in one process (DCP reshards). Every rank must call :func:`save_state` for such a state.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from twostep.core.errors import TwostepError
from twostep.core.utils import atomic_dir, atomic_path, file_sha256

FORMAT = "twostep-training-state"
FORMAT_VERSION = 1
TENSORS = "tensors.safetensors"
STATE_JSON = "state.json"
MANIFEST = "MANIFEST.json"
SHARDED_DIR = "sharded"  # DCP's safetensors shards of the sharded tensors (FSDP2 runs)
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(TwostepError):
    """A checkpoint that is missing, incomplete, corrupt or of a format this version does not load."""


class NonFiniteError(TwostepError):
    """A tensor about to be saved holds NaN or infinity."""


# --------------------------------------------------------------------------- weights


def first_nonfinite(tensors: dict[str, torch.Tensor]) -> str | None:
    """Name of the first floating tensor holding NaN or inf (None when all are finite)."""
    return next((n for n, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)


def assert_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse to write ``what`` when any floating tensor holds NaN or inf (names the first one)."""
    name = first_nonfinite(tensors)
    if name is not None:
        bad = int((~torch.isfinite(tensors[name])).sum())
        raise NonFiniteError(f"refusing to save {what}: tensor '{name}' holds {bad} non-finite values; nothing "
                             "was written")


def save_weights(module: nn.Module, path: str, metadata: dict[str, str] | None = None) -> None:
    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    save_tensors(state, path, what=f"weights {path}", metadata=metadata)


def save_tensors(tensors: dict[str, torch.Tensor], path: str, what: str,
                 metadata: dict[str, str] | None = None) -> None:
    """Atomic safetensors write of finite tensors (see :func:`assert_finite`)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    assert_finite(tensors, what)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def load_weights(module: nn.Module, path: str, what: str = "checkpoint") -> None:
    """Load safetensors into ``module``; a missing file or any key/shape mismatch is a one-line error."""
    if not os.path.isfile(path):
        raise TwostepError(f"{what} {path} does not exist")
    try:
        state = load_file(path)
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise TwostepError(f"{what} {path} is not a readable safetensors file ({err})") from err
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        key = (missing or unexpected)[0]
        kind = "lacks" if missing else "has an unknown tensor"
        raise TwostepError(f"{what} {path} does not fit this model: it {kind} '{key}' "
                           f"({len(missing)} missing, {len(unexpected)} unexpected); use the config it was made with")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise TwostepError(f"{what} {path} does not fit this model: '{key}' has shape {tuple(value.shape)}, "
                               f"the config builds {tuple(own[key].shape)}; use the config it was made with")
    module.load_state_dict(state)


# --------------------------------------------------------------------------- RNG states as plain data


def rng_state() -> dict[str, Any]:
    """Torch, NumPy and Python RNG states as tensors and JSON-able values (no pickle needed to store them)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached)},
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


# --------------------------------------------------------------------------- nested state <-> tensors + JSON

_TENSOR, _TUPLE, _MAP, _SHARDED = "__tensor__", "__tuple__", "__map__", "__sharded__"


class ShardedRef(str):
    """What :func:`load_state` gives for a sharded tensor: its name in ``sharded/``, read by :func:`load_sharded`
    into a tensor of the loader's layout."""


def split_state(state: Any) -> tuple[Any, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A nested state (dicts, lists, tuples, tensors, scalars) -> (JSON-able skeleton, flat whole tensors by path,
    flat sharded tensors (``DTensor``) by path)."""
    from twostep.engine.distributed import is_sharded

    tensors: dict[str, torch.Tensor] = {}
    sharded: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            name = path or "root"
            while name in tensors or name in sharded:
                name += "_"
            if is_sharded(node):
                sharded[name] = node.detach()
                return {_SHARDED: name}
            tensors[name] = node.detach().to("cpu").contiguous()
            return {_TENSOR: name}
        if isinstance(node, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in node):
                return {k: walk(v, f"{path}/{k}" if path else k) for k, v in node.items()}
            return {_MAP: [[k, walk(v, f"{path}/{k}" if path else str(k))] for k, v in node.items()]}
        if isinstance(node, tuple):
            return {_TUPLE: [walk(v, f"{path}/{i}") for i, v in enumerate(node)]}
        if isinstance(node, list):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(node)]
        if isinstance(node, (np.integer, np.floating, np.bool_)):
            return node.item()
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"training state entry {path!r} has unsupported type {type(node).__name__}")

    return walk(state, ""), tensors, sharded


def join_state(skeleton: Any, tensors: dict[str, torch.Tensor], where: str,
               sharded: dict[str, torch.Tensor] | None = None) -> Any:
    """Inverse of :func:`split_state`; a reference to a tensor that is not there is a :class:`CheckpointError`.
    Sharded tensors come back as :class:`ShardedRef`, or from ``sharded`` (whole tensors by name) when given."""

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if set(node) == {_TENSOR}:
                if node[_TENSOR] not in tensors:
                    raise CheckpointError(f"{where}: {STATE_JSON} refers to tensor {node[_TENSOR]!r} that "
                                          f"{TENSORS} lacks")
                return tensors[node[_TENSOR]]
            if set(node) == {_SHARDED} and isinstance(node[_SHARDED], str):
                if sharded is None:
                    return ShardedRef(node[_SHARDED])
                if node[_SHARDED] not in sharded:
                    raise CheckpointError(f"{where}: {STATE_JSON} refers to tensor {node[_SHARDED]!r} that "
                                          f"{SHARDED_DIR}/ lacks")
                return sharded[node[_SHARDED]]
            if set(node) == {_TUPLE}:
                return tuple(walk(v) for v in node[_TUPLE])
            if set(node) == {_MAP}:
                return {k: walk(v) for k, v in node[_MAP]}
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(skeleton)


# --------------------------------------------------------------------------- checkpoint folders


def checkpoint_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:06d}")


def save_state(folder: str, state: dict[str, Any], what: str = "training state") -> None:
    """Write ``state`` as a checkpoint folder (see the module doc), atomically; non-finite tensors are refused.

    A state without sharded tensors is written by the one process that calls this. With sharded tensors every rank
    calls it: each writes its shards, rank 0 the rest, the manifest and the rename."""
    skeleton, tensors, sharded = split_state(state)
    if not sharded:
        assert_finite(tensors, f"{what} {folder}")
        with atomic_dir(folder) as tmp:
            _write_rest(tmp, skeleton, tensors)
        return
    _save_with_shards(folder, skeleton, tensors, sharded, what)


def _write_rest(tmp: str, skeleton: Any, tensors: dict[str, torch.Tensor], shard_files: tuple[str, ...] = ()) -> None:
    """``tensors.safetensors``, ``state.json``, then the manifest over them and any ``shard_files`` (relative)."""
    save_file(tensors, os.path.join(tmp, TENSORS))
    with open(os.path.join(tmp, STATE_JSON), "w", encoding="utf-8") as f:
        json.dump(skeleton, f)
    files = {name: {"bytes": os.path.getsize(os.path.join(tmp, name)), "sha256": file_sha256(os.path.join(tmp, name))}
             for name in (TENSORS, STATE_JSON, *shard_files)}
    with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
        json.dump({"format": FORMAT, "version": FORMAT_VERSION, "files": files}, f, indent=2)


def _save_with_shards(folder: str, skeleton: Any, tensors: dict[str, torch.Tensor],
                      sharded: dict[str, torch.Tensor], what: str) -> None:
    from contextlib import nullcontext

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    from twostep.core.utils import is_main_process
    from twostep.engine.distributed import any_rank, barrier, broadcast_object, local_part

    main = is_main_process()
    bad = first_nonfinite({name: local_part(value) for name, value in sharded.items()})
    if any_rank(bad is not None or (main and first_nonfinite(tensors) is not None)):
        raise NonFiniteError(f"refusing to save {what} {folder}: a tensor holds non-finite values"
                             + (f" ('{bad}' on this rank)" if bad else "") + "; nothing was written")
    with atomic_dir(folder) if main else nullcontext(None) as tmp:
        tmp = broadcast_object(tmp)
        dcp.save(sharded, storage_writer=HuggingFaceStorageWriter(os.path.join(tmp, SHARDED_DIR),
                                                                  save_distributed=True))
        barrier()  # every rank's shard file is complete
        if main:
            shard_files = sorted(f"{SHARDED_DIR}/{name}" for name in os.listdir(os.path.join(tmp, SHARDED_DIR)))
            _write_rest(tmp, skeleton, tensors, tuple(shard_files))
    barrier()  # renamed into place before any rank goes on (and prunes or resumes from it)


def load_sharded(folder: str, targets: dict[str, torch.Tensor]) -> None:
    """Fill ``targets`` (name -> tensor, in place) from ``folder/sharded/``. Each target's layout decides what is
    read: this rank's shard of a ``DTensor`` (any number of processes), or the whole tensor in one process."""
    import warnings

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    path = os.path.join(folder, SHARDED_DIR)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {folder} lacks {SHARDED_DIR}/, which its state.json refers to")
    single = not (dist.is_available() and dist.is_initialized())
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process.*")
            dcp.load(targets, storage_reader=HuggingFaceStorageReader(path), no_dist=single)
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {folder}: {SHARDED_DIR}/ does not fit this run ({err})".splitlines()[0]) \
            from err


def verify_state(folder: str) -> None:
    """Raise :class:`CheckpointError` unless ``folder`` is a complete checkpoint whose files match its manifest."""
    if os.path.isfile(folder):
        if folder.endswith(".pt"):
            raise old_format_error(folder)
        raise CheckpointError(f"checkpoint {folder} is a file; a checkpoint is a step_NNNNNN folder")
    if not os.path.isdir(folder):
        raise CheckpointError(f"checkpoint {folder} does not exist")
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"checkpoint {folder} is incomplete ({MANIFEST} missing: its write was interrupted)")
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError("not a twostep training state")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {folder}: {MANIFEST} is unreadable ({err})") from err
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {folder} has format version {manifest.get('version')!r}; this twostep "
                              f"reads version {FORMAT_VERSION}")
    listed = [name for name in files if isinstance(name, str)]
    for name in listed:  # a manifest is untrusted: it may only name files inside the checkpoint
        if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
            raise CheckpointError(f"checkpoint {folder}: {MANIFEST} names a file outside the checkpoint ({name!r})")
    for name in (TENSORS, STATE_JSON, *(n for n in listed if n not in (TENSORS, STATE_JSON))):
        path = os.path.join(folder, name)
        entry = files.get(name) if isinstance(files.get(name), dict) else {}
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {folder} is incomplete: {name} is missing")
        if os.path.getsize(path) != entry.get("bytes") or file_sha256(path) != entry.get("sha256"):
            raise CheckpointError(f"checkpoint {folder} is corrupt: {name} does not match its checksum in {MANIFEST}")
    shards = os.path.join(folder, SHARDED_DIR)
    if os.path.isdir(shards):  # DCP reads every file there: each must be one the manifest vouches for
        extra = sorted(set(f"{SHARDED_DIR}/{n}" for n in os.listdir(shards)) - set(listed))
        if extra:
            raise CheckpointError(f"checkpoint {folder} is corrupt: {extra[0]} is not in its {MANIFEST}")


def read_state_json(folder: str) -> dict[str, Any]:
    """The JSON half of a checkpoint (scalars, config; tensors as references), without verifying it."""
    try:
        with open(os.path.join(folder, STATE_JSON), encoding="utf-8") as f:
            skeleton = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {folder}: {STATE_JSON} is unreadable ({err})") from err
    if not isinstance(skeleton, dict):
        raise CheckpointError(f"checkpoint {folder}: {STATE_JSON} does not hold a mapping")
    return skeleton


def load_state(folder: str, verify: bool = True) -> dict[str, Any]:
    """A checkpoint folder back as the nested state :func:`save_state` was given (checksums verified first
    unless ``verify=False``, for a folder :func:`verify_state` has just passed)."""
    if verify:
        verify_state(folder)
    return join_state(read_state_json(folder), _read_tensors(folder), folder)


def _read_tensors(folder: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(os.path.join(folder, TENSORS))
    except Exception as err:  # noqa: BLE001 - a checksummed file that still fails to parse: report, never crash
        raise CheckpointError(f"checkpoint {folder}: {TENSORS} is unreadable ({err})".splitlines()[0]) from err


def load_whole_state(folder: str, verify: bool = True) -> dict[str, Any]:
    """:func:`load_state` with every sharded tensor gathered whole, in this process (``export`` from an FSDP2
    checkpoint, inspection): the sizes come from the shards' safetensors headers."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    if verify:
        verify_state(folder)
    if not os.path.isdir(os.path.join(folder, SHARDED_DIR)):
        return load_state(folder, verify=False)
    try:
        metadata = HuggingFaceStorageReader(os.path.join(folder, SHARDED_DIR)).read_metadata().state_dict_metadata
    except Exception as err:  # noqa: BLE001 - a checksummed shard that still fails to parse: report, never crash
        raise CheckpointError(f"checkpoint {folder}: {SHARDED_DIR}/ is unreadable ({err})".splitlines()[0]) from err
    whole = {name: torch.zeros(meta.size, dtype=meta.properties.dtype) for name, meta in metadata.items()}
    load_sharded(folder, whole)
    return join_state(read_state_json(folder), _read_tensors(folder), folder, sharded=whole)


def old_format_error(path: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is a training state in the old pickle format, which twostep no longer loads because unpickling can "
        "run code; start the run again without --resume (finished weights such as *.safetensors are unaffected)")


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """``[(step, folder)]`` of the checkpoint folders under ``root``, oldest first (complete or not)."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        if match and os.path.isdir(os.path.join(root, name)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return sorted(found)


def find_resumable(root: str, report: Callable[[str], None] = print) -> str | None:
    """The newest checkpoint under ``root`` that verifies; each newer one that does not is reported and skipped.
    None when there is none at all; a :class:`CheckpointError` when there are only bad or old-format ones."""
    checkpoints = list_checkpoints(root)
    if not checkpoints:
        old = sorted(p for p in os.listdir(root) if p.endswith(".pt")) if os.path.isdir(root) else []
        if old:
            raise old_format_error(os.path.join(root, old[-1]))
        return None
    for name in sorted(os.listdir(root)):
        if name.startswith(".step_") and name.endswith(".tmp"):
            report(f"{os.path.join(root, name)} is an interrupted checkpoint write; it is ignored (and removed)")
    problems = []
    for step, folder in reversed(checkpoints):
        try:
            verify_state(folder)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        for problem in problems:
            report(f"{problem}; falling back to {os.path.basename(folder)}")
        return folder
    raise CheckpointError(f"no usable checkpoint in {root}: {problems[0]}" + (
        f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))


def drop_later_checkpoints(root: str, step: int, report: Callable[[str], None] = print) -> list[str]:
    """A resume from ``step`` starts a new branch: the checkpoints after it (skipped as corrupt, or abandoned by
    ``--resume PATH``) are removed, so that retention and the next ``--resume latest`` only see this branch."""
    removed = []
    for later, folder in list_checkpoints(root):
        if later > step:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
            report(f"removed {folder}: after the resumed step {step}, from another branch of the run")
    return removed


def prune_checkpoints(root: str, keep_last: int, keep_every: int = 0, current: int | None = None) -> list[str]:
    """Delete all but the newest ``keep_last`` checkpoints up to step ``current`` (the one just written, never
    deleted), keeping any whose step is a multiple of ``keep_every`` (0: none kept that way)."""
    removed = []
    checkpoints = [(s, f) for s, f in list_checkpoints(root) if current is None or s <= current]
    for step, folder in checkpoints[:-keep_last] if keep_last else checkpoints:
        if keep_every and step % keep_every == 0 and os.path.isfile(os.path.join(folder, MANIFEST)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


# what atomic_path / atomic_dir name their temporaries for the files twostep writes: ".NAME.RANDOM.tmp|old"
_OWN_TEMPORARY = re.compile(r"^\.(step_\d+|shard-\d{5}\.safetensors|manifest(\.rank-\d+)?\.json|config\.yaml|"
                            r"train_log\.jsonl|meta\.json|[a-z_]+\.safetensors|provenance\.json|eval\.(json|md)|"
                            r"teacher_data\.yaml)\.[^.]+\.(tmp|old)$")


def remove_stale_temporaries(folder: str) -> list[str]:
    """Remove what killed atomic writes of twostep's own files left in ``folder`` (``.NAME.RANDOM.tmp`` / ``.old``
    files and folders); anything else is left alone."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in os.listdir(folder):
        if _OWN_TEMPORARY.match(name):
            path = os.path.join(folder, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)
            removed.append(path)
    return removed
