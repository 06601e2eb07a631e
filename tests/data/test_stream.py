"""Streaming datasets: ImageFolder scan, tar shards, decode, loader, bad images, sharding, small-set plan.

Every input is built here, offline, from scikit-learn's bundled digits (upscaled to 32-48 px JPEGs, a
PNG, a grayscale+RGBA pair, a corrupt file, a symlink cycle) and tar shards made from the same files.
"""

import io
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from fastkd.data.stream import (
    BadImageError,
    StreamLoader,
    eval_id_batches,
    expand_braces,
    is_stream_spec,
    materialize,
    open_stream,
    plan_storage,
    shard_ids,
)

N_PER_CLASS_TRAIN, N_PER_CLASS_VAL, CLASSES = 4, 2, 3


def _digit_images():
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return imgs, d.target


def _rgb(a: np.ndarray, size: int, k: int) -> Image.Image:
    """An 8x8 digit -> an RGB image of size x size (mixed sizes: odd ones are taller than wide)."""
    im = Image.fromarray(a, "L").resize((size, size + (8 if k % 2 else 0)), Image.Resampling.BILINEAR)
    return Image.merge("RGB", (im, im.point(lambda v: 255 - v), im))


def _write_folder(root, *, corrupt=False, gray=False):
    """root/train/<c>/img_<k>.jpg (+ one .png), root/val/<c>/...; returns {relpath: PIL image written}."""
    imgs, tgt = _digit_images()
    written = {}
    for split, n in (("train", N_PER_CLASS_TRAIN), ("val", N_PER_CLASS_VAL)):
        for c in range(CLASSES):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            idx = np.flatnonzero(tgt == c)[: n + (N_PER_CLASS_TRAIN if split == "val" else 0)]
            idx = idx[-n:] if split == "val" else idx[:n]
            for k, i in enumerate(idx):
                im = _rgb(imgs[i], 32 + 8 * (k % 3), k)
                if gray:
                    im = im.convert("L")
                ext = "png" if (k == 1 and c == 0) else "jpg"
                p = d / f"img_{k}.{ext}"
                im.save(p, quality=95) if ext == "jpg" else im.save(p)
                written[f"{split}/c{c}/img_{k}.{ext}"] = p
    if corrupt:
        (root / "train" / "c1" / "img_2.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return written


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "imgs"
    _write_folder(root)
    return root


def _write_shards(folder_root, out_dir, split, n_shards=2):
    """Tar shards (webdataset layout) from the sorted files of folder_root/split; key = '<class>/<stem>'."""
    data = open_stream(str(folder_root), img_size=32, log=None)
    src = (data.train if split == "train" else data.val).source
    out_dir.mkdir(exist_ok=True)
    chunks = np.array_split(np.arange(len(src)), n_shards)
    for s, chunk in enumerate(chunks):
        with tarfile.open(out_dir / f"{split}-{s:04d}.tar", "w") as tf:
            for i in chunk:
                rel = src.keys[i]
                stem, ext = rel.rsplit(".", 1)
                for name, payload in (
                    (f"{stem}.{ext}", open(src.path(i), "rb").read()),
                    (f"{stem}.cls", str(int(src.labels[i])).encode()),
                ):
                    ti = tarfile.TarInfo(name)
                    ti.size = len(payload)
                    tf.addfile(ti, io.BytesIO(payload))
    return str(out_dir / f"{split}-{{0000..{n_shards - 1:04d}}}.tar")


# ----------------------------------------------------------------------------------------------------
# folder index
# ----------------------------------------------------------------------------------------------------


def test_folder_index_sorted_ids_labels_and_no_decode(folder, monkeypatch):
    import PIL.Image

    opened = []
    real_open = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    d = open_stream(str(folder), img_size=32, in_chans=3, log=None)  # in_chans given: nothing peeked
    assert opened == []  # indexed by a file scan, no image opened
    assert d.kind == "folder" and d.num_classes == CLASSES and d.class_names == ["c0", "c1", "c2"]
    keys = d.train.source.keys
    assert keys == sorted(keys, key=lambda k: k.split("/")) and len(keys) == CLASSES * N_PER_CLASS_TRAIN
    assert keys[1] == "c0/img_1.png"
    assert d.y_train.tolist() == [c for c in range(CLASSES) for _ in range(N_PER_CLASS_TRAIN)]
    assert len(d.val) == CLASSES * N_PER_CLASS_VAL


def test_folder_fingerprint_from_stat_only(folder):
    f1 = open_stream(str(folder), img_size=32, log=None).fingerprint
    assert open_stream(str(folder), img_size=32, log=None).fingerprint == f1
    assert open_stream(str(folder), img_size=48, log=None).fingerprint != f1  # decode settings count
    p = folder / "train" / "c2" / "img_0.jpg"
    st = os.stat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a touched file changes it
    assert open_stream(str(folder), img_size=32, log=None).fingerprint != f1


def test_symlink_cycle_lists_each_image_once(folder):
    before = open_stream(str(folder), img_size=32, log=None)
    os.symlink(folder / "train" / "c0", folder / "train" / "c0" / "loop")  # c0/loop -> c0
    os.symlink(folder / "train", folder / "train" / "c1" / "up")  # c1/up -> train (contains c1 itself)
    (folder / "train" / "c2" / "deeper").mkdir()
    os.symlink(folder / "train" / "c2", folder / "train" / "c2" / "deeper" / "back")  # a 2-step cycle
    after = open_stream(str(folder), img_size=32, log=None)
    assert after.train.source.keys == before.train.source.keys  # each image once, under its own class
    assert torch.equal(after.y_train, before.y_train)


def test_missing_and_bad_specs_are_one_line(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        open_stream(str(tmp_path / "nope"), img_size=32, log=None)
    (tmp_path / "half" / "train" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="no val/"):
        open_stream(str(tmp_path / "half"), img_size=32, log=None)
    (folder / "val" / "c1").rename(folder / "val" / "cX")
    with pytest.raises(ValueError, match="same class subfolders"):
        open_stream(str(folder), img_size=32, log=None)
    with pytest.raises(ValueError, match="--img-size"):
        open_stream(str(folder), img_size=None, log=None)
    for e in (FileNotFoundError, ValueError):
        assert issubclass(e, Exception)


# ----------------------------------------------------------------------------------------------------
# decode + loader
# ----------------------------------------------------------------------------------------------------


def _expected(path, size, mode="RGB"):
    """Short side to size, centre crop, from the full decode (PIL) -- what the loader must produce."""
    with Image.open(path) as im:
        if im.format == "JPEG":
            im.draft(mode, (size, size))
        im = im.convert(mode)
        w, h = im.size
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), Image.Resampling.BILINEAR)
        l, t = (nw - size) // 2, (nh - size) // 2
        a = np.asarray(im.crop((l, t, l + size, t + size)))
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def test_loader_batches_any_ids_uint8_and_pixels(folder):
    d = open_stream(str(folder), img_size=32, log=None)
    ld = StreamLoader(d.train, workers=0)
    ids = [torch.tensor([5, 0, 11, 1]), torch.tensor([3])]
    got = list(ld.epoch(ids))
    assert [b.ids.tolist() for b in got] == [[5, 0, 11, 1], [3]]
    b = got[0]
    assert b.x.dtype == torch.uint8 and b.x.shape == (4, 3, 32, 32) and b.n_main == 4
    assert b.labels.tolist() == d.y_train[[5, 0, 11, 1]].tolist()
    for row, i in enumerate([5, 0, 11, 1]):
        exp = _expected(d.train.source.path(i), 32)
        assert np.array_equal(b.x[row].numpy(), exp), d.train.source.keys[i]
    # fetch by id in any order (what augment_batch calls)
    assert torch.equal(b.fetch(torch.tensor([1, 5])), b.x[[3, 0]])
    with pytest.raises(ValueError, match="extra_ids"):
        b.fetch(torch.tensor([2]))


