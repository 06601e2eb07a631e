"""Fused token KD kernel (kernels/token_kd.py) vs the fp64 reference: losses, maps, CLS outputs and every
gradient (dS, dW, db) under random upstream gradients, on awkward shapes, every shipped config."""

import pytest
import torch
import torch.nn.functional as F
from kd_testutil import (
    DEVICE,
    assert_bf16,
    assert_fp32,
    autocast_bf16,
    bf16_scalar_atol,
    randn,
    upstream_scalar,
)

from fastkd.kernels import token_kd as tk
from fastkd.losses import reference as R

# (B, P_s, P_t, N, D_s, D_t, projection)
CASES = {
    "ds!=dt": (3, 1, 1, 15, 24, 40, "linear"),
    "deit-dist-student,ds=dt,identity": (3, 2, 1, 50, 48, 48, "identity"),
    "ds=dt,linear,2-prefix-teacher": (5, 1, 2, 50, 40, 40, "linear"),
    "wide(large config)": (3, 1, 1, 15, 150, 136, "linear"),
}


def make(case, dtype=torch.float32, seed=0):
    B, P_s, P_t, N, D_s, D_t, proj = CASES[case]
    g = torch.Generator().manual_seed(seed)
    s = randn(B, P_s + N, D_s, gen=g, dtype=dtype).requires_grad_()
    t = randn(B, P_t + N, D_t, gen=g, dtype=dtype)
    w = randn(D_t, D_s, gen=g, scale=D_s**-0.5).requires_grad_() if proj == "linear" else None
    b = randn(D_t, gen=g).requires_grad_()
    up = dict(
        mim=upstream_scalar(g), map=upstream_scalar(g), a_s=randn(B, N, gen=g), s_cls=randn(B, D_s, gen=g)
    )
    return dict(s=s, t=t, w=w, b=b, P_s=P_s, P_t=P_t, up=up)


def reference_outputs(
    x, mimic=True, cls_map=True, with_t=True, dtype=torch.float64, autocast=False, scales=(1.0, 1.0)
):
    """The reference composite (mim_sum, map_sum, a_s, s_cls, t_cls) and its grads wrt (s, w, b); the two
    sums times ``scales`` (the op's mim_scale, map_scale)."""
    conv = (
        (lambda v: v.detach().to(dtype).requires_grad_())
        if dtype == torch.float64
        else (lambda v: v.detach().clone().requires_grad_())
    )
    s = conv(x["s"])
    t = x["t"].detach().to(dtype) if dtype == torch.float64 else x["t"].detach()
    w = conv(x["w"]) if x["w"] is not None else None
    b = conv(x["b"])
    P_s, P_t, up = x["P_s"], x["P_t"], x["up"]
    B, N = s.shape[0], s.shape[1] - P_s
    with autocast_bf16() if autocast else torch.autocast(DEVICE.type, enabled=False):
        out, total = {}, 0.0
        if mimic:
            out["mim"] = R.vitkd_mimic_loss([s[:, P_s:]], [t[:, P_t:]], [w], [b], alpha=float(B) * scales[0])
            total = total + up["mim"] * out["mim"]
        if cls_map:
            out["a_s"] = R.cls_patch_map(s, P_s)
            out["s_cls"] = F.normalize(s[:, 0].to(out["a_s"].dtype), dim=-1)
            total = total + (up["a_s"].to(out["a_s"].dtype) * out["a_s"]).sum()
            total = total + (up["s_cls"].to(out["s_cls"].dtype) * out["s_cls"]).sum()
            if with_t:
                out["map"] = R.cls_patch_map_loss(s, t, P_s, P_t) * (B * N * scales[1])
                out["t_cls"] = F.normalize(t[:, 0].to(out["a_s"].dtype), dim=-1)
                total = total + up["map"] * out["map"]
    total.backward()
    grads = {"s": s.grad, "w": w.grad if (mimic and w is not None) else None, "b": b.grad if mimic else None}
    return out, grads


