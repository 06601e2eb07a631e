"""Build the total loss from ``--method`` ('+'-joined) with each recipe's weights (METHODS.md).

Totals (each part's weights are config fields):
- ``ce``      CE(cls head, label smoothing 0.1) · ce_weight — present in every total unless
              ce_weight = 0 (the [CLS]-KD release preset) or ``deit``/``cskd`` take the cls CE over.
- ``kd``      + kd_weight · T²·KL            (T = 4; the [CLS]-KD preset uses T = 1)
- ``nkd``     + nkd_weight · L_NKD           (τ = 1, γ = 1 for ViT students)
- ``vitkd``   + L_mim + L_gen                (α = 3e-5, β = 3e-6, λ = 0.5)
- ``deit``    ½·CE(cls, labels) replaces CE, + ½·CE(dist head, argmax teacher)
- ``clskd``, ``md``, ``cskd``: see their modules.

``DistillLoss.forward`` returns a dict of named, weighted terms plus ``loss`` (their sum).
"""

from __future__ import annotations

import torch
from torch import nn

from fastkd.config import MethodConfig, parse_methods
from fastkd.methods.base import CELoss, DeiTLoss, KDLoss, LossPart, NKDLoss
from fastkd.models import ModelInfo, Taps


def _int_list(spec: str | None) -> list[int] | None:
    if spec is None or spec == "":
        return None
    return [int(x) for x in str(spec).split(",") if x.strip()]


