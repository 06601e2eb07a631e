"""[CLS]-KD (Kang, Son, Kim, KBS 2024) and manifold distillation (Hao et al. 2022), as released
(github.com/kmc3661/cls-kd). The exact formulas are in METHODS.md; summary:

Layer pairs (``clskd_pairs`` below): student blocks [0,1,2,3, L_s−4, …, L_s−1] (deduplicated;
every block when L_s ≤ 8) or a custom ``--clskd-blocks`` list; the teacher block for student block i
is i when L_t = L_s, else round_half_up((i+1)·L_t/L_s) − 1. Raw block outputs, all tokens.

``CLSKDLoss`` (``--method clskd``), per pair k:

- L_cls,k = mean over B·D_t of (norm(c_t) − proj(norm(c_s)))², c = the CLS token (index 0); one
  projector shared by all pairs: Linear(D_s→H) → GELU → Linear(H→D_t), H = ⌊(D_s+D_t)/2⌋, identity
  when D_s = D_t.
- L_map,k = mean over B·N of (a_t − a_s)², a = norm(CLS)·norm(patch_n) (cosine; prefix tokens other
  than the CLS, e.g. DeiT's dist token, are skipped, so P_s ≠ P_t is fine).
- total: w_cls·ALD(L_cls) + w_map·ALD(L_map), ALD = Σ_{k<n} r_k L_k + μ·r_n·L_n, r_k = L_k/Σ_j L_j
  (release: r not detached; ``detach=True`` is the option), μ = 4 on the last pair.

``ManifoldLoss`` (``--method md``), same pairs: per pair, the tokens [CLS, patches] (other prefix tokens
dropped so student and teacher token counts match), each L2-normalised; mean over pairs of
4·patch + 0.1·sample + 0.2·random Gram MSEs (K = 192 random tokens). No ALD.

Teacher signals (named, so a cache can store them), k = index in the pair list:
``clskd_cls_{k}`` [B, D_t] teacher CLS, ``clskd_map_{k}`` [B, N] teacher CLS–patch map,
``md_tok_{k}`` [B, 1+N, D_t] teacher [CLS, patches].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fastkd.methods.base import BuildContext, LossPart, Method, int_list, need_vit, register
from fastkd.ops import dispatch as KF

# --------------------------------------------------------------------------------------------------
# layer mapping ([CLS]-KD)
# --------------------------------------------------------------------------------------------------


def layer_map(i: int, L_s: int, L_t: int) -> int:
    """Teacher block for student block ``i``: i when L_s == L_t, else round((i+1)·L_t/L_s) − 1.

    round is half-up, floor(x + 1/2), computed exactly in integers ((2(i+1)L_t + L_s) // (2 L_s)); Python's
    round() would round halves to even (12 -> 6: i = 0 would map to round(0.5) − 1 = −1).
    12 -> 6: [0,0,1,1,2,2,3,3,4,4,5,5]; 6 -> 12: [1,3,5,7,9,11].
    """
    for key, val in (("L_s", L_s), ("L_t", L_t)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{key} must be a positive int depth, got {val!r}")
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < L_s:
        raise ValueError(f"student block {i!r} is out of range for student depth {L_s} (valid: 0..{L_s - 1})")
    if L_s == L_t:
        return i
    return (2 * (i + 1) * L_t + L_s) // (2 * L_s) - 1


def clskd_student_blocks(L_s: int, pairs: Sequence[int] | None = None) -> list[int]:
    """Student blocks [CLS]-KD taps: default [0,1,2,3, L_s−4, …, L_s−1] deduplicated and sorted
    (8 blocks at depth 12; all blocks when L_s ≤ 8). ``pairs``: a custom list of student blocks
    (negative = from the end), validated, deduplicated and sorted."""
    if isinstance(L_s, bool) or not isinstance(L_s, int) or L_s < 1:
        raise ValueError(f"L_s must be a positive int depth, got {L_s!r}")
    if pairs is None:
        return sorted({i for i in (0, 1, 2, 3, L_s - 4, L_s - 3, L_s - 2, L_s - 1) if 0 <= i < L_s})
    out = set()
    for i in pairs:
        if isinstance(i, bool) or not isinstance(i, int) or not -L_s <= i < L_s:
            raise ValueError(
                f"clskd student block {i!r} is out of range for student depth {L_s} "
                f"(valid: {-L_s}..{L_s - 1})"
            )
        out.add(i % L_s)
    if not out:
        raise ValueError("clskd needs at least one student block; pass a non-empty list (or None)")
    return sorted(out)


def clskd_pairs(L_s: int, L_t: int, student_blocks: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """[(student block, teacher block)] for [CLS]-KD: ``clskd_student_blocks`` mapped by ``layer_map``.
    Depth 12 -> 12: [(0,0),(1,1),(2,2),(3,3),(8,8),(9,9),(10,10),(11,11)]."""
    return [(i, layer_map(i, L_s, L_t)) for i in clskd_student_blocks(L_s, student_blocks)]


def cls_and_patches(tokens: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """[B, P+N, D] → [B, 1+N, D]: the CLS token (index 0) and the N patch tokens (other prefixes dropped)."""
    if num_prefix == 1:
        return tokens
    return torch.cat([tokens[:, :1], tokens[:, num_prefix:]], dim=1)


class CLSProjector(nn.Module):
    """Shared [CLS] projector [B, D_s] → [B, D_t]: Linear(D_s→H) → GELU → Linear(H→D_t), H = ⌊(D_s+D_t)/2⌋."""

    def __init__(self, d_s: int, d_t: int):
        super().__init__()
        hidden = (d_s + d_t) // 2
        self.net = nn.Sequential(nn.Linear(d_s, hidden), nn.GELU(), nn.Linear(hidden, d_t))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CLSKDLoss(LossPart):
    """[CLS]-KD: ALD-weighted CLS-embedding and CLS–patch map losses over layer pairs.

    pairs: [(student block, teacher block)]; returns {"clskd_cls": w_cls·ALD(L_cls),
    "clskd_map": w_map·ALD(L_map)} (0-d each).
    """

    name = "clskd"

    def __init__(
        self,
        d_s: int,
        d_t: int,
        pairs: Sequence[tuple[int, int]],
        *,
        w_cls: float = 1.0,
        w_map: float = 2.0,
        mu: float = 4.0,
        detach: bool = False,
    ):
        super().__init__()
        if not pairs:
            raise ValueError("clskd needs at least one layer pair; check --clskd-blocks")
        self.pairs = [(int(i), int(j)) for i, j in pairs]
        self.w_cls, self.w_map, self.mu, self.detach = w_cls, w_map, mu, detach
        self.projector = None if d_s == d_t else CLSProjector(d_s, d_t)
        n = len(self.pairs)
        self.signals = tuple(f"clskd_cls_{k}" for k in range(n)) + tuple(f"clskd_map_{k}" for k in range(n))

    def student_blocks(self):
        return sorted({i for i, _ in self.pairs})

    def teacher_blocks(self):
        return sorted({j for _, j in self.pairs})

    def signal_blocks(self):
        return [j for _, j in self.pairs]

    def teacher_signals(self, t):
        out = {}
        for k, (_, j) in enumerate(self.pairs):
            tok = t.blocks[j]
            out[f"clskd_cls_{k}"] = tok[:, 0]
            out[f"clskd_map_{k}"] = KF.cls_patch_map(tok, t.num_prefix)
        return out

    def layer_losses(self, s, t) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-pair (L_cls,k list, L_map,k list), each a 0-d tensor, before ALD and weights."""
        cls_l, map_l = [], []
        embed, cmap = KF.cls_embed_loss, KF.cls_patch_map
        for k, (i, _) in enumerate(self.pairs):
            tok = s.blocks[i]
            cls_l.append(embed(tok[:, 0], t[f"clskd_cls_{k}"], self.projector))
            a_s = cmap(tok, s.num_prefix)
            a_t = t[f"clskd_map_{k}"]
            if a_s.shape != a_t.shape:
                raise ValueError(
                    f"clskd: student has {a_s.shape[1]} patch tokens, teacher {a_t.shape[1]}; "
                    "use the same img_size/patch grid for both"
                )
            dt = a_s.dtype if a_s.dtype in (torch.float32, torch.float64) else torch.float32
            map_l.append((a_t.to(dt) - a_s.to(dt)).pow(2).mean())  # = cls_patch_map_loss on the tokens
        return cls_l, map_l

    def forward(self, s, t, batch):
        cls_l, map_l = self.layer_losses(s, t)
        ald = KF.ald
        return {
            "clskd_cls": self.w_cls * ald(cls_l, last_weight=self.mu, detach=self.detach),
            "clskd_map": self.w_map * ald(map_l, last_weight=self.mu, detach=self.detach),
        }


def check_pair(name: str, s_info, t_info) -> None:
    """[CLS]-KD and manifold KD: ViT student and teacher with CLS tokens and the same patch grid."""
    need_vit(s_info, t_info, name)
    for role, info in (("student", s_info), ("teacher", t_info)):
        if not info.has_cls_token or info.num_prefix < 1:
            raise ValueError(f"--method {name} needs a CLS token, but the {role} {info.name} has none")
    if tuple(s_info.grid) != tuple(t_info.grid):
        raise ValueError(
            f"--method {name} needs equal patch grids; student {tuple(s_info.grid)} vs teacher "
            f"{tuple(t_info.grid)} (use the same img_size/patch_size for both)"
        )


@dataclass
class CLSKDConfig:
    """The ``--clskd-*`` flags (fields of ``fastkd.config.MethodConfig``, same names and defaults)."""

    clskd_blocks: str | None = None  # student blocks; default [0,1,2,3,L-4..L-1]
    clskd_w_cls: float = 1.0
    clskd_w_map: float = 2.0
    clskd_mu: float = 4.0
    clskd_detach: bool = False


def build(mcfg: CLSKDConfig, s_info, t_info, ctx: BuildContext):
    check_pair("clskd", s_info, t_info)
    return CLSKDLoss(
        s_info.embed_dim,
        t_info.embed_dim,
        clskd_pairs(s_info.depth, t_info.depth, int_list(mcfg.clskd_blocks)),
        w_cls=mcfg.clskd_w_cls,
        w_map=mcfg.clskd_w_map,
        mu=mcfg.clskd_mu,
        detach=mcfg.clskd_detach,
    )


METHOD = register(
    Method("clskd", build, config=CLSKDConfig, student_vit=True, terms=("clskd_cls", "clskd_map"))
)
