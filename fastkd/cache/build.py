"""Build a teacher cache: run the teacher over every (view, training sample) and write shards atomically.
The format is described in ``fastkd.cache.format``."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fastkd import __version__
from fastkd.cache.format import (
    DEFAULT_MAX_GB,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SPEC_KEYS,
    CacheError,
    field_layout,
    file_sha256,
    jsonable,
    part_signatures,
    read_manifest,
    record_bytes,
    shard_list,
    spec_get,
    to_records,
)
from fastkd.config import TrainConfig
from fastkd.data import Dataset
from fastkd.data.augment import AugmentConfig
from fastkd.data.batches import TrainBatches
from fastkd.methods.registry import build_loss, needs_teacher
from fastkd.models import ModelInfo, model_info
from fastkd.teachers.factory import teacher_identity
from fastkd.teachers.online import OnlineTeacher
from fastkd.train.rundir import run_dir_lock
from fastkd.train.setup import (
    build_aug,
    build_data,
    build_student,
    pick_device,
    resolve_teacher,
    run_norm,
    seed_everything,
)
from fastkd.train.trainer import evaluate
from fastkd.utils import atomic_write_json, umask_mode


# ------------------------------------------------------------------------------------------------- build
class _Interrupted(RuntimeError):
    """Raised by ``build_cache(stop_after=k)`` (tests: a build killed after k shards)."""


@dataclass
class RunParts:
    """What a cache needs of the run it serves, built with the trainer's own setup functions (no trainer):
    the student's data split, augmentation and images (``batches``), the student's arch and ModelInfo
    (the loss, hence the signals, depend on it), and the full split (the default teacher's data)."""

    cfg: TrainConfig
    device: torch.device
    full: Dataset
    data: Dataset
    aug: AugmentConfig
    batches: TrainBatches
    student_arch: tuple[str, dict]
    s_info: ModelInfo
    amp: bool


def run_parts(cfg: TrainConfig, log=print) -> RunParts:
    device = pick_device(cfg.run.device)
    seed_everything(cfg.run.seed)
    full, d = build_data(cfg, None, log)
    aug = build_aug(cfg, d)
    student, arch = build_student(cfg, d, device)
    full, d = run_norm(student, full, d, log)  # a pretrained student's normalisation, as in training
    batches = TrainBatches(d, aug, cfg.run.seed, device, workers=cfg.data.workers)
    return RunParts(cfg, device, full, d, aug, batches, arch, model_info(student),
                    cfg.run.amp and device.type == "cuda")


def _write_shard(out: Path, shard: dict, fields: dict, fill) -> dict:
    """Fill one shard's arrays via ``fill(arrays)`` in temp files, fsync, hash, rename; return its files."""
    n = shard["stop"] - shard["start"]
    tmps, arrays = {}, {}
    try:
        for f, spec in fields.items():
            tmp = out / f".{shard['name']}.{f}.npy.tmp"
            tmps[f] = tmp
            arrays[f] = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(spec["dtype"]),
                                                  shape=(n, *spec["shape"]))
            _reserve(tmp)  # a sparse mmap on a full disk dies with SIGBUS: claim the blocks first
        fill(arrays)
        files = {}
        for f in fields:
            arrays[f].flush()
            with open(tmps[f], "rb+") as fh:
                os.fsync(fh.fileno())
            final = out / f"{shard['name']}.{f}.npy"
            files[f] = {"file": final.name, "sha256": file_sha256(tmps[f]), "bytes": os.path.getsize(tmps[f])}
            os.chmod(tmps[f], umask_mode())
            os.replace(tmps[f], final)
    except OSError as e:
        arrays.clear()
        for t in tmps.values():
            t.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise CacheError(
                f"disk full writing {shard['name']} in {out}; nothing partial was kept — free space and "
                "rerun the same command to continue"
            ) from None
        raise
    arrays.clear()
    return files


