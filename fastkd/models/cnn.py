"""Small-image CNN teachers: a timm ResNet with a configurable stem stride, registered with timm.

CSKD needs a CNN teacher whose last feature map is a spatial grid (the release: RegNetY-16GF, 7×7 at
224 px). Stock timm CNNs (ResNet, RegNet, ConvNeXt) have an output stride of at least 8, so on small
images (8×8 digits, 32×32 CIFAR) their last map is 1×1 and CSKD has nothing spatial to distil.
``fastkd_resnet`` is timm's own ``ResNet`` (BasicBlock, resnet18 layout by default) with one change,
the usual CIFAR-ResNet one: the stem stride is a constructor argument.

- ``stem_stride=4``: the stock stem (7×7 conv stride 2 + 3×3 max-pool stride 2) — exactly timm's ResNet;
- ``stem_stride=2``: the stock 7×7 stride-2 conv, no max-pool;
- ``stem_stride=1``: a 3×3 stride-1 conv, no max-pool.

The total output stride is ``stem_stride · output_stride / 4`` (timm's ``output_stride`` ∈ {8, 16, 32}
dilates the later stages). Example: 8×8 digits with ``stem_stride=1, output_stride=16`` → a 2×2 map.
The head is timm's pool-mean → linear ``fc``, so dense per-location logits average exactly to the
logits. Importing this module registers the name with timm (``timm.create_model('fastkd_resnet', ...)``);
fastkd checkpoints store the name and kwargs, so they reload wherever this module is imported.
"""

from __future__ import annotations

from timm.models import register_model
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

__all__ = ["fastkd_resnet", "small_stem_resnet"]


def small_stem_resnet(*, stem_stride: int = 1, layers=(2, 2, 2, 2), in_chans: int = 3, **kwargs) -> ResNet:
    """timm ``ResNet`` (BasicBlock) with stem stride 1, 2 or 4 (4 = stock). kwargs go to ``ResNet``."""
    if stem_stride not in (1, 2, 4):
        raise ValueError(f"fastkd_resnet: stem_stride must be 1, 2 or 4, got {stem_stride!r}")
    model = ResNet(block=BasicBlock, layers=tuple(layers), in_chans=in_chans, **kwargs)
    if stem_stride < 4:
        if not isinstance(model.conv1, nn.Conv2d):
            raise ValueError("fastkd_resnet: stem_stride < 4 needs the plain stem (stem_type='')")
        width = model.conv1.out_channels
        if stem_stride == 1:
            model.conv1 = nn.Conv2d(in_chans, width, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
        for f in model.feature_info:
            f["reduction"] = max(1, f["reduction"] * stem_stride // 4)
    return model


@register_model
def fastkd_resnet(pretrained: bool = False, **kwargs) -> ResNet:
    """timm entry point: ``small_stem_resnet`` (resnet18 layout unless ``layers``/``channels`` are given)."""
    if pretrained:
        raise ValueError("fastkd_resnet has no pretrained weights; pass a fastkd .safetensors checkpoint")
    for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(k, None)
    return small_stem_resnet(**kwargs)

