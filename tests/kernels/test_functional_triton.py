"""fastkd.functional on the Triton path (the interpreter on CPU, CUDA when present): every kernel-covered
public function against the fp64 reference, including multi-layer ViTKD mimic on patch views."""

import functools

import pytest
import torch
from kd_testutil import DEVICE, assert_fp32, randn

from fastkd import functional as KF
from fastkd.losses import reference as R


@pytest.fixture(autouse=True)
def triton_path():
    KF.set_fused(True, interpreter=DEVICE.type == "cpu")
    yield
    KF.set_fused(False)


def _check(fn_kf, fn_ref, tensors):
    """fn_kf(*tensors) vs fn_ref(*fp64 copies): value and the gradient of every float input needing one."""
    ins = [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]
    ref_ins = [
        t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point() else t for t in tensors
    ]
    out, ref = fn_kf(*ins), fn_ref(*ref_ins)
    assert_fp32(out, ref, "value")
    w = (
        randn(*out.shape, gen=torch.Generator().manual_seed(0))
        if out.dim()
        else torch.tensor(0.83, device=DEVICE)
    )
    (out * w).sum().backward()
    (ref * w.double()).sum().backward()
    for i, (a, r) in enumerate(zip(ins, ref_ins, strict=True)):
        if a.requires_grad and (a.grad is not None or r.grad is not None):
            zeros = torch.zeros_like(a)
            assert_fp32(zeros if a.grad is None else a.grad, zeros if r.grad is None else r.grad, f"grad {i}")


def test_describe_and_path():
    x = torch.zeros(2, 3, device=DEVICE)
    assert KF.active_path(x) == "triton"
    assert "Triton" in KF.describe(DEVICE)
    assert KF.active_path(x.double()) == "reference"  # fp64: the kernels take fp32 / bf16 / fp16


def test_logit_losses():
    g = torch.Generator().manual_seed(1)
    s, t = randn(3, 37, gen=g, scale=3).requires_grad_(), randn(3, 37, gen=g, scale=3)
    y = torch.tensor([0, 5, 36], device=DEVICE)
    _check(lambda a, b: KF.kd_loss(a, b, T=2.0), lambda a, b: R.kd_loss(a, b, T=2.0), [s, t])
    _check(lambda a, b: KF.nkd_loss(a, b, y, 1.5, 2.0), lambda a, b: R.nkd_loss(a, b, y, 1.5, 2.0), [s, t])
    vals, ids = t.topk(5, dim=1)
    lse = t.logsumexp(1)
    _check(
        lambda a, v, l: KF.kd_loss_topk(a, v, ids, l),
        lambda a, v, l: R.kd_loss_topk(a, v, ids, l),
        [s, vals.half().float(), lse],
    )
    _check(
        lambda a, v, l: KF.nkd_loss_topk(a, v, ids.int(), l, y),
        lambda a, v, l: R.nkd_loss_topk(a, v, ids, l, y),
        [s, vals, lse],
    )


def test_vitkd_mimic_multi_layer_patch_views():
    g = torch.Generator().manual_seed(2)
    s0, s1 = (randn(3, 16, 24, gen=g).requires_grad_() for _ in range(2))
    t0, t1 = (randn(3, 16, 40, gen=g) for _ in range(2))
    w0, w1 = (randn(40, 24, gen=g, scale=0.2).requires_grad_() for _ in range(2))
    b0 = randn(40, gen=g).requires_grad_()

    def loss(mod):
        return lambda a, b, c, d, e, f, h: mod.vitkd_mimic_loss(
            [a[:, 1:], b[:, 1:]], [c[:, 1:], d[:, 1:]], [e, f], [h, None], alpha=0.7
        )

    _check(loss(KF), loss(R), [s0, s1, t0, t1, w0, w1, b0])


def test_vitkd_mimic_with_a_tensor_alpha():
    """α given as a device tensor (a schedule): it multiplies the op's sum, as in the reference, and is never
    read on the host (the op's factor is a number: a tensor there would be a ``float()`` sync)."""
    g = torch.Generator().manual_seed(12)
    s0, s1 = (randn(3, 16, 24, gen=g).requires_grad_() for _ in range(2))
    t0, t1 = (randn(3, 16, 40, gen=g) for _ in range(2))
    w0, w1 = (randn(40, 24, gen=g, scale=0.2).requires_grad_() for _ in range(2))
    alpha = torch.tensor(0.7, device=DEVICE)

    def loss(mod, a_=alpha):
        return lambda a, b, c, d, e, f: mod.vitkd_mimic_loss(
            [a[:, 1:], b[:, 1:]], [c[:, 1:], d[:, 1:]], [e, f], None, alpha=a_
        )

    _check(loss(KF), loss(R, alpha.double()), [s0, s1, t0, t1, w0, w1])
    reads = []
    orig_float, orig_item = torch.Tensor.__float__, torch.Tensor.item
    torch.Tensor.__float__ = lambda self: reads.append("float") or orig_float(self)
    torch.Tensor.item = lambda self: reads.append("item") or orig_item(self)
    try:
        KF.vitkd_mimic_loss([s0[:, 1:]], [t0[:, 1:]], [w0], None, alpha=alpha)
    finally:
        torch.Tensor.__float__, torch.Tensor.item = orig_float, orig_item
    assert reads == [], f"a tensor was read on the host: {reads}"