def test_extra_ids_are_fetched_with_the_batch(folder):
    d = open_stream(str(folder), img_size=32, log=None)
    ld = StreamLoader(d.train, workers=0)
    (b,) = list(ld.epoch([torch.tensor([4, 2])], extra_ids=lambda ids: (ids + 1) % len(d.train)))
    assert b.ids.tolist() == [4, 2, 3, 5] and b.n_main == 2  # 3 = partner of 2, 5 = partner of 4
    assert torch.equal(b.fetch(torch.tensor([5, 3])), b.x[[3, 2]])


def test_workers_persist_and_match_main_process(folder):
    d = open_stream(str(folder), img_size=32, log=None)
    ref = materialize(d.train, workers=0)
    ld = StreamLoader(d.train, workers=1, prefetch_factor=2)
    for _epoch in range(2):  # the same loader serves every epoch (persistent worker)
        for b in ld.epoch([torch.tensor([7, 1, 2]), torch.tensor([0])]):
            assert torch.equal(b.x, ref[b.ids])
    ld.close()


@pytest.mark.parametrize("workers", [0, 1])
def test_a_loader_epoch_leaves_the_global_rng_alone(folder, workers):
    """The DataLoader drew its workers' base seed from torch's global RNG at each epoch: streaming (or
    decoding into memory) then moved the run's random stream, and the student's init, its masks and its
    augmentation depended on --memory-threshold / --workers."""
    d = open_stream(str(folder), img_size=32, log=None)
    ld = StreamLoader(d.train, workers=workers)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    for _epoch in range(2):
        list(ld.epoch([torch.tensor([3, 1]), torch.tensor([0])]))
    materialize(d.train, workers=workers)
    assert torch.equal(torch.get_rng_state(), before)
    ld.close()


