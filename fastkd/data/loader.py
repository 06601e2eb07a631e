"""The worker side and the main-process side of streaming: ``StreamDataset`` decodes one sample,
``StreamLoader`` turns id batches into pinned uint8 batches (see :mod:`fastkd.data.stream`), plus the
rank rules for ids (``shard_ids``, ``eval_id_batches``)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fastkd.data.folders import BadImageError, _notice, _Source


class StreamDataset(torch.utils.data.Dataset):
    """Map-style dataset over a source: ``ds[i]`` -> (uint8 [C, S, S] tensor, sample id, bad id or -1, error).

    ``bad``/``error`` report an unreadable image: with on_bad_image='skip' the pixels come from the
    substitute (the next readable id of the same class) and ``bad`` is the id that was replaced; with
    'error' ``error`` holds the one-line message, raised by the main process (never inside a worker,
    where DataLoader would wrap it in a multi-line traceback).
    """

    def __init__(
        self,
        source: _Source,
        *,
        img_size: int,
        in_chans: int,
        crop_pct: float = 1.0,
        on_bad_image: str = "error",
    ):
        if on_bad_image not in ("skip", "error"):
            raise ValueError(f"on_bad_image={on_bad_image!r}: use 'skip' or 'error'")
        if not 0.0 < crop_pct <= 1.0:
            raise ValueError(
                f"crop_pct={crop_pct!r}: use 0 < crop_pct <= 1 (1 = resize the short side to img_size)"
            )
        self.source, self.img_size, self.in_chans = source, int(img_size), int(in_chans)
        self.crop_pct, self.on_bad_image = float(crop_pct), on_bad_image
        self._class_ids: dict[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.source)

    @property
    def labels(self) -> torch.Tensor:
        return self.source.labels

    def _same_class(self, i: int) -> np.ndarray:
        if self._class_ids is None:
            lab = self.source.labels.numpy()
            order = np.argsort(lab, kind="stable")
            bounds = np.flatnonzero(np.diff(lab[order])) + 1
            self._class_ids = {int(lab[g[0]]): g for g in np.split(order, bounds) if len(g)}
        return self._class_ids[int(self.source.labels[i])]

    def _load(self, i: int) -> np.ndarray:
        return self.source.load(i, self.img_size, self.in_chans, self.crop_pct)

    def __getitem__(self, i: int):
        i = int(i)
        try:
            return torch.from_numpy(self._load(i)), i, -1, ""
        except Exception as e:
            msg = f"cannot read image {self.source.name(i)} ({type(e).__name__}: {e})"
            msg = " ".join(msg.split())
            if self.on_bad_image == "error":
                return None, i, i, f"{msg}; remove or replace the file, or pass --on-bad-image skip"
            ids = self._same_class(i)
            k = int(np.searchsorted(ids, i))
            for j in list(ids[k + 1 :]) + list(ids[:k]):
                try:
                    return torch.from_numpy(self._load(int(j))), i, i, f"{msg}; using id {int(j)} instead"
                except Exception:
                    continue
            return None, i, i, f"{msg}; no readable image left in its class {int(self.source.labels[i])}"


def _collate(items):
    """[(img, id, bad, err)] -> (x uint8 [B,C,H,W] or None, ids int64 [B], bad int64 [k], messages [k])."""
    ids = torch.tensor([it[1] for it in items], dtype=torch.int64)
    bad = [it for it in items if it[2] >= 0]
    msgs = [it[3] for it in bad]
    if any(it[0] is None for it in items):
        return None, ids, torch.tensor([it[2] for it in bad], dtype=torch.int64), msgs
    x = torch.stack([it[0] for it in items]) if items else torch.empty(0, dtype=torch.uint8)
    return x, ids, torch.tensor([it[2] for it in bad], dtype=torch.int64), msgs


def shard_ids(global_ids: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank r's share of one global batch: the r-th contiguous ``len // world`` slice (EpochSampler's rule).

    ``len(global_ids)`` must be a multiple of world (EpochSampler pads its last batch to make it so).
    """
    n = int(global_ids.numel())
    if world < 1 or not 0 <= rank < world or n % world:
        raise ValueError(
            f"shard_ids: {n} ids, rank {rank}, world {world}; need 0 <= rank < world and world | n"
        )
    k = n // world
    return global_ids[rank * k : (rank + 1) * k]


