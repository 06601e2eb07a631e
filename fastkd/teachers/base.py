"""The Teacher protocol: what the trainer (and the cache builder) may ask of a teacher, online or cached."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch

from fastkd.models import ModelInfo


class Teacher(Protocol):
    """A frozen teacher → the named signals the losses read.

    kind: "online" | "cached". info: the teacher model's ModelInfo. top1: its val top-1 (None if unknown).
    source: where it came from (timm name, checkpoint, cache dir). views: V of a V-view cache (epoch e
    trains on view e mod V), None for an online teacher (every epoch is its own view).

    ``ready(ids, view)``: the trainer calls it before ``__call__`` as the step's ``cache_wait`` phase (in
    summary.json's ``data_wait_share``). A cache waits there for the prefetched record and makes the
    current stream wait for its host→device copy, without syncing the host with the device; online: no-op.
    ``__call__`` must not sync either, given the sampler's device ids of a batch announced by
    ``prefetch_epoch``. ``compile()``: under ``--compile`` (online: the tap forward; cache: no-op).
    """

    kind: str
    info: ModelInfo
    top1: float | None
    source: str | None
    views: int | None

    def __call__(
        self, x: torch.Tensor, ids: torch.Tensor | None = None, view: int | None = None
    ) -> dict[str, torch.Tensor]: ...

    def prefetch_epoch(self, batches: Iterable[torch.Tensor], view: int) -> None:
        """Announce the epoch's id batches in training order (a cache gathers them ahead; online: no-op)."""

    def ready(self, ids: torch.Tensor, view: int) -> None:
        """Wait (device-side) until the batch's signals can be served (cache); online: no-op."""

    def compile(self, **kwargs) -> Teacher:
        """Compile the teacher's forward (online); cache: no-op. Returns the teacher."""

    def check_signals(self, loss) -> None:
        """Refuse (one line) unless the teacher serves every signal ``loss`` reads (online: no-op)."""

    def close(self) -> None:
        """Stop background work (a cache's prefetch thread; online: no-op)."""
