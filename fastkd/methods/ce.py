"""``ce``: ground-truth cross-entropy on the cls head (label smoothing, mixup-aware soft labels).

The CE part is in every total unless ``--ce-weight 0`` or a method that owns the cls CE (``owns_ce``) is
in it; ``--method ce`` alone trains the student without a teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastkd.methods.base import BuildContext, LossPart, Method, register, soft_ce


class CELoss(LossPart):
    """Ground-truth CE on the main (cls) head; label smoothing; mixup-aware (soft labels)."""

    name = "ce"

    def __init__(self, weight: float = 1.0, smoothing: float = 0.1):
        super().__init__()
        self.weight, self.smoothing = weight, smoothing

    def forward(self, s, t, batch):
        return {CE_TERM: self.weight * soft_ce(s.logits, batch["y_soft"], self.smoothing)}


@dataclass
class CEConfig:
    """The cls-head CE flags (fields of ``fastkd.config.MethodConfig``, same names and defaults)."""

    ce_weight: float = 1.0  # 0 leaves CE out (the [CLS]-KD release preset)
    label_smoothing: float = 0.1


def build(mcfg: CEConfig, s_info, t_info, ctx: BuildContext):
    return None  # the CE part is added by the registry for every total (see the module docstring)


CE_TERM = "ce"  # the logged term (cskd logs its cls-head CE under the same name)
METHOD = register(Method("ce", build, config=CEConfig, teacher=None, terms=(CE_TERM,)))
