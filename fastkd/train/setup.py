"""Build a run's parts from its config: data, augmentation, student, teacher, loss → ``Trainer``.

The order is the data flow, and it is the one dependency there is: the loss needs the teacher's
``ModelInfo``, and the online teacher needs the loss (which blocks to tap, which signals to hand over)::

    seed → data (+ --train-limit) → augmentation → student → teacher model | cache → loss → teacher → Trainer

``fastkd.cache`` builds the same parts with the same functions (and no trainer). With no ``--teacher`` the
default teacher is trained first by a plain ``fit`` on its own parts (``ensure_default_teacher``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fastkd.config import TrainConfig
from fastkd.data import Dataset, load_data
from fastkd.data.augment import AugmentConfig
from fastkd.data.randaug import parse_spec
from fastkd.methods.ce import METHOD as PLAIN  # the teacher-free method the default teacher uses
from fastkd.methods.registry import DistillLoss, build_loss, check_student, needs_teacher, wants_dist_head
from fastkd.models import default_arch, model_info, resolve_model
from fastkd.models.weights import build_pretrained, classifier_names, preprocessing
from fastkd.ops import dispatch as KF
from fastkd.teachers.base import Teacher
from fastkd.teachers.cached import CachedTeacher
from fastkd.teachers.default import check_worth, epoch_cap, fit_with_patience, patience_for, read_fit
from fastkd.teachers.factory import (
    default_teacher_spec,
    finetune_lr,
    finetune_spec,
    is_pretrained,
    pretrained_teacher,
    shape_overrides,
    teacher_for_batches,
    teacher_identity,
    teacher_key,
)
from fastkd.teachers.online import OnlineTeacher
from fastkd.telemetry import require_tensorboard
from fastkd.train.distributed import Dist
from fastkd.train.rundir import run_dir_lock
from fastkd.train.trainer import Trainer, evaluate

DISTILLED_BASE = "deit_tiny_distilled_patch16_224"
DIGITS_DEFAULT_LIMIT = 360  # the default job's labelled set for the student (README: measured table)

_ANNOUNCED: set[str] = set()


def announced(key: str) -> bool:
    """True if this one-line notice was already printed in this process."""
    seen = key in _ANNOUNCED
    _ANNOUNCED.add(key)
    return seen


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: CUDA is not available on this machine; use --device cpu")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def limit_train(data: Dataset, n: int) -> Dataset:
    """The first n training images of the fixed split (the small-labelled-data regime)."""
    if n <= 0 or n > len(data.y_train):
        raise ValueError(f"--train-limit {n}: must be in 1..{len(data.y_train)} for {data.name}")
    if n == len(data.y_train):
        return data
    x = data.x_train[:n] if data.x_train is not None else None  # streamed: ids 0..n-1 of the stream
    y = data.y_train[:n]
    fp = hashlib.sha256(f"{data.fingerprint}:first{n}".encode()).hexdigest()
    return replace(data, x_train=x, y_train=y, fingerprint=fp, name=f"{data.name}[:{n}]")


def build_data(cfg: TrainConfig, data: Dataset | None = None, log=print) -> tuple[Dataset, Dataset]:
    """(full training split, the student's split). The teacher (when fastkd trains it) learns from the
    whole split; the student from the first --train-limit images of it (digits default: 360)."""
    if data is not None:
        full = data
    else:
        dc = cfg.data
        full = load_data(
            dc.data, img_size=dc.img_size, val_spec=dc.val_data, val_fraction=dc.val_fraction,
            on_bad_image=dc.on_bad_image, val_crop_pct=dc.val_crop_pct,
            memory_threshold=dc.memory_threshold, workers=dc.workers,
            index_cache=os.path.join(os.path.expanduser("~"), ".cache", "fastkd", "tar-index"),
            log=lambda m: log(f"fastkd.data: {m}"),
        )
    limit = cfg.data.train_limit
    if limit is None and cfg.data.data == "digits":
        limit = DIGITS_DEFAULT_LIMIT
        log(
            f"fastkd: digits default regime: the student learns from {limit} labelled images, "
            f"the teacher from all {len(full.y_train)} (--train-limit 0 for all)"
        )
    return full, (limit_train(full, limit) if limit else full)


def build_aug(cfg: TrainConfig, data: Dataset) -> AugmentConfig:
    d = cfg.data
    keys = ("randaug_n", "randaug_m", "randaug_mstd")  # (off: AugmentConfig's defaults)
    ra = dict(zip(keys, parse_spec(d.rand_augment), strict=True)) if d.rand_augment else {}
    aug = AugmentConfig.default_for(data.img_size, rrc_scale=d.rrc_scale, erase_prob=d.erase, **ra)
    if d.crop_pad is not None:
        aug.crop_pad = d.crop_pad
    elif d.rrc_scale > 0:  # the resized crop moves the content already: no translation unless asked for
        aug.crop_pad = 0
    aug.mixup_alpha, aug.cutmix_alpha, aug.hflip = d.mixup, d.cutmix, d.hflip
    return aug


def student_arch(cfg: TrainConfig, data: Dataset) -> tuple[str, dict]:
    """(timm name, overrides) of the student: --student (+ --student-* shape flags), else the default
    student for the data (with DeiT's distillation token + head when a method requires one)."""
    if cfg.model.student:
        arch = (cfg.model.student, {})
    else:
        arch = default_arch("student", data.img_size, data.in_chans, data.num_classes)
        if wants_dist_head(cfg.method.method):
            arch = (DISTILLED_BASE, arch[1])
    drop = {"drop_path_rate": cfg.model.student_drop_path} if cfg.model.student_drop_path > 0 else {}
    return arch[0], {**arch[1], **shape_overrides(cfg, "student"), **drop}


def build_student(cfg: TrainConfig, data: Dataset, device, arch: tuple[str, dict] | None = None):
    """(student model on device, its arch); fails fast when it cannot serve the methods."""
    arch = arch if arch is not None else student_arch(cfg, data)
    mk = dict(num_classes=data.num_classes, img_size=data.img_size, in_chans=data.in_chans)
    if cfg.model.student_weights:  # pretrained init; a head of other classes is re-initialised
        student = build_pretrained(
            arch[0], **mk, weights=cfg.model.student_weights, reinit_head=True, seed=cfg.run.seed,
            what="--student-weights", log=lambda m: print(f"fastkd: {m}"), **arch[1],
        ).to(device)
    else:
        student = resolve_model(arch[0], **mk, **arch[1]).to(device)
    check_student(cfg.method.method, model_info(student))
    return student, arch


def run_norm(student, full: Dataset, data: Dataset, log=print) -> tuple[Dataset, Dataset]:
    """A pretrained student (--student-weights) sets the run's normalisation to its own (mean, std)."""
    if getattr(student, "fastkd_weights", None) is None:
        return full, data
    p = preprocessing(student, data.in_chans)
    log(f"fastkd: normalising batches with the student's pretrained mean {p['mean']} std {p['std']}")
    return replace(full, mean=p["mean"], std=p["std"]), replace(data, mean=p["mean"], std=p["std"])


def resolve_teacher(
    cfg: TrainConfig, full: Dataset, device, *, dist: Dist | None = None, log=print,
    norm: tuple | None = None, student_data: Dataset | None = None,
):
    """(teacher model on device, its source) — the one teacher-resolution path of train and cache:
    ``--teacher`` (timm name + ``--teacher-*`` shape flags, or a checkpoint as saved), else the default
    teacher of the full split (trained once if missing; rank 0 trains it, the other ranks wait, then load
    it). Runs under a forked RNG, so the student's random stream does not depend on whether the teacher
    was trained, loaded or cached."""
    dist = dist or Dist()
    with torch.random.fork_rng(devices=[]):
        path = None
        make = None
        if not cfg.model.teacher:
            make = ensure_default_teacher
        elif cfg.model.teacher_finetune:
            make = ensure_finetuned_teacher
        if make is not None:
            if dist.main:
                path = make(cfg, full, log=log)
            dist.barrier()
            if not dist.main:
                path = make(cfg, full, log=log)
            if student_data is not None and dist.main and not cfg.model.teacher:
                report_default_teacher(cfg, path, student_data, log)
        # the teacher's own normalisation, derived on the device from the batches' (x_t = (x*s_s+m_s-m_t)/s_t)
        model = teacher_for_batches(cfg, full, path, norm or (full.mean, full.std),
                                    log=lambda m: log(f"fastkd: {m}"))
    t = cfg.model.teacher
    if t and path is None and not is_pretrained(cfg) and not os.path.exists(str(t)):
        log(f"fastkd: --teacher {t}: a timm name without weights is randomly initialised (fastkd never "
            "downloads); for a pretrained teacher pass --teacher-weights FILE, hf-hub:timm/<name> or "
            "local-dir:<folder>, or a fastkd checkpoint")
    return model.to(device), str(path if path is not None and cfg.model.teacher_finetune else
                                 cfg.model.teacher or path)


def report_default_teacher(cfg: TrainConfig, path: Path, student_data: Dataset, log=print) -> str | None:
    """One line: the default teacher's val top-1 beside the student-alone estimate; one warning line when
    the teacher is not clearly better (returned too). Once per process and teacher."""
    if announced(f"worth:{path}:{student_data.fingerprint}"):
        return None
    fit = read_fit(path.parent) or {}
    alone = student_alone_estimate(cfg, student_data, log=log)
    t1 = fit.get("top1", float("nan"))
    log(f"fastkd: default teacher val top-1 {t1:.2f}% (best of {fit.get('epochs_run')} epochs) vs the "
        f"student alone ≈{alone:.2f}% (its own recipe, on its {len(student_data.y_train)} images)")
    warn = check_worth(t1, alone)
    if warn:
        log(warn)
    return warn


def build_teacher_and_loss(
    cfg: TrainConfig, full: Dataset, data: Dataset, aug: AugmentConfig, s_info, device, *,
    dist: Dist | None = None, amp: bool = False, log=print,
) -> tuple[Teacher | None, DistillLoss]:
    """The teacher (online, cached, or None for a teacher-free total) and the loss built against it:
    the loss needs the teacher's ModelInfo, the online teacher the loss's taps and signal names."""
    if not needs_teacher(cfg.method.method):
        return None, build_loss(cfg.method, s_info, None, epochs=cfg.optim.epochs).to(device)
    if cfg.run.teacher_cache:
        cached = CachedTeacher(
            cfg.run.teacher_cache, cfg=cfg, data=data, aug=aug, device=device,
            run_teacher=teacher_identity(cfg, full), source=cfg.model.teacher or cfg.run.teacher_cache,
        )
        loss = build_loss(cfg.method, s_info, cached.info, epochs=cfg.optim.epochs).to(device)
        cached.check_signals(loss)
        return cached, loss
    t_model, source = resolve_teacher(
        cfg, full, device, dist=dist, log=log, norm=(data.mean, data.std), student_data=data
    )
    loss = build_loss(cfg.method, s_info, model_info(t_model), epochs=cfg.optim.epochs).to(device)
    top1 = evaluate(t_model, data, device, amp, dist=dist, workers=cfg.data.workers)["top1"]
    return OnlineTeacher(t_model, loss, top1=top1, source=source), loss


def build_trainer(
    cfg: TrainConfig,
    *,
    data: Dataset | None = None,
    student_arch: tuple[str, dict] | None = None,
    dist: Dist | None = None,
    log=print,
) -> Trainer:
    """Every part of a run, built in data-flow order, handed to a ``Trainer``.

    data: the full dataset (default: loaded from --data); --train-limit is applied here.
    student_arch: (timm name, overrides) used as given (default: from the flags)."""
    dist = dist or Dist()
    device = dist.device(pick_device(cfg.run.device))
    if cfg.run.tensorboard:  # fail fast, before any teacher is trained
        try:
            require_tensorboard()
        except RuntimeError as e:
            raise ValueError(str(e)) from None
    seed_everything(cfg.run.seed)
    KF.set_fused(cfg.run.fused)
    if cfg.run.fused and not announced(f"fused:{device}"):
        log(f"fastkd: --fused → {KF.describe(device)}")
    amp = cfg.run.amp and device.type == "cuda"
    full, d = build_data(cfg, data, log)
    aug = build_aug(cfg, d)
    student, arch = build_student(cfg, d, device, student_arch)
    full, d = run_norm(student, full, d, log)
    teacher, loss = build_teacher_and_loss(
        cfg, full, d, aug, model_info(student), device, dist=dist, amp=amp, log=log
    )
    trainer = Trainer(cfg, d, aug, student, teacher, loss, student_arch=arch, dist=dist, log=log)
    trainer.full = full  # the teacher's split (its fine-tuning summary is keyed by it)
    return trainer


def ensure_default_teacher(cfg: TrainConfig, data: Dataset, log=print) -> Path:
    """Train the default teacher for this data once (CE, seed 0, the whole training split ``data``, the
    patience recipe of ``fastkd.teachers.default``: best val epoch, cap ``--teacher-epochs`` or scaled with
    the data); later runs reuse it. A plain CE ``Trainer`` of the teacher's arch, no teacher."""
    arch, tdir, cnn = default_teacher_spec(cfg, data)
    return _fit_default(cfg, data, arch, tdir, "CNN teacher" if cnn else "teacher", log)


def student_alone_estimate(cfg: TrainConfig, data: Dataset, log=print) -> float:
    """Val top-1 of the student architecture (without a distillation head) trained alone on the student's
    split ``data`` under the student's own recipe (``--epochs``, ``--lr``: what ``--method ce`` would reach;
    short, as it runs no teacher; the best evaluated epoch, like the teacher's) — the bar a default teacher
    must clear. Cached by key under ``<workdir>/student-alone/``, like the teacher."""
    plain = TrainConfig.from_dict(cfg.to_dict())
    plain.method = replace(plain.method, method=PLAIN.name)
    arch = student_arch(plain, data)
    key = teacher_key(data, arch, cfg, AugmentConfig.default_for(data.img_size))
    ep, lr = cfg.optim.epochs, cfg.optim.lr
    tdir = Path(cfg.run.workdir) / "student-alone" / f"{arch[0]}-{key}-e{ep}-lr{lr:g}"
    path = _fit_default(cfg, data, arch, tdir, "student-alone estimate", log, cap=ep, lr=lr, patience=ep)
    return read_fit(path.parent)["top1"]


def _fit_default(
    cfg: TrainConfig, data: Dataset, arch, tdir: Path, what: str, log, cap: int | None = None,
    lr: float | None = None, patience: int | None = None,
) -> Path:
    # one process trains it; another one that needs it meanwhile (a parallel sweep) waits, then reuses it
    with run_dir_lock(tdir, wait_for=f"training the default {what}", log=log):
        return _fit_default_locked(cfg, data, arch, tdir, what, log, cap, lr, patience)


def _own_recipe(cfg: TrainConfig, *, epochs: int, lr: float, resume: bool) -> TrainConfig:
    """The config of a model fastkd trains itself (the default teacher, the student-alone estimate, a
    fine-tuned teacher): CE, seed 0, the whole split, one batch an optimizer step, no EMA and the default
    augmentation (what its directory key hashes, whatever the run's flags)."""
    tcfg = TrainConfig.from_dict(cfg.to_dict())
    tcfg.method = replace(tcfg.method, method=PLAIN.name, ce_weight=1.0)
    tcfg.optim = replace(tcfg.optim, epochs=epochs, lr=lr, accum_steps=1, ema_decay=0.0)
    tcfg.run = replace(tcfg.run, seed=0, resume=resume, teacher_cache=None, tensorboard=False, compile=False)
    tcfg.data = replace(tcfg.data.default_augmentation(), train_limit=0)
    return tcfg


def _fit_default_locked(cfg, data, arch, tdir: Path, what: str, log, cap, lr, patience) -> Path:
    path = tdir / "student.safetensors"
    if path.exists() and (tdir / "fit.json").exists():
        if not announced(f"reuse:{tdir}"):
            log(f"fastkd: reusing {what} {path}")
        return path
    cap = cap or epoch_cap(len(data.y_train), cfg.optim.batch_size, cfg.model.teacher_epochs)
    tcfg = _own_recipe(cfg, epochs=cap, lr=lr or cfg.model.teacher_lr, resume=False)
    tcfg.model = replace(tcfg.model, teacher=None, student=arch[0], student_embed_dim=None,
                         student_depth=None, student_heads=None, student_patch_size=None)
    log(f"fastkd: training the default {what} ({arch[0]} {arch[1]}; up to {cap} epochs, "
        f"stops when val top-1 stops improving) → {tdir}")
    device = pick_device(tcfg.run.device)
    seed_everything(0)
    aug = build_aug(tcfg, data)
    model, _ = build_student(tcfg, data, device, arch)
    loss = build_loss(tcfg.method, model_info(model), None, epochs=tcfg.optim.epochs).to(device)
    trainer = Trainer(tcfg, data, aug, model, None, loss, student_arch=arch, log=log)
    rec = fit_with_patience(trainer, tdir, patience=patience or patience_for(cap), log=log)
    log(f"fastkd: default {what}: val top-1 {rec['top1']:.2f}% at epoch {rec['best_epoch']} "
        f"({rec['epochs_run']}/{cap} epochs run, {rec['wall_s']:.0f}s) → {path}")
    return path


def ensure_finetuned_teacher(cfg: TrainConfig, data: Dataset, log=print) -> Path:
    """Fine-tune --teacher's pretrained weights on the whole training split ``data`` once
    (--teacher-finetune epochs, CE, --teacher-finetune-lr, seed 0; mode full or head), with the weights'
    own normalisation and a new head when the classes differ; later runs reuse it (key: weights sha256 +
    data fingerprint + recipe), an interrupted one resumes. Its val top-1 is in its summary.json."""
    arch, tdir = finetune_spec(cfg, data)
    with run_dir_lock(tdir, wait_for="fine-tuning this teacher", log=log):  # one process; others reuse it
        return _finetune_locked(cfg, data, arch, tdir, log)


def _finetune_locked(cfg: TrainConfig, data: Dataset, arch: str, tdir: Path, log) -> Path:
    path = tdir / "student.safetensors"
    if path.exists():
        log(f"fastkd: reusing the fine-tuned teacher {path}")
        return path
    m = cfg.model
    log(f"fastkd: fine-tuning {m.teacher} ({m.teacher_finetune_mode}, {m.teacher_finetune} epochs, "
        f"lr {finetune_lr(cfg):g}) on {data.name} → {tdir}")
    tcfg = _own_recipe(cfg, epochs=m.teacher_finetune, lr=finetune_lr(cfg), resume=True)
    tcfg.model = replace(tcfg.model, teacher=None, student_weights=None, teacher_finetune=0)
    device = pick_device(tcfg.run.device)
    seed_everything(0)
    with torch.random.fork_rng(devices=[]):
        model = pretrained_teacher(cfg, data, reinit_head=True, log=log)
    if m.teacher_finetune_mode == "head":
        heads = tuple(f"{h}." for h in classifier_names(model))
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(heads))
    p = preprocessing(model, data.in_chans)
    tdata = replace(data, mean=p["mean"], std=p["std"])  # its own normalisation (recorded in the checkpoint)
    model = model.to(device)
    aug = build_aug(tcfg, tdata)
    loss = build_loss(tcfg.method, model_info(model), None, epochs=tcfg.optim.epochs).to(device)
    t_arch = (arch, dict(getattr(model, "fastkd_arch", {}).get("overrides", shape_overrides(cfg, "teacher"))))
    s = Trainer(tcfg, tdata, aug, model, None, loss, student_arch=t_arch, log=log).fit(tdir)
    log(f"fastkd: fine-tuned teacher: val top-1 {s['student_top1']:.2f}% in {s['wall_s']:.0f}s → {path}")
    return path


def finetune_summary(cfg: TrainConfig, data: Dataset) -> dict | None:
    """{'teacher_finetune_top1', 'teacher_finetune_dir', ...} of this run's fine-tuned teacher, if any."""
    if not (cfg.model.teacher and cfg.model.teacher_finetune):
        return None
    tdir = finetune_spec(cfg, data)[1]
    try:
        s = json.loads((tdir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return {"teacher_finetune_top1": s.get("student_top1"), "teacher_finetune_epochs": s.get("epochs"),
            "teacher_finetune_mode": cfg.model.teacher_finetune_mode, "teacher_finetune_dir": str(tdir)}