def _reserve(path: Path) -> None:
    """Allocate every block of ``path`` now (ENOSPC as an OSError here, not SIGBUS in the mmap later)."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise
        # a filesystem without fallocate: leave the file sparse (the free-space check still ran)
    except AttributeError:  # no posix_fallocate on this OS
        pass
    finally:
        os.close(fd)


def check_free_space(out: Path, need: int) -> None:
    """One line before anything is written when ``out``'s filesystem has less room than ``need`` bytes."""
    where = out
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if need > free:
        raise CacheError(
            f"not enough disk space for the cache in {out}: {_fmt_bytes(need)} to write, {_fmt_bytes(free)} "
            "free; free space, use another --out, or shrink the cache (--views, --topk, --feat-dtype)"
        )


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
    ``TrainBatches(ids, v)`` of a run with the same config, so training replays them exactly.
    logits: 'topk' (K = ``topk`` or ``default_topk(C)``) or 'dense'. feat_dtype: 'float16' | 'float32'.
    max_gb: refuse (before writing anything) when the cache would be bigger.
    shard_size: ids per shard (default: min(N, 50000, ~256 MiB of records)).
    worker (i, n): build only shards i, i+n, …; the last worker to finish writes the final manifest.
    stop_after: raise after writing that many shards (simulates a killed build; tests).
    Returns the manifest (complete, or not yet when other workers are still building) plus
    ``built``/``skipped`` lists of this call's shard names.

    One build per worker slot: a second build on the same ``out`` and worker ``i`` stops with one line
    (``ValueError``) instead of building the same shards beside it; other slots build alongside.
    """
    out, (wi, wn) = Path(out), worker
    if not (wn >= 1 and 0 <= wi < wn):
        raise CacheError(f"--worker {wi}/{wn}: use i/n with 0 <= i < n")
    busy = f"wait for it, or build other shards alongside it with --worker j/{max(wn, 2)}"
    with run_dir_lock(out, name=f".fastkd.worker{wi}.lock", busy=busy):
        return _build(cfg, out, views, logits, topk, feat_dtype, max_gb, shard_size, batch_size, worker, log,
                      progress, stop_after)


def _build(cfg, out: Path, views, logits, topk, feat_dtype, max_gb, shard_size, batch_size, worker, log,
           progress, stop_after) -> dict:
    if views < 1:
        raise CacheError(f"--views {views}: use at least 1 view")
    if logits not in ("topk", "dense"):
        raise CacheError(f"--logits {logits!r}: use 'topk' or 'dense'")
    if feat_dtype not in ("float16", "float32"):
        raise CacheError(f"--feat-dtype {feat_dtype!r}: use 'float16' or 'float32'")
    wi, wn = worker
    if not needs_teacher(cfg.method.method):
        raise CacheError(
            f"--method {cfg.method.method} needs no teacher, so there is nothing to cache; "
            "pick e.g. --method kd"
        )

    rp = run_parts(cfg, log)
    d, amp = rp.data, rp.amp
    t_model, _ = resolve_teacher(cfg, rp.full, rp.device, log=log, norm=(d.mean, d.std))  # as fastkd.train
    ident = teacher_identity(cfg, rp.full, t_model)
    t_info = model_info(t_model)
    loss = build_loss(cfg.method, rp.s_info, t_info, epochs=cfg.optim.epochs)
    teacher = OnlineTeacher(t_model, loss)

    def run_teacher(ids: torch.Tensor, view: int) -> dict[str, torch.Tensor]:
        x, _, _ = rp.batches(ids, view)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            return teacher(x, ids=ids, view=view)

    n = len(d.y_train)
    probe = run_teacher(torch.arange(min(2, n)), 0)
    fields = field_layout(probe, d.num_classes, logits, topk, feat_dtype)
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
    shards = shard_list(n, views, shard_size)

    man = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fastkd_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "teacher": {**ident, "info": jsonable(dataclasses.asdict(t_info)), "top1": None},
        "data": {"name": d.name, "fingerprint": d.fingerprint, "n_train": n, "num_classes": d.num_classes,
                 "img_size": d.img_size, "in_chans": d.in_chans},
        "augment": jsonable(rp.aug.identity()),
        "seed": int(cfg.run.seed),
        "views": int(views),
        "method": cfg.method.method,
        "student": {"arch": rp.student_arch[0], "overrides": jsonable(rp.student_arch[1])},
        "blocks": loss.teacher_blocks(),
        "parts": part_signatures(loss),
        "dense": loss.teacher_dense(),
        "logits": logits,
        "topk": fields["topk_vals"]["shape"][0] if "topk_vals" in fields else None,
        "fields": fields,
        "record_bytes": rb,
        "total_bytes": total,
        "shard_size": int(shard_size),
        "num_shards": len(shards),
        "amp": amp,
        "config": jsonable(cfg.to_dict()),
        "complete": False,
    }
    have = sum(p.stat().st_size for p in out.glob("*.npy")) if out.is_dir() else 0
    check_free_space(out, total - have)  # before anything is written: nothing partial on a small disk
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST).is_file():
        old = read_manifest(out, complete=False)
        for key in SPEC_KEYS:
            a, b = spec_get(old, key), spec_get(man, key)
            if a != b:
                if isinstance(a, dict) and isinstance(b, dict):  # the fields: name them, not their specs
                    a, b = ", ".join(a) or "none", ", ".join(b) or "none"
                raise CacheError(
                    f"--out {out} already holds a different cache ({key}: {a} there, {b} now); use another "
                    "--out or delete that directory"
                )
        if old.get("complete"):
            log(f"fastkd.cache: {out} is already complete ({len(shards)} shards)")
            return {**old, "built": [], "skipped": [s["name"] for s in shards]}
        man["teacher"]["top1"] = old["teacher"]["top1"]
        man["created"] = old.get("created", man["created"])
    else:
        man["teacher"]["top1"] = evaluate(t_model, d, rp.device, amp, workers=cfg.data.workers)["top1"]
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
            spans = [(a, min(s["stop"], a + batch_size)) for a in range(s["start"], s["stop"], batch_size)]
            # the loader prepares the shard's batches ahead (workers for streamed data), as in training
            rp.batches.start_epoch([torch.arange(a, b) for a, b in spans], s["view"])
            for a, b in spans:
                recs = to_records(run_teacher(torch.arange(a, b), s["view"]), fields)
                for f, arr in arrays.items():
                    arr[a - s["start"] : b - s["start"]] = recs[f]
                bar.update(b - a)

        files = _write_shard(out, s, fields, fill)
        atomic_write_json(out / f"{s['name']}.done.json", {**s, "files": files})
        built.append(s["name"])
    bar.close()
    rp.batches.close()  # the loader's worker processes (streamed data)
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
