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
import glob
import hashlib
import io
import json
import math
import os
import re
import sys
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

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

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".pgm", ".pbm", ".tif", ".tiff", ".gif")
_TAR_IMG_EXT = tuple(e[1:] for e in IMG_EXTENSIONS)
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
DEFAULT_MEMORY_THRESHOLD = 2 << 30  # 2 GiB of decoded uint8 pixels
_EXPECTED = (
    "expected a directory with train/ and val/ (ImageFolder), a tar shard pattern such as "
    "'shards/train-{0000..0099}.tar' (with a val pattern), or synthetic:N"
)


class BadImageError(ValueError):
    """An image that cannot be decoded (message: one line naming the file and the fix)."""


def _notice(msg: str) -> None:
    print(f"fastkd.data: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------
# decoding
# ----------------------------------------------------------------------------------------------------


def _decode(fp, size: int, chans: int, crop_pct: float) -> np.ndarray:
    """File object -> uint8 [C, size, size]: channel conversion, short side to size/crop_pct, centre crop."""
    from PIL import Image

    mode = "L" if chans == 1 else "RGB"
    with Image.open(fp) as im:
        short = max(1, int(round(size / crop_pct)))
        if im.format == "JPEG":
            im.draft(mode, (short, short))  # DCT scaling: the result stays >= the requested size
        if im.mode.startswith("I") or im.mode == "F":  # 16/32-bit grayscale: 0..65535 -> 0..255
            a = np.asarray(im, dtype=np.float64)
            a = a / 257.0 if im.mode != "F" else a * 255.0 if a.max(initial=0) <= 1.0 else a
            im2 = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
            img = im2 if mode == "L" else im2.convert(mode)
        elif im.mode != mode:
            img = im.convert(mode)  # palette/LA/RGBA/CMYK/L -> mode; alpha is dropped
        else:
            img = im
            img.load()
        w, h = img.size
        s = short / min(w, h)
        nw, nh = max(short, int(round(w * s))), max(short, int(round(h * s)))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.Resampling.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        if (left, top, nw, nh) != (0, 0, size, size):
            img = img.crop((left, top, left + size, top + size))
        a = np.asarray(img, dtype=np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    return np.array(a.transpose(2, 0, 1), order="C")  # a writable copy (PIL's buffer is read-only)


def _peek_channels(open_fns: Sequence[Callable[[], object]]) -> int:
    """1 when every peeked image is grayscale (headers only, no decode), else 3; unreadable ones ignored."""
    from PIL import Image

    seen = False
    for fn in open_fns:
        try:
            with fn() as f, Image.open(f) as im:
                seen = True
                if im.mode not in _GRAY_MODES:
                    return 3
        except Exception:
            continue
    return 1 if seen else 3


# ----------------------------------------------------------------------------------------------------
# sources
# ----------------------------------------------------------------------------------------------------


class _Strings:
    """A list of str kept as one utf-8 byte array + offsets: no per-item Python objects, so forked
    DataLoader workers do not copy a million-entry index page by page through refcount writes (the
    copy-on-read growth a plain list of str causes)."""

    def __init__(self, items: Sequence[str]):
        enc = [s.encode() for s in items]
        self.blob = np.frombuffer(b"".join(enc), dtype=np.uint8)
        self.off = np.zeros(len(enc) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in enc], out=self.off[1:])

    def __len__(self) -> int:
        return len(self.off) - 1

    def __getitem__(self, i: int) -> str:
        return self.blob[self.off[i] : self.off[i + 1]].tobytes().decode()

    def tolist(self) -> list[str]:
        return [self[i] for i in range(len(self))]


class _Source:
    """An index of one split: ``len``, ``labels`` (int64 [N]), ``keys`` (stable, sorted), ``fingerprint``.

    ``open(i)`` returns a binary file object of sample i's encoded image; ``name(i)`` names it for errors.
    Sources are pickled into worker processes, so they hold only arrays (no open files, no str lists).
    """

    labels: torch.Tensor
    _keys: _Strings
    fingerprint: str

    @property
    def keys(self) -> list[str]:
        """The sorted sample keys (a new list; ``key(i)`` reads one)."""
        return self._keys.tolist()

    def key(self, i: int) -> str:
        return self._keys[i]

    def __len__(self) -> int:
        return len(self._keys)

    def open(self, i: int):
        raise NotImplementedError

    def name(self, i: int) -> str:
        return self.key(i)

    def load(self, i: int, size: int, chans: int, crop_pct: float) -> np.ndarray:
        with self.open(i) as f:
            return _decode(f, size, chans, crop_pct)


def _scan_split(sdir: str, spec: str) -> tuple[list[str], list[str], list[int]]:
    """(class names, relative paths, labels) of one ImageFolder split; symlinks followed, cycles not."""
    if not os.path.isdir(sdir):
        raise FileNotFoundError(f"--data {spec}: no {sdir}/ directory; {_EXPECTED}")
    classes = sorted(
        e.name for e in os.scandir(sdir) if not e.name.startswith(".") and e.is_dir(follow_symlinks=True)
    )
    if not classes:
        raise ValueError(
            f"--data {spec}: {sdir}/ has no class subfolders; put each class's images in {sdir}/<class>/"
        )

    def ident(path: str) -> tuple[int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    # the split folder and every class folder are entered only as themselves: a symlink from one class
    # into another (or up into the split) is not followed, so no image is listed under a wrong class
    reserved = {ident(sdir)} | {ident(os.path.join(sdir, c)) for c in classes}
    visited: set[tuple[int, int] | None] = set()
    items: list[tuple[tuple[str, ...], int]] = []
    for label, c in enumerate(classes):
        stack = [(os.path.join(sdir, c), (c,))]
        while stack:
            d, parts = stack.pop()
            i_d = ident(d)
            # a symlink back into a visited directory (a cycle) or into another class: not entered
            if i_d is None or i_d in visited or (len(parts) > 1 and i_d in reserved):
                continue
            visited.add(i_d)
            subdirs = []
            with os.scandir(d) as it:
                for e in it:
                    if e.name.startswith("."):
                        continue
                    try:
                        if e.is_dir(follow_symlinks=True):
                            subdirs.append(e.name)
                        elif e.name.lower().endswith(IMG_EXTENSIONS) and e.is_file(follow_symlinks=True):
                            items.append(((*parts, e.name), label))
                    except OSError:  # dangling symlink
                        continue
            for s in sorted(subdirs, reverse=True):
                stack.append((os.path.join(d, s), (*parts, s)))
    if not items:
        raise ValueError(
            f"--data {spec}: no images under {sdir}/<class>/ ({', '.join(IMG_EXTENSIONS)}); "
            "put each class's images in its own subfolder"
        )
    items.sort(key=lambda t: t[0])
    return classes, ["/".join(p) for p, _ in items], [lab for _, lab in items]


class FolderSource(_Source):
    """One split of an ImageFolder tree, indexed by a file scan (no image is opened).

    ``keys[i]`` is sample i's path relative to the split folder (posix separators); ids follow the
    sorted order of the path components. ``fingerprint``: sha256 of the class names and, per file, its
    relative path, size, mtime_ns and label -- from ``stat`` only, never the image bytes.
    """

    def __init__(self, split_dir: str, *, spec: str | None = None, classes: Sequence[str] | None = None):
        self.root = os.path.abspath(split_dir)
        spec = spec or split_dir
        found, keys, labels = _scan_split(self.root, spec)
        if classes is not None and list(classes) != found:
            only_here = sorted(set(found) - set(classes))
            only_there = sorted(set(classes) - set(found))
            raise ValueError(
                f"--data {spec}: class folders of {split_dir} differ from train/ (only here: {only_here}; "
                f"missing here: {only_there}); give both splits the same class subfolders"
            )
        self.classes = found
        self._keys = _Strings(keys)
        self.labels = torch.tensor(labels, dtype=torch.int64)
        h = hashlib.sha256()
        h.update(("classes:" + "\x1f".join(found) + "\n").encode())
        for k, lab in zip(keys, labels, strict=True):
            st = os.stat(os.path.join(self.root, k))
            h.update(f"{k}\x1f{st.st_size}\x1f{st.st_mtime_ns}\x1f{lab}\n".encode())
        self.fingerprint = h.hexdigest()

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.key(i))

    def open(self, i: int):
        return open(self.path(i), "rb")

    def name(self, i: int) -> str:
        return self.path(i)


# -- tar shards ---------------------------------------------------------------------------------------

_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{0000..0099}`` ranges (zero padding kept) and ``{a,b,c}`` lists, left to right, in order."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    body = m.group(1)
    r = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if r:
        a, b = r.group(1), r.group(2)
        width = len(a) if a.startswith("0") or len(a) == len(b) else 0
        lo, hi = int(a), int(b)
        step = 1 if hi >= lo else -1
        opts = [str(v).zfill(width) for v in range(lo, hi + step, step)]
    else:
        opts = body.split(",")
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [x for o in opts for x in expand_braces(head + o + tail)]


def _wds_split(name: str) -> tuple[str, str]:
    """webdataset's member naming: ``dir/key.ext.more`` -> (``dir/key``, ``ext.more``)."""
    d, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), (ext.lower() if dot else "")


