"""Reading any diffusers pipeline folder (or hub id): resolving it, fingerprinting a component, picking a device.

Nothing here knows a family; each family's own checks (``families/<name>/``) build on it.
"""

from __future__ import annotations

import hashlib
import os

import torch

from twostep.core.errors import TwostepError
from twostep.core.utils import read_json_file, resolve_device

MIN_RESOLUTION, MAX_RESOLUTION = 16, 8192  # config range; each family checks its exact rule against the folder


def read_pipeline_json(path: str, what: str) -> dict:
    """A JSON object of a pipeline folder; anything else is one error that names the file."""
    data = read_json_file(path, what=what, hint="the pipeline folder is damaged: download it again")
    if not isinstance(data, dict):
        raise TwostepError(f"{path}: {what} must hold a JSON object; the pipeline folder is damaged: download it "
                           "again")
    return data


def resolve_pipeline_dir(path_or_id: str, need: tuple[str, ...] = ("transformer",)) -> str:
    """A local folder for ``path_or_id``: the folder itself, or the hub snapshot of the components in ``need``
    (downloaded when online; ``train`` needs only the transformer, not the whole pipeline)."""
    if os.path.isdir(path_or_id):
        return os.path.abspath(path_or_id)
    if os.path.exists(path_or_id):
        raise TwostepError(f"{path_or_id} is a file, not a pipeline folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["model_index.json", "scheduler/*", "vae/config.json"] + [f"{part}/*" for part in need]
    try:
        return snapshot_download(path_or_id, allow_patterns=patterns)
    except (HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError, OSError) as err:
        raise TwostepError(f"{path_or_id!r} is neither a local folder nor a reachable hub model "
                           f"({type(err).__name__}); pass the folder of a downloaded pipeline") from err


def component_fingerprint(folder: str, component: str) -> str:
    """Cheap identity of one component (config + weight file names, sizes and first MiB), not a full hash of
    many GB of weights: enough to tell a cache made by another model or revision."""
    root = os.path.join(folder, component)
    h = hashlib.sha256()
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            continue
        h.update(name.encode())
        h.update(str(os.path.getsize(path)).encode())
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
    return h.hexdigest()


def pick_device(name: str | None = "auto") -> torch.device:
    """``auto`` (or None): the GPU when there is one; any other name is checked by
    :func:`twostep.core.utils.resolve_device` (the one device check of every command)."""
    return resolve_device(name)


def teacher_name(model_path: str, fingerprint: str | None) -> str:
    """A hub id as it is; a local folder as ``name (fingerprint abc123…)`` without its path (model cards record
    no absolute path)."""
    if os.path.isdir(model_path) or os.path.isabs(model_path):
        name = os.path.basename(os.path.normpath(model_path))
        return f"{name} (local folder, fingerprint {str(fingerprint)[:12]})"
    return model_path
