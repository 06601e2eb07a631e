"""Process-group facts for torchrun runs (DDP: gloo on CPU, NCCL on CUDA); 1 process = no group."""

from __future__ import annotations

import os
import signal
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
        return bool(self._reduce(int(ok), torch.distributed.ReduceOp.MIN))

    def any_signal(self, name: str | None) -> str | None:
        """The signal that asked any rank to stop (``name``: this rank's, or None), or None when none did. A
        collective, called where every rank is at the same step (log steps, epoch ends), so all ranks stop
        there together: torchrun forwards a SIGTERM to every rank, a ``kill`` may reach one."""
        if self.world <= 1:
            return name
        num = self._reduce(signal.Signals[name].value if name else 0, torch.distributed.ReduceOp.MAX)
        return signal.Signals(num).name if num else None

    def _reduce(self, value: int, op) -> int:
        nccl = torch.distributed.get_backend() == "nccl"
        t = torch.tensor([value], device=torch.device("cuda", self.local_rank) if nccl else "cpu")
        torch.distributed.all_reduce(t, op=op)
        return int(t.item())  # a host read: only at the points above, never per step

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
