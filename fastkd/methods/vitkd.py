"""ViTKD (Yang et al., arXiv 2209.02432), as released (github.com/yzd-v/cls_KD).

Taps (patch tokens only, prefix dropped), same indices for teacher and student:
blocks ``mimic_blocks`` (default 0 and 1, raw residual stream) and the last block after the
final norm.

- Mimic:  L_mim = α/B · Σ_l Σ_{n,d} (s_l W_lᵀ + b_l − t_l)², one Linear(D_s→D_t) per shallow
  block (identity when D_s = D_t), α = 3e-5.
- Generation: x = Linear(D_s→D_t)(s_last); per sample N − ⌊N(1−λ)⌋ random tokens (λ = 0.5,
  redrawn every step) take one learnable mask token (zero init); reshape row-major to
  [B, D_t, h, w]; G = Conv3×3 → ReLU → Conv3×3; L_gen = β/(λ·B) · Σ_{masked n, d} (G − t_last)²,
  β = 3e-6. No positional embedding re-added. The paper's relation loss is not in the release
  and is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastkd.methods.base import BuildContext, LossPart, Method, int_list, need_vit, register
from fastkd.ops import dispatch as KF
from fastkd.ops.reference import random_token_mask


class ViTKDLoss(LossPart):
    name = "vitkd"

    def __init__(
        self,
        d_s: int,
        d_t: int,
        grid: tuple[int, int],
        *,
        mimic_blocks: tuple[int, ...] = (0, 1),
        alpha: float = 3e-5,
        beta: float = 3e-6,
        mask_ratio: float = 0.5,
    ):
        super().__init__()
        self.d_s, self.d_t, self.grid = d_s, d_t, tuple(grid)
        self.mimic_blocks = tuple(mimic_blocks)
        self.alpha, self.beta, self.mask_ratio = alpha, beta, mask_ratio
        self.signals = tuple(f"vitkd_{i}" for i in self.mimic_blocks) + ("vitkd_last",)
        same = d_s == d_t
        self.mimic = nn.ModuleList(
            [nn.Identity() if same else nn.Linear(d_s, d_t) for _ in self.mimic_blocks]
        )
        self.align = nn.Identity() if same else nn.Linear(d_s, d_t)
        self.mask_token = nn.Parameter(torch.zeros(d_t))
        self.generator = nn.Sequential(
            nn.Conv2d(d_t, d_t, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(d_t, d_t, 3, padding=1)
        )

    def student_blocks(self):
        return list(self.mimic_blocks)

    def teacher_blocks(self):
        return list(self.mimic_blocks)

    def teacher_signals(self, t):
        P = t.num_prefix
        out = {f"vitkd_{i}": t.blocks[i][:, P:] for i in self.mimic_blocks}
        out["vitkd_last"] = t.tokens[:, P:]
        return out

    @staticmethod
    def _wb(layer):
        return (None, None) if isinstance(layer, nn.Identity) else (layer.weight, layer.bias)

    def forward(self, s, t, batch):
        P = s.num_prefix
        s_feats = [s.blocks[i][:, P:] for i in self.mimic_blocks]
        t_feats = [t[f"vitkd_{i}"] for i in self.mimic_blocks]
        wb = [self._wb(m) for m in self.mimic]
        mim = KF.vitkd_mimic_loss(s_feats, t_feats, [w for w, _ in wb], [b for _, b in wb], alpha=self.alpha)
        s_last = s.tokens[:, P:]
        B, N = s_last.shape[:2]
        mask = random_token_mask(
            B, N, self.mask_ratio, generator=batch.get("generator"), device=s_last.device
        )
        w, b = self._wb(self.align)
        gen = KF.vitkd_gen_loss(
            s_last,
            t["vitkd_last"],
            mask,
            w,
            b,
            self.mask_token,
            self.generator,
            beta=self.beta,
            mask_ratio=self.mask_ratio,
        )
        return {"vitkd_mim": mim, "vitkd_gen": gen}


@dataclass
class ViTKDConfig:
    """The ``--vitkd-*`` flags (fields of ``fastkd.config.MethodConfig``, same names and defaults)."""

    vitkd_alpha: float = 3e-5
    vitkd_beta: float = 3e-6
    vitkd_mask_ratio: float = 0.5
    vitkd_blocks: str = "0,1"  # shallow student/teacher blocks for the mimic loss


def build(mcfg: ViTKDConfig, s_info, t_info, ctx: BuildContext):
    need_vit(s_info, t_info, "vitkd")
    if tuple(s_info.grid) != tuple(t_info.grid):
        raise ValueError(
            f"--method vitkd needs equal token grids; student {s_info.grid} vs teacher {t_info.grid} "
            "(use the same img_size/patch_size for both)"
        )
    blocks = tuple(int_list(mcfg.vitkd_blocks) or (0, 1))
    for i in blocks:
        if i >= min(s_info.depth, t_info.depth):
            raise ValueError(
                f"--vitkd-blocks {mcfg.vitkd_blocks}: block {i} is out of range "
                f"(student depth {s_info.depth}, teacher depth {t_info.depth})"
            )
    return ViTKDLoss(
        s_info.embed_dim,
        t_info.embed_dim,
        s_info.grid,
        mimic_blocks=blocks,
        alpha=mcfg.vitkd_alpha,
        beta=mcfg.vitkd_beta,
        mask_ratio=mcfg.vitkd_mask_ratio,
    )


METHOD = register(
    Method("vitkd", build, config=ViTKDConfig, student_vit=True, terms=("vitkd_mim", "vitkd_gen"))
)
