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
    "check_labels",
    "eval_batch",
    "hash32",
    "hash_uniform",
    "param_digest",
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

    Split c = ch*2**16 + cl; then x*c = x*cl + ((x*ch) mod 2**16)*2**16 (mod 2**32), and every partial
    product stays below 2**48.
    """
    cl, ch = c & _M16, c >> 16
    return (x * cl + (((x * ch) & _M16) << 16)) & _M32


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


def _lowbias32_int(x: int) -> int:
    """``_mix32`` on one Python int (for constants computed on the host, never per step)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    x ^= x >> 16
    return x


_CONSTS: dict = {}  # small per-device constant tensors (hash keys, mean/std), made once, never per step


def _device_const(key: tuple, build: Callable[[], torch.Tensor], device: torch.device) -> torch.Tensor:
    """A constant tensor on ``device``, built on the host once per (key, device) and cached.

    On CUDA the host copy is pinned and copied with non_blocking=True: no sync, no pageable copy.
    """
    k = (key, str(device))
    t = _CONSTS.get(k)
    if t is None:
        t = build()
        if device.type == "cuda":
            t = t.pin_memory().to(device, non_blocking=True)
        elif device.type != "cpu":
            t = t.to(device)
        if len(_CONSTS) >= 512:  # a new view (epoch) adds one entry; keep the cache bounded
            _CONSTS.pop(next(iter(_CONSTS)))
        _CONSTS[k] = t
    return t


class _Draws:
    """Many hash streams of the same ids in one batched computation (a handful of kernels in total).

    specs: (stream, extra) pairs. ``h(stream)`` equals ``hash32(ids, seed, view, stream, extra)`` bit for
    bit, ``u(stream)`` equals ``hash_uniform(...)`` (float64): each stream is a column ("lane") of one
    [B, L] int64 tensor; the per-lane keys (and the ``extra`` sub-keys ``_mix32(j ^ k3)``) are computed on
    the host once per (seed, view, specs) and cached on the device.
    """

    def __init__(self, ids: torch.Tensor, seed: int, view: int, specs: Sequence[tuple[str, int]]):
        specs = tuple((str(s), int(e)) for s, e in specs)
        self.device = ids.device
        order = tuple([sp for sp in specs if sp[1] == 0] + [sp for sp in specs if sp[1] > 0])
        self._slot: dict[str, tuple[int, int]] = {}
        n_lanes = 0
        for stream, extra in order:
            self._slot[stream] = (n_lanes, extra)
            n_lanes += max(extra, 1)
        n_plain = sum(1 for _, e in order if e == 0)
        self._u: torch.Tensor | None = None
        if n_lanes == 0:  # nothing to draw (e.g. no crop, no flip, no erasing)
            self._h = torch.zeros(ids.shape[0], 0, dtype=torch.int64, device=ids.device)
            return

        def build():  # host work (BLAKE2b keys, sub-keys) once per (seed, view, specs, device)
            lanes: list[tuple[int, int, int]] = []
            for stream, extra in order:
                k1, k2, k3 = _keys(seed, view, stream)
                if extra == 0:
                    lanes.append((k1, k2, 0))
                else:
                    lanes.extend((k1, k2, _lowbias32_int(j ^ k3)) for j in range(extra))
            return torch.tensor(lanes, dtype=torch.int64).t().contiguous()  # [3, L]

        keys = _device_const(("draws", int(seed), int(view), order), build, ids.device)
        ids = ids.to(torch.int64)
        h = _mix32((ids & _M32)[:, None] ^ keys[0])
        h = _mix32(h ^ ((ids >> 32) & _M32)[:, None] ^ keys[1])
        if n_plain < n_lanes:
            h = torch.cat([h[:, :n_plain], _mix32(h[:, n_plain:] ^ keys[2, n_plain:])], dim=1)
        self._h = h

    def _take(self, t: torch.Tensor, stream: str) -> torch.Tensor:
        a, extra = self._slot[stream]
        return t[:, a] if extra == 0 else t[:, a : a + extra]

    def h(self, stream: str) -> torch.Tensor:
        return self._take(self._h, stream)

    def u(self, stream: str) -> torch.Tensor:
        if self._u is None:  # hash_uniform's formula, for all lanes at once
            self._u = ((self._h >> 8).to(torch.float64) + 0.5) * (1.0 / (1 << 24))
        return self._take(self._u, stream)

    def u_block(self, streams: Sequence[str]) -> torch.Tensor:
        """Uniforms of streams laid out next to each other, with the same ``extra``: [B, len] or
        [B, len, extra], a view of the lanes (no copy)."""
        a, extra = self._slot[streams[0]]
        width = max(extra, 1)
        for i, s in enumerate(streams):
            assert self._slot[s] == (a + i * width, extra), f"streams {streams} are not laid out as a block"
        self.u(streams[0])
        blk = self._u[:, a : a + width * len(streams)]
        return blk if extra == 0 else blk.unflatten(1, (len(streams), extra))

    def randint(self, stream: str, n) -> torch.Tensor:
        return (self.h(stream) * n) >> 32


