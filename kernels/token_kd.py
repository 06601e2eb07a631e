"""Fused token KD: ViTKD mimic MSE + [CLS]-KD CLS–patch map loss + the CLS-embedding inputs, one pass.

Per layer, with s [B, P_s+N, D_s] student and t [B, P_t+N, D_t] teacher tokens (CLS at token 0,
patches at P..P+N−1), W [D_t, D_s] (nn.Linear layout; None = identity, D_s = D_t), b [D_t] (None = 0),
norm(x) = x / max(‖x‖₂, 1e-12) over channels, rows m = b·N + n over the M = B·N patch tokens:

    r_m      = W s_m + b − t_m                       (recomputed in the backward, or stored in bf16: below)
    mimic    = Σ_{m,d} r_{m,d}²                       (raw sum; ViTKD scales by α/B)
    a_s[m]   = norm(c_s[b]) · norm(s_m),  a_t[m] = norm(c_t[b]) · norm(t_m)   (cosine CLS–patch maps)
    map      = Σ_m (a_t[m] − a_s[m])²                 (raw sum; [CLS]-KD takes the mean over B·N)
    a_s [B, N] fp32                                   (also an output: the student map alone, t = None)
    s_cls    = norm(c_s) [B, D_s] fp32,  t_cls = norm(c_t) [B, D_t] fp32   (cls_embed_loss inputs)

The op returns the two sums times host factors ``mim_scale`` and ``map_scale`` (default 1; the dispatch
passes α/B and 1/(B·N)), applied by the kernels to what they store and to the upstream gradients they
read, so no scaling op (and no autograd node for it) is launched. Below, g_mim and g_map stand for the
upstream gradients times those factors.

Backward, upstream g_mim, g_map (scalars, read on device: no host sync), g_as [B, N], g_cls [B, D_s]:

    gR      = 2·g_mim·r                 recomputed tile by tile, written once (compact [M, D_t])
    dS_m    = gR_m W                    cuBLAS (identity W: dS_m = gR_m)
    dW      = gRᵀ S,  db = Σ_m gR_m      cuBLAS / per-tile column partials summed in torch
    γ_m     = −2·g_map·(a_t[m] − a_s[m]) + g_as[m]
    dS_m   += γ_m (ĉ_s − a_s[m] ŝ_m) / ‖s_m‖
    dS_cls += Σ_n γ_n (ŝ_n − a_s[n] ĉ_s) / ‖c_s‖ + (g_cls − (g_cls·ĉ_s) ĉ_s) / ‖c_s‖

gR is written compact [M, D_t] (rows m = b·N + n, whatever s's strides: a patch view x[:, P:] of
[B, 1+N, D] or a prefix-carrying token tensor is read in place, never copied). dW accumulates over all
M rows: done by cuBLAS on gR rather than in-kernel (a per-tile [D_t, D_s] partial buffer or atomics
would cost more than the gR round trip). When s cannot be viewed as an [M, D_s] matrix in the GEMM
dtype (fp32 tokens under autocast, or a strided view), the recompute kernel writes S rounded to the
GEMM dtype, compact, as a by-product of the loads it does anyway (column-tile 0 only).

Kernels: the mimic term alone (ViTKD) runs forward and recompute on the same 2-D grouped kernel
(``_token_kd_bwd_kernel``; SUMSQ mode = forward: Σ_j r² per column tile); the map terms need whole
rows, so mimic + map and the map alone run the row-resident ``_token_kd_fwd_kernel``. Under autocast
(bf16 GEMM with a projection) the mimic term alone takes Y = S Wᵀ from cuBLAS (S rounded to bf16 by
one strided copy, Y bf16 as autocast's linear) and the 2-D kernel runs GEMM-free on Y (``HAS_W``
False): the Triton GEMM on fp32 strided tokens was L2-bound on the H200 (178 / 298 µs per call against
47 µs for cuBLAS; bench/NOTES.md, round 2). Its tl.dot path remains for the ``exact`` variants.
Stored residual (``save_residual``, mimic alone under autocast; eager: on when a backward follows): the
forward also writes r and S in bf16 and Σ_m r; the backward then skips the recompute: dS = r·bf16(2g·W)
(one cuBLAS GEMM that writes s's dtype, fp32 out for fp32 tokens: ``_utils.gemm_to``; with whole tokens
the one-layer op instead scales a bf16 product in ``_token_kd_scale_kernel``, which also writes zero
prefix rows, and the stacked op keeps r over whole rows with zero prefix rows), dW = 2g·(rᵀ S),
db = 2g·Σ_m r — 115.6 MB held per layer at DeiT-S (bench/NOTES.md).
Host path: eager calls run the launchers from an ``autograd.Function`` (``token_kd_op``); the
``fastkd::token_kd`` custom op (``token_kd_custom_op``) is what torch.compile traces. ViTKD's mimic
layers of one shape under autocast take one op for all layers (``mimic_layers_op``: the S and W stacks,
one ``torch.bmm`` per product, one autograd node), halving the per-call host work, which bounded the
fused mimic's wall time on the H100 (bench/NOTES.md).

Precision (``amp`` = bf16 autocast at the op boundary, decided by the caller; ``_utils.dot_bf16``):
    amp, or bf16 tokens: every GEMM on bf16 tensor cores, fp32 accumulation. The recompute/forward
        kernels load s (fp32 or bf16, any row stride) and round it to bf16 in registers; W (fp32
        parameter) is rounded to bf16 once per call by the launcher (as autocast does); gR is
        stored bf16; dS = gR W and dW = gRᵀ S are cuBLAS bf16 GEMMs (as autocast's reference
        does), dS converted to s's dtype by the map kernel (or one cast when there is no map
        term), dW to W's dtype.
    autocast off with fp32 tokens: exact fp32 (``tl.dot`` "ieee", fp32 gR, fp32 cuBLAS) — the
        compile-spec names of these variants say ``exact``.

Bytes (e = element size of s / t; M = B·N; map/CLS side buffers are O(M·20 + B·D) bytes):
    forward   reads M·D_s·e + M·D_t·e (+ D_t·D_s·2 for the bf16 W), writes O(M·20) — s and t once
              (+ M·(D_t + D_s)·2 with the stored residual).
    backward  gR kernel: reads s, t, writes gR (M·D_t·2 bf16) and S bf16 (M·D_s·2, if s is fp32 or
              strided); dS GEMM: reads gR, W, writes M·D_s·2; dW GEMM: reads gR, S; map kernel (or
              the cast / scale pass): reads s and the GEMM's dS, writes dS (M·D_s·e).
Flops: forward 2·M·D_s·D_t (the projection GEMM, fp32 accumulation); backward 3× that (recompute,
dS, dW). bench/NOTES.md has the per-config roofline (bytes, flops, predicted µs on H100 / H200).
"""

import os
import sys
from collections.abc import Callable
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._utils import (
    FLOAT_DTYPES,
    INTERPRET,
    Cfg,
    autotune,
    cast_rtne,
    cdiv,
    check_device,
    check_float,
    check_unit_stride,
    custom_op_path,
    dot_bf16,
    fail,
    first_line,
    gemm_to,
    grouped_pid,
    launch,
    mma,
    next_pow2,
    resolve_amp,
)

