"""RandAugment's geometric ops as one Triton pass: a per-image affine resample of uint8 images.

Reference: ``fastkd.data.randaug._affine`` (torch; PIL's ``Image.transform(AFFINE, BICUBIC, fillcolor)``
arithmetic, bit for bit). The torch form materialises tens of GB of float64 tensors a layer at DeiT-S
shapes (B = 256, 3 × 224², 16 taps); this kernel reads the uint8 image (its 4 × 4 taps from L1/L2) and
writes the result once: ≈ 77 MB a layer (bench/NOTES.md, "The DeiT recipe on the device").

Exactness: the same float64 operations in the same order as the reference (and as PIL's bicubic
filter): the source point ``(a·u + b·v + c, d·u + e·v + f)`` of each output pixel centre, ``floor``, four
cubic interpolations along x (one per row of the 4 × 4 taps, indices clamped), one along y, clip,
truncation. Launched with ``enable_fp_fusion=False``: a multiply-add contracted into an FMA rounds once
instead of twice and could move a truncation by one grey level.

Layout: x and out uint8 [B, C, H, W] contiguous; coef float64 [B, 6]; sel int32 [B] (0: the image drew
another op: copied through); fill float32 [C] (grey levels outside the image). Grid (cdiv(H·W, BLOCK), B).
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from fastkd.kernels._utils import INTERPRET, Cfg, cdiv, check_device, first_line

__all__ = ["affine_resample", "compile_specs"]

BLOCK = 256
NUM_WARPS = 4
COMPILE_OPTIONS = {"enable_fp_fusion": False}  # what the launch passes: the compile check builds the same


@triton.jit
def _cubic(v1, v2, v3, v4, d):
    """PIL's BICUBIC macro (the a = −1 cubic convolution), its float64 operations in order."""
    p2 = -v1 + v3
    p3 = 2.0 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return v2 + d * (p2 + d * (p3 + d * p4))


@triton.jit
def _row(ch, yy, xm, x0, x1, x2, W, live, dx):
    """One input row's 4 taps (columns clamped), interpolated along x."""
    base = ch + yy * W
    v1 = tl.load(base + xm, mask=live, other=0).to(tl.float64)
    v2 = tl.load(base + x0, mask=live, other=0).to(tl.float64)
    v3 = tl.load(base + x1, mask=live, other=0).to(tl.float64)
    v4 = tl.load(base + x2, mask=live, other=0).to(tl.float64)
    return _cubic(v1, v2, v3, v4, dx)


@triton.jit
def _affine_kernel(x_ptr, out_ptr, coef_ptr, sel_ptr, fill_ptr, H, W, C: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(1)
    hw = H * W
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < hw
    img = x_ptr + b.to(tl.int64) * C * hw
    dst = out_ptr + b.to(tl.int64) * C * hw
    if tl.load(sel_ptr + b) != 0:
        v = offs // W
        u = offs - v * W
        uf = u.to(tl.float64) + 0.5
        vf = v.to(tl.float64) + 0.5
        cf = coef_ptr + b * 6
        sx = tl.load(cf) * uf + tl.load(cf + 1) * vf + tl.load(cf + 2)
        sy = tl.load(cf + 3) * uf + tl.load(cf + 4) * vf + tl.load(cf + 5)
        inside = (sx >= 0.0) & (sx < W) & (sy >= 0.0) & (sy < H)
        px = sx - 0.5
        py = sy - 0.5
        x0f = tl.floor(px)
        y0f = tl.floor(py)
        dx = px - x0f
        dy = py - y0f
        # clamp in float first (a point far outside would overflow int32), then the taps' indices
        x0 = tl.minimum(tl.maximum(x0f, -2.0), W * 1.0).to(tl.int32)
        y0 = tl.minimum(tl.maximum(y0f, -2.0), H * 1.0).to(tl.int32)
        xm = tl.minimum(tl.maximum(x0 - 1, 0), W - 1)
        xa = tl.minimum(tl.maximum(x0, 0), W - 1)
        xb = tl.minimum(tl.maximum(x0 + 1, 0), W - 1)
        xc = tl.minimum(tl.maximum(x0 + 2, 0), W - 1)
        ym = tl.minimum(tl.maximum(y0 - 1, 0), H - 1)
        ya = tl.minimum(tl.maximum(y0, 0), H - 1)
        yb = tl.minimum(tl.maximum(y0 + 1, 0), H - 1)
        yc = tl.minimum(tl.maximum(y0 + 2, 0), H - 1)
        for c in tl.static_range(C):
            ch = img + c * hw
            r1 = _row(ch, ym, xm, xa, xb, xc, W, live, dx)
            r2 = _row(ch, ya, xm, xa, xb, xc, W, live, dx)
            r3 = _row(ch, yb, xm, xa, xb, xc, W, live, dx)
            r4 = _row(ch, yc, xm, xa, xb, xc, W, live, dx)
            val = tl.floor(tl.minimum(tl.maximum(_cubic(r1, r2, r3, r4, dy), 0.0), 255.0))
            fill = tl.load(fill_ptr + c).to(tl.float64)
            res = tl.where(inside, val, fill)
            tl.store(dst + c * hw + offs, res.to(tl.uint8), mask=live)
    else:
        for c in tl.static_range(C):
            tl.store(dst + c * hw + offs, tl.load(img + c * hw + offs, mask=live), mask=live)


_BROKEN: list[str] = []  # a launch error on this GPU: the torch form from then on (one stderr line)


def affine_resample(x: torch.Tensor, coef: torch.Tensor, sel: torch.Tensor, fill: torch.Tensor):
    """uint8 [B, C, H, W] → the images with ``sel`` resampled by their ``coef`` (PIL's affine, bicubic,
    ``fill`` outside), the others copied; None when the kernel cannot run here (the caller's torch form
    then runs: off CUDA without the interpreter, or after a launch error, reported once)."""
    if _BROKEN or not (x.is_cuda or INTERPRET):
        return None
    b, c, h, w = x.shape
    check_device("affine_resample", x, coef=coef, sel=sel, fill=fill)
    out = torch.empty_like(x)
    args = (x.contiguous(), out, coef.to(torch.float64).contiguous(), sel.to(torch.int32).contiguous(),
            fill.to(torch.float32).contiguous(), h, w)
    try:
        _affine_kernel[(cdiv(h * w, BLOCK), b)](*args, C=c, BLOCK=BLOCK, num_warps=NUM_WARPS,
                                                **({} if INTERPRET else COMPILE_OPTIONS))
    except Exception as e:  # a build or launch failure on the user's GPU: keep training on the torch form
        if INTERPRET:
            raise
        _BROKEN.append(first_line(e))
        print(f"fastkd: RandAugment's affine kernel failed ({_BROKEN[0]}); using the torch form",
              file=sys.stderr)
        return None
    return out


def compile_specs():
    """The shipped variants (RGB and grayscale) for ``tests/kernels/compile_check.py``."""
    ptrs = {"x_ptr": "u8", "out_ptr": "u8", "coef_ptr": "fp64", "sel_ptr": "i32", "fill_ptr": "fp32"}
    cfg = Cfg(BLOCK, 0, 0, NUM_WARPS, 1)
    return [(f"C{c}", _affine_kernel, ptrs, dict(H=224, W=224), dict(C=c, BLOCK=BLOCK), cfg)
            for c in (1, 3)]
