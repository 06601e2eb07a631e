"""Peer comparison: fastkd's Hinton-KD training step vs what users would run instead.

    python bench/peer_bench.py OUT.json [--small]
    (PYTHONPATH=<checkout>; env PEER_BUDGET seconds, default 150)

DeiT-S student <- DeiT-B teacher, 224², B=256, bf16 autocast, AdamW, data already on the GPU (no loader).
Variants: hand-written PyTorch KD step (eager; student+teacher torch.compile), timm.task.LogitDistillationTask
(eager), fastkd ``build_trainer`` --method kd (eager; --compile; --fused --compile), and the plain compiled
student step (the floor). Issue 12 target: fastkd kd --compile ≤ 0.95× the hand-written compiled step
(``ratios`` in OUT.json). --small: CPU dry run with tiny shapes. Port of ../shared/gpu/peer_bench.py.
"""

import json
import os
import statistics
import sys
import tempfile
import time
import traceback

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import DiyKD, StepBed, step_shape  # noqa: E402

out_path, small = sys.argv[1], "--small" in sys.argv
cuda = torch.cuda.is_available() and not small
dev = torch.device("cuda" if cuda else "cpu")
deadline = time.monotonic() + float(os.environ.get("PEER_BUDGET", "150"))
SHAPE = step_shape(not cuda)
S, C, B, STU, TEA = SHAPE["S"], SHAPE["C"], SHAPE["B"], SHAPE["student"], SHAPE["teacher"]
mk = dict(num_classes=C, img_size=S)
g = torch.Generator().manual_seed(0)
x = torch.randn(B, 3, S, S, generator=g).to(dev)
y = torch.randint(0, C, (B,), generator=g).to(dev)
T = 4.0
res = {
    "device": torch.cuda.get_device_name(0) if cuda else "cpu",
    "torch": torch.__version__,
    "timm": timm.__version__,
    "shape": dict(S=S, C=C, B=B, student=STU, teacher=TEA),
    "variants": {},
}


def sync():
    if cuda:
        torch.cuda.synchronize()


def save():
    json.dump(res, open(out_path + ".tmp", "w"), indent=1)
    os.replace(out_path + ".tmp", out_path)


def timeit(name, step, n=10):
    if time.monotonic() > deadline - 15:
        res["variants"][name] = {"status": "skipped: budget"}
        print(name, "skipped")
        return
    t0 = time.monotonic()
    rec = {}
    try:
        for _ in range(3):
            step()
        sync()
        rec["warmup_s"] = round(time.monotonic() - t0, 1)
        ts = []
        for _ in range(n if cuda else 3):
            a = time.perf_counter()
            step()
            sync()
            ts.append(time.perf_counter() - a)
        med = statistics.median(ts)
        rec.update(status="ok", median_ms=round(1e3 * med, 3), img_per_s=round(B / med, 1))
    except Exception as e:
        rec.update(status="failed", error=f"{type(e).__name__}: {e}"[:400], tb=traceback.format_exc()[-1200:])
    res["variants"][name] = rec
    print(name, json.dumps({k: v for k, v in rec.items() if k != "tb"}), flush=True)
    save()


def models():
    torch.manual_seed(0)
    s = timm.create_model(STU, **mk).to(dev)
    t = timm.create_model(TEA, **mk).to(dev).eval().requires_grad_(False)
    return s, t


def opt_for(params):
    return torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if cuda else {}))


def diy(compile_):
    return DiyKD(STU, TEA, S, C, B, dev.type, compile_=compile_).step


def plain_compiled():
    s, _ = models()
    o = opt_for(s.parameters())
    sf = torch.compile(s)

    def step():
        o.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = F.cross_entropy(sf(x).float(), y, label_smoothing=0.1)
        loss.backward()
        o.step()

    return step


def timm_task():
    from timm.task import LogitDistillationTask

    s, t = models()
    task = LogitDistillationTask(s, t, loss_type="kl", temperature=T, device=dev, verbose=False)
    o = opt_for([p for p in task.parameters() if p.requires_grad])

    def step():
        o.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = task(x, y)["loss"]
        loss.backward()
        o.step()

    return step


_BED: list[StepBed] = []  # one synthetic set for every fastkd variant


def fastkd(extra):
    if not _BED:
        _BED.append(StepBed(tempfile.mkdtemp(), SHAPE, dev.type, not cuda))
    tr, ids = _BED[0].build("kd", ["--kd-T", str(T), *extra])  # batches announced ahead, as fit does
    return lambda: tr.step(ids, 0)


for name, make in (
    ("plain_student_compiled", plain_compiled),
    ("diy_kd_eager", lambda: diy(False)),
    ("timm_task_kd_eager", timm_task),
    ("fastkd_kd_eager", lambda: fastkd([])),
    ("diy_kd_compiled", lambda: diy(True)),
    ("fastkd_kd_compile", lambda: fastkd(["--compile"])),
    ("fastkd_kd_fused_compile", lambda: fastkd(["--fused", "--compile"])),
):
    try:
        step = make()
    except Exception as e:
        res["variants"][name] = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:400]}
        print(name, "FAILED", e)
        save()
        continue
    timeit(name, step)
    del step
    if cuda:
        torch.cuda.empty_cache()


def _ms(n):
    return res["variants"].get(n, {}).get("median_ms")


for num, den, target in (
    ("fastkd_kd_compile", "diy_kd_compiled", 0.95),
    ("fastkd_kd_fused_compile", "diy_kd_compiled", 0.95),
    ("fastkd_kd_eager", "diy_kd_eager", None),
    ("fastkd_kd_compile", "plain_student_compiled", None),
):
    if _ms(num) and _ms(den):
        v = _ms(num) / _ms(den)
        res.setdefault("ratios", {})[f"{num} / {den}"] = {
            "value": round(v, 3),
            "target": target,
            "pass": None if target is None else bool(v <= target),
        }
save()
print("ratios", json.dumps(res.get("ratios", {})))
print("done")