def test_grayscale_rgba_and_channel_choice(tmp_path):
    root = tmp_path / "g"
    _write_folder(root, gray=True)
    d = open_stream(str(root), img_size=32, log=None)
    assert d.in_chans == 1  # every peeked header grayscale
    x = materialize(d.train, workers=0)
    assert x.shape == (len(d.train), 1, 32, 32)
    # an RGBA and a 16-bit grayscale image in an RGB set: converted to 3 channels
    rgba = Image.new("RGBA", (40, 36), (10, 200, 30, 128))
    rgba.save(root / "train" / "c0" / "rgba.png")
    Image.fromarray((np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16)).save(
        root / "train" / "c0" / "i16.png"
    )
    d3 = open_stream(str(root), img_size=32, in_chans=3, log=None)
    keys = d3.train.source.keys
    x3 = materialize(d3.train, workers=0)
    assert x3.shape[1] == 3
    assert x3[keys.index("c0/rgba.png"), :, 0, 0].tolist() == [10, 200, 30]  # alpha dropped
    g = x3[keys.index("c0/i16.png")]
    assert torch.equal(g[0], g[1]) and int(g.max()) > 0


# ----------------------------------------------------------------------------------------------------
# bad images
# ----------------------------------------------------------------------------------------------------


def test_corrupt_image_error_names_the_file(tmp_path):
    root = tmp_path / "bad"
    _write_folder(root, corrupt=True)
    d = open_stream(str(root), img_size=32, log=None)
    bad = d.train.source.keys.index("c1/img_2.jpg")
    ld = StreamLoader(d.train, workers=1)
    with pytest.raises(BadImageError) as ei:
        list(ld.epoch([torch.tensor([0, bad])]))
    msg = str(ei.value)
    assert "\n" not in msg and "img_2.jpg" in msg and "--on-bad-image skip" in msg
    ld.close()


