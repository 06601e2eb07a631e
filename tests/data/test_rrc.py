"""The DeiT recipe's parts beyond the loss: the random-resized crop (``--rrc-scale``), random erasing
(``--erase``) and the student's stochastic depth (``--student-drop-path``), and that adding them changed
no existing cache, default teacher or augmentation stream."""

import hashlib
import json
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from fastkd.cache.format import CacheError, check_run
from fastkd.config import parse_args
from fastkd.data.augment import AugmentConfig, augment_batch, param_digest, resized_crop, sample_params
from fastkd.data.augparams import RRC_TRIES, _view_specs
from fastkd.data.datasets import load_data
from fastkd.data.hashing import _Draws
from fastkd.teachers.factory import teacher_key
from fastkd.train.guard import validate
from fastkd.train.setup import build_aug, build_student


def _torchvision_box(u_area, u_ratio, h_y, h_x, h, w, scale, ratio):
    """torchvision's ``RandomResizedCrop.get_params``, line by line, with its ``uniform_`` draws replaced by
    fastkd's hashed uniforms and its ``randint(0, n)`` by the hashes' ``hash * n >> 32`` (plain Python)."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for k in range(RRC_TRIES):
        target_area = area * (scale + (1.0 - scale) * u_area[k])
        aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u_ratio[k])
        cw = int(round(math.sqrt(target_area * aspect_ratio)))
        ch = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            return h_y * (h - ch + 1) >> 32, h_x * (w - cw + 1) >> 32, ch, cw
    in_ratio = float(w) / float(h)
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


@pytest.mark.parametrize(
    "h,w,scale,ratio",
    [(8, 8, 0.08, (3 / 4, 4 / 3)), (37, 23, 0.3, (3 / 4, 4 / 3)), (4, 40, 0.9, (3 / 4, 4 / 3)),
     (224, 224, 0.08, (0.5, 2.0))],
)
def test_rrc_box_is_torchvisions_get_params(h, w, scale, ratio):
    cfg = AugmentConfig(crop_pad=0, rrc_scale=scale, rrc_ratio=ratio)
    ids = torch.arange(3000)
    p = sample_params(ids, seed=5, view=1, cfg=cfg, n=3000, channels=3, height=h, width=w)
    dr = _Draws(ids, 5, 1, _view_specs(cfg, 3, h, w))
    ua, ur = dr.u("rrc_area").tolist(), dr.u("rrc_ratio").tolist()
    hy, hx = (dr.h(s).tolist() for s in ("rrc_y", "rrc_x"))
    got = torch.stack([p.rrc_y, p.rrc_x, p.rrc_h, p.rrc_w], 1).tolist()
    for i in range(len(ids)):
        ref = _torchvision_box(ua[i], ur[i], hy[i], hx[i], h, w, scale, ratio)
        assert tuple(got[i]) == ref, i
        top, left, ch, cw = ref
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
    if (h, w) == (4, 40):  # no try fits a 4-pixel-high image at ≥ 90 % of its area: every box falls back
        assert set(map(tuple, got)) == {(0, (40 - 5) // 2, 4, 5)}
    else:  # the tries fit: the boxes cover the area range and both orientations
        areas = (p.rrc_h * p.rrc_w).double() / (h * w)
        # (37 × 23 fits at most 0.84 of its area at an aspect ≥ 3/4: 23 wide, 30.7 high)
        assert float(areas.min()) < scale + 0.1 and float(areas.max()) > 0.8
        assert bool((p.rrc_h > p.rrc_w).any()) and bool((p.rrc_h < p.rrc_w).any())


def test_resized_crop_is_torchvisions_bilinear_resized_crop():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 29, 31), dtype=torch.uint8, generator=g)
    boxes = [(0, 0, 29, 31), (3, 7, 12, 20), (5, 2, 20, 27), (10, 1, 5, 9), (28, 30, 1, 1), (0, 5, 29, 3)]
    top, left, bh, bw = (torch.tensor(c) for c in zip(*boxes, strict=True))
    out = resized_crop(x, top, left, bh, bw)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert torch.equal(out[0], x[0])  # the whole-image box is the identity
    for i, (t, l_, hh, ww) in enumerate(boxes):
        # torchvision's crop + bilinear resize on the float pixels (float64: the exact value), then rounded
        ref = TF.resized_crop(x[i].double(), t, l_, hh, ww, [29, 31], antialias=False)
        diff = (out[i].double() - ref).abs()
        # fastkd lerps in float32: a value within float32 rounding of a .5 tie may round the other way
        assert float(diff.max()) <= 0.5 + 1e-4, i
        assert float((out[i].double() == ref.round()).double().mean()) > 0.999, i
    # a box of one pixel is that pixel everywhere
    assert bool((out[4] == x[4, :, 28:29, 30:31]).all())


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


def _aug(d, ids, cfg, view=0):
    return augment_batch(d.x_train, d.y_train, ids, seed=1, view=view, cfg=cfg, num_classes=d.num_classes,
                         mean=d.mean, std=d.std)


def test_rrc_of_the_whole_image_leaves_every_other_draw_alone(digits):
    """A crop that always takes the whole image (scale 1, ratio 1, square digits) changes no pixel, no
    label and no other parameter: its draws are streams of their own."""
    ids = torch.arange(200)
    base = AugmentConfig.default_for(8, hflip=True, mixup_alpha=0.8, cutmix_alpha=1.0, erase_prob=0.5)
    whole = AugmentConfig.default_for(8, hflip=True, mixup_alpha=0.8, cutmix_alpha=1.0, erase_prob=0.5,
                                      rrc_scale=1.0, rrc_ratio=(1.0, 1.0))
    for a, b in zip(_aug(digits, ids, base), _aug(digits, ids, whole), strict=True):
        assert torch.equal(a, b)
    crop = AugmentConfig.default_for(8, rrc_scale=0.08, crop_pad=0)
    x = _aug(digits, ids, crop)[0]
    plain = _aug(digits, ids, AugmentConfig.default_for(8, crop_pad=0))[0]
    changed = (x != plain).flatten(1).any(1)
    assert float(changed.double().mean()) > 0.8  # most samples really are cropped and zoomed
    assert not torch.equal(x, _aug(digits, ids, crop, view=1)[0])  # a new view, new boxes


def test_identity_and_digests_of_configs_without_the_crop_are_unchanged():
    cfg = AugmentConfig.default_for(224, hflip=True, erase_prob=0.25)
    ident = cfg.identity()
    assert "rrc_scale" not in ident and "rrc_ratio" not in ident and "randaug_n" not in ident
    later = {"rrc_scale": 0.0, "rrc_ratio": (0.75, 4 / 3), "randaug_n": 0, "randaug_m": 9.0,
             "randaug_mstd": 0.5}
    assert {**ident, **later} == vars(cfg)
    on = AugmentConfig.default_for(224, rrc_scale=0.08)
    assert on.identity() == {k: v for k, v in vars(on).items() if not k.startswith("randaug_")}
    both = AugmentConfig.default_for(224, rrc_scale=0.08, randaug_n=2)
    assert both.identity() == vars(both)
    # the digest of a config without the crop hashes exactly the fields it hashed before the crop existed
    ids = torch.arange(16)
    kw = dict(seed=0, view=0, n=100, channels=3, height=32, width=32)
    assert param_digest(ids, cfg=cfg, **kw) != param_digest(ids, cfg=AugmentConfig.default_for(32), **kw)
    assert param_digest(ids, cfg=on, **kw) != param_digest(ids, cfg=AugmentConfig.default_for(224), **kw)


def test_default_teacher_key_is_the_one_from_before_the_crop(digits):
    """The default teacher's directory key hashes its augmentation; a new field must not move it (every
    user's trained default teacher would be retrained). The recipe below is the key's formula with the
    augmentation as ``vars`` of the config before the crop fields existed."""
    cfg = parse_args([])
    aug = AugmentConfig.default_for(8)
    arch = ("vit_tiny_patch16_224", {"depth": 6})
    old_aug = {k: v for k, v in vars(aug).items() if not k.startswith(("rrc_", "randaug_"))}
    recipe = {"fingerprint": digits.fingerprint, "arch": arch, "epochs": cfg.model.teacher_epochs,
              "lr": cfg.model.teacher_lr, "batch_size": cfg.optim.batch_size, "wd": cfg.optim.weight_decay,
              "warmup": cfg.optim.warmup_epochs, "min_lr": cfg.optim.min_lr, "clip": cfg.optim.grad_clip,
              "aug": old_aug, "version": 2}
    old = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert teacher_key(digits, arch, cfg, aug) == old


def test_cache_from_before_the_crop_matches_runs_without_it_only():
    aug = AugmentConfig.default_for(8)
    old_manifest = {"data": {}, "augment": json.loads(json.dumps(
        {k: v for k, v in vars(aug).items() if not k.startswith(("rrc_", "randaug_"))}))}
    check_run(old_manifest, None, None, aug)  # a run without the crop: the cache fits
    with pytest.raises(CacheError, match="augmentation differs: rrc_ratio is None in the cache"):
        check_run(old_manifest, None, None, AugmentConfig.default_for(8, rrc_scale=0.5))


def test_flags_reach_the_augmentation_and_the_student(digits):
    cfg = parse_args(["--rrc-scale", "0.08", "--erase", "0.25", "--student-drop-path", "0.1"])
    validate(cfg)
    aug = build_aug(cfg, digits)
    assert (aug.rrc_scale, aug.erase_prob, aug.crop_pad) == (0.08, 0.25, 0)  # no translation by default
    assert build_aug(parse_args(["--rrc-scale", "0.5", "--crop-pad", "2"]), digits).crop_pad == 2
    plain = build_aug(parse_args([]), digits)
    assert plain.crop_pad == 1 and plain.rrc_scale == 0
    student, arch = build_student(cfg, digits, "cpu")
    assert arch[1]["drop_path_rate"] == 0.1 and student.fastkd_arch["overrides"]["drop_path_rate"] == 0.1
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in student.blocks]  # rate 0: an Identity
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)  # timm's linear rule over the depth
    assert "drop_path_rate" not in build_student(parse_args([]), digits, "cpu")[1][1]


@pytest.mark.parametrize(
    "flags,match",
    [(["--rrc-scale", "1.5"], r"--rrc-scale 1.5 \(must be in \[0, 1\]\)"),
     (["--erase", "-0.1"], r"--erase -0.1 \(must be in \[0, 1\]\)"),
     (["--student-drop-path", "1"], r"--student-drop-path 1.0 \(must be in \[0, 1\)\)")],
)
def test_out_of_range_recipe_flags_are_one_line(flags, match):
    with pytest.raises(ValueError, match=match):
        validate(parse_args(flags))


def test_teachers_fastkd_trains_get_the_augmentation_their_keys_hash(digits):
    """The default teacher, the student-alone estimate and a fine-tuned teacher train under the default
    augmentation (their directory keys hash it), whatever augmentation flags the run has."""
    flags = ["--rrc-scale", "0.3", "--erase", "0.5", "--hflip", "--mixup", "0.8", "--cutmix", "1.0",
             "--crop-pad", "3", "--rand-augment", "rand-m9-mstd0.5-inc1"]
    cfg = parse_args(flags)
    changed = [f for f in cfg.data.AUGMENTATION if getattr(cfg.data, f) != getattr(type(cfg.data)(), f)]
    assert changed == list(cfg.data.AUGMENTATION)  # every augmentation field is set away from its default
    default = vars(AugmentConfig.default_for(digits.img_size))
    for f in cfg.data.AUGMENTATION:  # each one alone changes the run's augmentation ...
        one = parse_args([])
        setattr(one.data, f, getattr(cfg.data, f))
        assert vars(build_aug(one, digits)) != default, f
    cfg.data = cfg.data.default_augmentation()  # ... and the teachers' recipe drops them all
    assert vars(build_aug(cfg, digits)) == default
    assert cfg.data.data == "digits" and cfg.data.memory_threshold == 2.0  # the rest is kept


def test_val_crop_pct_cuts_the_val_images_from_a_bigger_resize(tmp_path):
    """``--val-crop-pct P`` (timm's eval ``crop_pct``): val images are the centre img_size square of the image
    resized to short side img_size / P; the train images, and the fingerprint of data opened without it,
    are unchanged."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for k in range(3):
                px = rng.integers(0, 256, (20 + 4 * k, 30, 3), dtype=np.uint8)  # H × W: landscape, odd sizes
                Image.fromarray(px).save(tmp_path / split / c / f"{k}.png")
    plain = load_data(str(tmp_path), img_size=16, log=None)
    crop = load_data(str(tmp_path), img_size=16, val_crop_pct=0.5, log=None)
    assert torch.equal(plain.x_train, crop.x_train) and not torch.equal(plain.x_val, crop.x_val)
    assert crop.val_crop_pct == 0.5 and plain.val_crop_pct == 1.0
    assert crop.fingerprint != plain.fingerprint
    assert load_data(str(tmp_path), img_size=16, val_crop_pct=1.0, log=None).fingerprint == plain.fingerprint
    im = Image.open(tmp_path / "val" / "a" / "0.png")  # 30 × 20: short side 20 → 32, long 30 → 48
    big = np.asarray(im.resize((48, 32), Image.Resampling.BILINEAR))
    want = big[8:24, 16:32].transpose(2, 0, 1)  # the centre 16 × 16
    assert np.abs(crop.x_val[0].numpy().astype(int) - want.astype(int)).max() <= 1  # PIL's own rounding
    with pytest.raises(ValueError, match="--val-crop-pct 0.875: only image folders and tar shards"):
        load_data("digits", val_crop_pct=0.875)
