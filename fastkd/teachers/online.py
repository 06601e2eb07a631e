"""``OnlineTeacher``: runs the frozen teacher every step (no grad, eval mode) and hands the loss the named
signals it asked for (``DistillLoss.teacher_signals``). ``CachedTeacher`` (teachers/cached.py) serves the
same names from disk, so the losses cannot tell the two apart.

Under ``--compile`` the Trainer calls ``compile()``: the tap forward and the signal extraction then run as
one ``torch.compile``d function, traced under ``torch.no_grad()`` with the model in eval mode (no autograd
graph, no saved activations). ``no_grad`` rather than ``inference_mode``: the signals are inputs of the
student's autograd graph, and inference tensors cannot be saved for its backward.
"""

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
        self._fwd = self.signals  # the eager forward until compile()
        self.compiled = False

    def signals(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The teacher's tap forward on ``x`` → the named signals (eager; call under no_grad)."""
        taps = forward_taps(self.model, x, self.blocks, dense=self.dense)
        return self.signal_fn(taps)

    def compile(self, **kwargs) -> OnlineTeacher:
        """Run the tap forward through ``torch.compile`` from now on (kwargs: torch.compile's)."""
        if not self.compiled:
            self.model.eval()
            self._fwd = torch.compile(self.signals, **kwargs)
            self.compiled = True
        return self

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, ids: torch.Tensor | None = None, view: int | None = None):
        if self.model.training:  # frozen teachers stay in eval mode (dropout, drop-path off)
            self.model.eval()
        return self._fwd(x)

    def prefetch_epoch(self, batches, view: int) -> None:
        pass

    def ready(self, ids: torch.Tensor, view: int) -> None:
        pass

    def check_signals(self, loss) -> None:
        pass  # the signals come from the same loss

    def close(self) -> None:
        pass

    def to(self, device):
        self.model.to(device)
        return self
