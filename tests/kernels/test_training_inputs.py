"""The fused ops on exactly what training hands them (issues 12 item 4 and 13 item 3).

Under bf16 autocast, timm's ViT residual stream stays fp32: the ViTKD / [CLS]-KD taps are fp32
[B, P+N, D] tensors and the patch tokens are NON-contiguous views [B, N, D] of them (row stride D, sample
stride (P+N)·D). This file captures those tensors from a real timm forward under autocast (CPU autocast
here; CUDA autocast keeps the same fp32 residual stream, as ``../shared/gpu/.../sync_report.txt`` shows
for the H200 step), checks their dtype/strides are what the kernels are specialised for, then runs the
kernels on exactly those tensors, with ``amp=True`` as the dispatch passes it under autocast, against:

* the reference run under the same autocast (torch's own bf16 error), and the fp64 reference;
* the flash-attention rule (DESIGN.md): kernel error ≤ 2 × torch's bf16 error + small atol.

Shapes: odd B (3), 1 prefix (ViT) and 2 prefixes (DeiT-distilled), D_s ≠ D_t and D_s = D_t, random
upstream gradients. The kernels must never copy the strided fp32 tokens (no ``.contiguous()``): the
gradient flows to the [B, P+N, D] leaf through the view.
"""

import pytest
import torch
from kd_testutil import DEVICE, assert_bf16, bf16_scalar_atol, randn, upstream_scalar  # noqa: F401

from fastkd.kernels import _utils
from fastkd.kernels import masked_gen as mg
from fastkd.kernels import token_kd as tk
from fastkd.losses import reference as R

timm = pytest.importorskip("timm")


def _vit(kind: str, dim: int, seed: int):
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    cls = VisionTransformerDistilled if kind == "deit-distilled" else VisionTransformer
    return cls(img_size=32, patch_size=8, embed_dim=dim, depth=2, num_heads=2, num_classes=10).to(DEVICE)


def capture(kind: str, dim: int, seed: int, B: int = 3):
    """Block-0 output and final tokens of a real timm ViT forward under bf16 autocast, as fastkd's
    ``forward_taps`` builds them (prefix tokens concatenated back in front). Returns (block0 [B,P+N,D],
    last [B,P+N,D], P), detached: the test makes its own leaves with the same strides."""
    model = _vit(kind, dim, seed)
    x = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        tokens, inter = model.forward_intermediates(
            x, indices=[0], return_prefix_tokens=True, norm=False, output_fmt="NLC"
        )
        block0 = torch.cat([inter[0][1], inter[0][0]], dim=1)
    return block0, tokens, int(model.num_prefix_tokens)


def leaf_like(x: torch.Tensor) -> torch.Tensor:
    """A grad-requiring leaf with x's values, dtype, shape and strides."""
    out = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    return out.copy_(x.detach()).requires_grad_()


PAIRS = {  # (student kind, D_s, teacher kind, D_t)
    "vit,ds!=dt": ("vit", 48, "vit", 64),
    "deit-distilled student,ds=dt": ("deit-distilled", 64, "vit", 64),
}


@pytest.fixture(scope="module", params=list(PAIRS))
def taps(request):
    ks, ds, kt, dt = PAIRS[request.param]
    s0, s_last, P_s = capture(ks, ds, seed=1)
    t0, t_last, P_t = capture(kt, dt, seed=2)
    return dict(name=request.param, s0=s0, s_last=s_last, P_s=P_s, t0=t0, t_last=t_last, P_t=P_t)


def test_training_hands_fp32_strided_patch_views(taps):
    """The contract the kernels are specialised for (fails if timm or the tap code changes it)."""
    for key, P in (("s0", taps["P_s"]), ("s_last", taps["P_s"]), ("t0", taps["P_t"])):
        full = taps[key]
        view = full[:, P:]
        assert full.dtype == torch.float32, f"{key}: {full.dtype}"
        assert not view.is_contiguous() and view.stride(-1) == 1
        assert view.stride(0) == full.shape[1] * full.shape[2] and view.stride(1) == full.shape[2]


