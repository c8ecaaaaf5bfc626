"""Process-group plumbing for data-parallel training under torchrun.

One small object (DistContext) says who this process is and wraps the few collectives the trainer needs, so
the training loop reads the same with one process or many: with a single process every collective is the
identity and no process group is created at all.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from model.checkpoint import resolve_device

logger = logging.getLogger(__name__)

# Rank 0 alone trains the tokenizer and tokenises the corpus while the others wait at a barrier; on the
# full corpus that takes a few minutes, longer than NCCL's default 10-minute timeout leaves for comfort.
_PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job: rank, world size and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files, logs and shows the progress bar; the others only compute."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce in place over ranks ("sum" or "max") and return the tensor; identity for one process."""
        if self.distributed:
            ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
            if op not in ops:
                raise ValueError(f"unknown reduction {op!r}: use one of {sorted(ops)}")
            dist.all_reduce(tensor, op=ops[op])
        return tensor

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device: str) -> DistContext:
    """Join the torchrun job described by the environment, or stand alone when there is none.

    torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; with more than one process each takes GPU LOCAL_RANK
    (NCCL) or the CPU (gloo). `device` is "auto", "cpu" or "cuda".
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}: use auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu or auto")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible): start torchrun "
                "with --nproc_per_node at most the number of GPUs"
            )
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    if world_size > 1:
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        device_id = resolved if resolved.type == "cuda" else None
        dist.init_process_group(backend=backend, timeout=_PROCESS_GROUP_TIMEOUT, device_id=device_id)
        logger.info("rank %d/%d joined the %s process group on %s", rank, world_size, backend, resolved)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved)
