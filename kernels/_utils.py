"""Shared launcher helpers for the fused kernels (no kernels here).

* ``INTERPRET``: True when ``TRITON_INTERPRET=1`` was set before import; kernels then upcast ``tl.dot``
  operands to fp32 (the interpreter's bf16 ``tl.dot`` is wrong) after rounding them exactly as the GPU
  path does, so interpreter numerics equal the GPU's up to summation order.
* ``cast_rtne``: every fp32 → 16-bit cast in the kernels goes through it (the interpreter truncates
  fp32 → bf16; the GPU rounds to nearest even).
* ``Cfg``: one shipped launch configuration (block sizes + warps + stages). The GEMM-bearing kernels
  are ``triton.autotune``d over a small list of them (``autotune``: keyed on the problem shape, the
  tensor dtypes and the precision flags; under the interpreter a ``do_bench`` stand-in picks the first
  config without timing); the elementwise kernels ship a fixed table. Every shipped config is what
  the sm_80 / sm_90a compile check proves spill-free and on tensor cores.
* ``resolve_amp``: the precision rule. Under bf16 autocast every ``tl.dot`` runs on bf16 tensor cores
  (operands, fp32 or bf16 in memory, rounded to bf16 in registers; fp32 accumulation); exact fp32
  ``tl.dot`` only for fp32 operands with autocast off. The caller decides (``amp`` argument of the
  custom ops, read at the op boundary with ``torch.is_autocast_enabled``); the kernels never look.
* ``grouped_pid``: grouped (super-row) ordering of a 2-D tile grid, for L2 reuse of the shared operand.
* ``gemm_to``: a bf16 cuBLAS GEMM that writes fp32 itself (``out_dtype``), so a gradient needs no cast pass.
* ``TorchFallback``: the data path's kernels fall back to their torch form after a launch error (one line).
"""

import inspect
import operator
import os
import sys
from typing import NamedTuple

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_EMULATE_RTNE = tl.constexpr(INTERPRET)

FLOAT_DTYPES = (torch.float32, torch.bfloat16)  # what the kernels are built and tested for
RECORD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # top-K record values may also be fp16


class Cfg(NamedTuple):
    """A launch configuration: block sizes (kernel-specific meaning) and num_warps / num_stages."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int


@triton.jit
def cast_rtne(x, dtype: tl.constexpr):
    """fp32 ``x`` cast to ``dtype`` with round-to-nearest-even, as on the GPU. The interpreter truncates
    fp32 → bf16 casts, so there the bits are rounded first (exact RTNE for finite values)."""
    if _EMULATE_RTNE:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def first_line(e: BaseException, limit: int = 160) -> str:
    """An exception's first message line (its type's name when the message is empty), for one-line notes."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]


class TorchFallback:
    """The data path's kernels (RandAugment, the resized crop) keep a torch form: a build or launch error on
    the user's GPU is one stderr line naming ``what``, then ``usable`` is False from then on and the caller
    runs its torch form. Under the interpreter (tests) a launch error raises."""

    def __init__(self, what: str):
        self.what, self.broken = what, None

    def usable(self, x: torch.Tensor) -> bool:
        return self.broken is None and (x.is_cuda or INTERPRET)

    def launch(self, kernel, grid, args, options: dict, **const) -> bool:
        """``kernel[grid](*args, **const)`` with ``options`` (the compile options) off the interpreter;
        False after a failure (reported once)."""
        try:
            kernel[grid](*args, **const, **({} if INTERPRET else options))
            return True
        except Exception as e:
            if INTERPRET:
                raise
            self.broken = first_line(e)
            print(f"fastkd: {self.what} failed ({self.broken}); using the torch form", file=sys.stderr)
            return False


def fail(what: str, msg: str) -> None:
    raise ValueError(f"{what}: {msg}")


def check_float(what: str, name: str, x: torch.Tensor | None, allowed=FLOAT_DTYPES) -> None:
    if x is None:
        return
    if x.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        fail(
            what, f"{name} has dtype {x.dtype}; the fused kernel takes {names} (use the reference for others)"
        )


