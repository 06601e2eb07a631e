"""The optimizer end of the data flow: AdamW's parameter groups (no weight decay on biases, norms, tokens
and position embeddings) and the learning-rate schedule (linear warm-up, then cosine to ``--min-lr``),
counted in optimizer steps (with ``--accum-steps K``, one optimizer step takes K batches)."""

from __future__ import annotations

import math

import torch
from torch import nn

from fastkd.config import TrainConfig

__all__ = ["build_optimizer", "lr_lambda", "param_groups", "resume_lr"]


def lr_lambda(cfg: TrainConfig, steps_per_epoch: int):
    """Linear warmup then cosine from lr to min_lr, per optimizer step."""
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


def build_optimizer(cfg: TrainConfig, modules: list[nn.Module], device: torch.device, steps_per_epoch: int):
    """(AdamW, its LambdaLR schedule) over the trainable parameters of ``modules`` (fused AdamW on CUDA)."""
    opt = torch.optim.AdamW(
        param_groups(modules, cfg.optim.weight_decay),
        lr=cfg.optim.lr,
        betas=(0.9, 0.999),
        **({"fused": True} if device.type == "cuda" else {}),
    )
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, steps_per_epoch))


def resume_lr(cfg: TrainConfig, opt: torch.optim.Optimizer, sched, steps_per_epoch: int) -> None:
    """After loading a checkpoint: the lr of the resumed step from this run's schedule (the same value when
    nothing changed; a new --lr after a non-finite stop, or new --epochs, take effect here)."""
    f = lr_lambda(cfg, steps_per_epoch)
    sched.base_lrs = [cfg.optim.lr] * len(opt.param_groups)
    for g in opt.param_groups:
        g["initial_lr"] = cfg.optim.lr
        g["lr"] = cfg.optim.lr * f(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in opt.param_groups]
