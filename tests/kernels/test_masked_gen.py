"""Fused ViTKD masked generation (kernels/masked_gen.py) vs the fp64 reference: the generator input and
its gradients (dS, dW, db, d mask-token) under random upstream gradients, the masked squared error and
dG, the whole generation loss through a conv generator, every shipped config."""

import copy

import pytest
import torch
from kd_testutil import (
    DEVICE,
    assert_bf16,
    assert_fp32,
    autocast_bf16,
    bf16_scalar_atol,
    randn,
    upstream_scalar,
)

from fastkd import functional as KF
from fastkd.kernels import masked_gen as mg
from fastkd.losses import reference as R

# (B, N, (h, w), P, D_s, D_t, projection); P prefix tokens precede the patches (the kernel sees x[:, P:])
CASES = {
    "ds!=dt,3x5": (3, 15, (3, 5), 1, 24, 40, "linear"),
    "ds=dt,identity,5x10,2-prefix": (3, 50, (5, 10), 2, 48, 48, "identity"),
    "ds=dt,linear,4x4": (5, 16, (4, 4), 1, 40, 40, "linear"),
    "wide(large config)": (3, 15, (3, 5), 1, 150, 136, "linear"),
}


def make(case, dtype=torch.float32, seed=0):
    B, N, (h, w), P, D_s, D_t, proj = CASES[case]
    g = torch.Generator().manual_seed(seed)
    full = randn(B, P + N, D_s, gen=g, dtype=dtype).requires_grad_()
    t = randn(B, N, D_t, gen=g, dtype=dtype)
    W = randn(D_t, D_s, gen=g, scale=D_s**-0.5).requires_grad_() if proj == "linear" else None
    b = randn(D_t, gen=g).requires_grad_() if proj == "linear" else None
    tok = randn(D_t, gen=g).requires_grad_()
    mask = R.random_token_mask(B, N, 0.5, generator=g).to(DEVICE)
    return dict(full=full, s=full[:, P:], t=t, W=W, b=b, tok=tok, mask=mask, h=h, w=w, P=P, gen=g)


def ref_input(s, mask, W, b, tok, h, w):
    """The reference generator input [B, D_t, h, w] (written out: the reference builds it inline)."""
    x = s if W is None else s @ W.t()
    if b is not None:
        x = x + b
    x = torch.where(mask[:, :, None], tok.reshape(1, 1, -1), x)
    return x.transpose(1, 2).reshape(s.shape[0], -1, h, w)


def leaves(x):
    return [v for v in (x["full"], x["W"], x["b"], x["tok"]) if v is not None]


