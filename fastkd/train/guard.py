"""Checks before any work (issue 14): ``validate(cfg)`` range-checks every field and conflicting flags;
``resume_changes`` compares a run directory's stored config with the one a ``--resume`` asks for.

Both raise ``ValueError`` with one line naming the fix; neither loads data or builds a model.
"""

from __future__ import annotations

import math
import os

from fastkd.config import TrainConfig, parse_methods

__all__ = ["RESUMABLE", "resume_changes", "validate"]

#: fields a --resume may change (how the run is watched and where it runs, not what it computes);
#: "epochs" extends or shortens the schedule. Anything else is a different run.
RESUMABLE = frozenset(
    {
        "epochs",
        "log_every",
        "eval_every",
        "ckpt_every",
        "device",
        "quiet",
        "tensorboard",
        "resume",
        "overwrite",
        "no_verify",
        "out",
        "workdir",
    }
)
#: fields a --resume after a non-finite stop may change too (the fix the stop message suggests)
AFTER_NON_FINITE = frozenset({"lr", "min_lr", "grad_clip", "data"})

_SHAPE = ("teacher_embed_dim", "teacher_depth", "teacher_heads", "teacher_patch_size")

# (field, lowest, highest, lowest inclusive?, highest inclusive?) — None = unbounded
_RANGES: list[tuple[str, float | None, float | None, bool, bool]] = [
    ("epochs", 1, None, True, True),
    ("val_fraction", 0, 0.5, False, True),
    ("val_crop_pct", 0, 1, False, True),
    ("batch_size", 1, None, True, True),
    ("lr", 0, None, False, True),
    ("min_lr", 0, None, True, True),
    ("weight_decay", 0, None, True, True),
    ("warmup_epochs", 0, None, True, True),
    ("grad_clip", 0, None, True, True),
    ("accum_steps", 1, 4096, True, True),
    ("ema_decay", 0, 1, True, False),
    ("teacher_epochs", 1, None, True, True),
    ("teacher_lr", 0, None, False, True),
    ("label_smoothing", 0, 1, True, False),
    ("ce_weight", 0, None, True, True),
    ("kd_T", 0, None, False, True),
    ("kd_weight", 0, None, True, True),
    ("nkd_tau", 0, None, False, True),
    ("nkd_gamma", 0, None, True, True),
    ("nkd_weight", 0, None, True, True),
    ("vitkd_alpha", 0, None, True, True),
    ("vitkd_beta", 0, None, True, True),
    ("vitkd_mask_ratio", 0, 1, True, False),
    ("clskd_w_cls", 0, None, True, True),
    ("clskd_w_map", 0, None, True, True),
    ("clskd_mu", 0, None, False, True),
    ("md_weight", 0, None, True, True),
    ("md_k", 1, None, True, True),
    ("cskd_T", 0, None, False, True),
    ("cskd_weight", 0, None, True, True),
    ("mixup", 0, None, True, True),
    ("cutmix", 0, None, True, True),
    ("crop_pad", 0, None, True, True),
    ("erase", 0, 1, True, True),
    ("rrc_scale", 0, 1, True, True),
    ("student_drop_path", 0, 1, True, False),
    ("img_size", 1, 4096, True, True),
    ("train_limit", 0, None, True, True),
    ("log_every", 1, None, True, True),
    ("ckpt_every", 0, None, True, True),
    ("eval_every", 0, None, True, True),
    ("seed", 0, 2**63 - 1, True, True),
    ("student_embed_dim", 1, 16384, True, True),
    ("student_depth", 1, 256, True, True),
    ("student_heads", 1, 256, True, True),
    ("student_patch_size", 1, 1024, True, True),
    ("teacher_embed_dim", 1, 16384, True, True),
    ("teacher_depth", 1, 256, True, True),
    ("teacher_heads", 1, 256, True, True),
    ("teacher_patch_size", 1, 1024, True, True),
]


def _flat(cfg: TrainConfig) -> dict:
    return {k: v for sec in cfg.to_dict().values() for k, v in sec.items()}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate(cfg: TrainConfig) -> None:
    """Every numeric field in range, the method names known, no conflicting flags — before any work."""
    flat = _flat(cfg)
    bad = []
    for name, lo, hi, lo_in, hi_in in _RANGES:
        v = flat.get(name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            bad.append(f"{_flag(name)} {v!r} (need a finite number)")
            continue
        below = lo is not None and (v < lo or (v == lo and not lo_in))
        above = hi is not None and (v > hi or (v == hi and not hi_in))
        if below or above:
            rng = (
                f"{'≥' if lo_in else '>'} {lo}"
                if hi is None
                else f"in {'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"
            )
            bad.append(f"{_flag(name)} {v} (must be {rng})")
    if bad:
        raise ValueError("out-of-range flag(s): " + "; ".join(bad) + "; fix them and rerun")
    parse_methods(cfg.method.method)
    if cfg.data.rand_augment:
        from fastkd.data.randaug import parse_spec

        parse_spec(cfg.data.rand_augment)  # one line naming the form
    if cfg.optim.min_lr > cfg.optim.lr:
        raise ValueError(f"--min-lr {cfg.optim.min_lr} > --lr {cfg.optim.lr}; give --min-lr ≤ --lr")
    t = cfg.model.teacher
    shape = [_flag(f) for f in _SHAPE if getattr(cfg.model, f) is not None]
    if t and shape and (os.path.isfile(str(t)) or str(t).endswith(".safetensors")):
        raise ValueError(
            f"{', '.join(shape)} conflict with --teacher {t}: a checkpoint teacher is used as saved; "
            "drop the shape flags"
        )
    if getattr(cfg.run, "overwrite", False) and cfg.run.resume:
        raise ValueError(
            "--overwrite and --resume conflict: --resume continues a run, --overwrite starts over"
        )


def resume_changes(
    stored: dict, cfg: TrainConfig, *, non_finite: bool = False
) -> tuple[list[str], list[str]]:
    """(allowed changes, refused changes) between a run's stored config.json and ``cfg``, as field names."""
    old = {
        k: v
        for name, sec in stored.items()
        if isinstance(sec, dict) and name != "history"
        for k, v in sec.items()
    }
    new = _flat(cfg)
    allowed = RESUMABLE | (AFTER_NON_FINITE if non_finite else frozenset())
    ok, refused = [], []
    for k in sorted(set(old) | set(new)):
        if k not in new or k not in old:  # a field added or dropped between versions: compare defaults
            continue
        if old[k] != new[k]:
            (ok if k in allowed else refused).append(k)
    return ok, refused
