"""``python -m fastkd.train``: distil a student from a teacher (or train one alone).

With no ``--teacher`` and a method that needs one, the default teacher for the data is trained first
(teacher recipe: CE, ``--teacher-epochs``) and stored under ``<workdir>/teachers/<key>``, keyed by a hash
of data fingerprint + arch + recipe, and reused by later runs (``fastkd.train.setup``).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

from fastkd.config import TrainConfig, parse_args
from fastkd.models.checkpoints import set_verify
from fastkd.stop import Stopped, graceful_stop
from fastkd.stop import report as stop_report
from fastkd.teachers.default import check_near_chance
from fastkd.train.distributed import init_distributed
from fastkd.train.guard import validate
from fastkd.train.rundir import default_out, finished_summary, prepare_run_dir, run_dir_lock
from fastkd.train.setup import build_trainer, finetune_summary
from fastkd.train.trainer import NonFiniteLoss
from fastkd.utils import atomic_write_json, disk_full

__all__ = ["default_out", "main", "run"]


def run(cfg: TrainConfig, log=print) -> dict:
    validate(cfg)  # before any data loading or teacher training
    set_verify(not cfg.run.no_verify)
    if cfg.run.threads:  # --threads N: results are bit-reproducible for one seed + thread count + versions
        torch.set_num_threads(cfg.run.threads)
    out = Path(cfg.run.out) if cfg.run.out else default_out(cfg)
    dist = init_distributed(cfg.run.device)
    with graceful_stop():  # SIGTERM / Ctrl-C: a checkpoint at the next step, then stop.Stopped
        try:
            return _run(cfg, out, dist, log)
        finally:
            dist.close()


def _run(cfg: TrainConfig, out: Path, dist, log) -> dict:
    if not dist.main:
        log = lambda *a, **k: None  # noqa: E731  (only rank 0 talks and writes)
    if dist.world > 1:
        log(
            f"fastkd: {dist.world} processes ({torch.distributed.get_backend()}), "
            f"global batch {cfg.optim.batch_size}"
        )
    with contextlib.ExitStack() as held:
        busy = None
        try:
            held.enter_context(run_dir_lock(out, main=dist.main, log=log))  # one process on --out (rank 0)
        except ValueError as e:
            busy = e
        if not dist.agree(busy is None):  # every rank stops when rank 0 could not take --out
            raise busy or ValueError(f"--out {out} is in use by another fastkd process (see rank 0)")
        return _run_locked(cfg, out, dist, log)


def _run_locked(cfg: TrainConfig, out: Path, dist, log) -> dict:
    event = prepare_run_dir(cfg, out, main=dist.main, log=log)
    done = finished_summary(cfg, out)
    if done is not None:  # --resume of a finished run: nothing to train, its files stay as they are
        log(
            f"fastkd: {out} already ran its {cfg.optim.epochs} epochs (student val top-1 "
            f"{done.get('student_top1', float('nan')):.2f}%); nothing to train — add --epochs N "
            f"(N > {cfg.optim.epochs}) to --resume to train it further"
        )
        return done
    dist.barrier()  # every rank checked --out before rank 0 writes into it
    trainer = build_trainer(cfg, dist=dist, log=log)
    trainer.resume_event = event
    if trainer.teacher_top1 is not None:
        log(f"fastkd: teacher val top-1 {trainer.teacher_top1:.2f}%")
        # a teacher the user brought (the default one has its own check against the student alone)
        warn = cfg.model.teacher and check_near_chance(
            trainer.teacher_top1, trainer.data.num_classes, cfg.model.teacher
        )
        if warn:
            log(warn)
    summary = trainer.fit(out)
    if not dist.main:  # ranks > 0 return {} from fit: nothing to report
        return summary
    ft = finetune_summary(cfg, trainer.full)
    if ft:  # the fine-tuned teacher's own val top-1 (from its fine-tuning run) beside the run's numbers
        summary.update(ft)
        atomic_write_json(out / "summary.json", summary)
    log(
        f"fastkd: {cfg.method.method}: student val top-1 {summary['student_top1']:.2f}% "
        + (f"(EMA {summary['student_ema_top1']:.2f}%) " if "student_ema_top1" in summary else "")
        + f"in {summary['wall_s']:.1f}s ({summary['img_per_s'] or 0:.0f} img/s) → {out}"
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        run(cfg)
    except (ValueError, FileNotFoundError, NonFiniteLoss) as e:
        print(f"fastkd: error: {e}", file=sys.stderr)
        return 2
    except (Stopped, KeyboardInterrupt) as e:
        return stop_report(e, "fastkd", "run the same command with --resume to continue from its checkpoint")
    except Exception as e:  # safetensors raises its own error type on a full disk
        if not disk_full(e):
            raise
        where = f" writing {e.filename}" if getattr(e, "filename", None) else ""
        print(
            f"fastkd: error: disk full{where}; nothing partial was kept (atomic writes) — free space "
            "and rerun with --resume to continue from the last complete checkpoint",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
