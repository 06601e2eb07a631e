"""fastkd.functional on the Triton path (the interpreter on CPU, CUDA when present): every kernel-covered
public function against the fp64 reference, including multi-layer ViTKD mimic on patch views."""

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
