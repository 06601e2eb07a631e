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
    data: str = "digits"  # digits | DIR (train/ + val/) | SHARDS (tar pattern) | FILE.npz | synthetic:N
    val_data: str | None = None  # the val shards' pattern (tar shards only)
    val_fraction: float | None = None  # hold out this share of each class as val (data with no val split)
    val_crop_pct: float = 1.0  # val images: short side to img_size / val_crop_pct, centre crop
    img_size: int | None = None  # default: the dataset's own size
    # the student sees only the first N training images (the teacher, when fastkd trains it, all of them).
    # None: all images — except the bundled digits default job, which uses 360 (the small-labelled
    # regime where distillation matters; README). 0: all images, always.
    train_limit: int | None = None
    crop_pad: int | None = None  # augmentation translation in pixels (default: img_size/8)
    mixup: float = 0.0  # mixup alpha (0 = off)
    cutmix: float = 0.0  # cutmix alpha (0 = off)
    hflip: bool = False
    erase: float = 0.0  # random-erasing probability (0 = off)
    rrc_scale: float = 0.0  # random-resized crop: the smallest crop area fraction (0 = off)
    rand_augment: str | None = None  # timm's RandAugment spec, e.g. rand-m9-mstd0.5-inc1 (None = off)
    on_bad_image: str = "error"  # error | skip (an unreadable image: stop, or use the next of its class)
    workers: int | None = None  # loader worker processes (None: from the CPU count)
    memory_threshold: float = 2.0  # GiB: smaller decoded datasets are held in host memory, bigger streamed

    #: the training-augmentation fields (``fastkd.train.setup.build_aug`` reads them)
    AUGMENTATION = ("crop_pad", "mixup", "cutmix", "hflip", "erase", "rrc_scale", "rand_augment")

    def default_augmentation(self) -> DataConfig:
        """This data config with every augmentation field at its default: the recipe of the teachers fastkd
        trains itself (their keys hash the default augmentation, whatever the run's flags)."""
        return dataclasses.replace(self, **{f: getattr(DataConfig, f) for f in self.AUGMENTATION})


@dataclass
class ModelConfig:
    teacher: str | None = None  # timm name or fastkd checkpoint; None = train/reuse the default teacher
    teacher_weights: str | None = None  # pretrained timm weights for --teacher (.safetensors/.pth/.bin)
    teacher_finetune: int = 0  # epochs of fine-tuning the pretrained teacher on the training split first
    teacher_finetune_lr: float | None = None  # default: 1e-4 (full) or 1e-3 (head)
    teacher_finetune_mode: str = "full"  # full | head
    student: str | None = None  # timm name; None = the default student for the data
    student_weights: str | None = None  # pretrained timm weights for the student's initialisation
    student_embed_dim: int | None = None
    student_depth: int | None = None
    student_heads: int | None = None
    student_patch_size: int | None = None
    student_drop_path: float = 0.0  # the student's stochastic-depth rate (timm drop_path_rate)
    teacher_embed_dim: int | None = None  # shape of the auto-trained default teacher
    teacher_depth: int | None = None
    teacher_heads: int | None = None
    teacher_patch_size: int | None = None
    # auto-trained teacher: epoch cap (None = scaled with the data, fastkd.teachers.default); it stops
    # earlier when val top-1 stops improving and keeps its best epoch
    teacher_epochs: int | None = None
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
    accum_steps: int = 1  # gradient accumulation: batches per optimizer step
    ema_decay: float = 0.0  # EMA of the student's weights (0 = off)


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
    threads: int | None = None  # torch CPU threads (torch.set_num_threads); None = torch's default


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

