"""Teachers: the frozen model that produces the signals the losses read.

``OnlineTeacher`` runs the teacher every step (no grad, eval mode) and hands the loss the
named signals it asked for (``DistillLoss.teacher_signals``). ``CachedTeacher`` (cache.py)
serves the same names from disk, so the losses cannot tell the two apart.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fastkd.models import Taps, forward_taps, freeze


class OnlineTeacher:
    kind = "online"

    def __init__(
        self,
        model: nn.Module,
        blocks: list[int],
        signal_fn: Callable[[Taps], dict[str, torch.Tensor]],
        *,
        dense: bool = False,
    ):
        self.model = freeze(model)
        self.blocks, self.signal_fn, self.dense = list(blocks), signal_fn, dense

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, ids: torch.Tensor | None = None, view: int | None = None):
        taps = forward_taps(self.model, x, self.blocks, dense=self.dense)
        return self.signal_fn(taps)

    def to(self, device):
        self.model.to(device)
        return self