# ---------------------------------------------------------------------------------------- constants
EPS = tl.constexpr(1e-12)  # F.normalize's eps: norm(x) = x / max(‖x‖, EPS)
GROUP_M = 8  # grouped tile ordering of the recompute kernel's 2-D grid (L2 reuse of S tiles and W)
# Shipped configs, autotuned per (M, D_s, D_t, dtypes, flags). Tensor-core configs (bf16 dot): the first
# that fits the widths is the interpreter's choice. ``exact`` configs: fp32 "ieee" dot (CUDA-core FMAs),
# smaller tiles so the fp32 operand tiles fit the registers without spills.
# forward: one program per BLOCK_M patch rows, looping over D_t (BLOCK_N) and D_s (BLOCK_K)
# (BLOCK_M = 128 spills here: the row-resident design keeps the map statistics and the per-row loop
# state live across the D_t loop; see the compile-check table in bench/NOTES.md)
FWD_TC_CONFIGS = [
    Cfg(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    Cfg(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3),
    Cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3),
]
FWD_EXACT_CONFIGS = [
    Cfg(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2),
    Cfg(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2),
]
# forward without a GEMM (the map terms alone, [CLS]-KD's student map, identity W): a streaming pass over s
# and t, whose rows per program and loop widths set how many loads are in flight. The H100 profile had the
# DeiT-S map forward at 129 µs for 232.5 MB (1.8 TB/s of ≈ 2.9) with the first config alone, so the
# autotuner now measures these on the user's GPU (the first is the interpreter's and the old choice)
FWD_STREAM_CONFIGS = [
    Cfg(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    Cfg(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=2),
    Cfg(BLOCK_M=16, BLOCK_N=256, BLOCK_K=128, num_warps=4, num_stages=2),
    Cfg(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=2, num_stages=3),  # (128×64×64 w8 spilled on sm_80)
]
# backward gR recompute: program per (BLOCK_M rows, BLOCK_N teacher channels), loop over D_s
BWD_TC_CONFIGS = [
    Cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    Cfg(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
    Cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
]
BWD_EXACT_CONFIGS = [
    Cfg(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2),  # (64×64×32 spilled 8 B on sm_90a)
    Cfg(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2),
]
# backward map/CLS (no GEMM, fixed table): program per (sample, BLOCK_K student channels), loop over
# patches in BLOCK_M rows
MAP_BWD_CONFIGS = {
    "small": Cfg(BLOCK_M=16, BLOCK_N=1, BLOCK_K=32, num_warps=4, num_stages=1),
    "large": Cfg(BLOCK_M=32, BLOCK_N=1, BLOCK_K=128, num_warps=4, num_stages=1),
}
FWD_CONFIGS = FWD_TC_CONFIGS + FWD_EXACT_CONFIGS + [c for c in FWD_STREAM_CONFIGS if c not in FWD_TC_CONFIGS]
BWD_CONFIGS = BWD_TC_CONFIGS + BWD_EXACT_CONFIGS


def _fits(cfgs, d_n: int, d_k: int):
    """The configs whose tiles do not exceed the widths (BLOCK_N ≤ D_n, BLOCK_K ≤ D_k, rounded up to a
    power of two, at least 32); the smallest one when none does."""
    ok = [c for c in cfgs if c.BLOCK_N <= max(32, next_pow2(d_n)) and c.BLOCK_K <= max(32, next_pow2(d_k))]
    return ok or [min(cfgs, key=lambda c: c.BLOCK_N * c.BLOCK_K)]


def valid_configs(kind: str, d_s: int, d_t: int, bf16_dot: bool, gemm: bool = True) -> list[Cfg]:
    """The shipped configs the autotuner tries for one call ("fwd" or "bwd"): the tensor-core list for a
    bf16 dot, the exact list for an exact fp32 dot; without a GEMM the forward's streaming list, and the
    first fitting tensor-core config for the 2-D kernel (there the tile only sets the loop width)."""
    if kind == "fwd" and not gemm:
        return _fits(FWD_STREAM_CONFIGS, d_t, d_s)
    tc, exact = (FWD_TC_CONFIGS, FWD_EXACT_CONFIGS) if kind == "fwd" else (BWD_TC_CONFIGS, BWD_EXACT_CONFIGS)
    cfgs = _fits(tc if (bf16_dot or not gemm) else exact, d_t, d_s)
    return cfgs if gemm else cfgs[:1]


def _prune(kind):
    def prune(configs, nargs, **kw):
        gemm = bool(kw["HAS_W"]) and (kind == "bwd" or bool(kw["MIMIC"]))
        keep = set(valid_configs(kind, nargs["D_S"], nargs["D_T"], bool(kw["DOT_BF16"]), gemm))
        return [c for c in configs if _cfg(c) in keep]

    return prune


def _cfg(c) -> Cfg:
    return Cfg(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)


# ------------------------------------------------------------------------------------------ kernels
@autotune(
    FWD_CONFIGS,
    key=["M", "D_S", "D_T", "HAS_W", "MIMIC", "CLS_MAP", "HAS_T", "DOT_BF16"],
    prune=_prune("fwd"),
)
@triton.jit
def _token_kd_fwd_kernel(
    s_ptr,  # [B, P_S+N, D_S] student tokens, fp32 or bf16 (channel stride 1, any row / sample stride)
    t_ptr,  # [B, P_T+N, D_T] teacher tokens, fp32 or bf16 (channel stride 1)
    w_ptr,  # [D_T, D_S] projection weight (channel stride 1); read only if HAS_W
    b_ptr,  # [D_T] projection bias; read only if HAS_BIAS
    as_ptr,  # [M] fp32 out: a_s, the student CLS–patch map ([B, N] row-major); written if CLS_MAP
    stats_ptr,  # [5, M] fp32 out, per row: a_t, 1/‖s_m‖, 1/‖c_s‖, mim_scale·Σ_d r², map_scale·(a_t − a_s)²
    #             (0 where off)
    scls_ptr,  # [B, D_S] fp32 out: norm(student CLS) (if CLS_MAP)
    tcls_ptr,  # [B, D_T] fp32 out: norm(teacher CLS) (if CLS_MAP and HAS_T)
    M,
    N,
    D_S,
    D_T,
    P_S,
    P_T,
    stride_sb,
    stride_sn,
    stride_tb,
    stride_tn,
    stride_w,
    mim_scale,  # the mimic term's factor (the loss's α/B): Σ_d r² is stored times it
    map_scale,  # the map term's factor (1/(B·N) for the mean): (a_t − a_s)² is stored times it
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    MIMIC: tl.constexpr,
    CLS_MAP: tl.constexpr,
    HAS_T: tl.constexpr,
    DOT_BF16: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    bidx = (rows // N).to(tl.int64)
    n = rows % N
    s_row = s_ptr + bidx * stride_sb + (P_S + n) * stride_sn  # [BLOCK_M] patch rows
    s_cls = s_ptr + bidx * stride_sb  # [BLOCK_M] CLS row of each row's sample
    t_row = t_ptr + bidx * stride_tb + (P_T + n) * stride_tn
    t_cls = t_ptr + bidx * stride_tb

    if CLS_MAP:
        ss = tl.zeros((BLOCK_M,), tl.float32)
        sc = tl.zeros((BLOCK_M,), tl.float32)
        cc = tl.zeros((BLOCK_M,), tl.float32)
        for k0 in range(0, D_S, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            m2 = row_ok[:, None] & (k < D_S)[None, :]
            x = tl.load(s_row[:, None] + k[None, :], mask=m2, other=0.0).to(tl.float32)
            c = tl.load(s_cls[:, None] + k[None, :], mask=m2, other=0.0).to(tl.float32)
            ss += tl.sum(x * x, 1)
            sc += tl.sum(x * c, 1)
            cc += tl.sum(c * c, 1)
        tt = tl.zeros((BLOCK_M,), tl.float32)
        tc = tl.zeros((BLOCK_M,), tl.float32)
        ct = tl.zeros((BLOCK_M,), tl.float32)

    sq = tl.zeros((BLOCK_M,), tl.float32)
    if MIMIC:
        for j0 in range(0, D_T, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)
            j_ok = j < D_T
            mj = row_ok[:, None] & j_ok[None, :]
            if HAS_W:
                acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
                for k0 in range(0, D_S, BLOCK_K):
                    k = k0 + tl.arange(0, BLOCK_K)
                    k_ok = k < D_S
                    x = tl.load(
                        s_row[:, None] + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
                    )  # [BLOCK_M, BLOCK_K] in s's dtype
                    w = tl.load(
                        w_ptr + j[None, :] * stride_w + k[:, None],
                        mask=k_ok[:, None] & j_ok[None, :],
                        other=0.0,
                    )  # [BLOCK_K, BLOCK_N] = Wᵀ
                    acc = mma(acc, x, w, DOT_BF16, UPCAST)
            else:
                acc = tl.load(s_row[:, None] + j[None, :], mask=mj, other=0.0).to(tl.float32)
            if HAS_BIAS:
                acc += tl.load(b_ptr + j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
            y = tl.load(t_row[:, None] + j[None, :], mask=mj, other=0.0).to(tl.float32)
            r = tl.where(mj, acc - y, 0.0)
            sq += tl.sum(r * r, 1)
    if CLS_MAP and HAS_T:
        # teacher-side map statistics in their own pass over t (an L2 hit after the GEMM pass): keeping
        # them out of the GEMM epilogue keeps the big tiles spill-free
        for j0 in range(0, D_T, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)
            mj = row_ok[:, None] & (j < D_T)[None, :]
            y = tl.load(t_row[:, None] + j[None, :], mask=mj, other=0.0).to(tl.float32)
            c = tl.load(t_cls[:, None] + j[None, :], mask=mj, other=0.0).to(tl.float32)
            tt += tl.sum(y * y, 1)
            tc += tl.sum(y * c, 1)
            ct += tl.sum(c * c, 1)

    # every row of stats is written (zeros where a term is off): the op's outputs are deterministic
    zero = tl.zeros((BLOCK_M,), tl.float32)
    tl.store(stats_ptr + 3 * M + rows, sq * mim_scale, mask=row_ok)
    if CLS_MAP:
        inv_s = 1.0 / tl.maximum(tl.sqrt(ss), EPS)
        inv_cs = 1.0 / tl.maximum(tl.sqrt(cc), EPS)
        a_s = sc * inv_s * inv_cs
        if HAS_T:
            inv_t = 1.0 / tl.maximum(tl.sqrt(tt), EPS)
            inv_ct = 1.0 / tl.maximum(tl.sqrt(ct), EPS)
            a_t = tc * inv_t * inv_ct
            d = a_t - a_s
            tl.store(stats_ptr + 4 * M + rows, d * d * map_scale, mask=row_ok)
        else:
            a_t = zero
            tl.store(stats_ptr + 4 * M + rows, zero, mask=row_ok)
        tl.store(as_ptr + rows, a_s, mask=row_ok)
        tl.store(stats_ptr + rows, a_t, mask=row_ok)
        tl.store(stats_ptr + M + rows, inv_s, mask=row_ok)
        tl.store(stats_ptr + 2 * M + rows, inv_cs, mask=row_ok)
        # the CLS-embedding inputs, written by the program holding patch 0 of each sample (CLS_MAP only)
        first = row_ok & (n == 0)
        for k0 in range(0, D_S, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            m2 = first[:, None] & (k < D_S)[None, :]
            c = tl.load(s_cls[:, None] + k[None, :], mask=m2, other=0.0).to(tl.float32)
            tl.store(scls_ptr + bidx[:, None] * D_S + k[None, :], c * inv_cs[:, None], mask=m2)
        if HAS_T:
            for j0 in range(0, D_T, BLOCK_N):
                j = j0 + tl.arange(0, BLOCK_N)
                m2 = first[:, None] & (j < D_T)[None, :]
                c = tl.load(t_cls[:, None] + j[None, :], mask=m2, other=0.0).to(tl.float32)
                tl.store(tcls_ptr + bidx[:, None] * D_T + j[None, :], c * inv_ct[:, None], mask=m2)
    else:
        for q in range(0, 3):
            tl.store(stats_ptr + q * M + rows, zero, mask=row_ok)
        tl.store(stats_ptr + 4 * M + rows, zero, mask=row_ok)


@autotune(
    BWD_CONFIGS,
    key=["M", "D_S", "D_T", "HAS_W", "DOT_BF16", "WRITE_SB", "SUMSQ", "STORE_R"],
    prune=_prune("bwd"),
)
@triton.jit
def _token_kd_bwd_kernel(
    s_ptr,  # [B, P_S+N, D_S] student tokens, fp32 or bf16 (channel stride 1, any row / sample stride)
    t_ptr,  # [B, P_T+N, D_T] teacher tokens (channel stride 1)
    w_ptr,  # [D_T, D_S] projection weight; read only if HAS_W
    b_ptr,  # [D_T] projection bias; read only if HAS_BIAS
    g_ptr,  # [] fp32 upstream gradient of the (scaled) mimic sum (unused if SUMSQ)
    gr_ptr,  # [M, D_T] out, compact: gR = 2·scale·g·r (bf16 for a bf16 dot, else fp32); SUMSQ: [≥ cdiv(M,
    #          BLOCK_M) · cdiv(D_T, BLOCK_N)] fp32 out, scale · Σ r² of each (row tile, column tile), tile
    #          order
    sb_ptr,  # [M, D_S] out, compact: S in the GEMM dtype; written by column-tile 0 if WRITE_SB
    db_part_ptr,  # [≥ cdiv(M, BLOCK_M), D_T] fp32 out, if HAS_BIAS: Σ_rows gR (SUMSQ: r) of this row tile
    r_ptr,  # [B, P_R+N, D_T] bf16 out: the residual r = W s + b − t (SUMSQ and STORE_R only); prefix rows 0
    M,
    N,
    D_S,
    D_T,
    P_S,
    P_T,
    stride_sb,
    stride_sn,
    stride_tb,
    stride_tn,
    stride_w,
    P_R,  # prefix rows of r's layout (0: r is the compact [M, D_T])
    scale,  # the mimic term's factor (the loss's α/B), in the stored partials and in gR
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WRITE_SB: tl.constexpr,
    SUMSQ: tl.constexpr,
    STORE_R: tl.constexpr,
    DOT_BF16: tl.constexpr,
    UPCAST: tl.constexpr,
):
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(D_T, BLOCK_N)
    pid_m, pid_n = grouped_pid(tl.program_id(0), num_m, num_n, 8)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    bidx = (rows // N).to(tl.int64)
    n = rows % N
    s_row = s_ptr + bidx * stride_sb + (P_S + n) * stride_sn
    t_row = t_ptr + bidx * stride_tb + (P_T + n) * stride_tn

    j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j_ok = j < D_T
    mj = row_ok[:, None] & j_ok[None, :]
    if HAS_W:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, D_S, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < D_S
            mk = row_ok[:, None] & k_ok[None, :]
            x = tl.load(s_row[:, None] + k[None, :], mask=mk, other=0.0)  # [BLOCK_M, BLOCK_K]
            w = tl.load(
                w_ptr + j[None, :] * stride_w + k[:, None], mask=k_ok[:, None] & j_ok[None, :], other=0.0
            )  # [BLOCK_K, BLOCK_N] = Wᵀ
            if WRITE_SB:
                tl.store(
                    sb_ptr + rows.to(tl.int64)[:, None] * D_S + k[None, :],
                    cast_rtne(x.to(tl.float32), sb_ptr.dtype.element_ty),
                    mask=mk & (pid_n == 0),
                )
            acc = mma(acc, x, w, DOT_BF16, UPCAST)
    else:
        acc = tl.load(s_row[:, None] + j[None, :], mask=mj, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    y = tl.load(t_row[:, None] + j[None, :], mask=mj, other=0.0).to(tl.float32)
    if SUMSQ:  # the forward of the mimic term alone: Σ r² of this tile
        r = tl.where(mj, acc - y, 0.0)
        tl.store(gr_ptr + pid_m * num_n + pid_n, tl.sum(tl.sum(r * r, 1), 0) * scale)  # one per tile
        if STORE_R:  # the bf16 residual for the backward (no recompute), and its column sums for db
            r_row = bidx * (N + P_R) + P_R + n  # = rows when P_R = 0
            tl.store(
                r_ptr + r_row[:, None] * D_T + j[None, :],
                cast_rtne(r, r_ptr.dtype.element_ty),
                mask=mj,
            )
            for p in range(0, P_R):  # the prefix rows of r: 0, written by the programs holding patch 0
                tl.store(
                    r_ptr + (bidx * (N + P_R) + p)[:, None] * D_T + j[None, :],
                    tl.zeros((BLOCK_M, BLOCK_N), r_ptr.dtype.element_ty),
                    mask=mj & (n == 0)[:, None],
                )
            if HAS_BIAS:
                tl.store(db_part_ptr + pid_m * D_T + j, tl.sum(r, 0), mask=j_ok)
    else:
        g = (2.0 * scale) * tl.load(g_ptr).to(tl.float32)
        gr = tl.where(mj, acc - y, 0.0) * g
        tl.store(
            gr_ptr + rows.to(tl.int64)[:, None] * D_T + j[None, :],
            cast_rtne(gr, gr_ptr.dtype.element_ty),
            mask=mj,
        )
        if HAS_BIAS:
            tl.store(db_part_ptr + pid_m * D_T + j, tl.sum(gr, 0), mask=j_ok)


@triton.jit
def _token_kd_map_bwd_kernel(
    s_ptr,  # [B, P_S+N, D_S] student tokens (channel stride 1)
    as_ptr,  # [M] fp32: a_s (from the forward)
    stats_ptr,  # [5, M] fp32: a_t, 1/‖s_m‖, 1/‖c_s‖, … (from the forward)
    scls_ptr,  # [B, D_S] fp32: norm(student CLS) (from the forward)
    g_ptr,  # [] fp32 upstream gradient of the (scaled) map sum; read only if HAS_T
    gas_ptr,  # [M] fp32 upstream gradient of a_s; read only if HAS_GAS
    gcls_ptr,  # [B, D_S] upstream gradient of s_cls (row stride stride_gc); read only if HAS_GCLS
    mim_ptr,  # [M, D_S] compact dS of the mimic term (any float dtype); added if HAS_MIM
    ds_ptr,  # [B, P_S+N, D_S] out, contiguous: dS (prefix rows 1..P_S−1 written as 0)
    M,
    N,
    D_S,
    P_S,
    stride_sb,
    stride_sn,
    stride_db,
    stride_dn,
    stride_gc,
    map_scale,  # the map term's factor (the forward's)
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_T: tl.constexpr,
    HAS_GAS: tl.constexpr,
    HAS_GCLS: tl.constexpr,
    HAS_MIM: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < D_S
    if HAS_T:
        g2 = (-2.0 * map_scale) * tl.load(g_ptr).to(tl.float32)
    inv_c = tl.load(stats_ptr + 2 * M + b * N)
    c = tl.load(s_ptr + b * stride_sb + k, mask=k_ok, other=0.0).to(tl.float32)  # [BLOCK_K] CLS chunk
    out_dtype = ds_ptr.dtype.element_ty

    acc_c = tl.zeros((BLOCK_K,), tl.float32)
    acc_ga = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, N, BLOCK_M):
        n = n0 + tl.arange(0, BLOCK_M)
        n_ok = n < N
        m = b * N + n
        a_s = tl.load(as_ptr + m, mask=n_ok, other=0.0)
        inv_s = tl.load(stats_ptr + M + m, mask=n_ok, other=0.0)
        ga = tl.zeros((BLOCK_M,), tl.float32)  # dL/da_s per patch
        if HAS_T:
            ga += g2 * (tl.load(stats_ptr + m, mask=n_ok, other=0.0) - a_s)
        if HAS_GAS:
            ga += tl.load(gas_ptr + m, mask=n_ok, other=0.0).to(tl.float32)
        ga = tl.where(n_ok, ga, 0.0)
        m2 = n_ok[:, None] & k_ok[None, :]
        x = tl.load(
            s_ptr + b * stride_sb + (P_S + n)[:, None] * stride_sn + k[None, :], mask=m2, other=0.0
        ).to(tl.float32)
        coef_c = ga * inv_s * inv_c
        grad = coef_c[:, None] * c[None, :] - (ga * a_s * inv_s * inv_s)[:, None] * x
        if HAS_MIM:
            grad += tl.load(mim_ptr + m[:, None] * D_S + k[None, :], mask=m2, other=0.0).to(tl.float32)
        dptr = ds_ptr + b * stride_db + (P_S + n)[:, None] * stride_dn + k[None, :]
        tl.store(dptr, cast_rtne(grad, out_dtype), mask=m2)
        acc_c += tl.sum(coef_c[:, None] * x, 0)
        acc_ga += ga * a_s
    dc = acc_c - tl.sum(acc_ga, 0) * inv_c * inv_c * c
    if HAS_GCLS:
        ud = tl.zeros((BLOCK_K,), tl.float32)
        for k0 in range(0, D_S, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            u = tl.load(gcls_ptr + b * stride_gc + kk, mask=kk < D_S, other=0.0).to(tl.float32)
            ch = tl.load(scls_ptr + b * D_S + kk, mask=kk < D_S, other=0.0)
            ud += u * ch
        u = tl.load(gcls_ptr + b * stride_gc + k, mask=k_ok, other=0.0).to(tl.float32)
        ch = tl.load(scls_ptr + b * D_S + k, mask=k_ok, other=0.0)
        dc += (u - tl.sum(ud, 0) * ch) * inv_c
    tl.store(ds_ptr + b * stride_db + k, cast_rtne(dc, out_dtype), mask=k_ok)
    for p in range(1, P_S):  # prefix tokens other than CLS (e.g. DeiT's dist token): no gradient here
        tl.store(ds_ptr + b * stride_db + p * stride_dn + k, tl.zeros((BLOCK_K,), out_dtype), mask=k_ok)


@triton.jit
def _token_kd_scale_kernel(
    x_ptr,  # [B·N, D] dS of the mimic term from the stored residual (bf16, unscaled), compact
    g_ptr,  # [] fp32 factor: 2·scale·g (g the upstream gradient of the scaled mimic sum)
    out_ptr,  # [B, P+N, D] out, contiguous: dS = factor·x in s's dtype; prefix tokens (t < P) get 0
    R,  # B·(P+N) output rows
    T,  # P+N tokens per sample
    P,
    D,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < R
    col_ok = cols < D
    tok = rows % T
    src = (rows // T) * (T - P) + tok - P  # the compact row of a patch token
    keep = row_ok & (tok >= P)
    g = tl.load(g_ptr).to(tl.float32)
    x = tl.load(
        x_ptr + src.to(tl.int64)[:, None] * D + cols[None, :], mask=keep[:, None] & col_ok[None, :], other=0.0
    ).to(tl.float32)
    tl.store(
        out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :],
        cast_rtne(x * g, out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


# ``_token_kd_scale_kernel`` tile: 32 rows × 128 channels per program, 4 warps (32 elements per thread)
SCALE_CFG = Cfg(BLOCK_M=32, BLOCK_N=1, BLOCK_K=128, num_warps=4, num_stages=1)


# ---------------------------------------------------------------------------------------- launchers
_WHAT = "fastkd token_kd kernel"


def _check(s, t, weight, bias, num_prefix_s, num_prefix_t, mimic, cls_map):
    """Validate inputs; returns (B, N, D_s, D_t) (D_t = 0 without a teacher)."""
    if not (mimic or cls_map):
        fail(_WHAT, "nothing to compute: pass mimic=True and/or cls_map=True")
    if t is None and mimic:
        fail(_WHAT, "the mimic loss needs teacher tokens t")
    for name, x in (("s", s), ("t", t)):
        if x is not None and x.dim() != 3:
            fail(_WHAT, f"{name} must be 3-D [B, P+N, D] tokens, got shape {tuple(x.shape)}")
    for name, x in (("s", s), ("t", t), ("weight", weight), ("bias", bias)):
        check_float(_WHAT, name, x)
    check_device(_WHAT, s, t=t, weight=weight, bias=bias)
    B, T_s, D_s = s.shape
    lo = 1 if cls_map else 0
    if not lo <= num_prefix_s < T_s:
        fail(
            _WHAT,
            f"num_prefix_s={num_prefix_s} must be in [{lo}, {T_s - 1}] for {T_s} student tokens "
            "(the CLS token is token 0 when cls_map=True)",
        )
    N = T_s - num_prefix_s
    check_unit_stride(_WHAT, "s", s)
    if t is None:
        return B, N, D_s, 0
    _, T_t, D_t = t.shape
    if t.shape[0] != B:
        fail(_WHAT, f"student batch {B} != teacher batch {t.shape[0]}")
    if not lo <= num_prefix_t < T_t:
        fail(_WHAT, f"num_prefix_t={num_prefix_t} must be in [{lo}, {T_t - 1}] for {T_t} teacher tokens")
    if T_t - num_prefix_t != N:
        fail(
            _WHAT,
            f"student has {N} patch tokens, teacher {T_t - num_prefix_t}; they must match "
            "(check num_prefix_s / num_prefix_t)",
        )
    check_unit_stride(_WHAT, "t", t)
    if mimic:
        if weight is None:
            if D_s != D_t:
                fail(
                    _WHAT,
                    f"student width {D_s} != teacher width {D_t} and no projection weight; "
                    f"pass a weight of shape [{D_t}, {D_s}]",
                )
        else:
            if tuple(weight.shape) != (D_t, D_s):
                fail(
                    _WHAT,
                    f"weight must be [D_t, D_s] = [{D_t}, {D_s}] (nn.Linear layout), "
                    f"got {tuple(weight.shape)}",
                )
            check_unit_stride(_WHAT, "weight", weight)
        if bias is not None and bias.numel() != D_t:
            fail(_WHAT, f"bias must have D_t = {D_t} elements, got {bias.numel()}")
    return B, N, D_s, D_t


def residual_on(amp, save_residual, mimic, cls_map, t, D_s, weight) -> bool:
    """Whether the forward stores the bf16 residual for the backward (no recompute): the mimic term alone
    under autocast, when the caller says a backward follows (both flags explicit: the fake and the real
    op must agree, so None never turns it on), even widths (bf16 pairs packed in an fp32 buffer)."""
    return (
        amp is True
        and save_residual is True
        and mimic
        and not cls_map
        and weight is not None  # identity: no GEMM, nothing rounded to bf16 by autocast, keep recompute
        and t is not None
        and t.shape[2] % 2 == 0
        and D_s % 2 == 0
    )


def _residual_sizes(M, D_s, D_t, has_w, has_b):
    """fp32 slots of the packed residual: r bf16 [M, D_t], S bf16 [M, D_s] (if W), Σ_m r fp32 [D_t] (if b)."""
    return M * D_t // 2, (M * D_s // 2 if has_w else 0), (D_t if has_b else 0)


def _residual_views(stats, M, D_s, D_t, has_w, has_b):
    """(r [M, D_t] bf16, S [M, D_s] bf16 or None, Σ_m r [D_t] fp32 or None): views into ``stats``."""
    nr, ns, nb = _residual_sizes(M, D_s, D_t, has_w, has_b)
    r = stats[:nr].view(torch.bfloat16).view(M, D_t)
    sb = stats[nr : nr + ns].view(torch.bfloat16).view(M, D_s) if has_w else None
    db = stats[nr + ns : nr + ns + nb] if has_b else None
    return r, sb, db


def _fwd_outputs(s, t, N, cls_map, weight=None, bias=None, residual=False):
    """(a_s, s_cls, t_cls, stats) buffers, all written by the forward; unused ones are empty. With the
    stored residual (``residual_on``), stats is the packed residual (``_residual_views``)."""
    B, _, D_s = s.shape
    new = lambda *shape: s.new_empty(shape, dtype=torch.float32)
    if not cls_map:  # the mimic term alone: no per-row statistics are kept
        if residual:
            sizes = _residual_sizes(B * N, D_s, t.shape[2], weight is not None, bias is not None)
            return new(0), new(0), new(0), new(sum(sizes))
        return new(0), new(0), new(0), new(5, 0)
    stats = new(5, B * N)
    return new(B, N), new(B, D_s), (new(B, t.shape[2]) if t is not None else new(0)), stats


def token_kd_forward(
    s,
    t,
    weight=None,
    bias=None,
    num_prefix_s=1,
    num_prefix_t=1,
    mimic=True,
    cls_map=True,
    amp: bool = False,
    config: Cfg | None = None,
    save_residual: bool = False,
    w16: torch.Tensor | None = None,
    mim_scale: float = 1.0,
    map_scale: float = 1.0,
):
    """Launch the forward kernel. Returns (mimic_sum [], map_sum [], a_s [B, N], s_cls, t_cls, stats).

    Semantics in the module docstring; ``t`` may be None for the student map alone (cls_map=True,
    mimic=False; map_sum is then 0). Unused outputs are empty tensors. ``amp``: bf16 autocast is on
    (bf16 tensor-core GEMM; else exact fp32 for fp32 tokens). ``config`` forces one shipped config
    (tests); by default the kernel is autotuned. Allocations: 4 buffers + the 2 sums, whatever the shape.
    ``mim_scale`` / ``map_scale``: each sum comes out times its factor (the loss's α/B, 1/(B·N) for a
    mean), applied by the kernels to what they store, so the caller launches no scaling op (nor, in the
    backward, its gradient).
    """
    B, N, D_s, D_t = _check(s, t, weight, bias, num_prefix_s, num_prefix_t, mimic, cls_map)
    M = B * N
    residual = residual_on(amp, save_residual, mimic, cls_map, t, D_s, weight)
    a_s, s_cls, t_cls, stats = _fwd_outputs(s, t, N, cls_map, weight, bias, residual)
    if not cls_map:  # the mimic term alone (ViTKD): the 2-D tiled GEMM kernel, row sums per column tile
        sums = _mimic_forward(
            s, t, weight, bias, num_prefix_s, num_prefix_t, amp, config, stats if residual else None, w16,
            mim_scale,
        )
        return sums + (a_s, s_cls, t_cls, stats)
    has_t = t is not None
    has_w = mimic and weight is not None
    has_b = mimic and bias is not None
    tt = t if has_t else s
    bf16 = dot_bf16(amp, s, t, weight if mimic else None)
    w = _gemm_weight(weight, bf16, w16) if has_w else s
    bb = _bias_arg(bias if has_b else None, s)
    launch(
        _token_kd_fwd_kernel,
        lambda meta: (cdiv(M, meta["BLOCK_M"]),),
        (
            s,
            tt,
            w,
            bb,
            a_s,
            stats,
            s_cls,
            t_cls,
            M,
            N,
            D_s,
            D_t,
            num_prefix_s,
            num_prefix_t,
            s.stride(0),
            s.stride(1),
            tt.stride(0),
            tt.stride(1),
            w.stride(0) if has_w else 0,
            float(mim_scale),
            float(map_scale),
        ),
        dict(
            HAS_W=has_w,
            HAS_BIAS=has_b,
            MIMIC=mimic,
            CLS_MAP=cls_map,
            HAS_T=has_t,
            DOT_BF16=bf16,
            UPCAST=INTERPRET,
        ),
        config,
    )
    # a term that is off is an exact 0 (its stats row holds zeros): no reduction launched for it
    zero = lambda: s.new_zeros((), dtype=torch.float32)
    mim = stats[3].sum() if mimic else zero()
    msum = stats[4].sum() if has_t else zero()
    return mim, msum, a_s, s_cls, t_cls, stats


def _mimic_forward(s, t, weight, bias, P_s, P_t, amp, config, residual=None, w16=None, scale=1.0):
    """(mimic_sum, 0) of the mimic term alone, by ``_token_kd_bwd_kernel`` in its SUMSQ mode: a 2-D
    (row tile × D_t tile) grid in grouped order, so each program holds one [BLOCK_M, BLOCK_N] tile of
    r and W is streamed per column tile (less L2 traffic and bigger MMA tiles than the row-resident
    kernel, which the map terms need)."""
    B, T, D_s = s.shape
    N, D_t = T - P_s, t.shape[2]
    M = B * N
    has_w, has_b = weight is not None, bias is not None
    bf16 = dot_bf16(amp, s, t, weight)
    w = _gemm_weight(weight, bf16, w16) if has_w else s
    bb = _bias_arg(bias, s)
    part = s.new_empty(_tiles(M, D_t), dtype=torch.float32)  # Σ r² per tile
    store_r = residual is not None  # ``residual``: the packed buffer to fill (``_residual_views``)
    r = sb = db_sum = db_part = part
    if store_r:
        r, sb, db_sum = _residual_views(residual, M, D_s, D_t, has_w, has_b)
        sb = sb if has_w else part
        db_part = s.new_empty((cdiv(M, 32), D_t), dtype=torch.float32) if has_b else part
    via_cublas = has_w and bf16
    if via_cublas:
        # under autocast (bf16 GEMM): S rounded to bf16 (one strided copy, into the packed residual when it
        # is stored: the backward's dW needs it; none for bf16 tokens that form a matrix), Y = S Wᵀ by
        # cuBLAS (bf16 out, as autocast's linear), then the kernel without a GEMM: r = Y + b − t, Σ r²
        # (+ r in bf16 and Σ_m r when stored). The 2-D Triton GEMM on fp32 strided tokens measured 178 /
        # 298 µs per call on the H200 (L2-bound: s and W re-read per tile) vs 47 µs for cuBLAS at this
        # shape; bytes: 115.6 MB copy + 116 MB GEMM + 231 (309 stored) MB epilogue (bench/NOTES.md)
        # With the residual stored, the GEMM can instead run inside the epilogue kernel on that bf16 S (Y
        # never written), timed against this at the shape's first call (``mimic_route``)
        s_mat = _bf16_rows(s, P_s, N, sb if store_r else None)  # [M, D_s] bf16

        def via_cublas():
            y = torch.mm(s_mat, w.t())  # [M, D_t] bf16
            return _sumsq_on_y(y, t, bias, P_t, part, db_part, r, store_r, config, scale=scale)

        def via_triton():
            return _sumsq_with_gemm(s_mat, w, t, bias, P_t, part, db_part, r, config, scale=scale)

        if store_r:
            routes = {"cublas": via_cublas, "triton": via_triton}
            cfg = routes[mimic_route((1, B, N, D_s, D_t, has_b, s.device, t.dtype), routes, s.device)]()
        else:
            cfg = via_cublas()
    else:
        cfg = _launch_2d(
            (s, t, w, bb, part, part, sb, db_part, r),
            M, N, D_s, D_t, P_s, P_t, (s.stride(0), s.stride(1)), t, w.stride(0) if has_w else 0,
            dict(HAS_W=has_w, HAS_BIAS=has_b, WRITE_SB=store_r and has_w, SUMSQ=True, STORE_R=store_r,
                 DOT_BF16=bf16),
            config,
            scale=scale,
        )
    if store_r and has_b:
        torch.sum(db_part[: cdiv(M, cfg.BLOCK_M)], 0, out=db_sum)  # Σ_m r, for db = 2g·Σ_m r
    return part[: _tiles(M, D_t, cfg)].sum(), s.new_zeros((), dtype=torch.float32)


def _tiles(M: int, D_t: int, cfg: Cfg | None = None) -> int:
    """Tiles of the 2-D kernel's grid: with ``cfg``, that config's; without, enough for any of its configs
    (the smallest tiles): the size of the SUMSQ partials buffer, one Σ r² per tile."""
    if cfg is None:
        return max(cdiv(M, c.BLOCK_M) * cdiv(D_t, c.BLOCK_N) for c in BWD_CONFIGS)
    return cdiv(M, cfg.BLOCK_M) * cdiv(D_t, cfg.BLOCK_N)


def _bias_arg(bias, placeholder):
    """``bias`` as the kernels' flat [D_t] pointer argument, or ``placeholder`` (never read) without one."""
    if bias is None:
        return placeholder
    return bias if bias.dim() == 1 else bias.reshape(-1)


def _sumsq_with_gemm(s16, w16, t, bias, P_t, part, db_part, r, config=None, P: int = 0, scale=1.0) -> Cfg:
    """The fused-GEMM route of the mimic forward with a stored residual (``mimic_route``): what
    ``_sumsq_on_y`` does on cuBLAS's Y, with Y = S Wᵀ computed inside ``_token_kd_bwd_kernel`` (``HAS_W``)
    from S in bf16 (``s16``: [B·(P+N), D_s] rows, any row stride; P prefix rows per sample, skipped) and
    W in bf16 (``w16``), so Y never reaches memory. r is written in s16's row layout, prefix rows 0."""
    N, D_t, rs = t.shape[1] - P_t, t.shape[2], s16.stride(0)
    return _launch_2d(
        (s16, t, w16, _bias_arg(bias, s16), part, part, part, db_part, r), t.shape[0] * N, N, s16.shape[1],
        D_t, P, P_t, ((P + N) * rs, rs), t, w16.stride(0),
        dict(HAS_W=True, HAS_BIAS=bias is not None, WRITE_SB=False, SUMSQ=True, STORE_R=True, DOT_BF16=True),
        config,
        P_r=P,
        scale=scale,
    )


def _sumsq_on_y(y, t, bias, P_t, part, db_part, r, store_r: bool, config=None, P: int = 0, scale=1.0) -> Cfg:
    """The mimic forward's streaming epilogue on cuBLAS's Y = S Wᵀ (bf16, [B·(P+N), D_t]: P prefix rows per
    sample, skipped; P = 0: the compact [M, D_t]): ``_token_kd_bwd_kernel`` without a GEMM (``HAS_W`` False)
    computes r = Y + b − t (t [B, P_t+N, D_t], any row stride), writes scale · Σ r² per tile into ``part``
    and, with ``store_r``, r in bf16 into ``r`` (Y's layout, prefix rows 0) and Σ_rows r per row tile into
    ``db_part`` (with a bias). Returns the config it ran with."""
    B, T, D_t = t.shape[0], t.shape[1] - P_t + P, y.shape[1]
    N = T - P
    has_b = bias is not None
    return _launch_2d(
        (y, t, y, _bias_arg(bias, y), part, part, part, db_part, r),
        B * N, N, D_t, D_t, P, P_t, (T * D_t, D_t), t, 0,
        dict(HAS_W=False, HAS_BIAS=has_b, WRITE_SB=False, SUMSQ=True, STORE_R=store_r, DOT_BF16=True),
        config,
        P_r=P if store_r else 0,
        scale=scale,
    )


def _launch_2d(
    ptrs, M, N, D_in, D_t, P_in, P_t, s_strides, t, stride_w, flags: dict, config=None, P_r: int = 0,
    scale=1.0,
) -> Cfg:
    """One launch of ``_token_kd_bwd_kernel`` on its grouped (row tile × D_t tile) grid: ``ptrs`` are its
    9 tensor arguments in order (s, t, w, b, g, gr, sb, db_part, r), ``s_strides`` s's (sample, row)
    strides, ``flags`` its constexprs but UPCAST, ``P_r`` the prefix rows of r's layout, ``scale`` the mimic
    term's factor. Returns the config it ran with."""
    return launch(
        _token_kd_bwd_kernel,
        lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(D_t, meta["BLOCK_N"]),),
        (*ptrs, M, N, D_in, D_t, P_in, P_t, *s_strides, t.stride(0), t.stride(1), stride_w, P_r,
         float(scale)),
        dict(flags, UPCAST=INTERPRET),
        config,
    )


def _bf16_rows(s, P, N, out=None):
    """The patch rows of s [B, P+N, D] as a compact [B·N, D] bf16 matrix: a view when s already is one, else
    one strided copy (rounding fp32 → bf16, RTNE as autocast) into ``out`` or a new buffer."""
    B, _, D = s.shape
    if out is None and s.dtype == torch.bfloat16:
        mat = _as_matrix(s[:, P:] if P else s, N)
        if mat is not None:
            return mat
    if out is None:
        out = s.new_empty((B * N, D), dtype=torch.bfloat16)
    out.view(B, N, D).copy_(s[:, P:] if P else s)
    return out


def _residual_backward(
    g_mim, s, t, weight, bias, stats, P, need_dw, need_db, placeholders=True, w16=None, scale=1.0
):
    """(dS, dW, db) of the mimic term alone from the residual the forward stored (``residual_on``), with
    g2 = 2·scale·g: dS = g2·(r W) (patch views, P = 0: r·bf16(g2·W) by cuBLAS, written in s's dtype; whole
    tokens: r W in bf16, then one scale-and-cast pass that zeroes the prefix rows), dW = g2·(rᵀ S),
    db = g2·Σ_m r."""
    B, T, D_s = s.shape
    N, D_t = T - P, t.shape[2]
    M = B * N
    has_w, has_b = weight is not None, bias is not None
    r, sb, db_sum = _residual_views(stats, M, D_s, D_t, has_w, has_b)
    g = g_mim if g_mim.dtype == torch.float32 else g_mim.float()
    g2 = g * (2.0 * scale)
    if has_w and P == 0:  # dS [B, N, D_s] is the compact product itself: g2 rides on W, no scale pass
        ds = gemm_to(r, _scaled_weight(weight, g2, r.new_empty((D_t, D_s))), s.dtype).view(B, N, D_s)
    else:  # prefix rows to zero around the compact product (or no W): one scale-and-cast pass
        mim_ds = torch.mm(r, _gemm_weight(weight, True, w16)) if has_w else r  # [M, D_s] bf16, unscaled
        ds = _scaled_ds(mim_ds, g2, s.shape, s.dtype, P)
    if has_w and need_dw:
        dw = gemm_to(r.t(), sb, weight.dtype).mul_(g2)  # written in W's dtype by cuBLAS: no cast launch
    else:
        dw = s.new_empty(0, dtype=torch.float32) if placeholders else None
    if has_b and need_db:
        db = (db_sum * g2).to(bias.dtype).reshape(bias.shape)
    else:
        db = s.new_empty(0, dtype=torch.float32) if placeholders else None
    return ds, dw, db


def _scaled_ds(mim_ds, g2, shape, dtype, P):
    """dS [B, P+N, D_s] (``shape``) in ``dtype``, written in one pass: the patch rows g2·mim_ds (the compact
    [B·N, D_s] product r W), the prefix rows 0 — so a caller passing whole token tensors with num_prefix_s
    (not a patch view) needs no SliceBackward (zeros + copy of [B, 1+N, D_s], 76 µs per layer, H200)."""
    B, T, D_s = shape
    ds = torch.empty(shape, dtype=dtype, device=mim_ds.device)
    c = SCALE_CFG
    _token_kd_scale_kernel[(cdiv(B * T, c.BLOCK_M), cdiv(D_s, c.BLOCK_K))](
        mim_ds, g2, ds, B * T, T, P, D_s, BLOCK_R=c.BLOCK_M, BLOCK_D=c.BLOCK_K, num_warps=c.num_warps
    )
    return ds


def _gemm_weight(weight, bf16: bool, w16=None):
    """W in the GEMM dtype: rounded to bf16 for a bf16 dot (what autocast does; the kernels then stream
    half the bytes of W from L2 per row tile), as is for an exact one. ``w16``: that bf16 copy made
    already (the eager path makes it once in the forward and reuses it in the backward)."""
    if not bf16 or weight.dtype == torch.bfloat16:
        return weight
    return w16 if w16 is not None else weight.to(torch.bfloat16)


def _as_matrix(x, N):
    """x [B, N, D] as an [B·N, D] matrix view (no copy), or None when its strides do not allow one."""
    B, _, D = x.shape
    if x.stride(2) == 1 and (B == 1 or x.stride(0) == N * x.stride(1)) and (N == 1 or x.stride(1) >= D):
        return x.as_strided((B * N, D), (x.stride(1), 1))
    return None


def token_kd_backward(
    g_mim,
    g_map,
    g_as,
    g_cls,
    s,
    t,
    weight,
    bias,
    a_s,
    stats,
    s_cls,
    num_prefix_s,
    num_prefix_t,
    mimic,
    cls_map,
    need_dw,
    need_db,
    amp: bool = False,
    config: Cfg | None = None,
    map_config: Cfg | None = None,
    residual: bool = False,
    placeholders: bool = True,
    w16: torch.Tensor | None = None,
    mim_scale: float = 1.0,
    map_scale: float = 1.0,
):
    """Gradients (dS, dW, db) of ``token_kd_forward``; dW / db are empty when not needed (None with
    ``placeholders=False``: the eager autograd path, which does not need tensors there). ``mim_scale`` /
    ``map_scale``: the forward's factors (g_mim / g_map are the gradients of the scaled sums).

    g_mim, g_map: 0-d upstream gradients (stay on device); g_as [B, N] / g_cls [B, D_s]: upstream
    gradients of a_s / s_cls, or None. dS is a fresh contiguous tensor of s's shape and dtype. ``amp``
    as in the forward (the autograd formula passes the forward's value). The inputs were validated by
    the forward (``_check``), so the backward only reads the dims (host time per call).
    """
    B, T_s, D_s = s.shape
    N = T_s - num_prefix_s
    D_t = t.shape[2] if t is not None else 0
    M = B * N
    P = num_prefix_s
    dw = db = None  # empty placeholders made at the end when not computed (distinct: no aliasing)
    mim_ds = None  # compact [M, D_s] dS of the mimic term
    if residual:  # the forward stored r (bf16), S (bf16) and Σ_m r: no recompute, GEMMs on r, scale by 2g
        return _residual_backward(
            g_mim, s, t, weight, bias, stats, P, need_dw, need_db, placeholders, w16, mim_scale
        )
    if mimic:
        has_w = weight is not None
        has_b = bias is not None
        bf16 = dot_bf16(amp, s, t, weight)
        # the GEMM dtype; with no projection there is no GEMM and gR = dS keeps s's precision
        gdt = (torch.bfloat16 if bf16 else torch.float32) if has_w else s.dtype
        gr = s.new_empty((M, D_t), dtype=gdt)  # compact, every row written by the kernel
        w = _gemm_weight(weight, bf16, w16) if has_w else s
        via_cublas = has_w and bf16
        s_mat = None
        if via_cublas:
            # under autocast: Y = S Wᵀ recomputed by cuBLAS on S in bf16 (a view, or one strided copy that
            # dW = gRᵀS reuses), then the kernel without a GEMM writes gR = 2g·(Y + b − t): ≈ 154 µs
            # predicted at DeiT-S on the H200 against 298 µs measured for the 2-D Triton GEMM
            s_mat = _bf16_rows(s, P, N)
            y = torch.mm(s_mat, w.t())  # [M, D_t] bf16
        elif has_w and need_dw:
            s_mat = _as_matrix(s[:, P:], N) if s.dtype == gdt else None
        write_sb = has_w and need_dw and s_mat is None
        sb = s.new_empty((M, D_s), dtype=gdt) if write_sb else gr
        n_tiles = cdiv(M, 32)  # the smallest BLOCK_M shipped: enough partial rows for any config
        db_part = s.new_empty((n_tiles if has_b else 0, D_t), dtype=torch.float32)
        bb = _bias_arg(bias, s)
        g = g_mim if g_mim.dtype == torch.float32 else g_mim.float()
        if via_cublas:
            s_in, w_in, P_in, D_in, s_strides = y, y, 0, D_t, (N * D_t, D_t)
        else:
            s_in, w_in, P_in, D_in, s_strides = s, w, num_prefix_s, D_s, (s.stride(0), s.stride(1))
        has_gemm = has_w and not via_cublas
        cfg = _launch_2d(
            (s_in, t, w_in, bb, g, gr, sb, db_part, gr),
            M, N, D_in, D_t, P_in, num_prefix_t, s_strides, t, w_in.stride(0) if has_gemm else 0,
            dict(HAS_W=has_gemm, HAS_BIAS=has_b, WRITE_SB=write_sb, SUMSQ=False, STORE_R=False,
                 DOT_BF16=bf16),
            config,
            scale=mim_scale,
        )
        if has_w:
            mim_ds = torch.mm(gr, w)  # dS = gR W  [M, D_s], cuBLAS in the GEMM dtype
            if need_dw:
                dw = gemm_to(gr.t(), s_mat if s_mat is not None else sb, weight.dtype)  # dW = gRᵀ S
        else:
            mim_ds = gr  # identity: dS = gR
        if has_b and need_db:
            db = db_part[: cdiv(M, cfg.BLOCK_M)].sum(0)
            if db.dtype != bias.dtype or db.shape != bias.shape:
                db = db.to(bias.dtype).reshape(bias.shape)
    if placeholders and dw is None:  # the custom op returns tensors; the eager path takes None
        dw = s.new_empty(0, dtype=torch.float32)
    if placeholders and db is None:
        db = s.new_empty(0, dtype=torch.float32)
    if not cls_map:
        if P == 0:
            ds = mim_ds.view(B, N, D_s)
            return (ds if ds.dtype == s.dtype else ds.to(s.dtype)), dw, db
        ds = s.new_zeros(s.shape)  # prefix rows get no gradient from the mimic term (rare: mimic alone)
        ds[:, P:] = mim_ds.view(B, N, D_s)
        return ds, dw, db
    ds = torch.empty(s.shape, dtype=s.dtype, device=s.device)
    mcfg = map_config or MAP_BWD_CONFIGS["small" if D_s <= 64 else "large"]
    has_gcls = g_cls is not None
    gc = g_cls if has_gcls else s_cls
    if gc.stride(-1) != 1:
        gc = gc.contiguous()
    gas = g_as if g_as is None or g_as.is_contiguous() else g_as.contiguous()
    gm = g_map if g_map.dtype == torch.float32 else g_map.float()
    _token_kd_map_bwd_kernel[(B, cdiv(D_s, mcfg.BLOCK_K))](
        s,
        a_s,
        stats,
        s_cls,
        gm,
        gas if gas is not None else a_s,
        gc,
        mim_ds if mim_ds is not None else ds,
        ds,
        M,
        N,
        D_s,
        num_prefix_s,
        s.stride(0),
        s.stride(1),
        ds.stride(0),
        ds.stride(1),
        gc.stride(0),
        float(map_scale),
        BLOCK_M=mcfg.BLOCK_M,
        BLOCK_K=mcfg.BLOCK_K,
        HAS_T=t is not None,
        HAS_GAS=g_as is not None,
        HAS_GCLS=has_gcls,
        HAS_MIM=mim_ds is not None,
        num_warps=mcfg.num_warps,
        num_stages=mcfg.num_stages,
    )
    return ds, dw, db


# -------------------------------------------------------------------------------- custom op / autograd
@torch.library.custom_op("fastkd::token_kd", mutates_args=())
def token_kd_custom_op(
    s: torch.Tensor,
    t: Optional[torch.Tensor],  # noqa: UP045 (torch<2.7 schema inference needs typing.Optional)
    weight: Optional[torch.Tensor],  # noqa: UP045
    bias: Optional[torch.Tensor],  # noqa: UP045
    num_prefix_s: int,
    num_prefix_t: int,
    mimic: bool,
    cls_map: bool,
    amp: Optional[bool] = None,  # noqa: UP045
    save_residual: Optional[bool] = None,  # noqa: UP045
    mim_scale: float = 1.0,
    map_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mimic_sum, map_sum, a_s, s_cls, t_cls, stats); see ``token_kd_forward``.

    ``amp``: bf16 autocast is on (the caller reads ``torch.is_autocast_enabled`` at the op boundary and
    passes it; required under torch.compile). None = read it now (eager callers only).
    ``save_residual``: a backward follows (the caller knows: grad mode and requires_grad); with ``amp``
    True and the mimic term alone, the forward then stores the bf16 residual and the backward does not
    recompute (``residual_on``; bench/NOTES.md has the byte arithmetic). None / False: recompute.
    ``mim_scale`` / ``map_scale``: factors of the two sums (``token_kd_forward``)."""
    store = residual_on(amp, save_residual, mimic, cls_map, t, s.shape[2], weight)
    return token_kd_forward(
        s,
        t,
        weight,
        bias,
        num_prefix_s,
        num_prefix_t,
        mimic,
        cls_map,
        resolve_amp(amp, s.device),
        save_residual=store,
        mim_scale=mim_scale,
        map_scale=map_scale,
    )


@token_kd_custom_op.register_fake
def _(
    s, t, weight, bias, num_prefix_s, num_prefix_t, mimic, cls_map, amp=None, save_residual=None,
    mim_scale=1.0, map_scale=1.0,
):
    _, N, _, _ = _check(s, t, weight, bias, num_prefix_s, num_prefix_t, mimic, cls_map)
    new = lambda: s.new_empty((), dtype=torch.float32)
    store = residual_on(amp, save_residual, mimic, cls_map, t, s.shape[2], weight)
    return (new(), new(), *_fwd_outputs(s, t, N, cls_map, weight, bias, store))


@torch.library.custom_op("fastkd::token_kd_backward", mutates_args=())
def token_kd_backward_op(
    g_mim: torch.Tensor,
    g_map: torch.Tensor,
    g_as: Optional[torch.Tensor],  # noqa: UP045
    g_cls: Optional[torch.Tensor],  # noqa: UP045
    s: torch.Tensor,
    t: Optional[torch.Tensor],  # noqa: UP045
    weight: Optional[torch.Tensor],  # noqa: UP045
    bias: Optional[torch.Tensor],  # noqa: UP045
    a_s: torch.Tensor,
    stats: torch.Tensor,
    s_cls: torch.Tensor,
    num_prefix_s: int,
    num_prefix_t: int,
    mimic: bool,
    cls_map: bool,
    need_dw: bool,
    need_db: bool,
    amp: bool = False,
    residual: bool = False,
    mim_scale: float = 1.0,
    map_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dS, dW, db); see ``token_kd_backward``."""
    return token_kd_backward(
        g_mim,
        g_map,
        g_as,
        g_cls,
        s,
        t,
        weight,
        bias,
        a_s,
        stats,
        s_cls,
        num_prefix_s,
        num_prefix_t,
        mimic,
        cls_map,
        need_dw,
        need_db,
        amp,
        residual=residual,
        mim_scale=mim_scale,
        map_scale=map_scale,
    )


@token_kd_backward_op.register_fake
def _(
    g_mim,
    g_map,
    g_as,
    g_cls,
    s,
    t,
    weight,
    bias,
    a_s,
    stats,
    s_cls,
    num_prefix_s,
    num_prefix_t,
    mimic,
    cls_map,
    need_dw,
    need_db,
    amp=False,
    residual=False,
    mim_scale=1.0,
    map_scale=1.0,
):
    ds = torch.empty(s.shape, dtype=s.dtype, device=s.device)  # contiguous, as every real path returns
    empty = s.new_empty(0, dtype=torch.float32)
    dw = weight.new_empty(weight.shape) if (mimic and need_dw and weight is not None) else empty
    db = bias.new_empty(bias.shape) if (mimic and need_db and bias is not None) else empty.clone()
    return ds, dw, db


def _save(ctx, s, t, weight, bias, num_prefix_s, num_prefix_t, mimic, cls_map, amp, residual, scales, output):
    # unused outputs (stats, t_cls, often a_s / s_cls) get None, not materialised zeros: those zeros
    # were most of the ~9 zeros/fill_ per call measured on the H200 (issue 12, item 6)
    ctx.set_materialize_grads(False)
    _, _, a_s, s_cls, _, stats = output
    ctx.save_for_backward(s, t, weight, bias, a_s, stats, s_cls)
    ctx.args = (num_prefix_s, num_prefix_t, mimic, cls_map, amp, residual, *scales)


def _setup_context(ctx, inputs, output):
    s, t, weight, bias, num_prefix_s, num_prefix_t, mimic, cls_map = inputs[:8]
    amp = inputs[8] if len(inputs) > 8 else None
    save_residual = inputs[9] if len(inputs) > 9 else None
    scales = (inputs[10] if len(inputs) > 10 else 1.0, inputs[11] if len(inputs) > 11 else 1.0)
    residual = residual_on(amp, save_residual, mimic, cls_map, t, s.shape[2], weight)
    amp = resolve_amp(amp, s.device)
    _save(ctx, s, t, weight, bias, num_prefix_s, num_prefix_t, mimic, cls_map, amp, residual, scales, output)


def _grads(ctx, g_mim, g_map, g_as, g_scls, backward_fn):
    """(dS, None, dW, db) for the op's autograd formula; ``backward_fn`` is the backward custom op (under
    torch.compile) or ``token_kd_backward`` itself (eager: no custom-op dispatch on the host)."""
    s, t, weight, bias, a_s, stats, s_cls = ctx.saved_tensors
    num_prefix_s, num_prefix_t, mimic, cls_map, amp, residual, mim_scale, map_scale = ctx.args
    need_s, _, need_w, need_b = ctx.needs_input_grad[:4]
    need_w = bool(need_w and mimic and weight is not None)
    need_b = bool(need_b and mimic and bias is not None)
    if g_mim is None and g_map is None and g_as is None and g_scls is None:
        return None, None, None, None
    if not (need_s or need_w or need_b):
        return None, None, None, None
    # a scale the kernels never read (its term is off) gets a placeholder, a missing one of a term that
    # is on a 0-d zero (the kernels read the scales on device): no allocation in the common cases
    if g_mim is None:
        g_mim = s.new_zeros((), dtype=torch.float32) if mimic else a_s
    if g_map is None:
        g_map = s.new_zeros((), dtype=torch.float32) if (cls_map and t is not None) else g_mim
    ds, dw, db = backward_fn(
        g_mim,
        g_map,
        g_as if cls_map else None,
        g_scls if cls_map else None,
        s,
        t,
        weight,
        bias,
        a_s,
        stats,
        s_cls,
        num_prefix_s,
        num_prefix_t,
        mimic,
        cls_map,
        need_w,
        need_b,
        amp,
        residual,
        mim_scale,
        map_scale,
    )
    return (ds if need_s else None), None, (dw if need_w else None), (db if need_b else None)


def _backward(ctx, g_mim, g_map, g_as, g_scls, g_tcls, g_stats):
    return (*_grads(ctx, g_mim, g_map, g_as, g_scls, token_kd_backward_op), *(None,) * 8)


class _TokenKD(torch.autograd.Function):
    """The eager path of ``token_kd_op``: the same forward / backward launchers as the custom ops, without
    the custom-op dispatch (``torch.library`` adds ~0.3–0.5 ms of host time per fwd + bwd: the H200
    profile's ~0.8 ms of CPU per ``fastkd::token_kd`` call; ``tests/kernels/glue_timing.py``)."""

    @staticmethod
    def forward(ctx, s, t, weight, bias, num_prefix_s, num_prefix_t, mimic, cls_map, amp, residual, scales):
        # W rounded to bf16 once per fwd + bwd (kept on ctx for the backward, like autocast's per-forward
        # weight cache; never across steps: an optimizer step or a .data write changes W)
        w16 = None
        if mimic and weight is not None and weight.dtype != torch.bfloat16 and dot_bf16(amp, s, t, weight):
            w16 = weight.detach().to(torch.bfloat16)
        ctx.w16 = w16
        out = token_kd_forward(
            s,
            t,
            weight,
            bias,
            num_prefix_s,
            num_prefix_t,
            mimic,
            cls_map,
            amp,
            save_residual=residual,
            w16=w16,
            mim_scale=scales[0],
            map_scale=scales[1],
        )
        _save(ctx, s, t, weight, bias, num_prefix_s, num_prefix_t, mimic, cls_map, amp, residual, scales, out)
        return out

    @staticmethod
    def backward(ctx, g_mim, g_map, g_as, g_scls, g_tcls, g_stats):
        w16 = ctx.w16

        def backward_fn(*args):  # token_kd_backward_op's positional arguments
            return token_kd_backward(
                *args[:17], amp=args[17], residual=args[18], placeholders=False, w16=w16, mim_scale=args[19],
                map_scale=args[20],
            )

        return (*_grads(ctx, g_mim, g_map, g_as, g_scls, backward_fn), *(None,) * 7)


def token_kd_op(
    s, t, weight, bias, num_prefix_s, num_prefix_t, mimic, cls_map, amp=None, save_residual=None,
    mim_scale: float = 1.0, map_scale: float = 1.0,
):
    """(mim_scale·mimic_sum, map_scale·map_sum, a_s, s_cls, t_cls, stats): the fused token op (semantics:
    ``token_kd_forward``; the factors are applied inside the kernels: no scaling launch, no autograd node).

    Under torch.compile this is the custom op ``fastkd::token_kd`` (``token_kd_custom_op``; pass ``amp``
    and ``save_residual`` explicitly there). Eager, it runs the same launchers through a plain
    ``autograd.Function`` (no custom-op dispatch on the host), and ``save_residual=None`` means "when a
    backward follows": with ``amp`` (bf16 autocast) and the mimic term alone the forward then stores the
    bf16 residual and the backward does not recompute (``residual_on``; bench/NOTES.md)."""
    if custom_op_path(s):
        return token_kd_custom_op(
            s, t, weight, bias, num_prefix_s, num_prefix_t, mimic, cls_map, amp, save_residual,
            float(mim_scale), float(map_scale),
        )
    amp = resolve_amp(amp, s.device)
    if save_residual is None:
        save_residual = torch.is_grad_enabled() and (
            s.requires_grad
            or (weight is not None and weight.requires_grad)
            or (bias is not None and bias.requires_grad)
        )
    residual = residual_on(amp, save_residual, mimic, cls_map, t, s.shape[2], weight)
    scales = (float(mim_scale), float(map_scale))
    return _TokenKD.apply(
        s, t, weight, bias, num_prefix_s, num_prefix_t, mimic, cls_map, amp, residual, scales
    )


token_kd_custom_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------ the mimic term over all its layers
def mimic_layers_ok(xs, ts, ws, bs, P: int, amp: bool) -> bool:
    """Whether ``mimic_layers_op`` takes these layers: eager, bf16 autocast, ≥ 2 layers of one shape each
    (student ``[B, P+N, D_s]`` tensors of one dtype and strides, teacher ``[B, N, D_t]`` likewise), a
    projection W on every layer and a bias on all or none, all on one device."""
    if not amp or len(xs) < 2 or torch.compiler.is_compiling():
        return False
    x0, t0, w0, b0 = xs[0], ts[0], ws[0], bs[0]
    if w0 is None or x0.dim() != 3 or t0.dim() != 3:
        return False
    xsig = (x0.shape, x0.dtype, x0.stride(), x0.device)
    tsig = (t0.shape, t0.dtype, t0.stride(), x0.device)
    wsig = (w0.shape, w0.dtype, x0.device)
    bsig = None if b0 is None else (b0.shape, b0.dtype, x0.device)
    for x, t, w, b in zip(xs, ts, ws, bs, strict=True):
        if (x.shape, x.dtype, x.stride(), x.device) != xsig:
            return False
        if (t.shape, t.dtype, t.stride(), t.device) != tsig:
            return False
        if w is None or (w.shape, w.dtype, w.device) != wsig:
            return False
        if (b is None) != (bsig is None) or (b is not None and (b.shape, b.dtype, b.device) != bsig):
            return False
    return (
        x0.dtype in FLOAT_DTYPES
        and t0.dtype in FLOAT_DTYPES
        and x0.stride(2) == 1
        and t0.stride(2) == 1
        and tuple(w0.shape) == (t0.shape[2], x0.shape[2])
        and t0.shape[:2] == (x0.shape[0], x0.shape[1] - P)
    )


def _scaled_weight(w, g2, out):
    """bf16(2g·W) into ``out`` [D_t, D_s] (computed in fp32: one rounding; 2g stays an fp32 device
    scalar), so that dS = r (2g·W) needs no scale pass over dS."""
    return torch.mul(w if w.dtype == torch.float32 else w.float(), g2, out=out)


class _MimicLayers(torch.autograd.Function):
    """scale · Σ_l Σ_{m,d} (W_l s_l,m + b_l − t_l,m)² of L layers with one shape, under bf16 autocast (g2
    below is 2·scale·g: the factor is in the stored partials and rides on g, so it costs no launch), with the
    stored-residual design of the one-layer op, batched over the layers, on whole token rows:

    * S_l [B, P+N, D_s] (prefix rows included) and W_l are rounded to bf16 into [L, B·(P+N), D_s] /
      [L, D_t, D_s] stacks; Y = S Wᵀ is one ``torch.bmm`` (the P prefix rows of a sample: 1 in 197 rows
      of extra GEMM work at DeiT-S);
    * the streaming epilogue (r = Y + b − t on the patch rows, Σ r², r in bf16, Σ_m r) is one launch per
      layer (each layer's teacher is its own tensor) and writes r in the same whole-row layout with its
      prefix rows 0;
    * backward: dX = r (g2·W) is one ``torch.bmm`` written in X's dtype by cuBLAS (fp32 out for fp32
      tokens): the prefix rows come out 0 (their r is 0), so every layer's dX is its slice of that one
      buffer and there is no scale-and-cast pass (the one-layer op's ``_scaled_ds``: a read of the bf16
      product and a write of dX, 115.6 MB per DeiT-S layer); dW = g2·(rᵀ S) is one ``torch.bmm``;
    * one autograd node, one sum over all layers' partials.

    Rounding: as autocast's reference (Y, r and S in bf16, fp32 accumulation), except that g2·W is rounded
    to bf16 instead of the upstream gradient g2·r, and dX is not rounded to bf16 before its fp32 cast.
    Memory from forward to backward: r and S in bf16, as the one-layer op (the prefix rows add 1/N)."""

    @staticmethod
    def forward(ctx, P, n, has_b, scale, *flat):
        xs, ts, ws = flat[:n], flat[n : 2 * n], flat[2 * n : 3 * n]
        bs = flat[3 * n : 4 * n] if has_b else (None,) * n
        B, T, D_s = xs[0].shape
        N, D_t = T - P, ts[0].shape[2]
        M = B * N
        x0 = xs[0]
        s16 = x0.new_empty((n, B * T, D_s), dtype=torch.bfloat16)
        w16 = x0.new_empty((n, D_t, D_s), dtype=torch.bfloat16)
        s_l, w_l = s16.unbind(0), w16.unbind(0)
        for x, s_i, w, w_i in zip(xs, s_l, ws, w_l, strict=True):
            s_i.view(B, T, D_s).copy_(x.detach())
            w_i.copy_(w.detach())
        r = x0.new_empty((n, B * T, D_t), dtype=torch.bfloat16)  # whole rows, prefix rows 0
        part = x0.new_empty((n, _tiles(M, D_t)), dtype=torch.float32)  # scale · Σ r² per tile
        db_part = x0.new_empty((n, cdiv(M, 32), D_t), dtype=torch.float32) if has_b else part
        per_layer = list(zip(ts, bs, r.unbind(0), part.unbind(0), db_part.unbind(0), strict=True))

        def via_cublas():  # Y = S Wᵀ by cuBLAS (bf16, as autocast's linear rounds it), then the epilogue
            y = torch.bmm(s16, w16.transpose(1, 2))  # [L, B·(P+N), D_t]
            for (t, b, r_i, part_i, db_i), y_i in zip(per_layer, y.unbind(0), strict=True):
                cfg = _sumsq_on_y(y_i, t, b, 0, part_i, db_i, r_i, True, P=P, scale=scale)
            return cfg

        def via_triton():  # the GEMM and the epilogue in one kernel: Y never goes to memory
            for (t, b, r_i, part_i, db_i), s_i, w_i in zip(per_layer, s_l, w_l, strict=True):
                cfg = _sumsq_with_gemm(s_i, w_i, t, b, 0, part_i, db_i, r_i, P=P, scale=scale)
            return cfg

        routes = {"cublas": via_cublas, "triton": via_triton}
        key = (n, B, T, D_s, D_t, has_b, x0.device, ts[0].dtype)
        cfg = routes[mimic_route(key, routes, x0.device)]()
        total = part[:, : _tiles(M, D_t, cfg)].sum()  # one shape, so one config for every layer
        db_sum = db_part[:, : cdiv(M, cfg.BLOCK_M)].sum(1) if has_b else None  # [L, D_t]
        ctx.save_for_backward(r, s16, db_sum, *ws)
        b_meta = (bs[0].dtype, bs[0].shape) if has_b else None
        ctx.meta = (P, n, has_b, scale, x0.shape, x0.dtype, ws[0].dtype, b_meta)
        return total

    @staticmethod
    def backward(ctx, g):
        r, s16, db_sum, *ws = ctx.saved_tensors
        P, n, has_b, scale, shape, x_dtype, w_dtype, b_meta = ctx.meta
        need = ctx.needs_input_grad[4:]
        need_x, need_w, need_b = any(need[:n]), any(need[2 * n : 3 * n]), has_b and any(need[3 * n :])
        g2 = (2.0 * scale) * (g if g.dtype == torch.float32 else g.float())
        dxs = [None] * n
        if need_x:
            # the scale 2g rides on W (L·D_t·D_s elements; one rounding of 2g·W to bf16, computed in fp32)
            # instead of a pass over dX
            wg = r.new_empty((n, *ws[0].shape))
            for w, wg_i in zip(ws, wg.unbind(0), strict=True):
                _scaled_weight(w, g2, wg_i)
            dx = gemm_to(r, wg, x_dtype).view(n, *shape)
            dxs = [d if need[i] else None for i, d in enumerate(dx.unbind(0))]
        dws = [None] * n
        if need_w:
            dw = gemm_to(r.transpose(1, 2), s16, w_dtype).mul_(g2)  # [L, D_t, D_s] in W's dtype
            dws = list(dw.unbind(0))
        dbs = [None] * n
        if need_b:
            dbs = [
                db if db.shape == b_meta[1] else db.reshape(b_meta[1])
                for db in (db_sum * g2).to(b_meta[0]).unbind(0)
            ]
        return (None, None, None, None, *dxs, *([None] * n), *dws, *(dbs if has_b else ()))


# The stacked mimic's forward GEMM: cuBLAS's Y = S Wᵀ then the streaming epilogue (two passes over Y), or
# the GEMM inside the epilogue kernel (``_token_kd_bwd_kernel`` with ``HAS_W`` on the bf16 S stack: Y stays
# in registers, 155 MB less traffic per DeiT-S layer, but a Triton GEMM against cuBLAS's). Which is faster
# is the GPU's to say: the first call of each shape times both (``MIMIC_ROUTE_TIMES``) and keeps the faster,
# as ``triton.autotune`` does for configs. ``FASTKD_MIMIC_GEMM=cublas|triton`` forces one (benches,
# tests); off CUDA, and while a CUDA graph is captured, an undecided shape takes cuBLAS.
MIMIC_ROUTES: dict[tuple, str] = {}
MIMIC_ROUTE_TIMES: dict[tuple, dict[str, float]] = {}


class RouteHooks(NamedTuple):
    """What ``fastkd.ops.routing`` lends the route choice (the kernels import nothing from fastkd): how a
    route is timed, the measured dispatch's way, and where the choice is kept across processes
    (dispatch.json, keyed by GPU and versions, so a resumed run takes the same route: the same bits)."""

    time: Callable  # (run, device) → GPU ms of run()
    stored: Callable  # (device, key) → the kept route or None
    store: Callable  # (device, key, route, {route: ms}) → None


ROUTE_HOOKS: RouteHooks | None = None  # None: routes are not timed (cuBLAS)


def _route_timer(device: torch.device):
    """run → ms on ``device``; None (not timed: cuBLAS) without hooks, off CUDA and while a CUDA graph is
    captured (tests replace it)."""
    hooks = ROUTE_HOOKS
    if hooks is None or device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return None
    return lambda run: hooks.time(run, device)


def mimic_route(key: tuple, routes: dict, device: torch.device) -> str:
    """"cublas" or "triton" for the stacked mimic forward of shape ``key`` (see ``MIMIC_ROUTES``): each
    route is a callable that runs the whole forward GEMM + epilogue, timed at the key's first call."""
    forced = os.environ.get("FASTKD_MIMIC_GEMM", "auto")
    if forced in routes:
        return forced
    if forced != "auto":
        raise ValueError(f"FASTKD_MIMIC_GEMM={forced!r}: use auto, cublas or triton")
    hit = MIMIC_ROUTES.get(key)
    if hit is not None:
        return hit
    timer = _route_timer(device)
    if timer is None:
        return "cublas"
    hooks = ROUTE_HOOKS
    skey = "token_kd.mimic_gemm|L{}|B{}|T{}|Ds{}|Dt{}|b{:d}|".format(*key[:6]) + str(key[7]).split(".")[-1]
    stored = hooks.stored(device, skey) if hooks is not None else None
    if stored in routes:
        MIMIC_ROUTES[key] = stored
        return stored
    times = {"cublas": timer(routes["cublas"])}
    try:
        times["triton"] = timer(routes["triton"])
    except Exception as e:  # a Triton build or launch failure on this GPU (e.g. out of shared memory): the
        # candidate is dropped, training goes on with cuBLAS (a forced route raises instead)
        print(f"fastkd: the mimic's fused-GEMM route failed on this GPU, using cuBLAS ({type(e).__name__}: "
              f"{first_line(e)})", file=sys.stderr)
        times["triton"] = float("inf")
    MIMIC_ROUTE_TIMES[key] = times
    MIMIC_ROUTES[key] = best = min(times, key=times.get)
    if hooks is not None:
        hooks.store(device, skey, best, times)
    return best


def mimic_layers_op(xs, ts, ws, bs, P: int, scale: float = 1.0):
    """``scale`` · Σ over the layers of the mimic sum Σ_{m,d} (W s + b − t)² (0-d fp32; the factor, the loss's
    α/B, applied by the kernels: no scaling launch, no autograd node), for layers that
    ``mimic_layers_ok`` accepts: xs [B, P+N, D_s] (P prefix tokens skipped), ts [B, N, D_t], ws [D_t, D_s],
    bs [D_t] or all None. Eager only (torch.compile traces the one-layer custom op)."""
    has_b = bs[0] is not None
    flat = (*xs, *(t.detach() for t in ts), *ws, *(bs if has_b else ()))
    return _MimicLayers.apply(P, len(xs), has_b, float(scale), *flat)


# ------------------------------------------------------------------------------ compile-check specs
def compile_specs():
    """Every shipped (kernel, config, dtype, flags) variant as (name, fn, pointers, scalars, constexprs, cfg).

    For each variant, the configs the autotuner may pick for it (``valid_configs``) at two
    representative shapes: DeiT-S training (B=256, N=196, P=1, D_s=384, D_t=768; the patch rows read
    through the [B, 1+N, D] row stride, as training passes them) and a small ViT (B=64, N=16, D_s=64,
    D_t=128). Token dtypes: fp32 (what training feeds under autocast: fp32 residual stream) and bf16;
    weights fp32. Names carry ``bf16dot`` (tensor-core GEMM) or ``exact`` (fp32 "ieee" dot, autocast
    off only) or ``nodot``. The compile check builds each for sm_80 and sm_90a, requires no spills, and
    requires every ``tl.dot`` of a non-``exact`` variant to be an mma / wgmma.
    """
    specs = []
    shapes = {"deit_s": (256, 196, 1, 384, 768), "small": (64, 16, 1, 64, 128)}
    # (token dtype, bf16 dot, HAS_W, HAS_BIAS, MIMIC, CLS_MAP, HAS_T)
    fwd_variants = [  # (the mimic term alone runs on the 2-D kernel: ``bwd`` specs with ``sumsq``)
        ("fp32", True, True, True, True, True, True),  # training under autocast: mimic + map, one pass
        ("bf16", True, True, True, True, True, True),
        ("fp32", False, True, True, True, True, True),  # exact: autocast off
        ("fp32", False, False, False, False, True, True),  # the map loss alone (no GEMM)
        ("fp32", False, False, False, False, True, False),  # the student map alone
        ("bf16", True, False, True, True, True, True),  # identity projection (no GEMM)
    ]
    # (token dtype, bf16 dot, HAS_W, HAS_BIAS, WRITE_SB, SUMSQ, STORE_R); fp32 tokens under autocast (the
    # training case) first; the SUMSQ rows are the forward of the mimic term alone
    bwd_variants = [
        ("fp32", True, True, True, True, False, False),
        ("bf16", True, True, True, True, False, False),
        ("bf16", True, True, True, False, False, False),
        ("fp32", False, True, True, True, False, False),  # exact
        ("fp32", False, False, True, False, False, False),  # identity
        ("fp32", True, True, True, False, True, False),
        ("fp32", True, True, True, True, True, True),  # storing the bf16 residual (save_residual)
        ("bf16", True, True, True, False, True, False),
        ("fp32", False, True, True, False, True, False),  # exact
        ("fp32", False, False, True, False, True, False),  # identity
        ("bf16", True, False, True, False, True, True),  # stored residual: epilogue on cuBLAS's Y (bf16)
        ("bf16", True, False, False, False, True, True),  # the same, projection without bias
        ("bf16", True, False, True, False, True, False),  # autocast forward: Σ r² on cuBLAS's Y
        ("bf16", True, False, True, False, False, False),  # autocast recompute: gR from cuBLAS's Y
        ("bf16", True, True, True, False, True, True),  # the stacked op's Triton GEMM route, on its S stack
        ("bf16", True, True, False, False, True, True),  # the same, projection without bias
    ]

    def base_const(cfg, has_w, has_b, bf16):  # the constexprs both GEMM kernels share
        blocks = dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K)
        return dict(blocks, HAS_W=has_w, HAS_BIAS=has_b, DOT_BF16=bf16, UPCAST=False)

    def precision(bf16, gemm):
        return "bf16dot" if (bf16 and gemm) else ("exact" if gemm else "nodot")

    seen = set()
    for B, N, P, D_s, D_t in shapes.values():
        T = P + N  # the patch rows are read through the [B, P+N, D] row stride, as training passes them
        scalars = dict(M=B * N, N=N, D_S=D_s, D_T=D_t, P_S=P, P_T=P, stride_sb=T * D_s, stride_sn=D_s,
                       stride_tb=T * D_t, stride_tn=D_t, stride_w=D_s)
        for dt, bf16, has_w, has_b, mimic, cls_map, has_t in fwd_variants:
            gemm = has_w and mimic
            for cfg in valid_configs("fwd", D_s, D_t, bf16, gemm):
                flags = f"w{int(has_w)}b{int(has_b)}/mim{int(mimic)}map{int(cls_map)}t{int(has_t)}"
                tag = f"fwd/{dt}/{precision(bf16, gemm)}/{flags}/{cfg.BLOCK_M}x{cfg.BLOCK_N}x{cfg.BLOCK_K}"
                if tag in seen:
                    continue
                seen.add(tag)
                ptrs = {
                    "s_ptr": dt,
                    "t_ptr": dt,
                    "w_ptr": "bf16" if bf16 else "fp32",  # the launcher rounds W once for a bf16 dot
                    "b_ptr": "fp32",
                    "as_ptr": "fp32",
                    "stats_ptr": "fp32",
                    "scls_ptr": "fp32",
                    "tcls_ptr": "fp32",
                }
                const = dict(base_const(cfg, has_w, has_b, bf16), MIMIC=mimic, CLS_MAP=cls_map, HAS_T=has_t)
                fscal = dict(scalars, mim_scale=1.5, map_scale=0.5)  # runtime fp32 factors
                specs.append((tag, _token_kd_fwd_kernel.fn, ptrs, fscal, const, cfg))
        for dt, bf16, has_w, has_b, write_sb, sumsq, store_r in bwd_variants:
            for cfg in valid_configs("bwd", D_s, D_t, bf16, has_w):
                kname = "mimic_fwd" if sumsq else "bwd"
                tail = ("r1" if store_r else "") if sumsq else f"sb{int(write_sb)}"
                flags = f"w{int(has_w)}b{int(has_b)}{tail}"
                blocks = f"{cfg.BLOCK_M}x{cfg.BLOCK_N}x{cfg.BLOCK_K}"
                tag = f"{kname}/{dt}/{precision(bf16, has_w)}/{flags}/{blocks}"
                if tag in seen:
                    continue
                seen.add(tag)
                gdt = "bf16" if bf16 else "fp32"
                ptrs = {
                    "s_ptr": dt,
                    "t_ptr": dt,
                    "w_ptr": "bf16" if bf16 else "fp32",
                    "b_ptr": "fp32",
                    "g_ptr": "fp32",
                    "gr_ptr": "fp32" if sumsq else gdt,
                    "sb_ptr": gdt,
                    "db_part_ptr": "fp32",
                    "r_ptr": "bf16",
                }
                # bf16 operands the op made (cuBLAS's Y, or the stacked op's S stack for its Triton GEMM
                # route) while the teacher tokens stay fp32
                made = dt == "bf16" and bf16 and (not has_w or (sumsq and store_r))
                if made:
                    ptrs["t_ptr"] = "fp32"
                const = dict(
                    base_const(cfg, has_w, has_b, bf16), WRITE_SB=write_sb, SUMSQ=sumsq, STORE_R=store_r
                )
                bscal = dict(scalars, P_R=0, scale=1.5)  # the mimic factor: a runtime fp32
                specs.append((tag, _token_kd_bwd_kernel.fn, ptrs, bscal, const, cfg))
                if store_r and made:  # the stacked mimic op: r in whole-row layout, prefix rows 0
                    whole = dict(scalars, P_R=P, scale=1.5)
                    specs.append((f"{tag}/pr{P}", _token_kd_bwd_kernel.fn, ptrs, whole, const, cfg))
    for cname, cfg in MAP_BWD_CONFIGS.items():
        B, N, P, D_s, _ = shapes["small" if cname == "small" else "deit_s"]
        T = P + N
        for dt in ("fp32", "bf16"):
            for has_t, has_mim, mdt in ((True, True, "bf16"), (True, True, "fp32"), (False, False, "fp32")):
                ptrs = {
                    "s_ptr": dt,
                    "as_ptr": "fp32",
                    "stats_ptr": "fp32",
                    "scls_ptr": "fp32",
                    "g_ptr": "fp32",
                    "gas_ptr": "fp32",
                    "gcls_ptr": "fp32",
                    "mim_ptr": mdt,
                    "ds_ptr": dt,
                }
                scalars = dict(
                    M=B * N,
                    N=N,
                    D_S=D_s,
                    P_S=P,
                    stride_sb=T * D_s,
                    stride_sn=D_s,
                    stride_db=T * D_s,
                    stride_dn=D_s,
                    stride_gc=D_s,
                    map_scale=0.5,
                )
                const = dict(
                    BLOCK_M=cfg.BLOCK_M,
                    BLOCK_K=cfg.BLOCK_K,
                    HAS_T=has_t,
                    HAS_GAS=True,
                    HAS_GCLS=True,
                    HAS_MIM=has_mim,
                )
                specs.append(
                    (
                        f"map_bwd/{dt}/nodot/{cname}/t{int(has_t)}mim{int(has_mim)}{mdt if has_mim else ''}",
                        _token_kd_map_bwd_kernel,
                        ptrs,
                        scalars,
                        const,
                        cfg,
                    )
                )
    for dt in ("fp32", "bf16"):
        for P, D in ((0, 384), (1, 384), (1, 768)):  # patch views; whole tokens with a CLS prefix
            ptrs = {"x_ptr": "bf16", "g_ptr": "fp32", "out_ptr": dt}
            scalars = dict(R=256 * (P + 196), T=P + 196, P=P, D=D)
            c = SCALE_CFG
            specs.append(
                (
                    f"scale/{dt}/nodot/p{P}d{D}/{c.BLOCK_M}x{c.BLOCK_K}",
                    _token_kd_scale_kernel,
                    ptrs,
                    scalars,
                    dict(BLOCK_R=c.BLOCK_M, BLOCK_D=c.BLOCK_K),
                    c,
                )
            )
    return specs


__all__ = ["token_kd_op", "token_kd_custom_op", "token_kd_forward", "token_kd_backward", "compile_specs"]
