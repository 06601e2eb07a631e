"""``python -m fastkd.predict``: classify images with a trained student (or any model fastkd saved).

    python -m fastkd.predict runs/X IMAGE_OR_FOLDER [...] [--topk 5] [--csv preds.csv]

The model is rebuilt from its ``student.safetensors`` (architecture and sha256 checked as for
``--teacher``). Each image is prepared as the validation split was during training: decoded by the same
loader code (short side to the model's image size, centre crop, its channel count), normalised with the
mean/std the model was trained with, and scored by the method's eval rule (a distilled student: the mean of
its heads) in the run's eval precision (bf16 autocast on CUDA unless it ran with amp off). Folders are
scanned recursively in sorted order. One line per image on stdout (``path<TAB>name p, name p, …``), or a
CSV written atomically with ``--csv``. An unreadable image is one line naming it and stops the run, or with
``--on-bad-image skip`` is reported and left out.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fastkd.data.augment import eval_batch
from fastkd.data.folders import IMG_EXTENSIONS, BadImageError, _Source, _Strings, walk_images
from fastkd.data.loader import StreamDataset, default_workers
from fastkd.methods.registry import eval_dense_heads
from fastkd.models import forward_taps
from fastkd.models.checkpoints import load_model, set_verify
from fastkd.train.evaluate import head_logits
from fastkd.utils import atomic_write_text

__all__ = ["image_paths", "load_predictor", "main", "predict"]

_NEEDS = ("input_mean", "input_std", "img_size", "in_chans", "num_classes")


class PathSource(_Source):
    """Image files by path (label 0: prediction has none)."""

    def __init__(self, paths: list[str]):
        self._keys = _Strings(paths)
        self.labels = torch.zeros(len(paths), dtype=torch.int64)
        self.fingerprint = ""

    def open(self, i: int):
        return open(self.key(i), "rb")


def image_paths(inputs: list[str]) -> list[str]:
    """Every image among ``inputs``: files as given, folders scanned recursively (``walk_images``: hidden
    entries skipped, symlink cycles entered once), sorted. A missing path, a file that is not an image, or
    no image at all: one line (ValueError)."""
    out: list[str] = []
    for spec in inputs:
        if os.path.isfile(spec):
            if not spec.lower().endswith(IMG_EXTENSIONS):
                raise ValueError(f"{spec}: not an image file ({', '.join(IMG_EXTENSIONS)})")
            out.append(spec)
        elif os.path.isdir(spec):
            out += sorted(walk_images(spec))
        else:
            raise FileNotFoundError(f"{spec}: no such file or folder")
    if not out:
        raise ValueError(f"no images in {', '.join(inputs)} ({', '.join(IMG_EXTENSIONS)})")
    return out


def load_predictor(model_path: str, device: torch.device, ema: bool = False) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode on ``device``, its meta) from a ``.safetensors`` fastkd wrote or a run folder (its
    student, or with ``ema`` its EMA student: ``--ema-decay``)."""
    p = Path(model_path)
    if p.is_dir():
        name = "student_ema.safetensors" if ema else "student.safetensors"
        p = p / name
        if not p.is_file():
            why = "was it trained with --ema-decay, and has it ended?" if ema else "has the run ended?"
            raise FileNotFoundError(f"{model_path}: no {name} in this folder ({why})")
    elif ema:
        raise ValueError(f"--ema picks a run folder's student_ema.safetensors; {model_path} is a file: "
                         "drop --ema (or give the EMA file itself)")
    model, meta = load_model(p, map_location=device)
    missing = [k for k in _NEEDS if k not in meta]
    if missing:
        raise ValueError(
            f"{p}: its metadata lacks {', '.join(missing)} (the input it expects); predict with a model "
            "saved by fastkd.train"
        )
    return model.eval(), meta