def _chains(betas: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
    """The Gamma chains (stream, alpha) of some symmetric Betas: two per Beta (g1, g2), the ones that
    need the alpha < 1 boost first (so the boosted chains are a prefix)."""
    ch = [(f"{s}/{g}", float(a)) for s, a in betas for g in ("g1", "g2")]
    return [c for c in ch if c[1] < 1.0] + [c for c in ch if c[1] >= 1.0]


def _gamma_chain_specs(chains: Sequence[tuple[str, float]]) -> list[tuple[str, int]]:
    """Hash streams of Gamma chains, laid out so each kind is one contiguous [B, G, 16] block of lanes."""
    k = 16
    specs = [(f"{s}/{kind}", k) for kind in ("n1", "n2", "acc") for s, _ in chains]
    return specs + [(s + "/boost", 0) for s, a in chains if a < 1.0]


def _beta_specs(betas: Sequence[tuple[str, float]]) -> list[tuple[str, int]]:
    return _gamma_chain_specs(_chains(betas))


def _log_gammas(dr: _Draws, chains: Sequence[tuple[str, float]]) -> torch.Tensor:
    """log of a Gamma(alpha, 1) draw per id and chain (float64 [B, G]), Marsaglia-Tsang with 16 hashed
    candidates, all chains in one batched computation.

    For alpha < 1 the boost Gamma(alpha) = Gamma(alpha + 1) * U**(1/alpha) is used (in log space, so a tiny
    alpha cannot underflow). The first accepted candidate is taken; the acceptance rate is >= 0.95, so all
    16 rejecting has probability < 1e-20 (then the candidate-free value log(d) is used).
    The per-chain constants are float64 tensors holding exactly the Python floats v1 used as scalars, and
    every expression keeps v1's order of operations, so each value is bit-identical to v1's one-chain code.
    Float64 log/cos are the only ops here that are not exactly rounded (see ``param_digest``).
    """
    dev = dr.device
    a = [al + 1.0 if al < 1.0 else al for _, al in chains]
    d = [x - 1.0 / 3.0 for x in a]
    c = [1.0 / math.sqrt(9.0 * x) for x in d]
    key = ("gamma", tuple(chains))

    def build():
        return torch.tensor([d, c, [math.log(x) for x in d]], dtype=torch.float64)

    consts = _device_const(key, build, dev)  # [3, G]: d, c, log(d)
    dd, cc, logd = consts[0][:, None], consts[1][:, None], consts[2]
    names = [s for s, _ in chains]
    u1 = dr.u_block([s + "/n1" for s in names])  # [B, G, 16]
    u2 = dr.u_block([s + "/n2" for s in names])
    u3 = dr.u_block([s + "/acc" for s in names])
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    v = (1.0 + cc * z) ** 3
    log_v = torch.log(v.clamp_min(1e-300))
    ok = (v > 0) & (torch.log(u3) < 0.5 * z * z + dd - dd * v + dd * log_v)
    first = torch.argmax(ok.to(torch.int8), dim=2, keepdim=True)  # first accepted (ties -> first)
    log_g = logd + torch.where(ok.any(dim=2), log_v.gather(2, first)[..., 0], 0.0)  # [B, G]
    boosted = [s for s, al in chains if al < 1.0]  # a prefix of chains (see _chains)
    if boosted:
        nb = len(boosted)
        alphas = _device_const(
            ("boost", tuple(chains)),
            lambda: torch.tensor([al for _, al in chains[:nb]], dtype=torch.float64),
            dev,
        )
        boost = torch.log(dr.u_block([s + "/boost" for s in boosted])) / alphas
        log_g = log_g + boost if nb == len(chains) else torch.cat([log_g[:, :nb] + boost, log_g[:, nb:]], 1)
    return log_g


def _betas(dr: _Draws, betas: Sequence[tuple[str, float]]) -> list[torch.Tensor]:
    """Beta(alpha, alpha) per id (float64 [B] each) as G1/(G1+G2) = sigmoid(log G1 - log G2).

    ``torch.sigmoid`` runs on each Beta's own contiguous [B] tensor, as in v1: on the CPU its vectorised
    and scalar (tail) paths round differently, so the layout is part of the value.
    """
    chains = _chains(betas)
    log_g = _log_gammas(dr, chains)
    col = {s: i for i, (s, _) in enumerate(chains)}
    return [torch.sigmoid(log_g[:, col[f"{s}/g1"]] - log_g[:, col[f"{s}/g2"]]) for s, _ in betas]


def _log_gamma_sample(ids: torch.Tensor, seed: int, view: int, stream: str, alpha: float) -> torch.Tensor:
    """log of one Gamma(alpha, 1) draw per id (float64 [B]); device follows ids (tests, one-off use)."""
    chains = [(stream, float(alpha))]
    return _log_gammas(_Draws(ids, seed, view, _gamma_chain_specs(chains)), chains)[:, 0]


def _beta_symmetric(ids: torch.Tensor, seed: int, view: int, stream: str, alpha: float) -> torch.Tensor:
    """Beta(alpha, alpha) per id (float64 [B]); device follows ids."""
    betas = [(stream, float(alpha))]
    return _betas(_Draws(ids, seed, view, _beta_specs(betas)), betas)[0]


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
    """Per-sample augmentation parameters (tensors of length B on the ids' device), a pure function of
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
    """Crop/flip/erase parameters of ``ids`` (int64 [B], any device; results on that device); see AugParams.

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
    if cfg.erase_prob <= 0:
        no = torch.zeros(b, dtype=torch.bool, device=dev)
        fill = torch.zeros(b, channels, dtype=torch.float64, device=dev)
        return sy, sx, flip, no, zero, zero, zero, zero, fill
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
    return sy, sx, flip, erase, ey1, ey2, ex1, ex2, fill


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
            # divide by a device tensor, not a Python number: CUDA turns x / scalar into x * (1/scalar),
            # which can differ in the last bit from the CPU's (and v1's) exact division
            hw = _device_const(("hw", h * w), lambda: torch.tensor(float(h * w), dtype=torch.float64), dev)
            lam_cut = 1.0 - ((cy2 - cy1) * (cx2 - cx1)).to(torch.float64) / hw
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
    for name in _DIGEST_FIELDS:
        t = getattr(p, name).detach().to("cpu")
        if not exact and t.dtype == torch.float64:
            t = t.to(torch.float32)
        d.update(name.encode() + t.contiguous().numpy().tobytes())
    if not exact:
        d.update((p.lam >= 0.5).to("cpu").numpy().tobytes())
    return d.hexdigest()


# ----------------------------------------------------------------------------------------------------
# pixel work (batched, on the images' device)
# ----------------------------------------------------------------------------------------------------


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; no ``.to`` call at all when it is already there (the step's sync guard test
    forbids device moves to the host, and on a CPU run every tensor is on the host)."""
    return t if t.device == device else t.to(device, non_blocking=True)


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


def view_images(x: torch.Tensor, params: tuple, mean, std) -> torch.Tensor:
    """Apply translation (zero fill), flip, normalisation and erasing to uint8 images.

    x: uint8 [B, C, H, W] (the raw images of the ids the params were drawn for).
    params: the first 9 fields of AugParams (shift_y, shift_x, flip, erase, ey1, ey2, ex1, ex2, erase_fill).
        shift_y/shift_x, flip or erase may be None: that step is off (skipped, same result as no-op values).
    Returns float32 [B, C, H, W] on x's device.
    """
    sy, sx, flip, erase, ey1, ey2, ex1, ex2, fill = params
    b, ch, h, w = x.shape
    dev = x.device
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
    out = (out.to(torch.float32) / 255.0 - m) / s
    if erase is None:
        return out
    box = _box_mask(ey1, ey2, ex1, ex2, h, w, dev) & _on(erase, dev)[:, None, None, None]
    return torch.where(box, _on(fill, dev).to(torch.float32)[:, :, None, None], out)


def _active(fields: tuple, cfg: AugmentConfig, h: int, w: int) -> tuple:
    """View fields with the steps ``cfg`` turns off set to None (decided by the config, never by data)."""
    sy, sx, flip, erase, ey1, ey2, ex1, ex2, fill = fields
    if cfg.pad_for(max(h, w)) == 0:
        sy = sx = None
    if not cfg.hflip:
        flip = None
    if cfg.erase_prob <= 0:
        erase = None
    return sy, sx, flip, erase, ey1, ey2, ex1, ex2, fill


def _fetch(src, ids: torch.Tensor, device) -> torch.Tensor:
    if isinstance(src, torch.Tensor):
        _check_images(src, "x_all")
        x = src.index_select(0, _on(ids, src.device))
    else:
        # a fetch function reads host data, so it takes host ids (a sync when ids are on a GPU)
        x = src(_on(ids, torch.device("cpu")))
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
        ``fetch(ids: int64 CPU [k]) -> uint8 [k, C, H, W]``.
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
        fields = (p.shift_y, p.shift_x, p.flip, p.erase, p.ey1, p.ey2, p.ex1, p.ex2, p.erase_fill)
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
