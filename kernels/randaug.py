"""RandAugment's layer as two Triton passes over uint8 images: the statistics, then every op at once.

Reference: ``fastkd.data.randaug`` (torch; PIL's arithmetic, bit for bit). A layer gives each image one
op (or none). The torch form computes every op for the whole batch and keeps each image's own
(``torch.where``): float32 and int64 copies of the batch, ≈ 6 GB of traffic a layer at DeiT-S shapes
(B = 256, 3 × 224²), 11.4 ms for two layers measured on the H200 (bench/results/h200-2026-11-27). Here:

1. ``layer_stats``: one read of the batch. Per image and channel the minimum, the maximum and the
   256-level histogram (AutoContrast, Equalize), per image the sum of PIL's grey levels (Contrast's mean).
   Each program reduces a block in registers, then adds to the totals with atomics (exact integers).
2. The caller turns them into each image's 256-entry tables (small torch ops on [B, C, 256]).
3. ``apply_layer``: one read and one write of the batch. Each program takes its image's op kind:
   0 a table lookup (the point ops, the identity for none); 1 the geometric ops (PIL's affine transform,
   bicubic, in float64 as PIL computes it); 2 Color (a blend with PIL's grey level, computed from the
   pixel's three channels); 3 Sharpness (a blend with PIL's SMOOTH 3 × 3 filter, its taps from L1/L2).

Exactness: the same float operations in the same order as the reference, launched with
``enable_fp_fusion=False`` (an FMA rounds once instead of twice and could move a truncation by one level).
SMOOTH's weighted sum is an exact integer S (≤ 13 · 255) here; the reference divides S by 13 and rounds to
the nearest level: S/13 is never within 1/26 of a rounding boundary, so float32 cannot move it.

Layout: x and out uint8 [B, C, H, W] contiguous; kind int32 [B]; factor float32 [B] (Color's and
Sharpness's blend factor); coef float64 [B, 6]; lut uint8 [B, C, 256]; fill float32 [C] (grey levels
outside the image). Grids (cdiv(H·W, BLOCK), B).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastkd.kernels._utils import Cfg, TorchFallback, cdiv, check_device

__all__ = ["KIND_LUT", "KIND_GEOMETRIC", "KIND_COLOR", "KIND_SHARPNESS", "layer_stats", "layer_tables",
           "apply_layer", "compile_specs"]

KIND_LUT, KIND_GEOMETRIC, KIND_COLOR, KIND_SHARPNESS = 0, 1, 2, 3
# the op indices ``_table_kernel`` branches on (``fastkd.data.randaug.OPS``; a test holds them equal)
TABLE_OPS = {"AutoContrast": 0, "Equalize": 1, "Invert": 2, "PosterizeIncreasing": 4, "SolarizeIncreasing": 5,
             "SolarizeAdd": 6, "ContrastIncreasing": 8, "BrightnessIncreasing": 9}
BLOCK = 256  # apply_layer: 4 warps, no spills on sm_80 / sm_90a (BLOCK 1024 spilled the affine resample)
STATS_BLOCK = 1024
NUM_WARPS = 4
COMPILE_OPTIONS = {"enable_fp_fusion": False}  # what the launch passes: the compile check builds the same


@triton.jit
def _stats_kernel(x_ptr, lo_ptr, hi_ptr, hist_ptr, gsum_ptr, H, W, C: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(1)
    hw = H * W
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < hw
    img = x_ptr + b.to(tl.int64) * C * hw
    dead = BLOCK - tl.sum(live.to(tl.int32), axis=0)  # lanes past the image, counted in bin 0 below
    bins = tl.arange(0, 256)
    g = tl.zeros([BLOCK], dtype=tl.int32)
    for c in tl.static_range(C):
        v = tl.load(img + c * hw + offs, mask=live, other=0).to(tl.int32)
        h = tl.histogram(v, 256) - tl.where(bins == 0, dead, 0)
        tl.atomic_add(hist_ptr + (b * C + c) * 256 + bins, h, mask=h > 0)
        tl.atomic_min(lo_ptr + b * C + c, tl.min(tl.where(live, v, 255), axis=0))
        tl.atomic_max(hi_ptr + b * C + c, tl.max(v, axis=0))
        if C == 3:  # PIL's RGB → L (ITU-R 601-2, fixed point)
            g += v * (19595 if c == 0 else (38470 if c == 1 else 7471))
        else:
            g += v
    if C == 3:
        g = (g + 0x8000) >> 16
    tl.atomic_add(gsum_ptr + b, tl.sum(tl.where(live, g, 0).to(tl.int64), axis=0))


@triton.jit
def _table_kernel(op_ptr, mag_ptr, factor_ptr, lo_ptr, hi_ptr, hist_ptr, gsum_ptr, lut_ptr, HW,
                  C: tl.constexpr):
    """One (image, channel)'s 256-entry table of its layer's point op (the identity for any other op), as
    ``fastkd.data.randaug._luts`` computes it; grid (B · C,)."""
    row = tl.program_id(0)
    b = row // C
    ix = tl.arange(0, 256)
    op = tl.load(op_ptr + b)
    lv = tl.load(mag_ptr + b) / 10.0  # float64: timm's level
    out = lut_ptr + row * 256
    if op == 0:  # AutoContrast: [lo, hi] stretched to [0, 255], truncated (floor: negatives clip to 0)
        lo = tl.load(lo_ptr + row).to(tl.float64)
        hi = tl.load(hi_ptr + row).to(tl.float64)
        scale = 255.0 / tl.maximum(hi - lo, 1.0)
        ac = tl.minimum(tl.maximum(tl.floor(ix.to(tl.float64) * scale - lo * scale), 0.0), 255.0)
        tl.store(out + ix, tl.where(hi > lo, ac.to(tl.int32), ix).to(tl.uint8))
    elif op == 1:  # Equalize: step = (pixels − count of the top level) // 255, (step // 2 + below) // step
        hist = tl.load(hist_ptr + row * 256 + ix).to(tl.int64)
        top = tl.max(tl.where(hist > 0, ix, -1), axis=0)
        step = (HW - tl.sum(tl.where(ix == top, hist, 0), axis=0)) // 255
        below = tl.cumsum(hist, axis=0) - hist
        eq = tl.minimum((step // 2 + below) // tl.maximum(step, 1), 255)
        tl.store(out + ix, tl.where(step > 0, eq, ix.to(tl.int64)).to(tl.uint8))
    elif op == 2:  # Invert
        tl.store(out + ix, (255 - ix).to(tl.uint8))
    elif op == 4:  # PosterizeIncreasing: keep 4 − int(4·level) bits
        bits = 4 - tl.floor(lv * 4.0).to(tl.int32)
        mask = 255 - ((1 << (8 - bits)) - 1)
        tl.store(out + ix, (ix & mask).to(tl.uint8))
    elif op == 5:  # SolarizeIncreasing: invert from 256 − min(256, int(256·level)) up
        thresh = 256 - tl.minimum(tl.floor(lv * 256.0), 256.0).to(tl.int32)
        tl.store(out + ix, tl.where(ix < thresh, ix, 255 - ix).to(tl.uint8))
    elif op == 6:  # SolarizeAdd: + min(128, int(110·level)) below 128
        add = tl.minimum(tl.floor(lv * 110.0), 128.0).to(tl.int32)
        tl.store(out + ix, tl.where(ix < 128, tl.minimum(ix + add, 255), ix).to(tl.uint8))
    elif op == 8:  # ContrastIncreasing: a blend with the image's mean grey level
        mean = tl.floor(tl.load(gsum_ptr + b).to(tl.float64) / HW + 0.5).to(tl.float32)
        tl.store(out + ix, _blend(mean, ix.to(tl.float32), tl.load(factor_ptr + b)).to(tl.uint8))
    elif op == 9:  # BrightnessIncreasing: a blend with black
        tl.store(out + ix, _blend(0.0, ix.to(tl.float32), tl.load(factor_ptr + b)).to(tl.uint8))
    else:  # another op, or none: the identity
        tl.store(out + ix, ix.to(tl.uint8))


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
def _blend(deg, v, f):
    """PIL's ``Image.blend(deg, img, f)`` on levels: float32 ``deg + f·(img − deg)``, clipped, truncated."""
    return tl.floor(tl.minimum(tl.maximum(deg + f * (v - deg), 0.0), 255.0))


