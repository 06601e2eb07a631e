"""Image folder and synthetic sources, and the decode every streamed image goes through.

See :mod:`fastkd.data.stream` for the sources' contract (sorted ids, stat-only fingerprints, the
decode: short side resize + centre crop, no randomness). A source is an index of one split; it holds
only arrays so it pickles cheaply into DataLoader workers.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".pgm", ".pbm", ".tif", ".tiff", ".gif")
_TAR_IMG_EXT = tuple(e[1:] for e in IMG_EXTENSIONS)
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
DEFAULT_MEMORY_THRESHOLD = 2 << 30  # 2 GiB of decoded uint8 pixels
_EXPECTED = (
    "expected a directory with train/ and val/ (ImageFolder; class folders alone with --val-fraction F), "
    "a tar shard pattern such as 'shards/train-{0000..0099}.tar' (with --val-data or --val-fraction), "
    "or synthetic:N"
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

    def sample_key(self, i: int) -> str:
        """What names the sample independently of how the data is stored (``hold_out`` hashes it)."""
        return self.key(i)

    def load(self, i: int, size: int, chans: int, crop_pct: float) -> np.ndarray:
        with self.open(i) as f:
            return _decode(f, size, chans, crop_pct)


def walk_images(top: str) -> Iterator[str]:
    """Image files under ``top``, recursively (directories and files in sorted order, hidden entries skipped
    as the split scan skips them); symlinks are followed, but never into a directory already visited."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        seen.add(os.path.realpath(dirpath))
        real = {d: os.path.realpath(os.path.join(dirpath, d)) for d in dirnames}
        dirnames[:] = sorted(d for d in dirnames if real[d] not in seen and not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith(".") and f.lower().endswith(IMG_EXTENSIONS):
                yield os.path.join(dirpath, f)


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
            if only_here:  # a class the model is never trained on: its labels have no index
                raise ValueError(
                    f"--data {spec}: class folders of {split_dir} differ from train/ (only here: "
                    f"{only_here}; missing here: {only_there}); give both splits the same class subfolders"
                )
            # a split without some of train/'s classes (a rare class with no val image): labels by name
            index = {c: i for i, c in enumerate(classes)}
            labels = [index[found[lab]] for lab in labels]
            found = list(classes)
            listed = ", ".join(only_there[:5]) + (", …" if len(only_there) > 5 else "")
            _notice(f"note: {split_dir} has no folder for {len(only_there)} of train/'s {len(classes)} "
                    f"classes ({listed}): they are trained but not evaluated; labels follow train/'s order")
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



class SubsetSource(_Source):
    """Samples ``ids`` of another source, renumbered 0..len-1 in that order: one side of a held-out split
    (``hold_out``). Holds the base source and an id array only, so it pickles into loader workers."""

    def __init__(self, base: _Source, ids: np.ndarray, tag: str):
        self.base, self.ids = base, np.asarray(ids, dtype=np.int64)
        self._keys = _Strings([base.key(int(i)) for i in self.ids])
        self.labels = base.labels[torch.from_numpy(self.ids)]
        self.classes = getattr(base, "classes", None)
        self.num_classes = getattr(base, "num_classes", None)
        h = hashlib.sha256(f"{base.fingerprint}|{tag}|".encode())
        h.update(self.ids.tobytes())
        self.fingerprint = h.hexdigest()

    def open(self, i: int):
        return self.base.open(int(self.ids[i]))

    def name(self, i: int) -> str:
        return self.base.name(int(self.ids[i]))

    def load(self, i: int, size: int, chans: int, crop_pct: float) -> np.ndarray:
        return self.base.load(int(self.ids[i]), size, chans, crop_pct)


def hold_out(base: _Source, fraction: float) -> tuple[SubsetSource, SubsetSource]:
    """(train, val) of a source with no val split: per class, the ``round(n·fraction)`` samples (at least 1,
    and at least 1 left to train, for a class of ≥ 2) whose sample keys hash lowest (sha256): the split
    depends on the names only, not on the order a filesystem lists them or on how shards cut the data, and a
    folder copied elsewhere splits alike."""
    labels = base.labels.numpy()
    rank = np.array([int.from_bytes(hashlib.sha256(base.sample_key(i).encode()).digest()[:8], "little")
                     for i in range(len(base))], dtype=np.uint64)
    val: list[np.ndarray] = []
    for c in np.unique(labels):
        ids = np.flatnonzero(labels == c)
        k = min(max(int(round(len(ids) * fraction)), 1), len(ids) - 1) if len(ids) >= 2 else 0
        val.append(ids[np.argsort(rank[ids], kind="stable")[:k]])
    v = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    t = np.setdiff1d(np.arange(len(base)), v)
    return SubsetSource(base, t, f"train|{fraction!r}"), SubsetSource(base, v, f"val|{fraction!r}")


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
