"""Process-group facts for torchrun runs (DDP: gloo on CPU, NCCL on CUDA); 1 process = no group."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    """Process group facts (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK); 1 process = no group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, dev: torch.device) -> torch.device:
        if self.world > 1 and dev.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return dev

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        """Destroy the process group this run joined (torchrun ranks), before the interpreter exits: left to
        exit-time destruction, a gloo rank was seen to abort ("terminate called without an active
        exception", SIGABRT) in CI under load."""
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def agree(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every rank (a collective: every rank must call it)."""
        if self.world <= 1:
            return ok
        nccl = torch.distributed.get_backend() == "nccl"
        t = torch.tensor([int(ok)], device=torch.device("cuda", self.local_rank) if nccl else "cpu")
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return bool(t.item())

    def mean(self, vals: dict[str, torch.Tensor]) -> dict[str, float]:
        """Mean of each logged scalar over ranks (log steps only: this syncs)."""
        keys = sorted(vals)
        t = torch.stack([vals[k].reshape(()) for k in keys])
        if self.world > 1:
            torch.distributed.all_reduce(t)
            t = t / self.world
        return dict(zip(keys, t.tolist(), strict=True))


def init_distributed(device_spec: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_spec in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(local)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local)
