"""Loss parts: the unit the combiner adds up.

A part declares which student/teacher blocks it needs tapped, which teacher signals it
consumes (named tensors, so a cached teacher can serve them from disk), and returns a dict
of named, already-weighted loss terms. Student first, teacher second, always.

Teacher signals are produced from the teacher's :class:`fastkd.models.Taps` by
``teacher_signals`` (online) or read from the cache (same names, same shapes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastkd.models import Taps
from fastkd.ops import dispatch as KF


class LossPart(nn.Module):
    name = "part"
    #: teacher signal names this part reads
    signals: tuple[str, ...] = ()

    def student_blocks(self) -> list[int]:
        return []

    def teacher_blocks(self) -> list[int]:
        return []

    def teacher_signals(self, t: Taps) -> dict[str, torch.Tensor]:
        return {}

    def forward(self, s: Taps, t: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def logit_signals(t: Taps) -> dict[str, torch.Tensor]:
    return {"logits": t.logits}


def _soft_ce(logits: torch.Tensor, y_soft: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Cross-entropy against (possibly mixed) soft labels with label smoothing, mean over B."""
    C = logits.shape[-1]
    target = y_soft * (1.0 - smoothing) + smoothing / C
    return -(target * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


class CELoss(LossPart):
    """Ground-truth CE on the main (cls) head; label smoothing; mixup-aware (soft labels)."""

    name = "ce"

    def __init__(self, weight: float = 1.0, smoothing: float = 0.1):
        super().__init__()
        self.weight, self.smoothing = weight, smoothing

    def forward(self, s, t, batch):
        return {"ce": self.weight * _soft_ce(s.logits, batch["y_soft"], self.smoothing)}


class KDLoss(LossPart):
    """Hinton KD (KL form), T² scaled; dense teacher logits or sparse top-K from the cache."""

    name = "kd"
    signals = ("logits",)

    def __init__(self, T: float = 4.0, weight: float = 1.0):
        super().__init__()
        self.T, self.weight = T, weight

    def teacher_signals(self, t):
        return logit_signals(t)

    def forward(self, s, t, batch):
        if "logits" in t:
            loss = KF.kd_loss(s.logits, t["logits"], T=self.T)
        else:
            loss = KF.kd_loss_topk(s.logits, t["topk_vals"], t["topk_ids"], t["topk_lse"], T=self.T)
        return {"kd": self.weight * loss}


class NKDLoss(LossPart):
    """NKD (Yang et al. 2023): target term + normalized non-target KD; label = argmax of the soft label."""

    name = "nkd"
    signals = ("logits",)

    def __init__(self, tau: float = 1.0, gamma: float = 1.0, weight: float = 1.0):
        super().__init__()
        self.tau, self.gamma, self.weight = tau, gamma, weight

    def teacher_signals(self, t):
        return logit_signals(t)

    def forward(self, s, t, batch):
        y = batch["y_hard"]
        if "logits" in t:
            loss = KF.nkd_loss(s.logits, t["logits"], y, tau=self.tau, gamma=self.gamma)
        else:
            loss = KF.nkd_loss_topk(
                s.logits, t["topk_vals"], t["topk_ids"], t["topk_lse"], y, tau=self.tau, gamma=self.gamma
            )
        return {"nkd": self.weight * loss}


class DeiTLoss(LossPart):
    """DeiT hard distillation: ½·CE(cls, labels) + ½·CE(dist, argmax teacher).

    The ½·CE on the cls head is applied here (the combiner drops its own CE when `deit` is on).
    Needs a DeiT-distilled student (a second, distillation head).
    """

    name = "deit"
    signals = ("logits",)

    def __init__(self, smoothing: float = 0.1, ce_weight: float = 0.5, dist_weight: float = 0.5):
        super().__init__()
        self.smoothing, self.ce_weight, self.dist_weight = smoothing, ce_weight, dist_weight

    def teacher_signals(self, t):
        return logit_signals(t)

    def forward(self, s, t, batch):
        if s.dist_logits is None:
            raise ValueError(
                "--method deit needs a DeiT-distilled student "
                "(e.g. --student deit_tiny_distilled_patch16_224)"
            )
        if "logits" in t:
            dist = KF.deit_hard_loss(s.dist_logits, t["logits"])
        else:  # sparse cached teacher: its argmax is the id of its largest top-K value
            hard = t["topk_ids"].gather(1, t["topk_vals"].argmax(-1, keepdim=True)).squeeze(1).long()
            dist = F.cross_entropy(s.dist_logits.float(), hard)
        return {
            "deit_ce": self.ce_weight * _soft_ce(s.logits, batch["y_soft"], self.smoothing),
            "deit_dist": self.dist_weight * dist,
        }