def kernel_outputs(x, mimic=True, cls_map=True, with_t=True, scales=(1.0, 1.0)):
    """The op's outputs and the grads of the same composite wrt (leaf of s, w, b); x["leaf"] is the tensor
    s is a view of, when it is one. ``scales``: the op's (mim_scale, map_scale)."""
    s, w, b, up = x["s"], x["w"], x["b"], x["up"]
    leaf = x.get("leaf", s)
    for v in (leaf, w, b):
        if v is not None:
            v.grad = None
    mim, msum, a_s, s_cls, t_cls, _ = tk.token_kd_op(
        s,
        x["t"] if with_t else None,
        w if mimic else None,
        b if mimic else None,
        x["P_s"],
        x["P_t"],
        mimic,
        cls_map,
        mim_scale=scales[0],
        map_scale=scales[1],
    )
    out, total = {}, 0.0
    if mimic:
        out["mim"] = mim
        total = total + up["mim"] * mim
    if cls_map:
        out.update(a_s=a_s, s_cls=s_cls)
        total = total + (up["a_s"] * a_s).sum() + (up["s_cls"] * s_cls).sum()
        if with_t:
            out.update(map=msum, t_cls=t_cls)
            total = total + up["map"] * msum
    total.backward()
    grads = {
        "s": leaf.grad,
        "w": w.grad if (mimic and w is not None) else None,
        "b": b.grad if mimic else None,
    }
    return out, grads


def check_fp32(x, **mode):
    out, grads = kernel_outputs(x, **mode)
    ref, rgrads = reference_outputs(x, **mode)
    assert set(out) == set(ref)
    for k in ref:
        assert_fp32(out[k], ref[k], k)
    for k, r in rgrads.items():
        if r is None:
            assert grads[k] is None or float(grads[k].abs().max()) == 0.0, f"unexpected gradient for {k}"
        else:
            assert_fp32(grads[k], r, f"d{k}")


@pytest.mark.parametrize("case", list(CASES))
def test_token_kd_fp32(case):
    check_fp32(make(case))


@pytest.mark.parametrize(
    "mode",
    [dict(), dict(mimic=True, cls_map=False), dict(mimic=False, cls_map=True)],
    ids=["mimic+map", "mimic", "map"],
)
def test_token_kd_scales(mode):
    """The sums come out times the op's factors (ViTKD's α/B, the map mean's 1/(B·N), as the dispatch
    passes them), applied inside the kernels to the stored partials and the upstream gradients: equal to
    the scaled reference, values and every gradient, under the fp32 rule."""
    x = make("ds!=dt", seed=21)
    B, N = x["s"].shape[0], x["s"].shape[1] - x["P_s"]
    scales = (3e-5 / B, 1.0 / (B * N))
    out, grads = kernel_outputs(x, scales=scales, **mode)
    ref, rgrads = reference_outputs(x, scales=scales, **mode)
    assert set(out) == set(ref)
    for k in ref:
        assert_fp32(out[k], ref[k], k)
    for k, r in rgrads.items():
        if r is not None:
            assert_fp32(grads[k], r, f"d{k}")


@pytest.mark.parametrize(
    "mode",
    [
        dict(mimic=True, cls_map=False),
        dict(mimic=False, cls_map=True),
        dict(mimic=False, cls_map=True, with_t=False),
    ],
)
def test_token_kd_modes(mode):
    check_fp32(make("ds!=dt", seed=1), **mode)


