"""Run-directory safety (issue 14): never overwrite or mix runs.

* a non-empty ``--out`` is refused unless ``--resume`` (continue it) or ``--overwrite`` (replace it, its
  checkpoint too);
* default run names carry a short data fingerprint, so two datasets never share a folder;
* ``--resume`` compares the stored config with the new one: flags that may change (``guard.RESUMABLE``) are
  recorded as a resume event in config.json's ``history``; any other difference is one line naming the fields;
* after a non-finite stop (``checkpoint/nonfinite.json``) a resume must change the lr or the data;
* one process at a time: rank 0 holds an exclusive lock on ``--out`` for the whole run (``run_dir_lock``), so
  a second ``fastkd.train`` on the same folder (a ``--resume`` while it still runs) is one line, not two
  processes writing one checkpoint;
* ``--resume`` of a finished run trains nothing and rewrites nothing (``finished_summary``), and an
  ``--epochs`` below the epochs a checkpoint already holds is one line.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from fastkd.config import TrainConfig
from fastkd.train.guard import resume_changes
from fastkd.utils import atomic_write_json

__all__ = [
    "LOCK", "NON_FINITE", "RUN_FILES", "data_tag", "default_out", "finished_summary", "prepare_run_dir",
    "resume_steps", "run_dir_lock", "write_config",
]

RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    "summary.json",
    "student.safetensors",
    "student_ema.safetensors",
    "loss_modules.safetensors",
    "report.png",
    "checkpoint",
    "tb",
)
NON_FINITE = "nonfinite.json"  # in checkpoint/: written when training stops on a non-finite value
LOCK = ".fastkd.lock"  # in --out: flock'ed by the process that runs there (holds its pid)


def data_tag(spec: str) -> str:
    """A short fingerprint of --data without loading it: the resolved path, size and mtime of a file or
    folder (the spec itself for digits / synthetic:N)."""
    key = str(spec)
    if os.path.exists(spec):
        st = os.stat(spec)
        key = f"{os.path.realpath(spec)}:{st.st_size}:{st.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:6]


def default_out(cfg: TrainConfig) -> Path:
    name = f"{cfg.method.method}-{cfg.model.student or 'default'}-s{cfg.run.seed}-d{data_tag(cfg.data.data)}"
    return Path(cfg.run.workdir) / name.replace("/", "_")


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def prepare_run_dir(cfg: TrainConfig, out: Path, *, main: bool = True, log=print) -> dict | None:
    """Check ``out`` before any work; returns the resume event to record (or None). ValueError: one line."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; pick another --out")
    entries = sorted(p.name for p in out.iterdir() if p.name != LOCK) if out.is_dir() else []
    if not entries:
        return None
    if cfg.run.overwrite:
        if main:
            for name in RUN_FILES:
                p = out / name
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                elif p.exists() or p.is_symlink():
                    p.unlink()
            log(f"fastkd: --overwrite: removed the earlier run in {out} (its checkpoint too)")
        return None
    if not cfg.run.resume:
        raise ValueError(
            f"--out {out} already holds a run ({', '.join(entries[:4])}{', …' if len(entries) > 4 else ''}); "
            "add --resume to continue it, --overwrite to replace it, or pick another --out"
        )
    stored = _read(out / "config.json")
    if stored is None:
        if (out / "checkpoint").exists():
            raise ValueError(
                f"--resume: {out}/config.json is missing or unreadable, so the checkpoint's "
                "settings are unknown; start a new run with another --out"
            )
        return None
    bad_stop = _read(out / "checkpoint" / NON_FINITE)
    ok, refused = resume_changes(stored, cfg, non_finite=bad_stop is not None)
    old = {k: v for sec in stored.values() if isinstance(sec, dict) for k, v in sec.items()}
    new = {k: v for sec in cfg.to_dict().values() for k, v in sec.items()}
    if refused:
        diff = ", ".join(f"{k} {old[k]!r} → {new[k]!r}" for k in refused)
        raise ValueError(
            f"--resume: {out} was run with other settings ({diff}); drop those flags to resume it as it "
            "ran, or start a new run with another --out"
        )
    if bad_stop is not None:
        same_lr = cfg.optim.lr == bad_stop.get("lr")
        same_data = cfg.data.data == bad_stop.get("data") and data_tag(cfg.data.data) == bad_stop.get(
            "data_tag"
        )
        if same_lr and same_data:
            raise ValueError(
                f"--resume: {out} stopped on a non-finite value at step {bad_stop.get('step')}; resuming "
                f"the step-{bad_stop.get('checkpoint_step')} checkpoint with the same --lr {cfg.optim.lr:g} "
                f"and data would repeat it; lower --lr (e.g. --lr {cfg.optim.lr / 10:g}) or fix the data, "
                "then --resume"
            )
    meta = _checkpoint_meta(out)
    done = _checkpoint_epoch(meta)
    if done is not None and done > cfg.optim.epochs:
        raise ValueError(
            f"--resume: {out}'s checkpoint is already in epoch {done}, past --epochs {cfg.optim.epochs}; "
            f"give --epochs {done} or more to continue it, or start a new run with another --out"
        )
    event = {"event": "resume", "changed": {k: [old[k], new[k]] for k in ok if k not in ("resume",)}}
    if meta.get("step") is not None:
        event["step"] = meta["step"]  # where it continues (report.png marks it)
    if bad_stop is not None:
        event["after_non_finite_step"] = bad_stop.get("step")
    return event


