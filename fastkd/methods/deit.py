"""``deit``: DeiT hard distillation: ½·CE(cls, labels) + ½·CE(dist head, argmax teacher)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from fastkd.methods.base import BuildContext, LossPart, Method, logit_signals, register, soft_ce
from fastkd.ops import dispatch as KF

NEEDS_DIST_HEAD = (
    "--method deit needs a DeiT-distilled student with a distillation head "
    "(e.g. --student deit_tiny_distilled_patch16_224)"
)


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
            "deit_ce": self.ce_weight * soft_ce(s.logits, batch["y_soft"], self.smoothing),
            "deit_dist": self.dist_weight * dist,
        }


@dataclass
class DeiTConfig:
    """The ``--deit-*`` flags (fields of ``fastkd.config.MethodConfig``, same names and defaults)."""

    label_smoothing: float = 0.1  # of the ½·CE on the cls head


def build(mcfg: DeiTConfig, s_info, t_info, ctx: BuildContext):
    if not s_info.has_dist_head:
        raise ValueError(NEEDS_DIST_HEAD)
    return DeiTLoss(mcfg.label_smoothing)


METHOD = register(
    Method(
        "deit", build, config=DeiTConfig, dist_head="require", owns_ce=True, terms=("deit_ce", "deit_dist")
    )
)