def _shard_paths(pattern: str, spec: str) -> list[str]:
    paths: list[str] = []
    for p in expand_braces(pattern):
        if any(ch in p for ch in "*?["):
            paths.extend(sorted(glob.glob(p)))
        else:
            paths.append(p)
    missing = [p for p in paths if not os.path.isfile(p)]
    if not paths or missing:
        what = (
            f"{len(missing)} of {len(paths)} shard(s) missing, first {missing[0]}" if missing else "no shards"
        )
        raise FileNotFoundError(
            f"--data {spec}: {what}; check the pattern (brace ranges like train-{{0000..0099}}.tar)"
        )
    return paths


def _index_one(path: str, spec: str) -> list[tuple[str, int, int, int]]:
    """(member key, label, image data offset, image size) of every sample of one shard, in tar order."""
    groups: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = _wds_split(m.name)
                g = groups.setdefault(key, {})
                if ext in ("cls", "cls.txt", "label"):
                    g["cls"] = tf.extractfile(m).read().decode("utf-8", "replace").strip()
                elif ext in _TAR_IMG_EXT and "img" not in g:
                    g["img"] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError) as e:
        raise ValueError(f"--data {spec}: cannot read shard {path} ({e}); re-create or remove it") from None
    out = []
    for key, g in groups.items():
        if "img" not in g and "cls" not in g:
            continue
        where = f"{path}: sample {key!r}"
        if "img" not in g:
            raise ValueError(
                f"--data {spec}: {where} has a .cls but no image member ({', '.join(_TAR_IMG_EXT)})"
                "; write each sample as <key>.jpg (or .png/.webp) + <key>.cls"
            )
        if "cls" not in g or not re.fullmatch(r"\d+", g["cls"]):
            raise ValueError(
                f"--data {spec}: {where} has no integer .cls label "
                f"(got {g.get('cls')!r}); write the class id 0..C-1 as text in <key>.cls"
            )
        out.append((key, int(g["cls"]), int(g["img"][0]), int(g["img"][1])))
    return out


