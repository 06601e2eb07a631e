"""Typed run configuration: dataclass sections, presets, CLI overrides, ``to_dict()``.

Every field of every section is a CLI flag (``--batch-size``, ``--vitkd-alpha`` …); the flag
names are the field names with ``_`` → ``-`` and are unique across sections. ``--preset NAME``
applies a named set of overrides first, then the explicit flags win.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any, get_type_hints

METHODS = ("ce", "kd", "nkd", "vitkd", "clskd", "md", "cskd", "deit")


@dataclass
class DataConfig:
    data: str = "digits"  # digits | DIR (train/ + val/) | FILE.npz
    img_size: int | None = None  # default: the dataset's own size
    # the student sees only the first N training images (the teacher, when fastkd trains it, all of them).
    # None: all images — except the bundled digits default job, which uses 360 (the small-labelled
    # regime where distillation matters; README). 0: all images, always.
    train_limit: int | None = None
    crop_pad: int | None = None  # augmentation translation in pixels (default: img_size/8)
    mixup: float = 0.0  # mixup alpha (0 = off)
    cutmix: float = 0.0  # cutmix alpha (0 = off)
    hflip: bool = False


@dataclass
class ModelConfig:
    teacher: str | None = None  # timm name or fastkd checkpoint; None = train/reuse the default teacher
    student: str | None = None  # timm name; None = the default student for the data
    student_embed_dim: int | None = None
    student_depth: int | None = None
    student_heads: int | None = None
    student_patch_size: int | None = None
    teacher_embed_dim: int | None = None  # shape of the auto-trained default teacher
    teacher_depth: int | None = None
    teacher_heads: int | None = None
    teacher_patch_size: int | None = None
    teacher_epochs: int = 60  # recipe of the auto-trained teacher
    teacher_lr: float = 2e-3


@dataclass
class MethodConfig:
    method: str = "vitkd+nkd"  # '+'-joined: ce, kd, nkd, vitkd, clskd, md, cskd, deit
    ce_weight: float = 1.0
    label_smoothing: float = 0.1
    kd_T: float = 4.0
    kd_weight: float = 1.0
    nkd_tau: float = 1.0
    nkd_gamma: float = 1.0
    nkd_weight: float = 1.0
    vitkd_alpha: float = 3e-5
    vitkd_beta: float = 3e-6
    vitkd_mask_ratio: float = 0.5
    vitkd_blocks: str = "0,1"  # shallow student/teacher blocks for the mimic loss
    # [CLS]-KD / manifold / CSKD (issue 4)
    clskd_blocks: str | None = None  # student blocks; default [0,1,2,3,L-4..L-1]
    clskd_w_cls: float = 1.0
    clskd_w_map: float = 2.0
    clskd_mu: float = 4.0
    clskd_detach: bool = False
    md_weight: float = 1.0
    md_k: int = 192
    cskd_hard: bool = True
    cskd_T: float = 1.0
    cskd_schedule: str = "linear"  # linear | square | cos
    cskd_per_iter: bool = False
    cskd_weight: float = 1.0


@dataclass
class OptimConfig:
    epochs: int = 150
    batch_size: int = 64
    lr: float = 2e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 5.0
    grad_clip: float = 5.0


@dataclass
class RunConfig:
    seed: int = 0
    out: str | None = None  # default: runs/<method>-<student>-s<seed>
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    compile: bool = False
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    fused: bool = False
    resume: bool = False
    overwrite: bool = False  # replace a non-empty --out (its checkpoint too) instead of refusing
    no_verify: bool = False  # skip the sha256 check of checkpoints on load
    teacher_cache: str | None = None
    tensorboard: bool = False
    log_every: int = 20
    ckpt_every: int = 0  # also checkpoint every N steps inside an epoch (0 = at epoch ends only)
    eval_every: int = 5  # epochs
    workdir: str = "runs"  # where auto-trained teachers and default run dirs live
    quiet: bool = False


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def methods(self) -> list[str]:
        return parse_methods(self.method.method)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> TrainConfig:
        """Strict: an unknown section or field, or a value of the wrong type, is one line with a hint."""
        cfg = cls()
        names = [s.name for s in fields(cls)]
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a JSON object with sections {names}")
        for key, sec_d in d.items():
            if key == "history":  # resume events recorded by fastkd.train
                continue
            if key not in names or not isinstance(sec_d, dict):
                raise ValueError(f"{where}: unknown section {key!r}{_hint(key, names)}; sections: {names}")
            sec = getattr(cfg, key)
            hints = get_type_hints(type(sec))
            for k, v in sec_d.items():
                if k not in hints:
                    raise ValueError(f"{where}: unknown field {key}.{k!r}{_hint(k, list(hints))}")
                if not _type_ok(v, hints[k]):
                    raise ValueError(f"{where}: {key}.{k} = {v!r} is not {_tname(hints[k])}; fix the value")
                setattr(sec, k, float(v) if hints[k] in (float, float | None) and v is not None else v)
        return cfg


def _hint(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _tname(t) -> str:
    return getattr(t, "__name__", str(t))


def _type_ok(v: Any, t) -> bool:
    if v is None:
        return t in (int | None, float | None, str | None)
    if t in (bool,):
        return isinstance(v, bool)
    if t in (int, int | None):
        return isinstance(v, int) and not isinstance(v, bool)
    if t in (float, float | None):
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if t in (str, str | None):
        return isinstance(v, str)
    return True


# Presets: the releases' totals. Each preset says its total in the help text.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "vitkd-nkd": ("ViTKD release total: CE(ls 0.1) + L_mim + L_gen + NKD", {"method": "vitkd+nkd"}),
    "clskd-release": (
        "[CLS]-KD release: 1*ALD(cls) + 2*ALD(map) + KD(T=1) + MD, no ground-truth CE",
        {"method": "clskd+kd+md", "kd_T": 1.0, "ce_weight": 0.0, "clskd_w_cls": 1.0, "clskd_w_map": 2.0},
    ),
    "clskd-nkd": ("[CLS]-KD + NKD on top of CE(ls 0.1)", {"method": "clskd+nkd"}),
    "cskd-release": (
        "CSKD release: 1/2 CE(cls, ls 0.1) + 1/2 DeiT hard(dist) + 1*CSKD (hard)",
        {"method": "cskd+deit", "cskd_hard": True},
    ),
    "deit": ("DeiT hard distillation: 1/2 CE(cls) + 1/2 CE(dist, argmax teacher)", {"method": "deit"}),
}


def parse_methods(spec: str) -> list[str]:
    names = [m.strip().lower() for m in spec.split("+") if m.strip()]
    if not names:
        raise ValueError("--method is empty; give '+'-joined names from: " + ", ".join(METHODS))
    for m in names:
        if m not in METHODS:
            close = difflib.get_close_matches(m, METHODS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"--method: unknown method '{m}'{hint}; choose from: {', '.join(METHODS)}")
    return sorted(set(names), key=names.index)


def _sections(cfg: TrainConfig):
    for sec in fields(TrainConfig):
        yield sec.name, getattr(cfg, sec.name)


def build_parser(description: str = "fastkd training") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastkd.train", description=description)
    p.add_argument(
        "--preset", choices=sorted(PRESETS), help="; ".join(f"{k}: {v[0]}" for k, v in PRESETS.items())
    )
    p.add_argument("--config", help="a config.json from an earlier run to start from")
    defaults = TrainConfig()
    for sec_name, sec in _sections(defaults):
        hints = get_type_hints(type(sec))
        g = p.add_argument_group(sec_name)
        for f in fields(sec):
            flag = "--" + f.name.replace("_", "-")
            typ = hints[f.name]
            if typ is bool and f.name.startswith("no_"):  # --no-verify: a plain switch
                g.add_argument(flag, dest=f.name, action="store_const", const=True, default=None)
            elif typ is bool:
                g.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
            else:
                base = {int | None: int, float | None: float, str | None: str}.get(typ, typ)
                g.add_argument(flag, dest=f.name, type=base, default=None, metavar=f.name.upper())
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    return config_from_args(build_parser().parse_args(argv))


def config_from_args(
    args: argparse.Namespace, skip: tuple[str, ...] = (), defaults: dict[str, Any] | None = None
) -> TrainConfig:
    """``defaults`` (without --config) or the --config file, then --preset, then explicit flags.
    Names in ``skip`` are the command's own options, not config fields."""
    cfg = TrainConfig()
    stored = os.path.join(getattr(args, "out", None) or "", "config.json")
    if args.config:
        cfg = load_config(args.config)
    elif getattr(args, "resume", None) and getattr(args, "out", None) and os.path.isfile(stored):
        cfg = load_config(stored)  # --resume --out X: X's own config, then the explicit flags
    elif defaults:
        apply_overrides(cfg, defaults)
    overrides: dict[str, Any] = {}
    if args.preset:
        overrides.update(PRESETS[args.preset][1])
    skip = ("preset", "config", *skip)
    overrides.update({k: v for k, v in vars(args).items() if v is not None and k not in skip})
    apply_overrides(cfg, overrides)
    parse_methods(cfg.method.method)  # validate early: one clear line
    return cfg


def load_config(path: str) -> TrainConfig:
    try:
        with open(path) as fh:
            d = json.load(fh)
    except json.JSONDecodeError as e:
        raise ValueError(f"--config {path}: not valid JSON ({e}); fix or regenerate it") from None
    return TrainConfig.from_dict(d, where=f"--config {path}")


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    for k, v in overrides.items():
        for _, sec in _sections(cfg):
            if hasattr(sec, k):
                setattr(sec, k, v)
                break
        else:
            raise ValueError(f"unknown config field '{k}'")
    return cfg
