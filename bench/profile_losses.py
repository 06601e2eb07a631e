"""GPU profile of the token losses on the training inputs: fused (Triton) vs torch.compile of the reference.

    PYTHONPATH=<checkout> python3 bench/profile_losses.py OUT_DIR [--losses a,b] [--shapes deit_s,deit_b]

DeiT-S and DeiT-B shapes, fwd+bwd under bf16 autocast on ``bench/test_bench_losses.make_training_case``
inputs (fp32 strided views of [B, 1+N, D]); 4 warm-up and 20 timed iterations, then a torch.profiler
table of 5 iterations (and, for the fused provider, a cProfile of 30 iterations: the host side), into
OUT_DIR/prof.txt (this made
results/h200-2026-11-26-early/prof_training_inputs.txt).
"""

import importlib.util
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSSES = ("vitkd_mimic_loss", "cls_patch_map_loss", "vitkd_gen_loss")


def _load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _iteration(fn, args, kw, leaves):
    def call():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(*args, **kw)
        torch.autograd.grad(loss, leaves)

    return call


def _host_profile(call, iters: int = 30) -> str:
    """cProfile of ``iters`` calls (the GPU keeps up: the host is what is timed), top 20 by own time."""
    import cProfile
    import io
    import pstats

    pr = cProfile.Profile()
    pr.enable()
    for _ in range(iters):
        call()
    torch.cuda.synchronize()
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(20)
    return f"\n----- host profile ({iters} iterations, cProfile, by own time)\n{buf.getvalue()}"


def main(out: str, losses=LOSSES, shapes=None) -> None:
    from fastkd.ops import dispatch as KF
    from fastkd.ops import reference as R

    conf = _load("bench_conftest", os.path.join(REPO, "bench", "conftest.py"))
    bl = _load("bench_losses", os.path.join(REPO, "bench", "test_bench_losses.py"))
    dev = torch.device("cuda")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "prof.txt"), "w") as f:
        for shape in conf.GPU_SHAPES[1:]:
            if shapes and shape.name not in shapes:
                continue
            for loss in losses:
                for provider in ("compiled", "fused"):
                    head = f"{shape.name} {loss} {provider} fwd+bwd"
                    try:
                        KF.set_fused(provider == "fused")
                        fn = getattr(KF, loss) if provider == "fused" else torch.compile(getattr(R, loss))
                        args, kw, leaves, _, _ = bl.make_training_case(loss, shape, dev)
                        call = _iteration(fn, args, kw, leaves)
                        for _ in range(4):
                            call()
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        for _ in range(20):
                            call()
                        torch.cuda.synchronize()
                        ms = (time.perf_counter() - t0) * 50
                        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                            for _ in range(5):
                                call()
                            torch.cuda.synchronize()
                        # kernels only: a launching op's row repeats its kernels' time (the H100 run's
                        # "kernels" figure counted both, twice the table's own "Self CUDA time total")
                        cuda_dev = torch.autograd.DeviceType.CUDA
                        kernels = [e for e in p.key_averages() if e.device_type == cuda_dev]
                        gpu_ms = sum(e.self_device_time_total for e in kernels) / 5e3
                        f.write(f"\n===== {head}: wall {ms:.3f} ms/iter; kernels {gpu_ms:.3f} ms/iter\n")
                        f.write(p.key_averages().table(sort_by="cuda_time_total", row_limit=20))
                        if provider == "fused":  # the host side: where the per-call Python time goes
                            f.write(_host_profile(call))
                    except Exception as e:  # one failing case must not lose the others
                        f.write(f"\n===== {head}: FAILED {type(e).__name__}: {e}\n")
                    f.flush()
                    KF.set_fused(False)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--losses", default=",".join(LOSSES))
    ap.add_argument("--shapes", default="", help="comma-separated (default: every GPU shape)")
    a = ap.parse_args()
    main(a.out, tuple(x for x in a.losses.split(",") if x), {x for x in a.shapes.split(",") if x})
