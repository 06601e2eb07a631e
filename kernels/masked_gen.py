"""Fused ViTKD masked generation: the generator input, and the masked squared error with its gradient.

With s [B, N, D_s] the student's last-block patch tokens (after the final norm), mask [B, N] bool
(True = masked), W [D_t, D_s], b [D_t] (None = identity / 0), τ the mask token [D_t] and rows
m = b·N + n (n row-major over the h×w grid):

    gen_input:  x[b, :, n] = τ                 if mask[b, n]
                           = W s[b, n] + b      otherwise          → x [B, D_t, h, w], channels_last
    (the conv generator G = Conv3×3 → ReLU → Conv3×3 runs in torch / cuDNN on x)
    gen_loss:   L  = scale · Σ_{b, n masked, d} (G[b, d, n] − t[b, n, d])²
                dG = 2·scale·mask·(G − t)   written by the same kernel, in G's memory layout;
                     the backward only multiplies it by the upstream scalar.

x is laid out channels_last, i.e. physically [B, N, D_t] — the same layout as the token rows, so the
input kernel is a plain row GEMM, cuDNN runs the convolutions in its fast NHWC path, and G (also
channels_last) and t are read with the same coalesced row pattern.

Only the unmasked rows are projected: the launcher orders the B·N rows kept-first (one stable
argsort of the flattened mask, on device, no host sync), so with λ = 0.5 about half of the row tiles
hold only masked rows; they skip the GEMM and the loads of s and write the mask token (the kept count
per image, ⌊N(1−λ)⌋, is static, but the kernel needs no count: each tile tests its own rows, so any
mask is handled exactly).

gen_input backward, upstream dX [B, D_t, h, w] (any layout):
    gX = (1 − mask)·dX written once, compact [M, D_t]; dS = gX W, dW = gXᵀ S (cuBLAS);
    db = Σ_{unmasked} dX, dτ = Σ_{masked} dX (per-tile column partials, summed in torch).

Precision (``amp`` = bf16 autocast at the op boundary, decided by the caller; ``_utils.dot_bf16``):
under autocast, or with bf16 tokens, the projection runs on bf16 tensor cores (s, fp32 or bf16 with
any row stride, rounded to bf16 in registers; W rounded once per call) with fp32 accumulation, and
the backward's dS / dW are cuBLAS bf16 GEMMs on a bf16 gX (and on s rounded to bf16 — written by the
backward kernel as a by-product when s is fp32 or strided). Never an fp32 SIMT GEMM under autocast.
Autocast off with fp32 tokens: exact fp32 (``exact`` variants).

Bytes (M = B·N, e = element size): gen_input fwd reads s (M·D_s·e) + W, writes x (M·D_t·e); bwd reads
dX, writes gX (M·D_t·e each), GEMMs read gX twice + s, write dS. gen_loss reads G and t, writes dG
(M·D_t·e each). Flops: gen_input 2·M·D_s·D_t (fwd), 4·M·D_s·D_t (bwd); gen_loss O(M·D_t).
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from ._utils import (
    INTERPRET,
    Cfg,
    autotune,
    cast_rtne,
    check_device,
    check_float,
    check_unit_stride,
    dot_bf16,
    fail,
    gemm_to,
    grouped_pid,
    launch,
    mma,
    next_pow2,
    resolve_amp,
)

# ---------------------------------------------------------------------------------------- constants
# gen_input forward (row GEMM + epilogue), autotuned per (M, D_s, D_t, dtypes, precision): program per
# (BLOCK_M kept-first rows, BLOCK_N channels), loop over D_s. Tensor-core configs (bf16 dot) and
# ``exact`` configs (fp32 "ieee" dot, autocast off only); the first fitting one is the interpreter's.
INPUT_TC_CONFIGS = [
    Cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3),  # (BLOCK_K 64 spills on sm_80)
    Cfg(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
    Cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
]
INPUT_EXACT_CONFIGS = [
    Cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2),
    Cfg(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2),
]
INPUT_FWD_CONFIGS = INPUT_TC_CONFIGS + INPUT_EXACT_CONFIGS
# elementwise kernels (gen_input backward, gen_loss): program per (BLOCK_M rows, BLOCK_N channels)
ELEMENTWISE_CONFIGS = {
    "small": Cfg(BLOCK_M=32, BLOCK_N=32, BLOCK_K=1, num_warps=4, num_stages=1),
    "large": Cfg(BLOCK_M=32, BLOCK_N=128, BLOCK_K=1, num_warps=4, num_stages=1),
}


def pick_config(table: dict, dtype, *widths: int) -> Cfg:
    """The shipped elementwise config for these channel widths."""
    return table["small" if max(widths) <= 128 else "large"]


def valid_input_configs(d_s: int, d_t: int, bf16_dot: bool, gemm: bool = True) -> list[Cfg]:
    """The gen_input configs the autotuner tries for one call (see token_kd.valid_configs)."""
    cfgs = INPUT_TC_CONFIGS if (bf16_dot or not gemm) else INPUT_EXACT_CONFIGS
    ok = [c for c in cfgs if c.BLOCK_N <= max(32, next_pow2(d_t)) and c.BLOCK_K <= max(32, next_pow2(d_s))]
    ok = ok or [min(cfgs, key=lambda c: c.BLOCK_N * c.BLOCK_K)]
    return ok if gemm else ok[:1]


def _prune_input(configs, nargs, **kw):
    keep = set(valid_input_configs(nargs["D_S"], nargs["D_T"], bool(kw["DOT_BF16"]), bool(kw["HAS_W"])))
    return [
        c
        for c in configs
        if Cfg(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
        in keep
    ]


# ------------------------------------------------------------------------------------------ kernels
@autotune(INPUT_FWD_CONFIGS, key=["M", "D_S", "D_T", "HAS_W", "DOT_BF16"], prune=_prune_input)
@triton.jit
def _gen_input_fwd_kernel(
    s_ptr,  # [B, N, D_S] student tokens, fp32 or bf16 (channel stride 1, any row / sample stride)
    mask_ptr,  # [B, N] uint8 (1 = masked)
    order_ptr,  # [M] int: row m = b·N + n of each kept-first position (stable argsort of the flat mask)
    w_ptr,  # [D_T, D_S] projection weight (channel stride 1; bf16 for a bf16 dot); read only if HAS_W
    b_ptr,  # [D_T] bias; read only if HAS_BIAS
    tok_ptr,  # [D_T] mask token
    x_ptr,  # [B, D_T, h, w] out; element (b, d, n) at b·stride_xb + d·stride_xd + n·stride_xn
    M,
    N,
    D_S,
    D_T,
    stride_sb,
    stride_sn,
    stride_mb,
    stride_mn,
    stride_w,
    stride_xb,
    stride_xd,
    stride_xn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_BF16: tl.constexpr,
    UPCAST: tl.constexpr,
):
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(D_T, BLOCK_N)
    pid_m, pid_n = grouped_pid(tl.program_id(0), num_m, num_n, 8)
    pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = pos < M
    rows = tl.load(order_ptr + pos, mask=row_ok, other=0)  # [BLOCK_M] row ids m
    bidx = (rows // N).to(tl.int64)
    n = rows % N
    masked = tl.load(mask_ptr + bidx * stride_mb + n * stride_mn, mask=row_ok, other=1) != 0
    s_row = s_ptr + bidx * stride_sb + n * stride_sn
    j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j_ok = j < D_T
    mj = row_ok[:, None] & j_ok[None, :]
    tok = tl.load(tok_ptr + j, mask=j_ok, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32) + tok[None, :]
    keep = row_ok & (masked == 0)
    if tl.max(keep.to(tl.int32), 0) > 0:  # a tile of masked rows only: no loads of s, no GEMM
        if HAS_W:
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for k0 in range(0, D_S, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                k_ok = k < D_S
                x = tl.load(s_row[:, None] + k[None, :], mask=keep[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(
                    w_ptr + j[None, :] * stride_w + k[:, None], mask=k_ok[:, None] & j_ok[None, :], other=0.0
                )  # [BLOCK_K, BLOCK_N] = Wᵀ
                acc = mma(acc, x, w, DOT_BF16, UPCAST)
        else:
            acc = tl.load(s_row[:, None] + j[None, :], mask=keep[:, None] & j_ok[None, :], other=0.0).to(
                tl.float32
            )
        if HAS_BIAS:
            acc += tl.load(b_ptr + j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
        acc = tl.where(masked[:, None], tok[None, :], acc)
    x_out = x_ptr + bidx[:, None] * stride_xb + j[None, :] * stride_xd + n[:, None] * stride_xn
    tl.store(x_out, cast_rtne(acc, x_ptr.dtype.element_ty), mask=mj)


@triton.jit
def _gen_input_bwd_kernel(
    dx_ptr,  # [B, D_T, h, w] upstream gradient (any strides)
    mask_ptr,  # [B, N] uint8 (1 = masked)
    s_ptr,  # [B, N, D_S] student tokens (channel stride 1); read only if WRITE_SB
    gx_ptr,  # [M, D_T] out, compact: (1 − mask)·dX in the GEMM dtype
    sb_ptr,  # [M, D_S] out, compact: s in the GEMM dtype; written by column-tile 0 if WRITE_SB
    db_part_ptr,  # [cdiv(M, BLOCK_M), D_T] fp32 out: Σ over this tile's unmasked rows of dX
    dtok_part_ptr,  # [cdiv(M, BLOCK_M), D_T] fp32 out: Σ over this tile's masked rows of dX
    M,
    N,
    D_S,
    D_T,
    W_GRID,
    stride_db,
    stride_dd,
    stride_dh,
    stride_dw,
    stride_mb,
    stride_mn,
    stride_sb,
    stride_sn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WRITE_SB: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    bidx = (rows // N).to(tl.int64)
    n = rows % N
    j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j_ok = j < D_T
    mj = row_ok[:, None] & j_ok[None, :]
    d_in = (
        dx_ptr
        + bidx[:, None] * stride_db
        + j[None, :] * stride_dd
        + ((n // W_GRID) * stride_dh + (n % W_GRID) * stride_dw)[:, None]
    )
    g = tl.load(d_in, mask=mj, other=0.0).to(tl.float32)
    masked = tl.load(mask_ptr + bidx * stride_mb + n * stride_mn, mask=row_ok, other=0) != 0
    keep = tl.where(masked[:, None], 0.0, g)
    tl.store(
        gx_ptr + rows.to(tl.int64)[:, None] * D_T + j[None, :],
        cast_rtne(keep, gx_ptr.dtype.element_ty),
        mask=mj,
    )
    tl.store(db_part_ptr + pid_m * D_T + j, tl.sum(keep, 0), mask=j_ok)
    tl.store(dtok_part_ptr + pid_m * D_T + j, tl.sum(g - keep, 0), mask=j_ok)
    if WRITE_SB:
        if pid_n == 0:
            for k0 in range(0, D_S, BLOCK_N):
                k = k0 + tl.arange(0, BLOCK_N)
                mk = row_ok[:, None] & (k < D_S)[None, :]
                x = tl.load(s_ptr + bidx[:, None] * stride_sb + n[:, None] * stride_sn + k[None, :], mask=mk)
                tl.store(
                    sb_ptr + rows.to(tl.int64)[:, None] * D_S + k[None, :],
                    cast_rtne(x.to(tl.float32), sb_ptr.dtype.element_ty),
                    mask=mk,
                )


@triton.jit
def _gen_loss_fwd_kernel(
    g_ptr,  # [B, D_T, h, w] generator output (any strides)
    t_ptr,  # [B, N, D_T] teacher tokens (channel stride 1)
    mask_ptr,  # [B, N] uint8 (1 = masked)
    part_ptr,  # [cdiv(M, BLOCK_M) · cdiv(D_T, BLOCK_N)] fp32 out: Σ masked (G − t)² per program
    dg_ptr,  # [B, D_T, h, w] out: 2·scale·mask·(G − t), strides stride_o*; written if NEED_GRAD
    M,
    N,
    D_T,
    W_GRID,
    scale,
    stride_gb,
    stride_gd,
    stride_gh,
    stride_gw,
    stride_tb,
    stride_tn,
    stride_mb,
    stride_mn,
    stride_ob,
    stride_od,
    stride_oh,
    stride_ow,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NEED_GRAD: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    bidx = (rows // N).to(tl.int64)
    n = rows % N
    hh = n // W_GRID
    ww = n % W_GRID
    j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j_ok = j < D_T
    mj = row_ok[:, None] & j_ok[None, :]
    gen = tl.load(
        g_ptr
        + bidx[:, None] * stride_gb
        + j[None, :] * stride_gd
        + (hh * stride_gh + ww * stride_gw)[:, None],
        mask=mj,
        other=0.0,
    ).to(tl.float32)
    y = tl.load(t_ptr + bidx[:, None] * stride_tb + n[:, None] * stride_tn + j[None, :], mask=mj, other=0.0)
    masked = tl.load(mask_ptr + bidx * stride_mb + n * stride_mn, mask=row_ok, other=0) != 0
    diff = tl.where(mj & masked[:, None], gen - y.to(tl.float32), 0.0)
    tl.store(part_ptr + pid_m * tl.num_programs(1) + pid_n, tl.sum(tl.sum(diff * diff, 1), 0))
    if NEED_GRAD:
        out = (
            dg_ptr
            + bidx[:, None] * stride_ob
            + j[None, :] * stride_od
            + (hh * stride_oh + ww * stride_ow)[:, None]
        )
        tl.store(out, cast_rtne(2.0 * scale * diff, dg_ptr.dtype.element_ty), mask=mj)


# ---------------------------------------------------------------------------------------- launchers
_WHAT_IN = "fastkd gen_input kernel"
_WHAT_LOSS = "fastkd gen_loss kernel"


def _check_mask(what, mask, B, N, ref):
    if mask.dtype != torch.bool or tuple(mask.shape) != (B, N):
        fail(what, f"mask must be bool [B, N] = [{B}, {N}], got {mask.dtype} {tuple(mask.shape)}")
    if mask.device != ref.device:
        fail(what, f"mask is on {mask.device} but the inputs are on {ref.device}")


def _check_grid(what, N, h, w):
    if h * w != N or h < 1:
        fail(
            what,
            f"grid h×w = {h}×{w} = {h * w} cells but there are {N} tokens; pass grid=(h, w) with h·w = N",
        )


def _check_input(s, mask, weight, bias, mask_token, h, w):
    if s.dim() != 3:
        fail(_WHAT_IN, f"s must be 3-D [B, N, D_s] patch tokens, got shape {tuple(s.shape)}")
    B, N, D_s = s.shape
    D_t = mask_token.numel()
    for name, x in (("s", s), ("weight", weight), ("bias", bias), ("mask_token", mask_token)):
        check_float(_WHAT_IN, name, x)
    check_device(_WHAT_IN, s, weight=weight, bias=bias, mask_token=mask_token)
    _check_mask(_WHAT_IN, mask, B, N, s)
    _check_grid(_WHAT_IN, N, h, w)
    check_unit_stride(_WHAT_IN, "s", s)
    if weight is None:
        if D_s != D_t:
            fail(
                _WHAT_IN,
                f"student width {D_s} != teacher width {D_t} (mask_token size) and no projection "
                f"weight; pass a weight of shape [{D_t}, {D_s}]",
            )
    else:
        if tuple(weight.shape) != (D_t, D_s):
            fail(
                _WHAT_IN,
                f"weight must be [D_t, D_s] = [{D_t}, {D_s}] (nn.Linear layout), got {tuple(weight.shape)}",
            )
        check_unit_stride(_WHAT_IN, "weight", weight)
    if bias is not None and bias.numel() != D_t:
        fail(_WHAT_IN, f"bias must have D_t = {D_t} elements, got {bias.numel()}")
    return B, N, D_s, D_t


def _new_x(s, D_t, h, w, out_dtype):
    return torch.empty(
        (s.shape[0], D_t, h, w), device=s.device, dtype=out_dtype, memory_format=torch.channels_last
    )


def _gemm_weight(weight, bf16: bool):
    """W in the GEMM dtype: rounded to bf16 once per call for a bf16 dot (as autocast does)."""
    return weight.to(torch.bfloat16) if (bf16 and weight.dtype != torch.bfloat16) else weight


def gen_input_forward(
    s, mask, weight, bias, mask_token, h, w, out_dtype, amp: bool = False, config: Cfg | None = None
):
    """x [B, D_t, h, w] (channels_last, ``out_dtype``): projected tokens, the mask token at masked cells.

    ``amp``: bf16 autocast is on (bf16 tensor-core GEMM; else exact fp32 for fp32 tokens). ``config``
    forces one shipped config (tests); by default the kernel is autotuned."""
    B, N, D_s, D_t = _check_input(s, mask, weight, bias, mask_token, h, w)
    M = B * N
    x = _new_x(s, D_t, h, w, out_dtype)
    m8 = mask.view(torch.uint8)
    order = torch.argsort(m8.reshape(-1), stable=True)  # kept rows first, masked rows last (no sync)
    has_w, has_b = weight is not None, bias is not None
    bf16 = dot_bf16(amp, s, weight)
    wt = _gemm_weight(weight, bf16) if has_w else s
    bb = bias.reshape(-1) if has_b else s
    tok = mask_token.reshape(-1)
    launch(
        _gen_input_fwd_kernel,
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(D_t, meta["BLOCK_N"]),),
        (
            s,
            m8,
            order,
            wt,
            bb,
            tok,
            x,
            M,
            N,
            D_s,
            D_t,
            s.stride(0),
            s.stride(1),
            m8.stride(0),
            m8.stride(1),
            wt.stride(0) if has_w else 0,
            x.stride(0),
            x.stride(1),
            x.stride(3),
        ),
        dict(HAS_W=has_w, HAS_BIAS=has_b, DOT_BF16=bf16, UPCAST=INTERPRET),
        config,
    )
    return x


def _as_matrix(x):
    """x [B, N, D] as a [B·N, D] matrix view (no copy), or None when its strides do not allow one."""
    B, N, D = x.shape
    if x.stride(2) == 1 and (B == 1 or x.stride(0) == N * x.stride(1)) and (N == 1 or x.stride(1) >= D):
        return x.as_strided((B * N, D), (x.stride(1), 1))
    return None


def gen_input_backward(
    dx,
    s,
    mask,
    weight,
    bias,
    mask_token,
    h,
    w,
    need_dw,
    need_db,
    need_dtok,
    amp: bool = False,
    config: Cfg | None = None,
):
    """(dS, dW, db, dτ) of ``gen_input_forward`` for the upstream dX [B, D_t, h, w]; unneeded ones empty.

    dS is contiguous [B, N, D_s] in s's dtype. Under ``amp`` (or with bf16 tokens) gX, s and W enter
    cuBLAS in bf16; else exact fp32."""
    B, N, D_s, D_t = _check_input(s, mask, weight, bias, mask_token, h, w)
    if tuple(dx.shape) != (B, D_t, h, w):
        fail(_WHAT_IN, f"upstream gradient must be [B, D_t, h, w] = {(B, D_t, h, w)}, got {tuple(dx.shape)}")
    M = B * N
    has_w = weight is not None
    bf16 = dot_bf16(amp, s, weight)
    # the GEMM dtype; with no projection there is no GEMM and gX = dS keeps the promoted precision
    gdt = (torch.bfloat16 if bf16 else torch.float32) if has_w else torch.promote_types(dx.dtype, s.dtype)
    cfg = config or pick_config(ELEMENTWISE_CONFIGS, gdt, D_t)
    gx = s.new_empty((M, D_t), dtype=gdt)
    s_mat = _as_matrix(s) if (has_w and need_dw and s.dtype == gdt) else None
    write_sb = has_w and need_dw and s_mat is None
    sb = s.new_empty((M, D_s), dtype=gdt) if write_sb else gx
    grid = (triton.cdiv(M, cfg.BLOCK_M), triton.cdiv(D_t, cfg.BLOCK_N))
    db_part = torch.empty(grid[0], D_t, device=s.device, dtype=torch.float32)
    dtok_part = torch.empty(grid[0], D_t, device=s.device, dtype=torch.float32)
    m8 = mask.view(torch.uint8)
    _gen_input_bwd_kernel[grid](
        dx,
        m8,
        s,
        gx,
        sb,
        db_part,
        dtok_part,
        M,
        N,
        D_s,
        D_t,
        w,
        dx.stride(0),
        dx.stride(1),
        dx.stride(2),
        dx.stride(3),
        m8.stride(0),
        m8.stride(1),
        s.stride(0),
        s.stride(1),
        BLOCK_M=cfg.BLOCK_M,
        BLOCK_N=cfg.BLOCK_N,
        WRITE_SB=write_sb,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    empty = lambda: s.new_empty(0, dtype=torch.float32)  # a fresh one per output: outputs must not alias
    dw = empty()
    if has_w:
        wg = _gemm_weight(weight, bf16)
        ds = gemm_to(gx, wg, s.dtype)  # dS = gX W [M, D_s], cuBLAS, written in s's dtype (no cast pass)
        if need_dw:
            dw = gemm_to(gx.t(), s_mat if s_mat is not None else sb, weight.dtype)  # dW = gXᵀ S
    else:
        ds = gx
    ds = ds.view(B, N, D_s)
    if ds.dtype != s.dtype:
        ds = ds.to(s.dtype)
    db = db_part.sum(0).to(bias.dtype).reshape(bias.shape) if (bias is not None and need_db) else empty()
    dtok = dtok_part.sum(0).to(mask_token.dtype).reshape(mask_token.shape) if need_dtok else empty()
    return ds, dw, db, dtok


def _check_loss(g, t, mask):
    if g.dim() != 4:
        fail(_WHAT_LOSS, f"generator output must be [B, D_t, h, w], got shape {tuple(g.shape)}")
    B, D_t, h, w = g.shape
    N = h * w
    if tuple(t.shape) != (B, N, D_t):
        fail(
            _WHAT_LOSS,
            f"teacher tokens must be [B, N, D_t] = {(B, N, D_t)} for a generator output "
            f"{tuple(g.shape)}, got {tuple(t.shape)}",
        )
    check_float(_WHAT_LOSS, "generator output", g)
    check_float(_WHAT_LOSS, "teacher tokens", t)
    check_device(_WHAT_LOSS, g, t=t)
    _check_mask(_WHAT_LOSS, mask, B, N, g)
    check_unit_stride(_WHAT_LOSS, "teacher tokens", t)
    return B, N, D_t, h, w


def gen_loss_forward(g, t, mask, scale, need_grad, config: Cfg | None = None):
    """(loss [] fp32 = scale·Σ_masked (G − t)², dG = 2·scale·mask·(G − t) like G, or empty)."""
    B, N, D_t, h, w = _check_loss(g, t, mask)
    M = B * N
    cfg = config or pick_config(ELEMENTWISE_CONFIGS, g.dtype, D_t)
    grid = (triton.cdiv(M, cfg.BLOCK_M), triton.cdiv(D_t, cfg.BLOCK_N))
    part = torch.empty(grid[0] * grid[1], device=g.device, dtype=torch.float32)
    dg = torch.empty_like(g) if need_grad else g.new_empty(0)
    od = dg if need_grad else g
    m8 = mask.view(torch.uint8)
    _gen_loss_fwd_kernel[grid](
        g,
        t,
        m8,
        part,
        dg,
        M,
        N,
        D_t,
        w,
        float(scale),
        g.stride(0),
        g.stride(1),
        g.stride(2),
        g.stride(3),
        t.stride(0),
        t.stride(1),
        m8.stride(0),
        m8.stride(1),
        od.stride(0),
        od.stride(1),
        od.stride(2),
        od.stride(3),
        BLOCK_M=cfg.BLOCK_M,
        BLOCK_N=cfg.BLOCK_N,
        NEED_GRAD=need_grad,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return part.sum() * scale, dg


# -------------------------------------------------------------------------------- custom ops / autograd
@torch.library.custom_op("fastkd::gen_input", mutates_args=())
def gen_input_op(
    s: torch.Tensor,
    mask: torch.Tensor,
    weight: Optional[torch.Tensor],  # noqa: UP045 (torch<2.7 schema inference needs typing.Optional)
    bias: Optional[torch.Tensor],  # noqa: UP045
    mask_token: torch.Tensor,
    h: int,
    w: int,
    out_dtype: torch.dtype,
    amp: Optional[bool] = None,  # noqa: UP045
) -> torch.Tensor:
    """x [B, D_t, h, w] channels_last; see ``gen_input_forward``. ``amp``: bf16 autocast is on (the
    caller reads it at the op boundary; required under torch.compile); None = read it now (eager)."""
    return gen_input_forward(s, mask, weight, bias, mask_token, h, w, out_dtype, resolve_amp(amp, s.device))


@gen_input_op.register_fake
def _(s, mask, weight, bias, mask_token, h, w, out_dtype, amp=None):
    _, _, _, D_t = _check_input(s, mask, weight, bias, mask_token, h, w)
    return _new_x(s, D_t, h, w, out_dtype)


@torch.library.custom_op("fastkd::gen_input_backward", mutates_args=())
def gen_input_backward_op(
    dx: torch.Tensor,
    s: torch.Tensor,
    mask: torch.Tensor,
    weight: Optional[torch.Tensor],  # noqa: UP045
    bias: Optional[torch.Tensor],  # noqa: UP045
    mask_token: torch.Tensor,
    h: int,
    w: int,
    need_dw: bool,
    need_db: bool,
    need_dtok: bool,
    amp: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dS, dW, db, dτ); see ``gen_input_backward``."""
    return gen_input_backward(dx, s, mask, weight, bias, mask_token, h, w, need_dw, need_db, need_dtok, amp)


