"""RandomResizedCrop's resize as one Triton pass over uint8 images.

Reference: ``fastkd.data.augment.resized_crop`` (torch; torchvision's ``resized_crop`` of a tensor: the
box, then bilinear ``interpolate(align_corners=False)``, rounded). The torch form is two passes (rows, then
columns) through float32 copies of the batch and index gathers: ≈ 2.2 GB of traffic at DeiT-S shapes
(B = 256, 3 × 224²), 1.97 ms measured on the H200 (bench/results/h200-2026-11-27). Here each output pixel
reads its 2 × 2 taps (from L1/L2) and is written once: ≈ 77 MB.

Exactness: the same operations in the same order as the reference. The source coordinate of output index
o in a window of ``size`` is ``max((o + 0.5) · (size / n) − 0.5, 0)`` in float64, its fraction cast to
float32; the row pass ``a + (c − a)·fy`` in float32 at the two columns the column pass reads, then
``r0 + (r1 − r0)·fx``; rounded half to even (``torch.round``), clipped. Launched with
``enable_fp_fusion=False``: an FMA would round once instead of twice.

Layout: x and out uint8 [B, C, H, W] contiguous; box int32 [4, B] (top, left, height, width).
Grid (cdiv(H·W, BLOCK), B).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastkd.kernels._utils import Cfg, TorchFallback, cdiv

__all__ = ["resized_crop", "compile_specs"]

BLOCK = 512
NUM_WARPS = 4
COMPILE_OPTIONS = {"enable_fp_fusion": False}  # what the launch passes: the compile check builds the same


@triton.jit
def _source(o, size, n):
    """Output index o (int32) of an axis of n → (first tap, second tap, float32 fraction) in a window of
    ``size``, as ``F.interpolate(align_corners=False)`` computes them (float64)."""
    src = tl.maximum((o.to(tl.float64) + 0.5) * (size.to(tl.float64) / n) - 0.5, 0.0)
    i0 = tl.minimum(tl.floor(src).to(tl.int32), size - 1)
    i1 = tl.minimum(i0 + 1, size - 1)
    return i0, i1, (src - i0.to(tl.float64)).to(tl.float32)


@triton.jit
def _crop_kernel(x_ptr, out_ptr, box_ptr, B, H, W, C: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(1)
    hw = H * W
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < hw
    top = tl.load(box_ptr + b)
    left = tl.load(box_ptr + B + b)
    height = tl.load(box_ptr + 2 * B + b)
    width = tl.load(box_ptr + 3 * B + b)
    oy = offs // W
    ox = offs - oy * W
    y0, y1, fy = _source(oy, height, H)
    x0, x1, fx = _source(ox, width, W)
    r0 = (top + y0) * W
    r1 = (top + y1) * W
    c0 = left + x0
    c1 = left + x1
    img = x_ptr + b.to(tl.int64) * C * hw
    dst = out_ptr + b.to(tl.int64) * C * hw
    for c in tl.static_range(C):
        ch = img + c * hw
        a0 = tl.load(ch + r0 + c0, mask=live, other=0).to(tl.float32)
        b0 = tl.load(ch + r1 + c0, mask=live, other=0).to(tl.float32)
        a1 = tl.load(ch + r0 + c1, mask=live, other=0).to(tl.float32)
        b1 = tl.load(ch + r1 + c1, mask=live, other=0).to(tl.float32)
        left_col = a0 + (b0 - a0) * fy  # the row pass, at the two columns the column pass reads
        right_col = a1 + (b1 - a1) * fy
        v = left_col + (right_col - left_col) * fx
        r = tl.floor(v + 0.5)  # round half to even (torch.round): a tie rounded up to an odd level goes down
        r = tl.where(((r - v) == 0.5) & ((r.to(tl.int32) & 1) == 1), r - 1.0, r)
        tl.store(dst + c * hw + offs, tl.minimum(tl.maximum(r, 0.0), 255.0).to(tl.uint8), mask=live)


_GUARD = TorchFallback("the resized-crop kernel")


def resized_crop(x: torch.Tensor, top, left, height, width):
    """uint8 [B, C, H, W] → each image's box resized to H × W (see the module docstring), or None when the
    kernel cannot run here (the caller's torch form then runs)."""
    if not _GUARD.usable(x):
        return None
    b, c, h, w = x.shape
    box = torch.stack([t.to(device=x.device, dtype=torch.int32) for t in (top, left, height, width)])
    out = torch.empty_like(x)
    args = (x.contiguous(), out, box.contiguous(), b, h, w)
    ok = _GUARD.launch(_crop_kernel, (cdiv(h * w, BLOCK), b), args, COMPILE_OPTIONS, C=c, BLOCK=BLOCK,
                       num_warps=NUM_WARPS)
    return out if ok else None


def compile_specs():
    """The shipped variants (RGB and grayscale) for ``tests/kernels/compile_check.py``."""
    ptrs = {"x_ptr": "u8", "out_ptr": "u8", "box_ptr": "i32"}
    return [(f"C{c}", _crop_kernel, ptrs, dict(B=256, H=224, W=224), dict(C=c, BLOCK=BLOCK),
             Cfg(BLOCK, 0, 0, NUM_WARPS, 1)) for c in (1, 3)]
