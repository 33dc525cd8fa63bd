"""What a training step holds in memory, counted the same way on any device (CPU included, where torch keeps no
allocator statistics): the persistent training state, and the peak of the activations autograd saves.

- :func:`training_state_bytes`: every parameter (frozen base included, each storage once), the gradients, the
  optimisers' moments and the EMA copy.
- :class:`SavedActivationMeter`: a ``saved_tensors_hooks`` context that tracks the bytes of the tensors autograd
  keeps for backward while they are alive (each storage once; parameters are not activations) and records the peak.

Gradient checkpointing hides a checkpointed block's activations from the meter (``torch.utils.checkpoint`` saves
and recomputes them under hooks of its own), so it would count only the block inputs: meter with it off.

Their sum is the training memory of one step up to the allocator's slack and the transient buffers inside a kernel.
On a GPU, ``torch.cuda.max_memory_allocated`` measures the real thing (``benchmarks/gpu_check.py``).
"""

from __future__ import annotations

import torch
from torch import nn


def _storage(t: torch.Tensor):
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensors without a storage (e.g. some wrapper subclasses)
        return None


class _Saved:
    """What the pack hook stores: the tensor, and a release of its bytes when autograd drops it."""

    __slots__ = ("tensor", "meter", "key")

    def __init__(self, tensor: torch.Tensor, meter: "SavedActivationMeter", key):
        self.tensor, self.meter, self.key = tensor, meter, key

    def __del__(self):
        if self.key is not None:
            self.meter._release(self.key)


class SavedActivationMeter:
    """``with SavedActivationMeter(exclude=model.parameters()) as meter: loss.backward()``; then ``meter.peak``
    (bytes). ``exclude``: tensors whose storage is not an activation (parameters)."""

    def __init__(self, exclude=()):
        self.exclude = {s.data_ptr() for s in (_storage(t) for t in exclude) if s is not None}
        self.live = 0
        self.peak = 0
        self._refs: dict[int, list[int]] = {}  # storage pointer -> [references, bytes]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor):
        storage = _storage(tensor)
        key = None if storage is None else storage.data_ptr()
        if key is None or key in self.exclude:
            return _Saved(tensor, self, None)
        entry = self._refs.setdefault(key, [0, storage.nbytes()])
        if entry[0] == 0:
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        return _Saved(tensor, self, key)

    @staticmethod
    def _unpack(saved: _Saved) -> torch.Tensor:
        return saved.tensor

    def _release(self, key: int) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._refs[key]

    def __enter__(self) -> "SavedActivationMeter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def training_state_bytes(modules: list[nn.Module], optimizers: list, ema_tensors: list[torch.Tensor]) -> dict:
    """``{"weights", "gradients", "optimizer", "ema"}`` in bytes: each distinct parameter storage of ``modules``
    once, the gradients they hold (call after a training step), every tensor in the optimisers' state, and
    ``ema_tensors``."""
    seen: set[int] = set()
    weights = gradients = 0
    for module in modules:
        for p in module.parameters():
            storage = _storage(p)
            if storage is None or storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            weights += storage.nbytes()
            if p.grad is not None:  # call after a step: the gradients it held (unused parameters have none)
                gradients += p.grad.numel() * p.grad.element_size()
    optimizer = sum(v.numel() * v.element_size() for opt in optimizers if opt is not None
                    for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor))
    ema = sum(t.numel() * t.element_size() for t in ema_tensors)
    return {"weights": weights, "gradients": gradients, "optimizer": optimizer, "ema": ema}