def eval_id_batches(n: int, batch_size: int, rank: int = 0, world: int = 1) -> Iterator[torch.Tensor]:
    """Val ids for sharded evaluation: global batches ``[s, s + batch_size)``, rank r takes the r-th of
    ``world`` near-equal contiguous pieces (no padding, so every id is counted exactly once over ranks;
    sum hits and counts with one all_reduce at the end). Empty pieces are not yielded."""
    for s in range(0, n, batch_size):
        g = torch.arange(s, min(n, s + batch_size), dtype=torch.int64)
        piece = torch.tensor_split(g, world)[rank]
        if piece.numel():
            yield piece


# ----------------------------------------------------------------------------------------------------
# loader (main-process side)
# ----------------------------------------------------------------------------------------------------


def default_workers(local_world: int = 1) -> int:
    """DataLoader workers per process: the usable CPUs split over the local processes, minus one for the
    main process, between 1 and 16."""
    try:
        ncpu = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        ncpu = os.cpu_count() or 1
    return max(1, min(16, ncpu // max(1, local_world) - 1))


class _IdBatches(torch.utils.data.Sampler):
    """A batch sampler whose batches are set per epoch (so persistent workers survive across epochs)."""

    def __init__(self):
        self.batches: Iterable = ()
        self.n: int | None = None

    def __iter__(self):
        for b in self.batches:
            yield [int(i) for i in (b.tolist() if isinstance(b, torch.Tensor) else b)]

    def __len__(self) -> int:
        return self.n if self.n is not None else 0


@dataclass
class StreamBatch:
    """One step's images. ``x``: uint8 [K, C, H, W] on the loader's device; ``ids``: int64 [K] (CPU) --
    the step's ids, then any extra ids (mixing partners) that were not among them; ``n_main``: how many
    of the rows are the step's own ids; ``labels``: int64 [K] (CPU).

    ``fetch(ids)`` returns the rows of any ids the batch holds, in the order asked -- pass it to
    ``augment_batch`` as its ``x_all_or_fetch`` argument.
    """

    x: torch.Tensor
    ids: torch.Tensor
    n_main: int
    labels: torch.Tensor

    def __post_init__(self):
        self._order = torch.argsort(self.ids)
        self._sorted = self.ids[self._order]

    def positions(self, ids: torch.Tensor) -> torch.Tensor:
        """int64 [k] (CPU): the row of each of ``ids`` in ``x`` (a host lookup; device ids are read back)."""
        q = ids.detach().to("cpu", torch.int64).reshape(-1)
        pos = torch.searchsorted(self._sorted, q).clamp_max(max(0, self._sorted.numel() - 1))
        if self._sorted.numel() == 0 or not bool((self._sorted[pos] == q).all()):
            missing = q[self._sorted[pos] != q][:5].tolist() if self._sorted.numel() else q[:5].tolist()
            raise ValueError(
                f"StreamBatch.fetch: ids {missing} are not in this batch; pass extra_ids= to "
                "StreamLoader.epoch so the loader fetches them (e.g. mixing partners)"
            )
        return self._order[pos]

    def fetch(self, ids: torch.Tensor) -> torch.Tensor:
        return self.x.index_select(0, self.positions(ids).to(self.x.device))


class StreamLoader:
    """Serves uint8 batches for arbitrary id lists, decoded by DataLoader workers.

    dataset: a StreamDataset (``StreamData.train`` / ``.val``).
    workers: worker processes (None -> :func:`default_workers`; 0 -> decode in the main process).
    device: where batches go (``non_blocking`` copy from pinned memory); None -> stay on the CPU.
    pin_memory: None -> True when the device is CUDA. prefetch_factor: batches prefetched per worker.
    persistent_workers: keep the workers between epochs (they keep their open shard handles).

    ``epoch(id_batches, extra_ids=None)`` yields one :class:`StreamBatch` per id batch, in order.
    ``extra_ids(ids) -> int64`` names more ids each step needs (e.g. the mixing partners from
    ``fastkd.data.augment.sample_params(...).partner``); they are decoded in the same worker batch.
    ``skipped``: ids of unreadable images replaced so far (on_bad_image='skip'); each is reported once.
    """

    def __init__(
        self,
        dataset: StreamDataset,
        *,
        workers: int | None = None,
        device: torch.device | str | None = None,
        pin_memory: bool | None = None,
        prefetch_factor: int = 4,
        persistent_workers: bool = True,
        log: Callable[[str], None] | None = _notice,
    ):
        self.dataset = dataset
        self.device = torch.device(device) if device is not None else None
        self.workers = default_workers() if workers is None else int(workers)
        if self.workers < 0:
            raise ValueError(f"workers={workers!r}: use 0 (main process) or more worker processes")
        if pin_memory is None:
            pin_memory = self.device is not None and self.device.type == "cuda"
        self.pin_memory = bool(pin_memory)
        self.log = log
        self.skipped: set[int] = set()
        self._sampler = _IdBatches()
        kw = {}
        if self.workers > 0:
            kw = dict(
                prefetch_factor=max(1, int(prefetch_factor)),
                persistent_workers=bool(persistent_workers),
                worker_init_fn=_worker_init,
            )
        self._dl = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=self._sampler,
            num_workers=self.workers,
            collate_fn=_collate,
            pin_memory=self.pin_memory,
            # each epoch's iterator draws the workers' base seed from this generator, not from torch's
            # global one: streaming a dataset (or decoding it into memory) must not move the run's RNG, or
            # the student's init and every random draw after it depend on --memory-threshold / --workers
            generator=torch.Generator().manual_seed(0),
            **kw,
        )

    def epoch(
        self,
        id_batches: Iterable[torch.Tensor | Sequence[int]],
        extra_ids: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> Iterator[StreamBatch]:
        mains: list[int] = []

        def with_extra():
            for b in id_batches:
                b = torch.as_tensor(b, dtype=torch.int64).reshape(-1)
                mains.append(int(b.numel()))
                if extra_ids is not None:
                    e = torch.as_tensor(extra_ids(b), dtype=torch.int64).reshape(-1).unique()
                    e = e[~torch.isin(e, b)]
                    b = torch.cat([b, e])
                yield b

        self._sampler.batches = with_extra()
        self._sampler.n = len(id_batches) if hasattr(id_batches, "__len__") else None
        labels = self.dataset.labels
        for k, (x, ids, bad, msgs) in enumerate(self._dl):
            for b, m in zip(bad.tolist(), msgs, strict=True):
                if x is None:
                    raise BadImageError(m)
                if b not in self.skipped:
                    self.skipped.add(b)
                    if self.log is not None:
                        self.log(f"skipped: {m}")
            if self.device is not None:
                x = x.to(self.device, non_blocking=True)
            yield StreamBatch(x=x, ids=ids, n_main=mains[k], labels=labels[ids])

    def close(self) -> None:
        """Stop the worker processes (they also stop when the loader is garbage collected)."""
        it = getattr(self._dl, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._dl._iterator = None


def _worker_init(_wid: int) -> None:
    torch.set_num_threads(1)  # PIL does the work; torch threads per worker only oversubscribe cores
    # Ctrl-C / SIGTERM reach the whole process group: the main process decides (``fastkd.stop``: a
    # checkpoint at the next step, which may still need a batch), then shuts the workers down itself
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
