"""``OnlineTeacher``: runs the frozen teacher every step (no grad, eval mode) and hands the loss the named
signals it asked for (``DistillLoss.teacher_signals``). ``CachedTeacher`` (teachers/cached.py) serves the
same names from disk, so the losses cannot tell the two apart."""

from __future__ import annotations

import torch
from torch import nn

from fastkd.models import forward_taps, freeze, model_info


class OnlineTeacher:
    """The Teacher protocol (teachers/base.py) over a live model; ``loss`` says which blocks to tap,
    whether to compute dense logits and which signals to hand over."""

    kind = "online"
    views = None

    def __init__(self, model: nn.Module, loss, *, top1: float | None = None, source: str | None = None):
        self.model = freeze(model)
        self.info = model_info(self.model)
        self.blocks, self.dense = loss.teacher_blocks(), loss.teacher_dense()
        self.signal_fn = loss.teacher_signals
        self.top1, self.source = top1, source

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, ids: torch.Tensor | None = None, view: int | None = None):
        taps = forward_taps(self.model, x, self.blocks, dense=self.dense)
        return self.signal_fn(taps)

    def prefetch_epoch(self, batches, view: int) -> None:
        pass

    def check_signals(self, loss) -> None:
        pass  # the signals come from the same loss

    def close(self) -> None:
        pass

    def to(self, device):
        self.model.to(device)
        return self
