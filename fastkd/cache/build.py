"""``python -m fastkd.cache``: precompute teacher outputs to disk; ``CachedTeacher`` serves them.

What is cached, per training sample per *view* (augmentation draw): the named teacher signals the
chosen ``--method`` consumes (``DistillLoss.teacher_signals``, same names, so the losses cannot tell a
cached teacher from an online one):

* ``logits`` — sparse top-K by default (``--logits topk``): ``topk_vals`` fp16 [K] (raw teacher
  logits), ``topk_ids`` int16 [K] (int32 when C > 32767), ``topk_lse`` fp32 [] (logsumexp of the full
  logits at T = 1): 4K+4 bytes per record. ``--logits dense`` stores fp16 [C].
* feature signals, when ``--method`` asks for them (``vitkd_0``, ``vitkd_1``, ``vitkd_last`` for ViTKD;
  whatever names the [CLS]-KD / CSKD parts declare): ``--feat-dtype`` (fp16 by default).

Views: the augmentation of sample ``id`` in view ``v`` is a pure function of (seed, v, id) — mixup/cutmix
partner and λ included (fastkd.data.augment) — so training epoch e uses view ``e mod V`` and regenerates the
very images the teacher saw. The images themselves are never stored.

Layout of a cache directory::

    manifest.json                      format, fastkd version, teacher (source, sha256, ModelInfo, top-1),
                                       data fingerprint, augmentation config + seed, views, fields
                                       (dtype, per-record shape), shard size, the full run config, and,
                                       once complete, every shard file with its byte size and sha256
    v0000-s000000.<field>.npy          one .npy per (view, shard of ``shard_size`` ids, field):
                                       rows = sample ids [start, stop), memory-mapped when reading
    v0000-s000000.done.json            resume record of a finished shard (its files' sha256)

Writes are atomic: a shard's arrays are filled in ``.<name>.tmp`` files, fsync'ed, hashed and renamed;
then its ``.done.json`` is written (temp + rename). An interrupted build restarts where it stopped and
never recomputes a shard whose files match their recorded checksums. Independent workers
(``--worker i/n``) build disjoint shards of the same directory; whoever finishes last writes the final
manifest.

Reading (``CachedTeacher``): the manifest is validated against the run (teacher, data, augmentation,
seed; then the signals the loss needs), shard sizes are checked at open and checksums verified (all at
open for caches up to ``VERIFY_AT_OPEN_BYTES``, else on a shard's first touch), and a background thread
gathers the next batches' records while the current step runs (``prefetch_epoch``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastkd import __version__
from fastkd.utils import atomic_write_json

__all__ = [
    "CacheError",
    "CachedTeacher",
    "build_cache",
    "default_topk",
    "main",
    "read_manifest",
    "record_bytes",
    "topk_record",
    "verify_cache",
]

FORMAT = "fastkd-teacher-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOPK_FIELDS = ("topk_vals", "topk_ids", "topk_lse")
DEFAULT_TOPK = 10
"""Default K: the record budget is 4·10 + 4 = 44 bytes (fp16 values + int16 ids + fp32 lse); with int32
ids (C > 32767) K shrinks to keep within it (6 → 40 bytes)."""
VERIFY_AT_OPEN_BYTES = 1 << 30
"""Caches up to this size have every shard checksum verified when opened; bigger ones per shard on first
touch (in the prefetch thread)."""
DEFAULT_MAX_GB = 50.0
FP16_MAX = 65504.0


class CacheError(ValueError):
    """A cache that cannot be used or built as asked; the message is one line naming the fix."""


# ------------------------------------------------------------------------------------------------ records
def ids_dtype(num_classes: int) -> np.dtype:
    """Class-id dtype of a top-K record: int16 when every id fits (C ≤ 32767), else int32."""
    return np.dtype(np.int16) if num_classes <= 32767 else np.dtype(np.int32)


def default_topk(num_classes: int, budget_k: int = DEFAULT_TOPK) -> int:
    """Largest K ≤ C whose record fits in 4·budget_k + 4 bytes (fp16 value + id per entry, fp32 lse)."""
    per = 2 + ids_dtype(num_classes).itemsize
    return max(1, min(num_classes, (4 * budget_k) // per))


def record_bytes(fields: dict[str, dict]) -> int:
    """Bytes of one (sample, view) record: Σ over fields of prod(shape) · itemsize."""
    return sum(int(np.prod(f["shape"], dtype=np.int64)) * np.dtype(f["dtype"]).itemsize
               for f in fields.values())


def topk_record(logits: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """Dense teacher logits [B, C] → sparse record (CPU tensors).

    Returns topk_vals fp16 [B, K] (largest logits, descending), topk_ids [B, K] (int16 if C ≤ 32767 else
    int32), topk_lse fp32 [B] = logsumexp_c logits (fp32, T = 1). Semantics: fastkd.ops.reference.
    """
    z = logits.detach().float()
    C = z.shape[-1]
    if not 1 <= k <= C:
        raise CacheError(f"--topk {k}: need 1 <= K <= C = {C}")
    vals, ids = z.topk(k, dim=-1)
    lse = torch.logsumexp(z, dim=-1)
    it = torch.int16 if C <= 32767 else torch.int32
    return {"topk_vals": vals.half().cpu(), "topk_ids": ids.to(it).cpu(), "topk_lse": lse.cpu()}


def _np_dtype_name(t: torch.dtype) -> str:
    return str(torch.empty(0, dtype=t).numpy().dtype)


def _field_layout(probe: dict[str, torch.Tensor], num_classes: int, logits: str, topk: int | None,
                  feat_dtype: str) -> dict[str, dict]:
    """Field name → {"dtype", "shape" (per record), "source"} from one online teacher output."""
    fields: dict[str, dict] = {}
    for name, t in sorted(probe.items()):
        shape = list(t.shape[1:])
        if name == "logits" and logits == "topk":
            k = topk or default_topk(num_classes)
            fields["topk_vals"] = {"dtype": "float16", "shape": [k], "source": "logits"}
            fields["topk_ids"] = {"dtype": str(ids_dtype(num_classes)), "shape": [k], "source": "logits"}
            fields["topk_lse"] = {"dtype": "float32", "shape": [], "source": "logits"}
        elif name == "logits":
            fields["logits"] = {"dtype": "float16", "shape": shape, "source": "logits"}
        elif t.is_floating_point():
            fields[name] = {"dtype": feat_dtype, "shape": shape, "source": name}
        else:
            fields[name] = {"dtype": _np_dtype_name(t.dtype), "shape": shape, "source": name}
    return fields


def _to_records(sig: dict[str, torch.Tensor], fields: dict[str, dict]) -> dict[str, np.ndarray]:
    """Online signals [B, ...] → the cached arrays of every field (numpy, the field's dtype)."""
    out: dict[str, np.ndarray] = {}
    if "topk_vals" in fields:
        rec = topk_record(sig["logits"], fields["topk_vals"]["shape"][0])
        out.update({k: v.numpy() for k, v in rec.items()})
    for name, f in fields.items():
        if name in TOPK_FIELDS:
            continue
        t = sig[f["source"]].detach()
        dt = np.dtype(f["dtype"])
        if dt == np.float16 and t.is_floating_point():
            big = t.abs().max().item() if t.numel() else 0.0  # build path: a host sync per batch is fine
            if not math.isfinite(big) or big > FP16_MAX:
                raise CacheError(
                    f"teacher signal {name!r} has values up to {big:.3g}, beyond float16; rebuild with "
                    f"--feat-dtype float32"
                )
        t = t.float() if t.is_floating_point() else t
        out[name] = t.cpu().numpy().astype(dt)
    return out


# ---------------------------------------------------------------------------------------------- identity
def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def state_sha256(model: torch.nn.Module) -> str:
    """sha256 of a model's state dict (names, dtypes, shapes, bytes) — for teachers given by timm name."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        a = v.detach().cpu().contiguous()
        h.update(f"{k}:{a.dtype}:{tuple(a.shape)};".encode())
        h.update(a.view(torch.uint8).numpy().tobytes() if a.numel() else b"")
    return h.hexdigest()


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def run_teacher_identity(cfg, data) -> dict:
    """The teacher a run would use, without loading it: {"source", "sha256" (or None), "default_key"}.

    ``--teacher FILE`` → the file's sha256; ``--teacher NAME`` (timm) → the name; no ``--teacher`` → the
    default teacher of this data and recipe (``fastkd.train.ensure_default_teacher``'s key), with its
    checkpoint's sha256 when it has been trained already.
    """
    if cfg.model.teacher:
        src = str(cfg.model.teacher)
        sha = file_sha256(src) if os.path.isfile(src) else None
        return {"source": src, "sha256": sha, "default_key": None}
    from fastkd.config import parse_methods
    from fastkd.train.trainer import default_teacher_spec

    _, tdir = default_teacher_spec(cfg, data, cnn="cskd" in parse_methods(cfg.method.method))
    key, path = tdir.name, tdir / "student.safetensors"
    sha = file_sha256(path) if path.is_file() else None
    return {"source": str(path), "sha256": sha, "default_key": key}


def _short(sha: str | None) -> str:
    return sha[:12] if sha else "?"


def _teacher_mismatch(man_t: dict, run_t: dict) -> str | None:
    if man_t.get("sha256") and run_t.get("sha256"):
        if man_t["sha256"] == run_t["sha256"]:
            return None
        return (f"teacher differs: cache holds {man_t['source']} (sha256 {_short(man_t['sha256'])}), "
                f"run uses {run_t['source']} (sha256 {_short(run_t['sha256'])}); rebuild the cache with this "
                f"teacher or train with --teacher {man_t['source']}")
    if run_t.get("default_key"):
        if man_t.get("default_key") == run_t["default_key"]:
            return None
        return (f"teacher differs: cache holds {man_t['source']}, run uses the default teacher "
                f"{run_t['default_key']} (not trained yet); train with --teacher {man_t['source']} "
                f"or rebuild the cache")
    if man_t.get("source") == run_t.get("source"):
        return None
    return (f"teacher differs: cache holds {man_t.get('source')}, run uses {run_t.get('source')}; "
            f"rebuild the cache with this teacher or train with --teacher {man_t.get('source')}")


def _first_diff(a: dict, b: dict) -> str | None:
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            return k
    return None


def check_run(man: dict, cfg, data, aug, where: str = "") -> None:
    """Raise CacheError (one line naming the first difference) unless the cache fits this run."""
    pre = f"teacher cache {where}: " if where else "teacher cache: "
    d = man["data"]
    if data is not None and (d["fingerprint"] != data.fingerprint or d["n_train"] != len(data.y_train)):
        raise CacheError(
            f"{pre}data differs: cache built on {d['name']} ({d['n_train']} train images, fingerprint "
            f"{_short(d['fingerprint'])}), run uses {data.name} ({len(data.y_train)} train images, "
            f"fingerprint {_short(data.fingerprint)}); rebuild the cache for this data "
            f"(same --data/--img-size/--train-limit)"
        )
    if cfg is not None and int(man["seed"]) != int(cfg.run.seed):
        raise CacheError(
            f"{pre}seed differs: cache built with --seed {man['seed']}, run uses --seed {cfg.run.seed} (the "
            f"augmentation stream depends on it); train with --seed {man['seed']} or rebuild the cache"
        )
    if aug is not None:
        run_aug = _jsonable(vars(aug))
        k = _first_diff(man["augment"], run_aug)
        if k is not None:
            raise CacheError(
                f"{pre}augmentation differs: {k} is {man['augment'].get(k)!r} in the cache, "
                f"{run_aug.get(k)!r} in the run; rebuild the cache with the run's augmentation flags"
            )
    if cfg is not None and (data is not None or cfg.model.teacher):
        msg = _teacher_mismatch(man["teacher"], run_teacher_identity(cfg, data))
        if msg:
            raise CacheError(pre + msg)


def _part_signatures(loss) -> list[dict]:
    """Per loss part that reads teacher signals: its name, signal names and the teacher blocks behind
    them, in pair order when the part has layer pairs (``pairs`` = [(student, teacher)])."""
    out = []
    for p in loss.parts:
        if not p.signals:
            continue
        pairs = getattr(p, "pairs", None)
        blocks = [int(j) for _, j in pairs] if pairs else [int(b) for b in p.teacher_blocks()]
        out.append({"name": p.name, "signals": sorted(p.signals), "teacher_blocks": blocks})
    return out


# ----------------------------------------------------------------------------------------------- manifest
def read_manifest(path: str | os.PathLike, *, complete: bool = True) -> dict:
    """Load and sanity-check ``DIR/manifest.json``; CacheError (one line) when absent/unreadable/partial."""
    p = Path(path)
    mf = p / MANIFEST
    if not mf.is_file():
        what = "does not exist" if not p.exists() else f"has no {MANIFEST}"
        raise CacheError(f"teacher cache {p} {what}; build it with python -m fastkd.cache --out {p}")
    try:
        man = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(
            f"teacher cache {mf} is corrupted ({e}); rebuild it with python -m fastkd.cache"
        ) from None
    if man.get("format") != FORMAT or man.get("format_version") != FORMAT_VERSION:
        raise CacheError(
            f"teacher cache {p}: format {man.get('format')!r} v{man.get('format_version')} is not "
            f"{FORMAT} v{FORMAT_VERSION}; rebuild it with this fastkd"
        )
    if complete and not man.get("complete"):
        done = len(list(p.glob("*.done.json")))
        raise CacheError(
            f"teacher cache {p} is incomplete ({done}/{man.get('num_shards')} shards); finish it by "
            f"re-running the same python -m fastkd.cache command"
        )
    return man


def _shard_list(n: int, views: int, shard_size: int) -> list[dict]:
    out = []
    for v in range(views):
        for j, start in enumerate(range(0, n, shard_size)):
            out.append({"name": f"v{v:04d}-s{j:06d}", "view": v, "index": j, "start": start,
                        "stop": min(n, start + shard_size)})
    return out


_SPEC_KEYS = ("format_version", "teacher.sha256", "teacher.source", "data.fingerprint", "data.n_train",
              "augment", "seed", "views", "fields", "shard_size", "blocks", "dense", "logits")


def _spec_get(man: dict, key: str):
    v: Any = man
    for part in key.split("."):
        v = v.get(part) if isinstance(v, dict) else None
    return v


# ------------------------------------------------------------------------------------------------- build
class _Interrupted(RuntimeError):
    """Raised by ``build_cache(stop_after=k)`` (tests: a build killed after k shards)."""


def _teacher_for_build(cfg, trainer, log):
    """(model, identity dict) of the teacher named by cfg (the default teacher, trained if needed)."""
    from fastkd.models import resolve_model
    from fastkd.train.trainer import ensure_default_teacher

    d = trainer.data
    mk = dict(num_classes=d.num_classes, img_size=d.img_size, in_chans=d.in_chans)
    if cfg.model.teacher:
        src = str(cfg.model.teacher)
        model = resolve_model(src, **mk)
        sha = file_sha256(src) if os.path.isfile(src) else state_sha256(model)
        ident = {"source": src, "sha256": sha, "default_key": None}
    else:
        from fastkd.config import parse_methods

        path = ensure_default_teacher(cfg, d, log=log, cnn="cskd" in parse_methods(cfg.method.method))
        model = resolve_model(str(path), **mk)
        ident = {"source": str(path), "sha256": file_sha256(path), "default_key": path.parent.name}
    return model.to(trainer.device), ident


def _builder_trainer(cfg, log):
    """A plain-CE Trainer on the same data/augmentation/student: its ``batch`` makes the training images."""
    from fastkd.config import TrainConfig
    from fastkd.train.trainer import Trainer

    c = TrainConfig.from_dict(cfg.to_dict())
    c.method.method, c.method.ce_weight = "ce", 1.0
    c.run.teacher_cache, c.run.compile, c.run.resume = None, False, False
    return Trainer(c, log=log)


def _write_shard(out: Path, shard: dict, fields: dict, fill) -> dict:
    """Fill one shard's arrays via ``fill(arrays)`` in temp files, fsync, hash, rename; return its files."""
    n = shard["stop"] - shard["start"]
    tmps, arrays = {}, {}
    for f, spec in fields.items():
        tmp = out / f".{shard['name']}.{f}.npy.tmp"
        tmps[f] = tmp
        arrays[f] = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(spec["dtype"]),
                                              shape=(n, *spec["shape"]))
    fill(arrays)
    files = {}
    for f in fields:
        arrays[f].flush()
        with open(tmps[f], "rb+") as fh:
            os.fsync(fh.fileno())
        final = out / f"{shard['name']}.{f}.npy"
        files[f] = {"file": final.name, "sha256": file_sha256(tmps[f]), "bytes": os.path.getsize(tmps[f])}
        os.replace(tmps[f], final)
    arrays.clear()
    return files


def _shard_done(out: Path, shard: dict) -> dict | None:
    """The recorded files of a finished shard if they are all present and intact, else None."""
    marker = out / f"{shard['name']}.done.json"
    if not marker.is_file():
        return None
    try:
        rec = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    for info in rec.get("files", {}).values():
        p = out / info["file"]
        if not p.is_file() or os.path.getsize(p) != info["bytes"] or file_sha256(p) != info["sha256"]:
            return None
    return rec["files"]


def build_cache(
    cfg,
    out: str | os.PathLike,
    *,
    views: int = 1,
    logits: str = "topk",
    topk: int | None = None,
    feat_dtype: str = "float16",
    max_gb: float = DEFAULT_MAX_GB,
    shard_size: int | None = None,
    batch_size: int = 256,
    worker: tuple[int, int] = (0, 1),
    log=print,
    progress: bool = True,
    stop_after: int | None = None,
) -> dict:
    """Run the teacher over every (view, training sample) and write the cache to ``out``.

    cfg: a TrainConfig — data, augmentation flags, seed, teacher (None = the default teacher, trained
    first if needed), student flags and ``method`` (which signals to store). The images of view v are
    ``Trainer.batch(ids, v)`` of a run with the same config, so training replays them exactly.
    logits: 'topk' (K = ``topk`` or ``default_topk(C)``) or 'dense'. feat_dtype: 'float16' | 'float32'.
    max_gb: refuse (before writing anything) when the cache would be bigger.
    shard_size: ids per shard (default: min(N, 50000, ~256 MiB of records)).
    worker (i, n): build only shards i, i+n, …; the last worker to finish writes the final manifest.
    stop_after: raise after writing that many shards (simulates a killed build; tests).
    Returns the manifest (complete, or not yet when other workers are still building) plus
    ``built``/``skipped`` lists of this call's shard names.
    """
    from tqdm.auto import tqdm

    from fastkd.config import parse_methods
    from fastkd.methods.registry import build_loss
    from fastkd.models import model_info
    from fastkd.teachers.online import OnlineTeacher

    out = Path(out)
    if views < 1:
        raise CacheError(f"--views {views}: use at least 1 view")
    if logits not in ("topk", "dense"):
        raise CacheError(f"--logits {logits!r}: use 'topk' or 'dense'")
    if feat_dtype not in ("float16", "float32"):
        raise CacheError(f"--feat-dtype {feat_dtype!r}: use 'float16' or 'float32'")
    wi, wn = worker
    if not (wn >= 1 and 0 <= wi < wn):
        raise CacheError(f"--worker {wi}/{wn}: use i/n with 0 <= i < n")
    methods = parse_methods(cfg.method.method)
    if all(m == "ce" for m in methods):
        raise CacheError("--method ce needs no teacher, so there is nothing to cache; pick e.g. --method kd")

    trainer = _builder_trainer(cfg, log)
    d = trainer.data
    t_model, ident = _teacher_for_build(cfg, trainer, log)
    t_info = model_info(t_model)
    loss = build_loss(cfg.method, trainer.s_info, t_info, epochs=cfg.optim.epochs)
    teacher = OnlineTeacher(t_model, loss.teacher_blocks(), loss.teacher_signals, dense=loss.teacher_dense())
    amp = cfg.run.amp and trainer.device.type == "cuda"

    def run_teacher(ids: torch.Tensor, view: int) -> dict[str, torch.Tensor]:
        x, _, _ = trainer.batch(ids, view)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            return teacher(x, ids=ids, view=view)

    n = len(d.y_train)
    probe = run_teacher(torch.arange(min(2, n)), 0)
    fields = _field_layout(probe, d.num_classes, logits, topk, feat_dtype)
    rb = record_bytes(fields)
    total = views * n * rb
    desc = ", ".join(f"{k} {v['dtype']}{v['shape']}" for k, v in fields.items())
    log(f"fastkd.cache: {views} view(s) x {n} samples x {rb} B/record ({desc}) = {_fmt_bytes(total)}")
    if total > max_gb * 1e9:
        raise CacheError(
            f"the cache would take {total / 1e9:.3f} GB > --max-gb {max_gb:g}; use fewer --views, "
            f"--logits topk or a smaller --topk, fewer feature methods, --feat-dtype float16, "
            f"or raise --max-gb"
        )
    if shard_size is None:
        shard_size = min(n, 50_000, max(256, (256 << 20) // max(1, rb)))
    if shard_size < 1:
        raise CacheError(f"--shard-size {shard_size}: use a positive number of samples per shard")
    shards = _shard_list(n, views, shard_size)

    man = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fastkd_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "teacher": {**ident, "info": _jsonable(dataclasses.asdict(t_info)), "top1": None},
        "data": {"name": d.name, "fingerprint": d.fingerprint, "n_train": n, "num_classes": d.num_classes,
                 "img_size": d.img_size, "in_chans": d.in_chans},
        "augment": _jsonable(vars(trainer.aug)),
        "seed": int(cfg.run.seed),
        "views": int(views),
        "method": cfg.method.method,
        "student": {"arch": trainer.student_arch[0], "overrides": _jsonable(trainer.student_arch[1])},
        "blocks": loss.teacher_blocks(),
        "parts": _part_signatures(loss),
        "dense": loss.teacher_dense(),
        "logits": logits,
        "topk": fields["topk_vals"]["shape"][0] if "topk_vals" in fields else None,
        "fields": fields,
        "record_bytes": rb,
        "total_bytes": total,
        "shard_size": int(shard_size),
        "num_shards": len(shards),
        "amp": amp,
        "config": _jsonable(cfg.to_dict()),
        "complete": False,
    }
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST).is_file():
        old = read_manifest(out, complete=False)
        for key in _SPEC_KEYS:
            if _spec_get(old, key) != _spec_get(man, key):
                raise CacheError(
                    f"--out {out} already holds a different cache ({key}: {_spec_get(old, key)!r} there, "
                    f"{_spec_get(man, key)!r} now); use another --out or delete that directory"
                )
        if old.get("complete"):
            log(f"fastkd.cache: {out} is already complete ({len(shards)} shards)")
            return {**old, "built": [], "skipped": [s["name"] for s in shards]}
        man["teacher"]["top1"] = old["teacher"]["top1"]
        man["created"] = old.get("created", man["created"])
    else:
        man["teacher"]["top1"] = trainer.evaluate_model(t_model)["top1"]
        atomic_write_json(out / MANIFEST, man)

    mine = [s for i, s in enumerate(shards) if i % wn == wi]
    todo, skipped = [], []
    for s in mine:
        (skipped if _shard_done(out, s) is not None else todo).append(s)
    if skipped:
        log(f"fastkd.cache: resuming: {len(skipped)} finished shard(s) kept, {len(todo)} to build")
    built = []
    bar = tqdm(total=sum(s["stop"] - s["start"] for s in todo), desc="teacher cache", unit="img",
               disable=not progress, leave=False, dynamic_ncols=True)
    for s in todo:
        if stop_after is not None and len(built) >= stop_after:
            bar.close()
            raise _Interrupted(f"build stopped after {stop_after} shard(s) (stop_after)")

        def fill(arrays, s=s):
            for a in range(s["start"], s["stop"], batch_size):
                b = min(s["stop"], a + batch_size)
                recs = _to_records(run_teacher(torch.arange(a, b), s["view"]), fields)
                for f, arr in arrays.items():
                    arr[a - s["start"] : b - s["start"]] = recs[f]
                bar.update(b - a)

        files = _write_shard(out, s, fields, fill)
        atomic_write_json(out / f"{s['name']}.done.json", {**s, "files": files})
        built.append(s["name"])
    bar.close()
    return {**_finalize(out, man, shards, log), "built": built, "skipped": [s["name"] for s in skipped]}


def _finalize(out: Path, man: dict, shards: list[dict], log) -> dict:
    """Write the complete manifest once every shard has its done record (any worker may do it)."""
    recs = {}
    for s in shards:
        p = out / f"{s['name']}.done.json"
        if not p.is_file():
            missing = sum(not (out / f"{t['name']}.done.json").is_file() for t in shards)
            log(f"fastkd.cache: this worker is done; {missing} shard(s) still being built by other workers")
            return man
        recs[s["name"]] = json.loads(p.read_text())
    man = {**man, "complete": True, "shards": {
        name: {k: r[k] for k in ("view", "index", "start", "stop", "files")} for name, r in recs.items()}}
    atomic_write_json(out / MANIFEST, man)
    log(f"fastkd.cache: complete: {len(shards)} shard(s), {_fmt_bytes(man['total_bytes'])} in {out}")
    return man


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if b < 1000 or unit == "TB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.2f} {unit}"
        b /= 1000
    return f"{b:.2f} TB"


# -------------------------------------------------------------------------------------------------- read
_END = object()


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

    Attributes: ``info`` (teacher ModelInfo), ``teacher_top1``, ``views``, ``kind = 'cached'``,
    ``fields`` (name → {dtype, shape}), ``wait_s`` / ``calls`` / ``prefetched`` (time spent in and
    number of ``__call__``s, and how many were served by the prefetch thread).
    ``__call__(x, ids, view)`` → {signal name: tensor [B, ...] on device}; floats as fp32, top-K ids as
    int64; ``x`` is unused (the records are keyed by id and view).
    """

    kind = "cached"

    def __init__(self, path: str | os.PathLike, *, cfg=None, data=None, aug=None,
                 device: torch.device | str = "cpu", verify: str = "auto", prefetch: int = 2,
                 threaded: bool | None = None):
        from fastkd.models import ModelInfo

        self.path = Path(path)
        self.man = man = read_manifest(self.path)
        check_run(man, cfg, data, aug, where=str(self.path))
        self.method = cfg.method.method if cfg is not None else None
        info = dict(man["teacher"]["info"])
        if info.get("grid") is not None:
            info["grid"] = tuple(info["grid"])
        self.info = ModelInfo(**info)
        self.teacher_top1 = man["teacher"]["top1"]
        self.views = int(man["views"])
        self.n = int(man["data"]["n_train"])
        self.shard_size = int(man["shard_size"])
        self.fields = man["fields"]
        self.serve = list(self.fields)
        self.device = torch.device(device)
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

    # -- signals ----------------------------------------------------------------------------------
    def check_signals(self, names: Iterable[str], loss=None) -> None:
        """Refuse (one line) unless every signal the loss reads is cached; serve only those afterwards.

        loss: the run's DistillLoss, when given, is also checked part by part against the parts the
        cache was built for: a part whose signals are named by position (e.g. [CLS]-KD's layer pair k)
        must tap the same teacher blocks (another student depth or --clskd-blocks changes them).
        """
        names = list(names)
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
        if loss is not None:
            cached = self.man.get("parts", [])
            for part in _part_signatures(loss):
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

    def load(self, ids: torch.Tensor, view: int) -> dict[str, torch.Tensor]:
        """Gather the records of ``ids`` (int64 CPU [B]) in ``view`` → CPU tensors in the cached dtypes
        (pinned when serving a CUDA device)."""
        if not 0 <= int(view) < self.views:
            raise CacheError(
                f"teacher cache {self.path}: view {view} out of range (it holds {self.views} views)"
            )
        idx = ids.to("cpu", torch.int64).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.n):
            raise CacheError(f"teacher cache {self.path}: sample ids must lie in [0, {self.n}); got "
                             f"[{int(idx.min())}, {int(idx.max())}]; the cache was built for other data")
        B = idx.shape[0]
        pin = self.device.type == "cuda"
        out = {f: torch.empty((B, *self.fields[f]["shape"]), dtype=self._dtypes[f], pin_memory=pin)
               for f in self.serve}
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

    # -- prefetch -----------------------------------------------------------------------------------
    def prefetch_epoch(self, batches: Iterable[torch.Tensor], view: int) -> None:
        """Announce the epoch's id batches (in training order): the next ``__call__``s with this view
        consume them in order. Threaded mode gathers ``prefetch`` batches ahead in a background thread
        (into pinned memory on CUDA); inline mode gathers each batch when it is asked for."""
        self.stop_prefetch()
        if not self.threaded:
            self._pf = {"iter": iter(batches), "view": int(view)}
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch_depth)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def work():
            try:
                for ids in batches:
                    if stop.is_set():
                        return
                    ids_cpu = ids.detach().to("cpu", torch.int64)
                    if not put((ids_cpu, self.load(ids_cpu, view))):
                        return
            except BaseException as e:  # handed to the training thread, raised there
                put(("error", e))
                return
            put(_END)

        th = threading.Thread(target=work, name="fastkd-cache-prefetch", daemon=True)
        self._pf = {"queue": q, "stop": stop, "thread": th, "view": int(view)}
        th.start()

    def stop_prefetch(self) -> None:
        pf, self._pf = self._pf, None
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
        pf = self._pf
        if pf is None:
            return None
        if pf["view"] != int(view):
            self.stop_prefetch()
            return None
        if "iter" in pf:  # inline mode
            nxt = next(pf["iter"], None)
            item = _END if nxt is None else (nxt.to("cpu", torch.int64), None)
        else:
            item = pf["queue"].get()
        if item is _END:
            self._pf = None
            return None
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            self._pf = None
            raise item[1]
        ids_pf, recs = item
        # Batches are consumed in training order. On the CPU the ids are checked for free; on CUDA the
        # check would be a host sync, so only the batch size is compared there.
        same = ids_pf.shape == ids.shape and (
            ids.device.type != "cpu" or torch.equal(ids_pf, ids.to(torch.int64))
        )
        if not same:
            self.stop_prefetch()
            return None
        self.prefetched += 1
        return recs if recs is not None else self.load(ids_pf, view)

    # -- the teacher interface ----------------------------------------------------------------------
    def __call__(self, x: torch.Tensor | None = None, ids: torch.Tensor | None = None,
                 view: int | None = None) -> dict[str, torch.Tensor]:
        if ids is None or view is None:
            raise ValueError(
                "CachedTeacher needs the batch's sample ids and view: teacher(x, ids=ids, view=view)"
            )
        t0 = time.perf_counter()
        recs = self._from_prefetch(ids, view)
        if recs is None:
            recs = self.load(ids.detach().to("cpu", torch.int64), view)  # a host sync on CUDA (no prefetch)
        out: dict[str, torch.Tensor] = {}
        for f, t in recs.items():
            t = t.to(self.device, non_blocking=True)
            out[f] = t.float() if t.is_floating_point() else t.long()
        self.calls += 1
        self.wait_s += time.perf_counter() - t0
        return out

    def to(self, device):
        self.device = torch.device(device)
        return self

    def stats(self) -> dict[str, float]:
        return {"cache_calls": self.calls, "cache_prefetched": self.prefetched,
                "cache_wait_ms": 1e3 * self.wait_s / max(1, self.calls)}


# ------------------------------------------------------------------------------------------------ verify
def verify_cache(path: str | os.PathLike, n: int, *, seed: int = 0, rel_tol: float = 5e-3, log=print) -> dict:
    """Re-run the teacher on ``n`` random (view, id) records and compare with the cache.

    Per field: the largest |cached − fresh| (top-K: fresh logits at the cached ids vs topk_vals,
    fresh logsumexp vs topk_lse, and for topk_ids how far the cached set falls below the fresh K-th
    largest logit, 0 when it is a true top-K). ``ok`` is True when each difference is within
    ``rel_tol · max(1, max|fresh|)`` (fp16 storage rounds to ~5e-4 relative).
    Returns {"fields": {name: {"max_abs", "scale", "ok"}}, "ok", "records"}.
    """
    from fastkd.config import TrainConfig
    from fastkd.methods.registry import build_loss
    from fastkd.models import model_info, resolve_model
    from fastkd.teachers.online import OnlineTeacher

    man = read_manifest(path)
    cfg = TrainConfig.from_dict(man["config"])
    trainer = _builder_trainer(cfg, log)
    d = trainer.data
    check_run(man, None, d, trainer.aug, where=str(path))
    src = man["teacher"]["source"]
    if not (os.path.isfile(src) or man["teacher"]["default_key"] is None):
        raise CacheError(f"cannot verify {path}: its teacher {src} is gone; restore it to re-run the teacher")
    mk = dict(num_classes=d.num_classes, img_size=d.img_size, in_chans=d.in_chans)
    t_model = resolve_model(src, **mk).to(trainer.device)
    sha = file_sha256(src) if os.path.isfile(src) else state_sha256(t_model)
    if sha != man["teacher"]["sha256"]:
        raise CacheError(f"cannot verify {path}: the teacher {src} changed since the cache was built")
    loss = build_loss(cfg.method, trainer.s_info, model_info(t_model), epochs=cfg.optim.epochs)
    teacher = OnlineTeacher(t_model, loss.teacher_blocks(), loss.teacher_signals, dense=loss.teacher_dense())
    ct = CachedTeacher(path, verify="open")
    rng = np.random.default_rng(seed)
    total = ct.views * ct.n
    pick = rng.choice(total, size=min(n, total), replace=False)
    worst: dict[str, list[float]] = {}
    amp = bool(man.get("amp")) and trainer.device.type == "cuda"
    for v in sorted(set((pick // ct.n).tolist())):
        ids = torch.from_numpy(np.sort(pick[pick // ct.n == v] % ct.n))
        x, _, _ = trainer.batch(ids, v)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            fresh = {k: t.float().cpu() for k, t in teacher(x, ids=ids, view=v).items()}
        cached = {k: t.double() for k, t in ct.load(ids, v).items()}
        diffs: dict[str, tuple[float, float]] = {}
        if "topk_vals" in cached:
            z = fresh["logits"].double()
            tid = cached["topk_ids"].long()
            at = z.gather(1, tid)
            kth = z.topk(tid.shape[1], dim=1).values[:, -1]
            diffs["topk_vals"] = ((at - cached["topk_vals"]).abs().max().item(), z.abs().max().item())
            diffs["topk_lse"] = ((torch.logsumexp(z, 1) - cached["topk_lse"]).abs().max().item(),
                                 torch.logsumexp(z, 1).abs().max().item())
            diffs["topk_ids"] = ((kth - at.min(1).values).clamp_min(0).max().item(), z.abs().max().item())
        for f, spec in ct.fields.items():
            if f in TOPK_FIELDS:
                continue
            ref = fresh[spec["source"]].double()
            diffs[f] = ((ref - cached[f]).abs().max().item() if ref.numel() else 0.0,
                        ref.abs().max().item() if ref.numel() else 0.0)
        for f, (dmax, scale) in diffs.items():
            w = worst.setdefault(f, [0.0, 0.0])
            w[0], w[1] = max(w[0], dmax), max(w[1], scale)
    ct.close()
    res = {"records": int(len(pick)), "fields": {}}
    for f, (dmax, scale) in worst.items():
        res["fields"][f] = {"max_abs": dmax, "scale": scale, "ok": dmax <= rel_tol * max(1.0, scale)}
        log(f"fastkd.cache verify: {f:>12s}  max |cached - fresh| = {dmax:.3g}  (|fresh| <= {scale:.3g})"
            f"  {'ok' if res['fields'][f]['ok'] else 'FAIL'}")
    res["ok"] = all(r["ok"] for r in res["fields"].values())
    log(f"fastkd.cache verify: {len(pick)} records, {'OK' if res['ok'] else 'MISMATCH'} "
        f"(tolerance {rel_tol:g} x max(1, |fresh|))")
    return res


# --------------------------------------------------------------------------------------------------- CLI
_CACHE_ARGS = ("views", "logits", "topk", "feat_dtype", "max_gb", "shard_size", "cache_batch_size", "verify",
               "worker", "verify_tol")


def parse_cache_args(argv: list[str] | None = None):
    """(TrainConfig, cache options) from the command line: every ``fastkd.train`` flag plus the cache's.

    Without ``--method`` (and no preset) the cache stores logits only (``--method kd``)."""
    from fastkd.config import build_parser, config_from_args

    p = build_parser("precompute teacher outputs for python -m fastkd.train --teacher-cache DIR")
    p.prog = "python -m fastkd.cache"
    g = p.add_argument_group("cache")
    g.add_argument("--views", type=int, default=1,
                   help="augmented views per sample; epoch e trains on view e mod V")
    g.add_argument("--logits", choices=("topk", "dense"), default="topk",
                   help="sparse top-K (default) or dense fp16")
    g.add_argument("--topk", type=int, default=None,
                   help=f"K of the top-K logits (default: {DEFAULT_TOPK}, at most C)")
    g.add_argument("--feat-dtype", choices=("float16", "float32"), default="float16",
                   help="dtype of the feature signals")
    g.add_argument("--max-gb", type=float, default=DEFAULT_MAX_GB, help="refuse to write a bigger cache")
    g.add_argument("--shard-size", type=int, default=None, help="samples per shard file")
    g.add_argument("--cache-batch-size", type=int, default=256, help="teacher batch size while building")
    g.add_argument("--worker", default="0/1",
                   help="i/n: build every n-th shard starting at i (parallel builds)")
    g.add_argument("--verify", type=int, default=None, metavar="N",
                   help="re-run the teacher on N random records and report the largest difference "
                        "(alone with --out: verify an existing cache)")
    g.add_argument("--verify-tol", type=float, default=5e-3, help="relative tolerance of --verify")
    args = p.parse_args(argv)
    cfg = config_from_args(args, skip=_CACHE_ARGS, defaults={"method": "kd"})
    try:
        wi, wn = (int(s) for s in str(args.worker).split("/"))
    except ValueError:
        raise CacheError(f"--worker {args.worker!r}: use i/n, e.g. 0/2") from None
    opts = {k: getattr(args, k) for k in _CACHE_ARGS}
    opts["worker"] = (wi, wn)
    explicit = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
    alone = {"--verify", "--out", "--verify-tol", "--quiet"}
    opts["verify_only"] = args.verify is not None and explicit <= alone
    return cfg, opts


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, o = parse_cache_args(argv)
        if not cfg.run.out:
            raise CacheError("give the cache directory with --out DIR")
        log = (lambda *a: None) if cfg.run.quiet else print
        if not o["verify_only"]:
            build_cache(
                cfg, cfg.run.out, views=o["views"], logits=o["logits"], topk=o["topk"],
                feat_dtype=o["feat_dtype"], max_gb=o["max_gb"], shard_size=o["shard_size"],
                batch_size=o["cache_batch_size"],
                worker=o["worker"], log=log, progress=not cfg.run.quiet,
            )
        if o["verify"]:
            res = verify_cache(cfg.run.out, o["verify"], rel_tol=o["verify_tol"], log=print)
            return 0 if res["ok"] else 1
    except (ValueError, FileNotFoundError) as e:
        print(f"fastkd.cache: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
