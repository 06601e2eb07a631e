"""``python -m fastkd.train``: distil a student from a teacher (or train one alone).

The step is linear, nanoGPT style::

    zero_grad → data (augment) → teacher (online | cached) → student (+taps) → losses
              → backward → clip → optimizer → schedule

With no ``--teacher`` and a method that needs one, the default teacher for the data is trained
first (teacher recipe: CE, ``--teacher-epochs``) and stored under ``<workdir>/teachers/<key>``,
keyed by a hash of data fingerprint + arch + recipe, and reused by later runs.

A run directory holds config.json, metrics.jsonl, summary.json, student.safetensors
(+ loss_modules.safetensors), checkpoint/ (for --resume) and report.png.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fastkd.config import TrainConfig, parse_args, parse_methods
from fastkd.data import Dataset, EpochSampler, load_data
from fastkd.data.augment import AugmentConfig, augment_batch, eval_batch
from fastkd.methods.registry import DistillLoss, build_loss, check_student
from fastkd.models import default_arch, forward_taps, model_info, resolve_model, save_model
from fastkd.ops import dispatch as KF
from fastkd.teachers.online import OnlineTeacher
from fastkd.telemetry import Telemetry, require_tensorboard
from fastkd.utils import atomic_write_json, atomic_write_text, load_state, save_state

__all__ = ["Trainer", "main", "run"]


_ANNOUNCED: set[str] = set()


def _announced(key: str) -> bool:
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


def lr_lambda(cfg: TrainConfig, steps_per_epoch: int):
    """Linear warmup then cosine from lr to min_lr, per step."""
    total = max(1, cfg.optim.epochs * steps_per_epoch)
    warm = min(total - 1, int(cfg.optim.warmup_epochs * steps_per_epoch))
    floor = cfg.optim.min_lr / cfg.optim.lr if cfg.optim.lr > 0 else 0.0

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        p = (step - warm) / max(1, total - warm)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))

    return f


def param_groups(modules: list[nn.Module], weight_decay: float):
    """No weight decay on biases, norms, tokens and position embeddings (timm/DeiT convention)."""
    decay, no_decay = [], []
    for m in modules:
        for name, p in m.named_parameters():
            if not p.requires_grad:
                continue
            if p.ndim <= 1 or name.endswith(".bias") or "token" in name or "pos_embed" in name:
                no_decay.append(p)
            else:
                decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


DISTILLED_BASE = "deit_tiny_distilled_patch16_224"
DIGITS_DEFAULT_LIMIT = 360  # the default job's labelled set for the student (README: measured table)


def _shape_overrides(cfg: TrainConfig, role: str) -> dict:
    """--student-embed-dim/--student-depth/--student-heads (and the teacher's) as timm overrides."""
    names = {
        "embed_dim": f"{role}_embed_dim",
        "depth": f"{role}_depth",
        "num_heads": f"{role}_heads",
        "patch_size": f"{role}_patch_size",
    }
    return {k: getattr(cfg.model, f) for k, f in names.items() if getattr(cfg.model, f) is not None}


def limit_train(data: Dataset, n: int) -> Dataset:
    """The first n training images of the fixed split (the small-labelled-data regime)."""
    if n <= 0 or n > len(data.y_train):
        raise ValueError(f"--train-limit {n}: must be in 1..{len(data.y_train)} for {data.name}")
    if n == len(data.y_train):
        return data
    x, y = data.x_train[:n], data.y_train[:n]
    fp = hashlib.sha256(f"{data.fingerprint}:first{n}".encode()).hexdigest()
    limited = replace(data, x_train=x, y_train=y, fingerprint=fp, name=f"{data.name}[:{n}]")
    limited.full = data  # the default teacher learns from the whole split (default_teacher_spec)
    return limited


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


@dataclass
class Dist:
    """Process group facts (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK); 1 process = no group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, dev: torch.device) -> torch.device:
        if self.world > 1 and dev.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return dev

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def mean(self, vals: dict[str, torch.Tensor]) -> dict[str, float]:
        """Mean of each logged scalar over ranks (log steps only: this syncs)."""
        keys = sorted(vals)
        t = torch.stack([vals[k].reshape(()) for k in keys])
        if self.world > 1:
            torch.distributed.all_reduce(t)
            t = t / self.world
        return dict(zip(keys, t.tolist(), strict=True))


def init_distributed(device_spec: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_spec in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(local)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local)


class StudentStep(nn.Module):
    """Student forward (+taps) and the loss: the module DDP wraps and torch.compile compiles."""

    def __init__(self, student: nn.Module, loss_fn: DistillLoss, blocks: list[int], amp: bool):
        super().__init__()
        self.student, self.loss_fn, self.blocks, self.amp = student, loss_fn, list(blocks), amp

    def forward(self, x, t_sig, y_soft, y_hard, epoch_frac):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            s = forward_taps(self.student, x, self.blocks)
            batch = {"y_soft": y_soft, "y_hard": y_hard, "epoch_frac": epoch_frac}
            batch["student"] = self.student  # cskd: the student head on every patch token
            return self.loss_fn(s, t_sig, batch)


class Trainer:
    """Owns data, models, loss, optimizer; ``step`` is one optimizer step, ``fit`` the run."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        data: Dataset | None = None,
        student_arch: tuple[str, dict] | None = None,
        dist: Dist | None = None,
        log=print,
    ):
        self.cfg, self.log = cfg, log
        self.dist = dist or Dist()
        self.device = self.dist.device(pick_device(cfg.run.device))
        seed_everything(cfg.run.seed)
        KF.set_fused(cfg.run.fused)
        if cfg.run.fused and not _announced(f"fused:{self.device}"):
            log(f"fastkd: --fused → {KF.describe(self.device)}")
        self.methods = parse_methods(cfg.method.method)
        self.amp = cfg.run.amp and self.device.type == "cuda"
        if cfg.run.tensorboard:
            try:
                require_tensorboard()
            except RuntimeError as e:
                raise ValueError(str(e)) from None

        # data
        # the teacher (when fastkd trains it) learns from the whole training split; the student
        # from the first --train-limit images of it (the small-labelled-data regime)
        self.full_data = data if data is not None else load_data(cfg.data.data, img_size=cfg.data.img_size)
        self.data = self.full_data
        limit = cfg.data.train_limit
        if limit is None and cfg.data.data == "digits":
            limit = DIGITS_DEFAULT_LIMIT
            log(
                f"fastkd: digits default regime: the student learns from {limit} labelled images, "
                f"the teacher from all {len(getattr(self.full_data, 'full', self.full_data).y_train)} "
                "(--train-limit 0 for all)"
            )
        if limit:
            self.data = limit_train(self.full_data, limit)
        d = self.data
        self.aug = AugmentConfig.default_for(d.img_size)
        if cfg.data.crop_pad is not None:
            self.aug.crop_pad = cfg.data.crop_pad
        self.aug.mixup_alpha, self.aug.cutmix_alpha, self.aug.hflip = (
            cfg.data.mixup,
            cfg.data.cutmix,
            cfg.data.hflip,
        )
        self.x_train = d.x_train.to(self.device)
        self.y_train = d.y_train.to(self.device)
        self.sampler = EpochSampler(
            len(d.y_train),
            cfg.optim.batch_size,
            cfg.run.seed,
            rank=self.dist.rank,
            world_size=self.dist.world,
        )

        # student
        mk = dict(num_classes=d.num_classes, img_size=d.img_size, in_chans=d.in_chans)
        if student_arch is not None:
            self.student_arch = student_arch
        elif cfg.model.student:
            self.student_arch = (cfg.model.student, {})
        else:
            self.student_arch = default_arch("student", d.img_size, d.in_chans, d.num_classes)
            if "deit" in self.methods:  # the same default student, with DeiT's distillation token + head
                self.student_arch = (DISTILLED_BASE, self.student_arch[1])
        ov = {**self.student_arch[1], **(_shape_overrides(cfg, "student") if student_arch is None else {})}
        self.student_arch = (self.student_arch[0], ov)
        self.student = resolve_model(self.student_arch[0], **mk, **ov).to(self.device)
        self.s_info = model_info(self.student)
        check_student(self.methods, self.s_info)

        # teacher
        self.teacher, self.t_info, self.teacher_top1 = None, None, None
        needs_teacher = any(m != "ce" for m in self.methods)
        if needs_teacher and cfg.run.teacher_cache:
            from fastkd.cache import CachedTeacher

            self.teacher = CachedTeacher(
                cfg.run.teacher_cache, cfg=cfg, data=d, aug=self.aug, device=self.device
            )
            self.t_info = self.teacher.info
            self.teacher_top1 = self.teacher.teacher_top1
        elif needs_teacher:
            # the teacher's construction (timm init, or training the default teacher) must not move the
            # student's random stream: online and cached runs then draw the same masks
            with torch.random.fork_rng(devices=[]):
                t_model = self._teacher_model(mk)
            self.t_info = model_info(t_model)
            self._t_model = t_model
        self.loss_fn: DistillLoss = build_loss(cfg.method, self.s_info, self.t_info, epochs=cfg.optim.epochs)
        self.loss_fn.to(self.device)
        if needs_teacher and self.teacher is None:
            self.teacher = OnlineTeacher(
                self._t_model,
                self.loss_fn.teacher_blocks(),
                self.loss_fn.teacher_signals,
                dense=self.loss_fn.teacher_dense(),
            )
            self.teacher_top1 = self.evaluate_model(self._t_model)["top1"]
        elif self.teacher is not None:
            self.teacher.check_signals(self.loss_fn.signal_names(), self.loss_fn)

        # optimizer + schedule
        fused_ok = self.device.type == "cuda"
        self.opt = torch.optim.AdamW(
            param_groups([self.student, self.loss_fn], cfg.optim.weight_decay),
            lr=cfg.optim.lr,
            betas=(0.9, 0.999),
            **({"fused": True} if fused_ok else {}),
        )
        self._params = [p for g in self.opt.param_groups for p in g["params"]]  # what clipping sees
        self.steps_per_epoch = len(self.sampler)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg, self.steps_per_epoch))
        self.step_idx, self.epoch = 0, 0
        self.s_blocks = self.loss_fn.student_blocks()
        # student + trainable loss parts in one module: what DDP wraps and torch.compile compiles
        # (wrap, then compile: the order torch recommends, so DDPOptimizer splits at bucket bounds)
        self.step_module: nn.Module = StudentStep(self.student, self.loss_fn, self.s_blocks, self.amp)
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.step_module = DDP(self.step_module, device_ids=ids, find_unused_parameters=True)
        self._fwd = torch.compile(self.step_module) if cfg.run.compile else self.step_module
        self._bad = None  # per-part first non-finite step, on device (checked on log steps: no sync)

    # -- teacher -----------------------------------------------------------------------------
    def _teacher_model(self, mk: dict) -> nn.Module:
        cfg, d = self.cfg, self.full_data
        if cfg.model.teacher:
            self.teacher_source = cfg.model.teacher
            ov = {} if os.path.exists(cfg.model.teacher) else _shape_overrides(cfg, "teacher")
            return resolve_model(cfg.model.teacher, **mk, **ov).to(self.device)
        # cskd needs a CNN teacher (dense logits on a feature map); every other method the ViT one
        ensure = ensure_default_cnn_teacher if "cskd" in self.methods else ensure_default_teacher
        if self.dist.main:  # rank 0 trains the default teacher once; the others wait, then load it
            path = ensure(cfg, d, log=self.log)
        self.dist.barrier()
        if not self.dist.main:
            path = ensure(cfg, d, log=self.log)
        self.teacher_source = str(path)
        return resolve_model(str(path), **mk).to(self.device)

    # -- the step ----------------------------------------------------------------------------
    def view_of(self, epoch: int) -> int:
        """Augmentation view of an epoch: the epoch itself, or epoch mod V for a V-view teacher cache."""
        views = getattr(self.teacher, "views", None)
        return epoch % views if views else epoch

    def batch(self, ids: torch.Tensor, epoch: int):
        x, y_soft, y_hard = augment_batch(
            self.x_train,
            self.y_train,
            ids,
            seed=self.cfg.run.seed,
            view=self.view_of(epoch),
            cfg=self.aug,
            num_classes=self.data.num_classes,
            mean=self.data.mean,
            std=self.data.std,
        )
        return x, y_soft, y_hard

    def forward_loss(self, x, t_sig, y_soft, y_hard, epoch_frac: float = 0.0) -> dict[str, torch.Tensor]:
        """Student forward + the named loss terms for one batch (no backward, no optimizer)."""
        return self._fwd(x, t_sig, y_soft, y_hard, epoch_frac)

    def step(self, ids: torch.Tensor, epoch: int, tel: Telemetry | None = None) -> dict[str, torch.Tensor]:
        ph = tel.timer.phase if tel is not None else (lambda name: contextlib.nullcontext())
        self.opt.zero_grad(set_to_none=True)
        with ph("data"):
            ids = ids.to(self.device, non_blocking=True)
            x, y_soft, y_hard = self.batch(ids, epoch)
        t_sig = {}
        if self.teacher is not None:
            with ph("teacher"), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
                t_sig = self.teacher(x, ids=ids, view=self.view_of(epoch))
        with ph("student"):
            # a 0-d tensor, so torch.compile does not recompile as the epoch position moves
            epoch_frac = torch.tensor(epoch + (self.step_idx % self.steps_per_epoch) / self.steps_per_epoch)
            terms = self._fwd(x, t_sig, y_soft, y_hard, epoch_frac)
            terms["loss"].backward()
            self._track_finite(terms)
        with ph("optim"):
            if self.cfg.optim.grad_clip > 0:
                terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(self._params, self.cfg.optim.grad_clip)
            self.opt.step()
            self.sched.step()
        self.step_idx += 1
        return terms

    def _track_finite(self, terms: dict[str, torch.Tensor]) -> None:
        """Remember, on device, the first step at which each loss part went non-finite (no sync)."""
        vals = torch.stack([v.detach().float().reshape(()) for v in terms.values()])
        bad_now = ~torch.isfinite(vals)
        if self._bad is None or self._bad.numel() != vals.numel():
            self._bad_names = list(terms)
            self._bad = torch.full_like(vals, -1.0)
        self._bad = torch.where(
            bad_now & (self._bad < 0), torch.full_like(vals, float(self.step_idx + 1)), self._bad
        )

    def check_finite(self) -> None:
        """Host sync (log steps, before checkpoints): stop naming the step and the part that went bad."""
        if self._bad is None:
            return
        bad = self._bad.tolist()
        hits = [(int(b), n) for b, n in zip(bad, self._bad_names, strict=True) if b >= 0]
        if hits:
            step = min(b for b, _ in hits)
            parts = ", ".join(n for b, n in hits if b == step and n != "loss") or "loss"
            raise NonFiniteLoss(
                f"non-finite loss at step {step} (part: {parts}); stopped, the last good checkpoint is "
                "kept — lower --lr, check the data/teacher, then rerun with --resume"
            )

    # -- eval --------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate_model(self, model: nn.Module, batch_size: int = 512) -> dict[str, float]:
        """Top-1 on the val split. Distilled students: mean of heads (+ cls-only top-1).

        With ``cskd`` in the method (CSKD release eval), a distilled student's top-1 is the argmax of the
        mean of (cls logits, dist logits, mean over patches of the dense dist-head logits); ``top1_cls``
        (cls head alone) and ``top1_dist`` are reported beside it.
        """
        was = model.training
        model.eval()
        d = self.data
        is_student = model is getattr(self, "student", None)
        cskd_eval = "cskd" in self.methods and is_student and model_info(model).has_dist_head
        hits = {"top1": 0, "top1_cls": 0, "top1_dist": 0}
        n = len(d.y_val)
        for i in range(0, n, batch_size):
            x = eval_batch(d.x_val[i : i + batch_size].to(self.device), d.mean, d.std)
            y = d.y_val[i : i + batch_size].to(self.device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
                taps = forward_taps(model, x, dense=cskd_eval)
            logits = taps.logits.float()
            if taps.dist_logits is not None:
                dist = taps.dist_logits.float()
                hits["top1_cls"] += (logits.argmax(-1) == y).sum().item()
                hits["top1_dist"] += (dist.argmax(-1) == y).sum().item()
                if taps.dense_logits is not None:  # cskd: cls, dist and mean dense dist-head logits
                    logits = (logits + dist + taps.dense_logits.float().mean(dim=(2, 3))) / 3
                else:
                    logits = (logits + dist) / 2
            hits["top1"] += (logits.argmax(-1) == y).sum().item()
        model.train(was)
        out = {"top1": 100.0 * hits["top1"] / n}
        if getattr(model_info(model), "has_dist_head", False):
            out["top1_cls"] = 100.0 * hits["top1_cls"] / n
            out["top1_dist"] = 100.0 * hits["top1_dist"] / n
        return out

    # -- run ---------------------------------------------------------------------------------
    def fit(self, out_dir: str | Path) -> dict:
        cfg, main = self.cfg, self.dist.main
        out = Path(out_dir)
        ckpt_dir = out / "checkpoint"
        metrics_path = out / "metrics.jsonl"
        start_epoch, start_step = 0, 0
        if cfg.run.resume and (ckpt_dir / "state.json").exists():
            start_epoch, start_step = self._load_checkpoint(ckpt_dir)
            self.log(
                f"fastkd: resumed from {ckpt_dir} at epoch {start_epoch} step {start_step}"
            ) if main else None
            if main:
                _truncate_metrics(metrics_path, self.step_idx)
        elif main and metrics_path.exists():
            metrics_path.unlink()
        if main:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(out / "config.json", cfg.to_dict())
        tel = Telemetry(
            self.device, tensorboard_dir=str(out / "tb") if (cfg.run.tensorboard and main) else None
        )
        self.student.train()
        self.loss_fn.train()
        t0 = time.perf_counter()
        last_eval = None
        bar = tqdm(
            total=cfg.optim.epochs * self.steps_per_epoch,
            initial=self.step_idx,
            disable=cfg.run.quiet or not main,
            desc=f"{cfg.method.method} {self.student_arch[0]}",
            dynamic_ncols=True,
            leave=False,
        )
        mf = open(metrics_path, "a") if main else None
        try:
            for epoch in range(start_epoch, cfg.optim.epochs):
                self.epoch = epoch
                first = start_step if epoch == start_epoch else 0
                if hasattr(self.teacher, "prefetch_epoch"):  # cached teacher: gather records ahead
                    self.teacher.prefetch_epoch(
                        self.sampler.batches(epoch, start_step=first), self.view_of(epoch)
                    )
                for i, ids in enumerate(self.sampler.batches(epoch, start_step=first), start=first):
                    terms = self.step(ids, epoch, tel)
                    tel.timer.step_done(len(ids) * self.dist.world)
                    bar.update(1)
                    if self.step_idx % cfg.run.log_every == 0 or self.step_idx == 1:
                        self.check_finite()  # log step: host sync allowed
                        rec = self.dist.mean({k: v.detach().float() for k, v in terms.items()})
                        rec.update(step=self.step_idx, epoch=epoch, lr=self.sched.get_last_lr()[0])
                        rec.update(tel.log(self.step_idx, rec))
                        if mf:
                            mf.write(json.dumps(rec) + "\n")
                            mf.flush()
                        bar.set_postfix(loss=f"{rec['loss']:.4f}")
                    if (
                        cfg.run.ckpt_every
                        and self.step_idx % cfg.run.ckpt_every == 0
                        and i + 1 < self.steps_per_epoch
                    ):
                        self._save_checkpoint(ckpt_dir, epoch, i + 1)
                last = epoch + 1 == cfg.optim.epochs
                if last or (cfg.run.eval_every and (epoch + 1) % cfg.run.eval_every == 0):
                    if main:
                        last_eval = self.evaluate_model(self.student)
                        ev = {
                            "epoch": epoch + 1,
                            "step": self.step_idx,
                            **{f"val_{k}": v for k, v in last_eval.items()},
                        }
                        mf.write(json.dumps(ev) + "\n")
                        mf.flush()
                        if not cfg.run.quiet:
                            bar.write(
                                f"epoch {epoch + 1}/{cfg.optim.epochs}  val top-1 {last_eval['top1']:.2f}%"
                            )
                    self.dist.barrier()
                self._save_checkpoint(ckpt_dir, epoch + 1, 0)
        finally:
            if mf:
                mf.close()
            bar.close()
        if not main:
            tel.close()
            return {}
        if last_eval is None:  # resumed at the final epoch: evaluate what we have
            last_eval = self.evaluate_model(self.student)
        wall = time.perf_counter() - t0
        tsum = tel.summary()
        tel.close()
        save_model(self.student, out / "student.safetensors", self.model_meta())
        from safetensors.torch import save_file

        tmp = out / "loss_modules.safetensors.tmp"
        try:
            save_file({k: v.contiguous() for k, v in self.loss_fn.state_dict().items()}, str(tmp))
            os.replace(tmp, out / "loss_modules.safetensors")
        except BaseException:  # e.g. ENOSPC: leave no partial file behind
            tmp.unlink(missing_ok=True)
            raise
        summary = {
            "method": cfg.method.method,
            "student": self.student_arch[0],
            "student_params": sum(p.numel() for p in self.student.parameters()),
            "teacher": getattr(self, "teacher_source", cfg.model.teacher or cfg.run.teacher_cache),
            "teacher_mode": getattr(self.teacher, "kind", None),
            "teacher_top1": self.teacher_top1,
            "student_top1": last_eval["top1"] if last_eval else None,
            **({f"student_{k}": v for k, v in last_eval.items() if k != "top1"} if last_eval else {}),
            "epochs": cfg.optim.epochs,
            "steps": self.step_idx,
            "seed": cfg.run.seed,
            "data": self.data.name,
            "wall_s": wall,
            "fused_path": KF.describe(self.device) if cfg.run.fused else "reference",
            "device": str(self.device),
            **tsum,
        }
        summary["img_per_s"] = tsum.get("img_per_s")
        atomic_write_json(out / "summary.json", summary)
        # the full curves survive a resume: re-read metrics.jsonl for the report
        history, evals = _read_metrics(metrics_path)
        write_report(
            out / "report.png",
            history,
            evals,
            title=f"{cfg.method.method} — {self.data.name}",
            teacher_top1=self.teacher_top1,
        )
        return summary

    def model_meta(self) -> dict:
        d = self.data
        return {
            "arch": self.student_arch[0],
            "overrides": self.student_arch[1],
            "num_classes": d.num_classes,
            "img_size": d.img_size,
            "in_chans": d.in_chans,
            "data_fingerprint": d.fingerprint,
            "method": self.cfg.method.method,
        }

    # -- checkpoints (epoch boundary) --------------------------------------------------------
    def _save_checkpoint(self, ckpt_dir: Path, epoch: int, step_in_epoch: int) -> None:
        """Resume point = (epoch, step within it). Only after a finite-loss check; rank 0 writes."""
        self.check_finite()
        if not self.dist.main:
            return
        state = {
            "student": self.student.state_dict(),
            "loss": self.loss_fn.state_dict(),
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            **({"rng_cuda": torch.cuda.get_rng_state(self.device)} if self.device.type == "cuda" else {}),
        }
        save_state(
            ckpt_dir,
            state,
            {"epoch": epoch, "step_in_epoch": step_in_epoch, "step": self.step_idx, "world": self.dist.world},
        )

    def _load_checkpoint(self, ckpt_dir: Path) -> tuple[int, int]:
        state, meta = load_state(ckpt_dir, map_location=self.device)
        self.student.load_state_dict(state["student"])  # before DDP's first forward: ranks stay equal
        self.loss_fn.load_state_dict(state["loss"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        torch.set_rng_state(state["rng_cpu"].cpu())
        if "rng_cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), self.device)
        self.step_idx = meta["step"]
        if meta.get("world", 1) != self.dist.world:
            raise ValueError(
                f"--resume: the checkpoint was written by {meta.get('world', 1)} process(es), this run has "
                f"{self.dist.world}; resume with the same --nproc_per_node"
            )
        return meta["epoch"], meta.get("step_in_epoch", 0)


class NonFiniteLoss(RuntimeError):
    pass


def _metric_lines(path: Path):
    """(raw line, parsed record) of metrics.jsonl, skipping a line cut short by a crash or a full disk."""
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                yield line, json.loads(line)
            except json.JSONDecodeError:
                continue


def _read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    hist, evals = [], []
    for _, r in _metric_lines(path):
        (evals if any(k.startswith("val_") for k in r) else hist).append(r)
    return hist, evals


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after the checkpoint we resume from (they will be logged again)."""
    if path.exists():
        keep = [ln for ln, r in _metric_lines(path) if r.get("step", 0) <= step]
        atomic_write_text(path, "".join(ln + "\n" for ln in keep))


#: loss parts drawn in report.png (whatever the run logged of them)
REPORT_TERMS = (
    "loss",
    "ce",
    "kd",
    "nkd",
    "vitkd_mim",
    "vitkd_gen",
    "clskd_cls",
    "clskd_map",
    "md",
    "cskd",
    "deit_ce",
    "deit_dist",
)


def write_report(
    path: Path, history: list[dict], evals: list[dict], title: str = "", teacher_top1: float | None = None
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    if history:
        steps = [r["step"] for r in history]
        keys = [k for k in REPORT_TERMS if k in history[0]]
        for k in keys:
            a1.plot(steps, [r.get(k, float("nan")) for r in history], label=k, lw=2 if k == "loss" else 1)
        a1.set_yscale("log")
        a1.set_xlabel("step")
        a1.set_title("training loss (named parts)")
        a1.legend(fontsize=8)
    if evals:
        a2.plot([e["epoch"] for e in evals], [e["val_top1"] for e in evals], "o-", label="student top-1")
        for k in ("val_top1_cls", "val_top1_dist"):
            if k in evals[0]:
                a2.plot([e["epoch"] for e in evals], [e[k] for e in evals], ".--", label=k[4:])
        if teacher_top1 is not None:
            a2.axhline(teacher_top1, color="gray", ls=":", label=f"teacher {teacher_top1:.1f}")
        a2.set_xlabel("epoch")
        a2.set_ylabel("val top-1 (%)")
        a2.set_title("validation accuracy")
        a2.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def default_teacher_spec(
    cfg: TrainConfig, data: Dataset, *, cnn: bool = False
) -> tuple[tuple[str, dict], Path]:
    """(arch, directory) of the default teacher for this data and recipe.

    ViT: ``models.default_arch('teacher')`` + ``--teacher-*`` shape flags. CNN (for ``cskd``):
    ``losses.cskd.default_cnn_arch`` (a ResNet-18 whose last map is half the student's token grid).
    The directory is keyed by a hash of data fingerprint + arch + recipe. ``data`` is the full training
    split (a ``--train-limit`` view carries it as ``.full``)."""
    data = getattr(data, "full", data)
    if cnn:
        from fastkd.methods.cskd import default_cnn_arch

        arch, prefix = default_cnn_arch(data.img_size), "cnn-"
    else:
        arch = default_arch("teacher", data.img_size, data.in_chans, data.num_classes)
        arch, prefix = (arch[0], {**arch[1], **_shape_overrides(cfg, "teacher")}), ""
    key = teacher_key(data, arch, cfg, AugmentConfig.default_for(data.img_size))
    return arch, Path(cfg.run.workdir) / "teachers" / f"{prefix}{arch[0]}-{key}"


def ensure_default_teacher(cfg: TrainConfig, data: Dataset, log=print, *, cnn: bool = False) -> Path:
    """Train the default teacher for this data once (CE, ``--teacher-epochs``, ``--teacher-lr``, seed 0,
    the whole training split); later runs reuse it. Resumable: an interrupted teacher run continues."""
    data = getattr(data, "full", data)
    arch, tdir = default_teacher_spec(cfg, data, cnn=cnn)
    path = tdir / "student.safetensors"
    what = "CNN teacher" if cnn else "teacher"
    if path.exists():
        log(f"fastkd: reusing {what} {path}")
        return path
    log(f"fastkd: no --teacher given; training the default {what} ({arch[0]} {arch[1]}) → {tdir}")
    tcfg = TrainConfig.from_dict(cfg.to_dict())
    tcfg.method = replace(tcfg.method, method="ce", ce_weight=1.0)
    tcfg.model = replace(
        tcfg.model,
        teacher=None,
        student=arch[0],
        student_embed_dim=None,
        student_depth=None,
        student_heads=None,
        student_patch_size=None,
    )
    tcfg.optim = replace(tcfg.optim, epochs=cfg.model.teacher_epochs, lr=cfg.model.teacher_lr)
    tcfg.run = replace(tcfg.run, seed=0, resume=True, teacher_cache=None, tensorboard=False, compile=False)
    tcfg.data = replace(tcfg.data, train_limit=0, mixup=0.0, cutmix=0.0, crop_pad=None, hflip=False)
    s = Trainer(tcfg, data=data, student_arch=arch, log=log).fit(tdir)
    log(f"fastkd: default {what} trained in {s['wall_s']:.0f}s → {path}")
    return path


def ensure_default_cnn_teacher(cfg: TrainConfig, data: Dataset, log=print) -> Path:
    """The default CNN teacher for ``cskd``, trained once with the default teacher's recipe and reused."""
    return ensure_default_teacher(cfg, data, log, cnn=True)


def default_out(cfg: TrainConfig) -> Path:
    name = f"{cfg.method.method}-{cfg.model.student or 'default'}-s{cfg.run.seed}".replace("/", "_")
    return Path(cfg.run.workdir) / name


def run(cfg: TrainConfig, log=print) -> dict:
    dist = init_distributed(cfg.run.device)
    if not dist.main:
        log = lambda *a, **k: None  # noqa: E731  (only rank 0 talks and writes)
    if dist.world > 1:
        log(
            f"fastkd: {dist.world} processes ({torch.distributed.get_backend()}), "
            f"global batch {cfg.optim.batch_size}"
        )
    trainer = Trainer(cfg, dist=dist, log=log)
    out = Path(cfg.run.out) if cfg.run.out else default_out(cfg)
    if trainer.teacher_top1 is not None:
        log(f"fastkd: teacher val top-1 {trainer.teacher_top1:.2f}%")
    summary = trainer.fit(out)
    if not dist.main:  # ranks > 0 return {} from fit: nothing to report
        return summary
    log(
        f"fastkd: {cfg.method.method}: student val top-1 {summary['student_top1']:.2f}% "
        f"in {summary['wall_s']:.1f}s ({summary['img_per_s'] or 0:.0f} img/s) → {out}"
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        run(cfg)
    except (ValueError, FileNotFoundError, NonFiniteLoss) as e:
        print(f"fastkd: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        where = f" writing {e.filename}" if e.filename else ""
        print(
            f"fastkd: error: disk full{where}; nothing partial was kept (atomic writes) — free space "
            "and rerun with --resume to continue from the last complete checkpoint",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
