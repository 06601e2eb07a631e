"""timm students and teachers for fastkd: creation, checkpoints, taps, layer mapping.

Everything here works on plain timm modules; nothing is monkey-patched and no forward hooks are used.

* ``create_model`` builds any timm model with ``pretrained=False`` (weights never download; a user brings
  weights as a ``.safetensors`` checkpoint written by ``save_model``). ``default_arch`` gives the fastkd
  "tiny" ViT presets that scale to small data; ``create_model`` also accepts them by name
  (``fastkd_teacher`` / ``fastkd_student``).
* ``forward_taps`` runs a model once and returns a ``Taps``: logits (and the DeiT distillation-head
  logits), raw block outputs for ViTs (through ``VisionTransformer.forward_intermediates``), the final-norm
  tokens, and for CNN teachers the dense (per-location) classifier logits CSKD needs.
* ``layer_map`` / ``clskd_pairs`` give the [CLS]-KD layer pairing of METHODS.md.

Token layout (timm): ``[B, P+N, D]`` with the P prefix tokens first (CLS; CLS then dist for
DeiT-distilled; then any register tokens) followed by N patch tokens in row-major order of the
``grid = (h, w)`` patch grid.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from torch import nn

import fastkd.cnn  # noqa: F401,E402  (registers the fastkd_resnet timm model for checkpoints)

__all__ = [
    "PRESETS",
    "ModelInfo",
    "Taps",
    "clskd_pairs",
    "clskd_student_blocks",
    "count_flops",
    "create_model",
    "default_arch",
    "default_patch_size",
    "forward_taps",
    "freeze",
    "layer_map",
    "load_model",
    "model_info",
    "patch_logits",
    "read_meta",
    "require_cls_token",
    "require_dense_head",
    "require_dist_head",
    "require_vit",
    "resolve_model",
    "save_model",
]

# --------------------------------------------------------------------------------------------------
# presets and creation
# --------------------------------------------------------------------------------------------------

PRESET_BASE = "vit_tiny_patch16_224"
"""timm entry point the fastkd presets override (a plain ``VisionTransformer``)."""

PRESETS = {
    # role: (embed_dim, depth, num_heads, mlp_ratio)
    "teacher": (128, 6, 4, 4.0),
    "student": (64, 4, 2, 4.0),
}
"""fastkd "tiny" ViTs for small data. Per-block FLOPs ≈ 24·N·D² + 4·N²·D (N tokens incl. CLS, D width,
MLP ratio 4; FLOPs = 2·multiply-adds), so teacher/student ≈ (6·128²)/(4·64²) = 6 when the 24·N·D² term
dominates and less as N grows (the attention term scales with D only): measured with ``count_flops`` (incl.
patch embedding and head) 5.9× at 8×8 (patch 2, N = 17), 5.6× at 28×28 and 32×32 (patch 4, N = 50 / 65),
4.8× at 224×224 (patch 16, N = 197)."""

_PRESET_NAMES = {"fastkd_teacher": "teacher", "fastkd_student": "student"}
_ARCH_KEY = "fastkd"  # safetensors metadata key holding the JSON record
_FORMAT = 1


def default_patch_size(img_size: int) -> int:
    """Patch size for the fastkd presets: a small token grid, so small data trains fast.

    Token budget: 64 patch tokens, or 196 when ``img_size >= 224`` (ImageNet-style 14×14).
    Returns the smallest p in (2, 4, 8, 16, 32) dividing ``img_size`` with (img_size/p)² within budget,
    so 8 → 2 (4×4 grid), 28 → 4 (7×7), 32 → 4 (8×8), 224 → 16 (14×14). p = 1 is not a first choice
    (8×8 digits would otherwise become 64 one-pixel tokens); sizes that no power of two fits
    (odd sizes) take the smallest divisor of ``img_size`` within budget, as long as the grid keeps at
    least 2×2 tokens; otherwise a ValueError names the fix.
    """
    if not isinstance(img_size, int) or img_size < 2:
        raise ValueError(f"img_size must be an int >= 2, got {img_size!r}")
    budget = 196 if img_size >= 224 else 64
    for p in (2, 4, 8, 16, 32):
        if img_size % p == 0 and (img_size // p) ** 2 <= budget:
            return p
    for p in range(1, img_size // 2 + 1):
        if img_size % p == 0 and (img_size // p) ** 2 <= budget:
            return p
    raise ValueError(
        f"no patch size gives a 2x2..{math.isqrt(budget)}x{math.isqrt(budget)} token grid for img_size "
        f"{img_size}; resize the images to a multiple of 4 (e.g. {4 * max(1, round(img_size / 4))})"
    )


def default_arch(role: str, img_size: int, in_chans: int, num_classes: int) -> tuple[str, dict]:
    """fastkd "tiny" ViT preset -> ``(timm_name, overrides)`` for ``create_model``.

    teacher: ViT, embed 128, depth 6, 4 heads, MLP ratio 4; student: embed 64, depth 4, 2 heads, MLP 4.
    Both: CLS token, ``global_pool='token'``, patch size ``default_patch_size(img_size)``. The teacher
    costs ~5-6× the student's FLOPs at these token counts (see ``PRESETS``; always ≥ 3.5×).
    ``in_chans`` and ``num_classes`` are validated here and passed to ``create_model`` separately.
    """
    if role not in PRESETS:
        raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")
    _check_dims(num_classes=num_classes, img_size=img_size, in_chans=in_chans)
    embed_dim, depth, num_heads, mlp_ratio = PRESETS[role]
    overrides = dict(
        patch_size=default_patch_size(img_size),
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        class_token=True,
        global_pool="token",
    )
    return PRESET_BASE, overrides


def _check_dims(*, num_classes, img_size, in_chans) -> None:
    for key, val in (("num_classes", num_classes), ("img_size", img_size), ("in_chans", in_chans)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{key} must be a positive int, got {val!r}")


def _unknown_name_error(name: str) -> ValueError:
    pool = list(timm.list_models()) + list(_PRESET_NAMES)
    close = difflib.get_close_matches(name, pool, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models() for names."
    return ValueError(
        f"unknown model {name!r}: {hint} (any timm model name, fastkd_teacher, fastkd_student, "
        f"or the path of an existing .safetensors checkpoint)"
    )


def create_model(name: str, *, num_classes: int, img_size: int, in_chans: int, **overrides) -> nn.Module:
    """Build a timm model (random init, ``pretrained=False`` always) for the given data.

    ``name``: any timm model name (``vit_*``, ``deit_*`` incl. ``deit_*_distilled_*`` with 2 prefix tokens,
    ``resnet18``, ``regnety_002``, ``convnext_atto``, ...) or a fastkd preset (``fastkd_teacher`` /
    ``fastkd_student``, see ``default_arch``; explicit overrides win over the preset's).
    ``overrides``: extra constructor kwargs (``patch_size``, ``embed_dim``, ``depth``, ``num_heads``,
    ``mlp_ratio``, ``drop_path_rate``, ...). ``img_size`` goes only to models that take it (ViTs);
    CNNs are built without it. An override the model does not accept is a ValueError.
    The returned module carries ``model.fastkd_arch`` (name, num_classes, img_size, in_chans, overrides:
    JSON), which ``save_model`` stores so ``load_model`` can rebuild the same architecture.
    """
    _check_dims(num_classes=num_classes, img_size=img_size, in_chans=in_chans)
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    overrides = dict(overrides)
    if overrides.pop("pretrained", False):
        raise ValueError(
            "fastkd never downloads pretrained weights: pass the path of a .safetensors checkpoint instead"
        )
    if name in _PRESET_NAMES:
        base, preset = default_arch(_PRESET_NAMES[name], img_size, in_chans, num_classes)
        name, overrides = base, {**preset, **overrides}
    if not timm.is_model(name):
        raise _unknown_name_error(name)

    kwargs = dict(num_classes=num_classes, in_chans=in_chans, img_size=img_size, **overrides)
    while True:  # drop img_size for models that do not take it (CNNs); other unknown kwargs are errors
        try:
            model = timm.create_model(name, pretrained=False, **kwargs)
            break
        except TypeError as e:
            m = re.search(r"unexpected keyword argument '(\w+)'", str(e))
            bad = m.group(1) if m else None
            if bad == "img_size" and "img_size" in kwargs:
                kwargs.pop("img_size")  # CNNs are resolution-free
                continue
            if bad is not None and bad in overrides:
                raise ValueError(
                    f"model {name!r} does not accept the override {bad}={overrides[bad]!r}; remove it"
                ) from None
            raise
        except AssertionError as e:  # timm validates shapes with asserts (e.g. embed_dim % num_heads)
            raise ValueError(f"cannot build {name!r} with {overrides}: {e}") from None

    if _is_vit(model):
        ph, pw = _pair(model.patch_embed.patch_size)
        if img_size % ph or img_size % pw:
            raise ValueError(
                f"img_size {img_size} is not a multiple of {name}'s patch size {ph}; "
                f"pass patch_size={default_patch_size(img_size)} (or resize the images)"
            )
    model.fastkd_arch = dict(
        name=name, num_classes=num_classes, img_size=img_size, in_chans=in_chans, overrides=overrides
    )
    return model


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


# --------------------------------------------------------------------------------------------------
# structure
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """What the losses need to know about a model.

    kind: 'vit' (timm VisionTransformer-like: patch_embed + blocks + forward_intermediates) or 'cnn'.
    depth: number of transformer blocks (ViT) or of feature stages (CNN, stem excluded).
    embed_dim: token width D (ViT) or final feature channels ``num_features`` (CNN).
    num_prefix: prefix tokens P (1 = CLS; 2 for DeiT-distilled; + register tokens); 0 for CNNs.
    grid: (h, w) patch grid of the ViT at its built img_size; None for CNNs (their map size depends on
      the input; ``forward_taps`` reports it).
    """

    name: str
    kind: str
    depth: int
    embed_dim: int
    num_prefix: int
    grid: tuple[int, int] | None
    num_classes: int
    has_dist_head: bool
    has_cls_token: bool

    @property
    def num_features(self) -> int:
        return self.embed_dim


def _model_name(model: nn.Module) -> str:
    arch = getattr(model, "fastkd_arch", None)
    if isinstance(arch, dict) and "name" in arch:
        return str(arch["name"])
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        return str(cfg["architecture"])
    return type(model).__name__


def _is_vit(model: nn.Module) -> bool:
    return (
        hasattr(model, "patch_embed")
        and isinstance(getattr(model, "blocks", None), (nn.Sequential, nn.ModuleList))
        and hasattr(model, "forward_intermediates")
        and hasattr(model, "num_prefix_tokens")
    )


def _has_dist_head(model: nn.Module) -> bool:
    return isinstance(getattr(model, "head_dist", None), nn.Module)


def _has_cls_token(model: nn.Module) -> bool:
    flag = getattr(model, "has_class_token", None)
    if flag is not None:
        return bool(flag)
    return getattr(model, "cls_token", None) is not None


_STEM_NAMES = {"stem", "conv1", "bn1", "act1", "maxpool"}


def model_info(model: nn.Module) -> ModelInfo:
    """Describe ``model`` (see ``ModelInfo``). Raises ValueError for a module that is neither a timm ViT nor
    a model with ``forward_features`` / ``forward_head``."""
    name = _model_name(model)
    if _is_vit(model):
        return ModelInfo(
            name=name,
            kind="vit",
            depth=len(model.blocks),
            embed_dim=int(model.embed_dim),
            num_prefix=int(model.num_prefix_tokens),
            grid=_pair(model.patch_embed.grid_size),
            num_classes=int(model.num_classes),
            has_dist_head=_has_dist_head(model),
            has_cls_token=_has_cls_token(model),
        )
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise ValueError(
            f"{name} is not a timm model (no forward_features/forward_head); build it with create_model"
        )
    stages = [
        f for f in getattr(model, "feature_info", []) or []
        if isinstance(f, dict) and str(f.get("module", "")).split(".")[0] not in _STEM_NAMES
    ]
    return ModelInfo(
        name=name,
        kind="cnn",
        depth=len(stages),
        embed_dim=int(getattr(model, "num_features", 0)),
        num_prefix=0,
        grid=None,
        num_classes=int(getattr(model, "num_classes", 0)),
        has_dist_head=False,
        has_cls_token=False,
    )


def require_vit(model: nn.Module, what: str = "this method") -> ModelInfo:
    """ModelInfo of a ViT, or ValueError: ``what`` (e.g. "vitkd student") needs a ViT."""
    info = model_info(model)
    if info.kind != "vit":
        raise ValueError(
            f"{what} needs a ViT with patch tokens, but {info.name} is a {info.kind}; "
            f"use a timm ViT/DeiT (e.g. fastkd_student, deit_tiny_patch16_224)"
        )
    return info


def require_cls_token(model: nn.Module, what: str = "clskd") -> ModelInfo:
    """ModelInfo of a ViT with a CLS token at position 0, or ValueError."""
    info = require_vit(model, what)
    if not info.has_cls_token or info.num_prefix == 0:
        raise ValueError(
            f"{what} needs a CLS token, but {info.name} was built with class_token=False; "
            f"rebuild it with class_token=True, global_pool='token'"
        )
    return info


def require_dist_head(model: nn.Module, what: str = "deit") -> ModelInfo:
    """ModelInfo of a DeiT-distilled ViT (dist token + ``head_dist``), or ValueError."""
    info = require_vit(model, what)
    if not info.has_dist_head:
        raise ValueError(
            f"{what} needs a distillation token and head, but {info.name} has none; "
            f"use a deit_*_distilled_* student (e.g. deit_tiny_distilled_patch16_224)"
        )
    return info


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


def require_dense_head(model: nn.Module, what: str = "cskd") -> ModelInfo:
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


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Every submodule in eval mode inside the block; the original per-module modes are restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


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


# --------------------------------------------------------------------------------------------------
# freeze, flops
# --------------------------------------------------------------------------------------------------


def freeze(model: nn.Module) -> nn.Module:
    """Teacher mode: ``eval()`` and ``requires_grad_(False)``; returns the same module. (A later
    ``.train()`` on a parent module flips it back to train mode; keep teachers outside trained modules.)"""
    model.eval()
    model.requires_grad_(False)
    return model


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Attention FLOPs: 2·B·H·Sq·Sk·Dq (scores) + 2·B·H·Sq·Sk·Dv (weighted sum)."""
    b, h, sq, dq = query_shape
    sk, dv = key_shape[-2], value_shape[-1]
    return 2 * b * h * sq * sk * dq + 2 * b * h * sq * sk * dv


def count_flops(model: nn.Module, img_size: int, in_chans: int) -> int:
    """FLOPs (2 per multiply-add) of one forward of one ``img_size``×``img_size`` image, counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convs, attention; elementwise ops are free).

    Runs in eval mode under no_grad (modes restored). CPU fused attention is counted too (torch's
    counter does not know ``_scaled_dot_product_flash_attention_for_cpu``; we add its formula).
    For a ViT with N tokens (incl. prefix), width D, MLP ratio 4, depth L, N_p patch tokens of p×p×C_in
    pixels and C classes it equals exactly
    L·(24·N·D² + 4·N²·D) + 2·N_p·D·(p²·C_in) + 2·D·C   (qkv 6ND², proj 2ND², MLP 16ND², attention 4N²D).
    """
    from torch.utils.flop_counter import FlopCounterMode

    p = next(model.parameters())
    x = torch.zeros(1, in_chans, img_size, img_size, device=p.device, dtype=p.dtype)
    mapping = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        mapping[cpu_sdpa] = _sdpa_flops
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with _eval_mode(model), torch.no_grad(), counter:
        model(x)
    return int(counter.get_total_flops())


# --------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------

_ARCH_FIELDS = ("name", "num_classes", "img_size", "in_chans", "overrides")


def save_model(model: nn.Module, path: str | os.PathLike, meta: dict | None = None) -> None:
    """Write ``model``'s weights to ``path`` (.safetensors), atomically (temp file + os.replace).

    The safetensors metadata key ``"fastkd"`` holds a JSON object: the architecture
    (``model.fastkd_arch`` from ``create_model``: name, num_classes, img_size, in_chans, overrides)
    merged with ``meta`` (any JSON-serialisable extras, e.g. top1, epochs). ``meta`` may repeat an
    architecture key only with the same value; a model not built by ``create_model`` must get all of
    name/num_classes/img_size/in_chans (and optionally overrides) in ``meta``.
    """
    from safetensors.torch import save_model as st_save_model

    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"checkpoint path must end with .safetensors, got {path!r}")
    meta = dict(meta or {})
    arch = dict(getattr(model, "fastkd_arch", None) or {})
    for key in _ARCH_FIELDS:
        if key in meta:
            if key in arch and meta[key] != arch[key]:
                raise ValueError(f"meta[{key!r}]={meta[key]!r} contradicts the model's {key}={arch[key]!r}")
            arch[key] = meta.pop(key)
    arch.setdefault("overrides", {})
    missing = [k for k in _ARCH_FIELDS if k not in arch]
    if missing:
        raise ValueError(
            f"cannot save {type(model).__name__}: architecture unknown (missing {missing}); build it with "
            f"fastkd.models.create_model or pass them in meta"
        )
    record = {**meta, **{k: arch[k] for k in _ARCH_FIELDS}, "format": _FORMAT}
    try:
        text = json.dumps(record, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"checkpoint meta must be JSON-serialisable: {e}") from None
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        st_save_model(model, tmp, metadata={_ARCH_KEY: text, "format": "pt"})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_meta(path: str | os.PathLike) -> dict:
    """The fastkd JSON record of a checkpoint (no tensors loaded); ValueError/FileNotFoundError if absent."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist; check the path")
    try:
        with safe_open(path, framework="pt") as f:
            md = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error type for non-safetensors files
        raise ValueError(f"{path!r} is not a readable .safetensors file ({e}); save it with fastkd") from None
    if _ARCH_KEY not in md:
        raise ValueError(
            f"{path!r} has no fastkd metadata (not written by fastkd.models.save_model), so its architecture "
            f"is unknown; re-save it with save_model(model, path, meta)"
        )
    try:
        record = json.loads(md[_ARCH_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path!r} has corrupt fastkd metadata ({e}); re-save it") from None
    missing = [k for k in _ARCH_FIELDS if k not in record]
    if missing:
        raise ValueError(f"{path!r} fastkd metadata lacks {missing}; re-save it with save_model")
    return record


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model saved at ``path`` with ``create_model`` and load its weights strictly.

    Returns (model on ``map_location``, meta) where meta is the stored JSON record (architecture fields +
    the extras given to ``save_model``; also set as ``model.fastkd_meta``). The model is in train mode, as
    ``create_model`` returns it.
    """
    from safetensors.torch import load_model as st_load_model

    record = read_meta(path)
    model = create_model(
        record["name"],
        num_classes=record["num_classes"],
        img_size=record["img_size"],
        in_chans=record["in_chans"],
        **record["overrides"],
    )
    try:
        st_load_model(model, os.fspath(path), strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:300]
        raise ValueError(
            f"{os.fspath(path)!r} weights do not match its architecture {record['name']}: {first}"
        ) from None
    model.fastkd_meta = record
    return model.to(map_location), record


