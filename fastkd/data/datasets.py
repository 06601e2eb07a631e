"""Datasets held in memory as uint8 tensors.

``load_data(spec)`` understands three kinds of ``--data``:

* ``"digits"`` -- scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), offline.
* ``DIR`` -- an ImageFolder tree ``DIR/train/<class>/*.png|jpg|...`` and ``DIR/val/<class>/...``.
* ``FILE.npz`` -- arrays ``x_train, y_train, x_val, y_val``; images uint8 [N,H,W] or [N,H,W,C] (C = 1 or 3).

Every loader returns a :class:`Dataset` with images as uint8 [N, C, H, W] (square, H = W = img_size)
and int64 labels; augmentation and normalisation happen later, on batches (fastkd.data.augment).
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Dataset", "load_data", "fingerprint"]

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".pbm", ".tif", ".tiff", ".webp", ".gif")
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_MAX_DEFAULT_SIZE = 224
_EXPECTED = (
    "expected 'digits', a directory with train/ and val/, or a .npz with x_train, y_train, x_val, y_val"
)


@dataclass(repr=False)
class Dataset:
    """An image classification dataset in memory.

    x_train: uint8 [N, C, H, W]; y_train: int64 [N]; x_val: uint8 [M, C, H, W]; y_val: int64 [M].
    H = W = img_size for both splits; C = in_chans (1 or 3). Labels lie in [0, num_classes).
    mean, std: per-channel pixel mean and (population) standard deviation of the TRAIN split in [0, 1]
    units, i.e. of x_train / 255 over (N, H, W). A constant channel gets std 1.0 (so normalising never
    divides by zero).
    fingerprint: sha256 hex of shapes + uint8 bytes + int64 labels of both splits (see :func:`fingerprint`).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    num_classes: int
    in_chans: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    fingerprint: str
    class_names: list[str]

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}: train {tuple(self.x_train.shape)}, val {tuple(self.x_val.shape)}, "
            f"{self.num_classes} classes, fingerprint {self.fingerprint[:12]})"
        )


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------


def _notice(msg: str) -> None:
    print(f"fastkd.data: {msg}", file=sys.stderr, flush=True)


def fingerprint(
    x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor
) -> str:
    """sha256 hex digest of both splits: for each tensor its dtype and shape, then its bytes (C order).

    Hashed in 16 MiB slices straight from the tensor memory, so large datasets are not copied.
    """
    h = hashlib.sha256()
    for name, t in (("x_train", x_train), ("y_train", y_train), ("x_val", x_val), ("y_val", y_val)):
        a = np.ascontiguousarray(t.detach().cpu().numpy())
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        mv = memoryview(a).cast("B")
        step = 16 << 20
        for i in range(0, mv.nbytes, step):
            h.update(mv[i : i + step])
    return h.hexdigest()


