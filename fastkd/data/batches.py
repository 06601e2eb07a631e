"""``TrainBatches``: (ids, view) → an augmented batch on the device; ``val_batches``: this rank's val share.

The one place the trainer and the cache builder make training images, so a cache replays exactly the
images the run will see (augmentation is a pure function of (seed, view, sample id)).

The device never holds the dataset. One epoch is announced ahead (``start_epoch(id_batches, view)``,
host id lists from the sampler's permutation) and each step's rows -- its ids, then, when mixing, their
partners (computed on the host from the same hash the device uses) -- are prepared before the step asks:

- in memory (digits, .npz, small folders/shards) the uint8 split stays in host memory; on CUDA a
  background thread gathers each step's rows into a ring of pinned buffers and copies them, with their
  ids, on a side stream (``_MemoryLoader``); the step's stream only waits on the copy's event;
- streamed (``Dataset.stream``), a :class:`~fastkd.data.loader.StreamLoader` decodes the rows in worker
  processes; their positions are looked up on the host and copied up from pinned memory.

The step itself then draws the augmentation parameters on the device from its *device* ids (no host
read, no pageable copy), and asks for its rows: :class:`Prepared` serves them and checks, by an
asynchronous device-side assert, that the ids (and the device-drawn partners) are the ones the host
prepared. A call for ids that were not announced (tests, one-off batches) is fetched directly.

``wait_s``: host seconds spent waiting for a prepared batch (the loader's data-wait time).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator

import torch

from fastkd.data.augment import AugmentConfig, augment_batch, check_labels
from fastkd.data.augparams import sample_params
from fastkd.data.datasets import Dataset
from fastkd.data.loader import StreamBatch, StreamLoader, default_workers, eval_id_batches
from fastkd.data.pinned import END, Ring, offer, produce


def _workers(workers: int | None) -> int:
    """--workers, else the usable CPUs split over this node's processes (torchrun's LOCAL_WORLD_SIZE)."""
    return workers if workers is not None else default_workers(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))

__all__ = ["Prepared", "TrainBatches", "val_batches"]


class Prepared:
    """One step's rows, prepared ahead. ``x``: uint8 [K, C, H, W] on the device; ``want``: int64 on the
    device, the ids augment will ask for, in order (the step's ``n_main`` ids, then their partners when
    mixing); ``sel``: None when ``x``'s rows are ``want`` in order, else int64 positions into ``x`` on the
    device (streamed rows hold each id once); ``ids``: ``x``'s row ids on the host (fallback lookups)."""

    def __init__(self, x, want, n_main: int, ids, labels, sel=None):
        self.x, self.want, self.n_main, self.sel = x, want, int(n_main), sel
        self.ids, self.labels = ids, labels
        self._served = 0

    def fetch(self, q: torch.Tensor) -> torch.Tensor:
        """augment asks for the step's ids, then (mixing) their partners: serve the prepared rows, checked
        by an asynchronous device-side assert (no host read); any other ids: a host lookup."""
        n, k = self.n_main, self._served
        lo, hi = (0, n) if k == 0 else (n, self.want.shape[0])
        ref = self.want[lo:hi] if k < 2 and hi > lo else None
        if ref is None or q.shape != ref.shape or q.device != ref.device:
            return StreamBatch(x=self.x, ids=self.ids, n_main=n, labels=self.labels).fetch(q)
        ok = (q.to(torch.int64) == ref).all()
        if q.device.type == "cpu":
            torch._assert_async(ok, "fetch: ids differ from the batch the loader prepared")
        else:  # no message on a device (CUDA's assert kernel takes none); a mismatch stops the run
            torch._assert_async(ok)
        self._served += 1
        return self.x[lo:hi] if self.sel is None else self.x.index_select(0, self.sel[lo:hi])


def _rows(b, extra_ids) -> tuple[torch.Tensor, int]:
    """(host int64 [n (+ n)]: the batch's ids then their partners, n)."""
    b = (b if isinstance(b, torch.Tensor) else torch.as_tensor(b)).reshape(-1).to(torch.int64)
    if b.device.type != "cpu":  # device ids from a caller: one read back (the sampler offers host ids)
        b = b.cpu()
    if extra_ids is None:
        return b, b.shape[0]
    return torch.cat([b, torch.as_tensor(extra_ids(b), dtype=torch.int64).reshape(-1)]), b.shape[0]


