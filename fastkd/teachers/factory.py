"""Which teacher a run uses — one path for ``fastkd.train`` and ``fastkd.cache``.

* ``--teacher NAME_OR_CHECKPOINT``: a timm name (with the ``--teacher-*`` shape flags as overrides) or a
  fastkd checkpoint (used as saved) — ``teacher_model``.
* no ``--teacher``: the default teacher of the data — a ViT (``models.default_arch('teacher')`` + the
  ``--teacher-*`` shape flags) or, when a method of the total needs dense logits, the CNN
  (``methods.cskd.default_cnn_arch``) — stored under ``<workdir>/teachers/<arch>-<key>`` (key = hash of
  data fingerprint + arch + recipe; ``default_teacher_spec``). Training it once is
  ``fastkd.train.setup.ensure_default_teacher``'s job (it needs the trainer; this module does not).
* ``teacher_identity``: the same answer without loading anything (what a cache manifest records).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from torch import nn

from fastkd.cache.format import file_sha256, state_sha256
from fastkd.config import TrainConfig
from fastkd.data import Dataset
from fastkd.data.augment import AugmentConfig
from fastkd.methods.cskd import default_cnn_arch
from fastkd.methods.registry import needs_cnn_teacher
from fastkd.models import default_arch, resolve_model


def shape_overrides(cfg: TrainConfig, role: str) -> dict:
    """--student-embed-dim/--student-depth/--student-heads/--student-patch-size (or the teacher's) as timm
    overrides."""
    names = {
        "embed_dim": f"{role}_embed_dim",
        "depth": f"{role}_depth",
        "num_heads": f"{role}_heads",
        "patch_size": f"{role}_patch_size",
    }
    return {k: getattr(cfg.model, f) for k, f in names.items() if getattr(cfg.model, f) is not None}


def teacher_key(data: Dataset, arch: tuple[str, dict], cfg: TrainConfig, aug: AugmentConfig) -> str:
    recipe = {
        "fingerprint": data.fingerprint,
        "arch": arch,
        "epochs": cfg.model.teacher_epochs,
        "lr": cfg.model.teacher_lr,
        "batch_size": cfg.optim.batch_size,
        "wd": cfg.optim.weight_decay,
        "warmup": cfg.optim.warmup_epochs,
        "min_lr": cfg.optim.min_lr,
        "clip": cfg.optim.grad_clip,
        "aug": vars(aug),
        "version": 1,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]


def default_teacher_spec(cfg: TrainConfig, data: Dataset) -> tuple[tuple[str, dict], Path, bool]:
    """(arch, directory, is_cnn) of the default teacher for this data, recipe and method.

    ``data`` is the full training split (the default teacher learns from all of it, whatever
    ``--train-limit`` the student uses)."""
    cnn = needs_cnn_teacher(cfg.method.method)
    if cnn:
        arch, prefix = default_cnn_arch(data.img_size), "cnn-"
    else:
        arch = default_arch("teacher", data.img_size, data.in_chans, data.num_classes)
        arch, prefix = (arch[0], {**arch[1], **shape_overrides(cfg, "teacher")}), ""
    key = teacher_key(data, arch, cfg, AugmentConfig.default_for(data.img_size))
    return arch, Path(cfg.run.workdir) / "teachers" / f"{prefix}{arch[0]}-{key}", cnn


def default_teacher_path(cfg: TrainConfig, data: Dataset) -> Path:
    return default_teacher_spec(cfg, data)[1] / "student.safetensors"


def teacher_model(cfg: TrainConfig, data: Dataset, path: str | os.PathLike | None = None) -> nn.Module:
    """The teacher model named by ``--teacher`` (timm name + ``--teacher-*`` overrides, or a checkpoint as
    saved), or the default teacher's checkpoint at ``path``. CPU, not frozen."""
    mk = dict(num_classes=data.num_classes, img_size=data.img_size, in_chans=data.in_chans)
    if cfg.model.teacher:
        src = str(cfg.model.teacher)
        ov = {} if os.path.exists(src) else shape_overrides(cfg, "teacher")
        return resolve_model(src, **mk, **ov)
    return resolve_model(str(path), **mk)


def teacher_identity(cfg: TrainConfig, data: Dataset, model: nn.Module | None = None) -> dict:
    """{"source", "sha256" (or None), "default_key"} of the teacher a run uses, without loading it.

    ``--teacher FILE`` → the file's sha256; ``--teacher NAME`` (timm) → the name (and the sha256 of the
    built ``model``'s state when given); no ``--teacher`` → the default teacher of this data and recipe,
    with its checkpoint's sha256 once it has been trained. ``data``: the full training split.
    """
    if cfg.model.teacher:
        src = str(cfg.model.teacher)
        if os.path.isfile(src):
            sha = file_sha256(src)
        else:
            sha = state_sha256(model) if model is not None else None
        return {"source": src, "sha256": sha, "default_key": None}
    path = default_teacher_path(cfg, data)
    sha = file_sha256(path) if path.is_file() else None
    return {"source": str(path), "sha256": sha, "default_key": path.parent.name}