def test_token_kd_mimic_on_patch_views():
    """ViTKD passes patch views x[:, P:] (prefix 0 for the kernel): rows on a strided grid, no copies."""
    x = make("ds!=dt", seed=2)
    full_s, full_t = x["s"], x["t"]
    x.update(s=full_s[:, 1:], t=full_t[:, 1:], P_s=0, P_t=0, leaf=full_s)
    out, grads = kernel_outputs(x, mimic=True, cls_map=False)
    s64 = full_s.detach().double().requires_grad_()
    w64, b64 = x["w"].detach().double().requires_grad_(), x["b"].detach().double().requires_grad_()
    ref = R.vitkd_mimic_loss(
        [s64[:, 1:]], [full_t[:, 1:].double()], [w64], [b64], alpha=float(full_s.shape[0])
    )
    (x["up"]["mim"] * ref).backward()
    assert_fp32(out["mim"], ref, "mim")
    assert_fp32(grads["s"], s64.grad, "ds")
    assert float(grads["s"][:, 0].abs().max()) == 0.0
    assert_fp32(grads["w"], w64.grad, "dw")
    assert_fp32(grads["b"], b64.grad, "db")


def test_token_kd_row_gaps():
    """s = x[:, :P+N] of a longer sequence: gap rows between samples must not leak into dW."""
    x = make("ds!=dt", seed=3)
    B, T, D = x["s"].shape
    big = randn(B, T + 3, D, gen=torch.Generator().manual_seed(9)).requires_grad_()
    x.update(s=big[:, :T], leaf=big)
    out, grads = kernel_outputs(x)
    x["s"] = big[:, :T].detach().clone().requires_grad_()
    ref, rgrads = reference_outputs(x)
    for k in ref:
        assert_fp32(out[k], ref[k], k)
    assert float(grads["s"][:, T:].abs().max()) == 0.0
    assert_fp32(grads["s"][:, :T], rgrads["s"], "ds")
    for k in ("w", "b"):
        assert_fp32(grads[k], rgrads[k], f"d{k}")


@pytest.mark.parametrize("case", ["ds!=dt", "deit-dist-student,ds=dt,identity", "wide(large config)"])
def test_token_kd_bf16(case):
    x = make(case, dtype=torch.bfloat16, seed=4)
    out, grads = kernel_outputs(x)
    ref, rgrads = reference_outputs(x)
    low, lgrads = reference_outputs(x, dtype=torch.bfloat16, autocast=True)
    assert grads["s"].dtype == torch.bfloat16
    n_terms = x["s"].shape[0] * (x["s"].shape[1] - x["P_s"]) * x["t"].shape[2]
    for k in ref:
        atol = bf16_scalar_atol(ref[k], n_terms) if k == "mim" else None  # see bf16_scalar_atol
        assert_bf16(out[k], low[k], ref[k], k, atol=atol)
    for k, r in rgrads.items():
        if r is not None:
            assert_bf16(grads[k], lgrads[k], r, f"d{k}")


_EVERY = (
    [("fwd", i, c) for i, c in enumerate(tk.FWD_TC_CONFIGS + tk.FWD_EXACT_CONFIGS)]  # streaming: below
    + [("bwd", i, c) for i, c in enumerate(tk.BWD_CONFIGS)]
    + [("map", n, c) for n, c in tk.MAP_BWD_CONFIGS.items()]
)