class _MemoryLoader:
    """StreamLoader's ``epoch`` over a host uint8 tensor. On a CPU device each batch is gathered when it
    is asked for. On CUDA a background thread gathers each batch's rows into a slot of a pinned ring
    (``Ring``: a slot is refilled only after the copy that read it has completed) and copies rows and
    ids on a side stream, up to ``depth`` batches ahead; the consumer's stream waits on the copy event."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor, device: torch.device, depth: int = 2,
                 threaded: bool | None = None):
        self.x, self.labels, self.device = x, labels, device
        self.cuda = device.type == "cuda"
        self.depth = depth
        # CPU threaded mode (tests): the same producer, its slot copied out instead of uploaded
        self.threaded = self.cuda if threaded is None else bool(threaded)

    def epoch(self, id_batches, extra_ids=None, ahead: bool = True) -> Iterator[Prepared]:
        """``ahead=False``: gather each batch when asked, in this thread (one-off batches; a CPU device)."""
        if ahead and self.threaded:
            yield from self._threaded(id_batches, extra_ids)
            return
        for b in id_batches:
            rows, n = _rows(b, extra_ids)
            x, want = self.x.index_select(0, rows), rows
            if x.device != self.device:  # a direct batch for a CUDA step (pageable copies: not the hot path)
                x, want = x.to(self.device), rows.to(self.device)
            yield Prepared(x, want, n, rows, self.labels)

    def _threaded(self, id_batches, extra_ids) -> Iterator[Prepared]:
        q: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        ring = Ring(self.depth + 1, stop)  # the queue's batches + the one being gathered
        side = torch.cuda.Stream(self.device) if self.cuda else None
        if self.cuda:
            side.wait_stream(torch.cuda.current_stream(self.device))
        shape = tuple(self.x.shape[1:])

        def make(k: int) -> dict[str, torch.Tensor]:
            return {"x": torch.empty((k, *shape), dtype=torch.uint8, pin_memory=self.cuda),
                    "ids": torch.empty(k, dtype=torch.int64, pin_memory=self.cuda)}

        def upload(bufs):
            if not self.cuda:  # the consumer gets copies: the slot is free at once
                return bufs["x"].clone(), bufs["ids"].clone(), None
            with torch.cuda.stream(side):
                x = bufs["x"].to(self.device, non_blocking=True)
                want = bufs["ids"].to(self.device, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(side)
            return x, want, ev

        def work():
            if self.cuda:
                torch.cuda.set_device(self.device)
            for b in id_batches:
                if stop.is_set():
                    return
                rows, n = _rows(b, extra_ids)
                slot = ring.acquire(lambda k=rows.shape[0]: make(k), rows.shape[0])
                if slot is None:
                    return
                k, bufs = slot
                torch.index_select(self.x, 0, rows, out=bufs["x"])
                bufs["ids"].copy_(rows)
                x, want, ev = upload(bufs)
                ring.release(k, ev)  # reusable once this copy has read it
                if not offer(q, (x, want, n, rows, ev), stop):
                    return

        th = threading.Thread(target=produce, args=(q, stop, work), name="fastkd-batch-prefetch",
                              daemon=True)
        th.start()
        try:
            while True:
                item = q.get()
                if item is END:
                    return
                if len(item) == 2:
                    raise item[1]
                x, want, n, rows, ev = item
                if ev is not None:
                    cur = torch.cuda.current_stream(self.device)
                    cur.wait_event(ev)  # the step's stream waits for the copy; the host never does
                    x.record_stream(cur)
                    want.record_stream(cur)
                yield Prepared(x, want, n, rows, self.labels)
        finally:
            stop.set()
            th.join(timeout=5.0)

    def close(self) -> None:
        pass


class TrainBatches:
    def __init__(
        self, data: Dataset, aug: AugmentConfig, seed: int, device: torch.device, *,
        workers: int | None = None,
    ):
        self.data, self.aug, self.seed, self.device = data, aug, seed, torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # exact device comparisons
            self.device = torch.device("cuda", torch.cuda.current_device())
        # labels (8 bytes a sample) on the device: augment gathers them there without a host sync
        self.y_train = data.y_train.to(self.device)
        check_labels(self.y_train, data.num_classes)
        if data.stream is None:
            self.loader = _MemoryLoader(data.x_train, data.y_train, self.device)
        else:
            self.loader = StreamLoader(data.stream.train, workers=_workers(workers), device=self.device)
        self._it: Iterator[Prepared] | None = None
        self.wait_s = 0.0
        c, s = data.in_chans, data.img_size
        self._shape = (c, s, s)

    def partners(self, ids: torch.Tensor, view: int) -> torch.Tensor:
        """The mixing partners of ``ids`` in ``view`` (CPU ids; the loader fetches them with the batch)."""
        c, h, w = self._shape
        n = int(self.data.y_train.shape[0])
        return sample_params(
            ids, seed=self.seed, view=view, cfg=self.aug, n=n, channels=c, height=h, width=w
        ).partner

    def _extra(self, view: int):
        if not (self.aug.mixing and self.data.y_train.shape[0] > 1):
            return None
        return lambda b: self.partners(b, view)

    def start_epoch(self, id_batches: Iterable, view: int) -> None:
        """Announce the epoch's id batches (CPU), so the loader prepares them ahead, in order. A sampler's
        epoch that yields device ids offers the same ids on the host (``.host()``): those are used."""
        if hasattr(id_batches, "host"):
            id_batches = id_batches.host()
        self._close_epoch()
        self._it = self._epoch(id_batches, view, ahead=True)

    def _epoch(self, id_batches: Iterable, view: int, *, ahead: bool) -> Iterator[Prepared]:
        extra = self._extra(view)
        if self.data.stream is None:
            return self.loader.epoch(id_batches, extra_ids=extra, ahead=ahead)
        return self._stream_epoch(id_batches, extra)

    def _stream_epoch(self, id_batches: Iterable, extra) -> Iterator[Prepared]:
        """The StreamLoader's batches as ``Prepared``: the partners the loader asked for (in the order it
        asked, ahead of the consumer) and every wanted id's row position, copied up from pinned memory."""
        pending: deque[torch.Tensor] = deque()

        def record(b: torch.Tensor) -> torch.Tensor:
            p = torch.as_tensor(extra(b), dtype=torch.int64).reshape(-1)
            pending.append(p)
            return p

        pin = self.device.type == "cuda"
        for sb in self.loader.epoch(id_batches, extra_ids=record if extra is not None else None):
            want = sb.ids[: sb.n_main]
            if extra is not None:
                want = torch.cat([want, pending.popleft()])
            meta = torch.stack([want, sb.positions(want)])
            if pin:
                meta = meta.pin_memory()
            meta = meta.to(self.device, non_blocking=True)
            yield Prepared(sb.x, meta[0], sb.n_main, sb.ids, sb.labels, sel=meta[1])

    def _close_epoch(self) -> None:
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            it.close()  # stops a prefetch thread

    def _next(self, ids: torch.Tensor, view: int) -> Prepared:
        t0 = time.perf_counter()
        b = next(self._it, None) if self._it is not None else None
        if b is None or b.n_main != ids.numel():  # not announced (or the epoch ran out): fetch directly
            self._close_epoch()
            cpu = ids.detach().reshape(-1).to(torch.int64)
            if cpu.device.type != "cpu":  # device ids: the host gathers (one copy, a sync on CUDA)
                cpu = cpu.cpu()
            b = next(self._epoch([cpu], view, ahead=False))
        self.wait_s += time.perf_counter() - t0
        return b

    def __call__(self, ids: torch.Tensor, view: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x normalised [B, C, H, W], y_soft [B, num_classes], y_hard [B]) of samples ``ids`` in ``view``.

        The augmentation parameters are drawn on ``ids``' device: pass device ids (the sampler's) and the
        step reads nothing back; host ids are copied up first."""
        d = self.data
        b = self._next(ids, view)
        if ids.device != self.device:
            ids = ids.to(self.device, non_blocking=True)
        return augment_batch(
            b.fetch,
            self.y_train,
            ids,
            seed=self.seed,
            view=view,
            cfg=self.aug,
            num_classes=d.num_classes,
            mean=d.mean,
            std=d.std,
            device=self.device,
        )

    def close(self) -> None:
        self._close_epoch()
        self.loader.close()


def val_batches(
    data: Dataset, device: torch.device, batch_size: int = 512, rank: int = 0, world: int = 1,
    *, workers: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images [k, C, H, W] on device, labels int64 [k] on device) of this rank's share of the val
    split (``eval_id_batches``: every id counted once over the ranks), from memory or streamed."""
    device = torch.device(device)
    batches = list(eval_id_batches(len(data.y_val), batch_size, rank, world))
    if data.stream is None:
        for ids in batches:
            lo, hi = int(ids[0]), int(ids[-1]) + 1  # contiguous
            yield data.x_val[lo:hi].to(device, non_blocking=True), data.y_val[lo:hi].to(device)
        return
    ld = StreamLoader(data.stream.val, workers=_workers(workers), device=device, persistent_workers=False)
    try:
        for b in ld.epoch(batches):
            yield b.x, b.labels.to(device)
    finally:
        ld.close()
