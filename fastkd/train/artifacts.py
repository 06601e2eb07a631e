"""What a run directory holds besides weights: metrics.jsonl (read back and truncated on resume), the
loss modules' weights, and report.png (loss and accuracy curves)."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from fastkd.methods.registry import report_terms
from fastkd.utils import atomic_write_text, umask_mode


def repro_info() -> dict:
    """What a run's numbers depend on beyond its config: torch CPU threads, library versions, the fastkd
    commit (``+dirty`` when the working tree differs from it). Same seed + these → the same numbers on CPU."""
    import timm
    import torch

    try:
        import triton

        triton_v = triton.__version__
    except Exception:  # noqa: BLE001  (no triton on this machine)
        triton_v = None
    commit = _fastkd_commit()
    return {
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "triton": triton_v,
        "fastkd_commit": commit,
    }


@functools.lru_cache(maxsize=1)
def _fastkd_commit() -> str | None:
    """The fastkd commit this process loaded (read once, at the first call: later checkouts do not count).
    ``FASTKD_COMMIT`` overrides it (a run from a copied snapshot of the tree says which commit it copied)."""
    if os.environ.get("FASTKD_COMMIT"):
        return os.environ["FASTKD_COMMIT"]
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        git = ["git", "-C", str(root)]
        commit = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no", "--", "fastkd"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        commit = (commit + ("+dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return commit


def metric_lines(path: Path):
    """(raw line, parsed record) of metrics.jsonl, skipping a line cut short by a crash or a full disk."""
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                yield line, json.loads(line)
            except json.JSONDecodeError:
                continue


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    hist, evals = [], []
    for _, r in metric_lines(path):
        (evals if any(k.startswith("val_") for k in r) else hist).append(r)
    return hist, evals


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after the checkpoint we resume from (they will be logged again)."""
    if path.exists():
        keep = [ln for ln, r in metric_lines(path) if r.get("step", 0) <= step]
        atomic_write_text(path, "".join(ln + "\n" for ln in keep))


#: loss parts drawn in report.png (whatever the run logged of them): the total, then each method's terms
REPORT_TERMS = report_terms()


def write_report(
    path: Path, history: list[dict], evals: list[dict], title: str = "", teacher_top1: float | None = None,
    resumed_at: list[int] = (),
) -> None:
    """Loss curves and val top-1; ``resumed_at``: the steps where the run was resumed (dotted lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    if history:
        steps = [r["step"] for r in history]
        keys = [k for k in REPORT_TERMS if k in history[0]]
        for k in keys:
            a1.plot(steps, [r.get(k, float("nan")) for r in history], label=k, lw=2 if k == "loss" else 1)
        for i, st in enumerate(resumed_at):
            a1.axvline(st, color="gray", ls=":", lw=1, label="resumed" if i == 0 else None)
        a1.set_yscale("log")
        a1.set_xlabel("step")
        a1.set_title("training loss (named parts)")
        a1.legend(fontsize=8)
    if evals:
        a2.plot([e["epoch"] for e in evals], [e["val_top1"] for e in evals], "o-", label="student top-1")
        for k in ("val_top1_cls", "val_top1_dist"):
            if k in evals[0]:
                a2.plot([e["epoch"] for e in evals], [e[k] for e in evals], ".--", label=k[4:])
        if "val_ema_top1" in evals[0]:  # --ema-decay: the EMA student beside the student
            a2.plot([e["epoch"] for e in evals], [e["val_ema_top1"] for e in evals], "s-", ms=3,
                    label="EMA student top-1")
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


def dispatch_summary(device, fused: bool) -> dict:
    """summary.json's record of the fused ops: per op (and input signature) the path used — triton,
    compiled or reference — and both measured timings (``fastkd.ops.dispatch.dispatch_record``)."""
    from fastkd.ops import dispatch as KF

    rec = KF.dispatch_record(device)
    if not fused:
        rec.update(describe="reference", ops={}, pending=[])
    return rec


def save_loss_modules(loss, path: Path) -> None:
    """The trainable loss parts' weights (projectors, generator, mask token) as safetensors, atomically."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file({k: v.contiguous() for k, v in loss.state_dict().items()}, str(tmp))
        os.chmod(tmp, umask_mode())  # safetensors creates 0600 files: follow the user's umask
        os.replace(tmp, path)
    except BaseException:  # e.g. ENOSPC: leave no partial file behind
        tmp.unlink(missing_ok=True)
        raise