@torch.no_grad()
def predict(
    model: torch.nn.Module, meta: dict, paths: list[str], *, topk: int = 5, batch_size: int = 128,
    workers: int | None = None, device: torch.device | None = None, on_bad_image: str = "error",
    progress: bool = True, log=print,
) -> list[tuple[str, list[tuple[int, float]]]]:
    """[(path, [(class index, probability)] × topk)] for every readable image, in ``paths`` order."""
    device = device or next(model.parameters()).device
    ds = StreamDataset(PathSource(paths), img_size=meta["img_size"], in_chans=meta["in_chans"],
                       crop_pct=float(meta.get("val_crop_pct", 1.0)))
    workers = default_workers() if workers is None else workers
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch_size, num_workers=min(workers, max(0, len(paths) // batch_size)),
        collate_fn=list, pin_memory=device.type == "cuda",
    )
    dense = eval_dense_heads(meta.get("method", ""))
    amp = device.type == "cuda" and meta.get("eval_amp", True)  # bf16 on CUDA iff the run evaluated so
    k = max(1, min(topk, meta["num_classes"]))
    rows: list[tuple[str, list[tuple[int, float]]]] = []
    bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress, leave=False)
    for items in loader:
        for err in (it[3] for it in items if it[3]):  # StreamDataset's line (never raised in a worker)
            if on_bad_image == "error":
                raise BadImageError(err.replace("--on-bad-image skip", "--on-bad-image skip to leave it out"))
            log(f"fastkd.predict: skipped: {err.split('; remove')[0]}")
        good = [(x, i) for x, i, _, err in items if not err]
        bar.update(len(items))
        if not good:
            continue
        xb = torch.stack([x for x, _ in good]).to(device, non_blocking=True)
        x = eval_batch(xb, meta["input_mean"], meta["input_std"])
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            taps = forward_taps(model, x, dense=dense)
        p, idx = head_logits(taps).softmax(-1).topk(k, dim=-1)
        for (_, i), pr, ix in zip(good, p.cpu().tolist(), idx.cpu().tolist(), strict=True):
            rows.append((paths[i], list(zip(ix, pr, strict=True))))
    bar.close()
    return rows


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastkd.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a run folder (its student.safetensors) or a .safetensors fastkd saved")
    p.add_argument("inputs", nargs="+", help="image files and/or folders (scanned recursively)")
    p.add_argument("--topk", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--csv", default=None, help="write path, then class/probability pairs, to this CSV")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: CPUs - 1)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--on-bad-image", choices=("error", "skip"), default="error")
    p.add_argument("--ema", action="store_true",
                   help="the run folder's EMA student (student_ema.safetensors, from --ema-decay)")
    p.add_argument("--no-verify", action="store_true", help="skip the checkpoint's sha256 check")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        if a.topk < 1 or a.batch_size < 1:
            raise ValueError("--topk and --batch-size must be at least 1")
        if a.device == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            device = torch.device(a.device)
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"--device {a.device}: no CUDA device here; use --device cpu")
        set_verify(not a.no_verify)
        paths = image_paths(a.inputs)
        model, meta = load_predictor(a.model, device, ema=a.ema)
        log = (lambda m: print(m, file=sys.stderr))
        rows = predict(model, meta, paths, topk=a.topk, batch_size=a.batch_size, workers=a.workers,
                       device=device, on_bad_image=a.on_bad_image, progress=not a.quiet, log=log)
    except (ValueError, FileNotFoundError) as e:
        print(f"fastkd.predict: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastkd.predict: interrupted; nothing written", file=sys.stderr)
        return 130
    names = meta.get("class_names") or [str(i) for i in range(meta["num_classes"])]
    if a.csv:
        buf = io.StringIO()
        w = csv.writer(buf)
        k = len(rows[0][1]) if rows else 0
        w.writerow(["path", *[f"{c}{j}" for j in range(1, k + 1) for c in ("class", "p")]])
        for path, top in rows:
            w.writerow([path, *[v for i, pr in top for v in (names[i], f"{pr:.6f}")]])
        atomic_write_text(a.csv, buf.getvalue())
        print(f"fastkd.predict: {len(rows)} of {len(paths)} images → {a.csv}", file=sys.stderr)
    else:
        for path, top in rows:
            print(path + "\t" + ", ".join(f"{names[i]} {pr:.3f}" for i, pr in top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
