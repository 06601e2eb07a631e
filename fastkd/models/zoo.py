"""timm students and teachers for fastkd: presets, creation, structure (``ModelInfo``), freeze, FLOPs.

Everything here works on plain timm modules; nothing is monkey-patched and no forward hooks are used.

* ``create_model`` builds any timm model with ``pretrained=False`` (weights never download; a user brings
  weights as a ``.safetensors`` checkpoint written by ``save_model``). ``default_arch`` gives the fastkd
  "tiny" ViT presets that scale to small data; ``create_model`` also accepts them by name
  (``fastkd_teacher`` / ``fastkd_student``).
* ``model_info`` describes a model (kind, depth, width, prefix tokens, grid, heads).

Token layout (timm): ``[B, P+N, D]`` with the P prefix tokens first (CLS; CLS then dist for
DeiT-distilled; then any register tokens) followed by N patch tokens in row-major order of the
``grid = (h, w)`` patch grid.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import re
from dataclasses import dataclass

import timm
import torch
from torch import nn

import fastkd.models.cnn  # noqa: F401  (registers the fastkd_resnet timm model for checkpoints)

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
                f"pass patch_size={default_patch_size(img_size)} (on the command line --student-patch-size "
                f"or --teacher-patch-size), or an --img-size that is a multiple of {ph}"
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


def require_cls_token(model: nn.Module, what: str = "this method") -> ModelInfo:
    """ModelInfo of a ViT with a CLS token at position 0, or ValueError."""
    info = require_vit(model, what)
    if not info.has_cls_token or info.num_prefix == 0:
        raise ValueError(
            f"{what} needs a CLS token, but {info.name} was built with class_token=False; "
            f"rebuild it with class_token=True, global_pool='token'"
        )
    return info


def require_dist_head(model: nn.Module, what: str = "this method") -> ModelInfo:
    """ModelInfo of a DeiT-distilled ViT (dist token + ``head_dist``), or ValueError."""
    info = require_vit(model, what)
    if not info.has_dist_head:
        raise ValueError(
            f"{what} needs a distillation token and head, but {info.name} has none; "
            f"use a deit_*_distilled_* student (e.g. deit_tiny_distilled_patch16_224)"
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
