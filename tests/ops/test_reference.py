"""Tests for fastkd.ops.reference: hand computations (numpy loops), invariants, errors, gradchecks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fastkd.ops import reference as R

DT = torch.float64


def rng(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int = 0, scale: float = 1.0, requires_grad: bool = False) -> torch.Tensor:
    x = torch.randn(*shape, generator=rng(seed), dtype=DT) * scale
    return x.requires_grad_(requires_grad)


# ------------------------------------------------------------------------------- numpy helpers (independent)
def np_log_softmax(row: np.ndarray) -> np.ndarray:
    m = row.max()
    return row - m - math.log(sum(math.exp(v - m) for v in row))


def np_softmax(row: np.ndarray) -> np.ndarray:
    return np.exp(np_log_softmax(row))


def np_normalize(v: np.ndarray) -> np.ndarray:
    return v / math.sqrt(sum(x * x for x in v))


def np_kd(s: np.ndarray, t: np.ndarray, T: float) -> float:
    total = 0.0
    for b in range(s.shape[0]):
        lp, lq = np_log_softmax(s[b] / T), np_log_softmax(t[b] / T)
        total += sum(math.exp(lq[c]) * (lq[c] - lp[c]) for c in range(s.shape[1]))
    return T * T * total / s.shape[0]


def np_nkd(s: np.ndarray, t: np.ndarray, y: np.ndarray, tau: float, gamma: float) -> float:
    B = s.shape[0]
    l_t, l_n = 0.0, 0.0
    for b in range(B):
        yb = int(y[b])
        l_t += -np_softmax(t[b])[yb] * np_log_softmax(s[b])[yb]
        s2, t2 = np.delete(s[b], yb), np.delete(t[b], yb)
        q2, lp2 = np_softmax(t2 / tau), np_log_softmax(s2 / tau)
        l_n += -gamma * tau * tau * sum(q2[i] * lp2[i] for i in range(len(s2)))
    return l_t / B + l_n / B


def implied_dense(t_vals: torch.Tensor, t_ids: torch.Tensor, t_lse: torch.Tensor, C: int) -> torch.Tensor:
    """The implied teacher logits of a top-K record, built densely in numpy (test only)."""
    v, ids, lse = t_vals.double().numpy(), t_ids.long().numpy(), t_lse.double().numpy()
    B, K = v.shape
    out = np.empty((B, C))
    for b in range(B):
        if K < C:
            rem = math.exp(lse[b]) - sum(math.exp(x) for x in v[b])
            out[b, :] = math.log(rem / (C - K))
        for k in range(K):
            out[b, ids[b, k]] = v[b, k]
    return torch.from_numpy(out)


def topk_record(t: torch.Tensor, K: int):
    vals, ids = t.topk(K, dim=1)
    return vals, ids, torch.logsumexp(t, dim=1)


def np_grid(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """[B, N, D] -> [B, D, h, w] row-major, by loops."""
    B, N, D = x.shape
    g = np.zeros((B, D, h, w))
    for b in range(B):
        for n in range(N):
            g[b, :, n // w, n % w] = x[b, n]
    return g


# ------------------------------------------------------------------------------------------------- KD
def test_kd_matches_hand_computation():
    s, t = randn(3, 5, seed=1, scale=2), randn(3, 5, seed=2, scale=2)
    for T in (1.0, 4.0):
        got = R.kd_loss(s, t, T=T)
        assert got.dim() == 0 and got.dtype == DT
        assert got.item() == pytest.approx(np_kd(s.numpy(), t.numpy(), T), rel=1e-12)


def test_kd_identical_logits_is_zero():
    s = randn(4, 7, seed=3, scale=3)
    assert abs(R.kd_loss(s, s.clone()).item()) < 1e-14


def test_kd_topk_full_k_equals_dense():
    s, t = randn(4, 6, seed=4, scale=2), randn(4, 6, seed=5, scale=3)
    vals, ids, lse = topk_record(t, 6)
    for T in (1.0, 4.0):
        want = R.kd_loss(s, t, T=T).item()
        assert R.kd_loss_topk(s, vals, ids, lse, T=T).item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("K", [1, 3, 8])
def test_kd_topk_equals_dense_on_implied_logits(K):
    C = 10
    s, t = randn(5, C, seed=6, scale=2), randn(5, C, seed=7, scale=3)
    vals, ids, lse = topk_record(t, K)
    dense = implied_dense(vals, ids, lse, C)
    for T in (1.0, 4.0):
        want = np_kd(s.numpy(), dense.numpy(), T)
        assert R.kd_loss_topk(s, vals, ids, lse, T=T).item() == pytest.approx(want, rel=1e-10)


def test_kd_topk_storage_dtypes():
    """fp16 values, int16 ids, fp32 lse (the on-disk record) against an fp64 student."""
    C, K = 12, 4
    s, t = randn(3, C, seed=8), randn(3, C, seed=9, scale=2)
    vals, ids, _ = topk_record(t, K)
    vals16 = vals.half()
    lse = torch.logsumexp(t, dim=1).float()
    got = R.kd_loss_topk(s, vals16, ids.short(), lse, T=2.0)
    assert got.dtype == DT
    dense = implied_dense(vals16.double(), ids, lse.double(), C)
    assert got.item() == pytest.approx(np_kd(s.numpy(), dense.numpy(), 2.0), rel=1e-10)


def test_topk_inconsistent_record_stays_finite():
    """fp16 rounding can push Σ exp(t_vals) above exp(t_lse): the remainder becomes negligible, not NaN."""
    C, K = 6, 3
    s = randn(2, C, seed=19, requires_grad=True)
    vals = randn(2, K, seed=20, scale=2)
    lse = torch.logsumexp(vals, dim=1) - 1e-3
    y = torch.tensor([0, 5])
    for loss in (R.kd_loss_topk(s, vals, torch.arange(K).repeat(2, 1), lse),
                 R.nkd_loss_topk(s, vals, torch.arange(K).repeat(2, 1), lse, y)):
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    # a negligible remainder: equals the dense loss with the other classes at -1e4
    dense = torch.full((2, C), -1e4, dtype=DT)
    dense[:, :K] = vals
    got = R.kd_loss_topk(s, vals, torch.arange(K).repeat(2, 1), lse, T=1.0)
    assert got.item() == pytest.approx(R.kd_loss(s, dense, T=1.0).item(), rel=1e-9)


# ------------------------------------------------------------------------------------------------ NKD
def test_nkd_matches_hand_computation():
    s, t = randn(4, 6, seed=10, scale=2), randn(4, 6, seed=11, scale=2)
    y = torch.tensor([0, 5, 2, 2])
    for tau, gamma in ((1.0, 1.0), (2.0, 1.5)):
        got = R.nkd_loss(s, t, y, tau=tau, gamma=gamma)
        assert got.dim() == 0
        assert got.item() == pytest.approx(np_nkd(s.numpy(), t.numpy(), y.numpy(), tau, gamma), rel=1e-12)


def test_nkd_soft_label_equals_argmax():
    s, t = randn(4, 6, seed=12), randn(4, 6, seed=13)
    soft = torch.softmax(randn(4, 6, seed=14, scale=3), dim=1)
    a = R.nkd_loss(s, t, soft, tau=1.5)
    b = R.nkd_loss(s, t, soft.argmax(dim=1), tau=1.5)
    assert a.item() == pytest.approx(b.item(), rel=1e-14)


@pytest.mark.parametrize("K", [2, 5, 6])
@pytest.mark.parametrize("where", ["inside", "outside"])
def test_nkd_topk_equals_dense_on_implied_logits(K, where):
    C = 7
    s, t = randn(4, C, seed=15, scale=2), randn(4, C, seed=16, scale=2)
    vals, ids, lse = topk_record(t, K)
    if where == "inside":
        y = ids[:, K - 1].clone()
    else:
        y = torch.tensor([next(c for c in range(C) if c not in ids[b].tolist()) for b in range(4)])
    dense = implied_dense(vals, ids, lse, C)
    for tau, gamma in ((1.0, 1.0), (2.0, 1.5)):
        want = np_nkd(s.numpy(), dense.numpy(), y.numpy(), tau, gamma)
        got = R.nkd_loss_topk(s, vals, ids, lse, y, tau=tau, gamma=gamma)
        assert got.item() == pytest.approx(want, rel=1e-10)


def test_nkd_topk_full_k_equals_dense():
    s, t = randn(3, 5, seed=17), randn(3, 5, seed=18, scale=2)
    y = torch.tensor([4, 0, 2])
    vals, ids, lse = topk_record(t, 5)
    got = R.nkd_loss_topk(s, vals, ids, lse, y, tau=2.0)
    assert got.item() == pytest.approx(R.nkd_loss(s, t, y, tau=2.0).item(), rel=1e-12)


# ---------------------------------------------------------------------------------------------- ViTKD
def test_vitkd_mimic_matches_hand_computation():
    B, N, Ds, Dt = 2, 3, 4, 5
    s = [randn(B, N, Ds, seed=20), randn(B, N, Ds, seed=21)]
    t = [randn(B, N, Dt, seed=22), randn(B, N, Dt, seed=23)]
    W = [randn(Dt, Ds, seed=24), randn(Dt, Ds, seed=25)]
    b = [randn(Dt, seed=26), None]
    want = 0.0
    for layer in range(2):
        sn, tn, wn = s[layer].numpy(), t[layer].numpy(), W[layer].numpy()
        bn = b[layer].numpy() if b[layer] is not None else np.zeros(Dt)
        for i in range(B):
            for n in range(N):
                for d in range(Dt):
                    pred = sum(sn[i, n, e] * wn[d, e] for e in range(Ds)) + bn[d]
                    want += (pred - tn[i, n, d]) ** 2
    want *= 3e-5 / B
    assert R.vitkd_mimic_loss(s, t, W, b).item() == pytest.approx(want, rel=1e-12)


def test_vitkd_mimic_identity_equals_plain_mse():
    s = [randn(2, 4, 6, seed=27), randn(2, 4, 6, seed=28)]
    t = [randn(2, 4, 6, seed=29), randn(2, 4, 6, seed=30)]
    want = sum(((a - c) ** 2).sum() for a, c in zip(s, t, strict=True)) * 1e-3 / 2
    assert R.vitkd_mimic_loss(s, t, None, None, alpha=1e-3).item() == pytest.approx(want.item(), rel=1e-12)
    eye = [torch.eye(6, dtype=DT)] * 2
    got = R.vitkd_mimic_loss(s, t, eye, [None, None], alpha=1e-3)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)


def test_vitkd_width_mismatch_with_none_raises():
    s, t = [randn(2, 4, 3)], [randn(2, 4, 5)]
    with pytest.raises(ValueError, match="width"):
        R.vitkd_mimic_loss(s, t, None, None)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="width"):
        R.vitkd_gen_loss(s[0], t[0], mask, None, None, torch.zeros(5), lambda x: x)
    with pytest.raises(ValueError, match="nn.Linear"):
        R.vitkd_mimic_loss(s, t, [randn(3, 5)], None)


@pytest.mark.parametrize("N", [1, 7, 16, 49, 196])
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_random_token_mask_counts(N, ratio):
    m = R.random_token_mask(5, N, ratio, generator=rng(N))
    assert m.dtype == torch.bool and m.shape == (5, N)
    want = N - math.floor(N * (1 - ratio))
    assert m.sum(dim=1).tolist() == [want] * 5


def test_random_token_mask_uses_generator():
    a = R.random_token_mask(4, 64, 0.5, generator=rng(1))
    b = R.random_token_mask(4, 64, 0.5, generator=rng(1))
    c = R.random_token_mask(4, 64, 0.5, generator=rng(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # rows are drawn independently


def _np_gen_loss(s, t, mask, W, b, tok, gen_np, h, w, beta, lam):
    B, N, _ = s.shape
    Dt = t.shape[-1]
    x = np.zeros((B, N, Dt))
    for i in range(B):
        for n in range(N):
            x[i, n] = tok if mask[i, n] else (W @ s[i, n] + b)
    g = gen_np(np_grid(x, h, w))
    total = 0.0
    for i in range(B):
        for n in range(N):
            if mask[i, n]:
                total += sum((g[i, d, n // w, n % w] - t[i, n, d]) ** 2 for d in range(Dt))
    return beta / (lam * B) * total


@pytest.mark.parametrize("grid", [None, (2, 3)])
def test_vitkd_gen_matches_hand_computation(grid):
    B, Ds, Dt = 2, 3, 4
    N = 4 if grid is None else 6
    h, w = (2, 2) if grid is None else grid
    s, t = randn(B, N, Ds, seed=31), randn(B, N, Dt, seed=32)
    W, b, tok = randn(Dt, Ds, seed=33), randn(Dt, seed=34), randn(Dt, seed=35)
    mask = R.random_token_mask(B, N, 0.5, generator=rng(3))

    def gen_t(x):  # layout-sensitive: shift along the width axis, scale by channel
        return torch.roll(x, 1, dims=3) * torch.arange(1, Dt + 1, dtype=x.dtype).view(1, Dt, 1, 1)

    def gen_np(g):
        out = np.zeros_like(g)
        for j in range(g.shape[3]):
            for d in range(Dt):
                out[:, d, :, j] = g[:, d, :, (j - 1) % g.shape[3]] * (d + 1)
        return out

    got = R.vitkd_gen_loss(s, t, mask, W, b, tok.view(1, 1, Dt), gen_t, beta=0.1, mask_ratio=0.5, grid=grid)
    arrays = (a.numpy() for a in (s, t, mask, W, b, tok))
    want = _np_gen_loss(*arrays, gen_np, h, w, 0.1, 0.5)
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_grid_errors():
    s, t = randn(1, 6, 4), randn(1, 6, 4)
    mask = torch.zeros(1, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match="grid="):
        R.vitkd_gen_loss(s, t, mask, None, None, torch.zeros(4), lambda x: x)
    with pytest.raises(ValueError, match="grid="):
        R.vitkd_gen_loss(s, t, mask, None, None, torch.zeros(4), lambda x: x, grid=(2, 2))
    with pytest.raises(ValueError, match="grid="):
        R.cskd_loss(randn(1, 6, 3), randn(1, 3, 1, 1), 0.5)


# ------------------------------------------------------------------------------------------- [CLS]-KD
def np_cls_map(tok: np.ndarray, P: int) -> np.ndarray:
    B, TT, _ = tok.shape
    out = np.zeros((B, TT - P))
    for b in range(B):
        c = np_normalize(tok[b, 0])
        for n in range(P, TT):
            out[b, n - P] = float(np.dot(c, np_normalize(tok[b, n])))
    return out


def test_cls_patch_map_and_loss_hand_computation():
    s, t = randn(2, 1 + 5, 3, seed=40), randn(2, 2 + 5, 4, seed=41)
    a = R.cls_patch_map(s)
    assert a.shape == (2, 5)
    np.testing.assert_allclose(a.numpy(), np_cls_map(s.numpy(), 1), rtol=1e-12)
    np.testing.assert_allclose(R.cls_patch_map(t, 2).numpy(), np_cls_map(t.numpy(), 2), rtol=1e-12)
    want = ((np_cls_map(t.numpy(), 2) - np_cls_map(s.numpy(), 1)) ** 2).mean()
    assert R.cls_patch_map_loss(s, t, 1, 2).item() == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="num_prefix"):
        R.cls_patch_map_loss(s, t, 1, 1)


def test_cls_embed_loss_hand_computation():
    Ds, Dt = 3, 4
    s, t = randn(2, Ds, seed=42), randn(2, Dt, seed=43)
    lin = nn.Linear(Ds, Dt).double()
    Wn, bn = lin.weight.detach().numpy(), lin.bias.detach().numpy()
    want = 0.0
    for b in range(2):
        p = Wn @ np_normalize(s.numpy()[b]) + bn
        want += sum((np_normalize(t.numpy()[b])[d] - p[d]) ** 2 for d in range(Dt))
    want /= 2 * Dt
    assert R.cls_embed_loss(s, t, lin).item() == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="projector"):
        R.cls_embed_loss(s, t, None)
    # identity projector when widths match equals the plain MSE of the normalised vectors
    t3 = randn(2, Ds, seed=44)
    sn = s / s.norm(dim=1, keepdim=True)
    tn = t3 / t3.norm(dim=1, keepdim=True)
    assert R.cls_embed_loss(s, t3, None).item() == pytest.approx(((tn - sn) ** 2).mean().item(), rel=1e-12)


def test_ald_equal_losses_known_value():
    n, L, mu = 5, 0.7, 4.0
    losses = torch.full((n,), L, dtype=DT)
    want = (n - 1) / n * L + mu / n * L
    assert R.ald(losses, last_weight=mu).item() == pytest.approx(want, rel=1e-14)
    as_list = [torch.tensor(L, dtype=DT) for _ in range(n)]
    assert R.ald(as_list, last_weight=mu).item() == pytest.approx(want, rel=1e-14)
    assert R.ald(torch.zeros(3, dtype=DT)).item() == 0.0


def test_ald_gradients_detach_vs_not():
    Lv = [0.5, 1.0, 2.0, 0.25]
    w = [1.0, 1.0, 1.0, 4.0]
    S = sum(Lv)
    obj = sum(wi * li * li for wi, li in zip(w, Lv, strict=True)) / S
    for detach in (False, True):
        L = torch.tensor(Lv, dtype=DT, requires_grad=True)
        out = R.ald(L, last_weight=4.0, detach=detach)
        assert out.item() == pytest.approx(obj, rel=1e-14)  # the value does not depend on detach
        out.backward()
        if detach:
            want = [wi * li / S for wi, li in zip(w, Lv, strict=True)]
        else:
            want = [2 * wi * li / S - obj / S for wi, li in zip(w, Lv, strict=True)]
        np.testing.assert_allclose(L.grad.numpy(), want, rtol=1e-12)


def np_manifold_pair(s: np.ndarray, t: np.ndarray, wp: float, ws: float, wr: float) -> float:
    B, TT, _ = s.shape
    fs = np.stack([[np_normalize(s[b, i]) for i in range(TT)] for b in range(B)])
    ft = np.stack([[np_normalize(t[b, i]) for i in range(TT)] for b in range(B)])
    patch = np.mean([((ft[b] @ ft[b].T - fs[b] @ fs[b].T) ** 2).mean() for b in range(B)])
    sample = np.mean([((ft[:, i] @ ft[:, i].T - fs[:, i] @ fs[:, i].T) ** 2).mean() for i in range(TT)])
    xs, xt = fs.reshape(B * TT, -1), ft.reshape(B * TT, -1)
    rand = ((xt @ xt.T - xs @ xs.T) ** 2).mean()  # all rows drawn: the mean is permutation-invariant
    return wp * patch + ws * sample + wr * rand


def test_manifold_loss_hand_computation():
    s = [randn(2, 5, 3, seed=50), randn(2, 5, 3, seed=51)]
    t = [randn(2, 5, 6, seed=52), randn(2, 5, 6, seed=53)]
    # k >= B*T draws the whole pool, so the random-level term is independent of the draw
    got = R.manifold_loss(s, t, k=64, generator=rng(0))
    want = np.mean([np_manifold_pair(a.numpy(), b.numpy(), 4.0, 0.1, 0.2) for a, b in zip(s, t, strict=True)])
    assert got.item() == pytest.approx(want, rel=1e-12)
    # k < pool: same generator seed -> same value; the random term alone matches the drawn rows
    a = R.manifold_loss(s, t, k=4, generator=rng(7))
    b = R.manifold_loss(s, t, k=4, generator=rng(7))
    assert a.item() == b.item()
    r_only = R.manifold_loss(s[:1], t[:1], k=4, w_patch=0.0, w_sample=0.0, w_rand=1.0, generator=rng(7))
    idx = torch.randperm(10, generator=rng(7))[:4].numpy()
    fs = s[0].numpy().reshape(10, 3)[idx]
    ft = t[0].numpy().reshape(10, 6)[idx]
    fs, ft = np.stack([np_normalize(v) for v in fs]), np.stack([np_normalize(v) for v in ft])
    assert r_only.item() == pytest.approx(((ft @ ft.T - fs @ fs.T) ** 2).mean(), rel=1e-12)


def test_manifold_token_mismatch_raises():
    with pytest.raises(ValueError, match="token count"):
        R.manifold_loss([randn(2, 5, 3)], [randn(2, 6, 3)])


# ----------------------------------------------------------------------------------------------- CSKD
def np_cskd(s: np.ndarray, p: np.ndarray, alpha: float, hard: bool, T: float) -> float:
    B, N, C = s.shape
    h = w = math.isqrt(N)
    ht, wt = p.shape[2:]
    fh, fw = h // ht, w // wt
    g = np_grid(s, h, w)
    total = 0.0
    for b in range(B):
        glob = p[b].mean(axis=(1, 2))
        for i in range(ht):
            for j in range(wt):
                S = g[b, :, i * fh:(i + 1) * fh, j * fw:(j + 1) * fw].mean(axis=(1, 2))
                Z = alpha * p[b, :, i, j] + (1 - alpha) * glob
                if hard:
                    total += -np_log_softmax(S)[int(np.argmax(Z))]
                else:
                    lq, lp = np_log_softmax(Z / T), np_log_softmax(S / T)
                    total += T * T * sum(math.exp(lq[c]) * (lq[c] - lp[c]) for c in range(C))
    return total / (B * ht * wt) if hard else total / B


@pytest.mark.parametrize("grids", [((14, 14), (7, 7)), ((4, 4), (2, 2)), ((6, 6), (3, 3)), ((4, 4), (4, 4))])
@pytest.mark.parametrize("hard", [True, False])
def test_cskd_pooling_hand_computation(grids, hard):
    (h, _), (ht, wt) = grids
    B, C = 2, 5
    s, p = randn(B, h * h, C, seed=60, scale=2), randn(B, C, ht, wt, seed=61, scale=2)
    for alpha, T in ((0.7, 1.0), (0.0, 2.0), (1.0, 1.0)):
        got = R.cskd_loss(s, p, alpha, hard=hard, T=T)
        assert got.item() == pytest.approx(np_cskd(s.numpy(), p.numpy(), alpha, hard, T), rel=1e-12)


def test_cskd_small_student_grid_raises():
    with pytest.raises(ValueError, match="smaller than the teacher grid"):
        R.cskd_loss(randn(2, 4, 3), randn(2, 3, 4, 4), 0.5)


def test_cskd_alpha():
    assert R.cskd_alpha(0, 10) == 1.0
    assert R.cskd_alpha(3, 10) == pytest.approx(0.7)
    assert R.cskd_alpha(3, 10, "square") == pytest.approx(0.49)
    assert R.cskd_alpha(5, 10, "cos") == pytest.approx(math.cos(math.pi / 4))
    assert isinstance(R.cskd_alpha(1, 4), float)
    with pytest.raises(ValueError, match="schedule"):
        R.cskd_alpha(1, 4, "exp")


def test_deit_hard_loss_hand_computation():
    d, t = randn(3, 4, seed=70), randn(3, 4, seed=71)
    want = np.mean([-np_log_softmax(d.numpy()[b])[int(np.argmax(t.numpy()[b]))] for b in range(3)])
    assert R.deit_hard_loss(d, t).item() == pytest.approx(want, rel=1e-12)


# -------------------------------------------------------------------------------------------- gradcheck
def tiny_generator(D: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(D, D, 3, padding=1), nn.ReLU(), nn.Conv2d(D, D, 3, padding=1)).double()


def tiny_projector(Ds: int, Dt: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(Ds, (Ds + Dt) // 2), nn.GELU(), nn.Linear((Ds + Dt) // 2, Dt)).double()


def test_gradcheck_fp64():
    gc = torch.autograd.gradcheck
    s, t = randn(3, 5, seed=80, requires_grad=True), randn(3, 5, seed=81)
    y = torch.tensor([1, 4, 0])
    assert gc(lambda a: R.kd_loss(a, t, T=2.0), (s,))
    assert gc(lambda a: R.nkd_loss(a, t, y, tau=1.5), (s,))
    vals, ids, lse = topk_record(t, 2)
    assert gc(lambda a: R.kd_loss_topk(a, vals, ids, lse, T=2.0), (s,))
    assert gc(lambda a: R.nkd_loss_topk(a, vals, ids, lse, y, tau=1.5), (s,))

    B, N, Ds, Dt = 2, 4, 3, 4
    sf = randn(B, N, Ds, seed=82, requires_grad=True)
    tf = randn(B, N, Dt, seed=83)
    W, b = randn(Dt, Ds, seed=84, requires_grad=True), randn(Dt, seed=85, requires_grad=True)
    assert gc(lambda a, w_, b_: R.vitkd_mimic_loss([a], [tf], [w_], [b_], alpha=1.0), (sf, W, b))
    gen = tiny_generator(Dt)
    mask = R.random_token_mask(B, N, 0.5, generator=rng(0))
    tok = randn(Dt, seed=86, requires_grad=True)
    assert gc(lambda a, w_, b_, k_: R.vitkd_gen_loss(a, tf, mask, w_, b_, k_, gen, beta=1.0), (sf, W, b, tok))

    st = randn(2, 5, 3, seed=87, requires_grad=True)
    tt = randn(2, 5, 4, seed=88)
    assert gc(lambda a: R.cls_patch_map_loss(a, tt), (st,))
    proj = tiny_projector(3, 4)
    sc = randn(2, 3, seed=89, requires_grad=True)
    assert gc(lambda a: R.cls_embed_loss(a, randn(2, 4, seed=90), proj), (sc,))
    assert gc(lambda a: R.manifold_loss([a], [tt], k=6, generator=rng(3)), (st,))
    assert gc(lambda a: R.ald(a), (randn(4, seed=91).abs().requires_grad_(),))

    sp = randn(2, 16, 3, seed=92, requires_grad=True)
    tp = randn(2, 3, 2, 2, seed=93)
    assert gc(lambda a: R.cskd_loss(a, tp, 0.6, hard=False, T=2.0), (sp,))
    assert gc(lambda a: R.cskd_loss(a, tp, 0.6, hard=True), (sp,))
    assert gc(lambda a: R.deit_hard_loss(a, t), (s,))


def test_every_trainable_parameter_gets_gradient():
    B, N, Ds, Dt = 2, 4, 3, 5
    sf = randn(B, N, Ds, seed=100, requires_grad=True)
    tf = randn(B, N, Dt, seed=101, requires_grad=True)  # teacher: must get no gradient
    lin = nn.Linear(Ds, Dt).double()
    lin2 = nn.Linear(Ds, Dt).double()
    gen = tiny_generator(Dt)
    tok = torch.zeros(Dt, dtype=DT, requires_grad=True)  # zero init, as in ViTKD
    mask = R.random_token_mask(B, N, 0.5, generator=rng(1))
    loss = R.vitkd_mimic_loss([sf], [tf], [lin.weight], [lin.bias])
    loss = loss + R.vitkd_gen_loss(sf, tf, mask, lin2.weight, lin2.bias, tok, gen)
    proj = tiny_projector(Ds, Dt)
    loss = loss + R.cls_embed_loss(sf[:, 0], tf[:, 0], proj)
    loss.backward()
    params = [*lin.parameters(), *lin2.parameters(), tok, *gen.parameters(), *proj.parameters(), sf]
    for p in params:
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert tf.grad is None


# ------------------------------------------------------------------------------------------------- bf16
def test_bf16_inputs_give_fp32_close_to_fp64():
    def bf(x):
        return x.to(torch.bfloat16)

    s, t = bf(randn(4, 10, seed=110, scale=2)), bf(randn(4, 10, seed=111, scale=2))
    y = torch.tensor([1, 2, 3, 4])
    vals, ids, lse = topk_record(t.float(), 3)
    tok_s, tok_t = bf(randn(2, 5, 6, seed=112)), bf(randn(2, 5, 8, seed=113))
    W, b, mt = bf(randn(8, 6, seed=114)), bf(randn(8, seed=115)), bf(randn(8, seed=116))
    mask = R.random_token_mask(2, 4, 0.5, generator=rng(2))
    sp, tp = bf(randn(2, 16, 5, seed=117)), bf(randn(2, 5, 2, 2, seed=118))
    cases = {
        "kd": lambda f: R.kd_loss(f(s), f(t)),
        "kd_topk": lambda f: R.kd_loss_topk(f(s), vals.half(), ids.int(), lse),
        "nkd": lambda f: R.nkd_loss(f(s), f(t), y),
        "nkd_topk": lambda f: R.nkd_loss_topk(f(s), vals.half(), ids.int(), lse, y),
        "mimic": lambda f: R.vitkd_mimic_loss([f(tok_s)], [f(tok_t)], [f(W)], [f(b)]),
        "gen": lambda f: R.vitkd_gen_loss(
            f(tok_s[:, 1:]), f(tok_t[:, 1:]), mask, f(W), f(b), f(mt), lambda x: x * 2
        ),
        "map": lambda f: R.cls_patch_map_loss(f(tok_s), f(tok_t)),
        "embed": lambda f: R.cls_embed_loss(f(tok_s[:, 0]), f(tok_t[:, 0, :6]), None),
        "ald": lambda f: R.ald(f(s[0].abs())),
        "md": lambda f: R.manifold_loss([f(tok_s)], [f(tok_t)], k=6, generator=rng(4)),
        "cskd_hard": lambda f: R.cskd_loss(f(sp), f(tp), 0.5),
        "cskd_soft": lambda f: R.cskd_loss(f(sp), f(tp), 0.5, hard=False, T=2.0),
        "deit": lambda f: R.deit_hard_loss(f(s), f(t)),
    }
    for name, fn in cases.items():
        lo = fn(lambda x: x)  # the bf16 tensors as given
        hi = fn(lambda x: x.double())  # the same (bf16-representable) values in fp64
        assert lo.dtype == torch.float32 and lo.dim() == 0, name
        assert torch.isfinite(lo), name
        assert lo.item() == pytest.approx(hi.item(), rel=1e-4, abs=1e-7), name
