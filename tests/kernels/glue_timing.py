"""CPU time of the Python/torch glue around the fused token ops, Triton launches stubbed out (a tool, not
a test: tests never time anything).

Run WITHOUT ``TRITON_INTERPRET`` (``OMP_NUM_THREADS=1 python tests/kernels/glue_timing.py [--profile NAME |
--launch]``; ``--launch``: µs per launch through the autotuner's cache hit, ``_utils.launch`` and direct):
the kernels' ``JITFunction.run`` is replaced by a no-op and the autotuner's benchmark by a tie (config 0),
and the CUDA-device check is bypassed, so one fwd+bwd on tiny CPU tensors measures what the host does per
call around the launches (custom-op dispatch, autograd glue, argument checks, allocations, torch ops).
Excluded: Triton's own launch path (the binder + driver launch, ~5–15 µs per launch on a GPU host), the
CUDA launch cost of each torch op, and the compute of ``torch.mm`` (stubbed by an allocation of its
output: on a GPU host a cuBLAS GEMM is a launch, on this CPU a bf16 mm computes). Prints the best and
the median round, in µs per fwd+bwd of each case.
"""

import os
import statistics
import sys
import time

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime import autotuner, jit  # noqa: E402

LAUNCHES = [0]


def _stub_run(self, *args, **kwargs):
    LAUNCHES[0] += 1


jit.JITFunction.run = _stub_run
# the autotuner itself runs (a key's first call, then ``_utils.launch``'s memo); only its benchmark is stubbed
autotuner.Autotuner._bench = lambda self, *args, config=None, **kwargs: [1.0, 1.0, 1.0]
# ``cache_results=True`` (``_utils.autotune``) keys its disk cache on the active GPU backend, which this
# CPU has none of: tune in memory, as a cache miss would
autotuner.Autotuner.check_disk_cache = lambda self, key, configs, bench_fn: bench_fn() and False

# cuBLAS GEMMs are launches on a GPU host; on this CPU a bf16 mm computes (slowly), which is not glue:
# stub torch.mm with an allocation of its output (the host part of a launch is excluded as for Triton)
_real_mm = torch.mm


def _stub_mm(a, b, *args, out_dtype=None, **kwargs):
    return torch.empty((a.shape[0], b.shape[1]), dtype=out_dtype or a.dtype, device=a.device)


def _stub_bmm(a, b, *args, out_dtype=None, **kwargs):
    return torch.empty((a.shape[0], a.shape[1], b.shape[2]), dtype=out_dtype or a.dtype, device=a.device)


torch.mm = _stub_mm
torch.bmm = _stub_bmm

from fastkd.kernels import _utils  # noqa: E402
from fastkd.kernels import masked_gen as mg  # noqa: E402
from fastkd.kernels import token_kd as tk  # noqa: E402


def _no_cuda_check(what, ref, **tensors):
    return None


for mod in (tk, mg, _utils):
    if hasattr(mod, "check_device"):
        mod.check_device = _no_cuda_check

# fp32-out GEMMs take the CUDA call (one ``out_dtype`` GEMM, stubbed), not the CPU stand-in's upcasts
for mod in (tk, mg):
    mod.gemm_to = lambda a, b, dtype, native=None: _utils.gemm_to(a, b, dtype, native=True)


def inputs(B=3, N=16, D_s=24, D_t=40):
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)
    s = r(B, 1 + N, D_s).requires_grad_()
    t = r(B, 1 + N, D_t)
    W = (r(D_t, D_s) * D_s**-0.5).requires_grad_()
    b = r(D_t).requires_grad_()
    s2 = r(B, 1 + N, D_s).requires_grad_()
    return dict(s=s, s2=s2, t=t, W=W, b=b, N=N)


def _map(x, amp):  # what cls_patch_map_loss does on the triton path: the op, its map_scale the mean's 1/(B·N)
    B, N = x["s"].shape[0], x["N"]
    t = x["t"][..., : x["s"].shape[-1]]
    return tk.token_kd_op(x["s"], t, None, None, 1, 1, False, True, amp, map_scale=1.0 / (B * N))[1]


def _mimic(x, amp, save=None):  # one ViTKD mimic layer as the dispatch calls it (patch views)
    return tk.token_kd_op(x["s"][:, 1:], x["t"][:, 1:], x["W"], x["b"], 0, 0, True, False, amp, save)[0]


def _two_layers(x, stacked):  # ViTKD's two mimic layers under amp: one stacked op, or two one-layer ops
    if stacked:
        return tk.mimic_layers_op([x["s"], x["s2"]], [x["t"][:, 1:]] * 2, [x["W"]] * 2, [x["b"]] * 2, 1)
    return sum(
        tk.token_kd_op(s, x["t"][:, 1:], x["W"], x["b"], 1, 0, True, False, True, True)[0]
        for s in (x["s"], x["s2"])
    )


