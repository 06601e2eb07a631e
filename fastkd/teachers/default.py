"""The default teacher's recipe: train until val top-1 stops improving, and check it is worth distilling from.

With no ``--teacher`` fastkd trains one (``fastkd.train.setup.ensure_default_teacher``). A fixed epoch count
is wrong for most data (too short on one set, overfit on another), so the default recipe is:

* **patience**: evaluate on the val split after every epoch, keep the best weights, stop after
  ``patience`` epochs without a new best (``patience_for``); the cosine schedule runs to the cap.
* **an epoch cap that scales with the data**: about ``TARGET_STEPS`` optimizer steps, clamped to
  [``MIN_EPOCHS``, ``MAX_EPOCHS``] (``epoch_cap``); ``--teacher-epochs N`` sets the cap by hand.
* **a worth-it check**: the student architecture trained alone on the student's own training split under
  the student's own recipe (a short run: no teacher; cached by key like the teacher) gives the bar the
  teacher must clear. ``check_worth`` returns one warning line when the
  teacher is not clearly better (by ``MARGIN`` points), naming what to do.

The val split picks the best epoch, the same split the run reports on (fastkd's datasets have no third
split); the selection is over at most ``MAX_EPOCHS`` checkpoints of one run, a small optimism.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch

from fastkd import stop
from fastkd.models import save_model
from fastkd.utils import atomic_write_json

TARGET_STEPS = 2000  # optimizer steps the cap aims at (digits, 1437 images at batch 64: 87 epochs)
MIN_EPOCHS, MAX_EPOCHS = 30, 300
MARGIN = 1.0  # top-1 points the teacher must beat the student alone by to count as "clearly better"


def epoch_cap(n_train: int, batch_size: int, epochs: int | None = None) -> int:
    """The epoch cap: ``epochs`` when given, else ≈ TARGET_STEPS steps in [MIN_EPOCHS, MAX_EPOCHS]."""
    if epochs:
        return int(epochs)
    steps = max(1, math.ceil(n_train / batch_size))
    return max(MIN_EPOCHS, min(MAX_EPOCHS, math.ceil(TARGET_STEPS / steps)))


def patience_for(cap: int) -> int:
    """Epochs without a new best before stopping: a fifth of the cap, at least 10 (or the cap itself)."""
    return min(cap, max(10, cap // 5))


def fit_with_patience(trainer, out_dir: Path, *, patience: int, log=print) -> dict:
    """Train ``trainer`` (a plain-CE ``Trainer``) epoch by epoch, evaluating after each; keep the best
    weights; stop after ``patience`` epochs without improvement or at the cap. Writes the best weights to
    ``out_dir/student.safetensors`` and ``out_dir/fit.json`` (history, best epoch, top-1, wall time) and
    returns that record. Deterministic for a seed and thread count (eval does not touch the RNG).

    Resumable: a checkpoint (the trainer's state plus the patience state: history, best epoch and weights)
    is written after every epoch and, on SIGTERM / Ctrl-C (``fastkd.stop``), at the next step; the
    next call continues from it, bit-exactly, and removes it once ``fit.json`` is written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint"
    cap = trainer.cfg.optim.epochs
    t0 = time.perf_counter()
    best, best_epoch, best_state, history, wall0 = -1.0, 0, None, [], 0.0
    start_epoch = start_step = 0
    if (ckpt / "state.json").exists():  # an interrupted fit: continue it
        start_epoch, start_step = trainer._load_checkpoint(ckpt)
        p = trainer.resumed_extra["patience"]
        best, best_epoch, best_state = p["best"], p["best_epoch"], p["best_state"]
        history, wall0 = list(p["history"]), p["wall_s"]
        log(f"fastkd: continuing the interrupted training in {out} at epoch {start_epoch + 1}")

    def save(epoch: int, step: int) -> None:
        wall = wall0 + time.perf_counter() - t0
        state = dict(best=best, best_epoch=best_epoch, best_state=best_state, history=history, wall_s=wall)
        trainer._save_checkpoint(ckpt, epoch, step, extra={"patience": state})

    trainer.student.train()
    trainer.loss_fn.train()
    disarm = stop.arm(trainer.dist.world == 1)
    try:
        for epoch in range(start_epoch, cap):
            if history and epoch - best_epoch >= patience:  # the fit had stopped before it was interrupted
                break
            trainer.epoch = epoch
            first = start_step if epoch == start_epoch else 0
            for i, ids in enumerate(trainer.sampler.batches(epoch, start_step=first), start=first):
                trainer.step(ids, epoch)
                if stop.requested() and i + 1 < trainer.steps_per_epoch:
                    save(epoch, i + 1)
                    stop.halt(ckpt, trainer.step_idx)
            trainer.check_finite()
            top1 = trainer.evaluate_model(trainer.student)["top1"]
            history.append(top1)
            if top1 > best:
                best, best_epoch = top1, epoch + 1
                best_state = {k: v.detach().clone() for k, v in trainer.student.state_dict().items()}
            save(epoch + 1, 0)
            if stop.requested() and epoch + 1 < cap:
                stop.halt(ckpt, trainer.step_idx)
    finally:
        disarm()
    trainer.student.load_state_dict(best_state)
    save_model(trainer.student, out / "student.safetensors", trainer.model_meta())
    rec = {
        "top1": best,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "epoch_cap": cap,
        "patience": patience,
        "history": history,
        "wall_s": wall0 + time.perf_counter() - t0,
        "threads": torch.get_num_threads(),
    }
    atomic_write_json(out / "fit.json", rec)
    shutil.rmtree(ckpt, ignore_errors=True)  # done: fit.json + the best weights are the result
    return rec


def read_fit(run_dir: Path) -> dict | None:
    p = Path(run_dir) / "fit.json"
    return json.loads(p.read_text()) if p.exists() else None


def check_worth(teacher_top1: float, student_top1: float | None, what: str = "teacher") -> str | None:
    """One warning line when the teacher is not clearly (MARGIN points) better than the student alone."""
    if student_top1 is None or teacher_top1 >= student_top1 + MARGIN:
        return None
    return (
        f"fastkd: warning: the default {what} ({teacher_top1:.2f}% val top-1) is not clearly better than the "
        f"student trained alone (≈{student_top1:.2f}%): distillation is unlikely to help — bring a stronger "
        "--teacher, or train the default one longer (--teacher-epochs N, a larger cap)"
    )


def check_near_chance(teacher_top1: float, num_classes: int, source: str | None) -> str | None:
    """One warning line when a teacher scores within 10 points of chance on the val split: it has nothing to
    teach, and usually something is off (other weights than meant, its head's class order, its input)."""
    chance = 100.0 / max(1, num_classes)
    if num_classes < 2 or teacher_top1 >= chance + 10.0:
        return None
    name = f"the teacher {source}" if source else "the teacher"
    return (
        f"fastkd: warning: {name} scores {teacher_top1:.2f}% val top-1, near chance "
        f"({chance:.2f}% for {num_classes} classes): distilling from it will not help — check its weights "
        "and the class order of its head (folders are read in sorted order), or fine-tune it first "
        "(--teacher-finetune N)"
    )
