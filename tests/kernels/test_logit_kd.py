"""Fused logit KD (kernels/logit_kd.py) vs the fp64 reference: KD / NKD from dense teacher logits and
from sparse top-K records (fp16 values + int16 ids + fp32 logsumexp), loss and dS under random upstream
gradients, C not a power of two, multi-block rows, every shipped config."""

import pytest
import torch
from kd_testutil import DEVICE, assert_bf16, assert_fp32, autocast_bf16, randn, upstream_scalar

from fastkd import functional as KF
from fastkd.kernels import logit_kd as lk
from fastkd.losses import reference as R


def make(B, C, K=None, dtype=torch.float32, seed=0, label_in_topk=True):
    g = torch.Generator().manual_seed(seed)
    s = randn(B, C, gen=g, dtype=dtype, scale=3.0).requires_grad_()
    t = randn(B, C, gen=g, dtype=dtype, scale=3.0)
    y = torch.randint(0, C, (B,), generator=g).to(DEVICE)
    rec = None
    if K is not None:
        vals, ids = t.float().topk(K, dim=1)
        if label_in_topk:
            y[0] = ids[0, min(2, K - 1)]
        if K < C:
            y[-1] = t.float().topk(K + 1, dim=1).indices[-1, K]  # a label outside the top-K
        rec = (vals.half(), ids.to(torch.int16 if C <= 32767 else torch.int32), t.float().logsumexp(1))
    return dict(s=s, t=t, y=y, rec=rec, up=upstream_scalar(g))


def run(fn_kernel, fn_ref, x, low_fn=None):
    """Kernel loss/grad vs the fp64 reference (and, when ``low_fn`` is given, the bf16 rule)."""
    s = x["s"]
    s.grad = None
    loss = fn_kernel(s)
    (x["up"] * loss).backward()
    s64 = s.detach().double().requires_grad_()
    ref = fn_ref(s64)
    (x["up"] * ref).backward()
    if low_fn is None:
        assert_fp32(loss, ref, "loss")
        assert_fp32(s.grad, s64.grad, "ds")
        return
    sl = s.detach().clone().requires_grad_()
    with autocast_bf16():
        low = low_fn(sl)
    (x["up"] * low).backward()
    assert s.grad.dtype == torch.bfloat16
    assert_bf16(loss, low, ref, "loss")
    assert_bf16(s.grad, sl.grad, s64.grad, "ds")


def _dense(x, T=4.0, nkd=False, tau=1.0, gamma=1.0, config=None):
    if nkd:
        return lambda s: (
            lk.logit_kd_forward(s, x["t"], x["y"], tau, gamma, True, config)[0]
            if config
            else lk.logit_kd_op(s, x["t"], x["y"], tau, gamma, True, True)[0]
        )
    dummy = torch.empty(0, dtype=torch.long, device=DEVICE)
    return lambda s: lk.logit_kd_op(s, x["t"], dummy, T, 1.0, False, True)[0]


def _topk(x, T=4.0, nkd=False, tau=1.0, gamma=1.0):
    v, i, lse = x["rec"]
    y = x["y"] if nkd else torch.empty(0, dtype=torch.long, device=DEVICE)
    return lambda s: lk.logit_kd_topk_op(s, v, i, lse, y, tau if nkd else T, gamma, nkd, True)[0]


@pytest.mark.parametrize("B, C", [(3, 10), (5, 37), (3, 300)])
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_dense_fp32(B, C, T):
    x = make(B, C, seed=C)
    run(_dense(x, T=T), lambda s: R.kd_loss(s, x["t"].double(), T=T), x)


@pytest.mark.parametrize("B, C", [(3, 10), (5, 37), (3, 300)])
@pytest.mark.parametrize("tau, gamma", [(1.0, 1.0), (2.0, 1.5)])
def test_nkd_dense_fp32(B, C, tau, gamma):
    x = make(B, C, seed=C + 1)
    run(
        _dense(x, nkd=True, tau=tau, gamma=gamma),
        lambda s: R.nkd_loss(s, x["t"].double(), x["y"], tau, gamma),
        x,
    )


