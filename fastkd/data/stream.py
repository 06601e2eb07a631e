"""Streaming image datasets: image folders and tar shards of any size, decoded by DataLoader workers.

Nothing here holds the dataset in memory or on the device. A *source* is an index of samples built
without decoding any image; a :class:`StreamDataset` decodes one sample on demand; a
:class:`StreamLoader` turns the trainer's id batches into uint8 ``[B, C, H, W]`` batches made by
worker processes (pinned, prefetched, persistent workers) and copies them with ``non_blocking=True``.

Sources (``open_stream(spec, ...)``):

* ``DIR`` -- ``DIR/train/<class>/...`` and ``DIR/val/<class>/...`` (JPEG/PNG/WebP/...; any depth under a
  class folder). Indexed by a file scan: classes are the sorted class folders, samples are sorted by
  their relative path's components, and **the sample id is the index in that sorted list**. The scan
  follows symlinks but never enters a directory it has already visited (by device + inode), so a
  symlink cycle lists each image once.
* ``'shards/train-{0000..0099}.tar'`` (+ a val pattern) -- webdataset layout: members ``<key>.<ext>``
  grouped by ``key`` (the member path up to the first dot of its file name), one image member
  (jpg/jpeg/png/webp/...) and one ``.cls`` member (the class id as text) per sample. The stable key of
  a sample is ``<shard file name>/<member key>``; **the sample id is the index in the sorted key list**.
  The index holds (shard, byte offset, size) of each image member, read once from the tar headers
  (``tarfile`` gives the offsets), so a worker reads any sample by ``seek`` + ``read``: random access
  for the deterministic sampler. (timm's tar readers give no byte offsets and no webdataset labels,
  and its webdataset reader is iterable-only, so this reader is written with the stdlib ``tarfile``.)
* ``synthetic:N`` -- N random uint8 training images at ``img_size`` (N // 10, at least 1, for val),
  ``num_classes`` classes; pixels and labels are a pure function of (seed, split, id). No disk.

Fingerprints never read image bytes. A folder's is the sha256 of (relative path, size, mtime_ns,
label) of every file plus the class names; a shard set's is the sha256 of (key, label, image member
size) of every sample plus the class count. So fingerprinting a 1.3M-image tree costs one ``stat``
per file, not one read. ``StreamData.fingerprint`` adds the decode settings (img_size, channels,
crop_pct) because the pixels depend on them.

Decoding (in the workers): PIL opens the file, JPEGs use ``draft`` (DCT-domain downscale, never below
the target), the image is converted to the dataset's channel count (grayscale, palette, 16-bit and
RGBA images included: alpha is dropped), its short side is resized (bilinear, antialiased) to
``round(img_size / crop_pct)`` and the centre ``img_size x img_size`` is cut. This is the same for
train and val and involves no randomness: every random decision (shift/crop, flip, erase, mixup,
cutmix) stays in fastkd's batched on-device augmentation, a pure function of (seed, view, sample id),
so a teacher cache replays it exactly.

Bad images: ``on_bad_image='error'`` (default) stops with one line naming the file. ``'skip'`` replaces
the unreadable sample by the next readable sample *of the same class* (cyclically, in id order): the
label of the id is then still right, so the labels array, the augmentation and a teacher cache need
not know which files were bad, and the choice is a pure function of the id (same in every epoch, every
worker, every run). Each skipped file is named once, in one line, by the main process; the count is
``StreamLoader.skipped``.

Distributed: the loader serves whatever id lists it is given. fastkd's ``EpochSampler`` already gives
rank r the r-th contiguous ``batch_size // world`` slice of every global batch; :func:`shard_ids` is
that same rule, and :func:`eval_id_batches` splits the val set the same way (without padding) for
sharded evaluation.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from fastkd.data.folders import (
    _EXPECTED,
    DEFAULT_MEMORY_THRESHOLD,
    IMG_EXTENSIONS,
    BadImageError,
    FolderSource,
    SyntheticSource,
    _notice,
    _peek_channels,
    hold_out,
)
from fastkd.data.loader import (
    StreamBatch,
    StreamDataset,
    StreamLoader,
    default_workers,
    eval_id_batches,
    shard_ids,
)
from fastkd.data.shards import TarSource, expand_braces

__all__ = [
    "IMG_EXTENSIONS",
    "BadImageError",
    "FolderSource",
    "StreamBatch",
    "StreamData",
    "StreamDataset",
    "StreamLoader",
    "SyntheticSource",
    "TarSource",
    "bench",
    "default_workers",
    "estimate_mean_std",
    "eval_id_batches",
    "expand_braces",
    "is_stream_spec",
    "materialize",
    "open_stream",
    "plan_storage",
    "shard_ids",
]


# ----------------------------------------------------------------------------------------------------
# the data description the trainer sees
# ----------------------------------------------------------------------------------------------------


@dataclass(repr=False)
class StreamData:
    """Both splits of a streamed dataset plus what the trainer needs to know without decoding anything.

    train / val: StreamDatasets; y_train / y_val: int64 labels (CPU, from the index); num_classes,
    class_names, in_chans, img_size, crop_pct, name, kind ('folder' | 'tar' | 'synthetic');
    fingerprint: sha256 of both splits' list fingerprints + the decode settings (no image bytes read).
    """

    train: StreamDataset
    val: StreamDataset
    num_classes: int
    class_names: list[str]
    in_chans: int
    img_size: int
    crop_pct: float
    name: str
    kind: str
    fingerprint: str = field(default="")

    @property
    def y_train(self) -> torch.Tensor:
        return self.train.labels

    @property
    def y_val(self) -> torch.Tensor:
        return self.val.labels

    def decoded_bytes(self) -> int:
        """uint8 bytes both splits take once decoded at img_size (what in-memory storage would cost)."""
        return (len(self.train) + len(self.val)) * self.in_chans * self.img_size * self.img_size

    def __repr__(self) -> str:
        return (
            f"StreamData({self.name!r} [{self.kind}]: train {len(self.train)}, val {len(self.val)}, "
            f"{self.num_classes} classes, {self.in_chans}x{self.img_size}x{self.img_size}, "
            f"fingerprint {self.fingerprint[:12]})"
        )


def is_stream_spec(spec: str) -> bool:
    """True for the specs this module opens: ``synthetic:N``, a directory, or a ``.tar`` pattern/file."""
    s = str(spec)
    return s.startswith("synthetic:") or os.path.isdir(s) or ".tar" in s.lower()


def _check_size(img_size) -> int:
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
        raise ValueError(f"img_size={img_size!r}: streamed data needs --img-size, a positive int (e.g. 224)")
    return img_size


def _peek_channels_of(src) -> list:
    step = max(1, len(src) // 64)
    return [(lambda i=i: src.open(i)) for i in range(0, len(src), step)][:64]


def _peek_both(tr, va) -> int:
    """1 when up to 64 peeked headers of each split are all grayscale, else 3 (any colour image wins)."""
    return _peek_channels(_peek_channels_of(tr) + _peek_channels_of(va))


def _has_subdirs(path: str) -> bool:
    with os.scandir(path) as it:
        return any(e.is_dir() and not e.name.startswith(".") for e in it)


def _held_out(spec: str, pool, fraction: float, log):
    tr, va = hold_out(pool, fraction)
    if not len(va):
        raise ValueError(f"--data {spec}: --val-fraction {fraction:g} holds out no image (every class has a "
                         "single image); give the classes more images, or a val split")
    if log is not None:
        log(f"{spec}: no val split given: {len(va)} of {len(pool)} images held out as val ({fraction:g} of "
            "each class, chosen by a hash of each file's name)")
    return tr, va


def open_stream(
    spec: str,
    *,
    img_size: int,
    val_spec: str | None = None,
    val_fraction: float | None = None,
    in_chans: int | None = None,
    num_classes: int | None = None,
    crop_pct: float = 1.0,
    val_crop_pct: float | None = None,
    on_bad_image: str = "error",
    seed: int = 0,
    index_cache: str | None = None,
    log: Callable[[str], None] | None = _notice,
) -> StreamData:
    """Index a streamed dataset (nothing is decoded).

    spec: ``DIR`` (train/ + val/), a tar pattern (``val_spec``: the val shards), or ``synthetic:N``.
    val_fraction: a folder without val/ (class folders in train/ or in ``DIR`` itself) or shards without
        ``val_spec``: hold out this share of each class as val (``folders.hold_out``).
    img_size: square side every image is decoded to (short side resized to img_size / crop_pct,
        centre crop); ``val_crop_pct`` (None: ``crop_pct``) the val split's own (timm / DeiT evaluate
        ImageNet at 0.875: short side to img_size / 0.875, centre crop). in_chans: 1 or 3; None -> 1
        if up to 64 peeked image headers are all grayscale,
        else 3 (synthetic: 3). num_classes: synthetic only (default 10); shards take max label + 1 over
        both splits. on_bad_image: 'error' | 'skip' (see the module doc). seed: synthetic pixels/labels.
    index_cache: folder for tar shard indexes (see TarSource); None -> index the headers every time.
    Raises FileNotFoundError / ValueError with one line naming the fix.
    """
    spec = str(spec)
    size = _check_size(img_size)
    if in_chans not in (None, 1, 3):
        raise ValueError(f"in_chans={in_chans!r}: use 1 (grayscale) or 3 (RGB)")
    if spec.startswith("synthetic:"):
        m = re.fullmatch(r"synthetic:(\d+)", spec)
        if not m or int(m.group(1)) < 1:
            raise ValueError(
                f"--data {spec}: use synthetic:N with N >= 1 training images (e.g. synthetic:50000)"
            )
        n = int(m.group(1))
        c = 10 if num_classes is None else int(num_classes)
        if c < 1:
            raise ValueError(f"num_classes={num_classes!r}: synthetic data needs at least 1 class")
        tr = SyntheticSource(n, num_classes=c, seed=seed, split=0)
        va = SyntheticSource(max(1, n // 10), num_classes=c, seed=seed, split=1)
        chans, names, kind, name = in_chans or 3, [str(i) for i in range(c)], "synthetic", spec
    elif os.path.isdir(spec):
        missing = [s for s in ("train", "val") if not os.path.isdir(os.path.join(spec, s))]
        if not missing and val_fraction:
            raise ValueError(f"--data {spec} has its own val/ split; drop --val-fraction")
        if missing and not (val_fraction and "val" in missing):
            fix = _EXPECTED
            if "val" in missing and ("train" not in missing or _has_subdirs(spec)):  # class folders, no val
                fix = "add --val-fraction 0.1 to hold out 10% of each class as val, or make train/ and val/"
            where = " or ".join(s + "/" for s in missing)
            raise ValueError(f"--data {spec}: directory has no {where}; {fix}")
        if missing:  # class folders (in train/ or right here) and no val/: hold out a share of each class
            pool = FolderSource(os.path.join(spec, "train") if "train" not in missing else spec, spec=spec)
            tr, va = _held_out(spec, pool, val_fraction, log)
        else:
            tr = FolderSource(os.path.join(spec, "train"), spec=spec)
            va = FolderSource(os.path.join(spec, "val"), spec=spec, classes=tr.classes)
        names, kind = tr.classes, "folder"
        name = os.path.basename(os.path.normpath(spec)) or "data"
        c = len(names)
        chans = in_chans if in_chans is not None else _peek_both(tr, va)
    elif ".tar" in spec.lower():
        if bool(val_spec) == bool(val_fraction):
            raise ValueError(
                f"--data {spec}: tar shards need one val split: --val-data with the val shards' pattern "
                "(e.g. --val-data 'shards/val-{0000..0009}.tar') or --val-fraction F (a share of each class)"
            )
        if val_spec:
            tr = TarSource(spec, spec=spec, index_cache=index_cache, log=log)
            va = TarSource(val_spec, spec=val_spec, index_cache=index_cache, log=log)
        else:
            pool = TarSource(spec, spec=spec, index_cache=index_cache, log=log)
            tr, va = _held_out(spec, pool, val_fraction, log)
        c = max(tr.num_classes, va.num_classes)
        names, kind = [str(i) for i in range(c)], "tar"
        name = os.path.basename(spec).split("{")[0].rstrip("-_.") or "shards"
        chans = in_chans if in_chans is not None else _peek_both(tr, va)
    else:
        raise FileNotFoundError(f"--data {spec}: no such directory or shard pattern; {_EXPECTED}")
    kw = dict(img_size=size, in_chans=chans, on_bad_image=on_bad_image)
    v_pct = crop_pct if val_crop_pct is None else float(val_crop_pct)
    data = StreamData(
        train=StreamDataset(tr, crop_pct=crop_pct, **kw),
        val=StreamDataset(va, crop_pct=v_pct, **kw),
        num_classes=c,
        class_names=list(names),
        in_chans=chans,
        img_size=size,
        crop_pct=float(crop_pct),
        name=name,
        kind=kind,
    )
    h = hashlib.sha256()
    h.update(f"{kind}|{tr.fingerprint}|{va.fingerprint}|{size}|{chans}|{crop_pct!r}|{c}".encode())
    if v_pct != crop_pct:  # (only then: the fingerprints of data opened before this option stay the same)
        h.update(f"|val_crop_pct {v_pct!r}".encode())
    data.fingerprint = h.hexdigest()
    if log is not None:
        log(
            f"{spec}: {len(tr)} train / {len(va)} val images, {c} classes, decoded in workers to "
            f"{chans}x{size}x{size} (short side resize + centre crop); fingerprint {data.fingerprint[:12]}"
        )
    return data


# ----------------------------------------------------------------------------------------------------
# small sets: memory or stream
# ----------------------------------------------------------------------------------------------------


def plan_storage(
    data: StreamData,
    threshold_bytes: int = DEFAULT_MEMORY_THRESHOLD,
    log: Callable[[str], None] | None = _notice,
) -> str:
    """'memory' when both splits decoded at img_size fit under ``threshold_bytes`` (default 2 GiB) of
    host memory, else 'stream'; says which, and why, in one line. (Memory means host RAM: the trainer
    then indexes batches out of a CPU tensor -- the GPU never holds the dataset either way.)"""
    need = data.decoded_bytes()
    choice = "memory" if need <= threshold_bytes else "stream"
    if log is not None:
        verb = "decoding once into memory" if choice == "memory" else "streaming it from disk with workers"
        log(
            f"{data.name}: {need / 2**20:.1f} MiB decoded ({'<=' if choice == 'memory' else '>'} "
            f"{threshold_bytes / 2**20:.0f} MiB threshold) -> {verb}"
        )
    return choice


def materialize(
    ds: StreamDataset,
    *,
    workers: int | None = None,
    batch_size: int = 256,
    loader: StreamLoader | None = None,
) -> torch.Tensor:
    """Decode a whole split through the loader: uint8 [N, C, S, S] on the CPU (same pixels as streaming)."""
    n = len(ds)
    out = torch.empty(n, ds.in_chans, ds.img_size, ds.img_size, dtype=torch.uint8)
    own = loader is None
    ld = loader or StreamLoader(ds, workers=workers, persistent_workers=False)
    try:
        for b in ld.epoch([range(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]):
            out[b.ids] = b.x.cpu()
    finally:
        if own:
            ld.close()
    return out


def estimate_mean_std(
    ds: StreamDataset, n: int = 1024, *, workers: int | None = 0, x: torch.Tensor | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std in [0, 1] units from ``n`` evenly spaced ids (deterministic; the exact values
    when n >= len). A constant channel gets std 1.0 (as fastkd.data does). ``x``: the split already
    decoded (``materialize``): the same ids and arithmetic read from it, so a dataset held in memory and
    the same dataset streamed normalise identically (their fingerprints are equal too)."""
    total = len(ds)
    ids = np.unique(np.linspace(0, total - 1, min(n, total)).round().astype(np.int64))
    s = torch.zeros(ds.in_chans, dtype=torch.float64)
    s2 = torch.zeros(ds.in_chans, dtype=torch.float64)
    chunks = [torch.from_numpy(c) for c in np.array_split(ids, max(1, math.ceil(len(ids) / 256)))]
    ld = StreamLoader(ds, workers=workers, persistent_workers=False, log=None) if x is None else None
    try:
        for xb in (x.index_select(0, c) for c in chunks) if ld is None else (b.x for b in ld.epoch(chunks)):
            xf = xb.to(torch.float64)
            s += xf.sum(dim=(0, 2, 3))
            s2 += (xf * xf).sum(dim=(0, 2, 3))
    finally:
        if ld is not None:
            ld.close()
    cnt = len(ids) * ds.img_size * ds.img_size
    mean = s / cnt
    std = (s2 / cnt - mean * mean).clamp_min(0).sqrt() / 255.0
    mean = mean / 255.0
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


