"""``nkd``: NKD (Yang et al., ICCV 2023): target term + normalized non-target KD."""

from __future__ import annotations

from dataclasses import dataclass

from fastkd.methods.base import BuildContext, LossPart, Method, logit_signals, register
from fastkd.ops import dispatch as KF


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


@dataclass
class NKDConfig:
    """The ``--nkd-*`` flags (fields of ``fastkd.config.MethodConfig``, same names and defaults)."""

    nkd_tau: float = 1.0
    nkd_gamma: float = 1.0  # ViT students (the release's CNN default is 1.5)
    nkd_weight: float = 1.0


def build(mcfg: NKDConfig, s_info, t_info, ctx: BuildContext):
    return NKDLoss(mcfg.nkd_tau, mcfg.nkd_gamma, mcfg.nkd_weight)


METHOD = register(Method("nkd", build, config=NKDConfig, terms=("nkd",)))