TOPK_CASES = [(3, 10, 5), (5, 37, 5), (3, 37, 1), (3, 10, 10), (3, 300, 7), (2, 40, 40)]


@pytest.mark.parametrize("B, C, K", TOPK_CASES)
def test_kd_topk_fp32(B, C, K):
    x = make(B, C, K, seed=C + K)
    v, i, lse = x["rec"]
    run(_topk(x, T=2.0), lambda s: R.kd_loss_topk(s, v.double(), i, lse.double(), T=2.0), x)


@pytest.mark.parametrize("B, C, K", TOPK_CASES)
def test_nkd_topk_fp32(B, C, K):
    x = make(B, C, K, seed=C + K + 1)
    v, i, lse = x["rec"]
    run(
        _topk(x, nkd=True, tau=1.5, gamma=1.5),
        lambda s: R.nkd_loss_topk(s, v.double(), i, lse.double(), x["y"], 1.5, 1.5),
        x,
    )


def test_topk_remainder_clamp_and_confident_teacher():
    """A record whose top-K mass reaches exp(t_lse) (fp16 rounding) clamps the remainder; a confident
    teacher (remainder ~1e-6 of the mass) is where a naive fp32 1 − exp(x) loses all accuracy."""
    x = make(3, 37, 5, seed=11)
    v, i, lse = x["rec"]
    lse = lse.clone()
    lse[0] = v[0].float().logsumexp(0) - 1e-4  # top-K mass > exp(lse): remainder clamped
    lse[1] = v[1].float().logsumexp(0) + 1e-6  # tiny remainder
    x["rec"] = (v, i, lse)
    for nkd in (False, True):
        ref = (
            (lambda s: R.nkd_loss_topk(s, v.double(), i, lse.double(), x["y"], 1.0, 1.0))
            if nkd
            else (lambda s: R.kd_loss_topk(s, v.double(), i, lse.double(), T=1.0))
        )
        run(_topk(x, T=1.0, nkd=nkd), ref, x)


def test_topk_remainder_classes_gradient():
    """A confident teacher (top-K holds ~99.8 % of the mass) and a student sure of the top classes: the
    remainder classes' gradient is ≈ −(T/B)·q_r, so their entries test the remainder mass itself (a plain
    fp32 1 − exp(lse_K − lse) is off by ~5e-5 relative here)."""
    g = torch.Generator().manual_seed(21)
    B, C, K = 3, 37, 5
    t = torch.randn(B, C, generator=g) * 0.3
    top = torch.stack([torch.randperm(C, generator=g)[:K] for _ in range(B)])
    t = t.scatter(1, top, 8.0 + torch.rand(B, K, generator=g))
    s = (torch.randn(B, C, generator=g) * 0.3 - 5.0).scatter(1, top, 12.0).to(DEVICE).requires_grad_()
    vals, ids = t.topk(K, dim=1)
    v, i, lse = vals.half().to(DEVICE), ids.to(torch.int16).to(DEVICE), t.logsumexp(1).to(DEVICE)
    rest = torch.ones(B, C, dtype=torch.bool).scatter(1, ids, False).to(DEVICE)
    y = torch.tensor([0, 1, 2], device=DEVICE)
    for nkd in (False, True):
        s.grad = None
        loss = lk.logit_kd_topk_op(s, v, i, lse, y, 1.0, 1.0, nkd, True)[0]
        loss.backward()
        s64 = s.detach().double().requires_grad_()
        ref = (
            R.nkd_loss_topk(s64, v.double(), i, lse.double(), y)
            if nkd
            else R.kd_loss_topk(s64, v.double(), i, lse.double(), T=1.0)
        )
        ref.backward()
        assert_fp32(loss, ref, "loss")
        assert_fp32(s.grad[rest], s64.grad[rest], "ds at the remainder classes")


