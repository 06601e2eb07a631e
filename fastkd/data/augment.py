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
values kept below 2**32 so nothing ever overflows. All per-sample parameters are computed on the CPU
(tiny [B] tensors, float64 where it matters) so they are identical on CPU and GPU; only the pixel work
(gather-based crop/flip, erase, mixing, normalisation) runs on the images' device, as batched tensor
ops with no per-sample Python loop.

Pipeline for one sample i with id n (pixel space uint8 -> normalised float32):

1. ``view_images``: translate by (oy, ox) in [-pad, pad] with zero fill (= pad + random crop), then
   horizontal flip (if ``hflip``), then normalise ``(x/255 - mean)/std``, then random erasing
   (one box, per-channel N(0,1) fill in normalised space, like timm's ``mode='rand'``).
2. mixing (with probability ``mix_prob``): partner m = hash-derived id in [0, N) with m != n, whose
   image is ``view_images`` of m with *m's own* parameters. Cutmix (probability ``switch_prob`` when both
   alphas are on) pastes a box of m into n; mixup blends ``lam*x_n + (1-lam)*x_m``.
   ``y_soft = lam*onehot(y_n) + (1-lam)*onehot(y_m)`` with the cutmix lam corrected to the real box area.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "AugmentConfig",
    "AugParams",
    "augment_batch",
    "eval_batch",
    "hash32",
    "hash_uniform",
    "sample_params",
    "view_images",
]

_M32 = 0xFFFFFFFF
_M16 = 0xFFFF

