"""Fused logit KD: Hinton KD and NKD from dense teacher logits or a sparse top-K teacher record.

One program per sample row; two passes over the C classes in BLOCK_C chunks (pass 1: online
log-sum-exps; pass 2: the loss terms and the gradient). The forward writes the row's loss
contribution and dL/ds (kept fp32, B·C·4 bytes); the backward only multiplies the stored gradient by
the upstream scalar and rounds it to the logits' dtype once (as torch does).
σ = softmax over classes, lse = logsumexp, all math in fp32 whatever the input dtype.

KD (temperature T), p = σ(s/T), q = σ(t/T):
    L  = T²/B · Σ_b Σ_c q_c (log q_c − log p_c)          dL/ds_c = T/B · (p_c − q_c)
NKD (τ, γ; y the label), p = σ(s), q = σ(t); primes drop column y, p' = σ(s'/τ), q' = σ(t'/τ):
    L  = 1/B · Σ_b [ −q_y log p_y − γτ² Σ_{c≠y} q'_c log p'_c ]
    dL/ds_c = 1/B · [ q_y (p_c − [c = y]) + [c ≠ y] γτ (p'_c − q'_c) ]
Sparse top-K teacher (t_vals v [B, K], t_ids [B, K], t_lse [B]): the implied teacher logits are v at
the ids and u = log((exp(t_lse) − Σ_k exp(v_k)) / (C − K)) at every other class (remaining mass
clamped at fp32's smallest normal number; no remainder when K = C). Every q above is then v- or
u-valued; the sums over the C − K remainder classes use Σ_c s_c in closed form, and the gradient pass
writes the remainder value at every class, then (after a CTA barrier) overwrites the K top classes —
no dense [B, C] teacher tensor is ever built.

Bytes: dense reads s and t once from HBM (pass 2 re-reads hit L2) and writes dS: 3·B·C·e (+ B·4);
top-K reads s, writes dS (2·B·C·e) plus B·(K·(e_v + e_id) + 4) for the record. Flops O(B·C).
"""

import torch
import triton
import triton.language as tl

from ._utils import RECORD_DTYPES, Cfg, cast_rtne, check_device, check_float, fail

# ---------------------------------------------------------------------------------------- constants
FP32_TINY = tl.constexpr(
    1.1754943508222875e-38
)  # torch.finfo(torch.float32).tiny: floor of the remainder mass
# BLOCK_N = classes per chunk (BLOCK_C); BLOCK_K = padded top-K width (top-K kernel only)
CLASS_CONFIGS = {
    "small": Cfg(BLOCK_M=1, BLOCK_N=128, BLOCK_K=0, num_warps=4, num_stages=1),  # C <= 128
    "medium": Cfg(BLOCK_M=1, BLOCK_N=1024, BLOCK_K=0, num_warps=4, num_stages=1),  # C <= 1024
    "large": Cfg(BLOCK_M=1, BLOCK_N=4096, BLOCK_K=0, num_warps=8, num_stages=1),  # looped
}
TOPK_WIDTHS = (16, 256)  # shipped padded K; K > 256 is not supported by the kernel
MAX_TOPK = TOPK_WIDTHS[-1]


def pick_config(C: int, K: int = 0) -> Cfg:
    name = "small" if C <= 128 else ("medium" if C <= 1024 else "large")
    cfg = CLASS_CONFIGS[name]
    if K:
        cfg = cfg._replace(BLOCK_K=next(w for w in TOPK_WIDTHS if w >= K))
    return cfg


# ------------------------------------------------------------------------------------------ kernels
@triton.jit
def _lse_update(m, z, x):
    """Online log-sum-exp: fold the block x (−inf where invalid) into the running (max m, sum z)."""
    m_new = tl.maximum(m, tl.max(x, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    z = z * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), 0)
    return m_new, z


