"""Manifold distillation (``md``; Hao et al. 2022), as used by the [CLS]-KD release, over the [CLS]-KD
layer pairs (``fastkd.methods.clskd.clskd_pairs``, ``--clskd-blocks``).

Per pair: the tokens [CLS, patches] (other prefix tokens dropped so student and teacher token counts
match), each L2-normalised; mean over pairs of 4·patch + 0.1·sample + 0.2·random Gram MSEs (K = 192
random tokens). No ALD. Teacher signal ``md_tok_{k}`` [B, 1+N, D_t] for pair k.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fastkd.methods.base import BuildContext, LossPart, Method, int_list, register
from fastkd.methods.clskd import check_pair, cls_and_patches, clskd_pairs
from fastkd.ops import dispatch as KF


class ManifoldLoss(LossPart):
    """Manifold distillation over the [CLS]-KD layer pairs; returns {"md": weight·L_MD}."""

    name = "md"

    def __init__(self, pairs: Sequence[tuple[int, int]], *, k: int = 192, weight: float = 1.0):
        super().__init__()
        if not pairs:
            raise ValueError("md needs at least one layer pair; check --clskd-blocks")
        self.pairs = [(int(i), int(j)) for i, j in pairs]
        self.k, self.weight = int(k), weight
        self.signals = tuple(f"md_tok_{k}" for k in range(len(self.pairs)))

    def student_blocks(self):
        return sorted({i for i, _ in self.pairs})

    def teacher_blocks(self):
        return sorted({j for _, j in self.pairs})

    def signal_blocks(self):
        return [j for _, j in self.pairs]

    def teacher_signals(self, t):
        return {
            f"md_tok_{k}": cls_and_patches(t.blocks[j], t.num_prefix) for k, (_, j) in enumerate(self.pairs)
        }

    def forward(self, s, t, batch):
        s_tok = [cls_and_patches(s.blocks[i], s.num_prefix) for i, _ in self.pairs]
        t_tok = [t[f"md_tok_{k}"] for k in range(len(self.pairs))]
        loss = KF.manifold_loss(s_tok, t_tok, k=self.k, generator=batch.get("generator"))
        return {"md": self.weight * loss}


@dataclass
class MDConfig:
    """The ``--md-*`` flags (fields of ``fastkd.config.MethodConfig``, same names and defaults)."""

    clskd_blocks: str | None = None  # the [CLS]-KD layer pairs
    md_weight: float = 1.0
    md_k: int = 192


def build(mcfg: MDConfig, s_info, t_info, ctx: BuildContext):
    check_pair("md", s_info, t_info)
    pairs = clskd_pairs(s_info.depth, t_info.depth, int_list(mcfg.clskd_blocks))
    return ManifoldLoss(pairs, k=mcfg.md_k, weight=mcfg.md_weight)


METHOD = register(Method("md", build, config=MDConfig, student_vit=True, terms=("md",)))
