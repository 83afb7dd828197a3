"""Data-parallel training across processes with PyTorch DDP, launched by ``torchrun``.

``torchrun --nproc_per_node N -m autoseg train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; a plain
``autoseg train`` is a world of one and none of this does anything. These variables are read when a run
starts (never at import time), because they describe how this process was launched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @staticmethod
    def from_environment() -> DistributedContext:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return DistributedContext()
        return DistributedContext(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def start(self, device: torch.device) -> None:
        if self.enabled and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)  # NCCL binds each rank to its current GPU
            dist.init_process_group(backend=backend, rank=self.rank, world_size=self.world_size)

    def stop(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (in place on a copy); the identity for a world of one."""
        if not self.enabled:
            return tensor
        # NCCL reduces CUDA tensors only; the logged values live on the CPU, so they travel through the GPU.
        where = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else tensor.device
        out = tensor.to(where, copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(tensor.device)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def share_batch(self, global_batch_size: int) -> int:
        """This rank's part of the plan's batch: as even as possible, the first ranks take the remainder."""
        if global_batch_size < self.world_size:
            from autoseg.errors import AutosegError

            raise AutosegError(
                f"batch size {global_batch_size} cannot be split over {self.world_size} processes; pass"
                f" --batch-size {self.world_size} or more, or start fewer processes"
            )
        base, extra = divmod(global_batch_size, self.world_size)
        return base + (1 if self.rank < extra else 0)


def choose_device(requested: str | None, context: DistributedContext) -> torch.device:
    """``--device`` if given, else CUDA, then Apple MPS, then CPU; under DDP each rank takes its local GPU."""
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            from autoseg.errors import AutosegError

            raise AutosegError("--device cuda was given but this torch build sees no CUDA GPU; use --device cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        device = torch.device("mps")
    else:
        device = torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", context.local_rank)
    return device
