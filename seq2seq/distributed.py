"""The process group from torchrun's environment, and the few collectives training needs.

Under ``torchrun`` every process sees RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT;
without them (or with WORLD_SIZE=1) we run as one process and every helper here is a no-op, so
the training loop has no single-process branches. Backend: gloo on CPU (tests run distributed
on a laptop), NCCL on CUDA.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: its global rank, the number of processes, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files and logs."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _pick_device(device: str, local_rank: int) -> torch.device:
    """Resolve "auto" | "cpu" | "cuda" to this process's device; set the current CUDA device."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but CUDA is not available; "
                         "use train.device=cpu or auto")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA "
                         "devices are visible; start fewer processes per node")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group described by torchrun's environment (or run as one process).

    ``device``: "auto" (CUDA when available), "cpu" or "cuda". With CUDA each process uses
    ``cuda:LOCAL_RANK``. Raises ValueError for a CUDA request without CUDA or a bad environment.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world_size}; launch with torchrun")
    target = _pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(n)]
        if missing:
            raise ValueError(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set; "
                             "launch with torchrun")
        backend = "nccl" if target.type == "cuda" else "gloo"
        extra = {"device_id": target} if target.type == "cuda" else {}
        dist.init_process_group(backend, rank=rank, world_size=world_size, **extra)
        if rank == 0:
            log.info("process group: backend %s, %d processes", backend, world_size)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=target)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shutdown() -> None:
    """Leave the process group, if one was created."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes in place and return it (unchanged in one process).

    With NCCL the tensor must live on this process's CUDA device.
    """
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s ``obj`` on every process (a picklable Python object)."""
    if not _active():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def barrier() -> None:
    """Wait until every process arrives (no-op in one process)."""
    if _active():
        dist.barrier()
