"""The method registry and the total loss: ``build_loss`` loops over the methods named by ``--method``.

Every method file (``ce``, ``kd``, ``nkd``, ``vitkd``, ``clskd``, ``md``, ``cskd``, ``deit``) declares one
``Method`` (``fastkd.methods.base``) and registers it on import; importing this module imports them all.
Adding a method is adding one file and one import line below, as timm adds a model.

The total (each part's weights are config fields): CE(cls head, label smoothing 0.1)·ce_weight — left
out when ce_weight = 0 or a method that owns the cls CE is in the total (``deit``, ``cskd``) — plus each
method's part. ``DistillLoss.forward`` returns a dict of named, weighted terms plus ``loss`` (their sum).
"""

from __future__ import annotations

import difflib

import torch
from torch import nn

# the method files: importing one registers it (_BUILTIN below orders them for logs and plots)
from fastkd.methods import ce, clskd, cskd, deit, kd, md, nkd, vitkd
from fastkd.methods.base import REGISTRY, BuildContext, LossPart, Method, typed_config
from fastkd.methods.ce import CELoss
from fastkd.models import ModelInfo, Taps

_BUILTIN = (ce, kd, nkd, vitkd, clskd, md, cskd, deit)


def registered() -> list[Method]:
    """Every registered Method: the built-in ones in the order above, then any registered later."""
    first = [m.METHOD for m in _BUILTIN]
    return first + [m for m in REGISTRY.values() if m not in first]


def method_names() -> tuple[str, ...]:
    return tuple(m.name for m in registered())


def methods_of(spec: str | list[str]) -> list[Method]:
    """'+'-joined names (or a list) → their Methods, deduplicated in order; one clear line for a typo."""
    names = [m.strip().lower() for m in spec.split("+") if m.strip()] if isinstance(spec, str) else spec
    known = list(method_names())
    if not names:
        raise ValueError("--method is empty; give '+'-joined names from: " + ", ".join(known))
    for m in names:
        if m not in REGISTRY:
            close = difflib.get_close_matches(m, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"--method: unknown method '{m}'{hint}; choose from: {', '.join(known)}")
    return [REGISTRY[m] for m in sorted(set(names), key=names.index)]


def needs_teacher(spec: str) -> bool:
    return any(m.teacher for m in methods_of(spec))


def needs_cnn_teacher(spec: str) -> bool:
    """The default teacher of this total is the CNN (dense logits), not the ViT."""
    return any(m.teacher == "cnn" for m in methods_of(spec))


def wants_dist_head(spec: str, *, strict: bool = True) -> bool:
    """The student needs a DeiT distillation head (strict), or the method's eval reads one (not strict)."""
    ok = ("require",) if strict else ("require", "prefer")
    return any(m.dist_head in ok for m in methods_of(spec))


def eval_dense_heads(spec: str) -> bool:
    return any(m.eval_dense_heads for m in methods_of(spec))


def report_terms() -> tuple[str, ...]:
    """Loss terms report.png draws (whatever a run logged of them): the total, then every method's terms."""
    return ("loss", *(t for m in registered() for t in m.terms))


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
        return any(p.needs_dense for p in self.parts)

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


def build_loss(mcfg, s_info: ModelInfo, t_info: ModelInfo | None, *, epochs: int = 1) -> DistillLoss:
    """The total loss of ``mcfg.method``; one clear error when a method cannot bridge this pair."""
    methods = methods_of(mcfg.method)
    ctx = BuildContext(tuple(methods), epochs)
    parts: list[LossPart] = []
    ce_cfg = typed_config(ce.METHOD, mcfg)
    if ce_cfg.ce_weight > 0 and not any(m.owns_ce for m in methods):
        parts.append(CELoss(ce_cfg.ce_weight, ce_cfg.label_smoothing))
    if any(m.teacher for m in methods) and t_info is None:
        raise ValueError(f"--method {mcfg.method} needs a teacher (give --teacher or --teacher-cache)")
    for m in methods:
        part = m.build(typed_config(m, mcfg), s_info, t_info, ctx)
        if part is not None:
            parts.append(part)
    if not parts:
        raise ValueError("the loss is empty: --ce-weight 0 with --method ce leaves nothing to train")
    return DistillLoss(parts)


def check_student(spec: str, s_info: ModelInfo) -> None:
    """Fail fast (before any teacher is trained) when the student cannot serve a method."""
    methods = methods_of(spec)
    for m in methods:
        if m.dist_head == "require" and not s_info.has_dist_head:
            raise ValueError(
                f"--method {m.name} needs a DeiT-distilled student with a distillation head "
                "(e.g. --student deit_tiny_distilled_patch16_224)"
            )
    if any(m.student_vit for m in methods) and s_info.kind != "vit":
        names = "+".join(m.name for m in methods)
        vit_only = "+".join(m.name for m in methods if m.student_vit)
        logit_only = "+".join(m.name for m in methods if not m.student_vit) or "kd"
        raise ValueError(
            f"--method {names}: {vit_only} needs a ViT student with patch tokens, and --student "
            f"{s_info.name} is a {s_info.kind}; pick a timm ViT/DeiT student (e.g. --student "
            f"deit_tiny_patch16_224) or a logit-only method (e.g. --method {logit_only})"
        )