def test_corrupt_image_skip_uses_next_readable_same_class(tmp_path):
    root = tmp_path / "bad"
    _write_folder(root, corrupt=True)
    d = open_stream(str(root), img_size=32, on_bad_image="skip", log=None)
    keys = d.train.source.keys
    bad = keys.index("c1/img_2.jpg")
    lines = []
    ld = StreamLoader(d.train, workers=0, log=lines.append)
    for _ in range(2):
        (b,) = list(ld.epoch([torch.tensor([bad, 0])]))
    assert ld.skipped == {bad} and len(lines) == 1  # named once, counted once
    assert "img_2.jpg" in lines[0] and f"using id {bad + 1}" in lines[0]
    assert d.y_train[bad] == d.y_train[bad + 1]  # the substitute has the same label
    ref = materialize(d.train, workers=0)
    assert torch.equal(b.x[0], ref[bad + 1]) and torch.equal(ref[bad], ref[bad + 1])
    # the last image of a class wraps to the first of that class
    last = keys.index("c1/img_3.jpg")
    (root / "train" / "c1" / "img_3.jpg").write_bytes(b"garbage")
    lines.clear()
    (b,) = list(ld.epoch([torch.tensor([last])]))
    assert f"using id {keys.index('c1/img_0.jpg')}" in lines[0]


def test_bad_option_rejected(folder):
    with pytest.raises(ValueError, match="'skip' or 'error'"):
        open_stream(str(folder), img_size=32, on_bad_image="ignore", log=None)


# ----------------------------------------------------------------------------------------------------
# tar shards
# ----------------------------------------------------------------------------------------------------


def test_expand_braces():
    assert expand_braces("s/train-{0000..0002}.tar") == [f"s/train-{i:04d}.tar" for i in range(3)]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_shards_same_order_and_pixels_as_folder(folder, tmp_path):
    tr = _write_shards(folder, tmp_path / "shards", "train")
    va = _write_shards(folder, tmp_path / "shards", "val", n_shards=1)
    ds = open_stream(tr, val_spec=va, img_size=32, log=None)
    df = open_stream(str(folder), img_size=32, log=None)
    assert ds.kind == "tar" and ds.num_classes == CLASSES and ds.in_chans == 3
    assert len(ds.train) == len(df.train) and len(ds.val) == len(df.val)
    # keys '<shard>/<class>/<stem>', sorted -> the folder's order, so the same ids
    assert [k.split("/", 1)[1] for k in ds.train.source.keys] == [
        k.rsplit(".", 1)[0] for k in df.train.source.keys
    ]
    assert torch.equal(ds.y_train, df.y_train) and torch.equal(ds.y_val, df.y_val)
    xs = materialize(ds.train, workers=1)  # random access by offset from a worker
    assert torch.equal(xs, materialize(df.train, workers=0))
    ld = StreamLoader(ds.train, workers=0)
    (b,) = list(ld.epoch([torch.tensor([9, 2, 6])]))
    assert torch.equal(b.x, xs[[9, 2, 6]])
    # fingerprint: stable, recorded, independent of the shard mtimes
    f1 = ds.train.source.fingerprint
    os.utime(tmp_path / "shards" / "train-0000.tar", (1, 1))
    assert open_stream(tr, val_spec=va, img_size=32, log=None).train.source.fingerprint == f1