def _mean_std(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of uint8 [N, C, H, W] in [0, 1] units, float64 sums over chunks of N."""
    n, c, h, w = x.shape
    chunk = max(1, (1 << 24) // max(1, c * h * w))
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for i in range(0, n, chunk):
        xc = x[i : i + chunk].to(torch.float64)
        s += xc.sum(dim=(0, 2, 3))
        s2 += (xc * xc).sum(dim=(0, 2, 3))
    cnt = n * h * w
    mean = s / cnt
    var = (s2 / cnt - mean * mean).clamp_min(0.0)
    std = var.sqrt() / 255.0
    mean = mean / 255.0
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _resize_uint8(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear (antialiased) resize of uint8 [N, C, H, W] to [N, C, size, size], rounded, in chunks."""
    n, c, h, w = x.shape
    if h == size and w == size:
        return x
    out = torch.empty(n, c, size, size, dtype=torch.uint8)
    chunk = max(1, (1 << 24) // max(1, c * max(h * w, size * size)))
    for i in range(0, n, chunk):
        xf = x[i : i + chunk].to(torch.float32)
        y = F.interpolate(xf, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[i : i + chunk] = y.round().clamp(0, 255).to(torch.uint8)
    return out


def _check_img_size(img_size: int | None) -> None:
    if img_size is not None and (int(img_size) != img_size or img_size < 1):
        raise ValueError(f"img_size={img_size!r}: use a positive int (square side in pixels) or None")


def _check_labels(spec: str, y_train: np.ndarray, y_val: np.ndarray, class_names: list[str]) -> None:
    """The same rules for .npz and ImageFolder: ≥ 2 classes (error); a val class with no training image,
    or classes with no training image at all: one warning line."""
    if len(class_names) < 2:
        raise ValueError(f"--data {spec}: only one class ({class_names[0]!r}); a classifier needs at least 2")
    seen = set(np.unique(y_train).tolist())
    unseen = sorted(set(np.unique(y_val).tolist()) - seen)
    empty = [class_names[i] for i in range(len(class_names)) if i not in seen]
    if unseen:  # the model cannot learn them: val top-1 is capped
        names = ", ".join(repr(class_names[i]) for i in unseen[:5])
        _notice(f"warning: {spec}: val class(es) {names} have no training image (val top-1 is capped); "
                "give them training images or drop them from val")
    elif empty:
        _notice(f"warning: {spec}: {len(empty)} class(es) have no training image ({', '.join(empty[:5])})")


def _finish(
    name: str,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    num_classes: int,
    class_names: list[str],
) -> Dataset:
    x_train, x_val = x_train.contiguous(), x_val.contiguous()
    y_train, y_val = y_train.to(torch.int64).contiguous(), y_val.to(torch.int64).contiguous()
    mean, std = _mean_std(x_train)
    return Dataset(
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        num_classes=int(num_classes),
        in_chans=int(x_train.shape[1]),
        img_size=int(x_train.shape[2]),
        mean=mean,
        std=std,
        name=name,
        fingerprint=fingerprint(x_train, y_train, x_val, y_val),
        class_names=list(class_names),
    )


# ----------------------------------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------------------------------


def _load_digits(img_size: int | None) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    imgs = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # [1797, 8, 8], 0..16 -> 0..255
    y = d.target.astype(np.int64)
    idx_train, idx_val = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0, stratify=y)
    x = torch.from_numpy(imgs)[:, None]  # [N, 1, 8, 8]
    x_train, x_val = x[torch.from_numpy(idx_train)], x[torch.from_numpy(idx_val)]
    if img_size is not None and img_size != 8:
        _notice(f"resizing digits from 8x8 to {img_size}x{img_size}")
        x_train, x_val = _resize_uint8(x_train, img_size), _resize_uint8(x_val, img_size)
    y_t = torch.from_numpy(y)
    return _finish(
        "digits",
        x_train,
        y_t[torch.from_numpy(idx_train)],
        x_val,
        y_t[torch.from_numpy(idx_val)],
        10,
        [str(i) for i in range(10)],
    )


# ----------------------------------------------------------------------------------------------------
# .npz
# ----------------------------------------------------------------------------------------------------


def _npz_images(arr: np.ndarray, key: str, spec: str) -> np.ndarray:
    """Validate one image array and return it as uint8 [N, H, W, C]."""
    if arr.dtype != np.uint8:
        raise ValueError(
            f"--data {spec}: {key} has dtype {arr.dtype}; convert it to uint8 pixels 0..255 "
            f"(e.g. np.clip(np.rint(x * 255), 0, 255).astype(np.uint8) for floats in [0, 1])"
        )
    if arr.ndim == 3:
        arr = arr[..., None]
    elif arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        hint = ""
        if arr.ndim == 4 and arr.shape[1] in (1, 3):
            hint = " (it looks channels-first: use np.transpose(x, (0, 2, 3, 1)))"
        raise ValueError(
            f"--data {spec}: {key} has shape {arr.shape}; expected uint8 [N, H, W] or [N, H, W, C] "
            f"with C = 1 or 3{hint}"
        )
    if arr.shape[0] == 0:
        raise ValueError(f"--data {spec}: {key} is empty; give it at least one image")
    return arr


def _npz_labels(arr: np.ndarray, key: str, n: int, xkey: str, spec: str) -> np.ndarray:
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"--data {spec}: {key} has dtype {arr.dtype}; labels must be integer class ids 0..C-1 "
            f"(e.g. y.astype(np.int64))"
        )
    if arr.ndim != 1:
        raise ValueError(
            f"--data {spec}: {key} has shape {arr.shape}; labels must be 1-D [N] (use y.reshape(-1))"
        )
    if arr.shape[0] != n:
        raise ValueError(
            f"--data {spec}: {key} has {arr.shape[0]} labels but {xkey} has {n} images; "
            "give one label per image"
        )
    if arr.size and int(arr.min()) < 0:
        raise ValueError(
            f"--data {spec}: {key} has negative label {int(arr.min())}; labels must be class ids 0..C-1"
        )
    return arr.astype(np.int64)


def _load_npz(path: str, img_size: int | None) -> Dataset:
    spec = path
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # zipfile / format errors
        raise ValueError(f"--data {spec}: cannot read it as .npz ({e}); save it with np.savez") from None
    with z:
        keys = set(z.files)
        missing = [k for k in ("x_train", "y_train", "x_val", "y_val") if k not in keys]
        if missing:
            raise ValueError(
                f"--data {spec}: missing key(s) {', '.join(missing)} "
                f"(found: {', '.join(sorted(keys)) or 'none'}); "
                "save with np.savez(path, x_train=..., y_train=..., x_val=..., y_val=...)"
            )
        try:
            xtr, ytr, xva, yva = (z[k] for k in ("x_train", "y_train", "x_val", "y_val"))
            names = z["class_names"] if "class_names" in keys else None
        except ValueError as e:  # object arrays need pickle, which we never allow
            raise ValueError(
                f"--data {spec}: {e}; store plain numeric arrays (class_names as a str array), not objects"
            ) from None
    xtr = _npz_images(xtr, "x_train", spec)
    xva = _npz_images(xva, "x_val", spec)
    if xtr.shape[1:] != xva.shape[1:]:
        raise ValueError(
            f"--data {spec}: x_train images are {xtr.shape[1:]} (H, W, C) but x_val images are "
            f"{xva.shape[1:]}; "
            "give both splits the same height, width and channels"
        )
    ytr = _npz_labels(ytr, "y_train", xtr.shape[0], "x_train", spec)
    yva = _npz_labels(yva, "y_val", xva.shape[0], "x_val", spec)
    top = int(max(ytr.max(), yva.max()))
    if names is not None:
        if names.ndim != 1 or names.dtype.kind not in "US":
            raise ValueError(f"--data {spec}: class_names must be a 1-D str array (np.array(['cat', 'dog']))")
        class_names = [str(s) for s in names.tolist()]
        if top >= len(class_names):
            raise ValueError(
                f"--data {spec}: label {top} is out of range for {len(class_names)} class_names; "
                f"labels must be class ids 0..{len(class_names) - 1}"
            )
        num_classes = len(class_names)
    else:
        num_classes = top + 1
        class_names = [str(i) for i in range(num_classes)]
    _check_labels(spec, ytr, yva, class_names)
    x_train = torch.from_numpy(np.ascontiguousarray(xtr)).permute(0, 3, 1, 2)
    x_val = torch.from_numpy(np.ascontiguousarray(xva)).permute(0, 3, 1, 2)
    h, w = x_train.shape[2], x_train.shape[3]
    size = img_size if img_size is not None else max(h, w)
    if (h, w) != (size, size):
        _notice(f"resizing {spec} images from {h}x{w} to {size}x{size}")
        x_train, x_val = _resize_uint8(x_train, size), _resize_uint8(x_val, size)
    name = os.path.splitext(os.path.basename(path))[0]
    return _finish(
        name, x_train, torch.from_numpy(ytr), x_val, torch.from_numpy(yva), num_classes, class_names
    )


# ----------------------------------------------------------------------------------------------------
# ImageFolder
# ----------------------------------------------------------------------------------------------------


def _list_split(root: str, split: str, spec: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Class names (sorted subfolders) and (path, class) pairs of one split, files in sorted order."""
    sdir = os.path.join(root, split)
    classes = sorted(e.name for e in os.scandir(sdir) if e.is_dir() and not e.name.startswith("."))
    files: list[tuple[str, str]] = []
    # the rule of fastkd.data.stream's scanner: symlinks are followed, but never into a directory already
    # visited (a cycle) nor from one class into the split or another class (no image under a wrong class)
    ident = lambda d: (os.stat(d).st_dev, os.stat(d).st_ino)  # noqa: E731
    reserved = {ident(sdir)} | {ident(os.path.join(sdir, c)) for c in classes}
    visited: set[tuple[int, int]] = set()
    for c in classes:
        for dirpath, dirnames, filenames in os.walk(os.path.join(sdir, c), followlinks=True):
            visited.add(ident(dirpath))
            keep = []
            for dn in sorted(dirnames):
                try:
                    i = ident(os.path.join(dirpath, dn))
                except OSError:
                    continue
                if i not in visited and i not in reserved:
                    visited.add(i)
                    keep.append(dn)
            dirnames[:] = keep
            for f in sorted(filenames):
                if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith("."):
                    files.append((os.path.join(dirpath, f), c))
    if not files:
        raise ValueError(
            f"--data {spec}: no images found under {sdir}/<class>/ ({', '.join(IMG_EXTENSIONS)}); "
            "put each class's images in its own subfolder"
        )
    return classes, files


def _to_array(img, mode: str, size: int) -> np.ndarray:
    """PIL image -> uint8 [size, size, C] in ``mode`` ('L' or 'RGB'), bilinear resize if needed."""
    from PIL import Image

    if mode == "L" and img.mode.startswith("I"):  # 16/32-bit grayscale: scale 0..65535 -> 0..255
        a = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    elif img.mode != mode:
        img = img.convert(mode)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    a = np.asarray(img, dtype=np.uint8)
    return a[..., None] if a.ndim == 2 else a


def _load_folder(root: str, img_size: int | None) -> Dataset:
    from PIL import Image
    from tqdm.auto import tqdm

    spec = root
    tr_classes, tr_files = _list_split(root, "train", spec)
    va_classes, va_files = _list_split(root, "val", spec)
    if set(tr_classes) != set(va_classes):
        only_tr = sorted(set(tr_classes) - set(va_classes))
        only_va = sorted(set(va_classes) - set(tr_classes))
        raise ValueError(
            f"--data {spec}: class folders differ between train/ and val/ (only in train: {only_tr}; "
            f"only in val: {only_va}); give both splits the same class subfolders"
        )
    classes = sorted(set(tr_classes) | set(va_classes))
    index = {c: i for i, c in enumerate(classes)}
    _check_labels(spec, np.array([index[c] for _, c in tr_files]), np.array([index[c] for _, c in va_files]),
                  classes)
    all_files = tr_files + va_files

    modes: set[str] = set()
    sizes: Counter = Counter()
    for path, _ in tqdm(all_files, desc="scanning images", leave=False, unit="img"):
        try:
            with Image.open(path) as im:
                modes.add(im.mode)
                sizes[im.size] += 1
        except Exception as e:
            raise ValueError(
                f"--data {spec}: cannot read image {path} ({e}); remove or replace the file"
            ) from None
    mode = "L" if modes <= _GRAY_MODES else "RGB"
    if img_size is None:
        (w0, h0), _ = sizes.most_common(1)[0]
        size = min(max(w0, h0), _MAX_DEFAULT_SIZE)
    else:
        size = int(img_size)
    n_resize = sum(k for s, k in sizes.items() if s != (size, size))
    if n_resize:
        _notice(f"resizing {n_resize} of {len(all_files)} images in {spec} to {size}x{size}")

    chans = 1 if mode == "L" else 3
    out = []
    for files in (tr_files, va_files):
        x = np.empty((len(files), chans, size, size), dtype=np.uint8)  # filled in place, no later copy
        y = np.empty(len(files), dtype=np.int64)
        for i, (path, c) in enumerate(tqdm(files, desc="loading images", leave=False, unit="img")):
            try:
                with Image.open(path) as im:
                    x[i] = _to_array(im, mode, size).transpose(2, 0, 1)
            except Exception as e:
                raise ValueError(
                    f"--data {spec}: cannot read image {path} ({e}); remove or replace the file"
                ) from None
            y[i] = index[c]
        out.append((torch.from_numpy(x), torch.from_numpy(y)))
    (x_train, y_train), (x_val, y_val) = out
    name = os.path.basename(os.path.normpath(root)) or "data"
    return _finish(name, x_train, y_train, x_val, y_val, len(classes), classes)


# ----------------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------------


def load_data(spec: str = "digits", *, img_size: int | None = None) -> Dataset:
    """Load a dataset into memory.

    spec:
      * ``"digits"``: scikit-learn's ``load_digits`` (1797 8x8 grayscale images, 10 classes), pixel values
        0..16 scaled to uint8 by ``round(v * 255 / 16)``. FIXED split: stratified 80/20 via
        ``sklearn.model_selection.train_test_split(arange(1797), test_size=0.2, random_state=0, stratify=y)``
        -> 1437 train / 360 val, in the order train_test_split returns.
      * a directory with ``train/`` and ``val/`` in ImageFolder layout (one subfolder per class; the class
        list is the sorted folder names and must be the same set in both splits). Images are read with PIL
        as 'L' if every image is grayscale, else 'RGB' (alpha dropped), and resized (bilinear) to
        img_size x img_size -- non-square images are stretched. Default img_size: the longer side of the
        most common image size, capped at 224. A one-line notice says when images get resized.
      * a ``.npz`` with ``x_train, y_train, x_val, y_val`` (uint8 [N,H,W] or [N,H,W,C], C in 1 or 3;
        integer labels >= 0); optional ``class_names`` (1-D str array). num_classes = len(class_names) or
        max label + 1 over both splits. Non-square images are resized to the longer side.
    img_size: resize everything to this square side (bilinear, antialiased); None keeps the native size
        (see above for ImageFolder).

    Raises FileNotFoundError for a missing path and ValueError for malformed data, each a single line
    that says how to fix it.
    """
    _check_img_size(img_size)
    spec = str(spec)
    if spec == "digits":
        return _load_digits(img_size)
    if os.path.isdir(spec):
        missing = [s for s in ("train", "val") if not os.path.isdir(os.path.join(spec, s))]
        if missing:
            raise ValueError(
                f"--data {spec}: directory has no {' or '.join(s + '/' for s in missing)}; {_EXPECTED}"
            )
        return _load_folder(spec, img_size)
    if os.path.isfile(spec):
        if spec.lower().endswith(".npz"):
            return _load_npz(spec, img_size)
        raise ValueError(f"--data {spec}: not a .npz file; {_EXPECTED}")
    raise FileNotFoundError(f"--data {spec}: no such file or directory; {_EXPECTED}")