def _shard_index(path: str, spec: str, cache_dir: str | None) -> list[tuple[str, int, int, int]]:
    """``_index_one`` through a per-shard JSON cache keyed by (path, size, mtime_ns), if cache_dir."""
    if not cache_dir:
        return _index_one(path, spec)
    st = os.stat(path)
    tag = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}|v1".encode()).hexdigest()[:32]
    cpath = os.path.join(cache_dir, f"{tag}.json")
    try:
        with open(cpath, encoding="utf-8") as f:
            return [tuple(r) for r in json.load(f)]
    except (OSError, ValueError):
        pass
    recs = _index_one(path, spec)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{cpath}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(recs, f)
    os.replace(tmp, cpath)  # atomic: concurrent ranks may write the same entry
    return recs


class TarSource(_Source):
    """Webdataset-style tar shards with random access by byte offset.

    ``keys[i]``: ``<shard file name>/<member key>``, sorted; ``loc``: (shard index, data offset, size)
    of each sample's image member, read from the tar headers once (no image bytes are read).
    ``fingerprint``: sha256 of (key, label, image size) of every sample -- shard mtimes are left out, so
    copying the shards elsewhere keeps the fingerprint.
    ``index_cache``: a folder where each shard's index is kept (keyed by the shard's path, size and
    mtime), so a later run reads one small JSON per shard instead of every tar header (about 0.1 ms per
    sample here: minutes for ImageNet's 1.28M).
    """

    def __init__(
        self,
        pattern: str,
        *,
        spec: str | None = None,
        index_cache: str | None = None,
        log: Callable[[str], None] | None = None,
    ):
        spec = spec or pattern
        self.shards = [os.path.abspath(p) for p in _shard_paths(pattern, spec)]
        names = [os.path.basename(p) for p in self.shards]
        if len(set(names)) != len(names):
            raise ValueError(
                f"--data {spec}: two shards share a file name; sample keys use the shard's file name, "
                "so give every shard a distinct name"
            )
        recs: list[tuple[str, int, int, int, int]] = []  # key, label, shard, offset, size
        t0 = time.perf_counter()
        for si, path in enumerate(self.shards):
            for key, lab, off, size in _shard_index(path, spec, index_cache):
                recs.append((f"{names[si]}/{key}", lab, si, off, size))
        if log is not None and time.perf_counter() - t0 > 10:
            log(
                f"{spec}: indexed {len(self.shards)} shard(s) in {time.perf_counter() - t0:.0f}s"
                + (f" (cached in {index_cache})" if index_cache else " (pass index_cache= to reuse it)")
            )
        if not recs:
            raise ValueError(f"--data {spec}: the shards hold no samples; {_EXPECTED}")
        recs.sort(key=lambda r: r[0])
        keys = [r[0] for r in recs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"--data {spec}: duplicate sample keys inside a shard; give each sample one key")
        self._keys = _Strings(keys)
        self.labels = torch.tensor([r[1] for r in recs], dtype=torch.int64)
        self.loc = np.array([(r[2], r[3], r[4]) for r in recs], dtype=np.int64)
        self.num_classes = int(self.labels.max()) + 1
        h = hashlib.sha256()
        for k, lab, _, _, size in recs:
            h.update(f"{k}\x1f{lab}\x1f{size}\n".encode())
        self.fingerprint = h.hexdigest()
        self._fh: dict[int, object] = {}

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_fh"] = {}  # open handles stay in their process
        return d

    def open(self, i: int):
        si, off, size = (int(v) for v in self.loc[i])
        f = self._fh.get(si)
        if f is None:
            f = self._fh[si] = open(self.shards[si], "rb")
        f.seek(off)
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"short read ({len(data)} of {size} bytes)")
        return io.BytesIO(data)

    def name(self, i: int) -> str:
        si = int(self.loc[i][0])
        return f"{self.shards[si]}:{self.key(i).split('/', 1)[1]}"


