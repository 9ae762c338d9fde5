"""Plain torch.distributed for evaluation: who this process is, and how work is dealt.

Started by ``torchrun`` or ``accelerate launch`` (both set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)
the process group is initialised here (NCCL for CUDA, gloo otherwise); a plain ``python`` run is rank 0
of 1. Work is cut into fixed global batches and batch ``b`` goes to rank ``b mod world``: which process
runs a batch never changes what it computes (docs/eval.md section 3).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, device: str) -> str:
        """This process's device: ``cuda`` becomes ``cuda:LOCAL_RANK`` when several processes run."""
        if self.world > 1 and device == "cuda":
            return f"cuda:{self.local_rank}"
        return device

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, values: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """Element-wise sum over all processes, in float64 (on CPU for gloo, on this rank's GPU for NCCL)."""
        t = torch.as_tensor(values, dtype=torch.float64)
        if self.world > 1:
            device = f"cuda:{self.local_rank}" if dist.get_backend() == "nccl" else "cpu"
            t = t.to(device)
            dist.all_reduce(t)
        return t.cpu()

    def any(self, flag: bool) -> bool:
        """True on every process if it is True on one (e.g. an error before the work starts)."""
        return bool(self.sum([1.0 if flag else 0.0])[0] > 0)

    def batches(self, num_items: int, batch_size: int) -> list[range]:
        """The global batches ``[b * batch_size, (b + 1) * batch_size)`` this process runs."""
        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}.")
        starts = range(0, num_items, batch_size)
        return [range(s, min(s + batch_size, num_items)) for b, s in enumerate(starts) if b % self.world == self.rank]


@contextmanager
def process_group(device: str = "cpu"):
    """Yield this process's :class:`Ranks`, initialising (and afterwards destroying) the process group
    when a launcher started several processes and none is initialised yet."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield Ranks()
        return
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    created = False
    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") and torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
        created = True
    try:
        yield Ranks(rank, world, local)
    finally:
        if created:
            dist.destroy_process_group()
