"""Which teacher a run uses — one path for ``fastkd.train`` and ``fastkd.cache``.

* ``--teacher NAME_OR_CHECKPOINT``: a timm name (with the ``--teacher-*`` shape flags as overrides) or a
  fastkd checkpoint (used as saved) — ``teacher_model``.
* no ``--teacher``: the default teacher of the data — a ViT (``models.default_arch('teacher')`` + the
  ``--teacher-*`` shape flags) or, when a method of the total needs dense logits, the CNN
  (``methods.cskd.default_cnn_arch``) — stored under ``<workdir>/teachers/<arch>-<key>`` (key = hash of
  data fingerprint + arch + recipe; ``default_teacher_spec``). Training it once is
  ``fastkd.train.setup.ensure_default_teacher``'s job (it needs the trainer; this module does not).
* ``--teacher NAME --teacher-weights FILE`` / ``hf-hub:timm/<name>`` / ``local-dir:<folder>``: pretrained
  timm weights, offline (``fastkd.models.weights.build_pretrained``); a head of other classes is one line
  naming ``--teacher-finetune``.
* ``--teacher-finetune EPOCHS``: those weights fine-tuned on the training split first, stored under
  ``<workdir>/teachers/finetuned-<arch>-<key>`` (key = hash of the weights' sha256 + data fingerprint +
  recipe; ``finetune_spec``); training it is ``fastkd.train.setup.ensure_finetuned_teacher``'s job.
* ``teacher_identity``: the same answer without loading anything (what a cache manifest records).
* ``input_norm``: the (mean, std) a teacher expects (pretrained config, or the one it was trained with);
  ``teacher_for_batches``: the teacher with its input renormalised from the batches' to that.
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
from fastkd.models.hub import is_pretrained_spec, resolve_weights
from fastkd.models.weights import build_pretrained, input_renorm, preprocessing

_SHA: dict[tuple, str] = {}
FINETUNE_LR = {"full": 1e-4, "head": 1e-3}


def weights_sha256(path: str) -> str:
    """file_sha256, remembered per (path, size, mtime) in this process (a DeiT-B file is 350 MB)."""
    st = os.stat(path)
    k = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if k not in _SHA:
        _SHA[k] = file_sha256(path)
    return _SHA[k]


def is_pretrained(cfg: TrainConfig) -> bool:
    """--teacher names pretrained timm weights (hf-hub:, local-dir:, or with --teacher-weights)."""
    t = cfg.model.teacher
    return bool(t) and (is_pretrained_spec(t) or cfg.model.teacher_weights is not None)


def finetune_lr(cfg: TrainConfig) -> float:
    m = cfg.model
    lr = m.teacher_finetune_lr
    return lr if lr is not None else FINETUNE_LR[m.teacher_finetune_mode]


def finetune_spec(cfg: TrainConfig, data: Dataset) -> tuple[str, Path]:
    """(timm arch, directory) of the fine-tuned teacher: keyed by the weights' sha256, the data's
    fingerprint and the fine-tuning recipe."""
    if not is_pretrained(cfg):
        raise ValueError(
            "--teacher-finetune needs pretrained weights to start from: --teacher NAME --teacher-weights "
            "FILE, --teacher hf-hub:timm/<name> or --teacher local-dir:<folder>"
        )
    m, o = cfg.model, cfg.optim
    r = resolve_weights(m.teacher, m.teacher_weights)
    recipe = {
        "weights": weights_sha256(r.file), "arch": r.arch, "model_args": r.model_args,
        "overrides": shape_overrides(cfg, "teacher"), "fingerprint": data.fingerprint,
        "epochs": m.teacher_finetune, "lr": finetune_lr(cfg), "mode": m.teacher_finetune_mode,
        "batch_size": o.batch_size, "wd": o.weight_decay, "warmup": o.warmup_epochs, "min_lr": o.min_lr,
        "clip": o.grad_clip, "aug": AugmentConfig.default_for(data.img_size).identity(), "version": 1,
    }
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]
    arch = r.arch.replace("/", "_")
    return r.arch, Path(cfg.run.workdir) / "teachers" / f"finetuned-{arch}-{key}"


def pretrained_teacher(
    cfg: TrainConfig, data: Dataset, *, reinit_head: bool = False, log=print
) -> nn.Module:
    """--teacher's pretrained weights in its architecture, built for the data (CPU)."""
    return build_pretrained(
        cfg.model.teacher, num_classes=data.num_classes, img_size=data.img_size, in_chans=data.in_chans,
        weights=cfg.model.teacher_weights, reinit_head=reinit_head, seed=0, what="--teacher",
        log=lambda m: log(f"fastkd: {m}"), **shape_overrides(cfg, "teacher"),
    )


def input_norm(model: nn.Module, data: Dataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) the model expects: its pretrained config, else the normalisation it was trained
    with (fastkd checkpoints record it), else the data's."""
    if getattr(model, "fastkd_weights", None) is not None:
        p = preprocessing(model, data.in_chans)
        return p["mean"], p["std"]
    meta = getattr(model, "fastkd_meta", None) or {}
    if meta.get("input_mean") is not None:
        return tuple(meta["input_mean"]), tuple(meta["input_std"])
    return tuple(data.mean), tuple(data.std)


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
        "aug": aug.identity(),
        "version": 2,  # 2: patience recipe (fastkd.teachers.default)
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
    if path is not None:  # the default or the fine-tuned teacher's checkpoint
        return resolve_model(str(path), **mk)
    if is_pretrained(cfg):
        return pretrained_teacher(cfg, data)
    if cfg.model.teacher:
        src = str(cfg.model.teacher)
        ov = {} if os.path.exists(src) else shape_overrides(cfg, "teacher")
        return resolve_model(src, **mk, **ov)
    raise ValueError("no --teacher and no default teacher checkpoint")


def teacher_for_batches(
    cfg: TrainConfig, data: Dataset, path: str | os.PathLike | None, norm: tuple, log=None
) -> nn.Module:
    """``teacher_model`` fed batches normalised with ``norm`` = (mean, std): when the teacher expects
    another normalisation (``input_norm``: a pretrained config, or the one it was trained with) its input
    is renormalised on the device (``input_renorm``). What train, the cache build and the cache verifier
    all run: a teacher without it sees other inputs."""
    model = teacher_model(cfg, data, path)
    input_renorm(model, norm, input_norm(model, data), log=log)
    return model


def teacher_identity(cfg: TrainConfig, data: Dataset, model: nn.Module | None = None) -> dict:
    """{"source", "sha256" (or None), "default_key"} of the teacher a run uses, without loading it.

    ``--teacher FILE`` → the file's sha256; ``--teacher NAME`` (timm) → the name (and the sha256 of the
    built ``model``'s state when given); no ``--teacher`` → the default teacher of this data and recipe,
    with its checkpoint's sha256 once it has been trained. ``data``: the full training split.
    """
    if cfg.model.teacher and cfg.model.teacher_finetune:
        path = finetune_spec(cfg, data)[1] / "student.safetensors"
        sha = file_sha256(path) if path.is_file() else None
        return {"source": str(path), "sha256": sha, "default_key": path.parent.name}
    if is_pretrained(cfg):
        r = resolve_weights(cfg.model.teacher, cfg.model.teacher_weights)
        return {"source": cfg.model.teacher, "sha256": weights_sha256(r.file), "default_key": None}
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