@pytest.mark.parametrize(
    "kind, idx, cfg",
    _EVERY,
    ids=[f"{k}-{c.BLOCK_M}x{c.BLOCK_N}x{c.BLOCK_K}-w{c.num_warps}" for k, _, c in _EVERY],
)
def test_token_kd_every_shipped_config(kind, idx, cfg):
    """Each shipped config (not only the one the autotuner / interpreter picks), forward + backward, in
    its precision: tensor-core configs with the bf16 dot (the 2x rule vs the reference under autocast),
    exact configs in fp32 (1e-5)."""
    exact = cfg in (tk.FWD_EXACT_CONFIGS if kind == "fwd" else tk.BWD_EXACT_CONFIGS)
    amp = kind != "map" and not exact
    x = make("ds=dt,linear,2-prefix-teacher", seed=5)
    s, t, w, b, P_s, P_t, up = x["s"], x["t"], x["w"], x["b"], x["P_s"], x["P_t"], x["up"]
    mim, msum, a_s, s_cls, t_cls, stats = tk.token_kd_forward(
        s.detach(),
        t,
        w.detach(),
        b.detach(),
        P_s,
        P_t,
        True,
        True,
        amp=amp,
        config=cfg if kind == "fwd" else None,
    )
    ds, dw, db = tk.token_kd_backward(
        torch.tensor(up["mim"], device=DEVICE),
        torch.tensor(up["map"], device=DEVICE),
        up["a_s"],
        up["s_cls"],
        s.detach(),
        t,
        w.detach(),
        b.detach(),
        a_s,
        stats,
        s_cls,
        P_s,
        P_t,
        True,
        True,
        True,
        True,
        amp=amp,
        config=cfg if kind == "bwd" else None,
        map_config=cfg if kind == "map" else None,
    )
    ref, rgrads = reference_outputs(x)
    got = dict(mim=mim, map=msum, a_s=a_s, s_cls=s_cls, t_cls=t_cls)
    gotg = dict(s=ds, w=dw, b=db)
    if kind == "bwd":  # the same 2-D kernel computes the mimic term alone in the forward (SUMSQ mode)
        mim_alone = tk.token_kd_forward(
            s.detach(), t, w.detach(), b.detach(), P_s, P_t, True, False, amp, cfg
        )[0]
        if amp:
            ref_alone = reference_outputs(x, mimic=True, cls_map=False)[0]["mim"]
            low_alone = reference_outputs(x, mimic=True, cls_map=False, dtype=torch.float32, autocast=True)[0]
            n_terms = s.shape[0] * (s.shape[1] - P_s) * t.shape[2]
            assert_bf16(
                mim_alone,
                low_alone["mim"],
                ref_alone,
                f"{cfg}: mim alone",
                atol=bf16_scalar_atol(ref_alone, n_terms),
            )
        else:
            assert_fp32(mim_alone, ref["mim"], f"{cfg}: mim alone")
    if not amp:
        for k, v in got.items():
            assert_fp32(v, ref[k], f"{cfg}: {k}")
        for k, v in gotg.items():
            assert_fp32(v, rgrads[k], f"{cfg}: d{k}")
        return
    low, lgrads = reference_outputs(x, dtype=torch.float32, autocast=True)
    n_terms = s.shape[0] * (s.shape[1] - P_s) * t.shape[2]
    for k, v in got.items():
        atol = bf16_scalar_atol(ref[k], n_terms) if k == "mim" else None  # see bf16_scalar_atol
        assert_bf16(v, low[k], ref[k], f"{cfg}: {k}", atol=atol)
    for k, v in gotg.items():
        assert_bf16(v, lgrads[k], rgrads[k], f"{cfg}: d{k}")


@pytest.mark.parametrize("with_t", [True, False], ids=["map-loss", "student-map"])
@pytest.mark.parametrize(
    "cfg",
    tk.FWD_STREAM_CONFIGS,
    ids=[f"{c.BLOCK_M}x{c.BLOCK_N}x{c.BLOCK_K}-w{c.num_warps}" for c in tk.FWD_STREAM_CONFIGS],
)
def test_token_kd_every_streaming_config(cfg, with_t):
    """Each forward config the autotuner may pick without a GEMM (the map terms alone: [CLS]-KD's map loss
    and its student map), forward + backward through the stats it writes, fp32 against the fp64
    reference; awkward shapes: 2 teacher prefix tokens, rows per sample not a multiple of the tile."""
    x = make("ds=dt,linear,2-prefix-teacher", seed=6)
    s, t, P_s, P_t, up = x["s"], x["t"], x["P_s"], x["P_t"], x["up"]
    tt = t if with_t else None
    _, msum, a_s, s_cls, t_cls, stats = tk.token_kd_forward(
        s.detach(), tt, None, None, P_s, P_t, False, True, amp=False, config=cfg
    )
    ds, _, _ = tk.token_kd_backward(
        torch.tensor(0.0, device=DEVICE),
        torch.tensor(up["map"] if with_t else 0.0, device=DEVICE),
        up["a_s"],
        up["s_cls"],
        s.detach(),
        tt,
        None,
        None,
        a_s,
        stats,
        s_cls,
        P_s,
        P_t,
        False,
        True,
        False,
        False,
    )
    ref, rgrads = reference_outputs(x, mimic=False, cls_map=True, with_t=with_t)
    got = dict(a_s=a_s, s_cls=s_cls, **(dict(map=msum, t_cls=t_cls) if with_t else {}))
    assert set(got) == set(ref)
    for k, v in got.items():
        assert_fp32(v, ref[k], f"{cfg}: {k}")
    assert_fp32(ds, rgrads["s"], f"{cfg}: ds")


