"""What the GPU benches share (``step_bench``, ``profile_step``, ``peer_bench``, ``sync_probe``): the
synthetic data set, the trainer flags every bench variant starts from, the step shapes, a builder of any
step variant (``StepBed``), and the hand-written KD step users would write instead.
Plain module next to the scripts (``python bench/<script>.py`` puts bench/ on ``sys.path``)."""

from __future__ import annotations

import itertools
import os
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F


def synthetic_npz(root: str, S: int, C: int, n_train: int, n_val: int) -> str:
    """A random uint8 RGB set of S×S images and C classes as ``root/synthetic.npz`` (seed 0)."""
    g = torch.Generator().manual_seed(0)
    path = os.path.join(root, "synthetic.npz")
    np.savez(
        path,
        x_train=torch.randint(0, 256, (n_train, S, S, 3), dtype=torch.uint8, generator=g).numpy(),
        y_train=torch.randint(0, C, (n_train,), generator=g).numpy(),
        x_val=torch.randint(0, 256, (n_val, S, S, 3), dtype=torch.uint8, generator=g).numpy(),
        y_val=torch.randint(0, C, (n_val,), generator=g).numpy(),
    )
    return path


def trainer_argv(npz: str, student: str, teacher: str, B: int, root: str, device: str,
                 img_size: int | None = None) -> list[str]:
    """``fastkd.train`` flags of a bench trainer: the synthetic set, one epoch, no eval, seed 0, quiet."""
    argv = ["--data", npz, "--student", student, "--teacher", teacher, "--batch-size", str(B), "--quiet",
            "--workdir", root, "--device", device, "--seed", "0", "--train-limit", "0", "--epochs", "1",
            "--eval-every", "0"]
    return argv + (["--img-size", str(img_size)] if img_size else [])


def step_shape(small: bool) -> dict:
    """The step benches' shape: DeiT-S ← DeiT-B, 224², B = 256, 1000 classes (``small``: a CPU dry run)."""
    if small:
        return dict(S=32, C=10, NTR=32, B=8, student="deit_tiny_patch16_224",
                    teacher="deit_small_patch16_224")
    return dict(S=224, C=1000, NTR=512, B=256, student="deit_small_patch16_224",
                teacher="deit_base_patch16_224")


class StepBed:
    """Builds the step benches' variants on one synthetic set: ``build(method, flags)`` → (trainer, ids),
    warmed by nothing yet, its batches announced as ``fit`` announces them. ``flags`` are ``fastkd.train``
    flags plus ``@cache`` (a teacher cache of the set, built once on first use: ``cache_build_s``,
    ``cache_bytes``) and ``@diy`` (the hand-written KD step, ``DiyKD``)."""

    def __init__(self, root: str, shape: dict, device: str, small: bool):
        from fastkd.data import load_data

        self.root, self.shape, self.device = root, shape, device
        npz = synthetic_npz(root, shape["S"], shape["C"], shape["NTR"], 64)
        self.data = load_data(npz)
        self.base = trainer_argv(
            npz, shape["student"], shape["teacher"], shape["B"], root, device,
            img_size=shape["S"] if small else None,
        )
        self.cache_dir: str | None = None
        self.cache_build_s: float | None = None
        self.cache_bytes: int | None = None
        self.ids: torch.Tensor | None = None

    def _cache(self) -> str:
        if self.cache_dir is None:
            from fastkd.cache.build import build_cache
            from fastkd.config import parse_args

            self.cache_dir = os.path.join(self.root, "cache")
            t0 = time.monotonic()
            build_cache(parse_args([*self.base, "--method", "vitkd+nkd"]), self.cache_dir, views=1,
                        log=lambda *x: None, progress=False)
            self.cache_build_s = round(time.monotonic() - t0, 2)
            self.cache_bytes = sum(
                os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(self.cache_dir) for f in fs
            )
        return self.cache_dir

    def build(self, method: str, flags: list[str]):
        from fastkd.config import parse_args
        from fastkd.train.setup import build_trainer

        sh = self.shape
        if "@diy" in flags:
            tr = DiyKD(sh["student"], sh["teacher"], sh["S"], sh["C"], sh["B"], self.device)
        else:
            argv = [*self.base, "--method", method, *(f for f in flags if not f.startswith("@"))]
            if "@cache" in flags:
                argv += ["--teacher-cache", self._cache()]
            tr = build_trainer(parse_args(argv), data=self.data, log=lambda *x: None)
        if self.ids is None and hasattr(tr, "sampler"):
            self.ids = next(iter(tr.sampler.batches(0)))
        if hasattr(tr.teacher, "prefetch_epoch"):
            tr.teacher.prefetch_epoch(itertools.repeat(self.ids), 0)
        if hasattr(tr, "batches"):  # announce the batches ahead, as fit does (no per-step id read-back)
            tr.batches.start_epoch(itertools.repeat(self.ids.cpu()), tr.view_of(0))
        return tr, self.ids


def hinton_kd_loss(sl: torch.Tensor, tl: torch.Tensor, y: torch.Tensor, T: float = 4.0) -> torch.Tensor:
    """CE (label smoothing 0.1) + T²·KL(teacher ‖ student) at temperature T, as a user writes it."""
    return F.cross_entropy(sl.float(), y, label_smoothing=0.1) + F.kl_div(
        F.log_softmax(sl.float() / T, -1), F.log_softmax(tl.float() / T, -1), reduction="batchmean",
        log_target=True,
    ) * (T * T)


class DiyKD:
    """The hand-written PyTorch Hinton-KD step users would write instead: student and teacher
    ``torch.compile``d (or eager), bf16 autocast on CUDA, CE with label smoothing + KL(T=4), clip 5, fused
    AdamW; the batch already on the device (no augmentation: a lower bound for what fastkd does)."""

    def __init__(
        self, student: str, teacher: str, S: int, C: int, B: int, device: str, compile_: bool = True
    ):
        import timm

        torch.manual_seed(0)
        mk = dict(num_classes=C, img_size=S)
        self.s = timm.create_model(student, **mk).to(device)
        self.t = timm.create_model(teacher, **mk).to(device).eval().requires_grad_(False)
        self.cuda = torch.device(device).type == "cuda"
        self.opt = torch.optim.AdamW(self.s.parameters(), lr=1e-4, **({"fused": True} if self.cuda else {}))
        self.sf, self.tf = (torch.compile(self.s), torch.compile(self.t)) if compile_ else (self.s, self.t)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(B, 3, S, S, generator=g).to(device)
        self.y = torch.randint(0, C, (B,), generator=g).to(device)
        self.teacher = None

    def step(self, ids=None, epoch=0):
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda):
            with torch.no_grad():
                tl = self.tf(self.x)
            loss = hinton_kd_loss(self.sf(self.x), tl, self.y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.s.parameters(), 5.0)
        self.opt.step()
        return {"loss": loss}


def sync_warnings(fn: Callable[[], object]) -> list[warnings.WarningMessage]:
    """The host-sync warnings ``fn()`` raises under ``torch.cuda.set_sync_debug_mode("warn")`` (CUDA).
    torch's own notice that the debug mode "is a prototype feature" (emitted once per process, when the
    mode is first set) is not a sync: the 2026-11-26 H100 run counted it as one for the first variant."""
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    return [
        w for w in ws
        if "synchroniz" in str(w.message).lower() and "prototype feature" not in str(w.message)
    ]