def _grads(leaves):
    out = [v.grad for v in leaves]
    for v in leaves:
        v.grad = None
    return out


def _three(tensors, fn, up):
    """fn run three ways on copies of ``tensors`` (leaves keep their strides): (kernel under amp,
    reference under autocast, fp64 reference). Returns [(outputs, grads)] × 3."""
    res = []
    for mode in ("kernel", "low", "ref"):
        if mode == "ref":
            leaves = [
                v.detach().double().requires_grad_() if v.requires_grad else v.double() for v in tensors
            ]
        else:
            leaves = [leaf_like(v) if v.requires_grad else v for v in tensors]
        if mode == "low":
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
                outs = fn(mode, *leaves)
        else:
            outs = fn(mode, *leaves)
        total = sum((u * o.double()).sum() for u, o in zip(up, outs, strict=True))
        total.backward()
        res.append((outs, _grads([v for v in leaves if v.requires_grad])))
    return res


def _check(res, names, gnames, what, n_terms=None):
    """The 2x rule on every output and gradient; 0-d sums get ``bf16_scalar_atol`` (``n_terms``: how many
    bf16-rounded terms the sum has)."""
    (k, kg), (lo, lg), (r, rg) = res
    for n, a, b, c in zip(names, k, lo, r, strict=True):
        atol = bf16_scalar_atol(c, n_terms[n]) if (a.dim() == 0 and n_terms and n in n_terms) else None
        assert_bf16(a, b, c, f"{what}: {n}", atol=atol)
    for n, a, b, c in zip(gnames, kg, lg, rg, strict=True):
        assert a.dtype == b.dtype, f"{what}: d{n} dtype {a.dtype} != autocast reference {b.dtype}"
        assert_bf16(a, b, c, f"{what}: d{n}")


@pytest.mark.parametrize("save_residual", [False, True], ids=["recompute", "stored-residual"])
def test_mimic_on_training_inputs(taps, save_residual):
    """ViTKD mimic: fp32 strided patch views of both, fp32 W / b, the bf16 tensor-core path (amp=True);
    the backward either recomputes the residual or uses the bf16 one the forward stored."""
    s_full, t_full, P_s, P_t = taps["s0"], taps["t0"], taps["P_s"], taps["P_t"]
    D_s, D_t = s_full.shape[2], t_full.shape[2]
    g = torch.Generator().manual_seed(3)
    s_leaf = s_full.clone().requires_grad_()
    W = randn(D_t, D_s, gen=g, scale=D_s**-0.5).requires_grad_()
    b = randn(D_t, gen=g, scale=0.1).requires_grad_()
    up = [upstream_scalar(g)]

    def fn(mode, s_full_, W_, b_):
        s, t = s_full_[:, P_s:], (t_full.double() if mode == "ref" else t_full)[:, P_t:]
        if mode == "kernel":
            assert s.dtype == torch.float32 and not s.is_contiguous()
            return [tk.token_kd_op(s, t, W_, b_, 0, 0, True, False, True, save_residual)[0]]
        return [R.vitkd_mimic_loss([s], [t], [W_], [b_], alpha=float(s.shape[0]))]

    n_terms = {"mim": s_full[:, P_s:].shape[0] * s_full[:, P_s:].shape[1] * D_t}
    _check(_three([s_leaf, W, b], fn, up), ["mim"], ["s", "W", "b"], taps["name"], n_terms)


@pytest.fixture(params=["cublas", "triton"])
def route(request, monkeypatch):
    """The stacked mimic's forward GEMM (``tk.mimic_route``): cuBLAS + the streaming epilogue, or the GEMM
    inside the epilogue kernel; on a GPU the first call of a shape times both, here each is forced."""
    monkeypatch.setenv("FASTKD_MIMIC_GEMM", request.param)
    return request.param


