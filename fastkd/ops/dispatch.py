"""Loss dispatch: the public loss API of ``fastkd.ops.reference``, routed to the fastest valid path.

Paths (``describe()`` says which in one line; the trainer prints it once):

* ``reference`` — the eager pure-torch reference. Used when fused mode is off (``set_fused(False)``,
  the default), under ``FASTKD_KERNELS=0|reference``, and for inputs the kernels do not take (fp64 or
  fp16 tensors, top-K records with K > 256).
* ``triton`` — the Triton kernels of ``fastkd.kernels`` (registered torch custom ops, so
  ``torch.compile(fullgraph=True)`` works).
* ``compiled`` — ``torch.compile`` of the reference function (same values). Inside an outer
  ``torch.compile`` (``--fused --compile``) the reference is simply inlined into the outer graph.

**Measured dispatch** (fused mode on CUDA with Triton, ``FASTKD_KERNELS=auto``, the default): per op and
input signature, the first eager call times the Triton path against the compiled reference and keeps the
faster; ``--compile`` measures in an eager pass before its trace (``compile_step``). How, and the JSON cache
of the choices: ``fastkd.ops.measure``.

``FASTKD_KERNELS=auto|triton|compiled|reference`` overrides (``0`` = ``reference``, ``1`` = ``auto``).
On CPU fused mode is the compiled reference (Triton needs CUDA) whatever the setting, except in tests:
``set_fused(True, interpreter=True)`` sends CPU tensors to the Triton kernels (run them under
``TRITON_INTERPRET=1``).

Kernel-covered functions (same names and signatures as the reference): ``kd_loss``, ``kd_loss_topk``,
``nkd_loss``, ``nkd_loss_topk``, ``vitkd_mimic_loss``, ``vitkd_gen_loss``, ``cls_patch_map``,
``cls_patch_map_loss``, plus the fused ``token_kd`` (mimic + map + CLS-embedding inputs of one layer
pair in one pass). Every other reference function is re-exported unchanged (same object).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch._dynamo
import torch.nn.functional as F

from fastkd.ops import measure as M
from fastkd.ops import reference as R
from fastkd.ops.measure import cache_path, clear_decisions, decisions
from fastkd.ops.reference import (  # noqa: F401  (re-exported: not kernel-covered)
    ald,
    cls_embed_loss,
    cskd_alpha,
    cskd_loss,
    deit_hard_loss,
    manifold_loss,
    random_token_mask,
)

Tensor = torch.Tensor

__all__ = [
    "set_fused",
    "is_fused",
    "refresh_env",
    "describe",
    "active_path",
    "kernels_mode",
    "decisions",
    "dispatch_record",
    "compile_step",
    "calibrate_step",
    "cache_path",
    "clear_decisions",
    "TokenKD",
    "token_kd",
    "kd_loss",
    "kd_loss_topk",
    "nkd_loss",
    "nkd_loss_topk",
    "vitkd_mimic_loss",
    "vitkd_gen_loss",
    "cls_patch_map",
    "cls_patch_map_loss",
    "cls_embed_loss",
    "random_token_mask",
    "ald",
    "manifold_loss",
    "cskd_loss",
    "cskd_alpha",
    "deit_hard_loss",
]

from fastkd.ops.routing import (  # noqa: E402, F401  (the public routing API, re-exported)
    _FLOAT,
    _S,
    _choose,
    _compiled,
    _cuda_triton_ok,
    _kern,
    _load_kernels,
    _triton_installed,
    active_path,
    calibrate_step,
    compile_step,
    describe,
    dispatch_record,
    fused,
    is_fused,
    kernels_mode,
    refresh_env,
    set_fused,
)


def _needs_grad(x: Tensor) -> bool:
    return x.requires_grad and torch.is_grad_enabled()


def _amp(x: Tensor) -> bool:
    """bf16 autocast on for ``x``'s device type, read at the op boundary and passed to the kernels (dynamo
    traces it as a constant; under torch.compile the kernels run outside the autocast context)."""
    dev = x.device.type
    return torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.bfloat16


def _unit_stride(x: Tensor) -> Tensor:
    return x if x.dim() == 0 or x.stride(-1) == 1 else x.contiguous()


# ------------------------------------------------------------------------------------------ logit KD
@fused(lambda s_logits, t_logits, *a, **k: (s_logits, t_logits))
def kd_loss(s_logits: Tensor, t_logits: Tensor, T: float = 4.0) -> Tensor:
    k = _kern().logit_kd
    s, t = _unit_stride(s_logits), _unit_stride(t_logits.detach())
    dummy = torch.empty(0, dtype=torch.long, device=s.device)
    return k.logit_kd_op(s, t, dummy, float(T), 1.0, False, _needs_grad(s))[0]


@fused(lambda s_logits, t_logits, *a, **k: (s_logits, t_logits), lambda s, *a, **k: s.dim() != 2)
def nkd_loss(
    s_logits: Tensor, t_logits: Tensor, target: Tensor, tau: float = 1.0, gamma: float = 1.0
) -> Tensor:
    B, C = s_logits.shape
    y = R._labels(target, B, C)
    k = _kern().logit_kd
    s, t = _unit_stride(s_logits), _unit_stride(t_logits.detach())
    return k.logit_kd_op(s, t, y, float(tau), float(gamma), True, _needs_grad(s))[0]


def _topk_ok(t_vals: Tensor) -> bool:
    return t_vals.dim() == 2 and t_vals.shape[1] <= _kern().logit_kd.MAX_TOPK


# top-K records: the student's logits decide the path (the record's values may be fp16; the launcher
# checks them); K above the kernels' MAX_TOPK takes the reference
@fused(lambda s_logits, *a, **k: (s_logits,), lambda s_logits, t_vals, *a, **k: not _topk_ok(t_vals))
def kd_loss_topk(s_logits: Tensor, t_vals: Tensor, t_ids: Tensor, t_lse: Tensor, T: float = 4.0) -> Tensor:
    k = _kern().logit_kd
    s = _unit_stride(s_logits)
    dummy = torch.empty(0, dtype=torch.long, device=s.device)
    vals, ids, lse = _unit_stride(t_vals.detach()), _unit_stride(t_ids), t_lse.detach()
    return k.logit_kd_topk_op(s, vals, ids, lse, dummy, float(T), 1.0, False, _needs_grad(s))[0]


@fused(
    lambda s_logits, *a, **k: (s_logits,),
    lambda s_logits, t_vals, *a, **k: not _topk_ok(t_vals) or s_logits.dim() != 2,
)
def nkd_loss_topk(
    s_logits: Tensor,
    t_vals: Tensor,
    t_ids: Tensor,
    t_lse: Tensor,
    target: Tensor,
    tau: float = 1.0,
    gamma: float = 1.0,
) -> Tensor:
    B, C = s_logits.shape
    y = R._labels(target, B, C)
    k = _kern().logit_kd
    s = _unit_stride(s_logits)
    vals, ids, lse = _unit_stride(t_vals.detach()), _unit_stride(t_ids), t_lse.detach()
    return k.logit_kd_topk_op(s, vals, ids, lse, y, float(tau), float(gamma), True, _needs_grad(s))[0]


# ---------------------------------------------------------------------------------------- token KD
class TokenKD(NamedTuple):
    """Outputs of ``token_kd`` (None where not requested).

    mimic: 0-d Σ_{n,d} (W s + b − t)² over patch tokens (raw sum; ViTKD multiplies by α/B);
    cls_map: 0-d mean over B·N of (a_t − a_s)² (the [CLS]-KD map loss);
    s_cls [B, D_s] / t_cls [B, D_t]: norm of the student / teacher CLS token, fp32 — the inputs of
    ``cls_embed_loss`` (which re-normalises them: a no-op up to rounding).
    """

    mimic: Tensor | None
    cls_map: Tensor | None
    s_cls: Tensor | None
    t_cls: Tensor | None


def _token_kd_reference(s_tokens, t_tokens, weight, bias, num_prefix_s, num_prefix_t, mimic, cls_map):
    mim = cmap = s_cls = t_cls = None
    if mimic:
        B = s_tokens.shape[0]
        mim = R.vitkd_mimic_loss(
            [s_tokens[:, num_prefix_s:]], [t_tokens[:, num_prefix_t:]], [weight], [bias], alpha=float(B)
        )
    if cls_map:
        cmap = R.cls_patch_map_loss(s_tokens, t_tokens, num_prefix_s, num_prefix_t)
        s_cls = F.normalize(s_tokens[:, 0].to(cmap.dtype), dim=-1, eps=1e-12)
        t_cls = F.normalize(t_tokens[:, 0].detach().to(cmap.dtype), dim=-1, eps=1e-12)
    return TokenKD(mim, cmap, s_cls, t_cls)


def token_kd(
    s_tokens: Tensor,
    t_tokens: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    num_prefix_s: int = 1,
    num_prefix_t: int = 1,
    mimic: bool = True,
    cls_map: bool = True,
) -> TokenKD:
    """Mimic MSE + CLS–patch map loss + CLS-embedding inputs of one layer pair, in one pass.

    s_tokens [B, P_s+N, D_s], t_tokens [B, P_t+N, D_t] (all tokens, CLS at index 0); weight [D_t, D_s] /
    bias [D_t] of the mimic projection (None = identity / 0). Returns ``TokenKD`` (see its docstring).
    """
    if not (mimic or cls_map):
        raise ValueError("token_kd: nothing to compute; pass mimic=True and/or cls_map=True")
    args = (s_tokens, t_tokens, weight, bias, num_prefix_s, num_prefix_t, mimic, cls_map)
    xs = [x for x in (s_tokens, t_tokens, weight, bias) if x is not None]
    path = _choose("token_kd", xs, _TOKEN_KD_RUNNERS, args, {})
    if path == "reference":
        return _token_kd_reference(*args)
    if path == "compiled":
        return _token_kd_compiled(*args)
    return _token_kd_triton(*args)


def _token_kd_compiled(*args) -> TokenKD:
    return TokenKD(*_compiled("_token_kd", _token_kd_reference)(*args))


def _token_kd_triton(s_tokens, t_tokens, weight, bias, num_prefix_s, num_prefix_t, mimic, cls_map) -> TokenKD:
    k = _kern().token_kd
    B, N = s_tokens.shape[0], s_tokens.shape[1] - num_prefix_s
    # the map's mean over B·N is the op's map_scale: applied in its kernels, no division launched
    mim, cmap, _, s_cls, t_cls, _ = k.token_kd_op(
        _unit_stride(s_tokens),
        _unit_stride(t_tokens.detach()),
        weight if mimic else None,
        bias if mimic else None,
        num_prefix_s,
        num_prefix_t,
        mimic,
        cls_map,
        _amp(s_tokens),
        map_scale=1.0 / (B * N) if B * N else 1.0,
    )
    if not cls_map:
        return TokenKD(mim, None, None, None)
    if B * N == 0:  # an empty batch: the mean of nothing is nan, as in the reference
        cmap = cmap / 0.0
    return TokenKD(mim if mimic else None, cmap, s_cls, t_cls)


_TOKEN_KD_RUNNERS = {"triton": _token_kd_triton, "compiled": _token_kd_compiled}


def _mimic_tensors(s_feats, t_feats, weights=None, biases=None, *a, **k):
    n = len(s_feats)
    ws = [None] * n if weights is None else list(weights)
    bs = [None] * n if biases is None else list(biases)
    return (*s_feats, *t_feats, *ws, *bs)


def _mimic_unsupported(s_feats, t_feats, weights=None, biases=None, *a, **k):
    n = len(s_feats)
    return (
        len(t_feats) != n
        or (weights is not None and len(weights) != n)
        or (biases is not None and len(biases) != n)
    )


def _whole_tokens(s: Tensor, traced: bool | None = None) -> tuple[Tensor, int]:
    """(x, P) when ``s`` is exactly the patch view ``x[:, P:]`` of a [B, P+N, D] tensor x
    (``measure.patch_view``), else (s, 0). Given x whole with ``num_prefix_s = P`` the op writes dx in
    one pass (prefix rows 0) and the gradient reaches x directly: autograd runs no SliceBackward, a
    zeros + copy of all of x per layer (90 µs per DeiT-S layer on the H100, bench/NOTES.md). Eager form
    only: in the ``traced`` form (a trace, and a compiled step's calibration: ``measure.traced_form``) the
    view is taken as it is; None: read it now."""
    pv = None if (M.traced_form() if traced is None else traced) else M.patch_view(s)
    return pv if pv is not None else (s, 0)


@fused(_mimic_tensors, _mimic_unsupported)
def vitkd_mimic_loss(
    s_feats: Sequence[Tensor],
    t_feats: Sequence[Tensor],
    weights: Sequence[Tensor | None] | None,
    biases: Sequence[Tensor | None] | None,
    alpha: float = 3e-5,
) -> Tensor:
    """Under autocast, with a backward to follow and layers of one shape (ViTKD's two), one op for all
    layers (``mimic_layers_op``: one batched GEMM per product, one autograd node); else, and in the traced
    form (``measure.traced_form``: under torch.compile, and while a compiled step calibrates, so that it
    measures what its trace runs), one op per layer."""
    n = len(s_feats)
    ws = [None] * n if weights is None else list(weights)
    bs = [None] * n if biases is None else list(biases)
    k = _kern().token_kd
    B = s_feats[0].shape[0]
    amp = _amp(s_feats[0])
    grad = torch.is_grad_enabled()
    traced = M.traced_form()
    xs, ts, Ps, saves = [], [], [], []
    for i, (s, t, w, b) in enumerate(zip(s_feats, t_feats, ws, bs, strict=True)):
        if s.dim() != 3 or t.dim() != 3 or s.shape[:2] != t.shape[:2] or s.shape[0] != B:
            raise ValueError(
                f"vitkd_mimic_loss layer {i}: student {tuple(s.shape)} and teacher {tuple(t.shape)} "
                f"need the same [B, N] (B={B})"
            )
        # a backward follows: under autocast the kernels then store the bf16 residual instead of recomputing
        saves.append(grad and any(v is not None and v.requires_grad for v in (s, w, b)))
        x, P = _whole_tokens(s, traced)
        xs.append(_unit_stride(x))
        Ps.append(P)
        ts.append(_unit_stride(t.detach()))
    P0 = Ps[0]
    # a number α: α/B is the ops' factor, applied in the kernels (no multiplication launched); a tensor α
    # (a schedule on the device) multiplies the sum, as in the reference, without a host read
    scale, outer = (1.0, alpha / B) if isinstance(alpha, Tensor) else (alpha / B, None)
    stacked = not traced and all(saves) and all(P == P0 for P in Ps)  # eager form only
    if stacked and k.mimic_layers_ok(xs, ts, ws, bs, P0, amp):
        total = k.mimic_layers_op(xs, ts, ws, bs, P0, scale)
    else:
        total = None
        for x, P, t, w, b, save in zip(xs, Ps, ts, ws, bs, saves, strict=True):
            term = k.token_kd_op(x, t, w, b, P, 0, True, False, amp, save, mim_scale=scale)[0]
            total = term if total is None else total + term
    return total if outer is None else total * outer


@fused(lambda tokens, *a, **k: (tokens,), lambda tokens, *a, **k: tokens.dim() != 3)
def cls_patch_map(tokens: Tensor, num_prefix: int = 1) -> Tensor:
    k = _kern().token_kd
    return k.token_kd_op(_unit_stride(tokens), None, None, None, num_prefix, 0, False, True, _amp(tokens))[2]


@fused(lambda s_tokens, t_tokens, *a, **k: (s_tokens, t_tokens), lambda s, *a, **k: s.dim() != 3)
def cls_patch_map_loss(
    s_tokens: Tensor, t_tokens: Tensor, num_prefix_s: int = 1, num_prefix_t: int = 1
) -> Tensor:
    return _token_kd_triton(s_tokens, t_tokens, None, None, num_prefix_s, num_prefix_t, False, True).cls_map


# ----------------------------------------------------------------------------------- ViTKD generation
def _gen_tensors(s_last, t_last, mask, weight, bias, mask_token, *a, **k):
    return (s_last, t_last, weight, bias, mask_token)


def _gen_unsupported(s_last, t_last, *a, **k):
    return s_last.dim() != 3 or t_last.dim() != 3


def _call_generator(generator, x):
    return generator(x)


def _compile_generator_here(x: Tensor) -> bool:
    return x.is_cuda


def _run_generator(generator, x: Tensor) -> Tensor:
    """The generator as the Triton path runs it. An ``nn.Module`` on CUDA, outside a trace: through one
    ``torch.compile``d call (``_call_generator``, the module an argument, so no module is held), so that
    inductor fuses its bias adds, ReLU and their gradients around cuDNN's convolutions, as it does inside
    the compiled reference, which the dispatch times it against (eager, each is a pass of its own over
    [B, D_t, h, w]: the H100 measured the fused gen at 0.89× compiled with the generator eager). Inside an
    outer ``torch.compile`` it is inlined there; on CPU and for a plain callable it runs as it is."""
    module = isinstance(generator, torch.nn.Module)
    if module and _compile_generator_here(x) and not torch.compiler.is_compiling():
        try:
            return _compiled("_generator", _call_generator)(generator, x)
        except torch._dynamo.exc.TorchDynamoException as e:  # a compile failure: eager from now on
            _S.compiled["_generator"] = _call_generator
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            print(f"fastkd: the ViTKD generator runs eagerly (torch.compile failed: {first})",
                  file=sys.stderr)
    return generator(x)


@fused(_gen_tensors, _gen_unsupported)
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
    """Triton path: one kernel builds the generator input (projection + mask-token substitution, laid out
    channels_last [B, D_t, h, w]); the generator runs in torch (cuDNN; compiled on CUDA: ``_run_generator``);
    one kernel computes the masked squared error and its gradient. Under autocast the generator input is
    made in the autocast dtype."""
    B, _, d_t, h, w = R.gen_loss_shapes(s_last, t_last, mask, mask_token, mask_ratio, grid)
    amp = _amp(s_last)
    if amp:
        x_dtype = torch.bfloat16  # the generator's convolutions would cast it to bf16 anyway
    else:
        x_dtype = R._work_dtype(s_last, t_last, weight, bias, mask_token)
    k = _kern().masked_gen
    x = k.gen_input_op(_unit_stride(s_last), mask, weight, bias, mask_token, h, w, x_dtype, amp)
    g = R.check_generator_output(_run_generator(generator, x), B, d_t, h, w)
    if g.dtype not in _FLOAT:
        g = g.float()
    loss, _ = k.gen_loss_op(g, _unit_stride(t_last.detach()), mask, beta / (mask_ratio * B), _needs_grad(g))
    return loss