@pytest.mark.parametrize("route", ["cublas", "triton"])  # the stored residual's forward GEMM (mimic_route)
@pytest.mark.parametrize("alpha", ["B", "vitkd"])  # the op's mim_scale α/B: 1, or ViTKD's 3e-5/B
@pytest.mark.parametrize("prefix", [0, 1])
@pytest.mark.parametrize("case", ["ds!=dt", "deit-dist-student,ds=dt,identity"])
def test_token_kd_stored_residual_matches_recompute(case, prefix, alpha, route, monkeypatch):
    """Under autocast the mimic term alone can store its bf16 residual in the forward (save_residual=True)
    instead of recomputing it: same loss (the same kernel computes it) and gradients within the bf16 rule
    of the reference under autocast, as the recompute's are; fp32 strided tokens; the loss's α/B as the
    op's factor (ViTKD's, through the dispatch) or 1; the stored path's forward GEMM by cuBLAS or inside
    the epilogue kernel."""
    monkeypatch.setenv("FASTKD_MIMIC_GEMM", route)
    x = make(case, seed=11)
    P = x["P_s"]
    a = float(x["s"].shape[0]) if alpha == "B" else 3e-5
    full, t_full, w, b, up = x["s"], x["t"], x["w"], x["b"], x["up"]
    if prefix == 0:
        x.update(s=full[:, P:], t=t_full[:, x["P_t"] :], P_s=0, P_t=0, leaf=full)
    else:
        x.update(P_t=x["P_t"])
    outs = {}
    for save in (False, True):
        for v in (full, w, b):
            if v is not None:
                v.grad = None
        mim = tk.token_kd_op(
            x["s"], x["t"], w, b, x["P_s"], x["P_t"], True, False, True, save, mim_scale=a / full.shape[0]
        )[0]
        (up["mim"] * mim).backward()
        outs[save] = (mim.detach(), full.grad.clone(), None if w is None else w.grad.clone(), b.grad.clone())
    # the loss: the stored residual under autocast takes Y = S Wᵀ from cuBLAS in bf16 (as autocast's linear
    # does) where the recompute keeps the fp32 accumulator, so the two differ by a bf16 rounding of Y:
    # both are held to the bf16 rule below (round 1 required equality: the same kernel computed both)
    mims = {k: v[0] for k, v in outs.items()}
    x2 = dict(x, s=full.detach().clone().requires_grad_(), P_s=P if prefix else 0)
    s_view = x2["s"][:, P:] if prefix == 0 else x2["s"]
    conv = lambda v: None if v is None else v.detach().clone().requires_grad_()
    wl, bl = conv(w), conv(b)
    with autocast_bf16():
        low = R.vitkd_mimic_loss([s_view[:, x["P_s"] :]], [x["t"][:, x["P_t"] :]], [wl], [bl], alpha=a)
    (up["mim"] * low).backward()
    s64 = full.detach().double().requires_grad_()
    w64, b64 = conv(None if w is None else w.double()), conv(b.double())
    s64v = s64[:, P:] if prefix == 0 else s64
    ref = R.vitkd_mimic_loss([s64v[:, x["P_s"] :]], [x["t"][:, x["P_t"] :].double()], [w64], [b64], alpha=a)
    (up["mim"] * ref).backward()
    n_terms = x["s"].shape[0] * (x["s"].shape[1] - x["P_s"]) * x["t"].shape[2]
    for save in (False, True):
        _, ds, dw, db = outs[save]
        what = "stored" if save else "recompute"
        atol = bf16_scalar_atol(ref, n_terms)
        assert_bf16(mims[save], low.detach(), ref.detach().float(), f"{what}: loss", atol=atol)
        assert_bf16(ds, x2["s"].grad, s64.grad, f"{what}: ds")
        if w is not None:
            assert_bf16(dw, wl.grad, w64.grad, f"{what}: dw")
        assert_bf16(db, bl.grad, b64.grad, f"{what}: db")