def _looks_like_path(s: str) -> bool:
    return os.sep in s or "/" in s or s.endswith((".safetensors", ".pth", ".pt", ".bin", ".ckpt"))


def resolve_model(
    name_or_path: str | os.PathLike, *, num_classes: int, img_size: int, in_chans: int, **overrides
) -> nn.Module:
    """A checkpoint path or a model name -> model.

    An existing file is loaded with ``load_model`` (its record is then also at ``model.fastkd_meta``); its
    num_classes / in_chans / img_size must match the data, and any ``overrides`` given must equal the
    checkpoint's (one clear line otherwise). Anything else is a model name for ``create_model``. A
    path-like string that does not exist is a FileNotFoundError, not an unknown-name error.
    """
    s = os.fspath(name_or_path)
    if os.path.isfile(s):
        model, meta = load_model(s)
        data = dict(num_classes=num_classes, in_chans=in_chans, img_size=img_size)
        bad = [f"{k}={meta[k]} (data: {v})" for k, v in data.items() if meta[k] != v]
        if bad:
            raise ValueError(
                f"checkpoint {s!r} does not fit the data: {', '.join(bad)}; train a teacher for this data "
                f"or pick the matching dataset"
            )
        diff = [k for k, v in overrides.items() if k not in meta["overrides"] or meta["overrides"][k] != v]
        if diff:
            saved = {k: meta["overrides"].get(k) for k in diff}
            asked = {k: overrides[k] for k in diff}
            raise ValueError(
                f"checkpoint {s!r} was built with overrides {saved}, not {asked}; "
                f"drop the overrides to use the checkpoint as saved"
            )
        return model
    if _looks_like_path(s):
        if s.endswith((".pth", ".pt", ".bin", ".ckpt")):
            raise ValueError(f"{s!r}: only .safetensors checkpoints written by fastkd are supported")
        raise FileNotFoundError(f"checkpoint {s!r} does not exist; check the path (or give a model name)")
    return create_model(s, num_classes=num_classes, img_size=img_size, in_chans=in_chans, **overrides)