@pytest.mark.parametrize("alpha", ["B", "vitkd"])  # the op's scale α/B: 1, or ViTKD's default 3e-5/B
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_mimic_layers_on_training_inputs(taps, bias, alpha, route):
    """ViTKD's two mimic layers in one op (``mimic_layers_op``: batched GEMMs over the layer stack) on the
    fp32 block outputs taken whole (P prefix tokens skipped) and the teacher's patch views, under the
    2x rule against the reference under autocast; its loss and gradients also agree with two one-layer
    ops (the same rounding; only the GEMMs' summation order differs; the Triton GEMM route keeps Y in
    fp32 where cuBLAS rounds it to bf16, so there the agreement is the bf16 rule's). The loss's α/B is
    the ops' factor, as the dispatch passes it."""
    P_s, P_t = taps["P_s"], taps["P_t"]
    s_fulls = [taps["s0"], taps["s_last"]]
    t_fulls = [taps["t0"], taps["t_last"]]
    B, T, D_s = s_fulls[0].shape
    N, D_t = T - P_s, t_fulls[0].shape[2]
    g = torch.Generator().manual_seed(7)
    a = float(B) if alpha == "B" else 3e-5
    Ws = [randn(D_t, D_s, gen=g, scale=D_s**-0.5).requires_grad_() for _ in range(2)]
    bs = [randn(D_t, gen=g, scale=0.1).requires_grad_() for _ in range(2)] if bias else [None, None]
    up = [upstream_scalar(g)]
    ts = [t[:, P_t:] for t in t_fulls]
    assert tk.mimic_layers_ok(s_fulls, ts, Ws, bs, P_s, True)

    def fn(mode, s0_, s1_, W0, W1, *b_):
        b_ = list(b_) if bias else [None, None]
        if mode == "kernel":
            return [tk.mimic_layers_op([s0_, s1_], ts, [W0, W1], b_, P_s, a / B)]
        t = [x.double() if mode == "ref" else x for x in ts]
        return [R.vitkd_mimic_loss([s0_[:, P_s:], s1_[:, P_s:]], t, [W0, W1], b_, alpha=a)]

    leaves = [*(x.clone().requires_grad_() for x in s_fulls), *Ws, *(bs if bias else [])]
    names = ["s0", "s1", "W0", "W1", *(["b0", "b1"] if bias else [])]
    res = _three(leaves, fn, up)
    _check(res, ["mim"], names, taps["name"], {"mim": 2 * B * N * D_t})

    # two one-layer ops (stored residual) on copies of the same leaves
    pl = [leaf_like(v) for v in leaves]
    b_ = pl[4:] if bias else [None, None]
    terms = [tk.token_kd_op(x, t, w, bb, P_s, 0, True, False, True, True, mim_scale=a / B)[0]
             for x, t, w, bb in zip(pl[:2], ts, pl[2:4], b_, strict=True)]
    p_out = [terms[0] + terms[1]]
    (up[0] * p_out[0].double()).backward()
    (k_out, k_grads), p_grads = res[0], _grads(pl)
    assert_bf16(k_out[0], p_out[0], res[2][0][0], "stack vs per layer: loss",
                atol=bf16_scalar_atol(res[2][0][0], 2 * B * N * D_t))
    for n, a, b in zip(names, k_grads, p_grads, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, n
        assert_bf16(a, b, res[2][1][names.index(n)], f"stack vs per layer: d{n}")


def test_mimic_layers_on_bf16_tokens(taps, route):
    """The stacked op on a bf16 student (a model run in bf16, not under autocast): S needs no rounding, dX
    comes out of the GEMM in bf16 (no fp32 output), still within the 2x rule of the reference under
    autocast, with zero prefix rows."""
    P_s, P_t = taps["P_s"], taps["P_t"]
    s_fulls = [taps["s0"].to(torch.bfloat16), taps["s_last"].to(torch.bfloat16)]
    ts = [taps["t0"][:, P_t:], taps["t_last"][:, P_t:]]
    B, T, D_s = s_fulls[0].shape
    N, D_t = T - P_s, ts[0].shape[2]
    g = torch.Generator().manual_seed(17)
    Ws = [randn(D_t, D_s, gen=g, scale=D_s**-0.5).requires_grad_() for _ in range(2)]
    assert tk.mimic_layers_ok(s_fulls, ts, Ws, [None, None], P_s, True)

    def fn(mode, s0_, s1_, W0, W1):
        if mode == "kernel":
            return [tk.mimic_layers_op([s0_, s1_], ts, [W0, W1], [None, None], P_s)]
        t = [x.double() if mode == "ref" else x for x in ts]
        return [R.vitkd_mimic_loss([s0_[:, P_s:], s1_[:, P_s:]], t, [W0, W1], [None, None], alpha=float(B))]

    leaves = [*(x.clone().requires_grad_() for x in s_fulls), *Ws]
    res = _three(leaves, fn, [upstream_scalar(g)])
    _check(res, ["mim"], ["s0", "s1", "W0", "W1"], taps["name"], {"mim": 2 * B * N * D_t})
    for dx in res[0][1][:2]:
        assert dx.dtype == torch.bfloat16 and torch.count_nonzero(dx[:, :P_s]) == 0


def _two_layer_inputs(taps, seed):
    """(P_s, [W0, W1], [t0, t_last] patch views): two mimic layers' projections (grad-requiring) and
    teacher tokens on the captured taps."""
    P_s, P_t = taps["P_s"], taps["P_t"]
    D_t, D_s = taps["t0"].shape[2], taps["s0"].shape[2]
    g = torch.Generator().manual_seed(seed)
    Ws = [randn(D_t, D_s, gen=g, scale=D_s**-0.5).requires_grad_() for _ in range(2)]
    return P_s, Ws, [taps["t0"][:, P_t:], taps["t_last"][:, P_t:]]


def test_mimic_layers_with_a_frozen_layer(taps):
    """A layer whose block output needs no gradient (a frozen block) gets none; the others' gradients are
    those of the all-trainable op, bit for bit (one GEMM writes every layer's dX)."""
    P_s, Ws, ts = _two_layer_inputs(taps, 11)
    grads = []
    for frozen in (False, True):
        s0 = taps["s0"].detach().clone().requires_grad_(not frozen)
        s1 = taps["s_last"].detach().clone().requires_grad_()
        loss = tk.mimic_layers_op([s0, s1], ts, Ws, [None, None], P_s)
        loss.backward()
        assert (s0.grad is None) == frozen
        grads.append((s1.grad, *(w.grad.clone() for w in Ws)))
        for w in Ws:
            w.grad = None
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_mimic_layers_writes_every_element_it_reads(taps, monkeypatch, route):
    """The stacked op allocates its buffers uninitialised (r and the stacks in whole-row layout, the
    partial sums): with every allocation poisoned with NaN the loss and gradients are unchanged, so the
    epilogue writes each prefix row of r (0) and dX's prefix rows come out of the GEMM as exact zeros."""
    P_s, Ws, ts = _two_layer_inputs(taps, 13)
    xs = [taps["s0"], taps["s_last"]]

    def run():
        leaves = [leaf_like(x) for x in xs]
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            loss = tk.mimic_layers_op(leaves, ts, Ws, [None, None], P_s)
        return loss.detach(), torch.autograd.grad(loss, [*leaves, *Ws], torch.tensor(0.37, device=DEVICE))

    clean = run()
    empty_like, new_empty, nan = torch.empty_like, torch.Tensor.new_empty, float("nan")
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: empty_like(*a, **k).fill_(nan))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: new_empty(self, *a, **k).fill_(nan))
    poisoned = run()
    monkeypatch.undo()
    assert torch.equal(clean[0], poisoned[0])
    for a, b in zip(clean[1], poisoned[1], strict=True):
        assert torch.equal(a, b)
    for dx in poisoned[1][:2]:
        assert torch.count_nonzero(dx[:, :P_s]) == 0 and torch.count_nonzero(dx[:, P_s:]) > 0


