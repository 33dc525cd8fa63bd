"""Weights and resumable training state on disk.

- weights: safetensors, loaded with shape checks that name the first bad tensor;
- training state: one ``torch.save`` file (weights, optimizer, EMA, RNG states, step, data position),
  written atomically so an interrupted save never replaces a good checkpoint.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import TwostepError
from ..utils import atomic_path


def save_weights(module: nn.Module, path: str, metadata: dict[str, str] | None = None) -> None:
    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, tmp, metadata=metadata)


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


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_training_state(path: str, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_training_state(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise TwostepError(f"no training state at {path}; start without --resume")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001
        raise TwostepError(f"training state {path} is unreadable ({err}); delete it and start again") from err