def test_token_kd_no_grad_inputs():
    """Only W needs grad (s detached): dW is still right and no dS is requested."""
    x = make("ds!=dt", seed=6)
    x["s"] = x["s"].detach()
    mim = tk.token_kd_op(x["s"], x["t"], x["w"], None, 1, 1, True, False)[0]
    mim.backward()
    w64 = x["w"].detach().double().requires_grad_()
    R.vitkd_mimic_loss(
        [x["s"][:, 1:].double()], [x["t"][:, 1:].double()], [w64], [None], alpha=3.0
    ).backward()
    assert_fp32(x["w"].grad, w64.grad, "dW")


def test_token_kd_compiles_fullgraph():
    x = make("ds!=dt", seed=7)

    def loss(s, t, w, b):
        mim, msum, a_s, s_cls, _, _ = tk.token_kd_op(s, t, w, b, 1, 1, True, True)
        return 0.5 * mim + msum + a_s.sum() + s_cls.sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    out = compiled(x["s"], x["t"], x["w"], x["b"])
    out.backward()
    ds, dw = x["s"].grad.clone(), x["w"].grad.clone()
    x["s"].grad = x["w"].grad = x["b"].grad = None
    loss(x["s"], x["t"], x["w"], x["b"]).backward()
    assert torch.allclose(ds, x["s"].grad) and torch.allclose(dw, x["w"].grad)


