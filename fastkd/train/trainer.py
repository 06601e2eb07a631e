"""The training loop, nanoGPT style: ``Trainer`` is handed ready parts; ``step`` is one optimizer step::

    zero_grad → [data (augment) → teacher (online | cached) → student (+taps) → losses
              → backward] × --accum-steps → clip → optimizer → schedule

``fit`` runs the epochs (eval, checkpoints, metrics.jsonl, summary.json, report.png). The parts are built
by ``fastkd.train.setup`` from a config; this module imports neither the cache nor the teacher factory.
What a run directory holds: ``fastkd.train.rundir.RUN_FILES``.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from fastkd import stop
from fastkd.config import TrainConfig
from fastkd.data import Dataset, EpochSampler
from fastkd.data.augment import AugmentConfig
from fastkd.data.batches import TrainBatches
from fastkd.methods.registry import DistillLoss, eval_dense_heads
from fastkd.models import forward_taps, save_model
from fastkd.ops import dispatch as KF
from fastkd.teachers.base import Teacher
from fastkd.telemetry import Telemetry
from fastkd.train.artifacts import (
    dispatch_summary,
    read_metrics,
    repro_info,
    save_loss_modules,
    truncate_metrics,
    write_report,
)
from fastkd.train.distributed import Dist
from fastkd.train.ema import StudentEMA
from fastkd.train.evaluate import evaluate
from fastkd.train.finite import FirstNonFinite
from fastkd.train.finite import all_finite as _all_finite
from fastkd.train.optim import build_optimizer, resume_lr
from fastkd.train.rundir import NON_FINITE, record_non_finite, resume_steps, write_config
from fastkd.utils import atomic_write_json, load_state, save_state

__all__ = ["NonFiniteLoss", "Trainer", "evaluate"]


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
    """Trains ``student`` on ``data`` against ``teacher`` with ``loss``; ``step`` is one optimizer step,
    ``fit`` the run. Builds only what the loop owns: sampler, optimizer, schedule, DDP wrap, compile."""

    def __init__(
        self,
        cfg: TrainConfig,
        data: Dataset,
        aug: AugmentConfig,
        student: nn.Module,
        teacher: Teacher | None,
        loss: DistillLoss,
        *,
        student_arch: tuple[str, dict],
        dist: Dist | None = None,
        log=print,
    ):
        self.cfg, self.log = cfg, log
        self.dist = dist or Dist()
        self.data, self.aug, self.student, self.teacher, self.loss_fn = data, aug, student, teacher, loss
        self.student_arch = student_arch
        self.device = next(student.parameters()).device
        self.amp = cfg.run.amp and self.device.type == "cuda"
        self.eval_dense = eval_dense_heads(cfg.method.method)
        self.teacher_top1 = teacher.top1 if teacher is not None else None
        self.batches = TrainBatches(data, aug, cfg.run.seed, self.device, workers=cfg.data.workers)
        self.y_train = self.batches.y_train
        self.sampler = EpochSampler(
            len(data.y_train),
            cfg.optim.batch_size,
            cfg.run.seed,
            rank=self.dist.rank,
            world_size=self.dist.world,
            device=self.device,  # device ids: no per-step host→device copy
        )

        # gradient accumulation: an optimizer step takes ``accum`` batches of the sampler; an epoch's last
        # len(sampler) % accum batches, too few for a step, are skipped
        self.accum = cfg.optim.accum_steps
        self.micro_per_epoch = len(self.sampler) // self.accum * self.accum
        if self.micro_per_epoch == 0:
            raise ValueError(
                f"--accum-steps {self.accum} needs {self.accum} batches per epoch, but the data gives "
                f"{len(self.sampler)} of --batch-size {self.sampler.batch_size}; lower --accum-steps or "
                "--batch-size"
            )
        self.steps_per_epoch = self.micro_per_epoch // self.accum  # optimizer steps
        self.opt, self.sched = build_optimizer(
            cfg, [self.student, self.loss_fn], self.device, self.steps_per_epoch
        )
        self._params = [p for g in self.opt.param_groups for p in g["params"]]  # what clipping sees
        self.ema = StudentEMA(student, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
        self.step_idx, self.epoch = 0, 0
        self.s_blocks = self.loss_fn.student_blocks()
        # student + trainable loss parts in one module: what DDP wraps and torch.compile compiles
        # (wrap, then compile: the order torch recommends, so DDPOptimizer splits at bucket bounds)
        self.step_module: nn.Module = StudentStep(self.student, self.loss_fn, self.s_blocks, self.amp)
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            # static_graph: the parameters a total leaves unused (e.g. a head no part reads) are found in the
            # first step and remembered; find_unused_parameters alone would all-reduce a used-parameter map
            # and read it back on the host every step (a sync beyond the gradient all-reduce)
            self.step_module = DDP(self.step_module, device_ids=ids, static_graph=True)
        self._fwd = (KF.compile_step if cfg.run.compile else KF.calibrate_step)(self.step_module)
        if cfg.run.compile and teacher is not None:
            teacher.compile()  # the online teacher's tap forward (no grad, eval) compiled too
        # the training position as a 0-d device tensor, refilled each step (a fill kernel: no host→device
        # copy, no sync; one tensor object, so torch.compile does not recompile as it moves)
        self._epoch_frac = torch.zeros((), dtype=torch.get_default_dtype(), device=self.device)
        self._ddp_recorded = False  # whether a backward ran (DDP records its static graph there)
        self._bad = FirstNonFinite()  # per-part first non-finite step, on device (read on log steps)
        self._ckpt_dir: Path | None = None  # set by fit
        self._last_ckpt_step: int | None = None  # the step of the last (finite) checkpoint written or loaded
        self.resume_event: dict | None = None  # set by the CLI on --resume (recorded in config.json)

    # -- the step ----------------------------------------------------------------------------
    def view_of(self, epoch: int) -> int:
        """Augmentation view of an epoch: the epoch itself, or epoch mod V for a V-view teacher cache."""
        views = self.teacher.views if self.teacher is not None else None
        return epoch % views if views else epoch

    def batch(self, ids: torch.Tensor, epoch: int):
        return self.batches(ids, self.view_of(epoch))

    def forward_loss(self, x, t_sig, y_soft, y_hard, epoch_frac: float = 0.0) -> dict[str, torch.Tensor]:
        """Student forward + the named loss terms for one batch (no backward, no optimizer)."""
        return self._fwd(x, t_sig, y_soft, y_hard, epoch_frac)

    def step(self, ids, epoch: int, tel: Telemetry | None = None) -> dict[str, torch.Tensor]:
        """One optimizer step on the sample ``ids`` (the sampler's device ids) of ``epoch``; no host sync.
        With ``--accum-steps K``, ``ids`` is a list of K batches: their gradients add up, each loss scaled by
        1/K (the step's gradient is that of their mean), and under DDP only the last backward all-reduces.

        Returns the named loss terms, averaged over the batches (0-d device tensors; read them on log steps
        only)."""
        group = [ids] if isinstance(ids, torch.Tensor) else list(ids)
        if len(group) != self.accum:
            raise ValueError(f"Trainer.step: {len(group)} batch(es) for --accum-steps {self.accum}")
        ph = tel.timer.phase if tel is not None else (lambda name: contextlib.nullcontext())
        self.opt.zero_grad(set_to_none=True)
        terms: dict[str, torch.Tensor] = {}
        for k, b in enumerate(group):
            t = self._forward_backward(b, epoch, ph, k)
            terms = {n: terms[n] + v for n, v in t.items()} if terms else t
        if self.accum > 1:
            terms = {n: v / self.accum for n, v in terms.items()}
        with ph("optim"):
            if self.cfg.optim.grad_clip > 0:
                terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(self._params, self.cfg.optim.grad_clip)
            self.opt.step()
            self.sched.step()
            if self.ema is not None:
                self.ema.update()
            self._track_finite(terms)
        self.step_idx += 1
        return terms

    def _forward_backward(self, ids: torch.Tensor, epoch: int, ph, k: int) -> dict[str, torch.Tensor]:
        """Data, teacher, student + loss and backward of batch ``k`` of the step; its terms, detached when
        accumulating (the step averages them)."""
        view = self.view_of(epoch)
        with ph("data"):
            if ids.device != self.device:  # host ids from a caller (the sampler yields device ids)
                ids = ids.to(self.device, non_blocking=True)
            x, y_soft, y_hard = self.batches(ids, view)
        t_sig = {}
        if self.teacher is not None:
            with ph("cache_wait"):  # a cached teacher waits for the prefetched record (data_wait_share)
                self.teacher.ready(ids, view)
            with ph("teacher"), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
                t_sig = self.teacher(x, ids=ids, view=view)
        with ph("student"):
            micro = (self.step_idx % self.steps_per_epoch) * self.accum + k  # this batch's place in the epoch
            pos = epoch + micro / self.micro_per_epoch
            epoch_frac = self._epoch_frac.fill_(pos)  # same float32 value as torch.tensor(pos)
            # DDP's static graph is recorded by this process's first backward, which must all-reduce;
            # later ones skip it (no_sync) but for a step's last (all ranks' partial sums agree: exact)
            sync = k == self.accum - 1 or self.dist.world == 1 or not self._ddp_recorded
            self._ddp_recorded = True
            with contextlib.nullcontext() if sync else self.step_module.no_sync():
                terms = self._fwd(x, t_sig, y_soft, y_hard, epoch_frac)
                if self.accum == 1:
                    terms["loss"].backward()
                    return terms
                (terms["loss"] / self.accum).backward()
        return {n: v.detach() for n, v in terms.items()}

    def _track_finite(self, terms: dict[str, torch.Tensor]) -> None:
        """Remember, on device, the first step at which each loss part, the gradient norm or the updated
        parameters went non-finite (``FirstNonFinite``: no sync)."""
        self._bad.track(terms, self._params, self.step_idx + 1, self.device)

    def check_finite(self) -> None:
        """Host sync (log steps, before checkpoints): stop naming the step and the part that went bad."""
        hit = self._bad.first()
        if hit is not None:
            step, what, parts = hit
            self._stop_non_finite(step)
            raise NonFiniteLoss(
                f"non-finite {what} at step {step} (part: {parts}); stopped, "
                + self._last_good_words()
                + " — lower --lr, check the data/teacher, then rerun with --resume"
            )

    def _last_good_words(self) -> str:
        last = self._last_ckpt_step
        if last is None:
            return "no finite checkpoint was written (start again without --resume)"
        return f"the last finite checkpoint (step {last}) is kept"

    def _stop_non_finite(self, step: int) -> None:
        ckpt = self._ckpt_dir
        if ckpt is not None and self.dist.main:
            record_non_finite(ckpt, self.cfg, step, self._last_ckpt_step)

    # -- eval ------------------------------------------------------------------------------
    def evaluate_model(self, model: nn.Module, batch_size: int = 512) -> dict[str, float]:
        """``evaluate`` with the methods' eval rule for the student and its EMA (plain heads for others)."""
        dense = self.eval_dense and (model is self.student or model is getattr(self.ema, "model", None))
        return evaluate(model, self.data, self.device, self.amp, dense_heads=dense, batch_size=batch_size,
                        dist=self.dist, workers=self.cfg.data.workers)

    def _calibrated(self) -> bool:
        """Whether the first step calibrated the measured dispatch (CUDA, --fused, auto): its choices and the
        step's slack are then worth one line."""
        bal = getattr(self._fwd, "balance", None)
        return bal is not None and "switched" in bal

    # -- run ---------------------------------------------------------------------------------
    def fit(self, out_dir: str | Path) -> dict:
        cfg, main = self.cfg, self.dist.main
        out = Path(out_dir)
        ckpt_dir = out / "checkpoint"
        metrics_path = out / "metrics.jsonl"
        start_epoch, start_step = 0, 0
        self._ckpt_dir = ckpt_dir
        if cfg.run.resume and (ckpt_dir / "state.json").exists():
            start_epoch, start_step = self._load_checkpoint(ckpt_dir)
            self.log(
                f"fastkd: resumed from {ckpt_dir} at epoch {start_epoch} step {start_step}"
            ) if main else None
            if main:
                truncate_metrics(metrics_path, self.step_idx)
        elif main and metrics_path.exists():
            metrics_path.unlink()
        if main:
            out.mkdir(parents=True, exist_ok=True)
            write_config(out, cfg, self.resume_event)
        tel = Telemetry(
            self.device, tensorboard_dir=str(out / "tb") if (cfg.run.tensorboard and main) else None
        )
        self.student.train()
        self.loss_fn.train()
        t0 = time.perf_counter()
        last_eval, ema_eval = None, {}
        bar = tqdm(
            total=cfg.optim.epochs * self.steps_per_epoch,
            initial=self.step_idx,
            disable=cfg.run.quiet or not main,
            desc=f"{cfg.method.method} {self.student_arch[0]}",
            dynamic_ncols=True,
            leave=False,
        )
        mf = open(metrics_path, "a") if main else None
        def batches(epoch: int, first: int):  # the epoch's batches that make whole optimizer steps
            return self.sampler.batches(epoch, start_step=first, stop_step=self.micro_per_epoch)

        disarm = stop.arm()  # SIGTERM / Ctrl-C: a checkpoint at a step boundary, then stop (fastkd.stop)
        try:
            for epoch in range(start_epoch, cfg.optim.epochs):
                self.epoch = epoch
                first = start_step if epoch == start_epoch else 0
                if self.teacher is not None:  # a cached teacher gathers the epoch's records ahead
                    self.teacher.prefetch_epoch(batches(epoch, first), self.view_of(epoch))
                # the loader prepares the epoch's batches (CPU ids) ahead, in workers or from pinned memory
                self.batches.start_epoch(batches(epoch, first), self.view_of(epoch))
                it = iter(batches(epoch, first))
                for i in range(first + self.accum - 1, self.micro_per_epoch, self.accum):  # i: its last batch
                    group = [next(it) for _ in range(self.accum)]
                    terms = self.step(group[0] if self.accum == 1 else group, epoch, tel)
                    tel.timer.step_done(sum(len(b) for b in group) * self.dist.world)
                    bar.update(1)
                    log_step = self.step_idx % cfg.run.log_every == 0 or self.step_idx == 1
                    if log_step:
                        self.check_finite()  # log step: host sync allowed
                        rec = self.dist.mean({k: v.detach().float() for k, v in terms.items()})
                        rec.update(step=self.step_idx, epoch=epoch, lr=self.sched.get_last_lr()[0])
                        rec.update(tel.log(self.step_idx, rec))
                        if mf:
                            mf.write(json.dumps(rec) + "\n")
                            mf.flush()
                        bar.set_postfix(loss=f"{rec['loss']:.4f}")
                        if self.step_idx == 1 and main and not cfg.run.quiet and self._calibrated():
                            bar.write(f"fastkd: --fused, calibrated at step 1 → {KF.describe(self.device)}")
                    stopping = self._stop_signal(log_step)  # a checkpoint here, then stop
                    if (
                        stopping or (cfg.run.ckpt_every and self.step_idx % cfg.run.ckpt_every == 0)
                    ) and i + 1 < self.micro_per_epoch:
                        self._save_checkpoint(ckpt_dir, epoch, i + 1)
                        if stopping:
                            self._halt(ckpt_dir, stopping)
                last = epoch + 1 == cfg.optim.epochs
                if last or (cfg.run.eval_every and (epoch + 1) % cfg.run.eval_every == 0):
                    last_eval = self.evaluate_model(self.student)  # sharded over the ranks, reduced
                    ema_eval = self.evaluate_model(self.ema.model) if self.ema is not None else {}
                    if main:
                        ev = {
                            "epoch": epoch + 1,
                            "step": self.step_idx,
                            **{f"val_{k}": v for k, v in last_eval.items()},
                            **{f"val_ema_{k}": v for k, v in ema_eval.items()},
                        }
                        mf.write(json.dumps(ev) + "\n")
                        mf.flush()
                        if not cfg.run.quiet:
                            bar.write(
                                f"epoch {epoch + 1}/{cfg.optim.epochs}  val top-1 {last_eval['top1']:.2f}%"
                                + (f" (EMA {ema_eval['top1']:.2f}%)" if ema_eval else "")
                            )
                    self.dist.barrier()
                self._save_checkpoint(ckpt_dir, epoch + 1, 0)
                stopping = self._stop_signal(not last)
                if stopping and not last:
                    self._halt(ckpt_dir, stopping)
        finally:
            disarm()
            if mf:
                mf.close()
            bar.close()
            self.batches.close()
        if last_eval is None:  # resumed at the final epoch: evaluate what we have
            last_eval = self.evaluate_model(self.student)
            ema_eval = self.evaluate_model(self.ema.model) if self.ema is not None else {}
        if not main:
            tel.close()
            return {}
        wall = time.perf_counter() - t0
        tsum = tel.summary()
        tel.close()
        save_model(self.student, out / "student.safetensors", self.model_meta())
        if self.ema is not None:
            save_model(self.ema.model, out / "student_ema.safetensors", self.model_meta())
        save_loss_modules(self.loss_fn, out / "loss_modules.safetensors")
        summary = {
            "method": cfg.method.method,
            "student": self.student_arch[0],
            "student_params": sum(p.numel() for p in self.student.parameters()),
            "teacher": self.teacher.source if self.teacher else (cfg.model.teacher or cfg.run.teacher_cache),
            "teacher_mode": self.teacher.kind if self.teacher is not None else None,
            "teacher_top1": self.teacher_top1,
            "student_top1": last_eval["top1"] if last_eval else None,
            **({f"student_{k}": v for k, v in last_eval.items() if k != "top1"} if last_eval else {}),
            **{f"student_ema_{k}": v for k, v in ema_eval.items()},
            "epochs": cfg.optim.epochs,
            "steps": self.step_idx,
            "seed": cfg.run.seed,
            "data": self.data.name,
            "wall_s": wall,
            "fused_path": KF.describe(self.device) if cfg.run.fused else "reference",
            "dispatch": dispatch_summary(self.device, cfg.run.fused),
            "device": str(self.device),
            "repro": repro_info(),
            **tsum,
        }
        summary["img_per_s"] = tsum.get("img_per_s")
        timed = tsum.get("timed_s") or 0.0  # host time blocked on the loader for a prepared batch
        summary.update(loader="stream" if self.data.stream is not None else "memory",
                       loader_wait_s=self.batches.wait_s,
                       loader_wait_share=self.batches.wait_s / timed if timed else None)
        atomic_write_json(out / "summary.json", summary)
        # the full curves survive a resume: re-read metrics.jsonl for the report
        history, evals = read_metrics(metrics_path)
        write_report(
            out / "report.png",
            history,
            evals,
            title=f"{cfg.method.method} — {self.data.name}",
            teacher_top1=self.teacher_top1,
            resumed_at=resume_steps(out),
        )
        return summary

    def model_meta(self) -> dict:
        """What a saved model needs to be used (``python -m fastkd.predict``) beside its architecture."""
        d = self.data
        return {
            "arch": self.student_arch[0], "overrides": self.student_arch[1], "num_classes": d.num_classes,
            "img_size": d.img_size, "in_chans": d.in_chans, "data_fingerprint": d.fingerprint,
            "input_mean": list(d.mean),  # the normalisation it was trained with (a teacher gets its own)
            "input_std": list(d.std), "method": self.cfg.method.method, "eval_amp": self.cfg.run.amp,
            "class_names": list(d.class_names or [str(i) for i in range(d.num_classes)]),
            "val_crop_pct": d.val_crop_pct,  # how predict decodes: as the val images were
        }

    # -- checkpoints (epoch boundary) --------------------------------------------------------
    def _stop_signal(self, meet: bool) -> str | None:
        """The signal that asked the run to stop here, or None: one process at any step (a Python flag);
        torchrun ranks where they ``meet`` (log steps, epoch ends) and agree, so all stop at one step."""
        if self.dist.world == 1:
            return stop.requested()
        return self.dist.any_signal(stop.requested()) if meet else None

    def _halt(self, ckpt_dir: Path, signame: str) -> None:
        self.dist.barrier()  # no rank exits before rank 0 has written (torchrun then ends the rest)
        stop.halt(ckpt_dir, self.step_idx, signame)

    def _save_checkpoint(self, ckpt_dir: Path, epoch: int, step_in_epoch: int, extra=None) -> None:
        """Resume point = (epoch, step within it). Only after a finite-loss check; rank 0 writes. ``extra``: a
        caller's own resume state (tensors, numbers, lists), handed back by ``_load_checkpoint``."""
        self.check_finite()
        if not self.dist.main:
            self._last_ckpt_step = self.step_idx
            return
        state = {
            "student": self.student.state_dict(),
            "loss": self.loss_fn.state_dict(),
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            **({"ema": self.ema.model.state_dict()} if self.ema is not None else {}),
            "rng_cpu": torch.get_rng_state(),
            **({"rng_cuda": torch.cuda.get_rng_state(self.device)} if self.device.type == "cuda" else {}),
            **({"extra": extra} if extra is not None else {}),
        }
        if not _all_finite(state):  # never save a poisoned checkpoint (e.g. an inf in the optimizer state)
            self._stop_non_finite(self.step_idx)
            raise NonFiniteLoss(
                f"non-finite values in the training state at step {self.step_idx} (checkpoint not written); "
                f"stopped, {self._last_good_words()} — lower --lr, then rerun with --resume"
            )
        meta = {"epoch": epoch, "step_in_epoch": step_in_epoch, "step": self.step_idx,
                "world": self.dist.world}
        if self._calibrated():  # the ops the first step moved to their GPU-time path: a resume takes them too
            meta["dispatch_switched"] = list(self._fwd.balance["switched"])
        save_state(ckpt_dir, state, meta)
        self._last_ckpt_step = self.step_idx
        (ckpt_dir / NON_FINITE).unlink(missing_ok=True)  # a finite state again: the stop is behind us

    def _load_checkpoint(self, ckpt_dir: Path) -> tuple[int, int]:
        state, meta = load_state(ckpt_dir, map_location=self.device, verify=not self.cfg.run.no_verify)
        self.student.load_state_dict(state["student"])  # before DDP's first forward: ranks stay equal
        self.loss_fn.load_state_dict(state["loss"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        if self.ema is not None:
            self.ema.model.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng_cpu"].cpu())
        if "rng_cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), self.device)
        self.step_idx = self._last_ckpt_step = meta["step"]
        self.resumed_extra = state.get("extra")
        if meta.get("dispatch_switched") is not None and hasattr(self._fwd, "restore"):
            self._fwd.restore = list(meta["dispatch_switched"])
        resume_lr(self.cfg, self.opt, self.sched, self.steps_per_epoch)
        was = meta.get("world", 1)
        if was != self.dist.world and self.dist.main:
            left = (self.micro_per_epoch - meta.get("step_in_epoch", 0)) * self.sampler.batch_size
            self.log(
                f"fastkd: resumed under {self.dist.world} process(es) (checkpoint written by {was}): "
                f"the {left} remaining samples of epoch {meta['epoch']} are re-sharded over the new "
                f"ranks; the run is exact only up to the resume point (step {meta['step']})"
            )
        return meta["epoch"], meta.get("step_in_epoch", 0)


class NonFiniteLoss(RuntimeError):
    pass