def test_cls_map_functions():
    g = torch.Generator().manual_seed(3)
    s, t = randn(3, 17, 24, gen=g).requires_grad_(), randn(3, 16, 40, gen=g)
    _check(
        lambda a, b: KF.cls_patch_map_loss(a, b, 2, 1), lambda a, b: R.cls_patch_map_loss(a, b, 2, 1), [s, t]
    )
    _check(lambda a: KF.cls_patch_map(a, 2), lambda a: R.cls_patch_map(a, 2), [s])


def test_token_kd_matches_its_reference_path():
    g = torch.Generator().manual_seed(4)
    s, t = randn(3, 16, 24, gen=g).requires_grad_(), randn(3, 17, 40, gen=g)
    w, b = randn(40, 24, gen=g, scale=0.2).requires_grad_(), randn(40, gen=g).requires_grad_()
    for field in ("mimic", "cls_map", "s_cls", "t_cls"):

        def via(mod_fused, field=field):
            def f(a, c, d, e):
                KF.set_fused(mod_fused, interpreter=DEVICE.type == "cpu")
                return getattr(KF.token_kd(a, c, d, e, num_prefix_s=1, num_prefix_t=2), field)

            return f

        if field == "t_cls":
            out = via(True)(s, t, w, b)
            KF.set_fused(False)
            assert_fp32(out, via(False)(s.double(), t.double(), w.double(), b.double()), field)
        else:
            _check(via(True), via(False), [s, t, w, b])


def _graph_ops(t: torch.Tensor) -> set[str]:
    """The names of every autograd node behind ``t``."""
    names, seen, stack = set(), set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(fn.name())
        stack.extend(f for f, _ in fn.next_functions)
    return names


def _mimic_on_views(mod, xs, ts, ws, bs, autocast, *, P, up):
    """(loss, grads w.r.t. xs, ws, bs) of ``mod.vitkd_mimic_loss`` on the patch views x[:, P:]."""
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
        loss = mod.vitkd_mimic_loss([v[:, P:] for v in xs], [v[:, P:] for v in ts], ws, bs, alpha=0.7)
    return loss, torch.autograd.grad(loss * up, [*xs, *ws, *bs])


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
def test_vitkd_mimic_takes_patch_views_whole(amp):
    """ViTKD hands the mimic patch views x[:, P:] of the fp32 block outputs [B, P+N, D]: the fused op takes x
    whole (num_prefix_s = P), so autograd runs no SliceBackward (zeros + copy of x per layer); the loss
    and dx match the reference on the same views (fp32: the fp64 rule; autocast: the flash-attention rule
    against the reference under the same autocast); P = 1 and 2, odd B."""
    from kd_testutil import assert_bf16

    g = torch.Generator().manual_seed(5)
    for P, (B, N, D_s, D_t) in ((1, (3, 16, 24, 40)), (2, (5, 9, 32, 32))):
        x = [randn(B, P + N, D_s, gen=g).requires_grad_() for _ in range(2)]
        t = [randn(B, P + N, D_t, gen=g) for _ in range(2)]
        w = [randn(D_t, D_s, gen=g, scale=D_s**-0.5).requires_grad_() for _ in range(2)]
        b = [randn(D_t, gen=g, scale=0.1).requires_grad_() for _ in range(2)]
        run = functools.partial(_mimic_on_views, P=P, up=0.83)
        loss, grads = run(KF, x, t, w, b, amp)
        assert "SliceBackward0" not in _graph_ops(loss), "the fused mimic took the patch view, not x whole"
        for v, gx in zip(x, grads[:2], strict=True):
            assert gx.shape == v.shape and torch.all(gx[:, :P] == 0)
        d = lambda vs: [v.detach().double().requires_grad_(v.requires_grad) for v in vs]  # noqa: E731
        ref, ref_g = run(R, d(x), d(t), d(w), d(b), False)
        if amp:
            low, low_g = run(R, x, t, w, b, True)
            assert_bf16(loss, low, ref, f"P={P} loss")
            for i, (a, lo, r) in enumerate(zip(grads, low_g, ref_g, strict=True)):
                assert_bf16(a, lo, r, f"P={P} grad {i}")
        else:
            assert_fp32(loss, ref, f"P={P} loss")
            for i, (a, r) in enumerate(zip(grads, ref_g, strict=True)):
                assert_fp32(a, r, f"P={P} grad {i}")


def test_vitkd_mimic_other_views_keep_the_view():
    """A view that is not x[:, P:] of its base (the first N rows, a channel slice, a batch slice, a detached
    slice) is passed as it is, and the loss through it stays exact."""
    from fastkd.ops.dispatch import _whole_tokens

    x = torch.randn(2, 5, 8, requires_grad=True)
    assert _whole_tokens(x[:, 1:])[1] == 1 and _whole_tokens(x[:, 1:])[0] is x
    xd = x.detach()
    assert _whole_tokens(xd[:, 1:])[0] is xd  # a patch view of a no-grad tensor (a teacher's): whole too
    for v in (x[:, :-1], x[:, 1:, :4], x[:1, 1:], x[:, 1:].detach()):
        xv, P = _whole_tokens(v)
        assert xv is v and P == 0, tuple(v.shape)
    g = torch.Generator().manual_seed(6)
    s = randn(3, 7, 12, gen=g).requires_grad_()
    t = randn(3, 6, 20, gen=g)
    w = randn(20, 12, gen=g, scale=0.3).requires_grad_()
    _check(
        lambda a, c, e: KF.vitkd_mimic_loss([a[:, :-1]], [c], [e], None, alpha=0.5),
        lambda a, c, e: R.vitkd_mimic_loss([a[:, :-1]], [c], [e], None, alpha=0.5),
        [s, t, w],
    )