def check_device(what: str, ref: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    for name, x in tensors.items():
        if x is not None and x.device != ref.device:
            fail(what, f"{name} is on {x.device} but the inputs are on {ref.device}; move it to {ref.device}")
    if ref.device.type != "cuda" and not INTERPRET:
        fail(
            what,
            f"Triton kernels need CUDA tensors (got {ref.device}); use fastkd.functional, which "
            "falls back to the reference on CPU, or set TRITON_INTERPRET=1 for the interpreter",
        )


def check_unit_stride(what: str, name: str, x: torch.Tensor) -> None:
    if x.numel() > 0 and x.stride(-1) != 1:
        fail(
            what,
            f"{name} must have unit stride on its last (channel) axis, got strides {tuple(x.stride())}; "
            "pass x.contiguous()",
        )


def autocast_bf16_on(device: torch.device) -> bool:
    """True when bf16 autocast is active for ``device``'s type right now (read at the op boundary)."""
    dev = device.type
    try:
        return bool(torch.is_autocast_enabled(dev)) and torch.get_autocast_dtype(dev) == torch.bfloat16
    except (TypeError, AttributeError, RuntimeError):  # torch < 2.4: no per-device query
        if dev == "cuda":
            return torch.is_autocast_enabled() and torch.get_autocast_gpu_dtype() == torch.bfloat16
        return torch.is_autocast_cpu_enabled() and torch.get_autocast_cpu_dtype() == torch.bfloat16


def resolve_amp(amp: bool | None, device: torch.device) -> bool:
    """The op's ``amp`` flag: the caller's explicit choice, or (None) bf16 autocast read now (eager only:
    under torch.compile the caller must pass it, the traced op runs outside the autocast context)."""
    return autocast_bf16_on(device) if amp is None else bool(amp)


def cdiv(a: int, b: int) -> int:
    """``triton.cdiv`` for host code (in triton 3.8 that one is a ``constexpr_function`` wrapper costing
    microseconds per call)."""
    return -(-a // b)


_FAKE_KEY = getattr(getattr(torch._C, "_TorchDispatchModeKey", None), "FAKE", None)


def custom_op_path(x: torch.Tensor) -> bool:
    """Whether an op call must go through its ``torch.library`` custom op (torch.compile tracing, fake or
    meta tensors, tensor subclasses) rather than the eager ``autograd.Function`` fast path."""
    if torch.compiler.is_compiling() or type(x) is not torch.Tensor or x.device.type == "meta":
        return True
    return _FAKE_KEY is not None and torch._C._get_dispatch_mode(_FAKE_KEY) is not None


def dot_bf16(amp: bool, *operands: torch.Tensor | None) -> bool:
    """Whether the GEMM runs on bf16 tensor cores: under bf16 autocast, or when any operand already is
    bf16 (the weight is then rounded too, as autocast does). False = exact fp32 ``tl.dot`` (fp32
    operands with autocast off: the ``exact`` variants)."""
    return bool(amp) or any(x is not None and x.dtype == torch.bfloat16 for x in operands)


def interp_bench(kernel_call, quantiles=None, **_):
    """``do_bench`` stand-in for ``triton.autotune`` under the interpreter: no timing, every config ties,
    so the first (pruned) config is used; the tests force every other config explicitly."""
    return [1.0, 1.0, 1.0] if quantiles else 1.0


_AUTOTUNE_CACHE = "cache_results" in inspect.signature(triton.autotune).parameters  # triton ≥ 3.2


def autotune(configs: list[Cfg], key: list[str], prune=None):
    """``triton.autotune`` over ``configs`` (the shipped list), keyed on ``key`` + tensor dtypes; ``prune``
    keeps the configs valid for the call's precision / widths (``early_config_prune``)."""
    tcfgs = [
        triton.Config(
            dict(BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, BLOCK_K=c.BLOCK_K),
            num_warps=c.num_warps,
            num_stages=c.num_stages,
        )
        for c in configs
    ]
    kw = {"prune_configs_by": {"early_config_prune": prune}} if prune is not None else {}
    if INTERPRET:
        kw["do_bench"] = interp_bench
    # the timings kept on disk (Triton's cache, keyed by GPU, versions, kernel source and tuning key): a
    # resumed run on the same machine takes the same configs, so the same summation order and bits
    if _AUTOTUNE_CACHE:
        kw["cache_results"] = True
    return triton.autotune(tcfgs, key=key, **kw)


def cfg_of(config) -> Cfg:
    """A ``triton.Config`` as a ``Cfg``."""
    k = config.kwargs
    return Cfg(k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"], config.num_warps, config.num_stages)


# launch's memo of the autotuner's choices: (kernel id, its key's values, the tensor args' dtypes) → config
_TUNED: dict[tuple, tuple[dict, Cfg]] = {}
# per (kernel id, arg count): getters of the key args by position, the key names passed by keyword, and
# the positions of the tensor arguments (the pointer parameters: every launcher passes a tensor there)
_KEY_SLOTS: dict[tuple[int, int], tuple] = {}


def _tuned_key(kernel, args: tuple, consts: dict) -> tuple:
    """At least as fine as ``triton.autotune``'s own cache key (the values of its ``key`` args, and the dtype
    of every tensor argument), from positions found at a kernel's first call with that many args: the
    tensor positions are its pointer parameters, where every launcher passes a tensor (a non-tensor there
    fails loudly, and a kernel called with fewer args gets its own slots)."""
    slots = _KEY_SLOTS.get((id(kernel), len(args)))
    if slots is None:
        names = kernel.arg_names
        pos = [names.index(k) for k in kernel.keys if k in names and names.index(k) < len(args)]
        by_name = tuple(k for k in kernel.keys if k not in names or names.index(k) >= len(args))
        tpos = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        slots = _KEY_SLOTS[(id(kernel), len(args))] = (_getter(pos), by_name, _getter(tpos))
    keys, by_name, tensors = slots
    return (id(kernel), *keys(args), *[consts.get(k) for k in by_name], *[a.dtype for a in tensors(args)])


def _getter(positions: list[int]):
    """args → the tuple of args at ``positions`` (``operator.itemgetter``, which returns a bare item for one
    position and needs at least one)."""
    if not positions:
        return lambda args: ()
    if len(positions) == 1:
        i = positions[0]
        return lambda args: (args[i],)
    return operator.itemgetter(*positions)


def launch(kernel, grid, args: tuple, consts: dict, config: Cfg | None = None) -> Cfg:
    """Launch autotuned ``kernel`` (``grid(META)``) and return the config it ran with; ``config`` forces one
    (tests: every shipped config) by launching the underlying JIT function directly.

    The autotuner runs at a key's first call (it benchmarks there); later calls with the same key launch
    its choice directly: ``Autotuner.run``'s own cache hit rebuilds two argument dicts and formats every
    dtype, ≈ 17 µs of host time per launch on this CPU against ≈ 7 µs through this memo
    (``tests/kernels/glue_timing.py --launch``, bench/NOTES.md)."""
    if config is None:
        key = _tuned_key(kernel, args, consts)
        hit = _TUNED.get(key)
        if hit is not None:
            kernel.fn[grid](*args, **consts, **hit[0])
            return hit[1]
        kernel[grid](*args, **consts)
        best = kernel.best_config
        _TUNED[key] = (best.all_kwargs(), cfg_of(best))
        return _TUNED[key][1]
    kernel.fn[grid](
        *args,
        **consts,
        BLOCK_M=config.BLOCK_M,
        BLOCK_N=config.BLOCK_N,
        BLOCK_K=config.BLOCK_K,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return config


@triton.jit
def mma(acc, a, b, DOT_BF16: tl.constexpr, UPCAST: tl.constexpr):
    """acc += a @ b with fp32 accumulation. DOT_BF16: a and b (fp32 or bf16 in registers) are rounded to
    bf16 (RTNE) and multiplied on bf16 tensor cores; UPCAST (interpreter only) multiplies the rounded
    values in fp32 instead (its bf16 ``tl.dot`` is wrong). Else exact fp32 ("ieee", the ``exact``
    variants: CUDA-core FMAs, autocast off only)."""
    if DOT_BF16:
        a16 = cast_rtne(a, tl.bfloat16)
        b16 = cast_rtne(b, tl.bfloat16)
        if UPCAST:
            acc = tl.dot(a16.to(tl.float32), b16.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a16, b16, acc)
    else:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return acc


@triton.jit
def grouped_pid(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of linear program ``pid`` in a num_m × num_n tile grid, walked in groups of GROUP_M
    tile rows: consecutive programs share the same column tile (its W slice stays in L2) while sweeping
    GROUP_M row tiles (their S tiles stay in L2 across the column sweep)."""
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


# bf16 × bf16 → fp32-out cuBLAS GEMMs (``aten::mm.dtype`` / ``aten::bmm.dtype``: CUDA only, torch ≥ 2.8)
OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads() and "dtype" in torch.ops.aten.bmm.overloads()


def gemm_to(a, b, dtype, native: bool | None = None):
    """a @ b of bf16 matrices (2-D: ``torch.mm``) or stacks (3-D: ``torch.bmm``) with fp32 accumulation,
    written in ``dtype``: for fp32, cuBLAS writes fp32 itself (one pass; no bf16 product and cast). On
    CPU (the interpreter tests) and without ``out_dtype``: the same products of the bf16 values, summed in
    fp32. ``native`` (tests): force the ``out_dtype`` call (default: on CUDA when torch has it)."""
    global OUT_DTYPE
    gemm = torch.bmm if a.dim() == 3 else torch.mm
    if dtype == a.dtype:
        return gemm(a, b)
    if not (dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16)):
        return gemm(a, b).to(dtype)  # not a widening: the product in the operands' dtype, then cast
    if native if native is not None else (a.is_cuda and OUT_DTYPE):
        try:
            return gemm(a, b, out_dtype=dtype)
        except RuntimeError as e:  # a torch / cuBLAS without it: the bf16 product, cast (once per process)
            OUT_DTYPE = False
            print(f"fastkd: fp32-out GEMM unavailable ({first_line(e, 120)}); "
                  "using a bf16 GEMM + cast", file=sys.stderr)
            return gemm(a, b).to(dtype)
    return gemm(a.to(dtype), b.to(dtype))