def test_the_dispatch_mimic_takes_the_traced_form_when_a_compiled_step_calibrates(taps, monkeypatch):
    """``vitkd_mimic_loss``'s Triton path on ViTKD's patch views under autocast: in the eager form one
    stacked op on the block outputs taken whole; in the traced form (under torch.compile, and while a
    compiled step calibrates, so that it measures what the trace runs) one op per layer on the views.
    Same loss and gradients within the bf16 rule."""
    from fastkd.ops import dispatch as KF
    from fastkd.ops import measure as M

    P_s, Ws, ts = _two_layer_inputs(taps, 5)
    calls = []
    stacked, one = tk.mimic_layers_op, tk.token_kd_op
    monkeypatch.setattr(tk, "mimic_layers_op", lambda xs, ts, ws, bs, P, *a: calls.append(("stack", P)) or
                        stacked(xs, ts, ws, bs, P, *a))
    monkeypatch.setattr(tk, "token_kd_op", lambda x, t, w, b, P, *a, **k: calls.append(("layer", P)) or
                        one(x, t, w, b, P, *a, **k))
    out = {}
    for form in (False, True):
        xs = [leaf_like(taps["s0"]), leaf_like(taps["s_last"])]
        M._S.traced_form = form
        try:
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
                loss = KF.vitkd_mimic_loss.kernel_fn([x[:, P_s:] for x in xs], ts, Ws, None, alpha=0.5)
        finally:
            M._S.traced_form = False
        grads = torch.autograd.grad(loss, [*xs, *Ws])
        out[form] = (loss.detach(), grads)
    assert calls == [("stack", P_s), ("layer", 0), ("layer", 0)], calls
    (l0, g0), (l1, g1) = out[False], out[True]
    # measured drift on CPU: 0 (the same bf16 products). On a GPU cuBLAS's bmm and mm may sum in another
    # order and round an element of Y = S Wᵀ to the neighbouring bf16 value: ≤ 2 bf16 ulps (2⁻⁷) allowed
    tol = dict(rtol=2**-7, atol=0)
    torch.testing.assert_close(l0, l1, **tol)
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(a, b, rtol=2**-7, atol=2**-7 * float(b.abs().max()))