@triton.jit
def _layer_kernel(x_ptr, out_ptr, kind_ptr, factor_ptr, coef_ptr, lut_ptr, fill_ptr, H, W,
                  C: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(1)
    hw = H * W
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < hw
    img = x_ptr + b.to(tl.int64) * C * hw
    dst = out_ptr + b.to(tl.int64) * C * hw
    kind = tl.load(kind_ptr + b)
    if kind == 1:  # Rotate / Shear / Translate: PIL's affine transform, bicubic, in float64
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
    elif kind == 2:  # Color (RGB): a blend with the pixel's grey level
        # (each branch names its own values: a name bound in two branches must keep one type there)
        cf_ = tl.load(factor_ptr + b)
        red = tl.load(img + offs, mask=live, other=0).to(tl.int32)
        if C == 3:
            green = tl.load(img + hw + offs, mask=live, other=0).to(tl.int32)
            blue = tl.load(img + 2 * hw + offs, mask=live, other=0).to(tl.int32)
            grey = ((red * 19595 + green * 38470 + blue * 7471 + 0x8000) >> 16).to(tl.float32)
        else:  # a grey image is its own degenerate (the caller sends it the identity table instead)
            grey = red.to(tl.float32)
        for c in tl.static_range(C):
            lvl = tl.load(img + c * hw + offs, mask=live, other=0).to(tl.float32)
            tl.store(dst + c * hw + offs, _blend(grey, lvl, cf_).to(tl.uint8), mask=live)
    elif kind == 3:  # Sharpness: a blend with SMOOTH (weights 1, centre 5, over 13; the border copied)
        sf_ = tl.load(factor_ptr + b)
        row = offs // W
        col = offs - row * W
        interior = (col > 0) & (col < W - 1) & (row > 0) & (row < H - 1) & live
        for c in tl.static_range(C):
            ch = img + c * hw
            mid = tl.load(ch + offs, mask=live, other=0).to(tl.int32)
            acc = 4 * mid
            for dv in tl.static_range(3):
                for du in tl.static_range(3):
                    acc += tl.load(ch + offs + (dv - 1) * W + (du - 1), mask=interior, other=0).to(tl.int32)
            smooth = tl.where(interior, tl.floor(acc.to(tl.float32) / 13.0 + 0.5), mid.to(tl.float32))
            sharp = _blend(smooth, mid.to(tl.float32), sf_)
            tl.store(dst + c * hw + offs, sharp.to(tl.uint8), mask=live)
    else:  # the point ops: each image's own table (the identity for none)
        for c in tl.static_range(C):
            level = tl.load(img + c * hw + offs, mask=live, other=0).to(tl.int32)
            looked = tl.load(lut_ptr + (b * C + c) * 256 + level, mask=live, other=0)
            tl.store(dst + c * hw + offs, looked, mask=live)


_GUARD = TorchFallback("RandAugment's Triton kernels")


def _usable(x: torch.Tensor) -> bool:
    return _GUARD.usable(x)


def _launch(kernel, grid, args, **const) -> bool:
    return _GUARD.launch(kernel, grid, args, COMPILE_OPTIONS, num_warps=NUM_WARPS, **const)


def layer_stats(x: torch.Tensor):
    """uint8 [B, C, H, W] → (lo, hi: int32 [B, C] per-channel min and max; hist: int32 [B, C, 256];
    grey_sum: int64 [B], the sum of PIL's grey levels), or None when the kernels cannot run here."""
    if not _usable(x):
        return None
    b, c, h, w = x.shape
    dev = x.device
    lo = torch.full((b, c), 255, device=dev, dtype=torch.int32)
    hi = torch.zeros((b, c), device=dev, dtype=torch.int32)
    hist = torch.zeros((b, c, 256), device=dev, dtype=torch.int32)
    gsum = torch.zeros((b,), device=dev, dtype=torch.int64)
    ok = _launch(_stats_kernel, (cdiv(h * w, STATS_BLOCK), b), (x.contiguous(), lo, hi, hist, gsum, h, w),
                 C=c, BLOCK=STATS_BLOCK)
    return (lo, hi, hist, gsum) if ok else None


def layer_tables(op: torch.Tensor, mag: torch.Tensor, factor: torch.Tensor, lo, hi, hist, gsum, hw: int):
    """Each (image, channel)'s table for its layer's op: uint8 [B, C, 256] (the identity for an op that is
    not a point op), from ``layer_stats``' output; op int [B] (the index in ``randaug.OPS``, −1 for none),
    mag float64 [B], factor float32 [B] (Brightness's and Contrast's). None when the kernels cannot run."""
    if not _usable(lo):
        return None
    b, c = lo.shape
    lut = torch.empty((b, c, 256), device=lo.device, dtype=torch.uint8)
    args = (op.to(torch.int32).contiguous(), mag.to(torch.float64).contiguous(),
            factor.to(torch.float32).contiguous(), lo, hi, hist, gsum, lut, hw)
    return lut if _launch(_table_kernel, (b * c,), args, C=c) else None


def apply_layer(x: torch.Tensor, kind: torch.Tensor, factor: torch.Tensor, coef: torch.Tensor,
                lut: torch.Tensor, fill: torch.Tensor):
    """One RandAugment layer: each image's op by its ``kind`` (``KIND_*``); uint8 [B, C, H, W] out, or None
    when the kernels cannot run here (the caller's torch form then runs)."""
    if not _usable(x):
        return None
    b, c, h, w = x.shape
    check_device("apply_layer", x, kind=kind, factor=factor, coef=coef, lut=lut, fill=fill)
    out = torch.empty_like(x)
    args = (x.contiguous(), out, kind.to(torch.int32).contiguous(), factor.to(torch.float32).contiguous(),
            coef.to(torch.float64).contiguous(), lut.to(torch.uint8).contiguous(),
            fill.to(torch.float32).contiguous(), h, w)
    return out if _launch(_layer_kernel, (cdiv(h * w, BLOCK), b), args, C=c, BLOCK=BLOCK) else None


def compile_specs():
    """The shipped variants (RGB and grayscale) for ``tests/kernels/compile_check.py``."""
    layer = {"x_ptr": "u8", "out_ptr": "u8", "kind_ptr": "i32", "factor_ptr": "fp32", "coef_ptr": "fp64",
             "lut_ptr": "u8", "fill_ptr": "fp32"}
    stats = {"x_ptr": "u8", "lo_ptr": "i32", "hi_ptr": "i32", "hist_ptr": "i32", "gsum_ptr": "i64"}
    table = {"op_ptr": "i32", "mag_ptr": "fp64", "factor_ptr": "fp32", "lo_ptr": "i32", "hi_ptr": "i32",
             "hist_ptr": "i32", "gsum_ptr": "i64", "lut_ptr": "u8"}
    return [
        *[(f"table/C{c}", _table_kernel, table, dict(HW=224 * 224), dict(C=c), Cfg(256, 0, 0, NUM_WARPS, 1))
          for c in (1, 3)],
        *[(f"layer/C{c}", _layer_kernel, layer, dict(H=224, W=224), dict(C=c, BLOCK=BLOCK),
           Cfg(BLOCK, 0, 0, NUM_WARPS, 1)) for c in (1, 3)],
        *[(f"stats/C{c}", _stats_kernel, stats, dict(H=224, W=224), dict(C=c, BLOCK=STATS_BLOCK),
           Cfg(STATS_BLOCK, 0, 0, NUM_WARPS, 1)) for c in (1, 3)],
    ]