@gen_input_backward_op.register_fake
def _(dx, s, mask, weight, bias, mask_token, h, w, need_dw, need_db, need_dtok, amp=False):
    ds = torch.empty(s.shape, dtype=s.dtype, device=s.device)
    empty = s.new_empty(0, dtype=torch.float32)
    dw = weight.new_empty(weight.shape) if (weight is not None and need_dw) else empty
    db = bias.new_empty(bias.shape) if (bias is not None and need_db) else empty.clone()
    dtok = mask_token.new_empty(mask_token.shape) if need_dtok else empty.clone()
    return ds, dw, db, dtok


def _input_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    s, mask, weight, bias, mask_token, h, w = inputs[:7]
    amp = inputs[8] if len(inputs) > 8 else None
    ctx.save_for_backward(s, mask, weight, bias, mask_token)
    ctx.grid = (h, w)
    ctx.amp = resolve_amp(amp, s.device)


def _input_backward(ctx, dx):
    s, mask, weight, bias, mask_token = ctx.saved_tensors
    need_s, _, need_w, need_b, need_tok = ctx.needs_input_grad[:5]
    if dx is None or not (need_s or need_w or need_b or need_tok):
        return (None,) * 9
    ds, dw, db, dtok = gen_input_backward_op(
        dx, s, mask, weight, bias, mask_token, *ctx.grid, bool(need_w), bool(need_b), bool(need_tok), ctx.amp
    )
    return (
        ds if need_s else None,
        None,
        dw if need_w else None,
        db if need_b else None,
        dtok if need_tok else None,
        None,
        None,
        None,
        None,
    )