def test_mimic_layers_declines_what_it_does_not_take(taps):
    """Layers of different shapes, a missing projection, mixed biases, autocast off or one layer: the
    dispatch keeps one op per layer."""
    P, s, t = taps["P_s"], taps["s0"], taps["t0"][:, taps["P_t"] :]
    D_t, D_s = t.shape[2], s.shape[2]
    W = torch.zeros(D_t, D_s, device=DEVICE)
    b = torch.zeros(D_t, device=DEVICE)
    ok = tk.mimic_layers_ok
    assert ok([s, s], [t, t], [W, W], [b, b], P, True)
    assert not ok([s, s], [t, t], [W, W], [b, b], P, False)  # autocast off: exact fp32, one op per layer
    assert not ok([s], [t], [W], [b], P, True)
    assert not ok([s, s[:1]], [t, t[:1]], [W, W], [b, b], P, True)
    assert not ok([s, s], [t, t], [W, None], [b, b], P, True)
    assert not ok([s, s], [t, t], [W, W], [b, None], P, True)
    assert not ok([s, s], [t, t.contiguous()], [W, W], [b, b], P, True)  # other strides


def test_mimic_and_map_fused_on_training_inputs(taps):
    """token_kd with the prefix tokens (mimic + map + CLS inputs in one pass) on the fp32 block output."""
    s_full, t_full, P_s, P_t = taps["s0"], taps["t0"], taps["P_s"], taps["P_t"]
    B, T, D_s = s_full.shape
    N, D_t = T - P_s, t_full.shape[2]
    g = torch.Generator().manual_seed(4)
    W = randn(D_t, D_s, gen=g, scale=D_s**-0.5).requires_grad_()
    b = randn(D_t, gen=g, scale=0.1).requires_grad_()
    up = [upstream_scalar(g), upstream_scalar(g), randn(B, N, gen=g), randn(B, D_s, gen=g)]

    def fn(mode, s_, W_, b_):
        t = t_full.double() if mode == "ref" else t_full
        if mode == "kernel":
            mim, msum, a_s, s_cls, _, _ = tk.token_kd_op(s_, t, W_, b_, P_s, P_t, True, True, True)
            return [mim, msum, a_s, s_cls]
        mim = R.vitkd_mimic_loss([s_[:, P_s:]], [t[:, P_t:]], [W_], [b_], alpha=float(B))
        msum = R.cls_patch_map_loss(s_, t, P_s, P_t) * (B * N)
        a_s = R.cls_patch_map(s_, P_s)
        s_cls = torch.nn.functional.normalize(s_[:, 0].to(a_s.dtype), dim=-1)
        return [mim, msum, a_s, s_cls]

    res = _three([s_full.clone().requires_grad_(), W, b], fn, up)
    # the map sum is fp32 math on fp32 tokens in both paths (no bf16 rounding): no scalar atol for it
    _check(res, ["mim", "map", "a_s", "s_cls"], ["s", "W", "b"], taps["name"], {"mim": B * N * D_t})


