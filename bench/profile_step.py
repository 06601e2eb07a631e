"""Where a training step's time goes: torch.profiler over a few steps of chosen step-bench variants.

    PYTHONPATH=<checkout> python3 bench/profile_step.py OUT_DIR [--variants a,b] [--steps 3] [--small]

The variants are ``bench/step_bench.py``'s (default: ``vitkd_nkd_cached_fused_compiled`` and
``kd_online_compiled``, the two steps whose overhead over plain the 2026-11-26 H100 numbers left partly
unexplained; bench/NOTES.md). Each is built by ``benchlib.StepBed`` at the step bench's shape (DeiT-S ←
DeiT-B, 224², B = 256, bf16; ``--small``: the CPU dry run), warmed up by 3 steps, then ``--steps`` steps run
back to back (no sync between them, as ``fit`` runs) under the profiler. OUT_DIR/prof_step.txt gets, per
variant: the wall ms per step, the kernel ms per step (device rows only), the top 30 rows by device time
and the top 20 by self CPU time. ``bench/gpu_check.sh`` runs it (step ``step_profile``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import StepBed, step_shape  # noqa: E402
from step_bench import VARIANTS  # noqa: E402

DEFAULT = ("vitkd_nkd_cached_fused_compiled", "kd_online_compiled")


def profile_variant(bed: StepBed, name: str, steps: int, cuda: bool) -> str:
    method, flags = next((m, f) for n, m, f in VARIANTS if n == name)
    tr, ids = bed.build(method, flags)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(3):
        tr.step(ids, 0)
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as p:
        for _ in range(steps):
            tr.step(ids, 0)
        sync()
    wall = (time.perf_counter() - t0) * 1e3 / steps
    avg = p.key_averages()
    dev_rows = [e for e in avg if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_ms = sum(e.self_device_time_total for e in dev_rows) / 1e3 / steps
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    text = (
        f"\n===== {name}: {steps} steps back to back under the profiler: wall {wall:.2f} ms/step, "
        f"kernels {kernel_ms:.2f} ms/step\n--- by device time\n"
        + avg.table(sort_by=sort, row_limit=30, max_name_column_width=80)
        + "\n--- by self CPU time\n"
        + avg.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=80)
    )
    if getattr(tr, "teacher", None) is not None and hasattr(tr.teacher, "close"):
        tr.teacher.close()
    if hasattr(tr, "batches"):
        tr.batches.close()
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--variants", default=",".join(DEFAULT))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="CPU dry run, tiny shapes")
    a = ap.parse_args(argv)
    names = [v for v in a.variants.split(",") if v]
    unknown = sorted(set(names) - {v[0] for v in VARIANTS})
    if unknown:
        raise SystemExit(f"profile_step: unknown variants {unknown}; choose from {[v[0] for v in VARIANTS]}")
    small = a.small or not torch.cuda.is_available()
    cuda = not small
    os.makedirs(a.out, exist_ok=True)
    root = tempfile.mkdtemp(prefix="fastkd_profile_step_")
    bed = StepBed(root, step_shape(small), "cuda" if cuda else "cpu", small)
    with open(os.path.join(a.out, "prof_step.txt"), "w") as f:
        for name in names:
            try:
                f.write(profile_variant(bed, name, a.steps, cuda))
            except Exception as e:  # one failing variant must not lose the others
                f.write(f"\n===== {name}: FAILED {type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}\n")
            f.flush()
            if cuda:
                torch.cuda.empty_cache()
    print(f"profile_step: {', '.join(names)} → {os.path.join(a.out, 'prof_step.txt')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