# ----------------------------------------------------------------------------------------------------
# benchmark
# ----------------------------------------------------------------------------------------------------


def bench(
    spec: str,
    *,
    img_size: int = 224,
    batch_size: int = 128,
    workers: int | None = None,
    steps: int | None = None,
    val_spec: str | None = None,
    val_fraction: float | None = None,
    warmup: int = 2,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict:
    """Loader throughput alone: random id batches (a seeded permutation, like training) through the
    workers into uint8 CPU batches; img/s measured after ``warmup`` batches (worker start-up excluded)."""
    data = open_stream(spec, img_size=img_size, val_spec=val_spec, val_fraction=val_fraction, seed=seed,
                       log=None)
    ds = data.train
    n = len(ds)
    bs = min(batch_size, n)
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    total_steps = n // bs if steps is None else int(steps)
    batches = [
        perm[(k * bs) % (n - bs + 1) : (k * bs) % (n - bs + 1) + bs] for k in range(total_steps + warmup)
    ]
    ld = StreamLoader(ds, workers=workers, log=None)
    t0, imgs = None, 0
    try:
        for k, b in enumerate(ld.epoch(batches)):
            if k == warmup:
                t0 = time.perf_counter()
            elif k > warmup:
                imgs += int(b.x.shape[0])
        dt = time.perf_counter() - t0 if t0 is not None else float("nan")
    finally:
        ld.close()
    res = dict(
        spec=spec,
        images=imgs,
        seconds=dt,
        img_per_s=imgs / dt if dt and dt == dt and dt > 0 else float("nan"),
        workers=ld.workers,
        batch_size=bs,
        img_size=img_size,
        in_chans=data.in_chans,
        cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    )
    log(
        f"loader: {res['img_per_s']:.0f} img/s ({imgs} images in {dt:.2f}s, {ld.workers} workers, "
        f"batch {bs}, {data.in_chans}x{img_size}x{img_size}, {res['cpus']} CPUs) -- {spec}"
    )
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fastkd.data", description="Streaming loader tools: --bench measures the loader alone."
    )
    p.add_argument("--bench", metavar="DATA", required=True, help="DIR, tar pattern or synthetic:N to read")
    p.add_argument("--val-data", default=None, help="val shard pattern (tar shards only; default: none)")
    p.add_argument("--img-size", type=int, default=224, help="decode size (default: 224)")
    p.add_argument("--batch-size", type=int, default=128, help="images per batch (default: 128)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: from the CPU count)")
    p.add_argument("--steps", type=int, default=None, help="batches to time (default: one pass)")
    a = p.parse_args(argv)
    val, frac = a.val_data, None
    if val is None and ".tar" in a.bench.lower():
        val = a.bench  # the bench reads train only; any val pattern satisfies the index
    elif os.path.isdir(a.bench) and not os.path.isdir(os.path.join(a.bench, "val")):
        frac = 0.1  # class folders without val/: the bench reads the train side of a held-out split
    try:
        bench(
            a.bench,
            img_size=a.img_size,
            batch_size=a.batch_size,
            workers=a.workers,
            steps=a.steps,
            val_spec=val,
            val_fraction=frac,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"fastkd.stream: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