gen_input_op.register_autograd(_input_backward, setup_context=_input_setup)


@torch.library.custom_op("fastkd::gen_loss", mutates_args=())
def gen_loss_op(
    g: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, scale: float, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, dG); see ``gen_loss_forward``. dG is the gradient of loss (written in the forward)."""
    return gen_loss_forward(g, t, mask, scale, need_grad)


@gen_loss_op.register_fake
def _(g, t, mask, scale, need_grad):
    _check_loss(g, t, mask)
    return g.new_empty((), dtype=torch.float32), (torch.empty_like(g) if need_grad else g.new_empty(0))


def _loss_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # dG is an output nobody differentiates: no zeros_like(G) per call
    ctx.need_grad = inputs[4]
    ctx.save_for_backward(output[1])


def _loss_backward(ctx, g_loss, g_dg):
    (dg,) = ctx.saved_tensors
    if g_loss is None:
        return None, None, None, None, None
    if not ctx.need_grad:
        raise RuntimeError("fastkd gen_loss: backward through a call made with need_grad=False")
    return dg * g_loss, None, None, None, None  # g stays fp32: one rounding of the product


gen_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup)


# ------------------------------------------------------------------------------ compile-check specs
def compile_specs():
    """Every shipped (kernel, config, dtype, flags) variant as (name, fn, pointers, scalars, constexprs, cfg).

    gen_input forward: for each variant, the configs the autotuner may pick for it
    (``valid_input_configs``) at DeiT-S training shapes (B=256, 14×14 patches read through the
    [B, 1+N, D] row stride, D_s=384, D_t=768) and a small ViT (B=64, 4×4, D_s=64, D_t=128); fp32 tokens
    (what training feeds under autocast) and bf16 tokens, fp32 parameters. Names carry ``bf16dot``,
    ``exact`` (autocast off only) or ``nodot``. Elementwise kernels: each fixed config, both dtypes.
    See ``tests/kernels/compile_check.py``.
    """
    specs = []
    shapes = {"deit_s": (256, 196, 1, 384, 768, 14), "small": (64, 16, 1, 64, 128, 4)}
    seen = set()
    # (token dtype, bf16 dot, output dtype, HAS_W)
    variants = (
        ("fp32", True, "bf16", True),  # training under autocast: fp32 strided tokens, bf16 generator input
        ("bf16", True, "bf16", True),
        ("bf16", True, "bf16", False),
        ("fp32", False, "fp32", True),  # exact: autocast off
        ("fp32", False, "fp32", False),
    )
    for B, N, P, D_s, D_t, _ in shapes.values():
        T = P + N
        for dt, bf16, xdt, has_w in variants:
            prec = ("bf16dot" if bf16 else "exact") if has_w else "nodot"
            for cfg in valid_input_configs(D_s, D_t, bf16, has_w):
                tag = f"input_fwd/{dt}->{xdt}/{prec}/w{int(has_w)}/{cfg.BLOCK_M}x{cfg.BLOCK_N}x{cfg.BLOCK_K}"
                if tag in seen:
                    continue
                seen.add(tag)
                wdt = "bf16" if bf16 else "fp32"  # the launcher rounds W once for a bf16 dot
                ptrs = {
                    "s_ptr": dt,
                    "mask_ptr": "u8",
                    "order_ptr": "i64",
                    "w_ptr": wdt,
                    "b_ptr": "fp32",
                    "tok_ptr": "fp32",
                    "x_ptr": xdt,
                }
                scalars = dict(
                    M=B * N,
                    N=N,
                    D_S=D_s,
                    D_T=D_t,
                    stride_sb=T * D_s,
                    stride_sn=D_s,
                    stride_mb=N,
                    stride_mn=1,
                    stride_w=D_s,
                    stride_xb=N * D_t,
                    stride_xd=1,
                    stride_xn=D_t,
                )
                const = dict(
                    BLOCK_M=cfg.BLOCK_M,
                    BLOCK_N=cfg.BLOCK_N,
                    BLOCK_K=cfg.BLOCK_K,
                    HAS_W=has_w,
                    HAS_BIAS=True,
                    DOT_BF16=bf16,
                    UPCAST=False,
                )
                specs.append((tag, _gen_input_fwd_kernel.fn, ptrs, scalars, const, cfg))
    for cname, cfg in ELEMENTWISE_CONFIGS.items():
        B, N, P, D_s, D_t, W = shapes["small" if cname == "small" else "deit_s"]
        T = P + N
        for dt, gdt, write_sb in (("fp32", "bf16", True), ("bf16", "bf16", False), ("fp32", "fp32", True)):
            ptrs = {
                "dx_ptr": "bf16" if gdt == "bf16" else "fp32",
                "mask_ptr": "u8",
                "s_ptr": dt,
                "gx_ptr": gdt,
                "sb_ptr": gdt,
                "db_part_ptr": "fp32",
                "dtok_part_ptr": "fp32",
            }
            scalars = dict(
                M=B * N,
                N=N,
                D_S=D_s,
                D_T=D_t,
                W_GRID=W,
                stride_db=N * D_t,
                stride_dd=1,
                stride_dh=W * D_t,
                stride_dw=D_t,
                stride_mb=N,
                stride_mn=1,
                stride_sb=T * D_s,
                stride_sn=D_s,
            )
            const = dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, WRITE_SB=write_sb)
            specs.append(
                (
                    f"input_bwd/{dt}->{gdt}/nodot/{cname}/sb{int(write_sb)}",
                    _gen_input_bwd_kernel,
                    ptrs,
                    scalars,
                    const,
                    cfg,
                )
            )
        for dt in ("fp32", "bf16"):
            ptrs = {"g_ptr": dt, "t_ptr": "fp32", "mask_ptr": "u8", "part_ptr": "fp32", "dg_ptr": dt}
            scalars = dict(
                M=B * N,
                N=N,
                D_T=D_t,
                W_GRID=W,
                scale=3e-6 / (0.5 * B),
                stride_gb=N * D_t,
                stride_gd=1,
                stride_gh=W * D_t,
                stride_gw=D_t,
                stride_tb=T * D_t,
                stride_tn=D_t,
                stride_mb=N,
                stride_mn=1,
                stride_ob=N * D_t,
                stride_od=1,
                stride_oh=W * D_t,
                stride_ow=D_t,
            )
            const = dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, NEED_GRAD=True)
            specs.append((f"loss_fwd/{dt}/nodot/{cname}", _gen_loss_fwd_kernel, ptrs, scalars, const, cfg))
    return specs


__all__ = [
    "gen_input_op",
    "gen_loss_op",
    "gen_input_forward",
    "gen_input_backward",
    "gen_loss_forward",
    "compile_specs",
]
