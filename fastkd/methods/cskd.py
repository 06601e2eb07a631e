"""CSKD (Zhao, Song, Liang, ICCV 2023), as released (github.com/Zzzzz1/CSKD). Formulas: METHODS.md.

- Teacher: a CNN (any timm ResNet / RegNet / ConvNeXt …; a ViT works too). Its classifier applied at
  every location of the last feature map gives P_T [B, C, h_t, w_t] (``forward_taps(..., dense=True)``;
  a head that is not pool → [norm] → linear is one clear error naming the model).
- Student: its head (the distillation head of a DeiT-distilled student, else the main head) on every
  patch token after the final norm: [B, N, C] on the (h, w) grid, adaptive-average-pooled to
  (h_t, w_t) — any pair of grids with h ≥ h_t and w ≥ w_t (otherwise one clear error).
- CKF fusion Z = α·P_T + (1−α)·mean_loc P_T; α = ``cskd_alpha(e, E, schedule)`` with e the 0-based
  epoch (``per_iter=True``: the fractional epoch, so α decays every step). schedule: linear 1−x,
  square (1−x)², cos cos(πx/2), x = e/E.
- hard (default): CE(pooled student, argmax Z) averaged over B·h_t·w_t; soft: T²·KL summed over
  classes and locations, / B.

Totals: ``cskd+deit`` (the release, preset ``cskd-release``): ½·CE(cls, ls 0.1) + ½·CE(dist head,
argmax teacher) + 1·L_CSKD — the ½·CE and the DeiT term come from the ``deit`` part. ``cskd`` without
``deit``: ce_weight·CE(cls, ls 0.1) + cskd_weight·L_CSKD (the CE term is carried by this part and logged
as ``ce``, since the combiner leaves the cls CE to ``deit``/``cskd``).

Teacher signal: ``dense_logits`` [B, C, h_t, w_t]. Eval (fastkd.train): for a DeiT-distilled student,
top-1 of the mean of (cls logits, dist logits, mean over patches of the dense dist-head logits);
``top1_cls`` is reported too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import fastkd.models.cnn  # noqa: F401  (registers the fastkd_resnet CNN teacher with timm)
from fastkd.methods.base import BuildContext, LossPart, Method, register, soft_ce
from fastkd.methods.ce import CE_TERM
from fastkd.models import default_patch_size, patch_logits
from fastkd.ops import dispatch as KF
from fastkd.ops import reference as R

SCHEDULES = ("linear", "square", "cos")


def default_cnn_arch(img_size: int) -> tuple[str, dict]:
    """The default CSKD teacher: ``("fastkd_resnet", overrides)``, a timm ResNet-18 layout (fastkd.cnn).

    Its last feature map is half the fastkd student's token grid, the release's ratio (14×14 student
    tokens → 7×7 RegNet map): total stride 2p for the student patch size p, from the stem stride and
    timm's ``output_stride`` (8×8 digits: p = 2, stride 4 = stem 1 × output_stride 16 → a 2×2 map under
    the student's 4×4 grid; 32 px: p = 4, stride 8 → a 4×4 map under the 8×8 grid; 224 px: p = 16, stride
    32 = the stock ResNet-18). Images below 16 px get half the channels (32, 64, 128, 256), 16–63 px a
    quarter (16, 32, 64, 128): at stem stride 1 the first stage runs at full resolution, and CPU runs stay
    short.
    """
    stride = 2 * default_patch_size(img_size)
    stem, out = {2: (1, 8), 4: (1, 16), 8: (1, 32), 16: (2, 32)}.get(stride, (4, 32))
    ov: dict = dict(stem_stride=stem, output_stride=out)
    if img_size < 16:
        ov["channels"] = [32, 64, 128, 256]
    elif img_size < 64:
        ov["channels"] = [16, 32, 64, 128]
    return "fastkd_resnet", ov


class CSKDLoss(LossPart):
    """CSKD loss part; returns {"cskd": weight·L_CSKD} (+ the plain CE term, ce_weight·CE on the cls head,
    when ce_weight > 0)."""

    name = "cskd"
    needs_dense = True
    signals = ("dense_logits",)

    def __init__(
        self,
        epochs: int,
        *,
        hard: bool = True,
        T: float = 1.0,
        schedule: str = "linear",
        per_iter: bool = False,
        weight: float = 1.0,
        ce_weight: float = 0.0,
        smoothing: float = 0.1,
    ):
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"--cskd-schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if int(epochs) < 1:
            raise ValueError(f"cskd needs epochs >= 1, got {epochs}")
        self.epochs, self.hard, self.T, self.schedule = int(epochs), bool(hard), float(T), schedule
        self.per_iter, self.weight = bool(per_iter), float(weight)
        self.ce_weight, self.smoothing = float(ce_weight), float(smoothing)

    def teacher_signals(self, t):
        if t.dense_logits is None:
            raise ValueError("cskd needs dense teacher logits: run the teacher with forward_taps(dense=True)")
        return {"dense_logits": t.dense_logits}

    def alpha(self, epoch_frac: float | torch.Tensor) -> float | torch.Tensor:
        """CKF α at training position ``epoch_frac`` (epochs done, fractional): the 0-based epoch
        ⌊epoch_frac⌋ per epoch, or epoch_frac itself with ``per_iter``. A 0-d tensor in → tensor out."""
        if not isinstance(epoch_frac, torch.Tensor):
            e = float(epoch_frac) if self.per_iter else math.floor(epoch_frac)
            return R.cskd_alpha(e, self.epochs, self.schedule)
        e = epoch_frac if self.per_iter else torch.floor(epoch_frac)
        return R.cskd_alpha(e, self.epochs, self.schedule)

    @staticmethod
    def student_patch_logits(s, batch) -> torch.Tensor:
        """[B, N, C]: the student's head (dist head if distilled) on every final-norm patch token."""
        if s.dense_logits is not None:
            d = s.dense_logits
            return d.flatten(2).transpose(1, 2)
        student = batch.get("student")
        if student is None or s.tokens is None:
            raise ValueError("cskd needs the student's patch tokens and head (batch['student'], a ViT)")
        return patch_logits(student, s.tokens, s.num_prefix)

    def forward(self, s, t, batch):
        dense = t["dense_logits"]
        h, w = s.grid
        h_t, w_t = dense.shape[-2:]
        if h < h_t or w < w_t:
            raise ValueError(
                f"cskd: the student's {h}x{w} token grid cannot be pooled to the teacher's {h_t}x{w_t} "
                "feature map; use a teacher whose last feature map is no larger than the student grid"
            )
        pl = self.student_patch_logits(s, batch)
        a = self.alpha(batch.get("epoch_frac", 0.0))
        loss = KF.cskd_loss(pl, dense, a, hard=self.hard, T=self.T, grid=(h, w))
        out = {"cskd": self.weight * loss}
        if self.ce_weight > 0:
            out[CE_TERM] = self.ce_weight * soft_ce(s.logits, batch["y_soft"], self.smoothing)
        return out