def test_topk_equals_dense_on_the_implied_teacher():
    """The sparse kernel against the dense kernel fed the implied dense teacher logits."""
    x = make(4, 37, 6, seed=12)
    v, i, lse = x["rec"]
    vv, lse64 = v.double(), lse.double()
    rest = torch.log((lse64.exp() - vv.exp().sum(1)) / (37 - 6))
    dense = rest[:, None].expand(4, 37).clone().scatter(1, i.long(), vv).float()
    a = lk.logit_kd_topk_op(x["s"].detach(), v, i, lse, x["y"], 1.0, 1.0, True, True)
    b = lk.logit_kd_op(x["s"].detach(), dense, x["y"], 1.0, 1.0, True, True)
    assert_fp32(a[0], b[0], "loss")
    assert_fp32(a[1], b[1], "ds")


def test_logit_kd_bf16():
    x = make(5, 37, 5, dtype=torch.bfloat16, seed=13)
    t, (v, i, lse), y = x["t"], x["rec"], x["y"]
    run(
        _dense(x, T=4.0),
        lambda s: R.kd_loss(s, t.double(), T=4.0),
        x,
        low_fn=lambda s: R.kd_loss(s, t, T=4.0),
    )
    run(_dense(x, nkd=True), lambda s: R.nkd_loss(s, t.double(), y), x, low_fn=lambda s: R.nkd_loss(s, t, y))
    run(
        _topk(x, T=4.0),
        lambda s: R.kd_loss_topk(s, v.double(), i, lse.double(), T=4.0),
        x,
        low_fn=lambda s: R.kd_loss_topk(s, v, i, lse, T=4.0),
    )
    run(
        _topk(x, nkd=True),
        lambda s: R.nkd_loss_topk(s, v.double(), i, lse.double(), y),
        x,
        low_fn=lambda s: R.nkd_loss_topk(s, v, i, lse, y),
    )


@pytest.mark.parametrize("name", list(lk.CLASS_CONFIGS))
def test_logit_kd_every_shipped_config(name):
    """Each shipped class-block config, with C spanning several blocks of it (C = 300 / 2100 / 4200)."""
    C = {"small": 300, "medium": 2100, "large": 4200}[name]
    x = make(2, C, 7, seed=14)
    v, i, lse = x["rec"]
    for nkd in (False, True):
        for K_pad in lk.TOPK_WIDTHS:
            cfg = lk.CLASS_CONFIGS[name]._replace(BLOCK_K=K_pad)
            yy = x["y"] if nkd else None
            kd = lambda s, cfg=cfg, yy=yy: lk.logit_kd_topk_forward(
                s.detach(), v, i, lse, yy, 2.0, 1.0, True, cfg
            )
            loss, ds = kd(x["s"])
            s64 = x["s"].detach().double().requires_grad_()
            ref = (
                R.nkd_loss_topk(s64, v.double(), i, lse.double(), x["y"], 2.0)
                if nkd
                else R.kd_loss_topk(s64, v.double(), i, lse.double(), T=2.0)
            )
            ref.backward()
            assert_fp32(loss, ref, f"{name}/K{K_pad}: loss")
            assert_fp32(ds, s64.grad, f"{name}/K{K_pad}: ds")
        loss, ds = lk.logit_kd_forward(
            x["s"].detach(), x["t"], x["y"] if nkd else None, 2.0, 1.0, True, lk.CLASS_CONFIGS[name]
        )
        s64 = x["s"].detach().double().requires_grad_()
        ref = R.nkd_loss(s64, x["t"].double(), x["y"], 2.0) if nkd else R.kd_loss(s64, x["t"].double(), 2.0)
        ref.backward()
        assert_fp32(loss, ref, f"{name}: dense loss")
        assert_fp32(ds, s64.grad, f"{name}: dense ds")