# One line of help per flag: what it does; "(default: ...)" is appended from the dataclass unless the
# text already says what the default means (None defaults). CHOICES become argparse choices.
HELP: dict[str, str] = {
    # data
    "data": "dataset: digits | DIR (ImageFolder train/ + val/) | tar shards 'train-{0000..0099}.tar' "
    "(+ --val-data) | FILE.npz | synthetic:N (random images, no disk)",
    "val_data": "the val split of tar shards, a pattern like the --data one (default: none; folders "
    "hold val/)",
    "val_fraction": "for data without a val split (a folder of class folders, or shards without "
    "--val-data): hold out this share of each class as val, chosen by a hash of each file's name "
    "(default: none)",
    "val_crop_pct": "folders and shards: val images are decoded with the short side at img-size / "
    "VAL_CROP_PCT, then centre-cropped to img-size (the timm/DeiT ImageNet eval: 0.875); 1 = the whole short "
    "side, as the train images",
    "img_size": "square side images are resized to (default: the dataset's own size; folders: the most "
    "common short side up to 224; shards/synthetic: 224)",
    "train_limit": "the student sees only the first N training images; 0 = all (default: all, but 360 "
    "for the digits default job)",
    "crop_pad": "random-shift augmentation in pixels (default: img_size/8, or 0 with --rrc-scale)",
    "mixup": "mixup alpha; 0 = off",
    "cutmix": "cutmix alpha; 0 = off",
    "hflip": "random horizontal flips",
    "erase": "random-erasing probability: one box per image, filled with per-channel noise (DeiT: 0.25); "
    "0 = off",
    "rand_augment": "timm's RandAugment, as DeiT trains: rand-m9-mstd0.5-inc1 (2 ops per image from "
    "timm's 15 increasing ops, each with probability 0.5, magnitude ~ N(9, 0.5) in [0, 10]); keys m, n "
    "(default 2), mstd, inc1 (required); on the device, bit-identical to timm's PIL ops (bicubic "
    "geometry) (default: off)",
    "rrc_scale": "random-resized crop, the ImageNet/DeiT scale augmentation: each image is cropped to a "
    "box of area in [RRC_SCALE, 1] of it and aspect ratio in [3/4, 4/3], resized back (bilinear); the "
    "smallest area fraction (DeiT: 0.08); 0 = off",
    "on_bad_image": "an unreadable image stops the run (error) or is replaced by the next image of its "
    "class (skip)",
    "workers": "data loader worker processes for streamed data (default: from the CPU count)",
    "memory_threshold": "GiB: a dataset whose decoded pixels fit is held in host memory, a bigger one is "
    "streamed from disk",
    # model
    "teacher": "teacher: a timm name (+ --teacher-weights), hf-hub:timm/<name> (local HF cache), "
    "local-dir:<folder>, or a fastkd checkpoint (default: train/reuse the default teacher for the data)",
    "teacher_weights": "pretrained weights file for --teacher: .safetensors, .pth or .bin, offline "
    "(default: none)",
    "teacher_finetune": "epochs of fine-tuning the pretrained teacher on the training split before "
    "distilling (new head when the classes differ; trained once, then reused); 0 = off",
    "teacher_finetune_lr": "learning rate of --teacher-finetune (default: 1e-4 full, 1e-3 head)",
    "teacher_finetune_mode": "what --teacher-finetune trains: the whole teacher (full) or only its head",
    "student": "student timm name (default: the default student for the data)",
    "student_weights": "pretrained weights file for the student's initialisation: .safetensors, .pth or "
    ".bin (default: none, random init)",
    "student_embed_dim": "student width override (default: the arch's own)",
    "student_depth": "student depth (blocks) override (default: the arch's own)",
    "student_heads": "student attention heads override (default: the arch's own)",
    "student_patch_size": "student patch size override (default: the arch's own)",
    "student_drop_path": "the student's stochastic-depth rate (timm drop_path_rate; DeiT-S: 0.1); 0 = off",
    "teacher_embed_dim": "teacher width override (default: the arch's own)",
    "teacher_depth": "teacher depth (blocks) override (default: the arch's own)",
    "teacher_heads": "teacher attention heads override (default: the arch's own)",
    "teacher_patch_size": "teacher patch size override (default: the arch's own)",
    "teacher_epochs": "epochs of the auto-trained default teacher",
    "teacher_lr": "learning rate of the auto-trained default teacher",
    # method
    "method": "'+'-joined distillation terms, choices: " + ", ".join(METHODS),
    "ce_weight": "weight of the ground-truth cross-entropy",
    "label_smoothing": "label smoothing of the cross-entropy",
    "kd_T": "Hinton KD temperature",
    "kd_weight": "Hinton KD weight",
    "nkd_tau": "NKD temperature",
    "nkd_gamma": "NKD non-target weight gamma",
    "nkd_weight": "NKD weight",
    "vitkd_alpha": "ViTKD mimic (shallow blocks) weight",
    "vitkd_beta": "ViTKD generation (deep block) weight",
    "vitkd_mask_ratio": "ViTKD generation mask ratio",
    "vitkd_blocks": "ViTKD shallow student/teacher blocks, comma-separated",
    "clskd_blocks": "[CLS]-KD student blocks, comma-separated (default: 0,1,2,3 and the last four)",
    "clskd_w_cls": "[CLS]-KD class-token alignment weight",
    "clskd_w_map": "[CLS]-KD attention-map alignment weight",
    "clskd_mu": "[CLS]-KD temperature mu",
    "clskd_detach": "detach the student's projected tokens in [CLS]-KD",
    "md_weight": "manifold distillation weight",
    "md_k": "manifold distillation sampled patches",
    "cskd_hard": "CSKD on the teacher's argmax (hard) instead of its soft logits",
    "cskd_T": "CSKD temperature",
    "cskd_schedule": "CSKD alpha schedule over training",
    "cskd_per_iter": "update the CSKD schedule per iteration instead of per epoch",
    "cskd_weight": "CSKD weight",
    # optim
    "epochs": "training epochs of the student",
    "batch_size": "global batch size (split over processes)",
    "lr": "peak learning rate (AdamW)",
    "min_lr": "final learning rate of the cosine schedule",
    "weight_decay": "AdamW weight decay",
    "warmup_epochs": "linear warm-up epochs",
    "grad_clip": "gradient norm clip; 0 = off",
    "ema_decay": "an exponential moving average of the student's weights, updated after every optimizer "
    "step (ema = d·ema + (1-d)·student), evaluated beside the student and saved as student_ema.safetensors "
    "(timm: 0.9998; DeiT: 0.99996 at batch 1024); 0 = off",
    "accum_steps": "gradient accumulation: each optimizer step sums the gradients of this many batches of "
    "--batch-size (an effective batch of accum-steps × batch-size, for a batch too big for the GPU); the "
    "schedule, --log-every and --ckpt-every count optimizer steps; an epoch's last batches that cannot make "
    "a whole step are skipped",
    # run
    "seed": "random seed (data order, augmentation, init)",
    "out": "run directory (default: <workdir>/<method>-<student>-s<seed>)",
    "device": "auto | cpu | cuda | cuda:N; auto = cuda when available",
    "compile": "torch.compile the student step",
    "amp": "bf16 autocast on CUDA (ignored on CPU)",
    "fused": "fused kernels for the KD losses (Triton on CUDA; compiled reference on CPU)",
    "resume": "continue from the run directory's last checkpoint (--resume --out X alone restores X's "
    "config)",
    "overwrite": "replace a non-empty --out, its checkpoint included (default: off: a non-empty --out is "
    "refused)",
    "no_verify": "skip the sha256 check of checkpoints on load",
    "teacher_cache": "train from a teacher cache built by python -m fastkd.cache (default: none, online "
    "teacher)",
    "tensorboard": "also write TensorBoard logs under <out>/tb",
    "log_every": "steps between metrics.jsonl records",
    "ckpt_every": "also checkpoint every N steps inside an epoch; 0 = at epoch ends only",
    "eval_every": "epochs between val evaluations",
    "workdir": "where auto-trained teachers and default run directories live",
    "quiet": "no progress bar",
    "threads": "torch CPU threads (default: torch's own count; 1-2 on a busy small machine)",
}
CHOICES: dict[str, tuple[str, ...]] = {
    "on_bad_image": ("error", "skip"),
    "teacher_finetune_mode": ("full", "head"),
    "cskd_schedule": ("linear", "square", "cos"),
}
_PARSER_CHOICES = ("on_bad_image", "teacher_finetune_mode")  # cskd_schedule: its method gives the one line


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
    "digits32": (
        "the 32x32 regime: digits upscaled to 32x32, patch 4 (8x8 = 64 tokens), student depth 5 (default 4), "
        "ViT teacher depth 7 (default 6); the CSKD CNN teacher's dense map is 4x4; batch 16 at lr 1e-3 "
        "(64 tokens train slower per step: at batch 64 the student reached 35% in 40 epochs, at 16 72%)",
        dict(img_size=32, student_depth=5, teacher_depth=7, batch_size=16, lr=1e-3, teacher_lr=1e-3),
    ),
}