@dataclass
class CSKDConfig:
    """The ``--cskd-*`` flags (fields of ``fastkd.config.MethodConfig``, same names and defaults)."""

    cskd_hard: bool = True
    cskd_T: float = 1.0
    cskd_schedule: str = "linear"  # linear | square | cos
    cskd_per_iter: bool = False
    cskd_weight: float = 1.0
    ce_weight: float = 1.0  # of the cls-head CE this part carries when no other method owns it
    label_smoothing: float = 0.1


def build(mcfg: CSKDConfig, s_info, t_info, ctx: BuildContext):
    """ViT student; teacher with dense logits (CNN or ViT). When no other method of the total owns the cls
    CE, the CSKD part carries ce_weight·CE on the cls head (logged as ``ce``)."""
    if s_info.kind != "vit":
        raise ValueError(
            f"--method cskd needs a ViT student with patch tokens; got the {s_info.kind} {s_info.name}"
        )
    return CSKDLoss(
        ctx.epochs,
        hard=mcfg.cskd_hard,
        T=mcfg.cskd_T,
        schedule=mcfg.cskd_schedule,
        per_iter=mcfg.cskd_per_iter,
        weight=mcfg.cskd_weight,
        ce_weight=0.0 if ctx.others_own_ce("cskd") else mcfg.ce_weight,
        smoothing=mcfg.label_smoothing,
    )


METHOD = register(
    Method(
        "cskd",
        build,
        config=CSKDConfig,
        teacher="cnn",
        student_vit=True,
        dist_head="prefer",
        owns_ce=True,
        terms=("cskd",),
        eval_dense_heads=True,
    )
)
