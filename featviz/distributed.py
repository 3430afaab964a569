"""torch.distributed set-up shared by `embed` and `train` (torchrun / DDP, gloo on CPU, NCCL on CUDA)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank, world size, local rank and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Whether this process is rank 0 (the one that writes outputs)."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """The device a run uses: ``auto``, ``cpu``, ``cuda`` (this process's local GPU) or ``cuda:N``.

    ``auto`` is CUDA when available (this process's local GPU), else the CPU.

    Raises:
        FeatvizError: a malformed name, CUDA asked for on a machine without it, or ``cuda:N`` past the
            last GPU.
    """
    import re

    from featviz.errors import FeatvizError

    device = device.strip().lower()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda|cuda:\d+", device):
        raise FeatvizError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N (a GPU index, e.g. cuda:1)")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise FeatvizError(f"--device {device} was asked for, but torch sees no CUDA device; use --device cpu "
                               "or auto")
        index = local_rank if device == "cuda" else int(device.split(":")[1])
        count = torch.cuda.device_count()
        if index >= count:
            raise FeatvizError(f"--device {device} was asked for, but torch sees {count} CUDA device"
                               f"{'s' if count != 1 else ''} (cuda:0..cuda:{count - 1}); use one of them, cpu or auto")
        return torch.device("cuda", index)
    return torch.device(device)


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/LOCAL_RANK), or run alone.

    The backend is NCCL on CUDA and gloo on CPU, so DDP can be tested on a laptop.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
        log.info("joined process group: rank %d/%d, backend %s, device %s", rank, world, backend, dev)
    return DistInfo(rank, world, local, dev)


def shard(n: int, info: DistInfo) -> range:
    """The contiguous slice of ``range(n)`` this rank handles (sizes differ by at most one)."""
    per, extra = divmod(n, info.world_size)
    start = info.rank * per + min(info.rank, extra)
    return range(start, start + per + (1 if info.rank < extra else 0))


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, in rank order (just ``[obj]`` without a process group)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank (just ``obj`` without a process group)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    """Wait for every process (a no-op when running alone)."""
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    """Leave the process group if this process joined one."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