@triton.jit
def _lse_parts(x, extra):
    """logsumexp over the vector x and one extra scalar term (either may be −inf), as (m, l) with
    lse = m + l: keeping the max apart lets a difference of two lse's cancel the large parts exactly."""
    m = tl.maximum(tl.max(x, 0), extra)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    return m_safe, tl.log(tl.sum(tl.exp(x - m_safe), 0) + tl.exp(extra - m_safe))


@triton.jit
def _lse_vec_scalar(x, extra):
    """logsumexp over the vector x and one extra scalar term (either may be −inf)."""
    m, l = _lse_parts(x, extra)
    return m + l


@triton.jit
def _logit_kd_fwd_kernel(
    s_ptr,  # [B, C] student logits (class stride 1), row stride stride_s
    t_ptr,  # [B, C] teacher logits (class stride 1), row stride stride_t
    y_ptr,  # [B] int labels (NKD only)
    loss_ptr,  # [B] fp32 out: this row's contribution to the batch loss
    ds_ptr,  # [B, C] out (contiguous): dLoss/ds; written if NEED_GRAD
    C,
    stride_s,
    stride_t,
    T,
    gamma,
    inv_B,
    BLOCK_C: tl.constexpr,
    NKD: tl.constexpr,
    NEED_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    d_row = ds_ptr + row * C
    ninf = float("-inf")
    zero = tl.sum(tl.zeros((BLOCK_C,), tl.float32), 0)  # a fp32 scalar 0 (loop-carried types)
    # pass 1: log-sum-exps. KD: s/T, t/T. NKD: s, t (T = 1) and s/τ, t/τ over c != y (τ passed as T)
    m_s = zero + ninf
    z_s = zero
    m_t = zero + ninf
    z_t = zero
    m_sn = zero + ninf
    z_sn = zero
    m_tn = zero + ninf
    z_tn = zero
    if NKD:
        y = tl.load(y_ptr + row).to(tl.int32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        ok = c < C
        s = tl.load(s_row + c, mask=ok, other=0.0).to(tl.float32)
        t = tl.load(t_row + c, mask=ok, other=0.0).to(tl.float32)
        if NKD:
            m_s, z_s = _lse_update(m_s, z_s, tl.where(ok, s, ninf))
            m_t, z_t = _lse_update(m_t, z_t, tl.where(ok, t, ninf))
            non = ok & (c != y)
            m_sn, z_sn = _lse_update(m_sn, z_sn, tl.where(non, s / T, ninf))
            m_tn, z_tn = _lse_update(m_tn, z_tn, tl.where(non, t / T, ninf))
        else:
            m_s, z_s = _lse_update(m_s, z_s, tl.where(ok, s / T, ninf))
            m_t, z_t = _lse_update(m_t, z_t, tl.where(ok, t / T, ninf))
    l_s = tl.log(z_s)
    l_t = tl.log(z_t)
    lse_s = m_s + l_s
    lse_t = m_t + l_t
    delta = (m_t - m_s) + (l_t - l_s)
    if NKD:
        lse_sn = m_sn + tl.log(z_sn)
        lse_tn = m_tn + tl.log(z_tn)
        s_y = tl.load(s_row + y).to(tl.float32)
        t_y = tl.load(t_row + y).to(tl.float32)
        q_y = tl.exp(t_y - lse_t)
        loss = -q_y * (s_y - lse_s)
    # pass 2: loss terms (elementwise, as the reference) and the gradient
    acc = tl.zeros((BLOCK_C,), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        ok = c < C
        s = tl.load(s_row + c, mask=ok, other=0.0).to(tl.float32)
        t = tl.load(t_row + c, mask=ok, other=0.0).to(tl.float32)
        if NKD:
            non = ok & (c != y)
            log_pn = s / T - lse_sn
            q_n = tl.exp(t / T - lse_tn)
            acc += tl.where(non, q_n * log_pn, 0.0)
            if NEED_GRAD:
                g = q_y * (tl.exp(s - lse_s) - tl.where(c == y, 1.0, 0.0))
                g += tl.where(non, gamma * T * (tl.exp(log_pn) - q_n), 0.0)
                tl.store(d_row + c, cast_rtne(g * inv_B, ds_ptr.dtype.element_ty), mask=ok)
        else:
            # log q − log p = (t − s)/T − Δ with Δ = lse_t − lse_s formed from the parts: the KL is small
            # next to the lse's, so its fp32 error is then set by |Δ|, not by |lse|
            log_q = (t / T - m_t) - l_t
            q = tl.exp(log_q)
            acc += tl.where(ok, q * ((t - s) / T - delta), 0.0)
            if NEED_GRAD:
                p = tl.exp((s / T - m_s) - l_s)
                tl.store(d_row + c, cast_rtne(T * inv_B * (p - q), ds_ptr.dtype.element_ty), mask=ok)
    if NKD:
        loss = loss - gamma * T * T * tl.sum(acc, 0)
    else:
        loss = T * T * tl.sum(acc, 0)
    tl.store(loss_ptr + row, loss * inv_B)


@triton.jit
def _logit_kd_topk_fwd_kernel(
    s_ptr,  # [B, C] student logits (class stride 1), row stride stride_s
    v_ptr,  # [B, K] top-K teacher logits (stride 1 along K), row stride stride_v
    id_ptr,  # [B, K] int class ids (stride 1 along K, unique per row), row stride stride_i
    lse_ptr,  # [B] teacher logsumexp at T = 1
    y_ptr,  # [B] int labels (NKD only)
    loss_ptr,  # [B] fp32 out: this row's contribution to the batch loss
    ds_ptr,  # [B, C] out (contiguous): dLoss/ds; written if NEED_GRAD
    C,
    K,
    stride_s,
    stride_v,
    stride_i,
    T,
    gamma,
    inv_B,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NKD: tl.constexpr,
    NEED_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    d_row = ds_ptr + row * C
    ninf = float("-inf")
    out_dtype = ds_ptr.dtype.element_ty
    zero = tl.sum(tl.zeros((BLOCK_C,), tl.float32), 0)
    kk = tl.arange(0, BLOCK_K)
    k_ok = kk < K
    v = tl.load(v_ptr + row * stride_v + kk, mask=k_ok, other=0.0).to(tl.float32)
    v = tl.where(k_ok, v, ninf)
    ids = tl.load(id_ptr + row * stride_i + kk, mask=k_ok, other=0).to(tl.int32)
    lse = tl.load(lse_ptr + row).to(tl.float32)
    s_top = tl.load(s_row + ids, mask=k_ok, other=0.0).to(tl.float32)
    n_rest = C - K
    has_rest = n_rest > 0
    # implied remainder logit u = lse + log(1 − exp(lse_K − lse)) − log(C − K). When the top-K holds most
    # of the mass, the remainder is a difference of nearly equal numbers: x = lse_K − lse and −expm1(x) are
    # computed in fp64 (K values per row, negligible cost; a series near 0 instead of 1 − exp(x)), so u is
    # exact to fp32 rounding and the remainder classes' gradient −q_r keeps full fp32 accuracy.
    v64 = v.to(tl.float64)
    vmax = tl.max(v64, 0)
    x = (vmax - lse.to(tl.float64)) + tl.log(tl.sum(tl.exp(v64 - vmax), 0))
    series = 1.0 + x * (1.0 / 9.0)  # −expm1(x) = −x·(1 + x/2·(1 + x/3·(…)))
    series = 1.0 + x * (1.0 / 8.0) * series  # (multiplications: an fp64 division is a
    series = 1.0 + x * (1.0 / 7.0) * series  #  subroutine call that spills on sm_90)
    series = 1.0 + x * (1.0 / 6.0) * series
    series = 1.0 + x * (1.0 / 5.0) * series
    series = 1.0 + x * (1.0 / 4.0) * series
    series = 1.0 + x * (1.0 / 3.0) * series
    series = -x * (1.0 + x * 0.5 * series)
    rem = tl.where(x > -0.125, series, 1.0 - tl.exp(x))
    rem = tl.maximum(rem, FP32_TINY)
    u = (lse.to(tl.float64) + tl.log(rem) - tl.log(tl.maximum(n_rest, 1).to(tl.float64))).to(tl.float32)

    # pass 1: online log-sum-exps of the student and the plain sum of s/T (for the remainder sums)
    m_s = zero + ninf
    z_s = zero
    m_sn = zero + ninf
    z_sn = zero
    sum_s = tl.zeros((BLOCK_C,), tl.float32)
    if NKD:
        y = tl.load(y_ptr + row).to(tl.int32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        ok = c < C
        s = tl.load(s_row + c, mask=ok, other=0.0).to(tl.float32)
        sum_s += tl.where(ok, s / T, 0.0)
        if NKD:
            m_s, z_s = _lse_update(m_s, z_s, tl.where(ok, s, ninf))
            m_sn, z_sn = _lse_update(m_sn, z_sn, tl.where(ok & (c != y), s / T, ninf))
        else:
            m_s, z_s = _lse_update(m_s, z_s, tl.where(ok, s / T, ninf))
    l_s = tl.log(z_s)
    lse_s = m_s + l_s
    sum_sT = tl.sum(sum_s, 0)  # Σ_c s_c / T  (τ for NKD)
    if NKD:
        lse_sn = m_sn + tl.log(z_sn)
        in_top = k_ok & (ids == y)
        y_in_top = tl.sum(in_top.to(tl.int32), 0) > 0
        # target part at T = 1 over all C implied classes
        z1 = _lse_vec_scalar(v, tl.where(has_rest, u + tl.log(tl.maximum(n_rest, 1).to(tl.float32)), ninf))
        z_y = tl.where(y_in_top, tl.sum(tl.where(in_top, v, 0.0), 0), u)
        q_y = tl.exp(z_y - z1)
        s_y = tl.load(s_row + y).to(tl.float32)
        loss = -q_y * (s_y - lse_s)
        # non-target part at τ over the C − 1 classes != y
        s_top_t = tl.where(k_ok, s_top / T, 0.0)
        v_non = tl.where(in_top, ninf, v / T)
        n_non = n_rest - tl.where(y_in_top, 0, 1)
        has_non = has_rest & (n_non > 0)
        rest = tl.where(has_non, u / T + tl.log(tl.maximum(n_non, 1).to(tl.float32)), ninf)
        z_non = _lse_vec_scalar(v_non, rest)
        q_top = tl.exp(v_non - z_non)  # 0 at y's entry and at padding
        ce = tl.sum(q_top * (s_top_t - lse_sn), 0)
        q_r = tl.where(has_non, tl.exp(u / T - z_non), 0.0)
        sum_rest = sum_sT - tl.sum(s_top_t, 0) - tl.where(y_in_top, 0.0, s_y / T)
        ce += tl.where(has_non, q_r * (sum_rest - n_non.to(tl.float32) * lse_sn), 0.0)
        loss = loss - gamma * T * T * ce
    else:
        # as the dense kernel: log q − log p = (v − s)/T − Δ, Δ = lse_t − lse_s formed from the parts
        vT = v / T
        n_f = tl.maximum(n_rest, 1).to(tl.float32)
        m_t, l_t = _lse_parts(vT, tl.where(has_rest, u / T + tl.log(n_f), ninf))
        delta = (m_t - m_s) + (l_t - l_s)
        q_top = tl.where(k_ok, tl.exp((vT - m_t) - l_t), 0.0)
        kl = tl.sum(tl.where(k_ok, q_top * ((tl.where(k_ok, v, 0.0) - s_top) / T - delta), 0.0), 0)
        q_r = tl.where(has_rest, tl.exp((u / T - m_t) - l_t), 0.0)
        # remainder classes: q_r·Σ_{c∉ids}(log q_r − log p_c) = q_r·(n·(u/T − Δ) − Σ_{c∉ids} s_c/T)
        s_rest = sum_sT - tl.sum(tl.where(k_ok, s_top / T, 0.0), 0)
        kl += tl.where(has_rest, q_r * (n_rest.to(tl.float32) * (u / T - delta) - s_rest), 0.0)
        loss = T * T * kl
    tl.store(loss_ptr + row, loss * inv_B)

    if NEED_GRAD:
        # pass 2: every class gets its remainder-class value ...
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            ok = c < C
            s = tl.load(s_row + c, mask=ok, other=0.0).to(tl.float32)
            if NKD:
                g = q_y * (tl.exp(s - lse_s) - tl.where(c == y, 1.0, 0.0))
                g += tl.where(c != y, gamma * T * (tl.exp(s / T - lse_sn) - q_r), 0.0)
            else:
                g = T * (tl.exp(s / T - lse_s) - q_r)
            tl.store(d_row + c, cast_rtne(g * inv_B, out_dtype), mask=ok)
        # ... then the K top classes are overwritten with their own value (one CTA: the barrier orders
        # the two stores)
        tl.debug_barrier()
        if NKD:
            g = q_y * (tl.exp(s_top - lse_s) - tl.where(ids == y, 1.0, 0.0))
            g += tl.where(ids != y, gamma * T * (tl.exp(s_top / T - lse_sn) - q_top), 0.0)
        else:
            g = T * (tl.exp(s_top / T - lse_s) - q_top)
        tl.store(d_row + ids, cast_rtne(g * inv_B, out_dtype), mask=k_ok)


# ---------------------------------------------------------------------------------------- launchers
_WHAT = "fastkd logit_kd kernel"


def _check_s(s):
    if s.dim() != 2:
        fail(_WHAT, f"s_logits must be 2-D [B, C], got shape {tuple(s.shape)}")
    check_float(_WHAT, "s_logits", s)
    if s.stride(1) != 1:
        fail(
            _WHAT,
            f"s_logits must have unit class stride, got strides {tuple(s.stride())}; pass .contiguous()",
        )
    return s.shape


def _check_target(target, B, C, s):
    if target is None:
        return
    if target.dim() != 1 or target.shape[0] != B or target.is_floating_point():
        fail(
            _WHAT,
            f"target must be int labels [B] = [{B}] (take argmax of soft labels first), "
            f"got {target.dtype} {tuple(target.shape)}",
        )
    if C < 2:
        fail(_WHAT, "NKD needs at least 2 classes")
    check_device(_WHAT, s, target=target)


def _check_dense(s, t, target):
    B, C = _check_s(s)
    if tuple(t.shape) != (B, C):
        fail(_WHAT, f"s_logits {tuple(s.shape)} and t_logits {tuple(t.shape)} must have the same shape")
    check_float(_WHAT, "t_logits", t)
    if t.stride(1) != 1:
        fail(
            _WHAT,
            f"t_logits must have unit class stride, got strides {tuple(t.stride())}; pass .contiguous()",
        )
    check_device(_WHAT, s, t_logits=t)
    _check_target(target, B, C, s)
    return B, C


def _check_topk(s, v, ids, lse, target):
    B, C = _check_s(s)
    if v.dim() != 2 or v.shape[0] != B or tuple(ids.shape) != tuple(v.shape):
        fail(_WHAT, f"t_vals {tuple(v.shape)} and t_ids {tuple(ids.shape)} must both be [B, K] with B = {B}")
    K = v.shape[1]
    if not 1 <= K <= C:
        fail(_WHAT, f"top-K record has K = {K}; need 1 <= K <= C = {C}")
    if K > MAX_TOPK:
        fail(_WHAT, f"K = {K} > {MAX_TOPK} is not supported by the fused kernel; use the reference")
    check_float(_WHAT, "t_vals", v, RECORD_DTYPES)
    if ids.is_floating_point() or ids.dtype == torch.bool:
        fail(_WHAT, f"t_ids must be an integer tensor of class ids, got {ids.dtype}")
    if tuple(lse.shape) != (B,):
        fail(_WHAT, f"t_lse must be [B] = [{B}], got {tuple(lse.shape)}")
    check_float(_WHAT, "t_lse", lse, RECORD_DTYPES)
    if K > 1 and (v.stride(1) != 1 or ids.stride(1) != 1):
        fail(_WHAT, "t_vals and t_ids must have unit stride along K; pass .contiguous()")
    check_device(_WHAT, s, t_vals=v, t_ids=ids, t_lse=lse)
    _check_target(target, B, C, s)
    return B, C, K


def logit_kd_forward(s, t, target=None, T=4.0, gamma=1.0, need_grad=True, config: Cfg | None = None):
    """Dense KD (target None, temperature T) or NKD (target int [B], τ = T, γ = gamma).

    Returns (loss [] fp32, dS [B, C] fp32, or an empty tensor when ``need_grad`` is False). dS stays fp32
    (B·C·4 bytes) so the backward rounds to s's dtype once, after the upstream scaling, as torch does.
    """
    B, C = _check_dense(s, t, target)
    cfg = config or pick_config(C)
    loss_rows = torch.empty(B, device=s.device, dtype=torch.float32)
    ds = s.new_empty((B, C) if need_grad else (0,), dtype=torch.float32)
    nkd = target is not None
    _logit_kd_fwd_kernel[(B,)](
        s,
        t,
        target if nkd else s,
        loss_rows,
        ds if need_grad else s,
        C,
        s.stride(0),
        t.stride(0),
        float(T),
        float(gamma),
        1.0 / B,
        BLOCK_C=cfg.BLOCK_N,
        NKD=nkd,
        NEED_GRAD=need_grad,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return loss_rows.sum(), ds


def logit_kd_topk_forward(
    s, t_vals, t_ids, t_lse, target=None, T=4.0, gamma=1.0, need_grad=True, config: Cfg | None = None
):
    """Top-K KD (target None) or NKD (target int [B], τ = T) against the implied teacher; as above."""
    B, C, K = _check_topk(s, t_vals, t_ids, t_lse, target)
    cfg = config or pick_config(C, K)
    if cfg.BLOCK_K < K:
        fail(_WHAT, f"config BLOCK_K={cfg.BLOCK_K} < K={K}")
    loss_rows = torch.empty(B, device=s.device, dtype=torch.float32)
    ds = s.new_empty((B, C) if need_grad else (0,), dtype=torch.float32)
    nkd = target is not None
    _logit_kd_topk_fwd_kernel[(B,)](
        s,
        t_vals,
        t_ids,
        t_lse,
        target if nkd else s,
        loss_rows,
        ds if need_grad else s,
        C,
        K,
        s.stride(0),
        t_vals.stride(0),
        t_ids.stride(0),
        float(T),
        float(gamma),
        1.0 / B,
        BLOCK_C=cfg.BLOCK_N,
        BLOCK_K=cfg.BLOCK_K,
        NKD=nkd,
        NEED_GRAD=need_grad,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return loss_rows.sum(), ds


# -------------------------------------------------------------------------------- custom ops / autograd
@torch.library.custom_op("fastkd::logit_kd", mutates_args=())
def logit_kd_op(
    s: torch.Tensor, t: torch.Tensor, target: torch.Tensor, T: float, gamma: float, nkd: bool, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, dS): KD (nkd False; target ignored) or NKD (nkd True, τ = T); see ``logit_kd_forward``."""
    return logit_kd_forward(s, t, target if nkd else None, T, gamma, need_grad)


@logit_kd_op.register_fake
def _(s, t, target, T, gamma, nkd, need_grad):
    B, C = _check_dense(s, t, target if nkd else None)
    return s.new_empty((), dtype=torch.float32), s.new_empty(
        (B, C) if need_grad else (0,), dtype=torch.float32
    )


@torch.library.custom_op("fastkd::logit_kd_topk", mutates_args=())
def logit_kd_topk_op(
    s: torch.Tensor,
    t_vals: torch.Tensor,
    t_ids: torch.Tensor,
    t_lse: torch.Tensor,
    target: torch.Tensor,
    T: float,
    gamma: float,
    nkd: bool,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, dS) against a sparse top-K teacher; see ``logit_kd_topk_forward``."""
    return logit_kd_topk_forward(s, t_vals, t_ids, t_lse, target if nkd else None, T, gamma, need_grad)


@logit_kd_topk_op.register_fake
def _(s, t_vals, t_ids, t_lse, target, T, gamma, nkd, need_grad):
    B, C, _ = _check_topk(s, t_vals, t_ids, t_lse, target if nkd else None)
    return s.new_empty((), dtype=torch.float32), s.new_empty(
        (B, C) if need_grad else (0,), dtype=torch.float32
    )


def _setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zeros [B, C] for the unused gradient output (per-call cost)
    ctx.need_grad = inputs[-1]
    ctx.n_inputs = len(inputs)
    ctx.s_dtype = inputs[0].dtype
    ctx.save_for_backward(output[1])


def _backward(ctx, g_loss, g_ds):
    (ds,) = ctx.saved_tensors
    if g_loss is None:
        return (None,) * ctx.n_inputs
    if not ctx.need_grad:
        raise RuntimeError("fastkd logit_kd: backward through a call made with need_grad=False")
    return ((ds * g_loss).to(ctx.s_dtype),) + (None,) * (ctx.n_inputs - 1)


logit_kd_op.register_autograd(_backward, setup_context=_setup)
logit_kd_topk_op.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------------ compile-check specs
def compile_specs():
    """Every shipped (kernel, config, dtype, flags) variant as (name, fn, pointers, scalars, constexprs, cfg).

    ``scalars`` are representative runtime values per class-count config (C = 100 / 1000 / 21843, K = 10
    / 100 for the two shipped top-K widths); see ``tests/kernels/compile_check.py``.
    """
    specs = []
    for cname, C in (("small", 100), ("medium", 1000), ("large", 21843)):
        cfg = CLASS_CONFIGS[cname]
        for dt in ("bf16", "fp32"):
            for nkd in (False, True):
                mode = "nkd" if nkd else "kd"
                ptrs = {"s_ptr": dt, "t_ptr": dt, "y_ptr": "i64", "loss_ptr": "fp32", "ds_ptr": "fp32"}
                scalars = dict(C=C, stride_s=C, stride_t=C, T=4.0, gamma=1.0, inv_B=1 / 256)
                const = dict(BLOCK_C=cfg.BLOCK_N, NKD=nkd, NEED_GRAD=True)
                specs.append((f"dense/{cname}/{dt}/{mode}", _logit_kd_fwd_kernel, ptrs, scalars, const, cfg))
                for bk, K in zip(TOPK_WIDTHS, (10, 100), strict=True):
                    if K > C:
                        continue
                    ptrs = {
                        "s_ptr": dt,
                        "v_ptr": "fp16",
                        "id_ptr": "i16",
                        "lse_ptr": "fp32",
                        "y_ptr": "i64",
                        "loss_ptr": "fp32",
                        "ds_ptr": "fp32",
                    }
                    scalars = dict(
                        C=C, K=K, stride_s=C, stride_v=K, stride_i=K, T=4.0, gamma=1.0, inv_B=1 / 256
                    )
                    const = dict(BLOCK_C=cfg.BLOCK_N, BLOCK_K=bk, NKD=nkd, NEED_GRAD=True)
                    specs.append(
                        (
                            f"topk/{cname}/K{bk}/{dt}/{mode}",
                            _logit_kd_topk_fwd_kernel,
                            ptrs,
                            scalars,
                            const,
                            cfg._replace(BLOCK_K=bk),
                        )
                    )
    return specs


__all__ = ["logit_kd_op", "logit_kd_topk_op", "logit_kd_forward", "logit_kd_topk_forward", "compile_specs"]