def _bench_call(loss):  # what bench/test_bench_losses.py times: the loss under autocast + autograd.grad
    from fastkd import functional as F

    def call(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if loss == "map":
                out = F.cls_patch_map_loss(x["s"], x["t"], 1, 1)
                leaves = (x["s"],)
            else:
                sv = [x["s"][:, 1:], x["s2"][:, 1:]]
                out = F.vitkd_mimic_loss(sv, [x["t"][:, 1:]] * 2, [x["W"]] * 2, [x["b"]] * 2)
                leaves = (x["s"], x["s2"], x["W"], x["b"])
        return _Grad(out, leaves)

    return call


class _Grad:  # ``time_case`` calls ``fn(x).backward()``: here that is the bench's autograd.grad
    def __init__(self, out, leaves):
        self.out, self.leaves = out, leaves

    def backward(self):
        torch.autograd.grad(self.out, self.leaves)


CASES = {
    "bench: cls_patch_map_loss": lambda x: _BENCH["map"](x),
    "bench: vitkd_mimic_loss (2)": lambda x: _BENCH["mimic"](x),
    "map (amp)": lambda x: _map(x, True),
    "mimic (amp, recompute)": lambda x: _mimic(x, True, False),
    "mimic (amp, save_residual)": lambda x: _mimic(x, True, True),
    "mimic (no amp)": lambda x: _mimic(x, False),
    "2 mimic layers, two ops": lambda x: _two_layers(x, False),
    "2 mimic layers, stacked": lambda x: _two_layers(x, True),
}


def time_case(fn, x, iters=200, rounds=7):
    for _ in range(20):
        fn(x).backward()
    best = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn(x).backward()
        best.append((time.perf_counter() - t0) / iters * 1e6)
    return min(best), statistics.median(best)


def launch_paths(iters=20000):
    """µs per launch of the mimic epilogue kernel (JIT launch stubbed): through ``triton.autotune``'s cache
    hit, through ``_utils.launch`` (its memo), and straight to the remembered config."""
    k = tk._token_kd_bwd_kernel
    M, D_t = 1024, 64
    y = torch.randn(M, D_t, dtype=torch.bfloat16)
    t = torch.randn(4, 257, D_t)
    part, r = torch.empty(64, M), torch.empty(M, D_t, dtype=torch.bfloat16)
    args = (y, t, y, y, part, part, part, part, r, M, 256, D_t, D_t, 0, 1, 256 * D_t, D_t, t.stride(0),
            t.stride(1), 0, 0)
    consts = dict(HAS_W=False, HAS_BIAS=False, WRITE_SB=False, SUMSQ=True, STORE_R=True, DOT_BF16=True,
                  UPCAST=False)
    grid = lambda meta: (1,)  # noqa: E731
    _utils.launch(k, grid, args, consts)  # the key's first call: the autotuner decides
    best = k.best_config.all_kwargs()
    paths = {
        "autotuner cache hit": lambda: k[grid](*args, **consts),
        "launch() (memo)": lambda: _utils.launch(k, grid, args, consts),
        "direct (remembered config)": lambda: k.fn[grid](*args, **consts, **best),
    }
    for name, fn in paths.items():
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            times.append((time.perf_counter() - t0) / iters * 1e6)
        print(f"{name:30s} median {statistics.median(times):6.2f} µs per launch")


_BENCH = {}


def main():
    from fastkd.ops import routing

    routing.set_fused(True, interpreter=True)  # CPU tensors to the (stubbed) kernels: the Triton path
    _BENCH.update(map=_bench_call("map"), mimic=_bench_call("mimic"))
    torch.set_num_threads(1)
    x = inputs()
    if "--launch" in sys.argv:
        launch_paths()
        return
    if "--profile" in sys.argv:
        import cProfile
        import pstats

        name = sys.argv[sys.argv.index("--profile") + 1] if len(sys.argv) > 2 else "map (amp)"
        fn = CASES[name]
        for _ in range(20):
            fn(x).backward()
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(500):
            fn(x).backward()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)
        return
    for name, fn in CASES.items():
        LAUNCHES[0] = 0
        lo, med = time_case(fn, x)
        per = LAUNCHES[0] / (20 + 7 * 200)
        print(f"{name:30s} min {lo:7.1f} µs  median {med:7.1f} µs per fwd+bwd  ({per:.0f} launches)")
    print(f"torch {torch.__version__}, triton {triton.__version__}")


if __name__ == "__main__":
    main()