def test_shard_errors(folder, tmp_path):
    tr = _write_shards(folder, tmp_path / "shards", "train")
    with pytest.raises(ValueError, match="--val-data"):
        open_stream(tr, img_size=32, log=None)
    with pytest.raises(FileNotFoundError, match="1 of 3 shard"):
        open_stream(tr.replace("0001", "0002"), val_spec=tr, img_size=32, log=None)
    with tarfile.open(tmp_path / "nolabel.tar", "w") as tf:
        ti = tarfile.TarInfo("a/x.jpg")
        ti.size = 3
        tf.addfile(ti, io.BytesIO(b"abc"))
    with pytest.raises(ValueError, match=r"no integer \.cls label"):
        open_stream(str(tmp_path / "nolabel.tar"), val_spec=tr, img_size=32, log=None)
    (tmp_path / "junk.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(ValueError, match="cannot read shard"):
        open_stream(str(tmp_path / "junk.tar"), val_spec=tr, img_size=32, log=None)


def test_corrupt_member_in_shard_named(folder, tmp_path):
    (folder / "train" / "c2" / "img_1.jpg").write_bytes(b"\xff\xd8 broken")
    tr = _write_shards(folder, tmp_path / "shards", "train")
    d = open_stream(tr, val_spec=tr, img_size=32, log=None)
    bad = [k.endswith("c2/img_1") for k in d.train.source.keys].index(True)
    with pytest.raises(BadImageError, match=r"train-0001\.tar:c2/img_1"):
        list(StreamLoader(d.train, workers=0).epoch([[bad]]))


# ----------------------------------------------------------------------------------------------------
# synthetic, storage plan, sharding
# ----------------------------------------------------------------------------------------------------


def test_synthetic_deterministic_no_disk():
    a = open_stream("synthetic:20", img_size=16, num_classes=4, seed=3, log=None)
    b = open_stream("synthetic:20", img_size=16, num_classes=4, seed=3, log=None)
    assert (len(a.train), len(a.val), a.num_classes, a.in_chans) == (20, 2, 4, 3)
    xa = materialize(a.train, workers=0)
    assert xa.dtype == torch.uint8 and xa.shape == (20, 3, 16, 16)
    assert torch.equal(xa, materialize(b.train, workers=0)) and torch.equal(a.y_train, b.y_train)
    assert int(a.y_train.max()) < 4
    (bt,) = list(StreamLoader(a.train, workers=0).epoch([[7, 3]]))  # per-id: any batch, same pixels
    assert torch.equal(bt.x, xa[[7, 3]])
    c = open_stream("synthetic:20", img_size=16, num_classes=4, seed=4, log=None)
    assert not torch.equal(xa, materialize(c.train, workers=0)) and c.fingerprint != a.fingerprint
    with pytest.raises(ValueError, match="synthetic:N"):
        open_stream("synthetic:lots", img_size=16, log=None)


def test_plan_storage_threshold_one_line(folder):
    d = open_stream(str(folder), img_size=32, log=None)
    lines = []
    assert plan_storage(d, threshold_bytes=10**9, log=lines.append) == "memory"
    assert plan_storage(d, threshold_bytes=100, log=lines.append) == "stream"
    assert len(lines) == 2 and all("\n" not in s for s in lines) and "streaming" in lines[1]
    assert d.decoded_bytes() == (len(d.train) + len(d.val)) * 3 * 32 * 32


def test_rank_sharding_matches_epoch_sampler():
    from fastkd.data import EpochSampler

    n, bs, world = 50, 8, 2
    full = list(EpochSampler(n, bs, seed=1).batches(0))
    for r in range(world):
        mine = list(EpochSampler(n, bs, seed=1, rank=r, world_size=world).batches(0))
        assert [b.tolist() for b in mine] == [shard_ids(g, r, world).tolist() for g in full]
    with pytest.raises(ValueError, match="world"):
        shard_ids(torch.arange(5), 0, 2)
    seen = torch.cat([torch.cat(list(eval_id_batches(23, 8, r, 3))) for r in range(3)])
    assert sorted(seen.tolist()) == list(range(23))  # every val id once over the ranks, no padding


def test_is_stream_spec(folder):
    assert is_stream_spec(str(folder)) and is_stream_spec("synthetic:5") and is_stream_spec("s/t-{0..1}.tar")
    assert not is_stream_spec("digits") and not is_stream_spec("x.npz")


def test_bench_cli_reports_img_per_s(folder, capsys):
    from fastkd.data.stream import main

    assert main(["--bench", str(folder), "--img-size", "32", "--batch-size", "4", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "img/s" in out
    flat = _flat(folder, folder.parent / "flat")  # class folders, no val/: the bench reads a held-out train
    assert main(["--bench", str(flat), "--img-size", "32", "--batch-size", "4", "--workers", "0"]) == 0
    assert "img/s" in capsys.readouterr().out


def test_abandoned_epoch_then_next_epoch_with_persistent_worker(folder):
    d = open_stream(str(folder), img_size=32, log=None)
    ref = materialize(d.train, workers=0)
    ld = StreamLoader(d.train, workers=1, prefetch_factor=2)
    it = ld.epoch([torch.tensor([i]) for i in range(len(d.train))])
    next(it)  # e.g. a run that stops mid-epoch (resume) while the worker has prefetched more
    got = [b.ids.tolist() for b in ld.epoch([torch.tensor([3, 4]), torch.tensor([0])])]
    assert got == [[3, 4], [0]]  # stale prefetched batches never leak into the next epoch
    (b,) = list(ld.epoch([torch.tensor([2])]))
    assert torch.equal(b.x, ref[[2]])
    ld.close()


def test_mean_std_estimate_exact_on_small_set(folder):
    from fastkd.data.stream import estimate_mean_std

    d = open_stream(str(folder), img_size=32, log=None)
    x = materialize(d.train, workers=0).to(torch.float64) / 255
    mean, std = estimate_mean_std(d.train, n=10_000)
    assert np.allclose(mean, x.mean(dim=(0, 2, 3)).numpy(), atol=1e-9)
    assert np.allclose(std, x.std(dim=(0, 2, 3), unbiased=False).numpy(), atol=1e-9)


def test_streamed_batches_augment_exactly_like_in_memory(folder):
    """The teacher-cache guarantee: augment_batch fed by StreamBatch.fetch (mixing partners fetched in
    the same worker batch via extra_ids) gives the bit-identical images of the in-memory path."""
    try:
        from fastkd.data.augment import AugmentConfig, augment_batch, sample_params
    except ImportError:  # before the fastkd/data/ package
        from fastkd.data.augment import AugmentConfig, augment_batch, sample_params

    d = open_stream(str(folder), img_size=32, log=None)
    n, size = len(d.train), d.img_size
    cfg = AugmentConfig.default_for(size, hflip=True, mixup_alpha=0.8, cutmix_alpha=1.0, erase_prob=0.5)
    x_all = materialize(d.train, workers=0)
    kw = dict(seed=7, view=3, cfg=cfg, num_classes=d.num_classes, mean=(0.5,) * 3, std=(0.25,) * 3)

    def partners(ids):
        return sample_params(ids, seed=7, view=3, cfg=cfg, n=n, channels=3, height=size, width=size).partner

    ld = StreamLoader(d.train, workers=0)
    ids = [torch.tensor([9, 0, 4, 7]), torch.tensor([1, 11])]
    for b, want in zip(ld.epoch(ids, extra_ids=partners), ids, strict=True):
        assert torch.equal(b.ids[: b.n_main], want)
        xs, ys, yh = augment_batch(b.fetch, d.y_train, want, **kw)
        xm, ym, ymh = augment_batch(x_all, d.y_train, want, **kw)
        assert torch.equal(xs, xm) and torch.equal(ys, ym) and torch.equal(yh, ymh)


def test_shard_index_cache_reused_and_invalidated(folder, tmp_path, monkeypatch):
    import fastkd.data.shards as shards_mod

    tr = _write_shards(folder, tmp_path / "shards", "train")
    cache = tmp_path / "idx"
    a = open_stream(tr, val_spec=tr, img_size=32, index_cache=str(cache), log=None)
    assert len(list(cache.glob("*.json"))) == 2
    calls = []
    real = shards_mod._index_one
    monkeypatch.setattr(shards_mod, "_index_one", lambda *a: calls.append(a[0]) or real(*a))
    b = open_stream(tr, val_spec=tr, img_size=32, index_cache=str(cache), log=None)
    assert (
        calls == []
        and b.fingerprint == a.fingerprint
        and np.array_equal(b.train.source.loc, a.train.source.loc)
    )
    os.utime(tmp_path / "shards" / "train-0001.tar", (5, 5))  # a changed shard is indexed again
    open_stream(tr, val_spec=tr, img_size=32, index_cache=str(cache), log=None)
    assert len(calls) == 1 and calls[0].endswith("train-0001.tar")  # val then reuses it


# ----------------------------------------------------------------------------------------------------
# --val-fraction: data without a val split
# ----------------------------------------------------------------------------------------------------


def _flat(folder, dest):
    """The fixture's train/ + val/ images as one folder of class folders (no split), 6 per class."""
    for split in ("train", "val"):
        for c in (folder / split).iterdir():
            (dest / c.name).mkdir(parents=True, exist_ok=True)
            for f in c.iterdir():
                shutil.copy(f, dest / c.name / f"{split}_{f.name}")
    return dest


def test_class_folders_alone_split_by_val_fraction(folder, tmp_path):
    flat = _flat(folder, tmp_path / "flat")
    with pytest.raises(ValueError, match=r"directory has no train/ or val/; add --val-fraction 0.1 to hold"):
        open_stream(str(flat), img_size=32, log=None)
    logs = []
    d = open_stream(str(flat), img_size=32, val_fraction=0.34, log=logs.append)
    assert d.class_names == ["c0", "c1", "c2"] and d.num_classes == CLASSES
    # 6 images per class: round(6 · 0.34) = 2 held out, 4 left, per class; train and val disjoint
    assert d.y_val.bincount().tolist() == [2, 2, 2] and d.y_train.bincount().tolist() == [4, 4, 4]
    tr, va = set(d.train.source.keys), set(d.val.source.keys)
    assert not tr & va and len(tr | va) == 18
    assert logs[0] == (f"{flat}: no val split given: 6 of 18 images held out as val (0.34 of each class, "
                       "chosen by a hash of each file's name)")
    # the labels and pixels are the files', whichever side they land on
    full = open_stream(str(folder), img_size=32, log=None)
    x_val = materialize(d.val, workers=0)
    for j, key in enumerate(d.val.source.keys):
        c, name = key.split("/")
        split, orig = name.split("_", 1)
        src = (full.train if split == "train" else full.val).source
        i = src.keys.index(f"{c}/{orig}")
        assert int(d.y_val[j]) == int(src.labels[i])
        assert torch.equal(x_val[j], materialize(full.train if split == "train" else full.val,
                                                 workers=0)[i])
    # the split depends on the file names only: a copy elsewhere splits alike; another fraction differs
    again = open_stream(str(_flat(folder, tmp_path / "copy")), img_size=32, val_fraction=0.34, log=None)
    assert again.val.source.keys == d.val.source.keys and again.fingerprint != d.fingerprint
    other = open_stream(str(flat), img_size=32, val_fraction=0.5, log=None)
    assert other.y_val.bincount().tolist() == [3, 3, 3] and other.fingerprint != d.fingerprint


def test_val_fraction_on_train_only_folder_and_shards_and_its_errors(folder, tmp_path):
    only = tmp_path / "only"
    shutil.copytree(folder / "train", only / "train")
    d = open_stream(str(only), img_size=32, val_fraction=0.25, log=None)
    assert d.y_val.bincount().tolist() == [1, 1, 1] and len(d.train) == 9  # round(4 · 0.25) = 1 per class
    tr = _write_shards(folder, tmp_path / "shards", "train")
    s = open_stream(tr, img_size=32, val_fraction=0.25, log=None)
    assert s.kind == "tar" and s.num_classes == CLASSES and len(s.val) == 3 and len(s.train) == 9
    tr3 = _write_shards(folder, tmp_path / "shards3", "train", n_shards=3)  # cut differently: same split
    s3 = open_stream(tr3, img_size=32, val_fraction=0.25, log=None)
    members = [k.split("/", 1)[1] for k in s.val.source.keys]
    assert [k.split("/", 1)[1] for k in s3.val.source.keys] == members
    assert torch.equal(materialize(s.val, workers=1), materialize(s3.val, workers=0))
    with pytest.raises(ValueError, match="has its own val/ split; drop --val-fraction"):
        open_stream(str(folder), img_size=32, val_fraction=0.2, log=None)
    with pytest.raises(ValueError, match="--val-data .* or --val-fraction"):
        open_stream(tr, val_spec=tr, img_size=32, val_fraction=0.2, log=None)
    single = tmp_path / "single"
    for c in ("a", "b"):
        (single / c).mkdir(parents=True)
        shutil.copy(folder / "train" / "c0" / "img_0.jpg", single / c / "x.jpg")
    with pytest.raises(ValueError, match="holds out no image"):
        open_stream(str(single), img_size=32, val_fraction=0.2, log=None)