def write_config(out: Path, cfg: TrainConfig, event: dict | None = None) -> None:
    """config.json = the settings that run now + the history of resume events (kept across resumes)."""
    prev = _read(Path(out) / "config.json") or {}
    history = list(prev.get("history", [])) if cfg.run.resume else []
    if event is not None:
        history.append(event)
    doc = cfg.to_dict()
    if history:
        doc["history"] = history
    atomic_write_json(Path(out) / "config.json", doc)


def resume_steps(out: Path) -> list[int]:
    """The steps at which the run in ``out`` was resumed (config.json's history), in order."""
    history = (_read(Path(out) / "config.json") or {}).get("history", [])
    return [e["step"] for e in history if e.get("event") == "resume" and e.get("step") is not None]


def record_non_finite(ckpt_dir: Path, cfg: TrainConfig, step: int, checkpoint_step: int | None) -> None:
    """Mark the run as stopped on a non-finite value (what a later --resume must change)."""
    atomic_write_json(
        Path(ckpt_dir) / NON_FINITE,
        {
            "step": step,
            "checkpoint_step": checkpoint_step,
            "lr": cfg.optim.lr,
            "data": cfg.data.data,
            "data_tag": data_tag(cfg.data.data),
        },
    )


def _checkpoint_meta(out: Path) -> dict:
    """The meta of the checkpoint in ``out`` ({} without one): epoch, step_in_epoch, step, world."""
    return (_read(Path(out) / "checkpoint" / "state.json") or {}).get("meta") or {}


def _checkpoint_epoch(meta: dict) -> int | None:
    """The epochs a checkpoint (its meta) has completed (a mid-epoch one counts its partial epoch)."""
    if "epoch" not in meta:
        return None
    return int(meta["epoch"]) + (1 if meta.get("step_in_epoch") else 0)


def finished_summary(cfg: TrainConfig, out: Path) -> dict | None:
    """For ``--resume``: the stored summary when the run in ``out`` already ran its ``--epochs`` to the end
    (checkpoint at the last epoch's end, summary.json written): nothing to train, nothing to rewrite."""
    out = Path(out)
    if not cfg.run.resume:
        return None
    meta = _checkpoint_meta(out)
    summary = _read(out / "summary.json")
    if summary is None or meta.get("epoch") != cfg.optim.epochs or meta.get("step_in_epoch"):
        return None
    if summary.get("steps") != meta.get("step"):  # a summary of an earlier, shorter leg of the run
        return None
    return summary


@contextlib.contextmanager
def run_dir_lock(
    out: Path, main: bool = True, *, wait_for: str | None = None, log=print, name: str = LOCK,
    busy: str = "wait for it to end (then --resume it if it stopped early), or pick another --out",
) -> Iterator[None]:
    """Hold an exclusive lock on folder ``out`` while this process uses it (rank 0; other ranks share rank
    0's): ``flock`` on ``out/.fastkd.lock``, which holds the pid and is removed again at the end. When another
    process holds it: one line naming the holder (``ValueError``), or, with ``wait_for`` (what the holder is
    doing there, e.g. training the default teacher that this run will then reuse), one line saying so and a
    wait until it is done. A folder this call made and that ends up empty (the run stopped on bad input
    before writing) is removed again. ``name``: the lock file (a cache build locks per worker); ``busy``:
    what the one line tells the user to do."""
    out = Path(out)
    if not main or (out.exists() and not out.is_dir()):  # prepare_run_dir names a file --out
        yield
        return
    made = not out.exists()
    lock = out / name
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = _acquire(lock, out, wait_for, log, busy)
    except PermissionError:
        if wait_for is None:
            raise
        yield  # a read-only shared folder (a finished teacher to reuse): nothing is written there to guard
        return
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still held: a waiter on this inode re-checks it (_acquire)
        os.close(fd)
        if made:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if empty


def _acquire(lock: Path, out: Path, wait_for: str | None, log, busy: str) -> int:
    told = False
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            if wait_for is None:
                os.close(fd)
                msg = f"--out {out} is in use by another fastkd process (pid {holder}); {busy}"
                raise ValueError(msg) from None
            if not told:
                log(f"fastkd: waiting for fastkd process {holder}, which is {wait_for} in {out}")
                told = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # a filesystem without locks (some network mounts): run unguarded, and say so
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            log(f"fastkd: note: {out}'s filesystem has no file locks ({e.strerror}); nothing stops a second "
                "process from using it at the same time")
            return fd
        try:  # the holder removes the file before it lets go: a lock on a removed file guards nothing
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
