"""Pure-torch reference implementations of every fastkd loss (the spec is /work/shared/METHODS.md).

These functions are the ground truth: tests, benchmarks and the CPU training path use them, and the
fused Triton kernels compute the same functions. Everything is plain differentiable torch and works in
fp64. Conventions:

* student first, teacher second; teacher tensors are detached inside every function;
* compute dtype: the promoted dtype of the floating inputs, except that bf16/fp16 inputs are computed
  and accumulated in fp32, and the result is then fp32;
* weights use the ``nn.Linear`` layout ``[out, in]``; ``None`` weight / bias / projector = identity /
  zero (a ``None`` weight or projector is only valid when the widths match, else ``ValueError``);
* token grids are row-major ``h = w = sqrt(N)`` unless ``grid=(h, w)`` is given;
* every function returns a 0-d tensor except ``cls_patch_map`` ([B, N]), ``random_token_mask``
  ([B, N] bool) and ``cskd_alpha`` (python float).

Public API (σ = softmax over classes, norm(x) = x / ||x||_2 over channels):

* ``kd_loss(s_logits, t_logits, T=4.0)``: T² · mean_b KL(σ(t/T) || σ(s/T))
* ``kd_loss_topk(s_logits, t_vals, t_ids, t_lse, T=4.0)``: kd_loss on the implied top-K teacher
* ``nkd_loss(s_logits, t_logits, target, tau=1.0, gamma=1.0)``: L_target + L_non (NKD)
* ``nkd_loss_topk(s_logits, t_vals, t_ids, t_lse, target, tau=1.0, gamma=1.0)``: nkd_loss on the
  implied top-K teacher
* ``vitkd_mimic_loss(s_feats, t_feats, weights, biases, alpha=3e-5)``:
  α/B · Σ_l Σ_{n,d} (s_l W_lᵀ + b_l − t_l)²
* ``vitkd_gen_loss(s_last, t_last, mask, weight, bias, mask_token, generator, beta=3e-6,
  mask_ratio=0.5, *, grid=None)``: β/(λ·B) · Σ_{masked n, d} (G − t_last)²
* ``random_token_mask(B, N, mask_ratio, generator=None, device=None)``: bool [B, N], True = masked,
  exactly N − ⌊N(1−λ)⌋ True per row
* ``cls_patch_map(tokens, num_prefix=1)``: [B, N], norm(CLS) · norm(patch_n)
* ``cls_patch_map_loss(s_tokens, t_tokens, num_prefix_s=1, num_prefix_t=1)``: mean_{B·N} (map_t − map_s)²
* ``cls_embed_loss(s_cls, t_cls, projector)``: mean_{B·D_t} (norm(t_cls) − projector(norm(s_cls)))²
* ``ald(layer_losses, last_weight=4.0, detach=False)``: Σ_{k<n} r_k L_k + μ r_n L_n, r_k = L_k / Σ_j L_j
* ``manifold_loss(s_tokens, t_tokens, k=192, w_patch=4.0, w_sample=0.1, w_rand=0.2, generator=None)``:
  mean over layer pairs of w_patch·patch + w_sample·sample + w_rand·random Gram MSEs
* ``cskd_loss(s_patch_logits, t_dense_logits, alpha, hard=True, T=1.0, *, grid=None)``: CSKD, hard CE
  (mean over B·h_t·w_t) or soft T²·KL (sum over classes and locations / B)
* ``cskd_alpha(epoch, epochs, schedule="linear")``: python float 1 − e/E ("square": (1−x)²,
  "cos": cos(πx/2))
* ``deit_hard_loss(dist_logits, t_logits)``: mean_b CE(dist_logits, argmax_c t_logits)

Sparse top-K teacher record (per sample): ``t_vals`` [B, K] top-K raw teacher logits, ``t_ids`` [B, K]
class ids (any integer dtype, unique per row), ``t_lse`` [B] = logsumexp of the full teacher logits at
T = 1. The implied teacher logits are ``t_vals`` at ``t_ids`` and one shared value
``u = log((exp(t_lse) − Σ_k exp(t_vals_k)) / (C − K))`` at every other class ("remainder spread
uniformly"); when K == C there is no remainder. The ``*_topk`` losses equal the dense losses on these
implied logits and never build a dense [B, C] teacher tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

__all__ = [
    "kd_loss",
    "kd_loss_topk",
    "nkd_loss",
    "nkd_loss_topk",
    "vitkd_mimic_loss",
    "vitkd_gen_loss",
    "random_token_mask",
    "cls_patch_map",
    "cls_patch_map_loss",
    "cls_embed_loss",
    "ald",
    "manifold_loss",
    "cskd_loss",
    "cskd_alpha",
    "deit_hard_loss",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------- helpers
def _work_dtype(*tensors: Tensor | None) -> torch.dtype:
    """Promoted floating dtype of ``tensors`` (None and integer tensors ignored); bf16/fp16 -> fp32."""
    dt = None
    for x in tensors:
        if x is None or not x.is_floating_point():
            continue
        dt = x.dtype if dt is None else torch.promote_types(dt, x.dtype)
    if dt is None:
        dt = torch.get_default_dtype()
    return torch.float32 if dt in _LOW_PRECISION else dt


def _check_2d(name: str, x: Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [B, C], got shape {tuple(x.shape)}")


def _check_3d(name: str, x: Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"{name} must be 3-D [B, N, D], got shape {tuple(x.shape)}")


def _check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must have the same shape")


def _resolve_grid(n: int, grid: tuple[int, int] | None, what: str) -> tuple[int, int]:
    """(h, w) for ``n`` tokens: ``grid`` if given (must multiply to n), else the square sqrt(n) grid."""
    if grid is None:
        h = math.isqrt(n)
        if h * h != n:
            raise ValueError(
                f"{what}: {n} tokens do not form a square grid; pass grid=(h, w) with h*w == {n}"
            )
        return h, h
    h, w = (int(v) for v in grid)
    if h * w != n:
        raise ValueError(f"{what}: grid={tuple(grid)} has {h * w} cells but there are {n} tokens")
    return h, w


def _labels(target: Tensor, batch: int, classes: int) -> Tensor:
    """Hard labels [B] int64 from ``target``: int [B] as is, soft [B, C] by argmax over classes."""
    if target.dim() == 1 and not target.is_floating_point():
        if target.shape[0] != batch:
            raise ValueError(f"target has {target.shape[0]} labels but the logits have batch {batch}")
        return target.long()
    if target.dim() == 2 and tuple(target.shape) == (batch, classes):
        return target.argmax(dim=1)
    raise ValueError(
        f"target must be int labels [B]={batch} or a soft label [B, C]=({batch}, {classes}), "
        f"got {target.dtype} {tuple(target.shape)}"
    )


def _project(x: Tensor, weight: Tensor | None, bias: Tensor | None, d_out: int, what: str) -> Tensor:
    """x Wᵀ + b on the last axis; ``None`` weight = identity (widths must match), ``None`` bias = 0."""
    if weight is None:
        if x.shape[-1] != d_out:
            raise ValueError(
                f"{what}: student width {x.shape[-1]} != teacher width {d_out} and no projection weight "
                f"was given; pass a weight of shape [{d_out}, {x.shape[-1]}] (nn.Linear layout)"
            )
        y = x
    else:
        if tuple(weight.shape) != (d_out, x.shape[-1]):
            raise ValueError(
                f"{what}: weight must be [D_t, D_s] = [{d_out}, {x.shape[-1]}] (nn.Linear layout), "
                f"got {tuple(weight.shape)}"
            )
        y = x @ weight.to(x.dtype).t()
    if bias is not None:
        if bias.numel() != d_out:
            raise ValueError(f"{what}: bias must have D_t = {d_out} elements, got {bias.numel()}")
        y = y + bias.to(x.dtype).reshape(d_out)
    return y


def _normalize(x: Tensor) -> Tensor:
    """x / ||x||_2 over the last axis (eps 1e-12 guards an all-zero vector)."""
    return F.normalize(x, p=2.0, dim=-1, eps=1e-12)


def _check_topk(s_logits: Tensor, t_vals: Tensor, t_ids: Tensor, t_lse: Tensor) -> tuple[int, int, int]:
    _check_2d("s_logits", s_logits)
    B, C = s_logits.shape
    if t_vals.dim() != 2 or t_vals.shape[0] != B or t_vals.shape != t_ids.shape:
        raise ValueError(
            f"t_vals {tuple(t_vals.shape)} and t_ids {tuple(t_ids.shape)} must both be [B, K] with B = {B}"
        )
    if t_ids.is_floating_point():
        raise ValueError(f"t_ids must be an integer tensor of class ids, got {t_ids.dtype}")
    if tuple(t_lse.shape) != (B,):
        raise ValueError(f"t_lse must be [B] = [{B}], got {tuple(t_lse.shape)}")
    K = t_vals.shape[1]
    if not 1 <= K <= C:
        raise ValueError(f"top-K record has K = {K}; need 1 <= K <= C = {C}")
    return B, C, K


def _implied_rest_logit(v: Tensor, lse: Tensor, n_rest: int) -> Tensor:
    """u [B] = log((exp(lse) − Σ_k exp(v_k)) / n_rest), computed stably in log space.

    The remaining mass fraction 1 − exp(lse_K − lse) is clamped to the dtype's smallest normal number,
    so a record whose top-K mass reaches exp(t_lse) (possible after fp16 rounding) gets a negligible,
    finite remainder instead of -inf/NaN.
    """
    rem = -torch.expm1(torch.logsumexp(v, dim=1) - lse)
    rem = rem.clamp_min(torch.finfo(v.dtype).tiny)
    return lse + torch.log(rem) - math.log(n_rest)


# ------------------------------------------------------------------------------------------ Hinton KD
def kd_loss(s_logits: Tensor, t_logits: Tensor, T: float = 4.0) -> Tensor:
    """Hinton KD, KL form.

    s_logits, t_logits: [B, C]. Returns the 0-d
    ``T² · mean_b Σ_c σ(t/T)_c (log σ(t/T)_c − log σ(s/T)_c)``
    (sum over classes, mean over the batch). Equals the cross-entropy form up to a teacher-only
    constant, so the gradients are identical.
    """
    _check_2d("s_logits", s_logits)
    _check_same_shape("s_logits", s_logits, "t_logits", t_logits)
    dt = _work_dtype(s_logits, t_logits)
    s = s_logits.to(dt)
    t = t_logits.detach().to(dt)
    log_p = F.log_softmax(s / T, dim=1)
    log_q = F.log_softmax(t / T, dim=1)
    kl = (log_q.exp() * (log_q - log_p)).sum(dim=1)
    return kl.mean() * (T * T)


def kd_loss_topk(s_logits: Tensor, t_vals: Tensor, t_ids: Tensor, t_lse: Tensor, T: float = 4.0) -> Tensor:
    """``kd_loss`` against the implied dense teacher of a sparse top-K record (see module docstring).

    s_logits [B, C]; t_vals [B, K] raw teacher logits; t_ids [B, K] int class ids (unique per row);
    t_lse [B] = logsumexp of the full teacher logits at T = 1. With the implied teacher logits z
    (t_vals at t_ids, u elsewhere), this is ``T² · mean_b KL(σ(z/T) || σ(s/T))``, computed from the K
    top entries plus one closed-form remainder term, never a dense [B, C] teacher tensor:
    ``KL_b = Σ_k q_k (log q_k − log p_{id_k}) + q_r ((C−K) log q_r − Σ_{c∉ids} log p_c)``,
    ``Σ_{c∉ids} log p_c = (Σ_c s_c − Σ_k s_{id_k}) / T − (C−K) · logsumexp(s/T)``.
    When K == C there is no remainder term.
    """
    B, C, K = _check_topk(s_logits, t_vals, t_ids, t_lse)
    dt = _work_dtype(s_logits, t_vals, t_lse)
    s = s_logits.to(dt)
    v = t_vals.detach().to(dt)
    lse = t_lse.detach().to(dt)
    ids = t_ids.long()
    n_rest = C - K

    s_T = s / T
    lse_s = torch.logsumexp(s_T, dim=1)                      # [B]
    s_top = s_T.gather(1, ids)                               # [B, K]
    log_p_top = s_top - lse_s[:, None]                       # [B, K]

    v_T = v / T
    if n_rest > 0:
        u_T = _implied_rest_logit(v, lse, n_rest) / T        # [B]
        z = torch.logsumexp(torch.cat([v_T, (u_T + math.log(n_rest))[:, None]], dim=1), dim=1)
    else:
        z = torch.logsumexp(v_T, dim=1)
    log_q_top = v_T - z[:, None]
    kl = (log_q_top.exp() * (log_q_top - log_p_top)).sum(dim=1)
    if n_rest > 0:
        log_q_r = u_T - z                                    # log-prob of each remainder class
        q_r = log_q_r.exp()
        sum_rest_log_p = (s_T.sum(dim=1) - s_top.sum(dim=1)) - n_rest * lse_s
        kl = kl + q_r * (n_rest * log_q_r - sum_rest_log_p)
    return kl.mean() * (T * T)


# ----------------------------------------------------------------------------------------------- NKD
def nkd_loss(
    s_logits: Tensor, t_logits: Tensor, target: Tensor, tau: float = 1.0, gamma: float = 1.0
) -> Tensor:
    """NKD (Yang et al., ICCV 2023).

    s_logits, t_logits: [B, C]; target: int labels [B] or a soft label [B, C] (its argmax is used).
    With y the label, p = σ(s), q = σ(t) over all C classes (no temperature):
    ``L_target = −mean_b q_y · log p_y`` (q_y is a teacher quantity, so no gradient);
    dropping column y from both rows (s', t' ∈ [B, C−1]):
    ``L_non = −γ·τ² · mean_b Σ_i σ(t'/τ)_i · log σ(s'/τ)_i`` (a cross-entropy, sum over the C−1 classes).
    Returns the 0-d ``L_target + L_non``.
    """
    _check_2d("s_logits", s_logits)
    _check_same_shape("s_logits", s_logits, "t_logits", t_logits)
    B, C = s_logits.shape
    if C < 2:
        raise ValueError("nkd_loss needs at least 2 classes")
    y = _labels(target, B, C)
    dt = _work_dtype(s_logits, t_logits)
    s = s_logits.to(dt)
    t = t_logits.detach().to(dt)

    log_p_y = (s - torch.logsumexp(s, dim=1, keepdim=True)).gather(1, y[:, None]).squeeze(1)
    q_y = F.softmax(t, dim=1).gather(1, y[:, None]).squeeze(1)
    l_target = -(q_y * log_p_y).mean()

    is_y = torch.arange(C, device=s.device)[None, :] == y[:, None]          # [B, C]
    neg_inf = torch.full((), float("-inf"), dtype=dt, device=s.device)  # a fill: no host→device copy
    s_tau = s / tau
    log_p_non = s_tau - torch.logsumexp(torch.where(is_y, neg_inf, s_tau), dim=1, keepdim=True)
    q_non = F.softmax(torch.where(is_y, neg_inf, t / tau), dim=1)           # exactly 0 at column y
    l_non = -(gamma * tau * tau) * (q_non * log_p_non).sum(dim=1).mean()
    return l_target + l_non


def nkd_loss_topk(
    s_logits: Tensor,
    t_vals: Tensor,
    t_ids: Tensor,
    t_lse: Tensor,
    target: Tensor,
    tau: float = 1.0,
    gamma: float = 1.0,
) -> Tensor:
    """``nkd_loss`` against the implied dense teacher of a sparse top-K record (see module docstring).

    Shapes as ``kd_loss_topk`` plus target (int [B] or soft [B, C], argmax taken). With z the implied
    teacher logits: q_y = exp(z_y − logsumexp(z)) where z_y = t_vals_k if t_ids_k == y else u;
    the non-target teacher distribution σ(z'/τ) over the C−1 classes ≠ y has the top-K entries other
    than y plus ``n' = C − K − [y ∉ ids]`` remainder classes at u; the student side uses
    ``log σ(s'/τ)_c = s_c/τ − logsumexp_{j≠y}(s_j/τ)`` and the remainder classes' sum in closed form.
    Returns the 0-d ``L_target + L_non`` exactly as ``nkd_loss`` on the implied logits.
    """
    B, C, K = _check_topk(s_logits, t_vals, t_ids, t_lse)
    if C < 2:
        raise ValueError("nkd_loss_topk needs at least 2 classes")
    y = _labels(target, B, C)
    dt = _work_dtype(s_logits, t_vals, t_lse)
    s = s_logits.to(dt)
    v = t_vals.detach().to(dt)
    lse = t_lse.detach().to(dt)
    ids = t_ids.long()
    n_rest = C - K
    neg_inf = torch.full((), float("-inf"), dtype=dt, device=s.device)  # a fill: no host→device copy

    in_top = ids == y[:, None]                               # [B, K]; at most one True per row
    y_in_top = in_top.any(dim=1)                             # [B]

    # target part, T = 1 over all C implied classes
    if n_rest > 0:
        u = _implied_rest_logit(v, lse, n_rest)              # [B]
        z1 = torch.logsumexp(torch.cat([v, (u + math.log(n_rest))[:, None]], dim=1), dim=1)
        z_y = torch.where(y_in_top, torch.where(in_top, v, 0.0).sum(dim=1), u)
    else:
        z1 = torch.logsumexp(v, dim=1)
        z_y = torch.where(in_top, v, 0.0).sum(dim=1)         # y is always among the C ids
    q_y = (z_y - z1).exp()
    log_p_y = s.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(s, dim=1)
    l_target = -(q_y * log_p_y).mean()

    # non-target part at tau over the C - 1 classes != y
    s_tau = s / tau
    is_y = torch.arange(C, device=s.device)[None, :] == y[:, None]          # [B, C]
    lse_s_non = torch.logsumexp(torch.where(is_y, neg_inf, s_tau), dim=1)   # [B]
    s_top = s_tau.gather(1, ids)                                            # [B, K]
    v_tau = torch.where(in_top, neg_inf, v / tau)                           # y's entry dropped
    if n_rest > 0:
        n_non = n_rest - (~y_in_top).to(dt)                                 # [B] remainder classes != y
        rest_logit = u / tau + torch.log(n_non)                             # -inf when n_non == 0
        z_non = torch.logsumexp(torch.cat([v_tau, rest_logit[:, None]], dim=1), dim=1)
    else:
        z_non = torch.logsumexp(v_tau, dim=1)
    q_top = (v_tau - z_non[:, None]).exp()                                  # 0 at y's entry
    ce = (q_top * (s_top - lse_s_non[:, None])).sum(dim=1)                  # Σ_top q' log p'
    if n_rest > 0:
        q_r = (u / tau - z_non).exp()
        s_y = s_tau.gather(1, y[:, None]).squeeze(1)
        sum_rest_s = s_tau.sum(dim=1) - s_top.sum(dim=1) - torch.where(y_in_top, 0.0, s_y)
        rest = q_r * (sum_rest_s - n_non * lse_s_non)
        ce = ce + torch.where(n_non > 0, rest, 0.0)
    l_non = -(gamma * tau * tau) * ce.mean()
    return l_target + l_non


# --------------------------------------------------------------------------------------------- ViTKD
def vitkd_mimic_loss(
    s_feats: Sequence[Tensor],
    t_feats: Sequence[Tensor],
    weights: Sequence[Tensor | None] | None,
    biases: Sequence[Tensor | None] | None,
    alpha: float = 3e-5,
) -> Tensor:
    """ViTKD mimic loss on the shallow blocks.

    s_feats: list of [B, N, D_s] student patch tokens; t_feats: list of [B, N, D_t]; weights: list of
    [D_t, D_s] (nn.Linear layout, one per layer, not shared) or None; biases: list of [D_t] or None.
    ``None`` (the whole list or one entry) = identity weight / zero bias; a None weight needs D_s = D_t.
    Returns the 0-d ``α/B · Σ_l Σ_{n,d} (s_l W_lᵀ + b_l − t_l)²`` (sum over layers, tokens and channels,
    divided by the batch size).
    """
    n_layers = len(s_feats)
    if n_layers == 0 or len(t_feats) != n_layers:
        raise ValueError(
            f"need the same non-zero number of student/teacher layers, got {n_layers}/{len(t_feats)}"
        )
    weights = [None] * n_layers if weights is None else list(weights)
    biases = [None] * n_layers if biases is None else list(biases)
    if len(weights) != n_layers or len(biases) != n_layers:
        raise ValueError(
            f"weights ({len(weights)}) and biases ({len(biases)}) need one entry per layer ({n_layers})"
        )
    dt = _work_dtype(*s_feats, *t_feats, *weights, *biases)
    B = s_feats[0].shape[0]
    total = None
    for i, (s, t, w, b) in enumerate(zip(s_feats, t_feats, weights, biases, strict=True)):
        _check_3d(f"s_feats[{i}]", s)
        _check_3d(f"t_feats[{i}]", t)
        if s.shape[:2] != t.shape[:2] or s.shape[0] != B:
            raise ValueError(
                f"layer {i}: student {tuple(s.shape)} and teacher {tuple(t.shape)} "
                f"need the same [B, N] (B={B})"
            )
        x = _project(s.to(dt), w, b, t.shape[-1], f"vitkd_mimic_loss layer {i}")
        term = (x - t.detach().to(dt)).pow(2).sum()
        total = term if total is None else total + term
    return total * (alpha / B)


def random_token_mask(
    B: int,
    N: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Random per-sample token mask for ViTKD generation.

    Returns bool [B, N], True = masked, with exactly ``N − ⌊N·(1 − mask_ratio)⌋`` True per row, chosen
    uniformly at random: the lowest-noise positions of ``torch.rand(B, N, generator=generator).argsort``.
    The noise is drawn with ``generator`` on its own device (the default RNG on ``device`` when None);
    the mask is returned on ``device`` (the generator's device when None). No host sync beyond drawing
    the noise (and the copy when the generator lives on another device).
    """
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
    if B < 0 or N < 0:
        raise ValueError(f"B and N must be non-negative, got B={B}, N={N}")
    draw_device = generator.device if generator is not None else device
    n_mask = N - math.floor(N * (1.0 - mask_ratio))
    # no generator= keyword when there is none: torch.rand's generator overload takes no symbolic sizes, so
    # it breaks torch.compile once the batch dimension has become dynamic
    gen = {} if generator is None else {"generator": generator}
    order = torch.rand(B, N, device=draw_device, **gen).argsort(dim=1)
    mask = torch.zeros(B, N, dtype=torch.bool, device=order.device)
    mask.scatter_(1, order[:, :n_mask], True)
    if device is None or mask.device == torch.device(device):
        return mask  # already there: no .to call at all (the step's sync guard test watches .to)
    return mask.to(device)


def gen_loss_shapes(s_last, t_last, mask, mask_token, mask_ratio, grid) -> tuple[int, int, int, int, int]:
    """(B, N, D_t, h, w) of ``vitkd_gen_loss``'s inputs, each bad one rejected in one line (shared with
    the fused path in ``fastkd.ops.dispatch``)."""
    _check_3d("s_last", s_last)
    _check_3d("t_last", t_last)
    B, N, _ = s_last.shape
    d_t = t_last.shape[-1]
    if t_last.shape[:2] != (B, N):
        raise ValueError(
            f"s_last {tuple(s_last.shape)} and t_last {tuple(t_last.shape)} need the same [B, N]"
        )
    if tuple(mask.shape) != (B, N) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool [B, N] = [{B}, {N}], got {mask.dtype} {tuple(mask.shape)}")
    if mask_token.numel() != d_t:
        raise ValueError(f"mask_token must have D_t = {d_t} elements, got {mask_token.numel()}")
    if not 0.0 < mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1], got {mask_ratio}")
    h, w = _resolve_grid(N, grid, "vitkd_gen_loss")
    return B, N, d_t, h, w


def check_generator_output(g: Tensor, B: int, d_t: int, h: int, w: int) -> Tensor:
    if tuple(g.shape) != (B, d_t, h, w):
        raise ValueError(
            f"generator must map [B, D_t, h, w] = {(B, d_t, h, w)} to the same shape, got {tuple(g.shape)}"
        )
    return g


def vitkd_gen_loss(
    s_last: Tensor,
    t_last: Tensor,
    mask: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mask_token: Tensor,
    generator: Callable[[Tensor], Tensor],
    beta: float = 3e-6,
    mask_ratio: float = 0.5,
    *,
    grid: tuple[int, int] | None = None,
) -> Tensor:
    """ViTKD generation loss on the last block (after the final norm, patch tokens only).

    s_last [B, N, D_s], t_last [B, N, D_t], mask bool [B, N] (True = masked, e.g. from
    ``random_token_mask``), weight [D_t, D_s] / bias [D_t] (None = identity / zero), mask_token with
    D_t elements (any shape), generator: callable [B, D_t, h, w] -> [B, D_t, h, w] (the conv stack).
    x = s_last Wᵀ + b; masked positions replaced by the mask token; reshaped row-major
    [B, N, D_t] -> [B, D_t, h, w] (h = w = sqrt(N) unless ``grid=(h, w)``); G = generator(x).
    Returns the 0-d ``β/(λ·B) · Σ_{masked n, d} (G − t_last)²`` with λ = mask_ratio (the nominal ratio,
    as in the release, not the realised masked fraction).
    """
    B, N, d_t, h, w = gen_loss_shapes(s_last, t_last, mask, mask_token, mask_ratio, grid)
    dt = _work_dtype(s_last, t_last, weight, bias, mask_token)
    x = _project(s_last.to(dt), weight, bias, d_t, "vitkd_gen_loss")
    x = torch.where(mask[:, :, None], mask_token.to(dt).reshape(1, 1, d_t), x)
    x = x.transpose(1, 2).reshape(B, d_t, h, w)
    g = check_generator_output(generator(x), B, d_t, h, w)
    g = g.to(dt).reshape(B, d_t, N).transpose(1, 2)                     # [B, N, D_t]
    sq = (g - t_last.detach().to(dt)).pow(2) * mask[:, :, None].to(dt)
    return sq.sum() * (beta / (mask_ratio * B))


# ------------------------------------------------------------------------------------------- [CLS]-KD
def cls_patch_map(tokens: Tensor, num_prefix: int = 1) -> Tensor:
    """[CLS]-patch cosine map.

    tokens [B, P+N, D] with the CLS token at index 0 and ``num_prefix`` = P prefix tokens.
    Returns [B, N]: ``a_n = norm(CLS) · norm(patch_n)`` (cosine similarity; no softmax, no heads).
    """
    _check_3d("tokens", tokens)
    if not 1 <= num_prefix < tokens.shape[1]:
        raise ValueError(f"num_prefix must be in [1, {tokens.shape[1] - 1}] for {tokens.shape[1]} tokens")
    x = _normalize(tokens.to(_work_dtype(tokens)))
    return (x[:, num_prefix:, :] * x[:, :1, :]).sum(dim=-1)


def cls_patch_map_loss(
    s_tokens: Tensor, t_tokens: Tensor, num_prefix_s: int = 1, num_prefix_t: int = 1
) -> Tensor:
    """[CLS]-KD map loss: s_tokens [B, P_s+N, D_s], t_tokens [B, P_t+N, D_t] (widths may differ).

    Returns the 0-d ``mean over B·N of (map_t − map_s)²`` with map = ``cls_patch_map``.
    """
    a_s = cls_patch_map(s_tokens, num_prefix_s)
    a_t = cls_patch_map(t_tokens.detach(), num_prefix_t)
    if a_s.shape != a_t.shape:
        raise ValueError(
            f"student has {tuple(a_s.shape)} [B, N] patch tokens, teacher {tuple(a_t.shape)}; "
            "the batch and patch counts must match (check num_prefix_s / num_prefix_t)"
        )
    dt = _work_dtype(a_s, a_t)
    return (a_t.to(dt) - a_s.to(dt)).pow(2).mean()


def cls_embed_loss(s_cls: Tensor, t_cls: Tensor, projector: Callable[[Tensor], Tensor] | None) -> Tensor:
    """[CLS]-KD embedding loss: s_cls [B, D_s], t_cls [B, D_t].

    projector: callable [B, D_s] -> [B, D_t] (the shared Linear-GELU-Linear), None = identity
    (D_s must equal D_t). The projector output is not re-normalised.
    Returns the 0-d ``mean over B·D_t of (norm(t_cls) − projector(norm(s_cls)))²``.
    """
    _check_2d("s_cls", s_cls)
    _check_2d("t_cls", t_cls)
    if s_cls.shape[0] != t_cls.shape[0]:
        raise ValueError(f"s_cls {tuple(s_cls.shape)} and t_cls {tuple(t_cls.shape)} need the same batch")
    dt = _work_dtype(s_cls, t_cls)
    x = _normalize(s_cls.to(dt))
    if projector is None:
        if s_cls.shape[1] != t_cls.shape[1]:
            raise ValueError(
                f"cls_embed_loss: student width {s_cls.shape[1]} != teacher width {t_cls.shape[1]} and "
                "projector is None; pass a projector mapping D_s -> D_t"
            )
    else:
        x = projector(x)
        if x.shape != t_cls.shape:
            raise ValueError(f"projector output {tuple(x.shape)} must match t_cls {tuple(t_cls.shape)}")
        x = x.to(dt)
    y = _normalize(t_cls.detach().to(dt))
    return (y - x).pow(2).mean()


def ald(layer_losses: Tensor | Sequence[Tensor], last_weight: float = 4.0, detach: bool = False) -> Tensor:
    """Adaptive layer distillation weighting ([CLS]-KD).

    layer_losses: 1-D tensor [n] or a list of n 0-d tensors (L_1..L_n, non-negative).
    ``r_k = L_k / Σ_j L_j`` (from the current values); returns the 0-d
    ``Σ_{k<n} r_k L_k + μ · r_n · L_n`` with μ = last_weight.
    Release choice (default): r is NOT detached, so the objective is ``Σ_k w_k L_k² / Σ_j L_j``;
    ``detach=True`` treats r as a constant (the gradient is then ``w_k r_k`` per layer).
    The denominator is clamped at the dtype's smallest normal number, so all-zero losses give 0.
    """
    if isinstance(layer_losses, Tensor):
        if layer_losses.dim() != 1:
            raise ValueError(f"layer_losses must be a 1-D tensor, got shape {tuple(layer_losses.shape)}")
        losses = layer_losses
    else:
        items = list(layer_losses)
        if not items or any(x.dim() != 0 for x in items):
            raise ValueError("layer_losses must be a non-empty list of 0-d tensors (or a 1-D tensor)")
        losses = torch.stack([x.to(_work_dtype(*items)) for x in items])
    if losses.numel() == 0:
        raise ValueError("layer_losses is empty")
    losses = losses.to(_work_dtype(losses))
    total = losses.sum().clamp_min(torch.finfo(losses.dtype).tiny)
    r = losses / total
    if detach:
        r = r.detach()
    w = torch.ones_like(losses)
    w[-1:].fill_(last_weight)  # a fill kernel: item assignment would copy a pageable scalar (a CUDA sync)
    return (w * r * losses).sum()


# ------------------------------------------------------------------------------------------ manifold
def manifold_loss(
    s_tokens: Sequence[Tensor],
    t_tokens: Sequence[Tensor],
    k: int = 192,
    w_patch: float = 4.0,
    w_sample: float = 0.1,
    w_rand: float = 0.2,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Manifold distillation (Hao et al. 2022), as used by the [CLS]-KD release.

    s_tokens: list of [B, T, D_s], t_tokens: list of [B, T, D_t] (T = P+N, all tokens; widths may
    differ, token counts must match), one entry per layer pair. Each token is L2-normalised: F.
    Per pair:
    * patch-level: M = F Fᵀ per image [B, T, T]; mean over B·T·T of (M_t − M_s)²;
    * sample-level: per token position the B×B Gram across the batch [T, B, B]; mean over T·B·B;
    * random-level: K = min(k, B·T) distinct rows drawn from the B·T pool with ``torch.randperm`` on
      ``generator`` (one fresh draw per pair, same rows for student and teacher); K×K Gram; mean over K².
    Returns the 0-d mean over pairs of ``w_patch·patch + w_sample·sample + w_rand·random``.
    """
    n_pairs = len(s_tokens)
    if n_pairs == 0 or len(t_tokens) != n_pairs:
        raise ValueError(
            f"need the same non-zero number of student/teacher layers, got {n_pairs}/{len(t_tokens)}"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    dt = _work_dtype(*s_tokens, *t_tokens)
    total = None
    for i, (s, t) in enumerate(zip(s_tokens, t_tokens, strict=True)):
        _check_3d(f"s_tokens[{i}]", s)
        _check_3d(f"t_tokens[{i}]", t)
        if s.shape[:2] != t.shape[:2]:
            raise ValueError(
                f"pair {i}: student {tuple(s.shape)} and teacher {tuple(t.shape)} need the same batch and "
                "token count [B, P+N] (drop or add prefix tokens so they match)"
            )
        B, T, _ = s.shape
        fs = _normalize(s.to(dt))
        ft = _normalize(t.detach().to(dt))
        patch = (fs @ fs.transpose(1, 2) - ft @ ft.transpose(1, 2)).pow(2).mean()
        fs_p, ft_p = fs.transpose(0, 1), ft.transpose(0, 1)                 # [T, B, D]
        sample = (fs_p @ fs_p.transpose(1, 2) - ft_p @ ft_p.transpose(1, 2)).pow(2).mean()
        n_pool = B * T
        n_draw = min(k, n_pool)
        gen_device = generator.device if generator is not None else s.device
        gen = {} if generator is None else {"generator": generator}  # (see random_token_mask)
        idx = torch.randperm(n_pool, device=gen_device, **gen)[:n_draw]
        if idx.device != s.device:  # a generator on another device (no .to call when already there)
            idx = idx.to(s.device)
        rs = fs.reshape(n_pool, -1).index_select(0, idx)
        rt = ft.reshape(n_pool, -1).index_select(0, idx)
        rand = (rs @ rs.t() - rt @ rt.t()).pow(2).mean()
        term = w_patch * patch + w_sample * sample + w_rand * rand
        total = term if total is None else total + term
    return total / n_pairs


# ---------------------------------------------------------------------------------------------- CSKD
def cskd_loss(
    s_patch_logits: Tensor,
    t_dense_logits: Tensor,
    alpha: float | Tensor,
    hard: bool = True,
    T: float = 1.0,
    *,
    grid: tuple[int, int] | None = None,
) -> Tensor:
    """CSKD (Zhao, Song, Liang, ICCV 2023).

    s_patch_logits [B, N, C]: the student head applied to every patch token; t_dense_logits
    [B, C, h_t, w_t]: the CNN teacher's classifier at every location. The student tokens are reshaped
    row-major to [B, C, h, w] (h = w = sqrt(N) unless ``grid=(h, w)``) and adaptive-average-pooled to
    (h_t, w_t) (needs h >= h_t and w >= w_t): S. Teacher fusion (CKF):
    ``Z = α·P_T + (1−α)·mean_{locations} P_T``.
    * hard (default): returns ``CE(S, argmax_c Z)`` averaged over B·h_t·w_t;
    * soft: returns ``T² · Σ_{c, locations} σ(Z/T) (log σ(Z/T) − log σ(S/T)) / B``.
    """
    _check_3d("s_patch_logits", s_patch_logits)
    if t_dense_logits.dim() != 4:
        raise ValueError(f"t_dense_logits must be [B, C, h_t, w_t], got {tuple(t_dense_logits.shape)}")
    B, N, C = s_patch_logits.shape
    if t_dense_logits.shape[:2] != (B, C):
        raise ValueError(
            f"s_patch_logits {tuple(s_patch_logits.shape)} [B, N, C] and t_dense_logits "
            f"{tuple(t_dense_logits.shape)} [B, C, h_t, w_t] need the same B and C"
        )
    h_t, w_t = t_dense_logits.shape[2:]
    h, w = _resolve_grid(N, grid, "cskd_loss")
    if h < h_t or w < w_t:
        raise ValueError(
            f"cskd_loss: the student grid {h}x{w} is smaller than the teacher grid {h_t}x{w_t} and cannot be "
            "pooled to it; use a teacher feature map no larger than the student's patch grid"
        )
    dt = _work_dtype(s_patch_logits, t_dense_logits)
    s = s_patch_logits.to(dt).transpose(1, 2).reshape(B, C, h, w)
    s = F.adaptive_avg_pool2d(s, (h_t, w_t))                               # [B, C, h_t, w_t]
    p = t_dense_logits.detach().to(dt)
    z = alpha * p + (1.0 - alpha) * p.mean(dim=(2, 3), keepdim=True)
    if hard:
        return F.cross_entropy(s, z.argmax(dim=1), reduction="mean")
    log_q = F.log_softmax(z / T, dim=1)
    log_p = F.log_softmax(s / T, dim=1)
    return (log_q.exp() * (log_q - log_p)).sum() * (T * T / B)


def cskd_alpha(epoch: int | float | Tensor, epochs: int, schedule: str = "linear") -> float | Tensor:
    """CSKD fusion weight α for 0-based ``epoch`` of ``epochs``; x = epoch / epochs.

    "linear": 1 − x (the release); "square": (1 − x)²; "cos": cos(π·x/2). Returns a python float, or a
    0-d tensor for a tensor ``epoch`` (the training step passes one: no recompiles, no host sync).
    """
    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    x = epoch / epochs
    if schedule == "linear":
        return 1.0 - x
    if schedule == "square":
        return (1.0 - x) ** 2
    if schedule == "cos":
        return torch.cos(x * (math.pi / 2.0)) if isinstance(x, Tensor) else math.cos(math.pi * x / 2.0)
    raise ValueError(f"unknown cskd_alpha schedule {schedule!r}; use 'linear', 'square' or 'cos'")


# ---------------------------------------------------------------------------------------------- DeiT
def deit_hard_loss(dist_logits: Tensor, t_logits: Tensor) -> Tensor:
    """DeiT hard distillation: dist_logits, t_logits [B, C].

    Returns the 0-d ``mean_b CE(dist_logits, argmax_c t_logits)``.
    """
    _check_2d("dist_logits", dist_logits)
    _check_same_shape("dist_logits", dist_logits, "t_logits", t_logits)
    dt = _work_dtype(dist_logits, t_logits)
    return F.cross_entropy(dist_logits.to(dt), t_logits.detach().argmax(dim=1), reduction="mean")
