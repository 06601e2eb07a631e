"""Deterministic, resumable, rank-aware epoch sampler (a pure function of seed and epoch).

``EpochSampler(..., device=cuda)`` yields the id batches on the device with no host sync: the epoch's
permutation (this rank's ids of every step) goes up once per epoch, through pinned memory with
``non_blocking=True``, and each step's ids are a slice of it. The order is the same on every device.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from fastkd.data.augment import hash32


class EpochSampler:
    """Deterministic, resumable, rank-aware batching over ``n`` samples.

    The order of epoch e is ``argsort(hash32(arange(n), seed, e, "perm"))`` -- a permutation that is a
    pure function of (seed, epoch) (the hash is a bijection, so there are no ties), independent of the
    torch version, device and world size. The GLOBAL batches of ``batch_size`` are consecutive slices of
    that order; rank r gets the r-th contiguous ``batch_size // world_size`` slice of each global batch,
    so the union over ranks of step s is exactly the single-process batch of step s.

    batch_size: the global batch; must be divisible by world_size. If n < batch_size it is clipped to n
        (rounded down to a multiple of world_size), so one epoch is one step.
    drop_last=True: ``n // batch_size`` steps, the remainder of the order is skipped this epoch.
    drop_last=False: ``ceil(n / batch_size)`` steps; the last global batch is shorter. With world_size > 1
        it is padded to a multiple of world_size with ids from the start of the epoch order (those few
        ids are seen twice), so every rank gets the same number of ids.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        *,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
    ):
        if n < 1:
            raise ValueError(f"EpochSampler: n={n}; the dataset has no samples, give it at least one")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"EpochSampler: rank={rank}, world_size={world_size}; need 0 <= rank < world_size"
            )
        if batch_size < 1:
            raise ValueError(f"EpochSampler: batch_size={batch_size}; use a positive batch size")
        if batch_size % world_size:
            raise ValueError(
                f"EpochSampler: batch_size {batch_size} is not divisible by world_size {world_size}; "
                f"use a multiple of {world_size} (the global batch is split evenly across ranks)"
            )
        if n < batch_size:
            batch_size = n - n % world_size
            if batch_size == 0:
                raise ValueError(
                    f"EpochSampler: only {n} samples for world_size {world_size}; use fewer processes"
                )
        self.n = int(n)
        self.batch_size = int(batch_size)
        self.local_batch_size = self.batch_size // world_size
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    def __len__(self) -> int:
        """Steps per epoch."""
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        """The epoch's permutation of range(n), int64 [n]."""
        keys = hash32(torch.arange(self.n, dtype=torch.int64), self.seed, epoch, "epoch_order")
        return torch.argsort(keys, stable=True)

    def _span(self, start_step: int, stop_step: int | None) -> int:
        """stop_step (None: len(self)), after checking 0 <= start_step <= stop_step <= len(self)."""
        stop = len(self) if stop_step is None else int(stop_step)
        if not 0 <= start_step <= stop <= len(self):
            raise ValueError(
                f"EpochSampler: steps {start_step}..{stop}; use 0 <= start_step <= stop_step <= {len(self)} "
                "(steps per epoch)"
            )
        return stop

    def host_batches(
        self, epoch: int, start_step: int = 0, stop_step: int | None = None
    ) -> Iterator[torch.Tensor]:
        """This rank's int64 id batches of ``epoch`` on the host (CPU), for steps start_step .. stop_step-1
        (stop_step None: to the epoch's end).

        Skipping steps draws nothing: step s is the same whatever start_step was.
        """
        stop = self._span(start_step, stop_step)
        perm = self.order(epoch)
        bs, ws = self.batch_size, self.world_size
        for step in range(start_step, stop):
            g = perm[step * bs : (step + 1) * bs]
            if g.numel() % ws:
                g = torch.cat([g, perm[: ws - g.numel() % ws]])
            k = g.numel() // ws
            yield g[self.rank * k : (self.rank + 1) * k].clone()

    def batches(self, epoch: int, start_step: int = 0, stop_step: int | None = None) -> EpochBatches:
        """This rank's int64 id batches of ``epoch`` for steps start_step .. stop_step-1 (None: to the end),
        on ``device``.

        An iterable (``EpochBatches``); ``.host()`` gives the same batches on the host (what a teacher
        cache's prefetch thread gathers with). On a CUDA device the whole epoch goes up at the first
        ``next`` (pinned, non_blocking: no sync), each step is a slice of it.
        """
        return EpochBatches(self, epoch, start_step, self._span(start_step, stop_step))


class EpochBatches:
    """The id batches of one epoch from one start step to one stop step: iterate for ids on the sampler's
    device, ``host()`` for the same ids on the host."""

    def __init__(self, sampler: EpochSampler, epoch: int, start_step: int, stop_step: int | None = None):
        self.sampler, self.epoch, self.start_step = sampler, int(epoch), int(start_step)
        self.stop_step = len(sampler) if stop_step is None else int(stop_step)

    def __len__(self) -> int:
        return self.stop_step - self.start_step

    def host(self) -> Iterator[torch.Tensor]:
        return self.sampler.host_batches(self.epoch, self.start_step, self.stop_step)

    def __iter__(self) -> Iterator[torch.Tensor]:
        dev = self.sampler.device
        if dev.type == "cpu":
            yield from self.host()
            return
        host = list(self.host())
        if not host:
            return
        sizes = [len(b) for b in host]
        flat = torch.cat(host)
        if dev.type == "cuda":
            flat = flat.pin_memory().to(dev, non_blocking=True)  # once per epoch; the allocator keeps
        else:  # the pinned block until the copy is done
            flat = flat.to(dev)
        yield from torch.split(flat, sizes)
