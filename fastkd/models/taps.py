"""One forward, everything the losses read: ``forward_taps`` → ``Taps``; dense per-location logits.

* ``forward_taps`` runs a model once and returns a ``Taps``: logits (and the DeiT distillation-head
  logits), raw block outputs for ViTs (through ``VisionTransformer.forward_intermediates``), the final-norm
  tokens, and for CNN teachers the dense (per-location) classifier logits CSKD needs.
* ``patch_logits``: a ViT's head applied to every patch token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastkd.models.zoo import (
    ModelInfo,
    _eval_mode,
    _has_dist_head,
    _is_vit,
    _model_name,
    _pair,
    model_info,
    require_vit,
)

# --------------------------------------------------------------------------------------------------
# dense (per-location) classifier heads
# --------------------------------------------------------------------------------------------------

_MEAN_POOLS = {"avg", "fast", "fastavg"}


def _dense_head_parts(model: nn.Module) -> tuple[nn.Module | None, nn.Module]:
    """(per-location norm or None, linear classifier) of a CNN whose head is pool-mean -> [norm] -> linear.

    Supported: ResNet-style ``global_pool`` + ``fc``; timm ``ClassifierHead`` (RegNet, ConvNeXt with
    head_norm_first, ...); timm ``NormMlpClassifierHead`` without the hidden MLP (ConvNeXt: a LayerNorm2d
    after pooling, applied here at every location instead). Anything else raises ValueError.
    """
    from timm.layers import ClassifierHead, LayerNorm2d, NormMlpClassifierHead, SelectAdaptivePool2d

    name = _model_name(model)
    head = getattr(model, "head", None)
    norm = None
    if isinstance(head, ClassifierHead):
        pool, fc = head.global_pool, head.fc
    elif isinstance(head, NormMlpClassifierHead):
        if not isinstance(head.pre_logits, nn.Identity):
            raise ValueError(
                f"{name}'s head has a hidden MLP with an activation (not linear), so it has no dense "
                f"per-location logits; rebuild it without head_hidden_size or use another teacher"
            )
        pool, fc = head.global_pool, head.fc
        if isinstance(head.norm, LayerNorm2d):
            norm = head.norm
        elif not isinstance(head.norm, nn.Identity):
            raise ValueError(
                f"{name}'s head norm {type(head.norm).__name__} is not per-location; dense logits unsupported"
            )
    elif isinstance(getattr(model, "global_pool", None), SelectAdaptivePool2d) and isinstance(
        getattr(model, "fc", None), (nn.Linear, nn.Conv2d)
    ) and not isinstance(head, nn.Module):
        pool, fc = model.global_pool, model.fc
    else:
        raise ValueError(
            f"{name} has an unsupported classifier head ({type(head).__name__}) "
            f"for dense logits; supported: pool+linear heads (ResNet, RegNet, ConvNeXt) and ViTs"
        )
    pool_type = str(getattr(pool, "pool_type", "")).lower()
    if pool_type not in _MEAN_POOLS:
        raise ValueError(
            f"{name} pools with {pool_type or 'no pooling'!r}, not a mean, so dense logits do not average "
            f"to its logits; rebuild it with global_pool='avg'"
        )
    if isinstance(fc, nn.Conv2d) and tuple(fc.kernel_size) != (1, 1):
        raise ValueError(f"{name}'s classifier is a {tuple(fc.kernel_size)} conv, not 1x1; no dense logits")
    if not isinstance(fc, (nn.Linear, nn.Conv2d)):
        raise ValueError(f"{name} has no classifier (num_classes=0?); build it with num_classes > 0")
    return norm, fc


def _dense_logits_cnn(model: nn.Module, f: torch.Tensor) -> torch.Tensor:
    """[B,F,h,w] final feature map -> [B,C,h,w]: the classifier at every location (channels-last strides)."""
    norm, fc = _dense_head_parts(model)
    if norm is not None:
        f = norm(f)
    w = fc.weight.reshape(fc.weight.shape[0], -1)  # [C, F] for Linear or 1x1 conv
    return F.linear(f.permute(0, 2, 3, 1), w, fc.bias).permute(0, 3, 1, 2)


def require_dense_head(model: nn.Module, what: str = "dense logits") -> ModelInfo:
    """Check ``model`` can give dense per-location logits (CSKD teacher); ValueError otherwise.

    ViTs: the head applied to every patch token (``patch_logits``). CNNs: the structure check of
    ``_dense_head_parts`` plus a numeric check, on random features, that ``model.forward_head`` is exactly
    mean-pool -> [norm] -> classifier (catches models whose forward_head does more). Call once at setup
    (it synchronises), not in the training step.
    """
    info = model_info(model)
    if info.kind == "vit":
        if not isinstance(model.head, nn.Linear):
            raise ValueError(
                f"{what} needs a linear classifier head, but {info.name} has none (num_classes=0?)"
            )
        return info
    norm, fc = _dense_head_parts(model)
    w = fc.weight.reshape(fc.weight.shape[0], -1)  # [C, F]
    f = torch.randn(2, w.shape[1], 3, 2, device=w.device, dtype=w.dtype)
    with _eval_mode(model), torch.no_grad():
        ref = model.forward_head(f)
        g = f.mean((2, 3), keepdim=True)
        g = norm(g) if norm is not None else g
        mine = F.linear(g.flatten(1), w, fc.bias)
    if ref.shape != mine.shape or not torch.allclose(ref, mine, rtol=1e-4, atol=1e-4):
        raise ValueError(
            f"{what}: {info.name}.forward_head is not mean-pool -> classifier, so it has no dense logits; "
            f"use a ResNet/RegNet/ConvNeXt teacher"
        )
    return info


# --------------------------------------------------------------------------------------------------
# taps
# --------------------------------------------------------------------------------------------------


@dataclass
class Taps:
    """One forward's outputs.

    logits: [B,C] main head (ViT: ``forward_head``; DeiT-distilled: the CLS head alone, not averaged).
    dist_logits: [B,C] the distillation head on the dist token (DeiT-distilled), else None.
    blocks: {absolute block index: [B,P+N,D]} raw block outputs (residual stream after the block, no final
      norm, prefix tokens first). Negative requested indices are stored under their absolute index.
    tokens: [B,P+N,D] after the final norm (= ``model.forward_features(x)``); None for CNNs.
    num_prefix: P (0 for CNNs). grid: (h,w) of the patch tokens, or of a CNN's final feature map.
    dense_logits: [B,C,h,w] per-location logits when ``dense=True``, else None.
    """

    logits: torch.Tensor
    dist_logits: torch.Tensor | None
    blocks: dict[int, torch.Tensor]
    tokens: torch.Tensor | None
    num_prefix: int
    grid: tuple[int, int]
    dense_logits: torch.Tensor | None = None


def _abs_blocks(model: nn.Module, blocks: Sequence[int], depth: int) -> list[int]:
    out = []
    for i in blocks:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f"block indices must be ints, got {i!r}")
        j = i + depth if i < 0 else i
        if not 0 <= j < depth:
            raise ValueError(
                f"block index {i} is out of range for {_model_name(model)} with depth {depth} "
                f"(valid: {-depth}..{depth - 1})"
            )
        out.append(j)
    return sorted(set(out))


def _vit_grid(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    pe = model.patch_embed
    if getattr(model, "dynamic_img_size", False) and hasattr(pe, "dynamic_feat_size"):
        return _pair(pe.dynamic_feat_size((x.shape[-2], x.shape[-1])))
    return _pair(pe.grid_size)


def forward_taps(
    model: nn.Module, x: torch.Tensor, blocks: Sequence[int] = (), *, dense: bool = False
) -> Taps:
    """Run ``model`` on images ``x`` [B,C_in,H,W] once and return ``Taps``.

    ViTs go through ``model.forward_intermediates(x, indices=..., norm=False, output_fmt='NLC',
    return_prefix_tokens=True)`` (timm's own loop: patch_embed -> _pos_embed -> patch_drop -> norm_pre ->
    blocks -> norm); the prefix tokens are concatenated back in front of the patch tokens. With no blocks
    requested it is a plain ``forward_features``. Logits: ``model.forward_head(tokens)``; a DeiT-distilled
    model gets both heads explicitly, ``head(tokens[:,0])`` and ``head_dist(tokens[:,1])``, never averaged.
    ``dense=True`` on a ViT gives ``patch_logits`` on the grid, [B,C,h,w].

    CNNs: f = ``forward_features(x)`` [B,F,h,w], logits = ``forward_head(f)``; ``dense=True`` applies the
    classifier at every location of f (see ``_dense_head_parts``); for a linear head (ResNet, RegNet)
    mean over locations of dense_logits == logits; for a ConvNeXt head (LayerNorm2d after pooling) the
    norm is applied per location, so the mean of dense_logits differs from logits. CNNs have no blocks.

    No host syncs; all branching is on static structure, so it compiles with ``torch.compile``.
    """
    if x.ndim != 4:
        raise ValueError(f"forward_taps expects images [B,C,H,W], got shape {tuple(x.shape)}")
    name = _model_name(model)
    in_chans = getattr(model, "in_chans", None)
    if in_chans is None and isinstance(getattr(model, "fastkd_arch", None), dict):
        in_chans = model.fastkd_arch.get("in_chans")
    if in_chans is not None and x.shape[1] != in_chans:
        raise ValueError(
            f"{name} takes {in_chans}-channel images but got {x.shape[1]}; rebuild it with in_chans"
        )

    if not _is_vit(model):
        if blocks:
            require_vit(model, "block taps")
        f = model.forward_features(x)
        logits = model.forward_head(f)
        grid = (int(f.shape[-2]), int(f.shape[-1])) if f.ndim == 4 else (1, 1)
        dense_logits = _dense_logits_cnn(model, f) if dense else None
        return Taps(logits, None, {}, None, 0, grid, dense_logits)

    pe = model.patch_embed
    if not getattr(model, "dynamic_img_size", False) and getattr(pe, "strict_img_size", True):
        want = _pair(pe.img_size)
        if (x.shape[-2], x.shape[-1]) != want:
            raise ValueError(
                f"{name} was built for {want[0]}x{want[1]} images but got {x.shape[-2]}x{x.shape[-1]}; "
                f"rebuild it with img_size={x.shape[-1]}"
            )
    depth = len(model.blocks)
    P = int(model.num_prefix_tokens)
    idx = _abs_blocks(model, blocks, depth)
    if idx:
        tokens, inter = model.forward_intermediates(
            x, indices=idx, return_prefix_tokens=True, norm=False, output_fmt="NLC"
        )
        if P:
            inter = [torch.cat([prefix, patches], dim=1) for patches, prefix in inter]
        taps = dict(zip(idx, inter, strict=True))
    else:
        tokens = model.forward_features(x)
        taps = {}

    if _has_dist_head(model):
        drop = getattr(model, "head_drop", None) or nn.Identity()
        logits = model.head(drop(tokens[:, 0]))
        dist_logits = model.head_dist(drop(tokens[:, 1]))
    else:
        logits = model.forward_head(tokens)
        dist_logits = None
    grid = _vit_grid(model, x)
    dense_logits = None
    if dense:
        pl = patch_logits(model, tokens, P)  # [B,N,C]
        dense_logits = pl.transpose(1, 2).reshape(pl.shape[0], pl.shape[2], grid[0], grid[1])
    return Taps(logits, dist_logits, taps, tokens, P, grid, dense_logits)


def patch_logits(model: nn.Module, tokens: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """[B,P+N,D] final-norm tokens -> [B,N,C]: a classifier applied to every patch token.

    Uses the distillation head (``head_dist``) for a DeiT-distilled model, else the main ``head``
    (preceded by ``fc_norm`` when the model has one, e.g. ``global_pool='avg'`` ViTs, whose final ``norm``
    is an identity). No dropout.
    """
    info = require_vit(model, "patch logits")
    head = model.head_dist if info.has_dist_head else model.head
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"{info.name} has no linear classifier head (num_classes=0?); build it with num_classes > 0"
        )
    p = tokens[:, num_prefix:]
    fc_norm = getattr(model, "fc_norm", None)
    if not info.has_dist_head and fc_norm is not None:
        p = fc_norm(p)
    return head(p)
