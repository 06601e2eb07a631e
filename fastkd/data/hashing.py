"""Counter-based hashing for fastkd's augmentations: every random draw is a pure function of
(seed, view, stream, sample id), computed with int64 torch arithmetic on the ids' device (see
``fastkd.data.augment`` for the pipeline and the CPU-vs-CUDA exactness notes).

``hash32`` / ``hash_uniform``: one stream; ``_Draws``: all streams of a batch as one [B, L] tensor;
``_betas``: the batched Gamma chains behind the mixup/cutmix Beta lambdas."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import torch

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


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; no ``.to`` call at all when it is already there (the step's sync guard test
    forbids device moves to the host, and on a CPU run every tensor is on the host)."""
    return t if t.device == device else t.to(device, non_blocking=True)


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


def _div(t: torch.Tensor, n: float) -> torch.Tensor:
    """``t / n`` correctly rounded on every device, as Python's floats (and PIL's) divide: on CUDA torch turns
    a tensor divided by a Python number into a multiplication by its reciprocal (an ulp off, sometimes), and
    everywhere a Python number divided by a tensor into a reciprocal times the number (an ulp off for 54 of
    AutoContrast's 255 spans, which moved a level). A tensor divided by a same-device tensor is an exact
    division on both: ``n`` is one, cached per device (``_device_const``)."""
    n = float(n)
    return t / _device_const(("div", n, t.dtype), lambda: torch.tensor(n, dtype=t.dtype), t.device)


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