def test_token_kd_fake_matches_real_strides():
    """register_fake gives the real outputs' shapes, dtypes and strides (inductor asserts them)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = make("deit-dist-student,ds=dt,identity", seed=8)
    one = torch.tensor(1.0, device=DEVICE)
    s, t, b = x["s"].detach()[:, :-1], x["t"][:, :-1], x["b"].detach()  # strided views

    def both(s, t, b, one):
        fwd = tk.token_kd_op(s, t, None, b, 2, 1, True, True)
        flags = (2, 1, True, True, False, True)
        bwd = tk.token_kd_backward_op(one, one, None, None, s, t, None, b, fwd[2], fwd[5], fwd[3], *flags)
        return list(fwd) + list(bwd)

    real = both(s, t, b, one)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = both(*(mode.from_tensor(v) for v in (s, t, b, one)))
    for r, f in zip(real, fake, strict=True):
        assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride())


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(s=torch.zeros(3, 16, 24, dtype=torch.float64)), "dtype"),
        (dict(s=torch.zeros(3, 16)), "3-D"),
        (dict(t=torch.zeros(3, 17, 40)), "patch tokens"),
        (dict(t=torch.zeros(4, 16, 40)), "batch"),
        (dict(w=torch.zeros(24, 40)), r"\[D_t, D_s\]"),
        (dict(w=None), "projection weight"),
        (dict(b=torch.zeros(41)), "bias"),
        (dict(s=torch.zeros(3, 24, 16).transpose(1, 2)), "unit stride"),
        (dict(P_s=0), "num_prefix_s"),
        (dict(t=None), "teacher"),
    ],
)
def test_token_kd_launcher_errors(bad, match):
    args = dict(
        s=torch.zeros(3, 16, 24), t=torch.zeros(3, 16, 40), w=torch.zeros(40, 24), b=torch.zeros(40), P_s=1
    )
    args.update(bad)
    mv = lambda v: v.to(DEVICE) if isinstance(v, torch.Tensor) else v
    with pytest.raises(ValueError, match=match):
        tk.token_kd_forward(
            mv(args["s"]), mv(args["t"]), mv(args["w"]), mv(args["b"]), args["P_s"], 1, True, True
        )


def _stacked_inputs(seed=0, B=3, N=15, D_s=24, D_t=40):
    g = torch.Generator().manual_seed(seed)
    xs = [randn(B, 1 + N, D_s, gen=g).requires_grad_() for _ in range(2)]
    ts = [randn(B, N, D_t, gen=g) for _ in range(2)]
    ws = [randn(D_t, D_s, gen=g, scale=D_s**-0.5).requires_grad_() for _ in range(2)]
    bs = [randn(D_t, gen=g).requires_grad_() for _ in range(2)]
    return xs, ts, ws, bs


def _stacked_run(inputs):
    xs, ts, ws, bs = inputs
    loss = tk.mimic_layers_op(xs, ts, ws, bs, 1, 0.25)
    return [loss.detach(), *torch.autograd.grad(loss, [*xs, *ws, *bs])]


@pytest.fixture
def route_store(tmp_path, monkeypatch):
    """The route choices' store (dispatch.json) in a temporary cache dir, this process's memory empty."""
    from fastkd.ops import measure as M
    from fastkd.ops import routing

    monkeypatch.setenv("FASTKD_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FASTKD_MIMIC_GEMM", raising=False)
    monkeypatch.setattr(tk, "MIMIC_ROUTES", {})
    monkeypatch.setattr(tk, "MIMIC_ROUTE_TIMES", {})
    hooks = routing._load_kernels().token_kd.ROUTE_HOOKS
    assert hooks == (routing._time_route, routing._stored_choice, routing._store_choice)
    M.clear_decisions()
    yield M
    M.clear_decisions()


@pytest.mark.parametrize("faster", ["cublas", "triton"])
def test_the_stacked_mimic_keeps_the_faster_forward_gemm(faster, monkeypatch, route_store):
    """At a shape's first call the stacked mimic times both forward routes (cuBLAS + epilogue, or the GEMM
    inside the epilogue kernel), keeps the faster for that shape, and its outputs are the kept route's, bit
    for bit (the timed runs overwrite the same buffers); later calls time nothing; another shape decides
    anew; ``FASTKD_MIMIC_GEMM`` forces a route, and a bad value is one clear error. The choice is kept in
    dispatch.json: a new process (this one's memory cleared) takes it without timing, so a resumed run
    computes with the same route."""
    timed = []

    def timer(run):  # runs the route as the CUDA timer does, and says ``faster`` is faster
        run()
        name = "triton" if run.__name__ == "via_triton" else "cublas"
        timed.append(name)
        return 1.0 if name == faster else 2.0

    monkeypatch.setattr(tk, "_route_timer", lambda device: timer)
    x = _stacked_inputs()
    auto = _stacked_run(x)
    assert sorted(timed) == ["cublas", "triton"]
    assert list(tk.MIMIC_ROUTES.values()) == [faster]
    assert list(tk.MIMIC_ROUTE_TIMES.values())[0][faster] == 1.0
    again = _stacked_run(x)
    assert len(timed) == 2, "a decided shape was timed again"
    monkeypatch.setenv("FASTKD_MIMIC_GEMM", faster)
    forced = _stacked_run(x)
    for a, b, c in zip(auto, again, forced, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    monkeypatch.delenv("FASTKD_MIMIC_GEMM")
    _stacked_run(_stacked_inputs(B=5))
    assert len(timed) == 4 and len(tk.MIMIC_ROUTES) == 2
    monkeypatch.setenv("FASTKD_MIMIC_GEMM", "cutlass")
    with pytest.raises(ValueError, match="FASTKD_MIMIC_GEMM='cutlass': use auto, cublas or triton"):
        _stacked_run(_stacked_inputs(B=7))
    monkeypatch.delenv("FASTKD_MIMIC_GEMM")
    # "a new process": no memory of the choice, the file keeps it
    tk.MIMIC_ROUTES.clear()
    route_store.clear_decisions()
    resumed = _stacked_run(x)
    assert len(timed) == 4, "a choice kept in dispatch.json was timed again"
    assert list(tk.MIMIC_ROUTES.values())[0] == faster
    for a, b in zip(auto, resumed, strict=True):
        assert torch.equal(a, b)
    import json

    doc = json.load(open(route_store.cache_path()))
    recs = [r for entries in doc["entries"].values() for k, r in entries.items() if "mimic_gemm" in k]
    assert len(recs) == 2 and recs[0]["path"] == faster and set(recs[0]["ms"]) == {"cublas", "triton"}


def test_the_stacked_mimic_times_nothing_off_cuda(route_store):
    """Off CUDA (and while a CUDA graph is captured) an undecided shape takes cuBLAS without timing, and
    nothing is written."""
    assert tk._route_timer(torch.device("cpu")) is None
    routes = {"cublas": lambda: None, "triton": lambda: None}
    key = (2, 3, 16, 24, 40, True, torch.device("cpu"), torch.float32)
    assert tk.mimic_route(key, routes, torch.device("cpu")) == "cublas"
    assert tk.MIMIC_ROUTES == {}
    import os

    assert not os.path.exists(route_store.cache_path())


def test_a_failing_fused_gemm_route_falls_back_to_cublas(monkeypatch, capsys, route_store):
    """A Triton failure while the fused-GEMM route is timed (a build or launch error on the user's GPU) drops
    that route for the shape with one stderr line; the forward runs on cuBLAS and is correct."""

    def timer(run):
        if run.__name__ == "via_triton":
            raise RuntimeError("out of resource: shared memory, Required: 232448, Hardware limit: 101376")
        run()
        return 1.0

    monkeypatch.setattr(tk, "_route_timer", lambda device: timer)
    x = _stacked_inputs(seed=3)
    got = _stacked_run(x)
    assert list(tk.MIMIC_ROUTES.values()) == ["cublas"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fused-GEMM route failed on this GPU, using cuBLAS" in err
    assert "out of resource: shared memory" in err
    monkeypatch.setenv("FASTKD_MIMIC_GEMM", "cublas")
    for a, b in zip(got, _stacked_run(x), strict=True):
        assert torch.equal(a, b)


def test_a_route_is_timed_as_the_measured_dispatch_times_its_paths(monkeypatch):
    """``routing._time_route``: the measured dispatch's warm-up calls, then the median GPU span of its reps
    (``timing.host_and_span_ms``), so the route choice and the dispatch measure alike."""
    from fastkd.ops import measure as M
    from fastkd.ops import routing

    spans = iter([9.0, 1.0, 3.0, 2.0, 7.0, 5.0, 4.0])
    runs = []
    monkeypatch.setattr(routing, "host_and_span_ms", lambda run, device: (run(), (0.0, next(spans)))[1])
    ms = routing._time_route(lambda: runs.append(1), torch.device("cuda"))
    assert len(runs) == M._WARMUP + M._REPS
    assert ms == sorted([9.0, 1.0, 3.0, 2.0, 7.0, 5.0, 4.0][: M._REPS])[M._REPS // 2]
