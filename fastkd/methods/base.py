"""Loss parts (the unit the registry adds up) and ``Method``, the one place a method declares itself.

A part declares which student/teacher blocks it needs tapped, which teacher signals it
consumes (named tensors, so a cached teacher can serve them from disk), and returns a dict
of named, already-weighted loss terms. Student first, teacher second, always.

Teacher signals are produced from the teacher's :class:`fastkd.models.Taps` by
``teacher_signals`` (online) or read from the cache (same names, same shapes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastkd.models import Taps


class LossPart(nn.Module):
    name = "part"
    #: teacher signal names this part reads
    signals: tuple[str, ...] = ()
    #: the online teacher must give dense per-location logits (``forward_taps(dense=True)``)
    needs_dense = False

    def student_blocks(self) -> list[int]:
        return []

    def teacher_blocks(self) -> list[int]:
        return []

    def signal_blocks(self) -> list[int]:
        """The teacher blocks behind this part's signals, in signal order (a cache checks them: [CLS]-KD
        names signals by layer-pair index). Default: ``teacher_blocks``."""
        return self.teacher_blocks()

    def teacher_signals(self, t: Taps) -> dict[str, torch.Tensor]:
        return {}

    def forward(self, s: Taps, t: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def logit_signals(t: Taps) -> dict[str, torch.Tensor]:
    return {"logits": t.logits}


def soft_ce(logits: torch.Tensor, y_soft: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Cross-entropy against (possibly mixed) soft labels with label smoothing, mean over B."""
    C = logits.shape[-1]
    target = y_soft * (1.0 - smoothing) + smoothing / C
    return -(target * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()



@dataclass(frozen=True)
class Method:
    """Everything fastkd needs to know about one method, declared in the method's own file.

    name: the ``--method`` name. build(cfg, s_info, t_info, ctx) → the method's ``LossPart`` (or None),
      raising one clear ValueError when it cannot bridge this student/teacher pair; cfg is the method's
      typed ``config`` filled from the run's flags (the whole ``MethodConfig`` when ``config`` is None);
      ctx a ``BuildContext``.
    config: the method's typed config, a dataclass whose fields are ``fastkd.config.MethodConfig`` fields
      (the CLI flags and config.json keys stay flat; a test checks names, types and defaults agree).
      The part declares the taps (student/teacher blocks), the teacher signals it reads and
      ``needs_dense`` (a dense CNN map).
    teacher: None = no teacher; "vit" = the default teacher is the ViT; "cnn" = the default teacher is
      the CNN with dense logits.
    student_vit: needs a ViT student with patch tokens.
    dist_head: "require" (a DeiT-distilled student, and the default student gets that head), "prefer"
      (the study's student has it: the method's eval reads it), or None.
    owns_ce: the method applies the cls-head CE itself; the plain CE part is left out.
    terms: the loss terms it logs (and report.png plots), in order.
    eval_dense_heads: eval rule (CSKD release): a distilled student's top-1 is the argmax of the mean of
      (cls logits, dist logits, mean over patches of the dense dist-head logits).
    """

    name: str
    build: Callable[..., LossPart | None]
    config: type | None = None
    teacher: str | None = "vit"
    student_vit: bool = False
    dist_head: str | None = None
    owns_ce: bool = False
    terms: tuple[str, ...] = ()
    eval_dense_heads: bool = False


@dataclass(frozen=True)
class BuildContext:
    """What a method's ``build`` may know beyond its flags: the other methods of the total and the epochs."""

    methods: tuple[Method, ...]
    epochs: int = 1

    def others_own_ce(self, me: str) -> bool:
        return any(m.owns_ce for m in self.methods if m.name != me)


def typed_config(method: Method, mcfg: Any) -> Any:
    """The method's typed config filled from the run's ``MethodConfig`` (or ``mcfg`` itself)."""
    if method.config is None:
        return mcfg
    return method.config(**{f.name: getattr(mcfg, f.name) for f in fields(method.config)})


#: name → Method, in registration order (``fastkd.methods.registry`` imports every method file)
REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry (timm style: each method file registers itself on import)."""
    REGISTRY[method.name] = method
    return method


def int_list(spec: Any) -> list[int] | None:
    """'0,1' → [0, 1]; None or '' → None."""
    if spec is None or spec == "":
        return None
    return [int(x) for x in str(spec).split(",") if x.strip()]


def need_vit(s_info, t_info, what: str) -> None:
    for role, info in (("student", s_info), ("teacher", t_info)):
        if info is None or info.kind != "vit":
            raise ValueError(
                f"--method {what} needs a ViT {role} with patch tokens; "
                f"got a {info.kind if info else 'missing'} model"
            )
