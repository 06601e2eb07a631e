"""``CachedTeacher``: serves the signals a cache holds (``fastkd.cache`` writes them) by (sample id, view)."""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from fastkd.cache.format import (
    TOPK_FIELDS,
    VERIFY_AT_OPEN_BYTES,
    CacheError,
    check_run,
    file_sha256,
    part_signatures,
    read_manifest,
)
from fastkd.data.pinned import END, offer, produce
from fastkd.data.pinned import Ring as _Ring
from fastkd.models.zoo import ModelInfo

# -------------------------------------------------------------------------------------------------- read


def _indexed(device) -> torch.device:
    """``device`` with its index (``cuda`` → ``cuda:N``, the current one), so device comparisons are exact."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _host(ids: torch.Tensor, *, sync_ok: bool = False) -> torch.Tensor:
    """``ids`` on the host: no ``.to`` call at all for host ids; device ids only with ``sync_ok``."""
    if ids.device.type == "cpu":
        return ids.detach()
    if not sync_ok:
        raise ValueError("CachedTeacher.load needs host ids (a device read would be a host sync)")
    return ids.detach().to("cpu")  # a host sync: only when the batch was not announced


def _read_ids(ids: torch.Tensor, side) -> torch.Tensor:
    """Host copy of an announced batch's ids, in the prefetch thread: host ids as they are; device ids
    copied on the side stream and waited for by this thread alone (an event wait, not a stream or
    device synchronisation: the training thread never waits)."""
    if ids.device.type == "cpu":
        return ids.detach().to(torch.int64)
    out = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
    with torch.cuda.stream(side):
        out.copy_(ids.detach(), non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(side)
    ev.synchronize()
    return out.to(torch.int64)


def _convert(t: torch.Tensor, copy: bool = False) -> torch.Tensor:
    """Records as the losses take them: floats as fp32, ids as int64."""
    return t.to(torch.float32 if t.is_floating_point() else torch.int64, copy=copy)


class CachedTeacher:
    """Serves cached teacher signals by (sample id, view): a drop-in for ``OnlineTeacher``.

    path: the cache directory. cfg/data/aug: the run's TrainConfig, (train-limited) Dataset and
    AugmentConfig — when given, the manifest must match them (else one-line CacheError). device: where
    ``__call__`` puts the tensors. verify: 'auto' (every checksum at open up to VERIFY_AT_OPEN_BYTES,
    else per shard on first touch), 'open', 'lazy' or 'none' (sizes are always checked at open).
    prefetch: batches gathered ahead by ``prefetch_epoch``'s thread. threaded: gather in a background
    thread (default: on CUDA, where the host otherwise waits for the GPU; on a CPU device the step
    itself is the host's work, a gather from the page cache takes ~0.02 ms for 64 records, and a
    second Python thread only competes for the GIL and the cores).

    The Teacher protocol (teachers/base.py). Attributes: ``info`` (teacher ModelInfo), ``top1``
    (= ``teacher_top1``), ``source``, ``views``, ``kind = 'cached'``,
    ``fields`` (name → {dtype, shape}), ``wait_s`` / ``calls`` / ``prefetched`` (time spent in and
    number of ``__call__``s, and how many were served by the prefetch thread).
    ``__call__(x, ids, view)`` → {signal name: tensor [B, ...] on device}; floats as fp32, top-K ids as
    int64; ``x`` is unused (the records are keyed by id and view).
    """

    kind = "cached"

    def __init__(self, path: str | os.PathLike, *, cfg=None, data=None, aug=None,
                 device: torch.device | str = "cpu", verify: str = "auto", prefetch: int = 2,
                 threaded: bool | None = None, run_teacher: dict | None = None, source: str | None = None):
        self.path = Path(path)
        self.source = source if source is not None else str(self.path)
        self.man = man = read_manifest(self.path)
        check_run(man, cfg, data, aug, where=str(self.path), run_teacher=run_teacher)
        self.method = cfg.method.method if cfg is not None else None
        info = dict(man["teacher"]["info"])
        if info.get("grid") is not None:
            info["grid"] = tuple(info["grid"])
        self.info = ModelInfo(**info)
        self.top1 = self.teacher_top1 = man["teacher"]["top1"]
        self.views = int(man["views"])
        self.n = int(man["data"]["n_train"])
        self.shard_size = int(man["shard_size"])
        self.fields = man["fields"]
        self.serve = list(self.fields)
        self.device = _indexed(device)
        self.prefetch_depth = max(1, int(prefetch))
        self.threaded = self.device.type == "cuda" if threaded is None else bool(threaded)
        self.wait_s, self.calls, self.prefetched = 0.0, 0, 0
        self._lock = threading.Lock()
        self._maps: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self._dtypes = {f: torch.from_numpy(np.empty(0, dtype=np.dtype(v["dtype"]))).dtype
                        for f, v in self.fields.items()}
        self._verified: set[tuple[int, int]] = set()
        self._shards = {(s["view"], s["index"]): s for s in man["shards"].values()}
        total = 0
        for _, s in sorted(self._shards.items()):
            for info_f in s["files"].values():
                p = self.path / info_f["file"]
                if not p.is_file():
                    raise CacheError(
                        f"teacher cache {self.path}: shard file {p.name} is missing; rebuild the cache"
                    )
                size = os.path.getsize(p)
                if size != info_f["bytes"]:
                    raise CacheError(
                        f"teacher cache {self.path}: shard file {p.name} is truncated or damaged ({size} of "
                        f"{info_f['bytes']} bytes); rebuild the cache (or that shard: delete it and its "
                        f".done.json, then re-run python -m fastkd.cache)"
                    )
                total += size
        if verify not in ("auto", "open", "lazy", "none"):
            raise ValueError(f"verify={verify!r}: use 'auto', 'open', 'lazy' or 'none'")
        self._lazy = verify == "lazy" or (verify == "auto" and total > VERIFY_AT_OPEN_BYTES)
        if verify == "none":
            self._verified = set(self._shards)
        elif not self._lazy:
            for key in sorted(self._shards):
                self._verify_shard(key)
        self._pf: dict | None = None
        self._ready = None

    # -- signals ----------------------------------------------------------------------------------
    def check_signals(self, loss) -> None:
        """Refuse (one line) unless every signal the loss reads is cached; serve only those afterwards.

        The run's DistillLoss is also checked part by part against the parts the cache was built for: a
        part whose signals are named by position (e.g. [CLS]-KD's layer pair k) must tap the same teacher
        blocks (another student depth or --clskd-blocks changes them).
        """
        names = list(loss.signal_names())
        have = set(self.fields)
        serve, missing = [], []
        for name in names:
            if name == "logits" and "logits" not in have and set(TOPK_FIELDS) <= have:
                serve.extend(TOPK_FIELDS)
            elif name in have:
                serve.append(name)
            else:
                missing.append(name)
        if missing:
            method = self.method or "METHOD"
            raise CacheError(
                f"teacher cache {self.path} lacks {', '.join(missing)} (it holds {', '.join(sorted(have))}), "
                f"needed by --method {method}; rebuild it with python -m fastkd.cache --method {method} "
                f"(same other flags)"
            )
        cached = self.man.get("parts", [])
        for part in part_signatures(loss):
            same = [c for c in cached if c["name"] == part["name"]]
            if same and not any(set(part["signals"]) <= set(c["signals"])
                                and c["teacher_blocks"] == part["teacher_blocks"] for c in same):
                raise CacheError(
                    f"teacher cache {self.path} holds {part['name']} signals of teacher blocks "
                    f"{same[0]['teacher_blocks']}, the run's {part['name']} needs blocks "
                    f"{part['teacher_blocks']} (another student depth or --clskd-blocks?); rebuild it "
                    f"with the run's student and method flags"
                )
        self.serve = sorted(set(serve))

    # -- shards -------------------------------------------------------------------------------------
    def _verify_shard(self, key: tuple[int, int]) -> None:
        s = self._shards[key]
        for info_f in s["files"].values():
            p = self.path / info_f["file"]
            if file_sha256(p) != info_f["sha256"]:
                raise CacheError(
                    f"teacher cache {self.path}: shard file {p.name} is corrupted (sha256 mismatch); "
                    f"rebuild the cache (or that shard: delete it and its .done.json, then re-run "
                    f"python -m fastkd.cache)"
                )
        self._verified.add(key)

    def _shard(self, view: int, index: int) -> dict[str, torch.Tensor]:
        key = (view, index)
        maps = self._maps.get(key)
        if maps is not None:
            return maps
        with self._lock:
            if key in self._maps:
                return self._maps[key]
            if key not in self._verified:
                self._verify_shard(key)
            s = self._shards[key]
            maps = {}
            for f, info_f in s["files"].items():
                p = self.path / info_f["file"]
                try:
                    # copy-on-write mapping: writable for torch.from_numpy, never written
                    arr = np.load(p, mmap_mode="c", allow_pickle=False)
                except (ValueError, OSError) as e:
                    raise CacheError(f"teacher cache {self.path}: shard file {p.name} is unreadable ({e}); "
                                     f"rebuild the cache") from None
                want = (s["stop"] - s["start"], *self.fields[f]["shape"])
                if arr.shape != want or arr.dtype != np.dtype(self.fields[f]["dtype"]):
                    raise CacheError(
                        f"teacher cache {self.path}: shard file {p.name} holds {arr.dtype}{arr.shape}, "
                        f"not {self.fields[f]['dtype']}{want}; rebuild the cache"
                    )
                maps[f] = torch.from_numpy(arr)
            self._maps[key] = maps
            return maps

    def load(self, ids: torch.Tensor, view: int,
             out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Gather the records of ``ids`` (int64 CPU [B]) in ``view`` → CPU tensors in the cached dtypes
        (pinned when serving a CUDA device), into ``out`` when given (a ring slot of that shape)."""
        if not 0 <= int(view) < self.views:
            raise CacheError(
                f"teacher cache {self.path}: view {view} out of range (it holds {self.views} views)"
            )
        idx = _host(ids).to(torch.int64).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.n):
            raise CacheError(f"teacher cache {self.path}: sample ids must lie in [0, {self.n}); got "
                             f"[{int(idx.min())}, {int(idx.max())}]; the cache was built for other data")
        B = idx.shape[0]
        if out is None:
            out = self._empty(B)
        shard, row = idx // self.shard_size, idx % self.shard_size
        uniq = torch.unique(shard).tolist()
        # torch's gathers run without the GIL, so page faults of a cold cache do not stall the step
        for j in uniq:
            maps = self._shard(int(view), int(j))
            if len(uniq) == 1:
                for f in self.serve:
                    torch.index_select(maps[f], 0, row, out=out[f])
            else:
                sel = (shard == j).nonzero().squeeze(1)
                r = row.index_select(0, sel)
                for f in self.serve:
                    out[f].index_copy_(0, sel, maps[f].index_select(0, r))
        return out

    def _empty(self, B: int) -> dict[str, torch.Tensor]:
        pin = self.device.type == "cuda"
        return {f: torch.empty((B, *self.fields[f]["shape"]), dtype=self._dtypes[f], pin_memory=pin)
                for f in self.serve}

    # -- prefetch -----------------------------------------------------------------------------------
    def prefetch_epoch(self, batches: Iterable[torch.Tensor], view: int) -> None:
        """Announce the epoch's id batches (in training order): the next ``__call__``s with this view
        consume them in order. ``batches``: the sampler's ``EpochBatches`` (its ``host()`` ids are used, so
        nothing is read back from the device) or any iterable of id tensors.

        Threaded mode (default on CUDA): a background thread gathers each batch into a slot of a pinned
        host ring (``_Ring``: two slots on CUDA, double buffering), starts its host→device copy on a side
        CUDA stream at once and queues (ids, device tensors, copy event) up to ``prefetch`` batches ahead;
        the step's stream waits on the event (``ready``), never the host. A slot is gathered into again only
        after the copy that read it has finished. Inline mode (default on a CPU device) gathers each batch
        when it is asked for."""
        self.stop_prefetch()
        host = batches.host() if hasattr(batches, "host") else batches
        if not self.threaded:
            self._pf = {"iter": iter(host), "view": int(view)}
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch_depth)
        stop = threading.Event()
        cuda = self.device.type == "cuda"
        # CUDA: the producer frees a slot once its copy is done (2 slots); CPU: the consumer frees it after
        # converting the records (copies), so the queue's depth plus the one being gathered
        ring = _Ring(2 if cuda else self.prefetch_depth + 2, stop)
        side = torch.cuda.Stream(self.device) if cuda else None
        if cuda:  # ids made on the step's stream before now (e.g. a bench's batch) are readable on `side`
            side.wait_stream(torch.cuda.current_stream(self.device))

        def work():
            if cuda:
                torch.cuda.set_device(self.device)
            for ids in host:
                if stop.is_set():
                    return
                ids_cpu = _read_ids(ids, side)
                slot = ring.acquire(lambda b=ids_cpu.shape[0]: self._empty(b), ids_cpu.shape[0])
                if slot is None:
                    return
                k, bufs = slot
                self.load(ids_cpu, view, out=bufs)
                if cuda:
                    with torch.cuda.stream(side):
                        dev = {f: t.to(self.device, non_blocking=True) for f, t in bufs.items()}
                        ids_dev = ids_cpu.pin_memory().to(self.device, non_blocking=True)
                        ev = torch.cuda.Event()
                        ev.record(side)
                    ring.release(k, ev)  # reusable once this copy has read it
                    item = (ids_cpu, ids_dev, dev, ev, None)
                else:
                    item = (ids_cpu, ids_cpu, bufs, None, k)  # the consumer frees slot k
                if not offer(q, item, stop):
                    return

        th = threading.Thread(target=produce, args=(q, stop, work), name="fastkd-cache-prefetch",
                              daemon=True)
        self._pf = {"queue": q, "stop": stop, "thread": th, "view": int(view), "ring": ring}
        th.start()

    def stop_prefetch(self) -> None:
        pf, self._pf = self._pf, None
        self._ready = None
        if pf is not None and "thread" in pf:
            pf["stop"].set()
            pf["thread"].join(timeout=5.0)

    close = stop_prefetch

    def __del__(self):
        try:
            self.stop_prefetch()
        except Exception:
            pass

    def _from_prefetch(self, ids: torch.Tensor, view: int):
        """The next announced batch's records if ``ids`` is that batch: CPU tensors (inline, or a CPU
        device: converted copies) or device tensors the current stream has been made to wait for; None
        when there is no prefetch for this view or ``ids`` is not the next batch (prefetch stops)."""
        pf = self._pf
        if pf is None:
            return None
        if pf["view"] != int(view):
            self.stop_prefetch()
            return None
        if "iter" in pf:  # inline mode (host ids on a CPU device)
            nxt = next(pf["iter"], None)
            item = END if nxt is None else (nxt, nxt, None, None, None)
        else:
            item = pf["queue"].get()
        if item is END:
            self._pf = None
            return None
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            self._pf = None
            raise item[1]
        ids_cpu, ids_pf, recs, ev, slot = item
        if ids_pf.shape != ids.shape:
            self.stop_prefetch()
            return None
        if ev is not None:  # CUDA: the step's stream waits for the copy; the allocator, for the step
            cur = torch.cuda.current_stream(self.device)
            cur.wait_event(ev)
            for t in (ids_pf, *recs.values()):
                t.record_stream(cur)
        if ids.device.type == "cpu":  # a host comparison: no sync (the ids are host tensors)
            try:
                torch._assert_async((ids_pf.to(torch.int64) == ids.to(torch.int64)).all())
            except RuntimeError:
                self.stop_prefetch()
                return None
        else:  # on the device: an asynchronous assert, no sync (the announced order is the contract)
            torch._assert_async((ids_pf == ids.to(torch.int64)).all())
        self.prefetched += 1
        if recs is None:  # inline mode: gather now
            return self.load(ids_cpu, view)
        if ev is not None:
            return recs
        out = {f: _convert(t, copy=True) for f, t in recs.items()}  # CPU ring slot: copy out, then free
        pf["ring"].release(slot, None)
        return out

    # -- the teacher interface ----------------------------------------------------------------------
    def compile(self, **kwargs) -> CachedTeacher:
        """Nothing to compile: the signals are read, not computed."""
        return self

    def ready(self, ids: torch.Tensor, view: int) -> None:
        """Wait for the records of ``ids`` (the host waits only if the prefetch thread is behind; on CUDA
        the current stream waits on the copy's event). The next ``__call__`` with these ids serves them."""
        t0 = time.perf_counter()
        recs = self._from_prefetch(ids, view)
        self._ready = (ids, view, recs) if recs is not None else None
        self.wait_s += time.perf_counter() - t0

    def __call__(self, x: torch.Tensor | None = None, ids: torch.Tensor | None = None,
                 view: int | None = None) -> dict[str, torch.Tensor]:
        if ids is None or view is None:
            raise ValueError(
                "CachedTeacher needs the batch's sample ids and view: teacher(x, ids=ids, view=view)"
            )
        t0 = time.perf_counter()
        rd, self._ready = self._ready, None
        if rd is not None and rd[0] is ids and rd[1] == view:
            recs = rd[2]
        else:
            recs = self._from_prefetch(ids, view)
        if recs is None:  # not announced (or out of order): gather now; on CUDA a read of the ids (sync)
            recs = self.load(_host(ids, sync_ok=True), view)
        out: dict[str, torch.Tensor] = {}
        for f, t in recs.items():
            if t.device != self.device:
                t = t.to(self.device, non_blocking=True)  # pinned (load pins when serving CUDA)
            out[f] = _convert(t)
        self.calls += 1
        self.wait_s += time.perf_counter() - t0
        return out

    def to(self, device):
        self.device = _indexed(device)
        return self

    def stats(self) -> dict[str, float]:
        return {"cache_calls": self.calls, "cache_prefetched": self.prefetched,
                "cache_wait_ms": 1e3 * self.wait_s / max(1, self.calls)}