class DistillLoss(nn.Module):
    def __init__(self, parts: list[LossPart]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def student_blocks(self) -> list[int]:
        return sorted({i for p in self.parts for i in p.student_blocks()})

    def teacher_blocks(self) -> list[int]:
        return sorted({i for p in self.parts for i in p.teacher_blocks()})

    def signal_names(self) -> list[str]:
        return sorted({n for p in self.parts for n in p.signals})

    def teacher_dense(self) -> bool:
        return any(getattr(p, "needs_dense", False) for p in self.parts)

    def teacher_signals(self, t: Taps) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for p in self.parts:
            out.update(p.teacher_signals(t))
        return {k: v.detach() for k, v in out.items()}

    def forward(self, s: Taps, t: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        for p in self.parts:
            terms.update(p(s, t, batch))
        terms["loss"] = torch.stack([v.float() for v in terms.values()]).sum()
        return terms


def build_loss(
    mcfg: MethodConfig, s_info: ModelInfo, t_info: ModelInfo | None, *, epochs: int = 1
) -> DistillLoss:
    """One clear error when a method cannot bridge this teacher/student pair."""
    methods = parse_methods(mcfg.method)
    parts: list[LossPart] = []
    takes_ce = "deit" in methods or "cskd" in methods
    if mcfg.ce_weight > 0 and not takes_ce:
        parts.append(CELoss(mcfg.ce_weight, mcfg.label_smoothing))
    if any(m != "ce" for m in methods) and t_info is None:
        raise ValueError(f"--method {mcfg.method} needs a teacher (give --teacher or --teacher-cache)")
    for m in methods:
        if m == "ce":
            continue
        if m == "kd":
            parts.append(KDLoss(mcfg.kd_T, mcfg.kd_weight))
        elif m == "nkd":
            parts.append(NKDLoss(mcfg.nkd_tau, mcfg.nkd_gamma, mcfg.nkd_weight))
        elif m == "deit":
            if not s_info.has_dist_head:
                raise ValueError(
                    "--method deit needs a DeiT-distilled student with a distillation head "
                    "(e.g. --student deit_tiny_distilled_patch16_224)"
                )
            parts.append(DeiTLoss(mcfg.label_smoothing))
        elif m == "vitkd":
            from fastkd.methods.vitkd import ViTKDLoss

            _need_vit(s_info, t_info, "vitkd")
            if tuple(s_info.grid) != tuple(t_info.grid):
                raise ValueError(
                    f"--method vitkd needs equal token grids; student {s_info.grid} vs teacher {t_info.grid} "
                    "(use the same img_size/patch_size for both)"
                )
            blocks = tuple(_int_list(mcfg.vitkd_blocks) or (0, 1))
            for i in blocks:
                if i >= min(s_info.depth, t_info.depth):
                    raise ValueError(
                        f"--vitkd-blocks {mcfg.vitkd_blocks}: block {i} is out of range "
                        f"(student depth {s_info.depth}, teacher depth {t_info.depth})"
                    )
            parts.append(
                ViTKDLoss(
                    s_info.embed_dim,
                    t_info.embed_dim,
                    s_info.grid,
                    mimic_blocks=blocks,
                    alpha=mcfg.vitkd_alpha,
                    beta=mcfg.vitkd_beta,
                    mask_ratio=mcfg.vitkd_mask_ratio,
                )
            )
        elif m in ("clskd", "md", "cskd"):
            parts.append(_build_issue4_part(m, mcfg, s_info, t_info, epochs))
    if not parts:
        raise ValueError("the loss is empty: --ce-weight 0 with --method ce leaves nothing to train")
    return DistillLoss(parts)


def check_student(methods: list[str], s_info: ModelInfo) -> None:
    """Fail fast (before any teacher is trained) when the student cannot serve a method."""
    if "deit" in methods and not s_info.has_dist_head:
        raise ValueError(
            "--method deit needs a DeiT-distilled student with a distillation head "
            "(e.g. --student deit_tiny_distilled_patch16_224)"
        )
    if any(m in methods for m in ("vitkd", "clskd", "md", "cskd")) and s_info.kind != "vit":
        raise ValueError(f"--method {'+'.join(methods)} needs a ViT student; got a {s_info.kind} model")


def _need_vit(s_info: ModelInfo, t_info: ModelInfo | None, what: str) -> None:
    for role, info in (("student", s_info), ("teacher", t_info)):
        if info is None or info.kind != "vit":
            raise ValueError(
                f"--method {what} needs a ViT {role} with patch tokens; "
                f"got a {info.kind if info else 'missing'} model"
            )


def _build_issue4_part(m, mcfg, s_info, t_info, epochs):
    """[CLS]-KD (``clskd``), manifold (``md``) and CSKD (``cskd``) parts; one clear error per bad pairing.

    clskd/md: ViT student and teacher with CLS tokens and the same patch grid; layer pairs from
    ``--clskd-blocks`` (default [0,1,2,3,L_s−4..L_s−1]) mapped to the teacher's depth.
    cskd: ViT student; teacher with dense logits (CNN or ViT). Without ``deit`` in the method the
    CSKD part also carries ce_weight·CE on the cls head (the combiner leaves the cls CE to it).
    """
    from fastkd.methods.clskd import CLSKDLoss, ManifoldLoss, clskd_pairs
    from fastkd.methods.cskd import CSKDLoss

    if m in ("clskd", "md"):
        _need_vit(s_info, t_info, m)
        for role, info in (("student", s_info), ("teacher", t_info)):
            if not info.has_cls_token or info.num_prefix < 1:
                raise ValueError(f"--method {m} needs a CLS token, but the {role} {info.name} has none")
        if tuple(s_info.grid) != tuple(t_info.grid):
            raise ValueError(
                f"--method {m} needs equal patch grids; student {tuple(s_info.grid)} vs teacher "
                f"{tuple(t_info.grid)} (use the same img_size/patch_size for both)"
            )
        pairs = clskd_pairs(s_info.depth, t_info.depth, _int_list(mcfg.clskd_blocks))
        if m == "md":
            return ManifoldLoss(pairs, k=mcfg.md_k, weight=mcfg.md_weight)
        return CLSKDLoss(
            s_info.embed_dim,
            t_info.embed_dim,
            pairs,
            w_cls=mcfg.clskd_w_cls,
            w_map=mcfg.clskd_w_map,
            mu=mcfg.clskd_mu,
            detach=mcfg.clskd_detach,
        )
    if s_info.kind != "vit":
        raise ValueError(
            f"--method cskd needs a ViT student with patch tokens; got the {s_info.kind} {s_info.name}"
        )
    ce_weight = 0.0 if "deit" in parse_methods(mcfg.method) else mcfg.ce_weight
    return CSKDLoss(
        epochs,
        hard=mcfg.cskd_hard,
        T=mcfg.cskd_T,
        schedule=mcfg.cskd_schedule,
        per_iter=mcfg.cskd_per_iter,
        weight=mcfg.cskd_weight,
        ce_weight=ce_weight,
        smoothing=mcfg.label_smoothing,
    )