# Study regimes (python -m fastkd.study --regime NAME): the overrides every run of the study shares.
REGIMES: dict[str, dict[str, Any]] = {
    "digits8": {},  # the default job's regime: 8x8 digits, patch 2 (4x4 = 16 tokens), CNN map 2x2
    "digits32": dict(PRESETS["digits32"][1]),
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
    p = argparse.ArgumentParser(
        prog="python -m fastkd.train", description=description, usage="%(prog)s [--flag VALUE ...]"
    )
    p.add_argument(
        "--preset", choices=sorted(PRESETS),
        # argparse %-formats help text: the presets' own "%" must be escaped, or --help crashes
        help="; ".join(f"{k}: {v[0]}" for k, v in PRESETS.items()).replace("%", "%%") + " (default: none)",
    )
    p.add_argument("--config", help="a config.json from an earlier run to start from (default: none)")
    defaults = TrainConfig()
    for sec_name, sec in _sections(defaults):
        hints = get_type_hints(type(sec))
        g = p.add_argument_group(sec_name)
        for f in fields(sec):
            flag = "--" + f.name.replace("_", "-")
            typ = hints[f.name]
            text = HELP.get(f.name, f.name.replace("_", " "))
            if "(default" not in text:
                d = getattr(sec, f.name)
                text += f" (default: {'on' if d is True else 'off' if d is False else d})"
            if f.name in CHOICES:
                text += f" (choices: {', '.join(CHOICES[f.name])})"
            text = text.replace("%", "%%")
            if typ is bool and f.name.startswith("no_"):  # --no-verify: a plain switch
                g.add_argument(flag, dest=f.name, action="store_const", const=True, default=None, help=text)
            elif typ is bool:
                g.add_argument(
                    flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text
                )
            else:
                base = {int | None: int, float | None: float, str | None: str}.get(typ, typ)
                g.add_argument(flag, dest=f.name, type=base, default=None, metavar=f.name.upper(),
                               choices=CHOICES[f.name] if f.name in _PARSER_CHOICES else None, help=text)
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