def test_gen_input_on_training_inputs(taps):
    """ViTKD generation input: the final tokens' fp32 strided patch view, bf16 generator input (autocast)."""
    s_full, P_s, D_t = taps["s_last"], taps["P_s"], taps["t0"].shape[2]
    B, T, D_s = s_full.shape
    N = T - P_s
    h = w = int(N**0.5)
    g = torch.Generator().manual_seed(5)
    W = randn(D_t, D_s, gen=g, scale=D_s**-0.5).requires_grad_()
    b = randn(D_t, gen=g, scale=0.1).requires_grad_()
    tok = randn(D_t, gen=g).requires_grad_()
    mask = R.random_token_mask(B, N, 0.5, generator=g).to(DEVICE)
    up = [randn(B, D_t, h, w, gen=g)]

    def fn(mode, s_full_, W_, b_, tok_):
        s = s_full_[:, P_s:]
        if mode == "kernel":
            assert s.dtype == torch.float32 and not s.is_contiguous()
            return [mg.gen_input_op(s, mask, W_, b_, tok_, h, w, torch.bfloat16, True)]
        x = torch.nn.functional.linear(s, W_, b_)
        x = torch.where(mask[:, :, None], tok_.reshape(1, 1, -1).to(x.dtype), x)
        return [x.transpose(1, 2).reshape(B, D_t, h, w)]

    res = _three([s_full.clone().requires_grad_(), W, b, tok], fn, up)
    assert res[0][0][0].dtype == torch.bfloat16
    _check(res, ["x"], ["s", "W", "b", "tok"], taps["name"])


def test_kernels_never_copy_the_strided_tokens(taps):
    """No fp32 copy and no .contiguous() of the [B, N, D] views: the only token-sized allocations of a
    fwd+bwd are the outputs the op must produce (dS) and the GEMM-dtype (bf16) operands of cuBLAS."""
    from torch.utils._python_dispatch import TorchDispatchMode

    s_full, t_full, P_s, P_t = taps["s0"], taps["t0"], taps["P_s"], taps["P_t"]
    D_s, D_t = s_full.shape[2], t_full.shape[2]
    s_leaf = s_full.clone().requires_grad_()
    W = torch.zeros(D_t, D_s, device=DEVICE, requires_grad=True)
    numel_s = s_full[:, P_s:].numel()

    class Allocs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.fp32_token_sized = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            src = args[0] if args and isinstance(args[0], torch.Tensor) else None
            # an upcast of a bf16 tensor is no copy of the fp32 tokens: ``_utils.gemm_to``'s CPU stand-in for
            # cuBLAS's fp32-out GEMM (one ``mm.dtype`` call on CUDA) upcasts its bf16 operands
            upcast = name == "_to_copy" and src is not None and src.dtype == torch.bfloat16
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if (
                    not upcast
                    and isinstance(o, torch.Tensor)
                    and o.dtype == torch.float32
                    and o.numel() >= numel_s
                    # dW cast to W's dtype is W-sized, not token-sized (visible since the eager path runs the
                    # launchers outside a custom op; at these test shapes D_t·D_s can exceed B·N·D_s)
                    and tuple(o.shape) != (D_t, D_s)
                    and name in ("clone", "contiguous", "_to_copy", "copy", "empty_like", "clone_")
                ):
                    self.fp32_token_sized.append(name)
            return out

    with Allocs() as mode:
        mim = tk.token_kd_op(s_leaf[:, P_s:], t_full[:, P_t:], W, None, 0, 0, True, False, True)[0]
        mim.backward()
    assert mode.fp32_token_sized == [], f"fp32 token copies: {mode.fp32_token_sized}"


