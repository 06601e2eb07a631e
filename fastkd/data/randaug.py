"""RandAugment as timm builds it for DeiT (``rand-m9-mstd0.5-inc1``), batched on the device.

Each image gets ``n`` layers; a layer picks one of timm's 15 increasing ops uniformly, applies it with
probability 0.5 at magnitude ``clip(N(m, mstd), 0, 10)`` (a random sign where the op has one), exactly as
``timm.data.auto_augment.AugmentOp``. The random choices are drawn by ``fastkd.data.augparams`` from the
per-sample hash streams (a pure function of (seed, view, id)); this module applies them to uint8 images:

* the histogram and point ops (AutoContrast, Equalize, Invert, Posterize, Solarize, SolarizeAdd,
  Brightness, Contrast) become one per-image, per-channel 256-entry table, applied by one gather;
* Color and Sharpness blend with a degenerate image (grayscale; the 3 × 3 SMOOTH filter) as PIL's
  ``ImageEnhance`` does (``Image.blend``: ``deg + f·(img − deg)`` in float32, clipped, truncated);
* Rotate, ShearX/Y and TranslateX/YRel are one affine resample per layer (PIL's ``Image.transform``
  geometry: output pixel centres mapped to input coordinates, bicubic as DeiT trains them (timm's
  ``--train-interpolation bicubic``), the fill colour outside).

On CUDA a layer is two Triton passes (``fastkd.kernels.randaug``: the statistics, then every image's op,
uint8 in and out, the same arithmetic); elsewhere (and as the fallback) the torch form below computes each
op for the whole batch and keeps each image's own.

PIL is the reference (timm runs these ops in PIL): the tests compare every op with it, bit for bit, on RGB
and grayscale images. The geometric ops interpolate bicubic, DeiT's choice (timm's own default picks
bilinear or bicubic at random per call). Posterize at magnitude 10 keeps 0 bits (a black image, as older
Pillows did; Pillow ≥ 11 refuses 0 bits, so timm itself raises there).
"""

from __future__ import annotations

import math
import re

import torch

from fastkd.data.hashing import _div, _on

__all__ = ["OPS", "parse_spec", "rand_augment"]

# timm's _RAND_INCREASING_TRANSFORMS, in its order (the op index a layer draws)
OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
    "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
_I = {name: i for i, name in enumerate(OPS)}
_LUT_OPS = ("AutoContrast", "Equalize", "Invert", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
            "BrightnessIncreasing", "ContrastIncreasing")
_GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def parse_spec(spec: str) -> tuple[int, float, float]:
    """timm's RandAugment string → (layers n, magnitude m, magnitude std); one-line ValueError otherwise.

    ``rand-m9-mstd0.5-inc1`` (DeiT): m 9, n 2 (timm's default), mstd 0.5. Only the increasing ops
    (``inc1``) are implemented; ``mstd`` above 100 means uniform in [0, m], as in timm."""
    parts = str(spec).split("-")
    fix = "use timm's form, e.g. rand-m9-mstd0.5-inc1 (DeiT) or rand-m7-n3-mstd0.5-inc1"
    if parts[0] != "rand":
        raise ValueError(f"--rand-augment {spec}: {fix}")
    n, m, mstd, inc = 2, None, 0.0, False
    for p in parts[1:]:
        k = re.match(r"[a-z]+", p)
        key, val = (k.group(0), p[k.end():]) if k else ("", p)
        try:
            if key == "m":
                m = float(val)
            elif key == "n":
                n = int(val)
            elif key == "mstd":
                mstd = float(val)
            elif key == "inc":
                inc = bool(int(val))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"--rand-augment {spec}: unknown or malformed part {p!r}; {fix}") from None
    if m is None or not 0 <= m <= 10 or n < 1 or mstd < 0 or not inc:
        raise ValueError(f"--rand-augment {spec}: needs m in [0, 10], n ≥ 1, mstd ≥ 0 and inc1 "
                         f"(only the increasing ops are implemented); {fix}")
    return n, m, mstd


