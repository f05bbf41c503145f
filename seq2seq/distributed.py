"""The process group from torchrun's environment, and the few collectives training needs.

Under ``torchrun`` every process sees RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT;
without them we run as one process and every helper here is a no-op, so the training loop has no
single-process branches. torchrun with one process (WORLD_SIZE=1 with MASTER_ADDR) still makes a
group of one, so a single GPU runs every collective through NCCL. Backend: gloo on CPU (tests run
distributed on a laptop), NCCL on CUDA.

Collectives take and return Python numbers; the tensors they travel in are made here, on the
device the group's backend accepts (NCCL: this process's GPU; gloo: the CPU), so no caller can
hand NCCL a CPU tensor. No other module calls ``torch.distributed`` (a test holds this).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class DistributedError(ValueError):
    """A launch that cannot work (bad torchrun environment, more processes than GPUs)."""


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
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """The one rule for a device setting, in training and in inference: "auto" (CUDA when
    available, else the CPU), "cpu", "cuda" (this process's GPU: ``cuda:LOCAL_RANK``) or
    "cuda:N"; a device that cannot be used is a DistributedError that names the fix."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or re.fullmatch(r"cuda:\d+", device):
        if not torch.cuda.is_available():
            raise DistributedError(f"device {device!r}: CUDA is not available; use cpu or auto")
        return torch.device("cuda", local_rank) if device == "cuda" else torch.device(device)
    raise DistributedError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")


def _pick_device(device: str, local_rank: int) -> torch.device:
    """This process's training device (:func:`resolve_device`); sets the current CUDA device."""
    target = resolve_device(device, local_rank)
    if target.type == "cpu":
        return target
    per_node = max(_env_int("LOCAL_WORLD_SIZE", 1), local_rank + 1)
    if per_node > torch.cuda.device_count():
        raise DistributedError(f"{per_node} processes on this node but only "
                               f"{torch.cuda.device_count()} CUDA devices are visible; start at "
                               "most one process per GPU (torchrun --nproc-per-node)")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group described by torchrun's environment (or run as one process).

    ``device``: "auto" (CUDA when available), "cpu" or "cuda". With CUDA each process uses
    ``cuda:LOCAL_RANK``. Raises DistributedError for a CUDA request without CUDA, more processes
    on a node than GPUs, or an environment torchrun would not make (WORLD_SIZE > 1 without
    MASTER_ADDR / MASTER_PORT).
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if not 0 <= rank < world_size:
        raise DistributedError(f"RANK={rank} is outside WORLD_SIZE={world_size}; launch with "
                               "torchrun")
    target = _pick_device(device, local_rank)
    missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(n)]
    if world_size > 1 and missing:
        raise DistributedError(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set; "
                               "launch with torchrun")
    if not missing and not dist.is_initialized():
        backend = "nccl" if target.type == "cuda" else "gloo"
        extra = {"device_id": target} if target.type == "cuda" else {}
        dist.init_process_group(backend, rank=rank, world_size=world_size, **extra)
        if rank == 0:
            log.info("process group: backend %s, %d processes", backend, world_size)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=target)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def collective_device() -> torch.device:
    """Where the group's backend takes tensors: this process's GPU for NCCL, else the CPU."""
    if _active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shutdown() -> None:
    """Leave the process group, if one was created."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """The element-wise sums of ``values`` over all processes (``values`` itself in one)."""
    if not _active():
        return [float(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def from_main(values: Sequence[float]) -> list[float]:
    """Rank 0's ``values`` on every process: one decision, taken once, for everyone."""
    if not _active():
        return [float(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.broadcast(tensor, src=0)
    return tensor.tolist()


def all_gather_object(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order (``[obj]`` in one process)."""
    if not _active():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


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
