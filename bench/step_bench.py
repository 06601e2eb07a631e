"""The training step users run, measured: DeiT-S student ← DeiT-B teacher, 224², B=256, bf16 autocast.

    python bench/step_bench.py OUT.json [--small] [--budget S] [--variants a,b,...] [--rounds N]
        [--steps-per-run K]

(``PYTHONPATH=<checkout>``; ``bench/gpu_check.sh`` runs it.) One ``build_trainer`` per variant, all kept
alive; synthetic uint8 data (1000 classes); one fixed batch of ids. Variants, built and warmed up in
this priority order while the budget lasts (a variant that fails or does not fit is recorded, the next
one runs):

  plain (ce) compiled; vitkd+nkd online --compile, --fused --compile; plain compiled with DeiT's
  augmentation (--rrc-scale 0.08, RandAugment m9, --erase 0.25); plain eager; vitkd+nkd eager, --fused;
  vitkd+nkd cached --fused --compile / --fused; kd online --compile, --fused --compile;
  clskd+kd online --compile, --fused --compile; kd / clskd+kd online eager and --fused;
  kd cached --fused --compile (top-K logits).

Then the timing phase: ``--rounds`` interleaved rounds (one run of ``--steps-per-run`` steps of every
warmed variant per round, round-robin, so load drift hits them all alike; no sync inside a run, as
``fit`` runs, so the host's per-step work overlaps the previous step's GPU work); median ms per step of
the runs, img/s, peak memory
(each variant's own warm-up peak above what the variants built before it hold). Then host syncs per step:
one step per variant under
``torch.cuda.set_sync_debug_mode("warn")``, counting the warnings. ``step.json`` holds every variant, the
ratios (vs plain compiled; ``--fused`` vs the ``--compile`` reference, per method; the targets of issue 12),
the cached teacher's wait share, and the dispatch decisions. ``--small``: CPU dry run, tiny shapes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback

import torch
from benchlib import StepBed, step_shape, sync_warnings

DEIT_AUG = ["--rrc-scale", "0.08", "--rand-augment", "rand-m9-mstd0.5-inc1", "--erase", "0.25"]
# name: (method, flags; "@cache" = from the teacher cache)
VARIANTS = [
    ("plain_compiled", "ce", ["--compile"]),
    ("vitkd_nkd_online_compiled", "vitkd+nkd", ["--compile"]),
    ("vitkd_nkd_online_fused_compiled", "vitkd+nkd", ["--fused", "--compile"]),
    # DeiT's augmentation on the device (the crop and RandAugment kernels, erasing): what the recipe costs
    # a step, its host work included
    ("plain_compiled_deit_aug", "ce", ["--compile", *DEIT_AUG]),
    ("plain_eager", "ce", []),
    ("vitkd_nkd_online_eager", "vitkd+nkd", []),
    ("vitkd_nkd_online_fused", "vitkd+nkd", ["--fused"]),
    ("vitkd_nkd_cached_fused_compiled", "vitkd+nkd", ["--fused", "--compile", "@cache"]),
    ("vitkd_nkd_cached_fused", "vitkd+nkd", ["--fused", "@cache"]),
    ("kd_online_compiled", "kd", ["--compile"]),
    ("diy_kd_compiled", "kd", ["@diy"]),
    ("kd_online_fused_compiled", "kd", ["--fused", "--compile"]),
    ("clskd_kd_online_compiled", "clskd+kd", ["--compile"]),
    ("clskd_kd_online_fused_compiled", "clskd+kd", ["--fused", "--compile"]),
    ("kd_online_eager", "kd", []),
    ("kd_online_fused", "kd", ["--fused"]),
    ("clskd_kd_online_eager", "clskd+kd", []),
    ("clskd_kd_online_fused", "clskd+kd", ["--fused"]),
    ("kd_cached_fused_compiled", "kd", ["--fused", "--compile", "@cache"]),
]
# (numerator, denominator, target or None): ratios of interleaved medians
RATIOS = [
    ("vitkd_nkd_online_fused_compiled", "vitkd_nkd_online_compiled", 1.0),
    ("vitkd_nkd_online_fused", "vitkd_nkd_online_compiled", 1.0),
    ("vitkd_nkd_online_fused", "vitkd_nkd_online_eager", None),
    ("kd_online_fused_compiled", "kd_online_compiled", 1.0),
    ("kd_online_fused", "kd_online_compiled", 1.0),
    ("clskd_kd_online_fused_compiled", "clskd_kd_online_compiled", 1.0),
    ("clskd_kd_online_fused", "clskd_kd_online_compiled", 1.0),
    ("vitkd_nkd_online_fused_compiled", "plain_compiled", 1.6),
    ("vitkd_nkd_online_compiled", "plain_compiled", None),
    ("vitkd_nkd_cached_fused_compiled", "plain_compiled", 1.15),
    ("vitkd_nkd_cached_fused", "plain_eager", None),
    ("kd_cached_fused_compiled", "plain_compiled", 1.05),
    ("kd_online_compiled", "diy_kd_compiled", 0.95),
    ("kd_online_fused_compiled", "diy_kd_compiled", 0.95),
    ("kd_online_compiled", "plain_compiled", None),
    ("plain_eager", "plain_compiled", None),
    ("plain_compiled_deit_aug", "plain_compiled", None),
]


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="step.json to write (rewritten after every variant)")
    ap.add_argument("--small", action="store_true", help="CPU dry run: tiny shapes")
    ap.add_argument("--budget", type=float, default=float(os.environ.get("STEP_BUDGET_S", 230)))
    ap.add_argument("--variants", default="", help="comma-separated subset (default: all, in priority order)")
    ap.add_argument(
        "--rounds", type=int, default=None, help="interleaved timing rounds (default 8; 3 small)"
    )
    ap.add_argument(
        "--steps-per-run",
        type=int,
        default=3,
        help="steps per timed run, no sync between them (as fit runs; default 3). 1 = a sync after every "
        "step (the 2026-11-26 H200 / H100 measurements): the host's per-step work is then exposed",
    )
    return ap.parse_args(argv)


def count_syncs(fn) -> int:
    """Host syncs during ``fn()`` (CUDA): torch.cuda.set_sync_debug_mode('warn') + warnings capture."""
    return len(sync_warnings(fn))


def main(argv=None) -> int:
    a = parse(argv)
    small = a.small or not torch.cuda.is_available()
    dev = "cpu" if small else "cuda"
    t_start = time.monotonic()
    deadline = t_start + a.budget
    shape = step_shape(small)
    S, C, B, STU, TEA = shape["S"], shape["C"], shape["B"], shape["student"], shape["teacher"]
    rounds = a.rounds or (3 if small else 8)
    per_run = a.steps_per_run
    wanted = [v for v in a.variants.split(",") if v]
    unknown = sorted(set(wanted) - {v[0] for v in VARIANTS})
    if unknown:
        raise SystemExit(f"step_bench: unknown variants {unknown}; choose from {[v[0] for v in VARIANTS]}")
    variants = [v for v in VARIANTS if not wanted or v[0] in wanted]

    from fastkd.ops import dispatch as KF

    root = tempfile.mkdtemp(prefix="fastkd_step_bench_")
    bed = StepBed(root, shape, dev, small)
    res: dict = {
        "device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu",
        "torch": torch.__version__,
        "shape": dict(
            img=S, classes=C, batch=B, student=STU, teacher=TEA, amp="bf16" if dev == "cuda" else None
        ),
        "budget_s": a.budget,
        "rounds": rounds,
        "steps_per_run": per_run,
        "variants": {},
        "ratios": {},
    }
    with contextlib.suppress(ImportError):
        import triton

        res["triton"] = triton.__version__
    with contextlib.suppress(ImportError):
        import timm

        res["timm"] = timm.__version__

    def save():
        tmp = a.out + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(res, fh, indent=1, default=str)
        os.replace(tmp, a.out)

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    trainers: dict = {}
    ids = None
    # phase 1: build + warm up (compilation, measured dispatch, allocator) in priority order
    for name, method, flags in variants:
        rec: dict = {
            "method": method,
            "flags": [f for f in flags if not f.startswith("@")],
            "teacher": "cached" if "@cache" in flags else ("online" if method != "ce" else None),
        }
        res["variants"][name] = rec
        left = deadline - time.monotonic()
        need = (
            25 if ("--compile" in flags or "@diy" in flags) else 8
        )  # a compile needs room; the timing phase needs ~15 s
        if left < need + 15:
            rec.update(status="skipped: budget", left_s=round(left, 1))
            print(name, "skipped (budget)", flush=True)
            save()
            continue
        t0 = time.monotonic()
        before = torch.cuda.memory_allocated() if dev == "cuda" else 0
        try:
            if "@diy" in flags:
                rec["teacher"] = "hand-written (timm, torch.compile)"
            tr, ids = bed.build(method, flags)
            if bed.cache_build_s is not None:
                res.update(cache_build_s=bed.cache_build_s, cache_bytes=bed.cache_bytes)
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
            for _ in range(3):
                tr.step(ids, 0)
            sync()
            rec["warmup_s"] = round(time.monotonic() - t0, 1)
            if dev == "cuda":  # the variant's own: its parts, optimizer state, and the step's peak
                rec["peak_mem_gib"] = round((torch.cuda.max_memory_allocated() - before) / 2**30, 2)
            rec["status"] = "warm"
            rec["fused_path"] = KF.describe(dev) if "--fused" in flags else "reference"
            # the calibration's host vs GPU ms of the step forward and the ops it moved to their GPU-time
            # path (decisions are process-wide: an eager variant timed later follows the last calibration)
            rec["step_balance"] = getattr(getattr(tr, "_fwd", None), "balance", None)  # (none: hand-written)
            trainers[name] = tr
        except Exception as e:
            rec.update(
                status="failed", error=f"{type(e).__name__}: {e}"[:600], tb=traceback.format_exc()[-1500:]
            )
        print(name, json.dumps({k: v for k, v in rec.items() if k != "tb"}), flush=True)
        save()

    # phase 2: interleaved timing
    times: dict[str, list[float]] = {n: [] for n in trainers}
    waits0 = {
        n: (getattr(tr.teacher, "wait_s", 0.0), getattr(tr.teacher, "calls", 0)) for n, tr in trainers.items()
    }
    for r in range(rounds):
        if r >= 3 and time.monotonic() > deadline - 5:
            res["rounds_done"] = r
            break
        for n, tr in trainers.items():
            try:  # a run of ``per_run`` steps, no sync between them, as ``fit`` runs (it syncs on log steps)
                sync()
                t0 = time.perf_counter()
                for _ in range(per_run):
                    tr.step(ids, 0)
                sync()
                times[n].append((time.perf_counter() - t0) / per_run)
            except Exception as e:
                res["variants"][n].update(status="failed", error=f"timing: {type(e).__name__}: {e}"[:600])
    else:
        res["rounds_done"] = rounds
    med: dict[str, float] = {}
    for n, ts in times.items():
        rec = res["variants"][n]
        if not ts or rec.get("status") == "failed":
            continue
        m = statistics.median(ts)
        med[n] = m
        rec.update(
            status="ok",
            median_ms=round(1e3 * m, 3),
            min_ms=round(1e3 * min(ts), 3),
            runs=len(ts),
            steps=len(ts) * per_run,
            img_per_s=round(B / m, 1),
        )
        tr = trainers[n]
        if hasattr(tr.teacher, "wait_s"):
            w0, c0 = waits0[n]
            wait_ms = 1e3 * (tr.teacher.wait_s - w0) / max(1, tr.teacher.calls - c0)
            rec.update(cache_wait_ms=round(wait_ms, 3), cache_wait_share=round(wait_ms / (1e3 * m), 4))
    for num, den, target in RATIOS:  # every targeted ratio is listed, measured or not
        v = med[num] / med[den] if num in med and den in med else None
        if v is None and target is None:
            continue
        res["ratios"][f"{num} / {den}"] = {
            "value": None if v is None else round(v, 3),
            "target": target,
            "pass": None if (target is None or v is None) else bool(v <= target),
        }
    save()

    # phase 3: host syncs per step (CUDA), one step each under set_sync_debug_mode("warn")
    if dev == "cuda":
        for n, tr in trainers.items():
            if time.monotonic() > deadline + 25:  # one step per variant: seconds, inside the caller's slack
                break
            try:
                res["variants"][n]["host_syncs_per_step"] = count_syncs(lambda tr=tr: tr.step(ids, 0))
            except Exception as e:
                res["variants"][n]["host_syncs_error"] = f"{type(e).__name__}: {e}"[:300]
    res["dispatch"] = KF.dispatch_record(dev)
    for tr in trainers.values():
        with contextlib.suppress(Exception):
            if tr.teacher is not None:
                tr.teacher.close()
        with contextlib.suppress(Exception):
            tr.batches.close()  # stops the batch prefetch thread
    res["total_s"] = round(time.monotonic() - t_start, 1)
    save()
    shutil.rmtree(root, ignore_errors=True)
    print("ratios", json.dumps(res["ratios"], indent=1), flush=True)
    print(f"done in {res['total_s']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
