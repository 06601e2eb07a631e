"""Datasets: uint8 tensors in host memory, or a stream decoded by workers when too big.

``load_data(spec)`` understands these kinds of ``--data``:

* ``"digits"`` -- scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), offline.
* ``FILE.npz`` -- arrays ``x_train, y_train, x_val, y_val``; images uint8 [N,H,W] or [N,H,W,C] (C = 1 or 3).
* ``DIR`` (ImageFolder ``train/`` + ``val/``), tar shards, ``synthetic:N`` -- indexed by
  :mod:`fastkd.data.stream`; decoded once into memory when small, else streamed (one line says which).

Every loader returns a :class:`Dataset` with images as uint8 [N, C, H, W] on the CPU (square, H = W =
img_size) or a stream, and int64 labels; augmentation and normalisation happen later, on batches on the
device (fastkd.data.batches, fastkd.data.augment). The device never holds the dataset.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from fastkd.data.folders import walk_images
from fastkd.data.stream import StreamData

__all__ = ["Dataset", "load_data", "fingerprint"]

_MAX_DEFAULT_SIZE = 224
_EXPECTED = (
    "expected 'digits', a directory with train/ and val/ (or class folders + --val-fraction), tar shards "
    "('shards/train-{0000..0099}.tar' with --val-data or --val-fraction), synthetic:N, or a .npz with "
    "x_train, y_train, x_val, y_val"
)


@dataclass(repr=False)
class Dataset:
    """An image classification dataset in memory.

    x_train: uint8 [N, C, H, W]; y_train: int64 [N]; x_val: uint8 [M, C, H, W]; y_val: int64 [M] -- all on
    the CPU. Streamed data (``stream`` set: a :class:`~fastkd.data.stream.StreamData`) has x_train = x_val
    = None: sample id i is row i of the stream's sorted index, decoded by workers when a batch needs it.
    H = W = img_size for both splits; C = in_chans (1 or 3). Labels lie in [0, num_classes).
    mean, std: per-channel pixel mean and (population) standard deviation of the TRAIN split in [0, 1]
    units, i.e. of x_train / 255 over (N, H, W). A constant channel gets std 1.0 (so normalising never
    divides by zero).
    fingerprint: sha256 hex of shapes + uint8 bytes + int64 labels of both splits (see :func:`fingerprint`).
    """

    x_train: torch.Tensor | None
    y_train: torch.Tensor
    x_val: torch.Tensor | None
    y_val: torch.Tensor
    num_classes: int
    in_chans: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    fingerprint: str
    class_names: list[str]
    stream: StreamData | None = None
    val_crop_pct: float = 1.0  # folders, shards: val short side to img_size / val_crop_pct, centre crop

    def __repr__(self) -> str:
        shape = (self.in_chans, self.img_size, self.img_size)
        where = "streamed" if self.stream is not None else "in memory"
        return (
            f"Dataset({self.name!r}: train {len(self.y_train)}, val {len(self.y_val)} x {shape} {where}, "
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
    fp: str | None = None,
    mean_std: tuple | None = None,
) -> Dataset:
    x_train, x_val = x_train.contiguous(), x_val.contiguous()
    y_train, y_val = y_train.to(torch.int64).contiguous(), y_val.to(torch.int64).contiguous()
    mean, std = mean_std if mean_std is not None else _mean_std(x_train)
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
        fingerprint=fp or fingerprint(x_train, y_train, x_val, y_val),
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
# entry point
# ----------------------------------------------------------------------------------------------------


def _default_size(spec: str, log) -> int:
    """--img-size when none is given for a folder: the short side most common among up to 32 image
    headers of train/ (of the folder itself when it has no train/: --val-fraction), no decode, capped at
    224; for shards and synthetic data, 224."""
    from PIL import Image

    sizes: Counter = Counter()
    if os.path.isdir(spec):
        top = os.path.join(spec, "train") if os.path.isdir(os.path.join(spec, "train")) else spec
        for path in walk_images(top):
            if sum(sizes.values()) >= 32:
                break
            try:
                with Image.open(path) as im:
                    sizes[min(im.size)] += 1
            except Exception:
                continue
    size = min(sizes.most_common(1)[0][0], _MAX_DEFAULT_SIZE) if sizes else _MAX_DEFAULT_SIZE
    log(f"{spec}: no --img-size given; using {size}")
    return size


def load_data(
    spec: str = "digits",
    *,
    img_size: int | None = None,
    val_spec: str | None = None,
    val_fraction: float | None = None,
    on_bad_image: str = "error",
    seed: int = 0,
    memory_threshold: float | None = None,
    workers: int | None = None,
    index_cache: str | None = None,
    val_crop_pct: float = 1.0,
    log=_notice,
) -> Dataset:
    """Load a dataset: in memory (uint8 CPU tensors) or, when too big, as a stream (``Dataset.stream``).

    spec:
      * ``"digits"``: scikit-learn's ``load_digits`` (1797 8x8 grayscale images, 10 classes), pixel values
        0..16 scaled to uint8 by ``round(v * 255 / 16)``. FIXED split: stratified 80/20 via
        ``sklearn.model_selection.train_test_split(arange(1797), test_size=0.2, random_state=0, stratify=y)``
        -> 1437 train / 360 val, in the order train_test_split returns.
      * a ``.npz`` with ``x_train, y_train, x_val, y_val`` (uint8 [N,H,W] or [N,H,W,C], C in 1 or 3;
        integer labels >= 0); optional ``class_names`` (1-D str array). num_classes = len(class_names) or
        max label + 1 over both splits. Non-square images are resized to the longer side.
      * a directory with ``train/`` and ``val/`` (ImageFolder), tar shards (``val_spec``: the val shards),
        or ``synthetic:N`` -- indexed by :func:`fastkd.data.stream.open_stream` (no decode), each image
        decoded as the stream decodes it (short side to img_size, centre crop). When both splits
        decoded fit under ``memory_threshold`` GiB (default 2) they are decoded once into memory through
        the same loader (same pixels), else streamed by ``workers`` processes; one line says which.
        Default img_size: a folder's most common short side (capped at 224), else 224.
    img_size: resize everything to this square side; None keeps the native size (see above).
    val_fraction: for a folder or shards without a val split, hold out this share of each class as val
      (:func:`fastkd.data.folders.hold_out`).
    val_crop_pct: folders and shards: val images are decoded with the short side at img_size / val_crop_pct,
      then centre-cropped (the timm / DeiT ImageNet protocol: 0.875); 1 = the whole short side, as train.

    Raises FileNotFoundError for a missing path and ValueError for malformed data, each a single line
    that says how to fix it.
    """
    _check_img_size(img_size)
    spec = str(spec)
    if not 0.0 < val_crop_pct <= 1.0:
        raise ValueError(f"--val-crop-pct {val_crop_pct}: use a fraction in (0, 1] (timm/DeiT eval: 0.875)")
    decoded = spec == "digits" or spec.lower().endswith(".npz") or spec.startswith("synthetic:")
    if val_crop_pct != 1.0 and decoded:
        raise ValueError(
            f"--val-crop-pct {val_crop_pct}: only image folders and tar shards are decoded (and cropped) by "
            f"fastkd; --data {spec} comes decoded, so drop --val-crop-pct"
        )
    if spec == "digits":
        return _load_digits(img_size)
    if os.path.isfile(spec) and spec.lower().endswith(".npz"):
        return _load_npz(spec, img_size)
    from fastkd.data import stream as S

    if not S.is_stream_spec(spec):
        if os.path.isfile(spec):
            raise ValueError(f"--data {spec}: not a .npz file, a .tar shard or a directory; {_EXPECTED}")
        raise FileNotFoundError(f"--data {spec}: no such file or directory; {_EXPECTED}")
    size = img_size if img_size is not None else _default_size(spec, log)
    sd = S.open_stream(spec, img_size=size, val_spec=val_spec, val_fraction=val_fraction,
                       on_bad_image=on_bad_image, seed=seed, val_crop_pct=val_crop_pct,
                       index_cache=index_cache, log=log)
    # the label rules of .npz, for folders and shards too (one class: error; empty/unseen classes: a warning)
    _check_labels(spec, np.asarray(sd.y_train), np.asarray(sd.y_val), list(sd.class_names))
    thr = S.DEFAULT_MEMORY_THRESHOLD if memory_threshold is None else int(memory_threshold * 2**30)
    if S.plan_storage(sd, thr, log=log) == "memory":
        xs = [S.materialize(ds, workers=workers) for ds in (sd.train, sd.val)]
        # mean/std as when streamed (same ids, same arithmetic): same fingerprint, same normalisation
        d = _finish(sd.name, xs[0], sd.y_train, xs[1], sd.y_val, sd.num_classes, sd.class_names,
                    fp=sd.fingerprint, mean_std=S.estimate_mean_std(sd.train, x=xs[0]))
        return replace(d, val_crop_pct=float(val_crop_pct))
    mean, std = S.estimate_mean_std(sd.train, workers=workers)
    return Dataset(
        x_train=None, y_train=sd.y_train, x_val=None, y_val=sd.y_val, num_classes=sd.num_classes,
        in_chans=sd.in_chans, img_size=sd.img_size, mean=mean, std=std, name=sd.name,
        fingerprint=sd.fingerprint, class_names=list(sd.class_names), stream=sd,
        val_crop_pct=float(val_crop_pct),
    )
