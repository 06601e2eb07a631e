"""Augmentation parameters: ``AugmentConfig`` (the recipe), ``AugParams`` and ``sample_params`` (every
per-sample random decision as a pure function of (seed, view, sample id), on the ids' device), and
``param_digest`` (what a CPU and a GPU run must agree on). The pipeline is in ``fastkd.data.augment``."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from fastkd.data.hashing import _beta_specs, _betas, _div, _Draws
from fastkd.data.randaug import layer_draws

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
    rrc_scale: random-resized crop (torchvision's ``RandomResizedCrop``, the ImageNet / DeiT scale
        augmentation): the smallest crop area as a fraction of the image (DeiT: 0.08); the crop's area is
        uniform in [rrc_scale, 1] of the image, its aspect ratio log-uniform in ``rrc_ratio``, and it is
        resized back to the image size (bilinear). 0 turns it off. It runs first, before the translation.
    randaug_n / randaug_m / randaug_mstd: timm's RandAugment with the increasing ops (``rand-m9-mstd0.5-inc1``
        is n 2, m 9, mstd 0.5: DeiT's), after the flip, on the uint8 pixels (``fastkd.data.randaug``);
        randaug_n 0 turns it off.
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
    rrc_scale: float = 0.0
    rrc_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    randaug_n: int = 0
    randaug_m: float = 9.0
    randaug_mstd: float = 0.5

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
        if not 0.0 <= self.rrc_scale <= 1.0:
            raise ValueError(f"AugmentConfig.rrc_scale={self.rrc_scale!r}: use a fraction in (0, 1], 0 = off")
        lo, hi = self.rrc_ratio
        if not 0.0 < lo <= hi:
            raise ValueError(f"AugmentConfig.rrc_ratio={self.rrc_ratio!r}: use 0 < lo <= hi")
        if self.randaug_n < 0 or not 0 <= self.randaug_m <= 10 or self.randaug_mstd < 0:
            raise ValueError(f"AugmentConfig.randaug_*: n={self.randaug_n}, m={self.randaug_m}, mstd="
                             f"{self.randaug_mstd}: use n >= 0 (0 = off), m in [0, 10], mstd >= 0")

    @classmethod
    def default_for(cls, img_size: int, **overrides) -> AugmentConfig:
        """The default preset for square images of side ``img_size``: translation by round(img_size/8)
        pixels, no flip, no mixing, no erasing. ``overrides`` replace any field."""
        kw = {"crop_pad": int(round(img_size / 8))}
        kw.update(overrides)
        return cls(**kw)

    def pad_for(self, img_size: int) -> int:
        return int(round(img_size / 8)) if self.crop_pad is None else int(self.crop_pad)

    def identity(self) -> dict:
        """The fields that define the augmentation stream, for cache manifests and teacher keys: every
        field, except those added later (the random-resized crop) while they are off, so a cache or a
        default teacher made before they existed still matches a run that does not use them."""
        d = dict(vars(self))
        if not self.rrc_scale:
            d.pop("rrc_scale"), d.pop("rrc_ratio")
        if not self.randaug_n:
            d.pop("randaug_n"), d.pop("randaug_m"), d.pop("randaug_mstd")
        return d

    @property
    def mixing(self) -> bool:
        """True when mixup or cutmix can happen (decided by the config only, never by data)."""
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


@dataclass
class AugParams:
    """Per-sample augmentation parameters (tensors of length B on the ids' device), a pure function of
    (seed, view, id). Boxes are half-open row/column ranges [y1, y2) x [x1, x2).

    shift_y, shift_x: int64 translation in [-pad, pad]: output pixel (r, c) reads input
        (r + shift_y, c' + shift_x), c' = c or W-1-c when flipped; zero outside.
    flip: bool. erase: bool; ey1, ey2, ex1, ex2: int64 erase box. erase_fill: float64 [B, C].
    rrc_y, rrc_x, rrc_h, rrc_w: int64 random-resized-crop box (top, left, height, width; the whole image
        when the crop is off).
    ra_op, ra_mag, ra_neg: [B, randaug_n] RandAugment layers: the op index (−1: the layer is skipped),
        magnitude (float64) and sign (``fastkd.data.randaug``).
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
    rrc_y: torch.Tensor
    rrc_x: torch.Tensor
    rrc_h: torch.Tensor
    rrc_w: torch.Tensor
    ra_op: torch.Tensor
    ra_mag: torch.Tensor
    ra_neg: torch.Tensor
    mixed: torch.Tensor
    cut: torch.Tensor
    partner: torch.Tensor
    lam: torch.Tensor
    cy1: torch.Tensor
    cy2: torch.Tensor
    cx1: torch.Tensor
    cx2: torch.Tensor


# the per-view fields of AugParams, in ``_view_params``' order (what ``view_images`` takes)
VIEW_FIELDS = ("shift_y", "shift_x", "flip", "erase", "ey1", "ey2", "ex1", "ex2", "erase_fill",
               "rrc_y", "rrc_x", "rrc_h", "rrc_w", "ra_op", "ra_mag", "ra_neg")
RRC_TRIES = 10  # torchvision's RandomResizedCrop: 10 (area, ratio) tries, then the central-crop fallback


def _rrc_box(dr: _Draws, cfg: AugmentConfig, h: int, w: int):
    """(top, left, height, width) int64 [B] of torchvision's ``RandomResizedCrop.get_params``, batched: the
    first of RRC_TRIES (area, log-ratio) draws whose box fits the image, at a uniform position; when none
    fits, the central crop of the largest box with a ratio in ``rrc_ratio``."""
    area = (cfg.rrc_scale + (1.0 - cfg.rrc_scale) * dr.u("rrc_area")) * (h * w)  # [B, T]
    rlo, rhi = math.log(cfg.rrc_ratio[0]), math.log(cfg.rrc_ratio[1])
    aspect = torch.exp(rlo + (rhi - rlo) * dr.u("rrc_ratio"))
    cw = torch.round(torch.sqrt(area * aspect)).to(torch.int64)
    ch = torch.round(torch.sqrt(area / aspect)).to(torch.int64)
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)  # the first fitting try (0 when none fits)
    in_ratio = w / h
    if in_ratio < cfg.rrc_ratio[0]:
        fw, fh = w, int(round(w / cfg.rrc_ratio[0]))
    elif in_ratio > cfg.rrc_ratio[1]:
        fw, fh = int(round(h * cfg.rrc_ratio[1])), h
    else:
        fw, fh = w, h
    any_fit = fits.any(dim=1)
    bh = torch.where(any_fit, ch.gather(1, first)[:, 0], fh)
    bw = torch.where(any_fit, cw.gather(1, first)[:, 0], fw)
    top = torch.where(any_fit, dr.randint("rrc_y", h - bh + 1), (h - fh) // 2)
    left = torch.where(any_fit, dr.randint("rrc_x", w - bw + 1), (w - fw) // 2)
    return top, left, bh, bw


def _view_specs(cfg: AugmentConfig, channels: int, h: int, w: int) -> list[tuple[str, int]]:
    """The hash streams ``_view_params`` draws from under ``cfg``."""
    specs = []
    if cfg.pad_for(max(h, w)) > 0:
        specs += [("crop_y", 0), ("crop_x", 0)]
    if cfg.hflip:
        specs += [("flip", 0)]
    if cfg.erase_prob > 0:
        specs += [("erase", 0), ("erase_area", 0), ("erase_ratio", 0), ("erase_y", 0), ("erase_x", 0)]
        specs += [("erase_fill1", channels), ("erase_fill2", channels)]
    if cfg.rrc_scale > 0:
        specs += [("rrc_y", 0), ("rrc_x", 0), ("rrc_area", RRC_TRIES), ("rrc_ratio", RRC_TRIES)]
    if cfg.randaug_n > 0:
        specs += [(s, cfg.randaug_n) for s in ("ra_apply", "ra_op", "ra_g1", "ra_g2", "ra_neg")]
    return specs


def _mix_specs(cfg: AugmentConfig, n: int) -> list[tuple[str, int]]:
    """The hash streams of the mixing parameters (mix, switch, partner, lambdas, cutmix box)."""
    if not (cfg.mixing and n > 1):
        return []
    specs = [("mix", 0), ("partner", 0)]
    if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
        specs += [("switch", 0)]
    specs += _beta_specs(_mix_betas(cfg))
    if cfg.cutmix_alpha > 0:
        specs += [("cut_y", 0), ("cut_x", 0)]
    return specs


def _mix_betas(cfg: AugmentConfig) -> list[tuple[str, float]]:
    """The lambda Betas (stream, alpha) of ``cfg``: mixup's and/or cutmix's."""
    betas = [("lam_mixup", cfg.mixup_alpha)] if cfg.mixup_alpha > 0 else []
    return betas + ([("lam_cutmix", cfg.cutmix_alpha)] if cfg.cutmix_alpha > 0 else [])


def _view_params(
    ids: torch.Tensor,
    seed: int,
    view: int,
    cfg: AugmentConfig,
    channels: int,
    h: int,
    w: int,
    dr: _Draws | None = None,
):
    """Crop/flip/erase/resized-crop parameters of ``ids`` (int64 [B], any device; results on that device);
    see AugParams.

    dr: the draws of ``ids`` holding (at least) ``_view_specs``; None -> computed here.
    """
    if dr is None:
        dr = _Draws(ids, seed, view, _view_specs(cfg, channels, h, w))
    b, dev = ids.shape[0], ids.device
    pad = cfg.pad_for(max(h, w))
    if pad > 0:
        sy = dr.randint("crop_y", 2 * pad + 1) - pad
        sx = dr.randint("crop_x", 2 * pad + 1) - pad
    else:
        sy = sx = torch.zeros(b, dtype=torch.int64, device=dev)
    if cfg.hflip:
        flip = dr.u("flip") < 0.5
    else:
        flip = torch.zeros(b, dtype=torch.bool, device=dev)
    zero = torch.zeros(b, dtype=torch.int64, device=dev)
    if cfg.rrc_scale > 0:
        box = _rrc_box(dr, cfg, h, w)
    else:
        box = (zero, zero, torch.full_like(zero, h), torch.full_like(zero, w))
    if cfg.randaug_n > 0:
        ra = layer_draws(*(dr.u(s) for s in ("ra_apply", "ra_op", "ra_g1", "ra_g2", "ra_neg")),
                         cfg.randaug_m, cfg.randaug_mstd)
    else:
        none = torch.zeros(b, 0, dtype=torch.int64, device=dev)  # no layers
        ra = (none, none.to(torch.float64), none > 0)
    later = (*box, *ra)  # the fields added after the erasing ones: the crop box, the RandAugment layers
    if cfg.erase_prob <= 0:
        no = torch.zeros(b, dtype=torch.bool, device=dev)
        fill = torch.zeros(b, channels, dtype=torch.float64, device=dev)
        return sy, sx, flip, no, zero, zero, zero, zero, fill, *later
    erase = dr.u("erase") < cfg.erase_prob
    lo, hi = cfg.erase_area
    area = (lo + (hi - lo) * dr.u("erase_area")) * (h * w)
    rlo, rhi = math.log(cfg.erase_ratio[0]), math.log(cfg.erase_ratio[1])
    ratio = torch.exp(rlo + (rhi - rlo) * dr.u("erase_ratio"))
    eh = torch.round(torch.sqrt(area * ratio)).to(torch.int64).clamp(1, h)
    ew = torch.round(torch.sqrt(area / ratio)).to(torch.int64).clamp(1, w)
    ey1 = torch.where(erase, dr.randint("erase_y", h - eh + 1), zero)
    ex1 = torch.where(erase, dr.randint("erase_x", w - ew + 1), zero)
    ey2 = torch.where(erase, ey1 + eh, zero)
    ex2 = torch.where(erase, ex1 + ew, zero)
    u1 = dr.u("erase_fill1")
    u2 = dr.u("erase_fill2")
    fill = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return sy, sx, flip, erase, ey1, ey2, ex1, ex2, fill, *later


def _sample(ids, seed, view, cfg, n, channels, h, w, *, partner_view: bool):
    """AugParams of ``ids`` on ids' device, and (when mixing and ``partner_view``) the view parameters of
    [ids; partners] (2B rows: the partners' own crop/flip/erase). Two batched hash passes: the mixing
    streams of ids, then the view streams of [ids; partners]."""
    b, dev = ids.shape[0], ids.device
    zero = torch.zeros(b, dtype=torch.int64, device=dev)
    mixing = cfg.mixing and n > 1
    vspecs = _view_specs(cfg, channels, h, w)
    pview = None
    if mixing:
        dr = _Draws(ids, seed, view, _mix_specs(cfg, n))
        mixed = dr.u("mix") < cfg.mix_prob
        if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
            cut = dr.u("switch") < cfg.switch_prob
        else:
            cut = torch.full((b,), cfg.cutmix_alpha > 0, dtype=torch.bool, device=dev)
        cut = cut & mixed
        p = dr.randint("partner", n - 1)  # uniform over the n-1 others
        partner = torch.where(mixed, p + (p >= ids).to(torch.int64), ids)
        ones = torch.ones(b, dtype=torch.float64, device=dev)
        lams = dict(zip([s for s, _ in _mix_betas(cfg)], _betas(dr, _mix_betas(cfg)), strict=True))
        lam_mix = lams.get("lam_mixup", ones)
        if cfg.cutmix_alpha > 0:
            lam_cut = lams["lam_cutmix"]
            # timm's rand_bbox: a box of side sqrt(1 - lam) * H/W at a uniform centre, clipped at the border.
            rat = torch.sqrt(1.0 - lam_cut)
            ch = (h * rat).to(torch.int64)
            cw = (w * rat).to(torch.int64)
            cy = dr.randint("cut_y", h)
            cx = dr.randint("cut_x", w)
            cy1 = torch.where(cut, (cy - ch // 2).clamp(0, h), zero)
            cy2 = torch.where(cut, (cy + ch // 2).clamp(0, h), zero)
            cx1 = torch.where(cut, (cx - cw // 2).clamp(0, w), zero)
            cx2 = torch.where(cut, (cx + cw // 2).clamp(0, w), zero)
            # an exact division (``_div``): CUDA's x / scalar is x * (1/scalar), which can differ in the
            # last bit from the CPU's (and v1's)
            lam_cut = 1.0 - _div(((cy2 - cy1) * (cx2 - cx1)).to(torch.float64), h * w)
        else:
            lam_cut = ones
            cy1 = cy2 = cx1 = cx2 = zero
        lam = torch.where(cut, lam_cut, lam_mix)
        lam = torch.where(mixed, lam, ones)
        if partner_view:  # own and partners' view parameters in one pass over [ids; partners]
            both = torch.cat([ids, partner])
            pview = _view_params(both, seed, view, cfg, channels, h, w, _Draws(both, seed, view, vspecs))
            own = tuple(t[:b] for t in pview)
        else:
            own = _view_params(ids, seed, view, cfg, channels, h, w, _Draws(ids, seed, view, vspecs))
    else:
        own = _view_params(ids, seed, view, cfg, channels, h, w, _Draws(ids, seed, view, vspecs))
        mixed = cut = torch.zeros(b, dtype=torch.bool, device=dev)
        partner = ids.clone()
        lam = torch.ones(b, dtype=torch.float64, device=dev)
        cy1 = cy2 = cx1 = cx2 = zero
    return AugParams(*own, mixed, cut, partner, lam, cy1, cy2, cx1, cx2), pview


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
    """All random parameters of samples ``ids`` (int64 [B], any device; returned on the same device).

    n: number of training samples (partners are drawn from [0, n)); channels/height/width: image shape.
    Pure function of (seed, view, id) for each row -- nothing depends on the rest of the batch. Integer
    hashing throughout; a CPU and a CUDA run draw the same values (see ``param_digest`` for the float64
    transcendentals, whose last bit may differ).
    """
    ids = ids.detach().to(torch.int64).reshape(-1)
    return _sample(ids, seed, view, cfg, n, channels, height, width, partner_view=False)[0]


_DIGEST_FIELDS = (
    "shift_y",
    "shift_x",
    "flip",
    "erase",
    "ey1",
    "ey2",
    "ex1",
    "ex2",
    "erase_fill",
    "mixed",
    "cut",
    "partner",
    "lam",
    "cy1",
    "cy2",
    "cx1",
    "cx2",
)


def param_digest(
    ids: torch.Tensor,
    *,
    seed: int,
    view: int,
    cfg: AugmentConfig,
    n: int,
    channels: int,
    height: int,
    width: int,
    exact: bool = False,
) -> str:
    """SHA-256 (hex) of ``sample_params`` on ids' device, for comparing a CPU and a GPU draw (syncs: a check).

    exact=False hashes the parameters as the pixels and labels use them: integers and booleans as drawn,
    ``lam`` and ``erase_fill`` rounded to float32, and ``lam >= 0.5`` (the y_hard choice). exact=True hashes
    the float64 values: their last bit may differ between CPU and CUDA, because float64 ``log``, ``cos``,
    ``exp`` and ``sigmoid`` are not exactly rounded (CPU: SLEEF/glibc, CUDA: libdevice).
    """
    p = sample_params(ids, seed=seed, view=view, cfg=cfg, n=n, channels=channels, height=height, width=width)
    d = hashlib.sha256()
    # the crop box only when the crop is on: the digests of configs without it are those of before it
    later = (("rrc_y", "rrc_x", "rrc_h", "rrc_w") if cfg.rrc_scale > 0 else ()) + (
        ("ra_op", "ra_mag", "ra_neg") if cfg.randaug_n > 0 else ())
    for name in _DIGEST_FIELDS + later:
        t = getattr(p, name).detach().to("cpu")
        if not exact and t.dtype == torch.float64:
            t = t.to(torch.float32)
        d.update(name.encode() + t.contiguous().numpy().tobytes())
    if not exact:
        d.update((p.lam >= 0.5).to("cpu").numpy().tobytes())
    return d.hexdigest()
