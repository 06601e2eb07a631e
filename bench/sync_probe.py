"""Host syncs inside the training step, and what the fused ops are fed (dtype / shape / stride).

    python bench/sync_probe.py OUT_DIR [--small] [--budget S]     (PYTHONPATH=<checkout>)

DeiT-S ← DeiT-B, 224², B=256, bf16 autocast (``--small``: CPU, tiny shapes; no sync counting on CPU).
For online-fused and cached-fused vitkd+nkd, online-fused clskd+kd and plain ce: 2 warm-up steps, then
one step under ``torch.cuda.set_sync_debug_mode("warn")`` counting every sync warning with the fastkd
frame that caused it, then one step under ``"error"`` to name the first sync point. Every tensor that
reaches a ``fastkd.ops.dispatch`` op is logged once per (op, autocast). Writes OUT_DIR/sync_report.txt and
OUT_DIR/sync.json ({variant: {syncs_per_step, sites, ops}}).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import sys
import tempfile
import time
import traceback

import torch

VARIANTS = (  # (name, method, StepBed flags)
    ("online_fused vitkd+nkd", "vitkd+nkd", ["--fused"]),
    ("cached_fused vitkd+nkd", "vitkd+nkd", ["--fused", "@cache"]),
    ("online_fused clskd+kd", "clskd+kd", ["--fused"]),
    ("online plain ce", "ce", []),
)


def fused_ops(KF) -> list[str]:
    """The ``fastkd.ops.dispatch`` ops that may run a kernel: every ``@fused`` one, and ``token_kd``."""
    return ["token_kd", *(n for n in KF.__all__ if hasattr(getattr(KF, n, None), "kernel_fn"))]


def describe_tensor(x) -> str:
    if isinstance(x, torch.Tensor):
        return (
            f"{x.dtype}{list(x.shape)} stride{list(x.stride())} "
            f"{'contig' if x.is_contiguous() else 'NONCONTIG'} rg={x.requires_grad}"
        )
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], torch.Tensor):
        return "[" + ", ".join(describe_tensor(t) for t in x) + "]"
    return ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--budget", type=float, default=float(os.environ.get("SYNC_BUDGET_S", 90)))
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    cuda = torch.cuda.is_available() and not a.small
    deadline = time.monotonic() + a.budget
    from fastkd.ops import dispatch as KF

    seen: dict[str, list[str]] = collections.OrderedDict()

    def wrap(name):
        fn = getattr(KF, name)

        def w(*args, **kw):
            key = f"{name} autocast={torch.is_autocast_enabled('cuda') if cuda else False}"
            if key not in seen:
                seen[key] = [d for d in map(describe_tensor, [*args, *kw.values()]) if d]
            return fn(*args, **kw)

        setattr(KF, name, w)

    for n in fused_ops(KF):
        wrap(n)

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from benchlib import StepBed, step_shape, sync_warnings

    root = tempfile.mkdtemp(prefix="fastkd_sync_probe_")
    bed = StepBed(root, step_shape(not cuda), "cuda" if cuda else "cpu", not cuda)
    out: dict = {}
    rep = open(os.path.join(a.out, "sync_report.txt"), "w")
    for name, method, flags in VARIANTS:
        rec: dict = {}
        out[name] = rec
        rep.write(f"\n################ {name}\n")
        if time.monotonic() > deadline - 10:
            rec["status"] = "skipped: budget"
            rep.write("  skipped: budget\n")
            continue
        try:
            seen.clear()
            tr, ids = bed.build(method, flags)  # its batches announced ahead, as fit does
            for _ in range(2):
                tr.step(ids, 0)
            if cuda:
                torch.cuda.synchronize()
            rec["ops"] = dict(seen)
            for k, v in seen.items():
                rep.write(f"  op {k}\n" + "".join(f"      {d}\n" for d in v))
            if cuda:
                sites: collections.Counter = collections.Counter()
                syncs = sync_warnings(functools.partial(tr.step, ids, 0))
                for w in syncs:
                    sites[f"{os.path.relpath(w.filename)}:{w.lineno}"] += 1
                rec["syncs_per_step"] = len(syncs)
                rec["sites"] = dict(sites.most_common())
                rep.write(f"  sync warnings in one step: {len(syncs)}\n")
                for s, c in sites.most_common():
                    rep.write(f"      {c}× {s}\n")
                torch.cuda.set_sync_debug_mode("error")
                try:
                    tr.step(ids, 0)
                    rec["first_sync"] = None
                except RuntimeError as e:
                    frames = [
                        ln.strip()
                        for ln in traceback.format_exc().splitlines()
                        if 'File "' in ln and ("fastkd" in ln or "kernels" in ln)
                    ]
                    rec["first_sync"] = {"error": str(e).splitlines()[0][:200], "frames": frames[-6:]}
                    rep.write(
                        f"  first sync: {rec['first_sync']['error']}\n"
                        + "".join(f"      {f}\n" for f in frames[-6:])
                    )
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            else:
                rec["syncs_per_step"] = None
                rep.write("  (CPU: no CUDA sync counting)\n")
            rec["status"] = "ok"
            if tr.teacher is not None and hasattr(tr.teacher, "close"):
                tr.teacher.close()
            del tr
        except Exception as e:
            rec.update(status="failed", error=f"{type(e).__name__}: {e}"[:600])
            rep.write(f"FAILED {type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}\n")
        rep.flush()
        with open(os.path.join(a.out, "sync.json"), "w") as fh:
            json.dump(out, fh, indent=1, default=str)
        if cuda:
            torch.cuda.empty_cache()
    rep.close()
    print(open(os.path.join(a.out, "sync_report.txt")).read()[:6000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