def grads_of(vs):
    out = [v.grad for v in vs]
    for v in vs:
        v.grad = None
    return out


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_gen_input_fp32(case, layout):
    x = make(case)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    out = mg.gen_input_op(x["s"], x["mask"], x["W"], x["b"], x["tok"], x["h"], x["w"], torch.float32)
    assert out.is_contiguous(memory_format=torch.channels_last)
    up = randn(*out.shape, gen=x["gen"]).contiguous(memory_format=fmt)
    (out * up).sum().backward()
    got = grads_of(leaves(x))
    ref64 = [v.detach().double().requires_grad_() for v in leaves(x)]
    it = iter(ref64)
    full64 = next(it)
    W64 = next(it) if x["W"] is not None else None
    b64 = next(it) if x["b"] is not None else None
    tok64 = next(it)
    ref = ref_input(full64[:, x["P"] :], x["mask"], W64, b64, tok64, x["h"], x["w"])
    (ref * up.double()).sum().backward()
    assert_fp32(out, ref, "x")
    for name, g, r in zip(
        ["ds", "dW", "db", "dtok"][: len(got)] if x["W"] is not None else ["ds", "dtok"],
        got,
        [v.grad for v in ref64],
        strict=True,
    ):
        assert_fp32(g, r, name)


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gen_loss(layout, dtype):
    g = torch.Generator().manual_seed(1)
    B, D_t, h, w = 3, 40, 5, 10
    N = h * w
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    G = randn(B, D_t, h, w, gen=g, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
    t_full = randn(B, N + 1, D_t, gen=g, dtype=dtype)
    t = t_full[:, 1:]  # a patch view, as ViTKD passes it
    mask = R.random_token_mask(B, N, 0.5, generator=g).to(DEVICE)
    scale, up = 3e-6 / (0.5 * B), upstream_scalar(g)
    loss, dG = mg.gen_loss_op(G, t, mask, scale, True)
    assert dG.stride() == G.stride() and dG.dtype == dtype
    (up * loss).backward()

    def ref_loss(Gx, tx):
        d = Gx.reshape(B, D_t, N).transpose(1, 2) - tx
        return (d.pow(2) * mask[:, :, None]).sum() * scale

    G64 = G.detach().double().requires_grad_()
    ref = ref_loss(G64, t.double())
    (up * ref).backward()
    if dtype == torch.float32:
        assert_fp32(loss, ref, "loss")
        assert_fp32(G.grad, G64.grad, "dG")
    else:
        Gl = G.detach().clone().requires_grad_()
        low = ref_loss(Gl.float(), t.float())  # torch: fp32 math on bf16 inputs
        (up * low).backward()
        assert_bf16(loss, low, ref, "loss")
        assert_bf16(G.grad, Gl.grad, G64.grad, "dG")


def _generator(D_t, seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(D_t, D_t, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(D_t, D_t, 3, padding=1)
    ).to(DEVICE)


@pytest.fixture
def triton_path():
    KF.set_fused(True, interpreter=DEVICE.type == "cpu")
    yield
    KF.set_fused(False)


@pytest.fixture
def no_tf32():
    """Exact fp32 torch on a GPU: cuDNN convolutions (and cuBLAS matmuls if enabled) default to TF32 on
    Ampere+, which made the fp32 end-to-end checks fail on the H200 (relative 4e-4 and 1e-2 against
    1e-5, ``../shared/gpu/2026-11-26-h200/gpu_check.json``) although the kernels are exact fp32 there:
    the generator convolutions ran in TF32. The 1e-5 rule is for fp32, so TF32 is off here."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("case", ["ds!=dt,3x5", "ds=dt,identity,5x10,2-prefix"])
def test_vitkd_gen_loss_end_to_end(case, triton_path, no_tf32):
    """functional.vitkd_gen_loss (both kernels + a conv generator) vs reference.vitkd_gen_loss in fp64."""
    x = make(case, seed=2)
    gen = _generator(x["t"].shape[-1], 0)
    assert KF.active_path(x["s"]) == "triton"
    up = upstream_scalar(x["gen"])
    loss = KF.vitkd_gen_loss(x["s"], x["t"], x["mask"], x["W"], x["b"], x["tok"], gen, grid=(x["h"], x["w"]))
    (up * loss).backward()
    got = grads_of(leaves(x)) + grads_of(list(gen.parameters()))
    ref64 = [v.detach().double().requires_grad_() for v in leaves(x)]
    gen64 = copy.deepcopy(gen).double()
    it = iter(ref64)
    full64 = next(it)
    W64 = next(it) if x["W"] is not None else None
    b64 = next(it) if x["b"] is not None else None
    tok64 = next(it)
    ref = R.vitkd_gen_loss(
        full64[:, x["P"] :], x["t"].double(), x["mask"], W64, b64, tok64, gen64, grid=(x["h"], x["w"])
    )
    (up * ref).backward()
    assert_fp32(loss, ref, "loss")
    for i, (g, r) in enumerate(
        zip(got, [v.grad for v in ref64] + [p.grad for p in gen64.parameters()], strict=True)
    ):
        assert_fp32(g, r, f"grad {i}")


def test_gen_input_bf16():
    """bf16 tokens, fp32 projection, bf16 output (the autocast case), random bf16 upstream: the 2x rule
    against the reference input built under autocast."""
    x = make("ds!=dt,3x5", dtype=torch.bfloat16, seed=3)
    mask = x["mask"]
    full, W, b, tok = leaves(x)
    out = mg.gen_input_op(full[:, 1:], mask, W, b, tok, 3, 5, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    up = randn(*out.shape, gen=x["gen"], dtype=torch.bfloat16)
    (out.float() * up.float()).sum().backward()
    got = grads_of(leaves(x))
    low_in = [v.detach().clone().requires_grad_() for v in leaves(x)]
    with autocast_bf16():
        low = ref_input(low_in[0][:, 1:], mask, *low_in[1:], 3, 5)
    (low.float() * up.float()).sum().backward()
    ref_in = [v.detach().double().requires_grad_() for v in leaves(x)]
    ref = ref_input(ref_in[0][:, 1:], mask, *ref_in[1:], 3, 5)
    (ref * up.double()).sum().backward()
    assert_bf16(out, low, ref, "x")
    for name, g, lo, r in zip(
        ["ds", "dW", "db", "dtok"], got, [v.grad for v in low_in], [v.grad for v in ref_in], strict=True
    ):
        assert_bf16(g, lo, r, name)


def test_vitkd_gen_loss_bf16_autocast(triton_path):
    """bf16 tokens under autocast (the --amp path), end to end through a bf16 conv generator.

    The bf16 convolutions dominate both errors (each path rounds its own conv inputs/outputs): measured
    kernel/torch error ratios over 6 seeds were 0.1-1.9 for the loss and 0.95-1.3 for the gradients with
    this linear conv stack (with a ReLU between the convs, sign flips make both 1-8 % and the ratio
    0.2-2.3), so this end-to-end check uses factor 3; the per-kernel bf16 tests use the 2x rule."""
    x = make("ds!=dt,3x5", dtype=torch.bfloat16, seed=3)
    torch.manual_seed(3)
    gen = torch.nn.Sequential(
        torch.nn.Conv2d(40, 40, 3, padding=1), torch.nn.Conv2d(40, 40, 3, padding=1)
    ).to(DEVICE)
    args = lambda s, W, b, tok, g: (s, x["t"], x["mask"], W, b, tok, g)
    with autocast_bf16():
        loss = KF.vitkd_gen_loss(*args(x["s"], x["W"], x["b"], x["tok"], gen), grid=(3, 5))
    loss.backward()
    got = grads_of(leaves(x))
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    low_in = [v.detach().clone().requires_grad_() for v in leaves(x)]
    with autocast_bf16():
        low = R.vitkd_gen_loss(*args(low_in[0][:, 1:], *low_in[1:], copy.deepcopy(gen)), grid=(3, 5))
    low.backward()
    ref_in = [v.detach().double().requires_grad_() for v in leaves(x)]
    ref = R.vitkd_gen_loss(*args(ref_in[0][:, 1:], *ref_in[1:], copy.deepcopy(gen).double()), grid=(3, 5))
    ref.backward()
    # the loss is one scalar summing n = masked cells × D_t bf16-rounded terms: see bf16_scalar_atol (the H200
    # failure: kernel error 1.2e-7 vs torch 8.6e-9, |L| 2.2e-3, n = 960 -> atol 2.8e-7)
    n_terms = int(x["mask"].sum()) * x["t"].shape[-1]
    assert_bf16(loss, low, ref, "loss", factor=3.0, atol=bf16_scalar_atol(ref, n_terms))
    for name, g, lo, r in zip(
        ["ds", "dW", "db", "dtok"], got, [v.grad for v in low_in], [v.grad for v in ref_in], strict=True
    ):
        assert_bf16(g, lo, r, name, factor=3.0)


_EVERY = [("input", c) for c in mg.INPUT_FWD_CONFIGS] + [
    ("elementwise", c) for c in mg.ELEMENTWISE_CONFIGS.values()
]


@pytest.mark.parametrize(
    "kind, cfg", _EVERY, ids=[f"{k}-{c.BLOCK_M}x{c.BLOCK_N}x{c.BLOCK_K}-w{c.num_warps}" for k, c in _EVERY]
)
def test_masked_gen_every_shipped_config(kind, cfg):
    """Each shipped config in its precision: tensor-core input configs with the bf16 dot (2x rule vs the
    reference input under autocast), exact ones and the elementwise kernels in fp32 (1e-5)."""
    amp = kind == "input" and cfg in mg.INPUT_TC_CONFIGS
    x = make("ds!=dt,3x5", seed=4)
    s, W, b, tok, mask = x["s"].detach(), x["W"].detach(), x["b"].detach(), x["tok"].detach(), x["mask"]
    out = mg.gen_input_forward(
        s, mask, W, b, tok, 3, 5, torch.float32, amp=amp, config=cfg if kind == "input" else None
    )
    up = randn(*out.shape, gen=x["gen"])
    ds, dW, db, dtok = mg.gen_input_backward(
        up,
        s,
        mask,
        W,
        b,
        tok,
        3,
        5,
        True,
        True,
        True,
        amp=amp,
        config=cfg if kind == "elementwise" else None,
    )
    ref_in = [v.detach().double().requires_grad_() for v in (s, W, b, tok)]
    ref = ref_input(*ref_in[:1], mask, *ref_in[1:], 3, 5)
    (ref * up.double()).sum().backward()
    got = [ds, dW, db, dtok]
    if amp:
        low_in = [v.detach().clone().requires_grad_() for v in (s, W, b, tok)]
        with autocast_bf16():
            low = ref_input(*low_in[:1], mask, *low_in[1:], 3, 5)
        (low.float() * up).sum().backward()
        assert_bf16(out, low, ref, f"{cfg}: x")
        for n_, g, lo, r in zip(["ds", "dW", "db", "dtok"], got, low_in, ref_in, strict=True):
            assert_bf16(g, lo.grad, r.grad, f"{cfg}: {n_}")
        return
    assert_fp32(out, ref, f"{cfg}: x")
    for n_, g, r in zip(["ds", "dW", "db", "dtok"], got, [v.grad for v in ref_in], strict=True):
        assert_fp32(g, r, f"{cfg}: {n_}")
    G = randn(3, 40, 3, 5, gen=x["gen"])
    loss, dG = mg.gen_loss_forward(G, x["t"], mask, 0.25, True, config=cfg if kind == "elementwise" else None)
    G64 = G.double().requires_grad_()
    ref = ((G64.reshape(3, 40, 15).transpose(1, 2) - x["t"].double()).pow(2) * mask[:, :, None]).sum() * 0.25
    ref.backward()
    assert_fp32(loss, ref, f"{cfg}: loss")
    assert_fp32(dG, G64.grad, f"{cfg}: dG")


def test_masked_gen_compiles_fullgraph():
    x = make("ds!=dt,3x5", seed=5)
    gen = _generator(40, 2)

    def loss(s, t, mask, W, b, tok):
        xin = mg.gen_input_op(s, mask, W, b, tok, 3, 5, torch.float32)
        return mg.gen_loss_op(gen(xin), t, mask, 0.5, True)[0]

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    compiled(x["s"], x["t"], x["mask"], x["W"], x["b"], x["tok"]).backward()
    got = grads_of(leaves(x))
    loss(x["s"], x["t"], x["mask"], x["W"], x["b"], x["tok"]).backward()
    for g, r in zip(got, grads_of(leaves(x)), strict=True):
        assert torch.allclose(g, r, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(s=torch.zeros(3, 15, 24, dtype=torch.float64)), "dtype"),
        (dict(mask=torch.zeros(3, 15, dtype=torch.uint8)), "mask must be bool"),
        (dict(mask=torch.zeros(3, 16, dtype=torch.bool)), "mask must be bool"),
        (dict(h=4), "grid"),
        (dict(W=torch.zeros(24, 40)), r"\[D_t, D_s\]"),
        (dict(W=None), "projection weight"),
        (dict(b=torch.zeros(39)), "bias"),
        (dict(s=torch.zeros(3, 24, 15).transpose(1, 2)), "unit stride"),
    ],
)
def test_gen_input_launcher_errors(bad, match):
    args = dict(
        s=torch.zeros(3, 15, 24),
        mask=torch.zeros(3, 15, dtype=torch.bool),
        W=torch.zeros(40, 24),
        b=torch.zeros(40),
        tok=torch.zeros(40),
        h=3,
        w=5,
    )
    args.update(bad)
    mv = lambda v: v.to(DEVICE) if isinstance(v, torch.Tensor) else v
    a = {k: mv(v) for k, v in args.items()}
    with pytest.raises(ValueError, match=match):
        mg.gen_input_forward(a["s"], a["mask"], a["W"], a["b"], a["tok"], a["h"], a["w"], torch.float32)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(G=torch.zeros(3, 40, 15)), r"\[B, D_t, h, w\]"),
        (dict(t=torch.zeros(3, 15, 41)), "teacher tokens"),
        (dict(t=torch.zeros(3, 15, 40, dtype=torch.int32)), "dtype"),
        (dict(mask=torch.zeros(3, 14, dtype=torch.bool)), "mask"),
    ],
)
def test_gen_loss_launcher_errors(bad, match):
    args = dict(
        G=torch.zeros(3, 40, 3, 5), t=torch.zeros(3, 15, 40), mask=torch.zeros(3, 15, dtype=torch.bool)
    )
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        mg.gen_loss_forward(args["G"].to(DEVICE), args["t"].to(DEVICE), args["mask"].to(DEVICE), 1.0, True)


def test_the_triton_path_runs_a_module_generator_compiled(triton_path, monkeypatch):
    """On CUDA the Triton path runs an ``nn.Module`` generator through one compiled call (inductor fuses its
    bias adds and ReLU as in the compiled reference it is timed against). Forced here on CPU with a
    counting dynamo backend that runs the captured graph as it is: the same loss and gradients (generator
    parameters included) as the eager generator, one compilation for repeated calls, and a plain
    callable is called as it is."""
    from fastkd.ops import dispatch as D
    from fastkd.ops import routing

    x = make("ds!=dt,3x5", seed=4)
    gen = _generator(x["t"].shape[-1], 1)

    def run():
        for v in [*leaves(x), *gen.parameters()]:
            v.grad = None
        args = (x["s"], x["t"], x["mask"], x["W"], x["b"], x["tok"], gen)
        loss = KF.vitkd_gen_loss(*args, grid=(x["h"], x["w"]))
        loss.backward()
        return loss.detach(), grads_of(leaves(x)) + grads_of(list(gen.parameters()))

    monkeypatch.setattr(D, "_compile_generator_here", lambda t: False)  # the baseline: eager, on CUDA too
    eager = run()  # (on CUDA the default would run inductor here, whose fusions differ in the last bits)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(D, "_compile_generator_here", lambda t: True)
    monkeypatch.setitem(routing._S.compiled, "_generator", torch.compile(D._call_generator, backend=backend))
    compiled = [run(), run()]
    assert len(graphs) == 1, "one compilation for repeated calls of one generator"
    for loss, grads in compiled:
        assert torch.equal(loss, eager[0])
        assert all(torch.equal(a, b) for a, b in zip(grads, eager[1], strict=True))
    calls = []
    plain = lambda v: calls.append(1) or gen(v)  # noqa: E731
    KF.vitkd_gen_loss(x["s"], x["t"], x["mask"], x["W"], x["b"], x["tok"], plain, grid=(x["h"], x["w"]))
    assert calls == [1] and len(graphs) == 1


def test_a_generator_that_does_not_compile_runs_eagerly(triton_path, monkeypatch, capsys):
    """A compile failure of the generator (a dynamo/inductor error at its first call) is one stderr line,
    then the eager generator from then on: the same loss as the eager path, no second attempt."""
    import torch._dynamo.exc as dyn_exc

    from fastkd.ops import dispatch as D
    from fastkd.ops import routing

    x = make("ds!=dt,3x5", seed=4)
    gen = _generator(x["t"].shape[-1], 1)
    args = (x["s"], x["t"], x["mask"], x["W"], x["b"], x["tok"], gen)
    monkeypatch.setattr(D, "_compile_generator_here", lambda t: False)  # the baseline: eager, on CUDA too
    eager = KF.vitkd_gen_loss(*args, grid=(x["h"], x["w"])).detach()
    tries = []

    def broken(*a):
        tries.append(1)
        raise dyn_exc.TorchDynamoException("no compiler here")

    monkeypatch.setattr(D, "_compile_generator_here", lambda t: True)
    monkeypatch.setitem(routing._S.compiled, "_generator", broken)
    for _ in range(2):
        assert torch.equal(KF.vitkd_gen_loss(*args, grid=(x["h"], x["w"])).detach(), eager)
    assert tries == [1]
    assert capsys.readouterr().err.count("generator runs eagerly") == 1
