"""Fused token KD: ViTKD mimic MSE + [CLS]-KD CLS–patch map loss + the CLS-embedding inputs, one pass.

Per layer, with s [B, P_s+N, D_s] student and t [B, P_t+N, D_t] teacher tokens (CLS at token 0,
patches at P..P+N−1), W [D_t, D_s] (nn.Linear layout; None = identity, D_s = D_t), b [D_t] (None = 0),
norm(x) = x / max(‖x‖₂, 1e-12) over channels, rows m = b·N + n over the M = B·N patch tokens:

    r_m      = W s_m + b − t_m                       (never stored; recomputed in the backward)
    mimic    = Σ_{m,d} r_{m,d}²                       (raw sum; ViTKD scales by α/B)
    a_s[m]   = norm(c_s[b]) · norm(s_m),  a_t[m] = norm(c_t[b]) · norm(t_m)   (cosine CLS–patch maps)
    map      = Σ_m (a_t[m] − a_s[m])²                 (raw sum; [CLS]-KD takes the mean over B·N)
    a_s [B, N] fp32                                   (also an output: the student map alone, t = None)
    s_cls    = norm(c_s) [B, D_s] fp32,  t_cls = norm(c_t) [B, D_t] fp32   (cls_embed_loss inputs)

Backward, upstream g_mim, g_map (scalars, read on device: no host sync), g_as [B, N], g_cls [B, D_s]:

    gR      = 2·g_mim·r                 recomputed tile by tile, written once ([rows, D_t], s's dtype)
    dS_m    = gR_m W                    cuBLAS (identity W: dS_m = gR_m)
    dW      = gRᵀ S,  db = Σ_m gR_m      cuBLAS / per-tile column partials summed in torch
    γ_m     = −2·g_map·(a_t[m] − a_s[m]) + g_as[m]
    dS_m   += γ_m (ĉ_s − a_s[m] ŝ_m) / ‖s_m‖
    dS_cls += Σ_n γ_n (ŝ_n − a_s[n] ĉ_s) / ‖c_s‖ + (g_cls − (g_cls·ĉ_s) ĉ_s) / ‖c_s‖

gR and dS live on s's row grid (``_utils.row_layout``), so a patch view x[:, P:] or a prefix-carrying
token tensor needs no copy and prefix / gap rows of gR are zero (they then drop out of dW = gRᵀ S).
dW accumulates over all B·N rows: done by cuBLAS on gR rather than in-kernel, because a per-tile
[D_t, D_s] partial buffer (or atomics) would cost more than the gR round trip.

Bytes (e = element size of s / t; M = B·N; map/CLS side buffers are O(M·16 + B·D) bytes):
    forward   reads M·D_s·e + M·D_t·e (+ D_t·D_s·e_W), writes O(M·16) — s and t exactly once.
    backward  gR kernel: reads s, t, writes gR (M·D_t·e); dS GEMM: reads gR, W, writes dS (M·D_s·e);
              dW GEMM: reads gR, s; map kernel: reads s, reads+writes dS (M·D_s·e each).
Flops: forward 2·M·D_s·D_t (the projection GEMM, fp32 accumulation); backward 3× that (recompute,
dS, dW). fp32 tokens use exact fp32 ``tl.dot`` (no TF32); bf16 tokens use tensor cores (W is rounded
to bf16 first, as autocast does).
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from ._utils import (
    INTERPRET,
    Cfg,
    as_rows,
    cast_rtne,
    check_device,
    check_float,
    check_unit_stride,
    dot_precision,
    empty_rows_like,
    fail,
    row_layout,
)

# ---------------------------------------------------------------------------------------- constants
EPS = tl.constexpr(1e-12)  # F.normalize's eps: norm(x) = x / max(‖x‖, EPS)
# Shipped configs, by size class (``_size_name``): "small" when both widths are <= 128 channels, else
# "large" (16-bit tokens, tensor cores) or "large_fp32" (fp32 tokens: exact fp32 FMA dot, smaller tiles).
# forward: one program per BLOCK_M patch rows, looping over D_t (BLOCK_N) and D_s (BLOCK_K)
FWD_CONFIGS = {
    "small": Cfg(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=8, num_stages=2),
    "large": Cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3),
    "large_fp32": Cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=2),
}
# backward gR recompute: program per (BLOCK_M rows, BLOCK_N teacher channels), loop over D_s
BWD_CONFIGS = {
    "small": Cfg(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2),
    "large": Cfg(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
    "large_fp32": Cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2),
}
# backward map/CLS: program per (sample, BLOCK_K student channels), loop over patches in BLOCK_M rows
MAP_BWD_CONFIGS = {
    "small": Cfg(BLOCK_M=16, BLOCK_N=1, BLOCK_K=32, num_warps=4, num_stages=1),
    "large": Cfg(BLOCK_M=32, BLOCK_N=1, BLOCK_K=128, num_warps=4, num_stages=1),
    "large_fp32": Cfg(BLOCK_M=32, BLOCK_N=1, BLOCK_K=128, num_warps=4, num_stages=1),
}


def _size_name(d_s: int, d_t: int, dtype) -> str:
    if max(d_s, d_t) <= 128:
        return "small"
    return "large_fp32" if dtype in (torch.float32, "fp32") else "large"


def pick_config(table: dict, d_s: int, d_t: int, dtype) -> Cfg:
    """The shipped config of ``table`` for these widths and token dtype."""
    return table[_size_name(d_s, d_t, dtype)]


# ------------------------------------------------------------------------------------------ kernels
@triton.jit
def _token_kd_fwd_kernel(
    s_ptr,  # [B, P_S+N, D_S] student tokens (channel stride 1)
    t_ptr,  # [B, P_T+N, D_T] teacher tokens (channel stride 1)
    w_ptr,  # [D_T, D_S] projection weight (channel stride 1); read only if HAS_W
    b_ptr,  # [D_T] projection bias; read only if HAS_BIAS
    mim_part_ptr,  # [cdiv(M, BLOCK_M)] fp32 out: Σ r² over this program's rows
    map_part_ptr,  # [cdiv(M, BLOCK_M)] fp32 out: Σ (a_t − a_s)² over this program's rows (if HAS_T)
    as_ptr,  # [M] fp32 out: a_s, the student CLS–patch map ([B, N] row-major)
    stats_ptr,  # [3, M] fp32 out: a_t (0 without teacher), 1/‖s_m‖, 1/‖c_s‖ per patch row
    scls_ptr,  # [B, D_S] fp32 out: norm(student CLS)
    tcls_ptr,  # [B, D_T] fp32 out: norm(teacher CLS) (if HAS_T)
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    MIMIC: tl.constexpr,
    CLS_MAP: tl.constexpr,
    HAS_T: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
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
    s_dtype = s_ptr.dtype.element_ty

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
    if HAS_T:
        for j0 in range(0, D_T, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)
            j_ok = j < D_T
            mj = row_ok[:, None] & j_ok[None, :]
            y = tl.load(t_row[:, None] + j[None, :], mask=mj, other=0.0).to(tl.float32)
            if MIMIC:
                if HAS_W:
                    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
                    for k0 in range(0, D_S, BLOCK_K):
                        k = k0 + tl.arange(0, BLOCK_K)
                        k_ok = k < D_S
                        x = tl.load(
                            s_row[:, None] + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
                        )
                        w = tl.load(
                            w_ptr + j[None, :] * stride_w + k[:, None],
                            mask=k_ok[:, None] & j_ok[None, :],
                            other=0.0,
                        )  # [BLOCK_K, BLOCK_N] = Wᵀ
                        w = cast_rtne(w, s_dtype)
                        if DOT_FP32:
                            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision=PRECISION)
                        else:
                            acc = tl.dot(x, w, acc, input_precision=PRECISION)
                else:
                    acc = tl.load(s_row[:, None] + j[None, :], mask=mj, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    acc += tl.load(b_ptr + j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
                r = tl.where(mj, acc - y, 0.0)
                sq += tl.sum(r * r, 1)
            if CLS_MAP:
                c = tl.load(t_cls[:, None] + j[None, :], mask=mj, other=0.0).to(tl.float32)
                tt += tl.sum(y * y, 1)
                tc += tl.sum(y * c, 1)
                ct += tl.sum(c * c, 1)

    if MIMIC:
        tl.store(mim_part_ptr + pid, tl.sum(sq, 0))
    if CLS_MAP:
        inv_s = 1.0 / tl.maximum(tl.sqrt(ss), EPS)
        inv_cs = 1.0 / tl.maximum(tl.sqrt(cc), EPS)
        a_s = sc * inv_s * inv_cs
        if HAS_T:
            inv_t = 1.0 / tl.maximum(tl.sqrt(tt), EPS)
            inv_ct = 1.0 / tl.maximum(tl.sqrt(ct), EPS)
            a_t = tc * inv_t * inv_ct
            d = tl.where(row_ok, a_t - a_s, 0.0)
            tl.store(map_part_ptr + pid, tl.sum(d * d, 0))
        else:
            a_t = tl.zeros((BLOCK_M,), tl.float32)
        tl.store(as_ptr + rows, a_s, mask=row_ok)
        tl.store(stats_ptr + rows, a_t, mask=row_ok)
        tl.store(stats_ptr + M + rows, inv_s, mask=row_ok)
        tl.store(stats_ptr + 2 * M + rows, inv_cs, mask=row_ok)
        # the CLS-embedding inputs, written by the program holding patch 0 of each sample
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


@triton.jit
def _token_kd_bwd_kernel(
    s_ptr,  # [B, P_S+N, D_S] student tokens (channel stride 1)
    t_ptr,  # [B, P_T+N, D_T] teacher tokens (channel stride 1)
    w_ptr,  # [D_T, D_S] projection weight; read only if HAS_W
    b_ptr,  # [D_T] projection bias; read only if HAS_BIAS
    g_ptr,  # [] fp32 upstream gradient of the mimic sum
    gr_ptr,  # [B, P_S+N, D_T] out (row stride stride_gn): gR = 2·g·r on patch rows
    db_part_ptr,  # [cdiv(M, BLOCK_M), D_T] fp32 out: Σ_rows gR of this row tile; written if HAS_BIAS
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
    stride_gb,
    stride_gn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    bidx = (rows // N).to(tl.int64)
    n = rows % N
    s_row = s_ptr + bidx * stride_sb + (P_S + n) * stride_sn
    t_row = t_ptr + bidx * stride_tb + (P_T + n) * stride_tn
    g_row = gr_ptr + bidx * stride_gb + (P_S + n) * stride_gn
    s_dtype = s_ptr.dtype.element_ty

    j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j_ok = j < D_T
    mj = row_ok[:, None] & j_ok[None, :]
    if HAS_W:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, D_S, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < D_S
            x = tl.load(s_row[:, None] + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(
                w_ptr + j[None, :] * stride_w + k[:, None], mask=k_ok[:, None] & j_ok[None, :], other=0.0
            )
            w = cast_rtne(w, s_dtype)
            if DOT_FP32:
                acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision=PRECISION)
            else:
                acc = tl.dot(x, w, acc, input_precision=PRECISION)
    else:
        acc = tl.load(s_row[:, None] + j[None, :], mask=mj, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    y = tl.load(t_row[:, None] + j[None, :], mask=mj, other=0.0).to(tl.float32)
    g = 2.0 * tl.load(g_ptr).to(tl.float32)
    gr = tl.where(mj, acc - y, 0.0) * g
    tl.store(g_row[:, None] + j[None, :], cast_rtne(gr, gr_ptr.dtype.element_ty), mask=mj)
    if HAS_BIAS:
        tl.store(db_part_ptr + pid_m * D_T + j, tl.sum(gr, 0), mask=j_ok)


@triton.jit
def _token_kd_map_bwd_kernel(
    s_ptr,  # [B, P_S+N, D_S] student tokens (channel stride 1)
    as_ptr,  # [M] fp32: a_s (from the forward)
    stats_ptr,  # [3, M] fp32: a_t, 1/‖s_m‖, 1/‖c_s‖ (from the forward)
    scls_ptr,  # [B, D_S] fp32: norm(student CLS) (from the forward)
    g_ptr,  # [] fp32 upstream gradient of the map sum; read only if HAS_T
    gas_ptr,  # [M] fp32 upstream gradient of a_s; read only if HAS_GAS
    gcls_ptr,  # [B, D_S] upstream gradient of s_cls (row stride stride_gc); read only if HAS_GCLS
    ds_ptr,  # [B, P_S+N, D_S] out: dS (channel stride 1); += if ACCUMULATE else =
    M,
    N,
    D_S,
    P_S,
    stride_sb,
    stride_sn,
    stride_db,
    stride_dn,
    stride_gc,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_T: tl.constexpr,
    HAS_GAS: tl.constexpr,
    HAS_GCLS: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < D_S
    if HAS_T:
        g2 = -2.0 * tl.load(g_ptr).to(tl.float32)
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
        dptr = ds_ptr + b * stride_db + (P_S + n)[:, None] * stride_dn + k[None, :]
        if ACCUMULATE:
            grad += tl.load(dptr, mask=m2, other=0.0).to(tl.float32)
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
    dptr = ds_ptr + b * stride_db + k
    if ACCUMULATE:
        dc += tl.load(dptr, mask=k_ok, other=0.0).to(tl.float32)
    tl.store(dptr, cast_rtne(dc, out_dtype), mask=k_ok)


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


def _fwd_outputs(s, t, N, cls_map):
    """(mim_sum, map_sum, a_s, s_cls, t_cls, stats) buffers; unused ones are empty."""
    B, _, D_s = s.shape
    new = lambda *shape: s.new_empty(shape, dtype=torch.float32)
    if not cls_map:
        return new(), new(), new(0), new(0), new(0), new(0)
    return (
        new(),
        new(),
        new(B, N),
        new(B, D_s),
        (new(B, t.shape[2]) if t is not None else new(0)),
        new(3, B * N),
    )


def token_kd_forward(
    s,
    t,
    weight=None,
    bias=None,
    num_prefix_s=1,
    num_prefix_t=1,
    mimic=True,
    cls_map=True,
    config: Cfg | None = None,
):
    """Launch the forward kernel. Returns (mimic_sum [], map_sum [], a_s [B, N], s_cls, t_cls, stats).

    Semantics in the module docstring; ``t`` may be None for the student map alone (cls_map=True,
    mimic=False; map_sum is then 0). Unused outputs are empty tensors. ``config`` overrides the
    shipped config (tests).
    """
    B, N, D_s, D_t = _check(s, t, weight, bias, num_prefix_s, num_prefix_t, mimic, cls_map)
    M = B * N
    cfg = config or pick_config(FWD_CONFIGS, D_s, D_t, s.dtype)
    grid = (triton.cdiv(M, cfg.BLOCK_M),)
    _, _, a_s, s_cls, t_cls, stats = _fwd_outputs(s, t, N, cls_map)
    mim_part = torch.zeros(grid[0], device=s.device, dtype=torch.float32)
    map_part = torch.zeros(grid[0], device=s.device, dtype=torch.float32)
    has_t = t is not None
    has_w = mimic and weight is not None
    has_b = mimic and bias is not None
    tt = t if has_t else s
    w = weight if has_w else s
    bb = bias.reshape(-1) if has_b else s
    _token_kd_fwd_kernel[grid](
        s,
        tt,
        w,
        bb,
        mim_part,
        map_part,
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
        BLOCK_M=cfg.BLOCK_M,
        BLOCK_N=cfg.BLOCK_N,
        BLOCK_K=cfg.BLOCK_K,
        HAS_W=has_w,
        HAS_BIAS=has_b,
        MIMIC=mimic,
        CLS_MAP=cls_map,
        HAS_T=has_t,
        DOT_FP32=INTERPRET,
        PRECISION=dot_precision(s),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return mim_part.sum(), map_part.sum(), a_s, s_cls, t_cls, stats


def _ds_layout(s):
    """s itself if it lies on a uniform row grid (no copy), else a contiguous copy."""
    return s if row_layout(s)[0] else s.contiguous()


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
    config: Cfg | None = None,
    map_config: Cfg | None = None,
):
    """Gradients (dS, dW, db) of ``token_kd_forward``; dW / db are empty when not needed.

    g_mim, g_map: 0-d upstream gradients (stay on device); g_as [B, N] / g_cls [B, D_s]: upstream
    gradients of a_s / s_cls, or None. dS has s's dtype and the row-grid strides of ``row_layout(s)``.
    """
    B, N, D_s, D_t = _check(s, t, weight, bias, num_prefix_s, num_prefix_t, mimic, cls_map)
    M = B * N
    s = _ds_layout(s)
    tp, rows = row_layout(s)
    dw, db = s.new_empty(0, dtype=torch.float32), s.new_empty(0, dtype=torch.float32)  # distinct: no aliasing
    if mimic:
        has_w = weight is not None
        has_b = bias is not None
        cfg = config or pick_config(BWD_CONFIGS, D_s, D_t, s.dtype)
        # gR lives on s's row grid, in s's dtype; rows that are not patch tokens (prefix, gaps) are zero
        gr, gr_rows = empty_rows_like(s, D_t, s.dtype)
        if num_prefix_s:
            gr[:, :num_prefix_s].zero_()
        if tp > s.shape[1]:
            gr_rows[: (B - 1) * tp].view(B - 1, tp, D_t)[:, s.shape[1] :].zero_()
        grid = (triton.cdiv(M, cfg.BLOCK_M), triton.cdiv(D_t, cfg.BLOCK_N))
        db_part = s.new_empty((grid[0] if has_b else 0, D_t), dtype=torch.float32)
        w = weight if has_w else s
        bb = bias.reshape(-1) if has_b else s
        _token_kd_bwd_kernel[grid](
            s,
            t,
            w,
            bb,
            g_mim.reshape(()).float(),
            gr,
            db_part,
            M,
            N,
            D_s,
            D_t,
            num_prefix_s,
            num_prefix_t,
            s.stride(0),
            s.stride(1),
            t.stride(0),
            t.stride(1),
            w.stride(0) if has_w else 0,
            gr.stride(0),
            gr.stride(1),
            BLOCK_M=cfg.BLOCK_M,
            BLOCK_N=cfg.BLOCK_N,
            BLOCK_K=cfg.BLOCK_K,
            HAS_W=has_w,
            HAS_BIAS=has_b,
            DOT_FP32=INTERPRET,
            PRECISION=dot_precision(s),
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
        if has_w:
            ds, ds_rows = empty_rows_like(s, D_s, s.dtype)
            torch.mm(gr_rows, weight.to(s.dtype), out=ds_rows)  # dS = gR W  [rows, D_s]
            if need_dw:
                dw = torch.mm(gr_rows.t(), as_rows(s, tp, rows)).to(weight.dtype)  # dW = gRᵀ S
        else:
            ds = gr  # identity: dS = gR
        if has_b and need_db:
            db = db_part.sum(0).to(bias.dtype).reshape(bias.shape)
    else:
        ds, _ = empty_rows_like(s, D_s, s.dtype)
        if num_prefix_s > 1:
            ds[:, 1:num_prefix_s].zero_()
    if cls_map:
        mcfg = map_config or pick_config(MAP_BWD_CONFIGS, D_s, D_t, s.dtype)
        has_gcls = g_cls is not None
        gc = g_cls if has_gcls else s_cls
        if gc.stride(-1) != 1:
            gc = gc.contiguous()
        gas = g_as.contiguous() if g_as is not None else a_s
        grid = (B, triton.cdiv(D_s, mcfg.BLOCK_K))
        _token_kd_map_bwd_kernel[grid](
            s,
            a_s,
            stats,
            s_cls,
            g_map.reshape(()).float(),
            gas,
            gc,
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
            BLOCK_M=mcfg.BLOCK_M,
            BLOCK_K=mcfg.BLOCK_K,
            HAS_T=t is not None,
            HAS_GAS=g_as is not None,
            HAS_GCLS=has_gcls,
            ACCUMULATE=mimic,
            num_warps=mcfg.num_warps,
            num_stages=mcfg.num_stages,
        )
    return ds, dw, db


# -------------------------------------------------------------------------------- custom op / autograd
@torch.library.custom_op("fastkd::token_kd", mutates_args=())
def token_kd_op(
    s: torch.Tensor,
    t: Optional[torch.Tensor],  # noqa: UP045 (torch<2.7 schema inference needs typing.Optional)
    weight: Optional[torch.Tensor],  # noqa: UP045
    bias: Optional[torch.Tensor],  # noqa: UP045
    num_prefix_s: int,
    num_prefix_t: int,
    mimic: bool,
    cls_map: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mimic_sum, map_sum, a_s, s_cls, t_cls, stats); see ``token_kd_forward``."""
    return token_kd_forward(s, t, weight, bias, num_prefix_s, num_prefix_t, mimic, cls_map)


