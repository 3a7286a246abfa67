"""Process-group set-up for multi-GPU training under ``torchrun`` (NCCL on CUDA, gloo on CPU).

A plain ``python``/``segcompress`` run is a world of one process and needs none of this;
``torchrun --nproc_per_node N`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, and
:func:`init_distributed` joins the group those variables describe.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the run.

    Args:
        rank: global rank (0 writes every file).
        world_size: number of processes.
        local_rank: rank on this node (picks the GPU).
        device: the device this process trains on.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None, backend: str | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment, if there is one.

    Args:
        device: ``"cpu"`` trains on the CPU even where CUDA is available; ``None``: a GPU per
            process when CUDA is available (``LOCAL_RANK`` picks it), else the CPU.
        backend: ``None`` picks ``"nccl"`` for GPUs and ``"gloo"`` for the CPU.
    """
    if device not in (None, "cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if device == "cuda" and not use_cuda:
        raise ValueError("device cuda requested but CUDA is not available; use cpu")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s); "
                "start fewer processes per node"
            )
        torch.cuda.set_device(local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if use_cuda else "gloo"))
    return current(None if use_cuda else "cpu")


def current(device: str | None = None) -> DistInfo:
    """The :class:`DistInfo` of this process (a world of one when no group is initialised).

    Args:
        device: ``"cpu"`` forces the CPU; ``None`` follows the process group's backend (gloo:
            CPU, nccl: this rank's GPU), or picks a GPU when CUDA is available without a group.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        gpu = dist.get_backend() == "nccl"
    else:
        rank, world_size = 0, 1
        gpu = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if world_size > 1 else 0
    if gpu and device != "cpu":
        target = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
    else:
        target = torch.device("cpu")
    return DistInfo(rank, world_size, local_rank, target)


def cleanup_distributed() -> None:
    """Leave the process group (no-op in a world of one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
