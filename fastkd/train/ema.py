"""An exponential moving average of the student's weights (``--ema-decay D``, timm's ``ModelEmaV3`` rule
without warm-up): after every optimizer step ``ema ← D·ema + (1 − D)·student`` for every floating
parameter and buffer (one ``_foreach_lerp_`` on the device: no sync), other buffers copied. The trainer
evaluates it beside the student, checkpoints it, and saves it as ``student_ema.safetensors``."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["StudentEMA"]


class StudentEMA:
    def __init__(self, student: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"--ema-decay {decay}: use a decay in (0, 1), e.g. 0.9998; 0 turns the EMA off")
        self.decay = float(decay)
        self.model = copy.deepcopy(student).requires_grad_(False).eval()
        live, mine = student.state_dict(keep_vars=True), self.model.state_dict(keep_vars=True)
        floats = [k for k, v in live.items() if v.is_floating_point()]
        self._ema = [mine[k].detach() for k in floats]
        self._live = [live[k].detach() for k in floats]
        self._copies = [(mine[k].detach(), v.detach()) for k, v in live.items() if not v.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self._ema, self._live, 1.0 - self.decay)
        for dst, src in self._copies:
            dst.copy_(src)