def _blend(deg: torch.Tensor, img: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """PIL's ``Image.blend(deg, img, f)`` on uint8 values: float32 ``deg + f·(img − deg)``, clipped to
    [0, 255], truncated. ``f``: float32 broadcastable to the images."""
    return (deg + f * (img - deg)).clamp_(0.0, 255.0).floor_()


def _gray(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB → L conversion (ITU-R 601-2 luma, fixed point), int64 [B, 1, H, W]; L images as they are."""
    xi = x.to(torch.int64)
    if x.shape[1] == 1:
        return xi
    return (xi[:, 0:1] * 19595 + xi[:, 1:2] * 38470 + xi[:, 2:3] * 7471 + 0x8000) >> 16


def _stats(x: torch.Tensor, xi: torch.Tensor, gray: torch.Tensor):
    """The torch form of ``fastkd.kernels.randaug.layer_stats``: per image and channel the minimum, the
    maximum and the 256-level histogram, per image the sum of the grey levels ``gray`` (``_gray(xi)``).
    The histogram is a scatter-add per (image, channel) row: torch.bincount would size its output from the
    input's maximum, read on the host (a sync on CUDA, even with minlength: found on the H200, 2026-11-27)."""
    b, c = x.shape[:2]
    flat = x.reshape(b, c, -1)
    levels = xi.reshape(b, c, -1)
    ones = torch.ones((), device=x.device, dtype=torch.int64).expand(levels.shape)
    hist = torch.zeros(b, c, 256, device=x.device, dtype=torch.int64).scatter_add_(2, levels, ones)
    return flat.amin(-1), flat.amax(-1), hist, gray.reshape(b, -1).sum(1)


def _luts(op: torch.Tensor, mag: torch.Tensor, neg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
          hist: torch.Tensor, grey_sum: torch.Tensor, hw: int) -> torch.Tensor:
    """The point ops' tables: int64 [B, C, 256], the identity for a sample whose layer is another op. From
    the layer's statistics (``_stats`` or the kernel's): per-channel min ``lo`` and max ``hi`` [B, C], the
    histogram [B, C, 256], the sum of the ``hw`` grey levels of each image [B]."""
    b, c = lo.shape
    dev = lo.device
    ix = torch.arange(256, device=dev, dtype=torch.int64).expand(b, c, 256)
    lut = ix
    lv = _div(mag, 10.0)  # [B] float64: timm's level / _LEVEL_DENOM

    def put(name, table):
        nonlocal lut
        lut = torch.where((op == _I[name])[:, None, None], table, lut)

    # AutoContrast (ImageOps.autocontrast, cutoff 0): per channel, [lo, hi] stretched to [0, 255], truncated
    lo = lo.to(torch.float64)[..., None]
    hi = hi.to(torch.float64)[..., None]
    scale = torch.full_like(hi, 255.0) / (hi - lo).clamp_min(1.0)  # (not 255.0 / t: see hashing._div)
    ac = torch.trunc(ix.to(torch.float64) * scale - lo * scale).clamp(0, 255).to(torch.int64)
    put("AutoContrast", torch.where(hi > lo, ac, ix))
    # Equalize (ImageOps.equalize): per channel, step = (pixels − count of the top level) // 255,
    # table[i] = (step // 2 + pixels below i) // step; the identity when step is 0
    hist = hist.to(torch.int64).view(b * c, 256)
    top = torch.where(hist > 0, torch.arange(256, device=dev), -1).amax(1, keepdim=True)
    step = ((hw - hist.gather(1, top)) // 255).view(b, c, 1)
    below = (hist.cumsum(1) - hist).view(b, c, 256)
    eq = ((step // 2 + below) // step.clamp_min(1)).clamp_max(255)
    put("Equalize", torch.where(step > 0, eq, ix))
    put("Invert", 255 - ix)
    # PosterizeIncreasing: keep 4 - int(4·level) bits
    bits = 4 - torch.floor(lv * 4).to(torch.int64)
    mask = (255 - ((1 << (8 - bits)) - 1))[:, None, None]
    put("PosterizeIncreasing", ix & mask)
    # SolarizeIncreasing: invert from 256 - min(256, int(256·level)) up
    thresh = (256 - torch.floor(lv * 256).clamp_max(256).to(torch.int64))[:, None, None]
    put("SolarizeIncreasing", torch.where(ix < thresh, ix, 255 - ix))
    # SolarizeAdd: + min(128, int(110·level)) below 128
    add = torch.floor(lv * 110).clamp_max(128).to(torch.int64)[:, None, None]
    put("SolarizeAdd", torch.where(ix < 128, (ix + add).clamp_max(255), ix))
    # Brightness / Contrast: a blend with black / with the mean grey level, factor max(0.1, 1 ± 0.9·level)
    f = _factor(lv, neg)[:, None, None]
    ixf = ix.to(torch.float32)
    put("BrightnessIncreasing", _blend(torch.zeros_like(ixf), ixf, f).to(torch.int64))
    mean = torch.floor(_div(grey_sum.to(torch.float64), hw) + 0.5).to(torch.float32)[:, None, None]
    put("ContrastIncreasing", _blend(mean.expand_as(ixf), ixf, f).to(torch.int64))
    return lut


def _factor(lv: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """timm's _enhance_increasing_level_to_arg: max(0.1, 1 ± 0.9·level), float32 [B]."""
    return (1.0 + torch.where(neg, -lv, lv) * 0.9).clamp_min(0.1).to(torch.float32)


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL's ImageFilter.SMOOTH (3 × 3, weights 1 and a centre 5, over 13; the 1-pixel border copied),
    rounded to the nearest level, float32. The weighted sum S is summed exactly (integers below 2^24), then
    S/13 rounded: it is never within 1/26 of a rounding boundary, so this equals PIL on any device (a
    float32 convolution with weights w/13 would too on the CPU, but cuDNN's default TF32 rounds the weights
    to 10 bits: up to ≈ 0.12 of error, enough to move a level)."""
    b, c, h, w = x.shape
    out = x.clone()
    if h > 2 and w > 2:
        s = 4 * x[:, :, 1:-1, 1:-1]
        for dv in range(3):
            for du in range(3):
                s = s + x[:, :, dv : h - 2 + dv, du : w - 2 + du]
        out[:, :, 1:-1, 1:-1] = torch.floor(s / 13.0 + 0.5)
    return out


_CPU_CHUNK = 2  # images per torch-form resample on the CPU (the tensors of 2 images at 224² fit in cache)


def _cubic(v1, v2, v3, v4, d):
    """PIL's BICUBIC macro (Geometry.c: the a = −1 cubic convolution), its float64 operations in order."""
    p2 = -v1 + v3
    p3 = 2 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return v2 + d * (p2 + d * (p3 + d * p4))


def _affine(x: torch.Tensor, coef: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """PIL's ``Image.transform(size, AFFINE, (a, b, c, d, e, f), BICUBIC, fillcolor)``: output pixel centre
    (u, v) reads the input at (a·u + b·v + c, d·u + e·v + f) (pixel centres at .5); inside the image it
    interpolates 4 × 4 pixels (indices clamped to the image; rows, then the column of row values), in
    float64 in PIL's order, clipped to [0, 255] and truncated (PIL's ``bicubic_filter``); outside it is
    ``fill``. x: uint8 [B, C, H, W]; coef: float64 [B, 6]. Returns float32
    [B, C, H, W] (uint8 values)."""
    b, c, h, w = x.shape
    dev = x.device
    if dev.type == "cpu" and b > _CPU_CHUNK:  # (CPU: 2 images at a time stay in cache, ≈ 4× faster at 224²)
        return torch.cat([_affine(x[i : i + _CPU_CHUNK], coef[i : i + _CPU_CHUNK], fill)
                          for i in range(0, b, _CPU_CHUNK)])
    v, u = torch.meshgrid(torch.arange(h, device=dev, dtype=torch.float64) + 0.5,
                          torch.arange(w, device=dev, dtype=torch.float64) + 0.5, indexing="ij")
    a_, b_, c_, d_, e_, f_ = (coef[:, i, None, None] for i in range(6))
    sx = a_ * u + b_ * v + c_  # [B, H, W]
    sy = d_ * u + e_ * v + f_
    inside = (sx >= 0.0) & (sx < w) & (sy >= 0.0) & (sy < h)
    px, py = sx - 0.5, sy - 0.5
    x0, y0 = torch.floor(px), torch.floor(py)
    dx, dy = (px - x0)[:, None], (py - y0)[:, None]
    x0, y0 = x0.to(torch.int64), y0.to(torch.int64)
    flat = x.reshape(b, c, h * w)

    def at(yy, xx):  # the pixels at clamped indices, gathered from the uint8 image, as float64
        idx = (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).reshape(b, 1, h * w).expand(b, c, h * w)
        return flat.gather(2, idx).view(b, c, h, w).to(torch.float64)

    # rows y0 − 1 … y0 + 2, each interpolated along x over columns x0 − 1 … x0 + 2, then along y
    rows = [_cubic(*(at(y0 + j, x0 + i) for i in (-1, 0, 1, 2)), dx) for j in (-1, 0, 1, 2)]
    val = _cubic(*rows, dy)
    out = torch.floor(val.clamp_(0, 255)).to(torch.float32)
    return torch.where(inside[:, None], out, fill.view(1, c, 1, 1))


def _kernels_here(x: torch.Tensor) -> bool:
    """Whether a layer runs as the Triton passes (``fastkd.kernels.randaug``): on CUDA (tests force it on
    the CPU under the Triton interpreter)."""
    return x.is_cuda


def _kernel_params(op, mag, neg, c: int, h: int, w: int):
    """The layer kernels' per-image parameters for every layer at once, layer-major and contiguous in the
    dtypes the launches take (so a layer's slice is passed as it is, with no copy): op int32 [L, B], the
    magnitude float64 [L, B], the op's kind int32 [L, B] (a table, the affine transform, Color, Sharpness),
    the blend factor float32 [L, B], the affine coefficients float64 [L, B, 6]."""
    from fastkd.kernels import randaug as K

    geo = sum((op == _I[n]) for n in _GEOMETRIC).bool()
    kind = torch.where(geo, K.KIND_GEOMETRIC, K.KIND_LUT)
    if c == 3:  # (a grayscale image is its own degenerate: Color's table, the identity, does it)
        kind = torch.where(op == _I["ColorIncreasing"], K.KIND_COLOR, kind)
    kind = torch.where(op == _I["SharpnessIncreasing"], K.KIND_SHARPNESS, kind)
    cols = (op.to(torch.int32), mag.to(torch.float64), kind.to(torch.int32), _factor(_div(mag, 10.0), neg),
            _geometry(op, mag, neg, h, w))
    return [t.transpose(0, 1).contiguous() for t in cols]


def _layer_kernels(x, params, fill):
    """One layer as ``fastkd.kernels.randaug``'s three launches (statistics, tables, the layer; the same
    values as ``_layer_torch``), or None when they cannot run here. ``params``: this layer's row of each of
    ``_kernel_params``' tensors."""
    from fastkd.kernels import randaug as K

    b, c, h, w = x.shape
    op, mag, kind, factor, coef = params
    stats = K.layer_stats(x)
    lut = None if stats is None else K.layer_tables(op, mag, factor, *stats, h * w)
    return None if lut is None else K.apply_layer(x, kind, factor, coef, lut, fill)


def _layer_torch(x, o, m, s, fill):
    """One layer in torch: every op for the whole batch, each image keeping its own (the CPU form, and the
    fallback of a GPU whose kernels failed)."""
    b, c, h, w = x.shape
    xi = x.to(torch.int64)  # the grey levels, the histogram and the table gather read it
    gray = _gray(xi)  # Contrast's mean, and Color's degenerate (a Color image's table is the identity,
    # so its grey levels are the same before and after the gather)
    lut = _luts(o, m, s, *_stats(x, xi, gray), h * w).to(torch.uint8)
    x = lut.gather(2, xi.view(b, c, -1)).view(b, c, h, w)
    xf = x.to(torch.float32)
    f = _factor(_div(m, 10.0), s).view(b, 1, 1, 1)
    if c == 3:  # ColorIncreasing (a grayscale image is its own degenerate: nothing to do)
        xf = torch.where((o == _I["ColorIncreasing"]).view(b, 1, 1, 1),
                         _blend(gray.to(torch.float32).expand_as(xf), xf, f), xf)
    xf = torch.where((o == _I["SharpnessIncreasing"]).view(b, 1, 1, 1), _blend(_smooth(xf), xf, f), xf)
    geo = sum((o == _I[n]) for n in _GEOMETRIC).bool()
    xf = torch.where(geo.view(b, 1, 1, 1), _affine(xf.to(torch.uint8), _geometry(o, m, s, h, w), fill), xf)
    return xf.to(torch.uint8)


def _geometry(op: torch.Tensor, mag: torch.Tensor, neg: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The affine coefficients (a, b, c, d, e, f) of each sample's geometric op (the identity for others),
    as timm's level functions and PIL's ``rotate`` compute them; float64 [..., 6] for op, mag, neg [...]."""
    lv = _div(mag, 10.0)
    sign = torch.where(neg, -1.0, 1.0).to(torch.float64)
    z, one = torch.zeros_like(lv), torch.ones_like(lv)
    coef = torch.stack([one, z, z, z, one, z], -1)

    def put(name, cols):
        nonlocal coef
        coef = torch.where((op == _I[name])[..., None], torch.stack(cols, -1), coef)

    # Rotate: degrees 30·level·sign counter-clockwise about the centre (PIL's matrix, rounded to 15 digits)
    ang = -torch.deg2rad(torch.remainder(30.0 * lv * sign, 360.0))
    cs, sn = torch.round(torch.cos(ang), decimals=15), torch.round(torch.sin(ang), decimals=15)
    cx, cy = w / 2.0, h / 2.0
    put("Rotate", [cs, sn, cs * -cx + sn * -cy + cx, -sn, cs, -sn * -cx + cs * -cy + cy])
    shear = 0.3 * lv * sign
    put("ShearX", [one, shear, z, z, one, z])
    put("ShearY", [one, z, z, shear, one, z])
    shift = 0.45 * lv * sign
    put("TranslateXRel", [one, z, shift * w, z, one, z])
    put("TranslateYRel", [one, z, z, z, one, shift * h])
    return coef


def rand_augment(x: torch.Tensor, op: torch.Tensor, mag: torch.Tensor, neg: torch.Tensor, fill):
    """Apply the drawn RandAugment layers to uint8 images.

    x: uint8 [B, C, H, W]; op: int64 [B, L] (the op index in ``OPS``; −1: the layer does nothing for that
    image, timm's probability-0.5 skip); mag: float64 [B, L] magnitudes in [0, 10]; neg: bool [B, L] (the
    random sign); fill: C grey levels for the geometric ops' outside (timm: the normalisation mean · 255).
    Returns uint8 [B, C, H, W]."""
    b, c, h, w = x.shape
    dev = x.device
    if not isinstance(fill, torch.Tensor):  # (the pipeline passes a float32 device tensor: no copy per step)
        fill = torch.tensor(fill, dtype=torch.float32)
    fill = _on(fill, dev).reshape(c)
    op, mag, neg = (_on(t, dev) for t in (op, mag, neg))
    params = _kernel_params(op, mag, neg, c, h, w) if _kernels_here(x) else None
    for layer in range(op.shape[1]):
        o, m, s = op[:, layer], mag[:, layer], neg[:, layer]
        out = None if params is None else _layer_kernels(x, [p[layer] for p in params], fill)
        x = out if out is not None else _layer_torch(x, o, m, s, fill)
    return x


def layer_draws(u_apply, u_op, g1, g2, u_neg, m: float, mstd: float):
    """Per-sample layer choices from the hash streams' uniforms ([B, L] float64 each; g1/g2 for the
    magnitude noise by Box–Muller): (op int64 with −1 for a skipped layer, magnitude, negate)."""
    op = torch.floor(u_op * len(OPS)).to(torch.int64).clamp_max(len(OPS) - 1)
    op = torch.where(u_apply <= 0.5, op, -1)  # timm: skipped when random() > prob (0.5)
    if mstd > 100:  # timm: mstd "inf" = uniform in [0, m]
        mag = g1 * m
    elif mstd > 0:
        mag = m + mstd * torch.sqrt(-2.0 * torch.log(g1)) * torch.cos(2.0 * math.pi * g2)
    else:
        mag = torch.full_like(g1, float(m))
    return op, mag.clamp(0.0, 10.0), u_neg > 0.5  # timm's _randomly_negate: -v if random() > 0.5
