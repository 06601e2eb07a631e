"""Datasets (digits, .npz, ImageFolder), their validation errors, and the deterministic EpochSampler."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fastkd.data import Dataset, EpochSampler, fingerprint, load_data


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_data("digits")


# ----------------------------------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------------------------------


def test_digits_split_sizes_layout_and_balance(digits):
    d = digits
    assert d.x_train.shape == (1437, 1, 8, 8) and d.x_val.shape == (360, 1, 8, 8)
    assert d.x_train.dtype == torch.uint8 and d.y_train.dtype == torch.int64 and d.y_val.dtype == torch.int64
    assert (d.num_classes, d.in_chans, d.img_size, d.name) == (10, 1, 8, "digits")
    assert d.class_names == [str(i) for i in range(10)]
    assert int(d.x_train.max()) == 255 and int(d.x_train.min()) == 0
    # stratified 80/20: every class has ~20% of its samples in val
    tr = torch.bincount(d.y_train, minlength=10)
    va = torch.bincount(d.y_val, minlength=10)
    total = tr + va
    assert int(total.sum()) == 1797
    assert torch.all((va - 0.2 * total).abs() <= 1.0), (tr, va)
    # pixel scaling: round(v * 255 / 16) on the 0..16 grid -> only 17 distinct values
    vals = torch.unique(torch.cat([d.x_train.flatten(), d.x_val.flatten()]))
    expected = torch.from_numpy(np.rint(np.arange(17) * 255 / 16).astype(np.uint8))
    assert set(vals.tolist()) <= set(expected.tolist())


def test_digits_split_matches_documented_sklearn_call(digits):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    raw = load_digits()
    idx_tr, idx_va = train_test_split(np.arange(1797), test_size=0.2, random_state=0, stratify=raw.target)
    assert torch.equal(digits.y_train, torch.from_numpy(raw.target[idx_tr]).long())
    assert torch.equal(digits.y_val, torch.from_numpy(raw.target[idx_va]).long())
    x0 = np.rint(raw.images[idx_va[0]] * 255 / 16).astype(np.uint8)
    assert torch.equal(digits.x_val[0, 0], torch.from_numpy(x0))


def test_mean_std_are_train_split_statistics(digits):
    x = digits.x_train.double() / 255
    assert digits.mean == pytest.approx([float(x.mean())], abs=1e-9)
    assert digits.std == pytest.approx([float(x.std(unbiased=False))], abs=1e-9)


def test_fingerprint_stable_and_sensitive(digits):
    again = load_data("digits")
    assert again.fingerprint == digits.fingerprint and len(digits.fingerprint) == 64
    assert torch.equal(again.x_train, digits.x_train) and torch.equal(again.y_val, digits.y_val)
    d = digits
    x2 = d.x_train.clone()
    x2[5, 0, 3, 3] ^= 1
    assert fingerprint(x2, d.y_train, d.x_val, d.y_val) != d.fingerprint
    y2 = d.y_val.clone()
    y2[0] = (y2[0] + 1) % 10
    assert fingerprint(d.x_train, d.y_train, d.x_val, y2) != d.fingerprint
    # moving a sample from train to val changes it too (shapes are part of the hash)
    moved = fingerprint(
        d.x_train[1:], d.y_train[1:], torch.cat([d.x_train[:1], d.x_val]), torch.cat([d.y_train[:1], d.y_val])
    )
    assert moved != d.fingerprint
    assert fingerprint(d.x_train, d.y_train, d.x_val, d.y_val) == d.fingerprint


def test_digits_resize(capsys):
    d = load_data("digits", img_size=16)
    assert d.x_train.shape == (1437, 1, 16, 16) and d.img_size == 16
    assert "resizing" in capsys.readouterr().err
    with pytest.raises(ValueError, match="positive int"):
        load_data("digits", img_size=0)


# ----------------------------------------------------------------------------------------------------
# .npz
# ----------------------------------------------------------------------------------------------------


def _save_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def _gray_arrays(rng, n_tr=20, n_va=7, h=6, w=6):
    return dict(
        x_train=rng.integers(0, 256, (n_tr, h, w), dtype=np.uint8),
        y_train=rng.integers(0, 3, n_tr).astype(np.int64),
        x_val=rng.integers(0, 256, (n_va, h, w), dtype=np.uint8),
        y_val=np.array([0, 1, 2, 3, 0, 1, 2][:n_va], dtype=np.int32),
    )


def test_npz_grayscale_round_trip(tmp_path):
    a = _gray_arrays(np.random.default_rng(0))
    d = load_data(_save_npz(tmp_path / "toy.npz", **a))
    assert torch.equal(d.x_train, torch.from_numpy(a["x_train"])[:, None])
    assert torch.equal(d.x_val, torch.from_numpy(a["x_val"])[:, None])
    assert torch.equal(d.y_train, torch.from_numpy(a["y_train"]))
    assert d.y_val.dtype == torch.int64 and d.y_val.tolist() == a["y_val"].tolist()
    assert (d.num_classes, d.in_chans, d.img_size, d.name) == (4, 1, 6, "toy")  # max label 3 (in val) + 1
    assert d.class_names == ["0", "1", "2", "3"]
    assert d.mean == pytest.approx([a["x_train"].mean() / 255], rel=1e-9)


def test_npz_rgb_round_trip_and_class_names(tmp_path):
    rng = np.random.default_rng(1)
    a = dict(
        x_train=rng.integers(0, 256, (9, 5, 5, 3), dtype=np.uint8),
        y_train=np.arange(9) % 2,
        x_val=rng.integers(0, 256, (4, 5, 5, 3), dtype=np.uint8),
        y_val=np.array([1, 0, 1, 1]),
        class_names=np.array(["cat", "dog", "eel"]),
    )
    d = load_data(_save_npz(tmp_path / "rgb.npz", **a))
    assert d.x_train.shape == (9, 3, 5, 5) and d.in_chans == 3
    assert torch.equal(d.x_train, torch.from_numpy(a["x_train"]).permute(0, 3, 1, 2))
    assert torch.equal(d.x_val, torch.from_numpy(a["x_val"]).permute(0, 3, 1, 2))
    assert d.num_classes == 3 and d.class_names == ["cat", "dog", "eel"]
    assert len(d.mean) == 3 and len(d.std) == 3
    ref = a["x_train"].reshape(-1, 3) / 255
    assert d.mean == pytest.approx(list(ref.mean(0)), rel=1e-9)
    assert d.std == pytest.approx(list(ref.std(0)), rel=1e-9)
    other = load_data(_save_npz(tmp_path / "gray.npz", **_gray_arrays(rng)))
    assert other.fingerprint != d.fingerprint


def test_npz_non_square_resized(tmp_path, capsys):
    a = _gray_arrays(np.random.default_rng(2), h=4, w=6)
    d = load_data(_save_npz(tmp_path / "ns.npz", **a))
    assert d.x_train.shape == (20, 1, 6, 6) and d.x_val.shape == (7, 1, 6, 6)
    assert "resizing" in capsys.readouterr().err


def _bad(rng, **changes):
    a = _gray_arrays(rng)
    for k, v in changes.items():
        if v is None:
            a.pop(k)
        else:
            a[k] = v
    return a


@pytest.mark.parametrize(
    "changes, fix",
    [
        ({"y_val": None}, "missing key(s) y_val (found: x_train, x_val, y_train)"),
        ({"x_train": None, "y_val": None}, "np.savez(path, x_train=..., y_train=..., x_val=..., y_val=...)"),
        ({"x_train": np.zeros((20, 6, 6), np.float32)}, "convert it to uint8 pixels 0..255"),
        ({"x_val": np.zeros((7, 6, 6), np.int64)}, "convert it to uint8"),
        ({"y_train": -np.ones(20, np.int64)}, "labels must be class ids 0..C-1"),
        ({"y_train": np.zeros(20, np.float32)}, "labels must be integer class ids"),
        ({"y_train": np.zeros(19, np.int64)}, "give one label per image"),
        ({"y_val": np.zeros(8, np.int64)}, "give one label per image"),
        ({"y_train": np.zeros((20, 1), np.int64)}, "labels must be 1-D"),
        ({"x_train": np.zeros((20, 6), np.uint8)}, "expected uint8 [N, H, W] or [N, H, W, C]"),
        ({"x_train": np.zeros((20, 3, 6, 6), np.uint8)}, "np.transpose(x, (0, 2, 3, 1))"),
        ({"x_val": np.zeros((7, 5, 5), np.uint8)}, "same height, width and channels"),
        ({"x_val": np.zeros((0, 6, 6), np.uint8), "y_val": np.zeros(0, np.int64)}, "at least one image"),
        ({"class_names": np.array(["a", "b"])}, "labels must be class ids 0..1"),
    ],
)
def test_npz_validation_errors_name_the_fix(tmp_path, changes, fix):
    path = _save_npz(tmp_path / "bad.npz", **_bad(np.random.default_rng(3), **changes))
    with pytest.raises(ValueError) as e:
        load_data(path)
    msg = str(e.value)
    assert fix in msg and "\n" not in msg and msg.startswith(f"--data {path}:")


def test_npz_object_arrays_are_refused_not_unpickled(tmp_path):
    a = _gray_arrays(np.random.default_rng(4))
    a["y_train"] = np.array(list(a["y_train"]), dtype=object)
    path = _save_npz(tmp_path / "obj.npz", **a)
    with pytest.raises(ValueError, match="not objects"):
        load_data(path)


# ----------------------------------------------------------------------------------------------------
# ImageFolder
# ----------------------------------------------------------------------------------------------------


def _png(path, value, size=(4, 4), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, 255 - value, 7)
    Image.new(mode, size, color).save(path)


def _folder(root, extra_rgb=False):
    _png(root / "train" / "cat" / "0.png", 10)
    _png(root / "train" / "cat" / "1.png", 20)
    _png(root / "train" / "dog" / "0.png", 30)
    _png(root / "train" / "dog" / "big.png", 40, size=(6, 6))  # different size -> resized to 4x4
    _png(root / "val" / "cat" / "a.png", 50)
    _png(root / "val" / "dog" / "b.png", 60, size=(4, 4), mode="RGB" if extra_rgb else "L")
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    return root


def test_imagefolder_grayscale_with_resize(tmp_path, capsys):
    d = load_data(str(_folder(tmp_path / "pets")))
    err = capsys.readouterr().err
    assert "no --img-size given; using 4" in err and "decoding once into memory" in err
    assert d.x_train.shape == (4, 1, 4, 4) and d.x_val.shape == (2, 1, 4, 4)
    assert (d.num_classes, d.in_chans, d.img_size, d.name) == (2, 1, 4, "pets")
    assert d.class_names == ["cat", "dog"]
    assert d.y_train.tolist() == [0, 0, 1, 1] and d.y_val.tolist() == [0, 1]
    # files in sorted order; constant images stay constant through loading and resizing
    assert d.x_train[:, 0, 0, 0].tolist() == [10, 20, 30, 40]
    assert bool((d.x_train[3] == 40).all()) and d.x_val[:, 0, 0, 0].tolist() == [50, 60]
    assert d.fingerprint == load_data(str(tmp_path / "pets")).fingerprint


@pytest.mark.parametrize("memory", [True, False], ids=["memory", "streamed"])
def test_a_val_split_without_some_classes_keeps_train_s_labels(tmp_path, capsys, memory):
    """A real dataset whose rare class has no val image (val/ lacks its folder) used to be refused. It loads
    now, with one note, and val labels by class name in train/'s order: a val "eel" image is label 2, not
    the 1 that a scan of val/ alone would give it (the silent label shift of a per-split ImageFolder)."""
    root = _folder(tmp_path / "pets")
    _png(root / "train" / "eel" / "0.png", 70)
    _png(root / "val" / "eel" / "c.png", 80)
    shutil.rmtree(root / "val" / "dog")
    d = load_data(str(root), memory_threshold=None if memory else 0)
    err = capsys.readouterr().err
    assert "has no folder for 1 of train/'s 3 classes (dog): they are trained but not evaluated" in err, err
    assert d.class_names == ["cat", "dog", "eel"] and d.num_classes == 3
    assert (d.stream is None) == memory and d.y_val.tolist() == [0, 2]


def test_imagefolder_rgb_when_any_image_is_colour(tmp_path):
    d = load_data(str(_folder(tmp_path / "mixed", extra_rgb=True)), img_size=5)
    assert d.x_train.shape == (4, 3, 5, 5) and d.in_chans == 3 and d.img_size == 5
    assert d.x_val[1, :, 2, 2].tolist() == [60, 195, 7]
    assert d.x_train[0, :, 0, 0].tolist() == [10, 10, 10]  # L converted to RGB


def test_imagefolder_errors(tmp_path):
    root = _folder(tmp_path / "a")
    _png(root / "val" / "eel" / "x.png", 1)
    with pytest.raises(
        ValueError,
        match=r"only here: \['eel'\]; missing here: \[\]\); give both splits the same class subfolders",
    ):
        load_data(str(root))
    only_train = tmp_path / "b"
    _png(only_train / "train" / "cat" / "0.png", 1)
    with pytest.raises(ValueError, match="directory has no val/"):
        load_data(str(only_train))
    empty_val = tmp_path / "c"
    _png(empty_val / "train" / "cat" / "0.png", 1)
    (empty_val / "val" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images under"):
        load_data(str(empty_val))
    broken = _folder(tmp_path / "d")
    (broken / "train" / "cat" / "2.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*2.png .*remove or replace the file"):
        load_data(str(broken))


def test_missing_path_and_unknown_spec(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError) as e:
        load_data(missing)
    assert str(e.value) == (
        f"--data {missing}: no such file or directory; expected 'digits', a directory with train/ and val/ "
        "(or class folders + --val-fraction), tar shards ('shards/train-{0000..0099}.tar' with --val-data or "
        "--val-fraction), synthetic:N, or a .npz with x_train, y_train, x_val, y_val"
    )
    txt = tmp_path / "data.csv"
    txt.write_text("1,2")
    with pytest.raises(ValueError, match="not a .npz file, a .tar shard or a directory; expected 'digits'"):
        load_data(str(txt))


# ----------------------------------------------------------------------------------------------------
# EpochSampler
# ----------------------------------------------------------------------------------------------------


def _all(s: EpochSampler, epoch: int, start_step: int = 0) -> list[torch.Tensor]:
    return list(s.batches(epoch, start_step))


def test_sampler_deterministic_and_covers_each_id_once():
    s = EpochSampler(103, 10, seed=7, drop_last=False)
    b1, b2 = _all(s, 0), _all(EpochSampler(103, 10, seed=7, drop_last=False), 0)
    assert len(s) == 11 == len(b1)
    assert all(torch.equal(a, b) for a, b in zip(b1, b2, strict=True))
    assert [len(b) for b in b1] == [10] * 10 + [3]
    assert torch.equal(torch.sort(torch.cat(b1)).values, torch.arange(103))
    assert all(b.dtype == torch.int64 for b in b1)
    dropped = EpochSampler(103, 10, seed=7)
    assert len(dropped) == 10
    got = torch.cat(_all(dropped, 0))
    assert got.numel() == 100 and torch.unique(got).numel() == 100


def test_sampler_differs_per_epoch_and_seed_but_not_per_batch_size():
    s = EpochSampler(50, 8, seed=1)
    assert not torch.equal(s.order(0), s.order(1))
    assert not torch.equal(s.order(0), EpochSampler(50, 8, seed=2).order(0))
    assert not torch.equal(s.order(0), torch.arange(50))
    assert torch.equal(s.order(3), EpochSampler(50, 5, seed=1, world_size=5, rank=2).order(3))
    assert torch.equal(torch.cat(_all(s, 1)), s.order(1)[:48])


@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_rank_slices_union_is_the_single_process_batch(drop_last):
    n, bs = 40, 8
    single = _all(EpochSampler(n, bs, seed=3, drop_last=drop_last), 2)
    ranks = [_all(EpochSampler(n, bs, seed=3, drop_last=drop_last, rank=r, world_size=2), 2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for step, full in enumerate(single):
        assert len(ranks[0][step]) == len(ranks[1][step]) == bs // 2
        assert torch.equal(torch.cat([ranks[0][step], ranks[1][step]]), full)


def test_sampler_uneven_tail_with_ranks_is_padded_equally():
    ranks = [_all(EpochSampler(13, 4, seed=0, drop_last=False, rank=r, world_size=4), 0) for r in range(4)]
    assert [len(r) for r in ranks] == [4] * 4
    last = [r[-1] for r in ranks]
    assert [len(b) for b in last] == [1, 1, 1, 1]
    seen = torch.cat([torch.cat(r) for r in ranks])
    assert torch.equal(torch.unique(seen), torch.arange(13))  # every id, 3 pad ids seen twice


def test_sampler_start_step_resumes_identically():
    s = EpochSampler(64, 8, seed=11, rank=1, world_size=2)
    full = _all(s, 5)
    resumed = _all(EpochSampler(64, 8, seed=11, rank=1, world_size=2), 5, start_step=3)
    assert len(resumed) == len(full) - 3
    assert all(torch.equal(a, b) for a, b in zip(resumed, full[3:], strict=True))
    assert _all(s, 5, start_step=len(s)) == []
    with pytest.raises(ValueError, match="start_step"):
        _all(s, 5, start_step=len(s) + 1)


def test_sampler_clips_batch_and_validates():
    s = EpochSampler(7, 16, seed=0)
    assert s.batch_size == 7 and len(s) == 1
    assert torch.equal(torch.sort(_all(s, 0)[0]).values, torch.arange(7))
    s2 = EpochSampler(7, 16, seed=0, world_size=2, rank=1)
    assert s2.batch_size == 6 and len(_all(s2, 0)[0]) == 3
    with pytest.raises(ValueError, match="not divisible by world_size 4; use a multiple of 4"):
        EpochSampler(100, 10, seed=0, world_size=4)
    with pytest.raises(ValueError, match="rank"):
        EpochSampler(100, 10, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="no samples"):
        EpochSampler(0, 10, seed=0)