@token_kd_op.register_fake
def _(s, t, weight, bias, num_prefix_s, num_prefix_t, mimic, cls_map):
    _, N, _, _ = _check(s, t, weight, bias, num_prefix_s, num_prefix_t, mimic, cls_map)
    return _fwd_outputs(s, t, N, cls_map)


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
):
    s = _ds_layout(s)
    ds, _ = empty_rows_like(s, s.shape[2], s.dtype)
    empty = s.new_empty(0, dtype=torch.float32)
    dw = weight.new_empty(weight.shape) if (mimic and need_dw and weight is not None) else empty
    db = bias.new_empty(bias.shape) if (mimic and need_db and bias is not None) else empty.clone()
    return ds, dw, db


def _setup_context(ctx, inputs, output):
    s, t, weight, bias, num_prefix_s, num_prefix_t, mimic, cls_map = inputs
    _, _, a_s, s_cls, _, stats = output
    ctx.save_for_backward(s, t, weight, bias, a_s, stats, s_cls)
    ctx.args = (num_prefix_s, num_prefix_t, mimic, cls_map)


def _backward(ctx, g_mim, g_map, g_as, g_scls, g_tcls, g_stats):
    s, t, weight, bias, a_s, stats, s_cls = ctx.saved_tensors
    num_prefix_s, num_prefix_t, mimic, cls_map = ctx.args
    need_s, _, need_w, need_b = ctx.needs_input_grad[:4]
    need_w = bool(need_w and mimic and weight is not None)
    need_b = bool(need_b and mimic and bias is not None)
    if not (need_s or need_w or need_b):
        return None, None, None, None, None, None, None, None
    zero = s.new_zeros((), dtype=torch.float32)
    ds, dw, db = token_kd_backward_op(
        zero if g_mim is None else g_mim,
        zero if g_map is None else g_map,
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
    )
    return (
        (ds if need_s else None),
        None,
        (dw if need_w else None),
        (db if need_b else None),
        None,
        None,
        None,
        None,
    )


