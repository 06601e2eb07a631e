"""``TrainBatches``: (ids, view) → an augmented batch on the device; ``val_batches``: this rank's val share.

The one place the trainer and the cache builder make training images, so a cache replays exactly the
images the run will see (augmentation is a pure function of (seed, view, sample id)).

The device never holds the dataset. In memory (digits, .npz, small folders/shards) the uint8 split
stays on the CPU (pinned when the device is CUDA) and each step gathers its rows (the step's ids and
their mixing partners) into a pinned buffer and copies them with ``non_blocking=True``. Streamed
(``Dataset.stream``), a :class:`~fastkd.data.loader.StreamLoader` decodes the same rows in worker
processes. Either way one epoch is announced ahead (``start_epoch(id_batches, view)``, CPU id lists
from the sampler's permutation) so the next batches are prepared while the device computes; a call
for ids that were not announced (tests, one-off batches) fetches them directly.

``wait_s``: host seconds spent waiting for a prepared batch (the loader's data-wait time).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator

import torch

from fastkd.data.augment import AugmentConfig, augment_batch, check_labels
from fastkd.data.augparams import sample_params
from fastkd.data.datasets import Dataset
from fastkd.data.loader import StreamBatch, StreamLoader, default_workers, eval_id_batches


def _workers(workers: int | None) -> int:
    """--workers, else the usable CPUs split over this node's processes (torchrun's LOCAL_WORLD_SIZE)."""
    return workers if workers is not None else default_workers(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))

__all__ = ["TrainBatches", "val_batches"]


class _Rows:
    """A prepared memory batch: device rows of the step's ids, then (when mixing) of their partners, in
    the order augment asks for them. ``fetch`` recognises the two id lists by value on the host (no
    device sync) and falls back to a lookup for any other ids of the batch."""

    def __init__(self, x: torch.Tensor, ids: torch.Tensor, partners: torch.Tensor | None, labels):
        self.x, self.main, self.partners, self.n_main = x, ids, partners, int(ids.shape[0])
        self.ids = ids if partners is None else torch.cat([ids, partners])
        self.labels = labels
        self._served = 0

    def fetch(self, q: torch.Tensor) -> torch.Tensor:
        """augment asks for the batch's ids, then (mixing) their partners, in that order: serve the
        prepared rows, checked by a device-side assert (no host read); any other ids: a lookup."""
        n = self.n_main
        ref, lo = (self.main, 0) if self._served == 0 else (self.partners, n)
        if ref is None or q.shape != ref.shape or q.device != ref.device:
            return StreamBatch(x=self.x, ids=self.ids, n_main=n, labels=self.labels).fetch(q)
        if q is not ref:
            torch._assert_async((q == ref).all(), "fetch: ids differ from the batch the loader prepared")
        self._served += 1
        return self.x[lo : lo + n]


class _MemoryLoader:
    """StreamLoader's ``epoch`` over a CPU uint8 tensor: gather rows into a ring of pinned buffers,
    ``non_blocking`` copy to the device. A buffer is reused only after its copy has completed."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor, device: torch.device, ring: int = 3):
        self.x, self.labels, self.device = x, labels, device
        self.cuda = device.type == "cuda"
        self.x_src = x.pin_memory() if self.cuda and not x.is_pinned() else x
        self._bufs: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []
        self._k, self._ring = 0, ring
        self._row = x[0].numel()

    def _gather(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.cuda:
            return self.x_src.index_select(0, ids)
        k = ids.shape[0]
        shape = (k, *self.x.shape[1:])
        if len(self._bufs) < self._ring:
            self._bufs.append((torch.empty(0, dtype=torch.uint8).pin_memory(), None))
        i = self._k % self._ring
        self._k += 1
        buf, ev = self._bufs[i]
        if ev is not None:
            ev.synchronize()  # the copy out of this buffer (``ring`` steps ago) is done
        if buf.numel() < k * self._row:
            buf = torch.empty(k * self._row, dtype=torch.uint8).pin_memory()
        out = buf[: k * self._row].view(shape)
        torch.index_select(self.x_src, 0, ids, out=out)
        x = out.to(self.device, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self._bufs[i] = (buf, ev)
        return x

    def epoch(self, id_batches, extra_ids=None) -> Iterator[_Rows]:
        for b in id_batches:
            b = (b if isinstance(b, torch.Tensor) else torch.as_tensor(b)).reshape(-1).to(torch.int64)
            if b.device.type != "cpu":  # device ids from the sampler: one copy per batch
                b = b.cpu()
            p = extra_ids(b) if extra_ids is not None else None
            rows = b if p is None else torch.cat([b, p])
            yield _Rows(self._gather(rows), b, p, self.labels)

    def close(self) -> None:
        pass


class TrainBatches:
    def __init__(
        self, data: Dataset, aug: AugmentConfig, seed: int, device: torch.device, *,
        workers: int | None = None,
    ):
        self.data, self.aug, self.seed, self.device = data, aug, seed, torch.device(device)
        # labels (8 bytes a sample) on the device: augment gathers them there without a host sync
        self.y_train = data.y_train.to(self.device)
        check_labels(self.y_train, data.num_classes)
        if data.stream is None:
            self.loader = _MemoryLoader(data.x_train, data.y_train, self.device)
        else:
            self.loader = StreamLoader(data.stream.train, workers=_workers(workers), device=self.device)
        self._it: Iterator[StreamBatch] | None = None
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
        self._it = iter(self.loader.epoch(id_batches, extra_ids=self._extra(view)))

    def _next(self, ids: torch.Tensor, view: int) -> StreamBatch:
        t0 = time.perf_counter()
        b = next(self._it, None) if self._it is not None else None
        if b is None or b.n_main != ids.numel():  # not announced (or the epoch ran out): fetch directly
            self._it = None
            cpu = ids.detach().reshape(-1).to(torch.int64)
            if cpu.device.type != "cpu":  # device ids: the host gathers (one copy, a sync on CUDA)
                cpu = cpu.cpu()
            b = next(iter(self.loader.epoch([cpu], extra_ids=self._extra(view))))
        self.wait_s += time.perf_counter() - t0
        return b

    def __call__(self, ids: torch.Tensor, view: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x normalised [B, C, H, W], y_soft [B, num_classes], y_hard [B]) of samples ``ids`` in ``view``."""
        d = self.data
        b = self._next(ids, view)
        return augment_batch(
            b.fetch,
            self.y_train,
            b.ids[: b.n_main],
            seed=self.seed,
            view=view,
            cfg=self.aug,
            num_classes=d.num_classes,
            mean=d.mean,
            std=d.std,
            device=self.device,
        )

    def close(self) -> None:
        self._it = None
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
