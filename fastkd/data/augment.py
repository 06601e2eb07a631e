"""Deterministic, batched image augmentations.

Every random parameter of a training sample -- crop offsets, flip, erase box and colour, mixup/cutmix
partner, lambda, mix-or-cut choice -- is a *pure function of (seed, view, sample id)*. It does not
depend on which batch the sample sits in, the batch order or size, the number of processes, or the
device. Two consequences the rest of fastkd relies on:

* a resumed or multi-process run sees exactly the images a single uninterrupted run would see;
* a teacher cache can store teacher outputs keyed by (view, sample id) and they match the student's
  inputs bit for bit (the teacher sees the same mixed images as the student).

Randomness comes from a counter-based hash (``hash32``: two rounds of the ``lowbias32`` integer mixer
with keys derived from (seed, view, stream) by BLAKE2b), evaluated with int64 torch arithmetic on
values kept below 2**32 so nothing ever overflows. All per-sample parameters are computed on the device
of the ids (all hash streams of a batch as one [B, L] tensor, ``_Draws``), labels are gathered and
y_soft built there, and the pixel work (gather-based crop/flip, erase, mixing, normalisation) runs on
the images' device, as batched tensor ops with no per-sample Python loop and no host sync.

CPU vs CUDA: the hashes, integer parameters and every +, -, *, /, sqrt are exact on both (a division
by a Python number is not: CUDA multiplies by its reciprocal, so the parameters divide by tensors only;
the pixels' ``/ 255.0`` is such a division, as in v1). The float64
``log``/``cos``/``exp``/``sigmoid`` behind the Beta lambdas, the erase box aspect and the erase fill are
not exactly rounded (CPU: SLEEF, or glibc for the scalar tail of ``sigmoid``; CUDA: libdevice), so
their float64 value may differ in the last bit. What the pixels and labels use is rounded further
(float32 lam and fill, integer boxes, ``lam >= 0.5``); ``param_digest`` compares exactly that.

Pipeline for one sample i with id n (pixel space uint8 -> normalised float32):

1. ``view_images``: random-resized crop (when on: a box of the image resized back to its size, bilinear,
   rounded to uint8), then translate by (oy, ox) in [-pad, pad] with zero fill (= pad + random crop), then
   horizontal flip (if ``hflip``), then normalise ``(x/255 - mean)/std``, then random erasing
   (one box, per-channel N(0,1) fill in normalised space, like timm's ``mode='rand'``).
2. mixing (with probability ``mix_prob``): partner m = hash-derived id in [0, N) with m != n, whose
   image is ``view_images`` of m with *m's own* parameters. Cutmix (probability ``switch_prob`` when both
   alphas are on) pastes a box of m into n; mixup blends ``lam*x_n + (1-lam)*x_m``.
   ``y_soft = lam*onehot(y_n) + (1-lam)*onehot(y_m)`` with the cutmix lam corrected to the real box area.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fastkd.data.augparams import (  # noqa: F401  (public via this module)
    VIEW_FIELDS,
    AugmentConfig,
    AugParams,
    _sample,
    _view_params,  # noqa: F401
    param_digest,
    sample_params,
)
from fastkd.data.hashing import (  # noqa: F401  (hash32/hash_uniform/_mul32: public via this module)
    _device_const,
    _div,
    _mul32,
    _on,
    hash32,
    hash_uniform,
)
from fastkd.data.randaug import rand_augment

__all__ = [
    "AugmentConfig",
    "AugParams",
    "augment_batch",
    "check_labels",
    "eval_batch",
    "hash32",
    "hash_uniform",
    "param_digest",
    "resized_crop",
    "sample_params",
    "view_images",
]


# ----------------------------------------------------------------------------------------------------
# pixel work (batched, on the images' device)
# ----------------------------------------------------------------------------------------------------


def _norm_consts(mean, std, channels: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """mean/std as float32 [1, C, 1, 1] on ``device``. Python sequences are copied up once per device and
    cached (no copy per step); tensors are used as they are (put them on the device to avoid a copy)."""
    device = torch.device(device)

    def const(v, what):
        if isinstance(v, torch.Tensor):
            return _on(v.detach(), device).to(torch.float32).reshape(-1)
        vals = tuple(float(f) for f in (v if isinstance(v, Sequence) else [v]))
        return _device_const(("norm", vals), lambda: torch.tensor(vals, dtype=torch.float32), device)

    m, s = const(mean, "mean"), const(std, "std")
    if m.numel() != channels or s.numel() != channels:
        raise ValueError(
            f"mean/std have {m.numel()}/{s.numel()} values but the images have {channels} channels; "
            "pass one mean and std per channel (Dataset.mean, Dataset.std)"
        )
    return m.view(1, channels, 1, 1), s.view(1, channels, 1, 1)


def _ra_fill(mean, m: torch.Tensor) -> torch.Tensor:
    """RandAugment's fill grey levels: timm's ``img_mean``, min(255, round(255 · mean)) per channel (Python
    rounding of a sequence, on the device once; a mean given as a tensor is rounded on the device)."""
    if isinstance(mean, torch.Tensor):
        return torch.round(m.reshape(-1) * 255.0).clamp_max(255.0)
    vals = tuple(min(255, round(255 * float(v))) for v in (mean if isinstance(mean, Sequence) else [mean]))
    return _device_const(("ra_fill", vals), lambda: torch.tensor(vals, dtype=torch.float32), m.device)


def _check_images(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
        desc = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what} must be a uint8 tensor [B, C, H, W] (pixels 0..255), got {desc}")


def eval_batch(x_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    """Validation preprocessing: uint8 [B, C, H, W] -> float32 ``(x/255 - mean)/std`` [B, C, H, W]."""
    _check_images(x_uint8, "eval_batch input")
    m, s = _norm_consts(mean, std, x_uint8.shape[1], x_uint8.device)
    return (x_uint8.to(torch.float32) / 255.0 - m) / s


def _box_mask(y1, y2, x1, x2, h: int, w: int, device) -> torch.Tensor:
    """bool [B, 1, H, W]: True inside the half-open box [y1, y2) x [x1, x2) of each row."""
    r = torch.arange(h, device=device)
    c = torch.arange(w, device=device)
    y1, y2, x1, x2 = (_on(t, device)[:, None] for t in (y1, y2, x1, x2))
    rows = (r[None, :] >= y1) & (r[None, :] < y2)  # [B, H]
    cols = (c[None, :] >= x1) & (c[None, :] < x2)  # [B, W]
    return (rows[:, :, None] & cols[:, None, :])[:, None]


def _lerp_axis(x: torch.Tensor, start, size, dim: int) -> torch.Tensor:
    """Resize the window [start, start + size) of ``x`` along ``dim`` (2: rows, 3: columns; per-row int64
    [B] start and size) back to the axis' full length, bilinear as ``F.interpolate(align_corners=False)``:
    output index o reads source max((o + 0.5) · size / n − 0.5, 0) of the window, edges clamped to it."""
    b, ch, h, w = x.shape
    n = x.shape[dim]
    o = torch.arange(n, device=x.device, dtype=torch.float64)
    # size / n exactly (``_div``: as the CPU and the crop kernel divide)
    src = ((o[None, :] + 0.5) * _div(size[:, None].to(torch.float64), n) - 0.5).clamp_min(0.0)  # [B, n]
    i0 = torch.minimum(src.floor().to(torch.int64), size[:, None] - 1)
    i1 = torch.minimum(i0 + 1, size[:, None] - 1)
    frac = (src - i0.to(torch.float64)).to(torch.float32)
    shape = (b, 1, n, 1) if dim == 2 else (b, 1, 1, n)
    full = (b, ch, n, w) if dim == 2 else (b, ch, h, n)
    a = torch.gather(x, dim, (start[:, None] + i0).view(shape).expand(full)).to(torch.float32)
    c = torch.gather(x, dim, (start[:, None] + i1).view(shape).expand(full)).to(torch.float32)
    return a + (c - a) * frac.view(shape)


def _crop_kernel_here(x: torch.Tensor) -> bool:
    """Whether the resize runs as the Triton pass: on CUDA (tests force it under the interpreter)."""
    return x.is_cuda


def resized_crop(x: torch.Tensor, top, left, height, width) -> torch.Tensor:
    """uint8 [B, C, H, W] → each row's box (top, left, height, width: int64 [B]) resized to H × W, bilinear
    (torchvision's ``resized_crop`` of a tensor: crop, then ``interpolate(align_corners=False)``; the box is
    never larger than the image, so this only upsamples and needs no antialias), rounded to uint8. On CUDA
    one Triton pass (``fastkd.kernels.resized_crop``, the same arithmetic); the torch form below elsewhere."""
    dev = x.device
    top, left, height, width = (_on(t, dev) for t in (top, left, height, width))
    if _crop_kernel_here(x):
        from fastkd.kernels.resized_crop import resized_crop as kernel

        out = kernel(x, top, left, height, width)
        if out is not None:
            return out
    rows = _lerp_axis(x, top, height, 2)
    out = _lerp_axis(rows, left, width, 3)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def view_images(x: torch.Tensor, params: tuple, mean, std) -> torch.Tensor:
    """Apply the random-resized crop, translation (zero fill), flip, normalisation and erasing to uint8
    images.

    x: uint8 [B, C, H, W] (the raw images of the ids the params were drawn for).
    params: the view fields of AugParams (shift_y, shift_x, flip, erase, ey1, ey2, ex1, ex2, erase_fill,
        rrc_y, rrc_x, rrc_h, rrc_w, ra_op, ra_mag, ra_neg). shift_y/shift_x, flip, erase, rrc_y or ra_op may
        be None: that step is off (skipped, same result as no-op values). RandAugment (after the flip,
        before the normalisation) fills with the normalisation mean, as timm's ``img_mean``.
    Returns float32 [B, C, H, W] on x's device.
    """
    sy, sx, flip, erase, ey1, ey2, ex1, ex2, fill, ry, rx, rh, rw, ra_op, ra_mag, ra_neg = params
    b, ch, h, w = x.shape
    dev = x.device
    if ry is not None:
        x = resized_crop(x, ry, rx, rh, rw)
    out = x
    if sy is not None or flip is not None:
        c = torch.arange(w, device=dev)
        col = c[None, :]
        if flip is not None:
            col = torch.where(_on(flip, dev)[:, None], (w - 1) - col, col)  # flip after translation
        if sy is None:  # flip only: a column gather, nothing leaves the image
            out = torch.gather(x, 3, col[:, None, None, :].expand(b, ch, h, w))
        else:
            r = torch.arange(h, device=dev)
            src_y = r[None, :] + _on(sy, dev)[:, None]  # [B, H]
            src_x = col + _on(sx, dev)[:, None]  # [B, W]
            ok_y = (src_y >= 0) & (src_y < h)
            ok_x = (src_x >= 0) & (src_x < w)
            iy = src_y.clamp(0, h - 1)[:, None, :, None].expand(b, ch, h, w)
            ix = src_x.clamp(0, w - 1)[:, None, None, :].expand(b, ch, h, w)
            out = torch.gather(torch.gather(x, 2, iy), 3, ix)
            valid = (ok_y[:, :, None] & ok_x[:, None, :])[:, None]  # [B, 1, H, W]
            out = out * valid.to(out.dtype)  # zero fill (uint8 0 = black) outside the shifted image
    m, s = _norm_consts(mean, std, ch, dev)
    if ra_op is not None:
        out = rand_augment(out, ra_op, ra_mag, ra_neg, _ra_fill(mean, m))
    out = (out.to(torch.float32) / 255.0 - m) / s
    if erase is None:
        return out
    box = _box_mask(ey1, ey2, ex1, ex2, h, w, dev) & _on(erase, dev)[:, None, None, None]
    return torch.where(box, _on(fill, dev).to(torch.float32)[:, :, None, None], out)


def _active(fields: tuple, cfg: AugmentConfig, h: int, w: int) -> tuple:
    """View fields with the steps ``cfg`` turns off set to None (decided by the config, never by data)."""
    sy, sx, flip, erase, ey1, ey2, ex1, ex2, fill, ry, rx, rh, rw, ra_op, ra_mag, ra_neg = fields
    if cfg.pad_for(max(h, w)) == 0:
        sy = sx = None
    if not cfg.hflip:
        flip = None
    if cfg.erase_prob <= 0:
        erase = None
    if cfg.rrc_scale <= 0:
        ry = None
    if cfg.randaug_n <= 0:
        ra_op = None
    return sy, sx, flip, erase, ey1, ey2, ex1, ex2, fill, ry, rx, rh, rw, ra_op, ra_mag, ra_neg


def _fetch(src, ids: torch.Tensor, device) -> torch.Tensor:
    if isinstance(src, torch.Tensor):
        _check_images(src, "x_all")
        x = src.index_select(0, _on(ids, src.device))
    else:
        # a fetch function gets the ids where the parameters are drawn (``Prepared.fetch`` serves device
        # ids it prepared without reading them; a host lookup such as ``StreamBatch.fetch`` reads them)
        x = src(ids)
        _check_images(x, "the fetch function's result")
        if x.shape[0] != ids.shape[0]:
            raise ValueError(
                f"fetch(ids) returned {x.shape[0]} images for {ids.shape[0]} ids; return one per id"
            )
    return x if device is None else _on(x, torch.device(device))


def _check_ids(ids: torch.Tensor, n: int) -> None:
    """ids in [0, n), without a host sync: an async device-side assert (on the CPU it raises at once,
    and is turned into the ValueError below; on CUDA a bad id stops the run at the next sync)."""
    if ids.numel() == 0:
        return
    ok = ((ids >= 0) & (ids < n)).all()
    msg = f"sample ids must lie in [0, {n}) (len(y_all))"
    if ids.device.type != "cpu":  # a device-side assert kernel: no sync (the message is CPU-only)
        torch._assert_async(ok)
        return
    try:
        torch._assert_async(ok, msg)
    except RuntimeError:  # CPU: the assert is synchronous; the error path may read values
        lo, hi = int(ids.min()), int(ids.max())
        raise ValueError(f"{msg}; got ids in [{lo}, {hi}]") from None


def check_labels(y_all: torch.Tensor, num_classes: int) -> None:
    """Labels in [0, num_classes): checked once per label tensor (a host read the first time only),
    remembered on the tensor together with its version counter, so an in-place change is checked again.
    augment_batch calls it; call it where the data is set up to take that one read out of the first step."""
    try:
        key = (int(num_classes), y_all._version, y_all.data_ptr(), tuple(y_all.shape))
    except RuntimeError:  # inference tensors have no version counter: check every time
        key = None
    if key is not None and getattr(y_all, "_fastkd_labels_ok", None) == key:
        return
    if y_all.dtype.is_floating_point or y_all.dtype == torch.bool or y_all.dim() != 1:
        desc = f"{y_all.dtype} {tuple(y_all.shape)}"
        raise ValueError(f"y_all must be an integer tensor [N] of labels, got {desc}")
    if y_all.numel() and (int(y_all.min()) < 0 or int(y_all.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, num_classes={num_classes}); pass Dataset.num_classes")
    if key is not None:
        y_all._fastkd_labels_ok = key


def augment_batch(
    x_all_or_fetch: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
    y_all: torch.Tensor,
    ids: torch.Tensor,
    *,
    seed: int,
    view: int,
    cfg: AugmentConfig | None = None,
    num_classes: int,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Augment the training samples ``ids``.

    x_all_or_fetch: the whole training set, uint8 [N, C, H, W] (any device), or a function
        ``fetch(ids: int64 [k], on ids' device) -> uint8 [k, C, H, W]``: called with ``ids``, then (when
        mixing) with their partners.
    y_all: int64 [N] labels of the whole training set (N = len(y_all) is the partner range). Its range is
        checked on first use only (one host read per label tensor; see ``check_labels``).
    ids: int64 [B] sample ids in [0, N). The parameters are drawn on ids' device.
    seed, view: the run seed and the view (usually the epoch; a cached teacher stores one entry per view).
    cfg: None -> ``AugmentConfig.default_for(H)``.
    mean, std: per-channel normalisation in [0, 1] pixel units (Dataset.mean / Dataset.std).
    device: where the pixel work runs and the outputs live; None -> the device of the fetched images.

    No host sync when x_all, y_all and ids share one device (after the first call with a label tensor):
    parameters, labels and y_soft are all computed there.

    Returns (x float32 [B, C, H, W] normalised, y_soft float32 [B, num_classes] rows summing to 1,
    y_hard int64 [B]). y_hard is the argmax of y_soft, i.e. the label with the larger share; an exact
    tie (lam = 0.5) goes to the sample's own label.
    """
    ids = ids.detach().to(torch.int64).reshape(-1)
    n = int(y_all.shape[0])
    _check_ids(ids, n)
    check_labels(y_all, num_classes)
    if isinstance(x_all_or_fetch, torch.Tensor):  # shape known up front: one gather for ids and partners
        _check_images(x_all_or_fetch, "x_all")
        x = None
        dev = x_all_or_fetch.device if device is None else torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        _, ch, h, w = x_all_or_fetch.shape
    else:
        x = _fetch(x_all_or_fetch, ids, device)
        dev = x.device
        _, ch, h, w = x.shape
    if cfg is None:
        cfg = AugmentConfig.default_for(h)
    mixing = cfg.mixing and n > 1
    b = ids.shape[0]
    p, vp_both = _sample(ids, seed, view, cfg, n, ch, h, w, partner_view=True)
    if mixing:
        both = torch.cat([ids, p.partner])
        if x is None:
            x = _fetch(x_all_or_fetch, both, dev)
        else:
            x = torch.cat([x, _fetch(x_all_or_fetch, p.partner, dev)])
        # [2B] rows: the own views, then the partners' own views
        imgs = view_images(x, _active(vp_both, cfg, h, w), mean, std)
        out, other = imgs[:b], imgs[b:]
        y_both = _on(y_all.detach().index_select(0, _on(both, y_all.device)), dev).to(torch.int64)
        y, y_p = y_both[:b], y_both[b:]
        lam = _on(p.lam, dev)
        # mixup: lam*x + (1-lam)*other (lam = 1 for unmixed rows), written as mul/mul/add -- no fused ops,
        # so each pixel is bit-identical whatever batch it is computed in.
        lam_mix = torch.where(_on(p.cut, dev), 1.0, lam).to(torch.float32)[:, None, None, None]
        blended = out * lam_mix + other * (1.0 - lam_mix)
        paste = _box_mask(p.cy1, p.cy2, p.cx1, p.cx2, h, w, dev)  # empty unless cut
        out = torch.where(paste, other, blended)
    else:
        if x is None:
            x = _fetch(x_all_or_fetch, ids, dev)
        fields = tuple(getattr(p, f) for f in VIEW_FIELDS)
        out = view_images(x, _active(fields, cfg, h, w), mean, std)
        y = _on(y_all.detach().index_select(0, _on(ids, y_all.device)), dev).to(torch.int64)
        y_p = y  # partner == id: lam = 1, y_soft = one-hot(y)
        lam = _on(p.lam, dev)
    lam32 = lam.to(torch.float32)
    y_soft = torch.zeros(ids.shape[0], num_classes, dtype=torch.float32, device=dev)
    y_soft.scatter_(1, y[:, None], lam32[:, None])
    y_soft.scatter_add_(1, y_p[:, None], (1.0 - lam32)[:, None])
    y_hard = torch.where(lam >= 0.5, y, y_p)
    return out, y_soft, y_hard
