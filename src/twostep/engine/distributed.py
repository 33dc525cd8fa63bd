"""torchrun awareness: rank, world size, a process group when there is more than one process.

Every helper is a no-op in a plain single process, so the same command runs with and without torchrun. The
process group uses NCCL when CUDA is there and gloo otherwise (the CPU tests run two gloo processes).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..utils import rank


def world_size() -> int:
    """Processes in the job (``WORLD_SIZE`` under torchrun, 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_process_group() -> bool:
    """Join the torchrun job's process group (once); False in a single process."""
    if world_size() <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend)
    return True


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def my_items(count: int) -> list[int]:
    """This rank's share of ``range(count)`` (round-robin: item i goes to rank i % world size)."""
    return list(range(rank(), count, world_size()))


def rank_device(device: torch.device) -> torch.device:
    """Under torchrun each process takes its own GPU (``cuda:LOCAL_RANK``); other devices are returned as given."""
    if device.type == "cuda" and world_size() > 1:
        return torch.device("cuda", local_rank())
    return device
