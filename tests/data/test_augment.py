"""Deterministic batched augmentations: purity per (seed, view, id), pixel correctness, mixing labels."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from fastkd.data import load_data
from fastkd.data.augment import (
    AugmentConfig,
    augment_batch,
    eval_batch,
    hash_uniform,
    sample_params,
    view_images,
)
from fastkd.data.hashing import _beta_symmetric, _mix32

FULL = AugmentConfig.default_for(8, hflip=True, mixup_alpha=0.8, cutmix_alpha=1.0, erase_prob=0.5)
FULL_RRC = AugmentConfig.default_for(  # the DeiT recipe's scale crop and RandAugment on top (no translation)
    8, hflip=True, mixup_alpha=0.8, cutmix_alpha=1.0, erase_prob=0.5, rrc_scale=0.08, crop_pad=0, randaug_n=2
)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


def _aug(d, ids, cfg, seed=0, view=0, **kw):
    return augment_batch(
        d.x_train,
        d.y_train,
        ids,
        seed=seed,
        view=view,
        cfg=cfg,
        num_classes=d.num_classes,
        mean=d.mean,
        std=d.std,
        **kw,
    )


def _params(ids, cfg, n, c=1, h=8, w=8, seed=0, view=0):
    return sample_params(ids, seed=seed, view=view, cfg=cfg, n=n, channels=c, height=h, width=w)


# ----------------------------------------------------------------------------------------------------
# hashing and distributions
# ----------------------------------------------------------------------------------------------------


def _lowbias32_py(x: int) -> int:
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    x ^= x >> 16
    return x


def test_mix32_matches_exact_python_integer_reference():
    rng = np.random.default_rng(0)
    xs = [0, 1, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF] + rng.integers(0, 2**32, 500).tolist()
    got = _mix32(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert got == [_lowbias32_py(int(x)) for x in xs]


def test_hash_uniform_range_and_independence():
    ids = torch.arange(20000)
    u = hash_uniform(ids, 0, 0, "a")
    v = hash_uniform(ids, 0, 0, "b")
    w = hash_uniform(ids, 0, 1, "a")
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert stats.kstest(u.numpy(), "uniform").pvalue > 1e-3
    for other in (v, w, hash_uniform(ids, 1, 0, "a"), hash_uniform(ids + 1, 0, 0, "a")):
        assert abs(float(torch.corrcoef(torch.stack([u, other]))[0, 1])) < 0.03
    big = torch.tensor([2**40 + 3, 3])  # ids beyond 32 bits still hash differently
    hb = hash_uniform(big, 0, 0, "a")
    assert hb[0] != hb[1]


@pytest.mark.parametrize("alpha", [0.2, 0.8, 1.0, 2.0])
def test_beta_lambda_distribution(alpha):
    lam = _beta_symmetric(torch.arange(20000), 5, 3, "lam", alpha)
    assert float(lam.min()) >= 0 and float(lam.max()) <= 1
    assert stats.kstest(lam.numpy(), "beta", args=(alpha, alpha)).pvalue > 1e-3


# ----------------------------------------------------------------------------------------------------
# purity: per (seed, view, id), independent of the batch
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [FULL, FULL_RRC], ids=["full", "full+rrc+randaug"])
def test_same_seed_view_id_identical_whatever_the_batch(digits, cfg):
    ids = torch.randperm(len(digits.y_train), generator=torch.Generator().manual_seed(0))[:96]
    x, ys, yh = _aug(digits, ids, cfg, seed=3, view=2)
    assert x.dtype == torch.float32 and x.shape == (96, 1, 8, 8)
    assert ys.shape == (96, 10) and yh.dtype == torch.int64
    perm = torch.randperm(96, generator=torch.Generator().manual_seed(1))
    px, pys, pyh = _aug(digits, ids[perm], cfg, seed=3, view=2)
    assert torch.equal(px, x[perm]) and torch.equal(pys, ys[perm]) and torch.equal(pyh, yh[perm])
    start = 0
    for size in (1, 5, 26, 64):  # uneven splits
        cx, cys, cyh = _aug(digits, ids[start : start + size], cfg, seed=3, view=2)
        assert torch.equal(cx, x[start : start + size]) and torch.equal(cys, ys[start : start + size])
        assert torch.equal(cyh, yh[start : start + size])
        start += size
    # the mixing really happened in this batch (else the check above is weak)
    p = _params(ids, FULL, len(digits.y_train))
    assert p.cut.any() and (p.mixed & ~p.cut).any() and p.erase.any() and p.flip.any()


def test_params_are_batch_independent_and_partners_valid(digits):
    n = len(digits.y_train)
    ids = torch.arange(0, n, 7)
    p = _params(ids, FULL, n)
    sub = torch.tensor([5, 0, 33])
    q = _params(ids[sub], FULL, n)
    for name in (
        "shift_y",
        "shift_x",
        "flip",
        "erase",
        "ey1",
        "ex2",
        "erase_fill",
        "mixed",
        "cut",
        "partner",
        "lam",
        "cy1",
        "cy2",
        "cx1",
        "cx2",
    ):
        assert torch.equal(getattr(p, name)[sub], getattr(q, name)), name
    assert bool((p.partner[p.mixed] != ids[p.mixed]).all())
    assert int(p.partner.min()) >= 0 and int(p.partner.max()) < n
    assert int(p.shift_y.abs().max()) == 1 and int(p.shift_x.abs().max()) == 1  # crop_pad = round(8/8)
    assert bool(((p.lam > 0) & (p.lam <= 1)).all())


def test_different_view_seed_changes_params(digits):
    n = len(digits.y_train)
    ids = torch.arange(200)
    p0, p1, p2 = _params(ids, FULL, n, view=0), _params(ids, FULL, n, view=1), _params(ids, FULL, n, seed=1)
    for q in (p1, p2):
        assert (p0.shift_y != q.shift_y).float().mean() > 0.4
        assert (p0.partner != q.partner).float().mean() > 0.9
        assert (p0.lam != q.lam).float().mean() > 0.5
    x0 = _aug(digits, ids, FULL, view=0)[0]
    x1 = _aug(digits, ids, FULL, view=1)[0]
    assert (x0 - x1).abs().flatten(1).amax(1).gt(0).float().mean() > 0.9


def test_fetch_function_and_device_argument_match_tensor_path(digits):
    ids = torch.tensor([4, 8, 15, 16, 23, 42])
    ref = _aug(digits, ids, FULL, seed=9)
    fetched = []

    def fetch(i):
        fetched.append(i.clone())
        return digits.x_train[i]

    got = augment_batch(
        fetch,
        digits.y_train,
        ids,
        seed=9,
        view=0,
        cfg=FULL,
        num_classes=10,
        mean=digits.mean,
        std=digits.std,
        device="cpu",
    )
    assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True))
    assert len(fetched) == 2  # the batch and its partners


# ----------------------------------------------------------------------------------------------------
# pixel correctness
# ----------------------------------------------------------------------------------------------------


def _norm(x_uint8, mean, std):
    return (x_uint8.float() / 255 - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(
        1, -1, 1, 1
    )


def test_crop_flip_match_pad_and_slice_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (40, 3, 9, 9), dtype=torch.uint8, generator=g)
    y = torch.arange(40) % 4
    cfg = AugmentConfig(crop_pad=2, hflip=True)
    ids = torch.arange(40)
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    out, ys, yh = augment_batch(x, y, ids, seed=1, view=4, cfg=cfg, num_classes=4, mean=mean, std=std)
    p = _params(ids, cfg, 40, c=3, h=9, w=9, seed=1, view=4)
    assert p.flip.any() and not p.flip.all() and (p.shift_y != 0).any()
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(40):
        oy, ox = 2 + int(p.shift_y[i]), 2 + int(p.shift_x[i])
        ref = padded[i : i + 1, :, oy : oy + 9, ox : ox + 9]
        if p.flip[i]:
            ref = torch.flip(ref, dims=[3])
        assert torch.equal(out[i : i + 1], _norm(ref, mean, std)), i
    assert torch.equal(ys, F.one_hot(y, 4).float()) and torch.equal(yh, y)


def test_no_augmentation_equals_eval_batch(digits):
    cfg = AugmentConfig(crop_pad=0)
    ids = torch.arange(50)
    x, ys, yh = _aug(digits, ids, cfg)
    ev = eval_batch(digits.x_train[:50], digits.mean, digits.std)
    assert torch.equal(x, ev) and torch.equal(yh, digits.y_train[:50])
    assert torch.equal(ys, F.one_hot(digits.y_train[:50], 10).float())


def test_random_erasing_fills_its_box():
    x = torch.full((64, 2, 10, 10), 100, dtype=torch.uint8)
    cfg = AugmentConfig(crop_pad=0, erase_prob=0.5)
    ids = torch.arange(64)
    out, _, _ = augment_batch(
        x,
        torch.zeros(64, dtype=torch.long),
        ids,
        seed=0,
        view=0,
        cfg=cfg,
        num_classes=1,
        mean=[0.2, 0.3],
        std=[0.5, 0.5],
    )
    p = _params(ids, cfg, 64, c=2, h=10, w=10)
    assert 16 < int(p.erase.sum()) < 48
    base = (100 / 255 - torch.tensor([0.2, 0.3])) / 0.5
    for i in range(64):
        expect = base.view(2, 1, 1).expand(2, 10, 10).clone()
        if p.erase[i]:
            y1, y2, x1, x2 = int(p.ey1[i]), int(p.ey2[i]), int(p.ex1[i]), int(p.ex2[i])
            area = (y2 - y1) * (x2 - x1) / 100
            assert 0 < area <= 1 and y2 <= 10 and x2 <= 10
            expect[:, y1:y2, x1:x2] = p.erase_fill[i].float().view(2, 1, 1)
        assert torch.allclose(out[i], expect, atol=1e-6), i


def _constant_set(n=50):
    """Sample k is a constant image of value 5k, label k % 7: the source of every pixel is identifiable."""
    x = (torch.arange(n, dtype=torch.uint8) * 5).view(n, 1, 1, 1).expand(n, 1, 12, 12).contiguous()
    return x, torch.arange(n) % 7


def test_cutmix_lambda_matches_pasted_area():
    x, y = _constant_set()
    cfg = AugmentConfig(crop_pad=0, cutmix_alpha=1.0)
    ids = torch.arange(50)
    out, ys, yh = augment_batch(x, y, ids, seed=2, view=1, cfg=cfg, num_classes=7, mean=[0.0], std=[1.0])
    p = _params(ids, cfg, 50, h=12, w=12, seed=2, view=1)
    assert bool(p.cut.all()) and bool((p.partner != ids).all())
    pix = torch.round(out[:, 0] * 255).long()  # back to the 0..255 values
    from_partner = (pix == (p.partner * 5).view(-1, 1, 1)).double().mean(dim=(1, 2))
    from_self = (pix == (ids * 5).view(-1, 1, 1)).double().mean(dim=(1, 2))
    assert torch.allclose(from_partner, 1 - p.lam) and torch.allclose(
        from_self + from_partner, torch.ones(50, dtype=torch.float64)
    )
    assert (p.lam < 1).float().mean() > 0.8  # most boxes are non-empty
    own, other = y[ids], y[p.partner]
    expect = p.lam.float()[:, None] * F.one_hot(own, 7) + (1 - p.lam.float())[:, None] * F.one_hot(other, 7)
    assert torch.allclose(ys, expect.float(), atol=1e-6)
    assert torch.equal(yh, torch.where(p.lam >= 0.5, own, other))
    assert torch.equal(yh, torch.where(ys.gather(1, own[:, None])[:, 0] >= 0.5, own, ys.argmax(1)))


def test_mixup_pixels_and_soft_labels():
    x, y = _constant_set()
    cfg = AugmentConfig(crop_pad=0, mixup_alpha=0.4, mix_prob=0.7)
    ids = torch.arange(50)
    out, ys, yh = augment_batch(x, y, ids, seed=4, view=0, cfg=cfg, num_classes=7, mean=[0.5], std=[0.5])
    p = _params(ids, cfg, 50, h=12, w=12, seed=4, view=0)
    assert 20 < int(p.mixed.sum()) < 50 and not p.cut.any()
    assert torch.equal(p.partner[~p.mixed], ids[~p.mixed]) and bool((p.lam[~p.mixed] == 1).all())
    a = (ids * 5 / 255 - 0.5) / 0.5
    b = (p.partner * 5 / 255 - 0.5) / 0.5
    expect = (p.lam * a + (1 - p.lam) * b).float()
    assert torch.allclose(out[:, 0], expect.view(-1, 1, 1).expand(50, 12, 12), atol=1e-6)
    assert torch.allclose(ys.sum(1), torch.ones(50), atol=1e-6)
    assert bool(((ys > 0).sum(1) <= 2).all())
    assert torch.allclose(
        ys.gather(1, y[:, None])[:, 0][p.mixed & (y != y[p.partner])],
        p.lam[p.mixed & (y != y[p.partner])].float(),
    )


def test_partner_uses_its_own_view_augmentation(digits):
    cfg = AugmentConfig(crop_pad=1, hflip=True, mixup_alpha=1.0)
    n = len(digits.y_train)
    ids = torch.arange(30)
    out, _, _ = _aug(digits, ids, cfg, seed=6, view=3)
    p = _params(ids, cfg, n, seed=6, view=3)
    own_view = _aug(digits, ids, AugmentConfig(crop_pad=1, hflip=True), seed=6, view=3)[
        0
    ]  # same crop streams
    partner_view = _aug(digits, p.partner, AugmentConfig(crop_pad=1, hflip=True), seed=6, view=3)[0]
    lam = p.lam.float().view(-1, 1, 1, 1)
    assert torch.allclose(out, own_view * lam + partner_view * (1 - lam), atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# normalisation, eval, config
# ----------------------------------------------------------------------------------------------------


def test_normalised_digits_have_zero_mean_unit_std(digits):
    ev = eval_batch(digits.x_train, digits.mean, digits.std)
    assert abs(float(ev.mean())) < 1e-4 and abs(float(ev.std()) - 1) < 1e-3
    x, _, _ = _aug(digits, torch.arange(len(digits.y_train)), AugmentConfig.default_for(8))
    assert abs(float(x.mean())) < 0.15 and 0.8 < float(x.std()) < 1.1


def test_eval_batch_deterministic_and_validates(digits):
    a = eval_batch(digits.x_val, digits.mean, digits.std)
    assert torch.equal(a, eval_batch(digits.x_val.clone(), digits.mean, digits.std))
    assert torch.equal(a[7:9], eval_batch(digits.x_val[7:9], digits.mean, digits.std))
    assert torch.allclose(a, _norm(digits.x_val, digits.mean, digits.std))
    with pytest.raises(ValueError, match="uint8 tensor"):
        eval_batch(digits.x_val.float(), digits.mean, digits.std)
    with pytest.raises(ValueError, match="one mean and std per channel"):
        eval_batch(digits.x_val, [0.5, 0.5, 0.5], [0.2, 0.2, 0.2])


def test_view_images_identity_params_equal_eval():
    x = torch.randint(0, 256, (3, 2, 5, 5), dtype=torch.uint8)
    z = torch.zeros(3, dtype=torch.int64)
    no = torch.zeros(3, dtype=torch.bool)
    full = torch.full((3,), 5, dtype=torch.int64)
    ref = eval_batch(x, [0.1, 0.2], [0.3, 0.4])
    skip = torch.full((3, 2), -1)  # two RandAugment layers, both skipped
    noop = (skip, torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.bool))
    for rrc, ra in (((None,) * 4, (None,) * 3), ((z, z, full, full), noop)):  # off; no-op values
        params = (z, z, no, no, z, z, z, z, torch.zeros(3, 2), *rrc, *ra)
        assert torch.equal(view_images(x, params, [0.1, 0.2], [0.3, 0.4]), ref)


def test_augment_batch_input_errors(digits):
    with pytest.raises(ValueError, match=r"sample ids must lie in \[0, 1437\)"):
        _aug(digits, torch.tensor([0, 1437]), FULL)
    with pytest.raises(ValueError, match="uint8 tensor"):
        augment_batch(
            digits.x_train.float(),
            digits.y_train,
            torch.tensor([0]),
            seed=0,
            view=0,
            cfg=FULL,
            num_classes=10,
            mean=digits.mean,
            std=digits.std,
        )
    with pytest.raises(ValueError, match="pass Dataset.num_classes"):
        augment_batch(
            digits.x_train,
            digits.y_train,
            torch.arange(40),
            seed=0,
            view=0,
            cfg=FULL,
            num_classes=3,
            mean=digits.mean,
            std=digits.std,
        )


def test_config_presets_and_validation():
    assert AugmentConfig.default_for(8).crop_pad == 1
    assert AugmentConfig.default_for(32).crop_pad == 4
    assert AugmentConfig.default_for(224).crop_pad == 28
    d = AugmentConfig.default_for(8)
    assert not d.hflip and not d.mixing and d.erase_prob == 0
    assert AugmentConfig().pad_for(16) == 2 and AugmentConfig(crop_pad=0).pad_for(16) == 0
    assert AugmentConfig.default_for(224, mixup_alpha=0.8).mixing
    for bad in (
        {"crop_pad": -1},
        {"mixup_alpha": -0.1},
        {"mix_prob": 1.5},
        {"erase_prob": -1},
        {"erase_area": (0.5, 0.1)},
    ):
        with pytest.raises(ValueError, match="AugmentConfig"):
            AugmentConfig(**bad)
    assert math.isclose(sum(AugmentConfig().erase_area), 0.02 + 1 / 3)
