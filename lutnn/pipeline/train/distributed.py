"""Single-process or ``torchrun`` multi-process execution behind one small interface.

Under ``torchrun`` (``TORCHELASTIC_RUN_ID`` in the environment, or ``WORLD_SIZE > 1``) the
process group is started with NCCL on CUDA and gloo on CPU, also for a single process, so
``torchrun --nproc_per_node=1`` runs the very DDP/NCCL path of N GPUs on one; otherwise
everything is a no-op, so the same code runs both ways without changes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    group: bool = False  # a process group is running (torchrun), even with world == 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.group

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def wrap(self, model: nn.Module) -> nn.Module:
        """``DistributedDataParallel`` when distributed, else the model itself."""
        if not self.distributed:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def resolve_device(pref: str, local_rank: int = 0) -> torch.device:
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device: 'cuda' requested but torch.cuda.is_available() is False")
        return torch.device("cuda", local_rank)
    return torch.device(pref)


def init_distributed(device_pref: str = "auto") -> DistEnv:
    """Start the process group when launched by ``torchrun``; the device follows ``LOCAL_RANK``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_pref, local_rank)
    if world <= 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        return DistEnv(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistEnv(dist.get_rank(), dist.get_world_size(), device, group=True)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
