"""The DeiT recipe's device augmentation at the step bench's shape: RandomResizedCrop and RandAugment.

    PYTHONPATH=<checkout> python3 bench/aug_bench.py OUT.json [--small]

At DeiT-S ← DeiT-B's batch (B = 256, 3 × 224², uint8; ``--small``: B = 8 at 32², the CPU dry run) it times
``augment.resized_crop`` and ``randaug.rand_augment`` (m9-mstd0.5, 2 layers, per-image draws as training
makes them), each with its Triton kernels (CUDA: ``fastkd.kernels.resized_crop`` / ``.randaug``) and in the
torch form, median ms over a few calls with a sync after each (CUDA events on a GPU). It also checks, on
the device, that the kernels' output equals the torch form's bit for bit (the interpreter tests' claim, on
real hardware: no FMA contraction), and times each of RandAugment's launches alone.
bench/NOTES.md ("The DeiT recipe on the device") has the bytes and the predictions these numbers settle.
``bench/gpu_check.sh`` runs it (step ``augment``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastkd.data import augment, randaug  # noqa: E402
from fastkd.data.augment import resized_crop  # noqa: E402


def _time(fn, cuda: bool, reps: int) -> float:
    fn()  # warm-up (the first CUDA call builds the kernel)
    times = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--small", action="store_true")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not a.small
    dev = torch.device("cuda" if cuda else "cpu")
    b, s = (256, 224) if cuda else (8, 32)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=g).to(dev)
    side = torch.randint(s // 4, s + 1, (4, b), generator=g)
    top = (torch.rand(b, generator=g) * (s - side[0] + 1)).long().to(dev)
    left = (torch.rand(b, generator=g) * (s - side[1] + 1)).long().to(dev)
    h, w = side[0].to(dev), side[1].to(dev)
    u = [torch.rand(b, 2, generator=g, dtype=torch.float64).to(dev) for _ in range(5)]
    op, mag, neg = randaug.layer_draws(*u, m=9.0, mstd=0.5)
    fill = torch.tensor([124.0, 116.0, 104.0], device=dev)
    reps = 10 if cuda else 2
    res = {"device": torch.cuda.get_device_name() if cuda else "cpu", "B": b, "size": s,
           "torch": torch.__version__}
    res["resized_crop_ms"] = _time(lambda: resized_crop(x, top, left, h, w), cuda, reps)
    crop = resized_crop(x, top, left, h, w)
    here = augment._crop_kernel_here
    augment._crop_kernel_here = lambda t: False  # the torch form
    try:
        res["resized_crop_torch_ms"] = _time(lambda: resized_crop(x, top, left, h, w), cuda, reps)
        res["crop_kernel_equals_torch"] = bool(torch.equal(crop, resized_crop(x, top, left, h, w)))
    finally:
        augment._crop_kernel_here = here
    fused = randaug.rand_augment(x, op, mag, neg, fill)
    res["rand_augment_ms"] = _time(lambda: randaug.rand_augment(x, op, mag, neg, fill), cuda, reps)
    here = randaug._kernels_here
    randaug._kernels_here = lambda t: False  # the torch form
    try:
        plain = randaug.rand_augment(x, op, mag, neg, fill)
        res["rand_augment_torch_ms"] = _time(lambda: randaug.rand_augment(x, op, mag, neg, fill), cuda, reps)
    finally:
        randaug._kernels_here = here
    res["kernel_equals_torch"] = bool(torch.equal(fused, plain))
    res["kernels_used"] = cuda
    if cuda:  # the kernel paths' GPU time with the host hidden, and their host (enqueue) time (medians)
        from fastkd.ops.timing import cuda_times

        for name, run in (("rand_augment", lambda: randaug.rand_augment(x, op, mag, neg, fill)),
                          ("resized_crop", lambda: resized_crop(x, top, left, h, w))):
            ts = [cuda_times(run, dev) for _ in range(reps)]
            res[f"{name}_gpu_ms"] = statistics.median(t["gpu"] for t in ts)
            res[f"{name}_host_ms"] = statistics.median(t["host"] for t in ts)
    if cuda:  # each launch alone (the first layer's draws for the tables)
        from fastkd.kernels import randaug as K

        kind = torch.zeros(b, dtype=torch.int32, device=dev)
        lut = torch.arange(256, device=dev).to(torch.uint8).expand(b, 3, 256).contiguous()
        coef = torch.zeros(b, 6, dtype=torch.float64, device=dev)
        f = fill[:1].expand(b)
        stats = K.layer_stats(x)
        res["stats_pass_ms"] = _time(lambda: K.layer_stats(x), cuda, reps)
        res["tables_ms"] = _time(lambda: K.layer_tables(op[:, 0], mag[:, 0], f, *stats, s * s), cuda, reps)
        res["lookup_pass_ms"] = _time(lambda: K.apply_layer(x, kind, f, coef, lut, fill), cuda, reps)
        kind.fill_(K.KIND_GEOMETRIC)
        coef[:, 0] = coef[:, 4] = 0.97  # a zoom: every pixel resampled
        res["affine_pass_ms"] = _time(lambda: K.apply_layer(x, kind, f, coef, lut, fill), cuda, reps)
    with open(a.out, "w") as fh:
        json.dump(res, fh, indent=1)
    print(json.dumps(res))
    return 0 if res["kernel_equals_torch"] and res["crop_kernel_equals_torch"] else 1


if __name__ == "__main__":
    sys.exit(main())
