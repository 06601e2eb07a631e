"""``--rand-augment rand-m9-mstd0.5-inc1``: timm's RandAugment on the device. Every op equals timm's own
(``timm.data.auto_augment.AugmentOp``, which runs PIL) bit for bit, on RGB and grayscale images, at every
magnitude and sign; the layer draws follow timm's distributions; the pipeline stays a pure function of
(seed, view, id)."""

from __future__ import annotations

import numpy as np
import pytest
import timm.data.auto_augment as taa
import torch
from PIL import Image
from scipy import stats

from fastkd.config import parse_args
from fastkd.data.augment import AugmentConfig, augment_batch, sample_params
from fastkd.data.datasets import load_data
from fastkd.data.randaug import OPS, layer_draws, parse_spec, rand_augment
from fastkd.train.guard import validate
from fastkd.train.setup import build_aug


def _images(gray: bool):
    """Six 23 × 31 images: full-range noise and narrow histograms (AutoContrast / Equalize have work)."""
    rng = np.random.default_rng(0)
    imgs = []
    for k in range(6):
        px = rng.integers(0, 256, (23, 31, 3)).astype(np.uint8)
        if k % 2:
            px = (px // 4 + 60).astype(np.uint8)
        if k == 4:
            px[:] = 77  # a flat image: AutoContrast and Equalize leave it alone
        imgs.append(px[..., :1] if gray else px)
    return imgs


def _timm(name, img, mag, neg, fill, monkeypatch):
    """timm's op at magnitude ``mag`` with its random sign forced (PIL does the pixels)."""
    monkeypatch.setattr(taa, "_randomly_negate", (lambda v: -v) if neg else (lambda v: v))
    hp = {"img_mean": fill if len(fill) > 1 else fill[0], "interpolation": Image.BICUBIC}
    op = taa.AugmentOp(name, prob=1.0, magnitude=mag, hparams=hp)
    pil = Image.fromarray(img if img.shape[2] == 3 else img[..., 0])
    return np.asarray(op(pil)).reshape(img.shape)


@pytest.mark.parametrize("gray", [False, True], ids=["rgb", "gray"])
@pytest.mark.parametrize("name", OPS)
def test_every_op_is_timms_bit_for_bit(name, gray, monkeypatch):
    imgs = _images(gray)
    fill = (124,) if gray else (124, 116, 104)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    b = x.shape[0]
    # Posterize at 10 keeps 0 bits: Pillow >= 11 refuses that (so timm raises); checked separately below
    mags = (0.0, 3.7, 9.0, 9.99) if name == "PosterizeIncreasing" else (0.0, 3.7, 9.0, 10.0)
    for mag in mags:
        for neg in (False, True):
            m = torch.full((b, 1), mag, dtype=torch.float64)
            got = rand_augment(x, torch.full((b, 1), OPS.index(name)), m, torch.full((b, 1), neg), fill)
            for i in range(b):
                want = _timm(name, imgs[i], mag, neg, fill, monkeypatch)
                assert np.array_equal(got[i].permute(1, 2, 0).numpy(), want), (name, mag, neg, i)


def test_autocontrast_divides_exactly_as_pil(monkeypatch):
    """AutoContrast's scale 255 / (hi − lo) is a correctly rounded division in PIL (Python floats). torch
    computes a Python number divided by a tensor as a reciprocal times the number, an ulp off for 54 of the
    255 spans, which moved a level: lo 12, hi 232 gave 101 where PIL gives 102 (found by the Triton table
    kernel's test, 2026-11-27). Every span 1 … 255, each from a two-level image."""
    lo = np.array([(7 * k) % (256 - k) for k in range(1, 256)])  # many lows, every span
    imgs = []
    for k, low in enumerate(lo, start=1):
        px = np.full((2, 130, 1), low, dtype=np.uint8)
        px[1, :, 0] = low + k
        px[0, :, 0] = (low + np.arange(130) * k // 129).astype(np.uint8)  # every level of the span, some
        imgs.append(px)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    b = x.shape[0]
    op = torch.full((b, 1), OPS.index("AutoContrast"))
    got = rand_augment(x, op, torch.zeros(b, 1, dtype=torch.float64), torch.zeros(b, 1, dtype=torch.bool),
                       (124,))
    for i in range(b):
        want = _timm("AutoContrast", imgs[i], 0.0, False, (124,), monkeypatch)
        assert np.array_equal(got[i].permute(1, 2, 0).numpy(), want), (int(lo[i]), int(lo[i]) + i + 1)


def test_posterize_to_zero_bits_and_skipped_layers():
    x = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    post = OPS.index("PosterizeIncreasing")
    out = rand_augment(x, torch.full((3, 1), post), torch.full((3, 1), 10.0, dtype=torch.float64),
                       torch.zeros(3, 1, dtype=torch.bool), (0, 0, 0))
    assert not out.any()  # 0 bits kept: black
    skip = rand_augment(x, torch.full((3, 2), -1), torch.full((3, 2), 9.0, dtype=torch.float64),
                        torch.ones(3, 2, dtype=torch.bool), (0, 0, 0))
    assert torch.equal(skip, x)
    # two layers run in order: Invert then Invert is the identity; a per-row mix of ops applies each row's own
    inv = OPS.index("Invert")
    two = rand_augment(x, torch.full((3, 2), inv), torch.zeros(3, 2, dtype=torch.float64),
                       torch.zeros(3, 2, dtype=torch.bool), (0, 0, 0))
    assert torch.equal(two, x)
    ten = torch.full((3, 1), 10.0, dtype=torch.float64)
    mixed = rand_augment(x, torch.tensor([[inv], [-1], [post]]), ten, torch.zeros(3, 1, dtype=torch.bool),
                         (0, 0, 0))
    assert torch.equal(mixed[0], 255 - x[0]) and torch.equal(mixed[1], x[1]) and not mixed[2].any()


def test_layer_draws_follow_timms_distributions():
    g = torch.Generator().manual_seed(0)
    u = [torch.rand(200000, 1, generator=g, dtype=torch.float64) for _ in range(5)]
    op, mag, neg = layer_draws(*u, m=9.0, mstd=0.5)
    applied = op >= 0
    assert abs(float(applied.double().mean()) - 0.5) < 0.005  # prob 0.5
    counts = torch.bincount(op[applied], minlength=len(OPS)).numpy()
    assert stats.chisquare(counts).pvalue > 1e-3  # uniform over the 15 ops
    assert abs(float(neg.double().mean()) - 0.5) < 0.005
    assert float(mag.min()) >= 0 and float(mag.max()) <= 10.0
    inner = mag[(mag > 7.5) & (mag < 10.0)]  # the N(9, 0.5) draws that the clip at 10 did not touch
    assert abs(float(inner.mean()) - 8.99) < 0.02 and float((mag == 10.0).double().mean()) == pytest.approx(
        stats.norm.sf(10, 9, 0.5), abs=0.003)
    assert torch.equal(layer_draws(*u, m=9.0, mstd=0.0)[1], torch.full_like(mag, 9.0))
    uni = layer_draws(*u, m=9.0, mstd=101.0)[1]  # timm's "inf": uniform in [0, m]
    assert stats.kstest(uni.flatten().numpy() / 9.0, "uniform").pvalue > 1e-3


@pytest.mark.parametrize(
    "spec,want",
    [("rand-m9-mstd0.5-inc1", (2, 9.0, 0.5)), ("rand-m7-n3-inc1", (3, 7.0, 0.0)),
     ("rand-inc1-m10-mstd1.0", (2, 10.0, 1.0))],
)
def test_parse_spec(spec, want):
    assert parse_spec(spec) == want


@pytest.mark.parametrize(
    "spec,match",
    [("rand-m9-mstd0.5", "only the increasing ops"), ("rand-m11-inc1", r"m in \[0, 10\]"),
     ("augmix-m9", "use timm's form"), ("rand-m9-w0-inc1", "unknown or malformed part 'w0'"),
     ("rand-mx-inc1", "malformed part 'mx'")],
)
def test_bad_spec_is_one_line(spec, match):
    with pytest.raises(ValueError, match=match):
        validate(parse_args(["--rand-augment", spec]))


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


def test_the_pipeline_draws_per_sample_and_changes_the_images(digits):
    cfg = build_aug(parse_args(["--rand-augment", "rand-m9-mstd0.5-inc1"]), digits)
    assert (cfg.randaug_n, cfg.randaug_m, cfg.randaug_mstd) == (2, 9.0, 0.5)
    ids = torch.arange(300)
    kw = dict(seed=1, view=0, n=len(digits.y_train), channels=1, height=8, width=8)
    p = sample_params(ids, cfg=cfg, **kw)
    assert p.ra_op.shape == (300, 2) and p.ra_mag.shape == (300, 2)
    q = sample_params(ids[100:103], cfg=cfg, **kw)  # a pure function of the id, not of the batch
    assert torch.equal(q.ra_op, p.ra_op[100:103]) and torch.equal(q.ra_mag, p.ra_mag[100:103])

    def aug(c):
        return augment_batch(digits.x_train, digits.y_train, ids, seed=1, view=0, cfg=c,
                             num_classes=10, mean=digits.mean, std=digits.std)[0]

    plain = AugmentConfig(**{**vars(cfg), "randaug_n": 0})
    x, x0 = aug(cfg), aug(plain)
    changed = (x != x0).flatten(1).any(1)
    untouched = (p.ra_op < 0).all(1)  # both layers skipped (1/4 of the images)
    assert not changed[untouched].any()
    assert float(changed[~untouched].double().mean()) > 0.8  # (Color on grayscale, e.g., changes nothing)


def test_equalize_table_past_255_is_clipped_as_pil_does():
    """511 pixels below the top level and some at 255: step = 2 and the top level's table entry is
    (1 + 511) // 2 = 256, which PIL's ``point`` clips to 255 (a uint8 cast would wrap it to 0)."""
    from PIL import ImageOps

    px = np.concatenate([np.arange(511) % 200, np.full(89, 255)]).astype(np.uint8).reshape(20, 30)
    want = np.asarray(ImageOps.equalize(Image.fromarray(px)))
    got = rand_augment(torch.from_numpy(px)[None, None], torch.tensor([[OPS.index("Equalize")]]),
                       torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.bool), (0,))
    assert np.array_equal(got[0, 0].numpy(), want) and (want[px == 255] == 255).all()