def test_need_grad_false_skips_the_gradient():
    x = make(3, 10, seed=15)
    loss, ds = lk.logit_kd_forward(x["s"].detach(), x["t"], None, 4.0, 1.0, need_grad=False)
    assert ds.numel() == 0
    loss2, ds2 = lk.logit_kd_forward(x["s"].detach(), x["t"], None, 4.0, 1.0, need_grad=True)
    assert ds2.shape == (3, 10) and torch.equal(loss, loss2)
    assert_fp32(loss, R.kd_loss(x["s"].detach().double(), x["t"].double()), "loss")


def test_logit_kd_compiles_fullgraph():
    x = make(3, 37, 5, seed=16)
    v, i, lse = x["rec"]

    def loss(s, t, y):
        a = lk.logit_kd_op(s, t, y, 1.0, 1.0, True, True)[0]
        return a + lk.logit_kd_topk_op(s, v, i, lse, y, 4.0, 1.0, False, True)[0]

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    compiled(x["s"], x["t"], x["y"]).backward()
    g = x["s"].grad.clone()
    x["s"].grad = None
    loss(x["s"], x["t"], x["y"]).backward()
    assert torch.allclose(g, x["s"].grad)


def test_functional_soft_targets_and_dispatch():
    """fastkd.functional on the Triton path: soft labels are argmaxed, K > 256 falls back to the reference."""
    KF.set_fused(True, interpreter=DEVICE.type == "cpu")
    try:
        x = make(3, 300, 7, seed=17)
        soft = torch.softmax(randn(3, 300, gen=torch.Generator().manual_seed(1)), 1)
        assert KF.active_path(x["s"], x["t"]) == "triton"
        assert_fp32(
            KF.nkd_loss(x["s"], x["t"], soft), R.nkd_loss(x["s"].double(), x["t"].double(), soft), "nkd"
        )
        big = x["t"].float().topk(260, dim=1)
        rec = (big.values.half(), big.indices, x["t"].float().logsumexp(1))
        got = KF.kd_loss_topk(x["s"], *rec)  # K = 260 > 256: the reference itself
        assert torch.equal(got, R.kd_loss_topk(x["s"], *rec))
    finally:
        KF.set_fused(False)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(s=torch.zeros(3, 10, dtype=torch.float64)), "dtype"),
        (dict(s=torch.zeros(30)), "2-D"),
        (dict(t=torch.zeros(3, 11)), "same shape"),
        (dict(s=torch.zeros(10, 3).t()), "unit class stride"),
        (dict(y=torch.zeros(3, 10)), "int labels"),
        (dict(y=torch.zeros(4, dtype=torch.long)), "int labels"),
    ],
)
def test_dense_launcher_errors(bad, match):
    a = dict(s=torch.zeros(3, 10), t=torch.zeros(3, 10), y=torch.zeros(3, dtype=torch.long))
    a.update(bad)
    with pytest.raises(ValueError, match=match):
        lk.logit_kd_forward(a["s"].to(DEVICE), a["t"].to(DEVICE), a["y"].to(DEVICE), 1.0, 1.0)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(v=torch.zeros(3, 11), i=torch.zeros(3, 11, dtype=torch.long)), "K = 11"),
        (dict(i=torch.zeros(3, 4, dtype=torch.long)), r"\[B, K\]"),
        (dict(i=torch.zeros(3, 5)), "integer"),
        (dict(lse=torch.zeros(3, 1)), "t_lse"),
        (
            dict(v=torch.zeros(3, 300), i=torch.zeros(3, 300, dtype=torch.long), s=torch.zeros(3, 400)),
            "not supported",
        ),
    ],
)
def test_topk_launcher_errors(bad, match):
    a = dict(
        s=torch.zeros(3, 10), v=torch.zeros(3, 5), i=torch.zeros(3, 5, dtype=torch.long), lse=torch.zeros(3)
    )
    a.update(bad)
    with pytest.raises(ValueError, match=match):
        lk.logit_kd_topk_forward(a["s"].to(DEVICE), a["v"].to(DEVICE), a["i"].to(DEVICE), a["lse"].to(DEVICE))
