"""``kd``: Hinton KD (KL form), T² scaled; dense teacher logits or a sparse top-K cache record."""

from __future__ import annotations

from dataclasses import dataclass

from fastkd.methods.base import BuildContext, LossPart, Method, logit_signals, register
from fastkd.ops import dispatch as KF


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


@dataclass
class KDConfig:
    """The ``--kd-*`` flags (fields of ``fastkd.config.MethodConfig``, same names and defaults)."""

    kd_T: float = 4.0  # temperature (the [CLS]-KD preset uses 1)
    kd_weight: float = 1.0


def build(mcfg: KDConfig, s_info, t_info, ctx: BuildContext):
    return KDLoss(mcfg.kd_T, mcfg.kd_weight)


METHOD = register(Method("kd", build, config=KDConfig, terms=("kd",)))
