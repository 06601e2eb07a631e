"""Students and teachers: the timm zoo + fastkd presets (zoo), one-forward taps (taps), checkpoints,
and the small-image CNN teacher (cnn)."""

from fastkd.models.checkpoints import load_model, read_meta, resolve_model, save_model
from fastkd.models.taps import Taps, forward_taps, patch_logits, require_dense_head
from fastkd.models.zoo import (
    PRESETS,
    ModelInfo,
    count_flops,
    create_model,
    default_arch,
    default_patch_size,
    freeze,
    model_info,
    require_cls_token,
    require_dist_head,
    require_vit,
)

__all__ = [
    "PRESETS",
    "ModelInfo",
    "Taps",
    "count_flops",
    "create_model",
    "default_arch",
    "default_patch_size",
    "forward_taps",
    "freeze",
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