@pytest.mark.parametrize("dim", [2, 3])
def test_the_fp32_out_gemm_call_is_valid(dim):
    """``_utils.gemm_to``'s CUDA call (``out_dtype=torch.float32`` on bf16 operands) as the mimic backward
    makes it, on meta tensors: this torch has the overload and it gives an fp32 [.., M, D_s] product. On
    CPU the stand-in (upcast, fp32 GEMM) is what the interpreter tests run; bf16 out is a plain GEMM."""
    L, M, D_t, D_s = 2, 37, 24, 16
    a = torch.empty((L, M, D_t)[3 - dim :], dtype=torch.bfloat16, device="meta")
    b = torch.empty((L, D_t, D_s)[3 - dim :], dtype=torch.bfloat16, device="meta")
    assert _utils.OUT_DTYPE
    out = _utils.gemm_to(a, b, torch.float32, native=True)
    assert out.dtype == torch.float32 and out.shape == (L, M, D_s)[3 - dim :]
    g = torch.Generator().manual_seed(0)
    a, b = (randn(*x.shape, gen=g).to(torch.bfloat16) for x in (a, b))
    want = (a.double() @ b.double()).float()
    torch.testing.assert_close(_utils.gemm_to(a, b, torch.float32), want, rtol=1e-6, atol=1e-6)
    assert _utils.gemm_to(a, b, torch.bfloat16).dtype == torch.bfloat16


def test_the_fp32_out_gemm_falls_back_once_when_torch_refuses_it(monkeypatch, capsys):
    """A torch or cuBLAS that has the overload but refuses the call: one line on stderr, then the bf16
    product cast to fp32 (the numerics before ``out_dtype``), and no second try in this process."""
    calls = []
    real_mm = torch.mm

    def mm(a, b, *args, **kwargs):
        calls.append("out_dtype" in kwargs)
        if "out_dtype" in kwargs:
            raise RuntimeError("bmm/mm out_dtype: not supported here\nmore")
        return real_mm(a, b)

    monkeypatch.setattr(torch, "mm", mm)
    monkeypatch.setattr(_utils, "OUT_DTYPE", True)
    g = torch.Generator().manual_seed(1)
    a, b = randn(5, 8, gen=g).to(torch.bfloat16), randn(8, 3, gen=g).to(torch.bfloat16)
    out = _utils.gemm_to(a, b, torch.float32, native=True)
    assert torch.equal(out, real_mm(a, b).float()) and out.dtype == torch.float32
    assert _utils.OUT_DTYPE is False and calls == [True, False]
    assert capsys.readouterr().err.count("fp32-out GEMM unavailable") == 1


def test_the_fp32_out_gemm_only_widens():
    """``gemm_to`` to a narrower dtype (fp32 operands, a bf16 result) computes in the operands' dtype and
    casts the product, as before it: it never rounds the operands first."""
    g = torch.Generator().manual_seed(2)
    a, b = randn(6, 9, gen=g), randn(9, 4, gen=g)
    assert torch.equal(_utils.gemm_to(a, b, torch.bfloat16), torch.mm(a, b).to(torch.bfloat16))