# ----------------------------------------------------------------------------------------------------
# counter-based hashing
# ----------------------------------------------------------------------------------------------------


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32) and a Python int c in [0, 2**32), overflow-free.

    Split x = hi*2**16 + lo; then x*c = lo*c + ((hi*c) mod 2**16)*2**16 (mod 2**32), and every partial
    product stays below 2**48.
    """
    lo = x & _M16
    hi = x >> 16
    return (lo * c + (((hi * c) & _M16) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons): a bijective 32-bit integer mixer; int64 tensor in [0, 2**32) -> same."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    x = x ^ (x >> 16)
    return x


def _keys(seed: int, view: int, stream: str) -> tuple[int, int, int]:
    """Three 32-bit keys for one (seed, view, stream): BLAKE2b of their text, so any Python ints work."""
    d = hashlib.blake2b(f"fastkd|{int(seed)}|{int(view)}|{stream}".encode(), digest_size=12).digest()
    return tuple(int.from_bytes(d[4 * i : 4 * i + 4], "little") for i in range(3))  # type: ignore[return-value]


def hash32(ids: torch.Tensor, seed: int, view: int, stream: str, extra: int = 0) -> torch.Tensor:
    """Hash ids -> uniformly distributed 32-bit integers (int64 tensor, values in [0, 2**32)).

    ids: int64 [B] (non-negative, < 2**63). Output [B], or [B, extra] when ``extra > 0`` (``extra``
    independent draws per id). A pure function of (seed, view, stream, id[, j]); device follows ``ids``.
    For a fixed key the map id -> hash is a bijection on [0, 2**32), so distinct ids never collide.
    """
    k1, k2, k3 = _keys(seed, view, stream)
    ids = ids.to(torch.int64)
    h = _mix32((ids & _M32) ^ k1)
    h = _mix32(h ^ ((ids >> 32) & _M32) ^ k2)
    if extra > 0:
        j = _mix32(torch.arange(extra, device=ids.device, dtype=torch.int64) ^ k3)
        h = _mix32(h[:, None] ^ j[None, :])
    return h


def hash_uniform(
    ids: torch.Tensor, seed: int, view: int, stream: str, extra: int = 0, dtype=torch.float64
) -> torch.Tensor:
    """Uniform floats in the OPEN interval (0, 1), 24 bits of resolution: ``((h >> 8) + 0.5) / 2**24``."""
    h = hash32(ids, seed, view, stream, extra)
    return ((h >> 8).to(dtype) + 0.5) * (1.0 / (1 << 24))


def _randint(ids: torch.Tensor, seed: int, view: int, stream: str, n) -> torch.Tensor:
    """Integers in [0, n) (n: int or int64 tensor [B], 1 <= n < 2**31): ``(h * n) >> 32``."""
    return (hash32(ids, seed, view, stream) * n) >> 32


def _log_gamma_sample(ids: torch.Tensor, seed: int, view: int, stream: str, alpha: float) -> torch.Tensor:
    """log of a Gamma(alpha, 1) draw per id (float64 [B]), Marsaglia-Tsang with 16 hashed candidates.

    For alpha < 1 the boost Gamma(alpha) = Gamma(alpha + 1) * U**(1/alpha) is used (in log space, so a tiny
    alpha cannot underflow). The first accepted candidate is taken; the acceptance rate is >= 0.95, so all
    16 rejecting has probability < 1e-20 (then the candidate-free value log(d) is used).
    """
    k = 16
    a = alpha + 1.0 if alpha < 1.0 else alpha
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    u1 = hash_uniform(ids, seed, view, stream + "/n1", extra=k)
    u2 = hash_uniform(ids, seed, view, stream + "/n2", extra=k)
    u3 = hash_uniform(ids, seed, view, stream + "/acc", extra=k)
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    v = (1.0 + c * z) ** 3
    log_v = torch.log(v.clamp_min(1e-300))
    ok = (v > 0) & (torch.log(u3) < 0.5 * z * z + d - d * v + d * log_v)
    first = torch.argmax(ok.to(torch.int8), dim=1, keepdim=True)  # first accepted (ties -> first)
    log_g = math.log(d) + torch.where(ok.any(dim=1), log_v.gather(1, first)[:, 0], 0.0)
    if alpha < 1.0:
        log_g = log_g + torch.log(hash_uniform(ids, seed, view, stream + "/boost")) / alpha
    return log_g


def _beta_symmetric(ids: torch.Tensor, seed: int, view: int, stream: str, alpha: float) -> torch.Tensor:
    """Beta(alpha, alpha) per id (float64 [B]) as G1/(G1+G2) = sigmoid(log G1 - log G2)."""
    g1 = _log_gamma_sample(ids, seed, view, stream + "/g1", alpha)
    g2 = _log_gamma_sample(ids, seed, view, stream + "/g2", alpha)
    return torch.sigmoid(g1 - g2)


# ----------------------------------------------------------------------------------------------------
# config and parameters
# ----------------------------------------------------------------------------------------------------


@dataclass
class AugmentConfig:
    """Training augmentation settings (label smoothing lives on the loss side, not here).

    crop_pad: random translation by up to ``crop_pad`` pixels each way with zero fill (pad + random crop).
        None -> ``round(img_size / 8)`` of the images it is applied to (1 for 8x8 digits, 4 for 32, 28 for
        224). 0 turns it off.
    hflip: random horizontal flip with probability 0.5. Off by default (digits must not be flipped).
    mixup_alpha / cutmix_alpha: Beta(alpha, alpha) parameter; 0 turns that one off.
    mix_prob: probability that a sample is mixed at all (when an alpha is on).
    switch_prob: probability of cutmix instead of mixup when both alphas are on.
    erase_prob: probability of random erasing (one box of area fraction in ``erase_area`` and aspect
        ratio log-uniform in ``erase_ratio``, filled with per-channel N(0, 1) in normalised space).
    """

    crop_pad: int | None = None
    hflip: bool = False
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    erase_prob: float = 0.0
    erase_area: tuple[float, float] = (0.02, 1.0 / 3.0)
    erase_ratio: tuple[float, float] = (0.3, 3.3)

    def __post_init__(self):
        if self.crop_pad is not None and (int(self.crop_pad) != self.crop_pad or self.crop_pad < 0):
            raise ValueError(f"AugmentConfig.crop_pad={self.crop_pad!r}: use a non-negative int or None")
        for name in ("mixup_alpha", "cutmix_alpha"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"AugmentConfig.{name}={getattr(self, name)!r}: use alpha >= 0 (0 = off)")
        for name in ("mix_prob", "switch_prob", "erase_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"AugmentConfig.{name}={getattr(self, name)!r}: use a probability in [0, 1]")
        lo, hi = self.erase_area
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"AugmentConfig.erase_area={self.erase_area!r}: use 0 < lo <= hi <= 1")
        lo, hi = self.erase_ratio
        if not 0.0 < lo <= hi:
            raise ValueError(f"AugmentConfig.erase_ratio={self.erase_ratio!r}: use 0 < lo <= hi")

    @classmethod
    def default_for(cls, img_size: int, **overrides) -> AugmentConfig:
        """The default preset for square images of side ``img_size``: translation by round(img_size/8)
        pixels, no flip, no mixing, no erasing. ``overrides`` replace any field."""
        kw = {"crop_pad": int(round(img_size / 8))}
        kw.update(overrides)
        return cls(**kw)

    def pad_for(self, img_size: int) -> int:
        return int(round(img_size / 8)) if self.crop_pad is None else int(self.crop_pad)

    @property
    def mixing(self) -> bool:
        """True when mixup or cutmix can happen (decided by the config only, never by data)."""
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


@dataclass
class AugParams:
    """Per-sample augmentation parameters (all CPU tensors of length B), a pure function of
    (seed, view, id). Boxes are half-open row/column ranges [y1, y2) x [x1, x2).

    shift_y, shift_x: int64 translation in [-pad, pad]: output pixel (r, c) reads input
        (r + shift_y, c' + shift_x), c' = c or W-1-c when flipped; zero outside.
    flip: bool. erase: bool; ey1, ey2, ex1, ex2: int64 erase box. erase_fill: float64 [B, C].
    mixed: bool; cut: bool (cutmix when mixed); partner: int64 id (== id itself when not mixed or N == 1);
    lam: float64 share of the sample's own image/label (1 when not mixed; cutmix: 1 - box area / (H*W));
    cy1, cy2, cx1, cx2: int64 cutmix box (empty when not cut).
    """

    shift_y: torch.Tensor
    shift_x: torch.Tensor
    flip: torch.Tensor
    erase: torch.Tensor
    ey1: torch.Tensor
    ey2: torch.Tensor
    ex1: torch.Tensor
    ex2: torch.Tensor
    erase_fill: torch.Tensor
    mixed: torch.Tensor
    cut: torch.Tensor
    partner: torch.Tensor
    lam: torch.Tensor
    cy1: torch.Tensor
    cy2: torch.Tensor
    cx1: torch.Tensor
    cx2: torch.Tensor


def _view_params(ids: torch.Tensor, seed: int, view: int, cfg: AugmentConfig, channels: int, h: int, w: int):
    """Crop/flip/erase parameters of ``ids`` (CPU int64 [B]); see AugParams."""
    b = ids.shape[0]
    pad = cfg.pad_for(max(h, w))
    if pad > 0:
        sy = _randint(ids, seed, view, "crop_y", 2 * pad + 1) - pad
        sx = _randint(ids, seed, view, "crop_x", 2 * pad + 1) - pad
    else:
        sy = sx = torch.zeros(b, dtype=torch.int64)
    if cfg.hflip:
        flip = hash_uniform(ids, seed, view, "flip") < 0.5
    else:
        flip = torch.zeros(b, dtype=torch.bool)
    zero = torch.zeros(b, dtype=torch.int64)
    if cfg.erase_prob <= 0:
        no = torch.zeros(b, dtype=torch.bool)
        return sy, sx, flip, no, zero, zero, zero, zero, torch.zeros(b, channels, dtype=torch.float64)
    erase = hash_uniform(ids, seed, view, "erase") < cfg.erase_prob
    lo, hi = cfg.erase_area
    area = (lo + (hi - lo) * hash_uniform(ids, seed, view, "erase_area")) * (h * w)
    rlo, rhi = math.log(cfg.erase_ratio[0]), math.log(cfg.erase_ratio[1])
    ratio = torch.exp(rlo + (rhi - rlo) * hash_uniform(ids, seed, view, "erase_ratio"))
    eh = torch.round(torch.sqrt(area * ratio)).to(torch.int64).clamp(1, h)
    ew = torch.round(torch.sqrt(area / ratio)).to(torch.int64).clamp(1, w)
    ey1 = torch.where(erase, _randint(ids, seed, view, "erase_y", h - eh + 1), zero)
    ex1 = torch.where(erase, _randint(ids, seed, view, "erase_x", w - ew + 1), zero)
    ey2 = torch.where(erase, ey1 + eh, zero)
    ex2 = torch.where(erase, ex1 + ew, zero)
    u1 = hash_uniform(ids, seed, view, "erase_fill1", extra=channels)
    u2 = hash_uniform(ids, seed, view, "erase_fill2", extra=channels)
    fill = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return sy, sx, flip, erase, ey1, ey2, ex1, ex2, fill


def sample_params(
    ids: torch.Tensor,
    *,
    seed: int,
    view: int,
    cfg: AugmentConfig,
    n: int,
    channels: int,
    height: int,
    width: int,
) -> AugParams:
    """All random parameters of samples ``ids`` (int64 [B], any device; returned on the CPU).

    n: number of training samples (partners are drawn from [0, n)); channels/height/width: image shape.
    Pure function of (seed, view, id) for each row -- nothing depends on the rest of the batch.
    """
    ids = ids.detach().to("cpu", torch.int64).reshape(-1)
    b, h, w = ids.shape[0], height, width
    sy, sx, flip, erase, ey1, ey2, ex1, ex2, fill = _view_params(ids, seed, view, cfg, channels, h, w)
    zero = torch.zeros(b, dtype=torch.int64)
    if cfg.mixing and n > 1:
        mixed = hash_uniform(ids, seed, view, "mix") < cfg.mix_prob
        if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
            cut = hash_uniform(ids, seed, view, "switch") < cfg.switch_prob
        else:
            cut = torch.full((b,), cfg.cutmix_alpha > 0, dtype=torch.bool)
        cut = cut & mixed
        p = _randint(ids, seed, view, "partner", n - 1)  # uniform over the n-1 others
        partner = torch.where(mixed, p + (p >= ids).to(torch.int64), ids)
        ones = torch.ones(b, dtype=torch.float64)
        lam_mix = ones
        if cfg.mixup_alpha > 0:
            lam_mix = _beta_symmetric(ids, seed, view, "lam_mixup", cfg.mixup_alpha)
        if cfg.cutmix_alpha > 0:
            lam_cut = _beta_symmetric(ids, seed, view, "lam_cutmix", cfg.cutmix_alpha)
            # timm's rand_bbox: a box of side sqrt(1 - lam) * H/W at a uniform centre, clipped at the border.
            rat = torch.sqrt(1.0 - lam_cut)
            ch = (h * rat).to(torch.int64)
            cw = (w * rat).to(torch.int64)
            cy = _randint(ids, seed, view, "cut_y", h)
            cx = _randint(ids, seed, view, "cut_x", w)
            cy1 = torch.where(cut, (cy - ch // 2).clamp(0, h), zero)
            cy2 = torch.where(cut, (cy + ch // 2).clamp(0, h), zero)
            cx1 = torch.where(cut, (cx - cw // 2).clamp(0, w), zero)
            cx2 = torch.where(cut, (cx + cw // 2).clamp(0, w), zero)
            lam_cut = 1.0 - ((cy2 - cy1) * (cx2 - cx1)).to(torch.float64) / (h * w)
        else:
            lam_cut = ones
            cy1 = cy2 = cx1 = cx2 = zero
        lam = torch.where(cut, lam_cut, lam_mix)
        lam = torch.where(mixed, lam, ones)
    else:
        mixed = cut = torch.zeros(b, dtype=torch.bool)
        partner = ids.clone()
        lam = torch.ones(b, dtype=torch.float64)
        cy1 = cy2 = cx1 = cx2 = zero
    return AugParams(
        sy, sx, flip, erase, ey1, ey2, ex1, ex2, fill, mixed, cut, partner, lam, cy1, cy2, cx1, cx2
    )


# ----------------------------------------------------------------------------------------------------
# pixel work (batched, on the images' device)
# ----------------------------------------------------------------------------------------------------


def _norm_consts(mean, std, channels: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    m = torch.as_tensor(mean, dtype=torch.float32).to(device).reshape(-1)
    s = torch.as_tensor(std, dtype=torch.float32).to(device).reshape(-1)
    if m.numel() != channels or s.numel() != channels:
        raise ValueError(
            f"mean/std have {m.numel()}/{s.numel()} values but the images have {channels} channels; "
            "pass one mean and std per channel (Dataset.mean, Dataset.std)"
        )
    return m.view(1, channels, 1, 1), s.view(1, channels, 1, 1)


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
    y1, y2, x1, x2 = (t.to(device)[:, None] for t in (y1, y2, x1, x2))
    rows = (r[None, :] >= y1) & (r[None, :] < y2)  # [B, H]
    cols = (c[None, :] >= x1) & (c[None, :] < x2)  # [B, W]
    return (rows[:, :, None] & cols[:, None, :])[:, None]


def view_images(x: torch.Tensor, params: tuple, mean, std) -> torch.Tensor:
    """Apply translation (zero fill), flip, normalisation and erasing to uint8 images.

    x: uint8 [B, C, H, W] (the raw images of the ids the params were drawn for).
    params: the first 9 fields of AugParams (shift_y, shift_x, flip, erase, ey1, ey2, ex1, ex2, erase_fill).
    Returns float32 [B, C, H, W] on x's device.
    """
    sy, sx, flip, erase, ey1, ey2, ex1, ex2, fill = params
    b, ch, h, w = x.shape
    dev = x.device
    r = torch.arange(h, device=dev)
    c = torch.arange(w, device=dev)
    src_y = r[None, :] + sy.to(dev)[:, None]  # [B, H]
    col = torch.where(flip.to(dev)[:, None], (w - 1) - c[None, :], c[None, :])  # flip after translation
    src_x = col + sx.to(dev)[:, None]  # [B, W]
    ok_y = (src_y >= 0) & (src_y < h)
    ok_x = (src_x >= 0) & (src_x < w)
    iy = src_y.clamp(0, h - 1)[:, None, :, None].expand(b, ch, h, w)
    ix = src_x.clamp(0, w - 1)[:, None, None, :].expand(b, ch, h, w)
    out = torch.gather(torch.gather(x, 2, iy), 3, ix)
    valid = (ok_y[:, :, None] & ok_x[:, None, :])[:, None]  # [B, 1, H, W]
    out = out * valid.to(out.dtype)  # zero fill (uint8 0 = black) outside the shifted image
    m, s = _norm_consts(mean, std, ch, dev)
    out = (out.to(torch.float32) / 255.0 - m) / s
    box = _box_mask(ey1, ey2, ex1, ex2, h, w, dev) & erase.to(dev)[:, None, None, None]
    return torch.where(box, fill.to(dev, torch.float32)[:, :, None, None], out)


def _fetch(src, ids: torch.Tensor, device) -> torch.Tensor:
    if isinstance(src, torch.Tensor):
        _check_images(src, "x_all")
        x = src.index_select(0, ids.to(src.device))
    else:
        x = src(ids)
        _check_images(x, "the fetch function's result")
        if x.shape[0] != ids.shape[0]:
            raise ValueError(
                f"fetch(ids) returned {x.shape[0]} images for {ids.shape[0]} ids; return one per id"
            )
    return x if device is None else x.to(device, non_blocking=True)


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
        ``fetch(ids: int64 CPU [k]) -> uint8 [k, C, H, W]``.
    y_all: int64 [N] labels of the whole training set (N = len(y_all) is the partner range).
    ids: int64 [B] sample ids in [0, N).
    seed, view: the run seed and the view (usually the epoch; a cached teacher stores one entry per view).
    cfg: None -> ``AugmentConfig.default_for(H)``.
    mean, std: per-channel normalisation in [0, 1] pixel units (Dataset.mean / Dataset.std).
    device: where the pixel work runs and the outputs live; None -> the device of the fetched images.

    Returns (x float32 [B, C, H, W] normalised, y_soft float32 [B, num_classes] rows summing to 1,
    y_hard int64 [B]). y_hard is the argmax of y_soft, i.e. the label with the larger share; an exact
    tie (lam = 0.5) goes to the sample's own label.
    """
    ids = ids.detach().to("cpu", torch.int64).reshape(-1)
    n = int(y_all.shape[0])
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
        lo, hi = int(ids.min()), int(ids.max())
        raise ValueError(f"sample ids must lie in [0, {n}) (len(y_all)); got ids in [{lo}, {hi}]")
    x = _fetch(x_all_or_fetch, ids, device)
    dev = x.device
    _, ch, h, w = x.shape
    if cfg is None:
        cfg = AugmentConfig.default_for(h)
    p = sample_params(ids, seed=seed, view=view, cfg=cfg, n=n, channels=ch, height=h, width=w)
    fields = (p.shift_y, p.shift_x, p.flip, p.erase, p.ey1, p.ey2, p.ex1, p.ex2, p.erase_fill)
    out = view_images(x, fields, mean, std)
    y_cpu = y_all.detach().to("cpu", torch.int64)
    y = y_cpu[ids]
    y_p = y_cpu[p.partner]
    if ids.numel() and (
        int(torch.minimum(y, y_p).min()) < 0 or int(torch.maximum(y, y_p).max()) >= num_classes
    ):
        raise ValueError(f"labels must lie in [0, num_classes={num_classes}); pass Dataset.num_classes")
    lam = p.lam
    if cfg.mixing and n > 1:
        pfields = _view_params(p.partner, seed, view, cfg, ch, h, w)  # the partner's own crop/flip/erase
        other = view_images(_fetch(x_all_or_fetch, p.partner, dev), pfields, mean, std)
        # mixup: lam*x + (1-lam)*other (lam = 1 for unmixed rows), written as mul/mul/add -- no fused ops,
        # so each pixel is bit-identical whatever batch it is computed in.
        lam_mix = torch.where(p.cut, 1.0, lam).to(dev, torch.float32)[:, None, None, None]
        blended = out * lam_mix + other * (1.0 - lam_mix)
        paste = _box_mask(p.cy1, p.cy2, p.cx1, p.cx2, h, w, dev)  # empty unless cut
        out = torch.where(paste, other, blended)
    lam32 = lam.to(torch.float32)
    y_soft = torch.zeros(ids.shape[0], num_classes, dtype=torch.float32)
    y_soft.scatter_(1, y[:, None], lam32[:, None])
    y_soft.scatter_add_(1, y_p[:, None], (1.0 - lam32)[:, None])
    y_hard = torch.where(lam >= 0.5, y, y_p)
    return out, y_soft.to(dev), y_hard.to(dev)