class SyntheticSource(_Source):
    """``n`` random images: pixels of id i from ``default_rng([seed, split, i])``, labels from the seed."""

    def __init__(self, n: int, *, num_classes: int, seed: int, split: int):
        self.n, self.seed, self.split = int(n), int(seed), int(split)
        self._keys = _Strings([])
        rng = np.random.default_rng([self.seed, self.split, 0x5EED])
        self.labels = torch.from_numpy(rng.integers(0, num_classes, self.n).astype(np.int64))
        self.fingerprint = hashlib.sha256(f"synthetic|{n}|{num_classes}|{seed}|{split}".encode()).hexdigest()

    def __len__(self) -> int:
        return self.n

    def key(self, i: int) -> str:
        return str(i)

    @property
    def keys(self) -> list[str]:
        return [str(i) for i in range(self.n)]

    def load(self, i: int, size: int, chans: int, crop_pct: float) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.split, int(i)])
        return rng.integers(0, 256, (chans, size, size), dtype=np.uint8)

    def name(self, i: int) -> str:
        return f"synthetic:{i}"


# ----------------------------------------------------------------------------------------------------
# dataset (worker side)
# ----------------------------------------------------------------------------------------------------


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


def open_stream(
    spec: str,
    *,
    img_size: int,
    val_spec: str | None = None,
    in_chans: int | None = None,
    num_classes: int | None = None,
    crop_pct: float = 1.0,
    on_bad_image: str = "error",
    seed: int = 0,
    index_cache: str | None = None,
    log: Callable[[str], None] | None = _notice,
) -> StreamData:
    """Index a streamed dataset (nothing is decoded).

    spec: ``DIR`` (train/ + val/), a tar pattern (``val_spec`` required: the val shards), or
        ``synthetic:N``.
    img_size: square side every image is decoded to (short side resized to img_size / crop_pct,
        centre crop). in_chans: 1 or 3; None -> 1 if up to 64 peeked image headers are all grayscale,
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
        if missing:
            raise ValueError(
                f"--data {spec}: directory has no {' or '.join(s + '/' for s in missing)}; {_EXPECTED}"
            )
        tr = FolderSource(os.path.join(spec, "train"), spec=spec)
        va = FolderSource(os.path.join(spec, "val"), spec=spec, classes=tr.classes)
        names, kind = tr.classes, "folder"
        name = os.path.basename(os.path.normpath(spec)) or "data"
        c = len(names)
        chans = in_chans
        if chans is None:
            step = max(1, len(tr) // 64)
            chans = _peek_channels([(lambda i=i: tr.open(i)) for i in range(0, len(tr), step)][:64])
    elif ".tar" in spec.lower():
        if not val_spec:
            raise ValueError(
                f"--data {spec}: tar shards need --val-data with the val shards' pattern "
                "(e.g. --val-data 'shards/val-{0000..0009}.tar')"
            )
        tr = TarSource(spec, spec=spec, index_cache=index_cache, log=log)
        va = TarSource(val_spec, spec=val_spec, index_cache=index_cache, log=log)
        c = max(tr.num_classes, va.num_classes)
        names, kind = [str(i) for i in range(c)], "tar"
        name = os.path.basename(spec).split("{")[0].rstrip("-_.") or "shards"
        chans = in_chans
        if chans is None:
            step = max(1, len(tr) // 64)
            chans = _peek_channels([(lambda i=i: tr.open(i)) for i in range(0, len(tr), step)][:64])
    else:
        raise FileNotFoundError(f"--data {spec}: no such directory or shard pattern; {_EXPECTED}")
    kw = dict(img_size=size, in_chans=chans, crop_pct=crop_pct, on_bad_image=on_bad_image)
    data = StreamData(
        train=StreamDataset(tr, **kw),
        val=StreamDataset(va, **kw),
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
    data.fingerprint = h.hexdigest()
    if log is not None:
        log(
            f"{spec}: {len(tr)} train / {len(va)} val images, {c} classes, decoded in workers to "
            f"{chans}x{size}x{size} (short side resize + centre crop); fingerprint {data.fingerprint[:12]}"
        )
    return data


# ----------------------------------------------------------------------------------------------------
# ids per step: rank sharding, eval batches
# ----------------------------------------------------------------------------------------------------


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

    def fetch(self, ids: torch.Tensor) -> torch.Tensor:
        q = ids.detach().to("cpu", torch.int64).reshape(-1)
        pos = torch.searchsorted(self._sorted, q).clamp_max(max(0, self._sorted.numel() - 1))
        if self._sorted.numel() == 0 or not bool((self._sorted[pos] == q).all()):
            missing = q[self._sorted[pos] != q][:5].tolist() if self._sorted.numel() else q[:5].tolist()
            raise ValueError(
                f"StreamBatch.fetch: ids {missing} are not in this batch; pass extra_ids= to "
                "StreamLoader.epoch so the loader fetches them (e.g. mixing partners)"
            )
        rows = self._order[pos]
        return self.x.index_select(0, rows.to(self.x.device))


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
    ds: StreamDataset, n: int = 1024, *, workers: int | None = 0
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std in [0, 1] units from ``n`` evenly spaced ids (deterministic; the exact values
    when n >= len). A constant channel gets std 1.0 (as fastkd.data does)."""
    total = len(ds)
    ids = np.unique(np.linspace(0, total - 1, min(n, total)).round().astype(np.int64))
    s = torch.zeros(ds.in_chans, dtype=torch.float64)
    s2 = torch.zeros(ds.in_chans, dtype=torch.float64)
    ld = StreamLoader(ds, workers=workers, persistent_workers=False, log=None)
    try:
        for b in ld.epoch(
            [torch.from_numpy(c) for c in np.array_split(ids, max(1, math.ceil(len(ids) / 256)))]
        ):
            xf = b.x.to(torch.float64)
            s += xf.sum(dim=(0, 2, 3))
            s2 += (xf * xf).sum(dim=(0, 2, 3))
    finally:
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
    warmup: int = 2,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict:
    """Loader throughput alone: random id batches (a seeded permutation, like training) through the
    workers into uint8 CPU batches; img/s measured after ``warmup`` batches (worker start-up excluded)."""
    data = open_stream(spec, img_size=img_size, val_spec=val_spec, seed=seed, log=None)
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
    p = argparse.ArgumentParser(prog="python -m fastkd.data.stream", description="Streaming loader tools.")
    p.add_argument("--bench", metavar="DATA", required=True, help="DIR, tar pattern or synthetic:N to read")
    p.add_argument("--val-data", default=None, help="val shard pattern (tar shards only; default: none)")
    p.add_argument("--img-size", type=int, default=224, help="decode size (default: 224)")
    p.add_argument("--batch-size", type=int, default=128, help="images per batch (default: 128)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: from the CPU count)")
    p.add_argument("--steps", type=int, default=None, help="batches to time (default: one pass)")
    a = p.parse_args(argv)
    val = a.val_data
    if val is None and ".tar" in a.bench.lower():
        val = a.bench  # the bench reads train only; any val pattern satisfies the index
    try:
        bench(
            a.bench,
            img_size=a.img_size,
            batch_size=a.batch_size,
            workers=a.workers,
            steps=a.steps,
            val_spec=val,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"fastkd.stream: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
