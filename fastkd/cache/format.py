"""The teacher-cache format: what ``fastkd.cache.build`` writes and ``fastkd.teachers.cached`` reads.

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

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

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


def field_layout(probe: dict[str, torch.Tensor], num_classes: int, logits: str, topk: int | None,
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


def to_records(sig: dict[str, torch.Tensor], fields: dict[str, dict]) -> dict[str, np.ndarray]:
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


def jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


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


def check_run(man: dict, cfg, data, aug, where: str = "", run_teacher: dict | None = None) -> None:
    """Raise CacheError (one line naming the first difference) unless the cache fits this run.

    run_teacher: the identity of the teacher the run would use (``fastkd.teachers.factory.teacher_identity``);
    None skips the teacher check."""
    pre = f"teacher cache {where}: " if where else "teacher cache: "
    d = man["data"]
    if data is not None and (d["fingerprint"] != data.fingerprint or d["n_train"] != len(data.y_train)):
        raise CacheError(
            f"{pre}data differs: cache built on {d['name']} ({d['n_train']} train images, fingerprint "
            f"{_short(d['fingerprint'])}), run uses {data.name} ({len(data.y_train)} train images, "
            f"fingerprint {_short(data.fingerprint)}); rebuild the cache for this data "
            f"(same --data/--img-size/--val-fraction/--train-limit)"
        )
    if cfg is not None and int(man["seed"]) != int(cfg.run.seed):
        raise CacheError(
            f"{pre}seed differs: cache built with --seed {man['seed']}, run uses --seed {cfg.run.seed} (the "
            f"augmentation stream depends on it); train with --seed {man['seed']} or rebuild the cache"
        )
    if aug is not None:
        run_aug = jsonable(aug.identity())
        k = _first_diff(man["augment"], run_aug)
        if k is not None:
            raise CacheError(
                f"{pre}augmentation differs: {k} is {man['augment'].get(k)!r} in the cache, "
                f"{run_aug.get(k)!r} in the run; rebuild the cache with the run's augmentation flags"
            )
    if run_teacher is not None:
        msg = _teacher_mismatch(man["teacher"], run_teacher)
        if msg:
            raise CacheError(pre + msg)


def part_signatures(loss) -> list[dict]:
    """Per loss part that reads teacher signals: its name, signal names and the teacher blocks behind
    them, in signal order (``LossPart.signal_blocks``)."""
    out = []
    for p in loss.parts:
        if not p.signals:
            continue
        blocks = [int(b) for b in p.signal_blocks()]
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
            "re-running the same python -m fastkd.cache command (a build split with --worker i/n: the "
            "workers that have not finished; one build on its own finishes every missing shard)"
        )
    return man


def shard_list(n: int, views: int, shard_size: int) -> list[dict]:
    out = []
    for v in range(views):
        for j, start in enumerate(range(0, n, shard_size)):
            out.append({"name": f"v{v:04d}-s{j:06d}", "view": v, "index": j, "start": start,
                        "stop": min(n, start + shard_size)})
    return out


SPEC_KEYS = ("format_version", "teacher.sha256", "teacher.source", "data.fingerprint", "data.n_train",
              "augment", "seed", "views", "fields", "shard_size", "blocks", "dense", "logits")


def spec_get(man: dict, key: str):
    v: Any = man
    for part in key.split("."):
        v = v.get(part) if isinstance(v, dict) else None
    return v