token_kd_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------ compile-check specs
def compile_specs():
    """Every shipped (kernel, config, dtype, flags) variant as (name, fn, pointers, scalars, constexprs, cfg).

    ``scalars`` holds representative runtime values: DeiT-S shapes (B=256, N=196, P=1, D_s=384, D_t=768,
    contiguous tokens) for the "large" configs, a small ViT (B=64, N=16, D_s=64, D_t=128) for "small".
    The compile check specializes them as the JIT does (1 → constant, multiples of 16 → divisibility
    hint), builds each variant for sm_80 and sm_90a and requires no local memory / stack (no spills).
    """
    specs = []
    fwd_variants = [  # (token dtype, weight dtype, HAS_W, HAS_BIAS, MIMIC, CLS_MAP, HAS_T)
        ("bf16", "fp32", True, True, True, True, True),
        ("bf16", "fp32", True, True, True, False, True),
        ("bf16", "fp32", False, False, False, True, True),
        ("bf16", "fp32", False, False, False, True, False),
        ("bf16", "bf16", False, True, True, True, True),
        ("fp32", "fp32", True, True, True, True, True),
        ("fp32", "fp32", True, True, True, False, True),
        ("fp32", "fp32", False, False, False, True, True),
        ("fp32", "fp32", False, False, False, True, False),
    ]
    bwd_variants = [
        ("bf16", "fp32", True, True),
        ("bf16", "bf16", False, True),
        ("fp32", "fp32", True, True),
        ("fp32", "fp32", False, True),
    ]

    def shapes(cname):
        return (64, 16, 1, 64, 128) if cname == "small" else (256, 196, 1, 384, 768)

    def dtypes_of(cname):
        return {"small": ("bf16", "fp32"), "large": ("bf16",), "large_fp32": ("fp32",)}[cname]

    for cname, cfg in FWD_CONFIGS.items():
        B, N, P, D_s, D_t = shapes(cname)
        T = P + N
        for dt, wdt, has_w, has_b, mimic, cls_map, has_t in fwd_variants:
            if dt not in dtypes_of(cname):
                continue
            ptrs = {
                "s_ptr": dt,
                "t_ptr": dt,
                "w_ptr": wdt,
                "b_ptr": wdt,
                "mim_part_ptr": "fp32",
                "map_part_ptr": "fp32",
                "as_ptr": "fp32",
                "stats_ptr": "fp32",
                "scls_ptr": "fp32",
                "tcls_ptr": "fp32",
            }
            scalars = dict(
                M=B * N,
                N=N,
                D_S=D_s,
                D_T=D_t,
                P_S=P,
                P_T=P,
                stride_sb=T * D_s,
                stride_sn=D_s,
                stride_tb=T * D_t,
                stride_tn=D_t,
                stride_w=D_s,
            )
            const = dict(
                BLOCK_M=cfg.BLOCK_M,
                BLOCK_N=cfg.BLOCK_N,
                BLOCK_K=cfg.BLOCK_K,
                HAS_W=has_w,
                HAS_BIAS=has_b,
                MIMIC=mimic,
                CLS_MAP=cls_map,
                HAS_T=has_t,
                DOT_FP32=False,
                PRECISION="ieee" if dt == "fp32" else "tf32",
            )
            tag = f"fwd/{cname}/{dt}/w{int(has_w)}b{int(has_b)}/mim{int(mimic)}map{int(cls_map)}t{int(has_t)}"
            specs.append((tag, _token_kd_fwd_kernel, ptrs, scalars, const, cfg))
    for cname, cfg in BWD_CONFIGS.items():
        B, N, P, D_s, D_t = shapes(cname)
        T = P + N
        for dt, wdt, has_w, has_b in bwd_variants:
            if dt not in dtypes_of(cname):
                continue
            ptrs = {
                "s_ptr": dt,
                "t_ptr": dt,
                "w_ptr": wdt,
                "b_ptr": wdt,
                "g_ptr": "fp32",
                "gr_ptr": dt,
                "db_part_ptr": "fp32",
            }
            scalars = dict(
                M=B * N,
                N=N,
                D_S=D_s,
                D_T=D_t,
                P_S=P,
                P_T=P,
                stride_sb=T * D_s,
                stride_sn=D_s,
                stride_tb=T * D_t,
                stride_tn=D_t,
                stride_w=D_s,
                stride_gb=T * D_t,
                stride_gn=D_t,
            )
            const = dict(
                BLOCK_M=cfg.BLOCK_M,
                BLOCK_N=cfg.BLOCK_N,
                BLOCK_K=cfg.BLOCK_K,
                HAS_W=has_w,
                HAS_BIAS=has_b,
                DOT_FP32=False,
                PRECISION="ieee" if dt == "fp32" else "tf32",
            )
            specs.append(
                (
                    f"bwd/{cname}/{dt}/w{int(has_w)}b{int(has_b)}",
                    _token_kd_bwd_kernel,
                    ptrs,
                    scalars,
                    const,
                    cfg,
                )
            )
    for cname, cfg in MAP_BWD_CONFIGS.items():
        B, N, P, D_s, _ = shapes(cname)
        T = P + N
        for dt in dtypes_of(cname):
            for has_t, acc in ((True, True), (True, False), (False, False)):
                ptrs = {
                    "s_ptr": dt,
                    "as_ptr": "fp32",
                    "stats_ptr": "fp32",
                    "scls_ptr": "fp32",
                    "g_ptr": "fp32",
                    "gas_ptr": "fp32",
                    "gcls_ptr": "fp32",
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
                )
                const = dict(
                    BLOCK_M=cfg.BLOCK_M,
                    BLOCK_K=cfg.BLOCK_K,
                    HAS_T=has_t,
                    HAS_GAS=True,
                    HAS_GCLS=True,
                    ACCUMULATE=acc,
                )
                specs.append(
                    (
                        f"map_bwd/{cname}/{dt}/t{int(has_t)}acc{int(acc)}",
                        _token_kd_map_bwd_kernel,
                        ptrs,
                        scalars,
                        const,
                        cfg,
                    )
                )
    return specs


__all__ = ["token_kd_op", "token_kd_forward", "token_kd_backward", "compile_specs"]
