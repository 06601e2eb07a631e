"""Run-directory safety (issue 14): never overwrite or mix runs.

* a non-empty ``--out`` is refused unless ``--resume`` (continue it) or ``--overwrite`` (replace it, its
  checkpoint too);
* default run names carry a short data fingerprint, so two datasets never share a folder;
* ``--resume`` compares the stored config with the new one: flags that may change (``guard.RESUMABLE``) are
  recorded as a resume event in config.json's ``history``; any other difference is one line naming the fields;
* after a non-finite stop (``checkpoint/nonfinite.json``) a resume must change the lr or the data.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from fastkd.config import TrainConfig
from fastkd.train.guard import resume_changes
from fastkd.utils import atomic_write_json

__all__ = ["NON_FINITE", "RUN_FILES", "data_tag", "default_out", "prepare_run_dir", "write_config"]

RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    "summary.json",
    "student.safetensors",
    "loss_modules.safetensors",
    "report.png",
    "checkpoint",
    "tb",
)
NON_FINITE = "nonfinite.json"  # in checkpoint/: written when training stops on a non-finite value


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
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
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
    event = {"event": "resume", "changed": {k: [old[k], new[k]] for k in ok if k not in ("resume",)}}
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
