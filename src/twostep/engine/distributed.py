"""torchrun awareness: rank, world size, a process group when there is more than one process, FSDP2 sharding.

Every helper is a no-op in a plain single process, so the same command runs with and without torchrun. The
process group uses NCCL when CUDA is there and gloo otherwise (the CPU tests run two gloo processes).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from twostep.core.utils import rank


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


def shards_student(form: str) -> bool:
    """FSDP2 applies: full per-step copies under torchrun (LoRA trains with DDP, one process unsharded)."""
    return form == "full" and world_size() > 1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo takes CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any (a skipped update or a stop request must be agreed, or the
    ranks' collectives fall out of step)."""
    if not is_distributed():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each scalar averaged over the ranks that logged it (equal slices of the global batch: the global batch's
    mean). A rank's logs may lack a term its slice gave no value for, so the dicts are gathered, not reduced."""
    if not is_distributed():
        return values
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {k: float(v) for k, v in values.items()})
    keys = list(values) + sorted({k for logs in gathered for k in logs} - set(values))
    return {k: sum(logs[k] for logs in gathered if k in logs) / sum(k in logs for logs in gathered) for k in keys}


def broadcast_object(value):
    """Rank 0's ``value`` (plain data: strings, numbers, tuples) on every rank."""
    if not is_distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def shard_backbone(backbone: torch.nn.Module, param_dtype: str, reduce_dtype: str) -> None:
    """FSDP2 in place: ``fully_shard`` on every transformer block, then on the transformer (the root: it holds the
    embedders and the final layer). The root is the transformer, not the backbone wrapper, because the backbone's
    ``velocity`` and ``features`` call the transformer's ``forward``, where FSDP2 gathers the parameters."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from twostep.core.dtypes import DTYPES

    policy = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[reduce_dtype])
    transformer = backbone.transformer
    for block in backbone.shard_units():  # the adapter knows its transformer's blocks
        fully_shard(block, mp_policy=policy)
    fully_shard(transformer, mp_policy=policy)


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor (a plain tensor is returned as is)."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor gathered from every rank's shard (a collective: every rank must call it)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def like_layout(value: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """A whole tensor ``value`` laid out as ``template`` (this rank's shard if ``template`` is sharded)."""
    if not is_sharded(template) or is_sharded(value):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(template.device, template.dtype), template.device_mesh, template.placements)
