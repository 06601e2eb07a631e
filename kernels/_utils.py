"""Shared launcher helpers for the fused kernels (no kernels here).

* ``INTERPRET``: True when ``TRITON_INTERPRET=1`` was set before import; kernels then upcast ``tl.dot``
  operands to fp32 (the interpreter's bf16 ``tl.dot`` is wrong) after rounding them exactly as the GPU
  path does, so interpreter numerics equal the GPU's up to summation order.
* ``cast_rtne``: every fp32 → 16-bit cast in the kernels goes through it (the interpreter truncates
  fp32 → bf16; the GPU rounds to nearest even).
* ``Cfg``: one shipped launch configuration (block sizes + warps + stages). Every kernel file ships a
  small fixed table chosen by shape heuristics (no autotuning: the interpreter cannot time, and a
  fixed table is what the sm_80 / sm_90a compile check proves spill-free).
* ``row_layout``: the 2-D "row matrix" view of a [B, T, D] token tensor used by the cuBLAS GEMMs of
  the backward passes (rows b·T' + n, T' = stride_b / stride_n, so a patch view ``x[:, P:]`` of a
  contiguous tensor needs no copy; rows that belong to no token of the view are "gap" rows).
"""

import os
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


def dot_precision(*tensors: torch.Tensor | None) -> str:
    """``tl.dot`` input precision: exact fp32 ("ieee") when any operand is fp32, else tensor-core default."""
    fp32 = any(x is not None and x.dtype == torch.float32 for x in tensors)
    return "ieee" if fp32 else "tf32"


def row_layout(x: torch.Tensor) -> tuple[int, int]:
    """(T', R) for a [B, T, D] tensor whose rows lie on one uniform row grid, else (0, 0).

    Row (b, n) sits at row index b·T' + n of the 2-D matrix ``x.as_strided((R, D), (stride_n, 1))``
    with R = (B − 1)·T' + T; needs unit channel stride, stride_n >= D and stride_b = T'·stride_n.
    """
    B, T, D = x.shape
    sb, sn, sc = x.stride()
    if sc != 1 or sn < D or sn <= 0 or (B > 1 and sb % sn != 0):
        return 0, 0
    tp = sb // sn if B > 1 else T
    if tp < T:
        return 0, 0
    return tp, (B - 1) * tp + T


def as_rows(x: torch.Tensor, tp: int, rows: int) -> torch.Tensor:
    """The 2-D row matrix [rows, D] of ``x`` (see ``row_layout``); a view, no copy."""
    return x.as_strided((rows, x.shape[2]), (x.stride(1), 1))


def empty_rows_like(x: torch.Tensor, width: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh [B, T, width] tensor laid out on ``x``'s row grid, and its 2-D row matrix (a view of it).

    Returns (out [B, T, width] with strides (T'·width, width, 1), rows [R, width] contiguous).
    The gap rows exist in storage only. ``x`` must satisfy ``row_layout``. Works on fake tensors, so
    ``register_fake`` gives the same strides as the real op.
    """
    B, T, _ = x.shape
    tp, rows = row_layout(x)
    out = torch.empty_strided((B, T, width), (tp * width, width, 1), dtype=dtype, device=x.device)
    return out, out.as_strided((rows, width), (width, 1))
