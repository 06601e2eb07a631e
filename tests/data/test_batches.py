"""``TrainBatches``: the step draws augmentation parameters on its own (device) ids, the loader's prepared
rows are served in the order augment asks for them and checked against those ids, and a prepared batch
equals augmenting the whole set directly (memory, memory ahead on a thread, streamed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastkd.data.batches as batches_mod
from fastkd.data import load_data
from fastkd.data.augment import AugmentConfig, augment_batch
from fastkd.data.batches import Prepared, TrainBatches


def _digits():
    d = load_data("digits", log=lambda m: None)
    aug = AugmentConfig.default_for(d.img_size)
    aug.mixup_alpha, aug.cutmix_alpha, aug.hflip = 0.8, 1.0, True  # partners in play
    return d, aug


def _direct(d, aug, ids, view, seed=5):
    return augment_batch(d.x_train, d.y_train, ids, seed=seed, view=view, cfg=aug,
                         num_classes=d.num_classes, mean=d.mean, std=d.std)


def test_params_are_drawn_on_the_callers_ids(monkeypatch):
    """augment gets the very tensor the step passed (the sampler's device ids on CUDA), not the host copy
    the loader used: so the parameters are drawn where the step runs, with no read-back or upload."""
    d, aug = _digits()
    seen = []
    real = batches_mod.augment_batch

    def spy(fetch, y, ids, **kw):
        seen.append(ids)
        return real(fetch, y, ids, **kw)

    monkeypatch.setattr(batches_mod, "augment_batch", spy)
    tb = TrainBatches(d, aug, seed=5, device=torch.device("cpu"))
    ids = torch.tensor([7, 3, 99, 0, 41])
    tb.start_epoch([ids.clone()], view=1)
    tb(ids, 1)
    assert seen[-1] is ids


def test_prepared_serves_own_rows_then_partners_and_checks_them():
    x = torch.arange(6 * 2, dtype=torch.uint8).reshape(6, 1, 1, 2)
    want = torch.tensor([4, 1, 2, 1, 0, 3])  # three ids, then their partners (a repeat is fine)
    p = Prepared(x, want, 3, want, labels=torch.zeros(6, dtype=torch.int64))
    assert torch.equal(p.fetch(torch.tensor([4, 1, 2])), x[:3])
    assert torch.equal(p.fetch(torch.tensor([1, 0, 3])), x[3:])
    # positions (streamed rows hold each id once): rows are looked up through ``sel``
    rows = torch.tensor([10, 11, 12], dtype=torch.uint8).reshape(3, 1, 1, 1)
    p = Prepared(rows, torch.tensor([8, 6, 6, 7]), 2, torch.tensor([6, 7, 8]), labels=None,
                 sel=torch.tensor([2, 0, 0, 1]))
    assert p.fetch(torch.tensor([8, 6])).flatten().tolist() == [12, 10]
    assert p.fetch(torch.tensor([6, 7])).flatten().tolist() == [10, 11]
    bad = Prepared(x, want, 3, want, labels=None)
    with pytest.raises(RuntimeError, match="ids differ from the batch the loader prepared"):
        bad.fetch(torch.tensor([4, 1, 5]))


def test_a_step_with_other_ids_than_announced_is_stopped():
    """Announced order is the contract: a same-sized batch of other ids fails the device-side check
    (here on the CPU, at once) instead of training on the wrong images."""
    d, aug = _digits()
    tb = TrainBatches(d, aug, seed=5, device=torch.device("cpu"))
    tb.start_epoch([torch.tensor([1, 2, 3, 4])], view=0)
    with pytest.raises(RuntimeError, match="ids differ"):
        tb(torch.tensor([1, 2, 3, 5]), 0)


@pytest.mark.parametrize("announced", [True, False], ids=["announced", "direct"])
def test_memory_batches_equal_augmenting_the_whole_set(announced):
    d, aug = _digits()
    g = torch.Generator().manual_seed(0)
    ids = [torch.randperm(120, generator=g)[:k] for k in (16, 16, 7)]
    tb = TrainBatches(d, aug, seed=5, device=torch.device("cpu"))
    if announced:
        tb.start_epoch([i.clone() for i in ids], view=3)
    got = [tb(i, 3) for i in ids]
    assert any((r[1].max(1).values < 1).any() for r in got)  # mixing happened
    for i, g_ in zip(ids, got, strict=True):
        for a, b in zip(_direct(d, aug, i, 3), g_, strict=True):
            assert torch.equal(a, b)
    tb.close()


def test_streamed_batches_equal_augmenting_the_whole_set(tmp_path):
    """A streamed image folder: partners come from the loader's extra ids (deduplicated rows), and
    ``Prepared`` looks them up by position."""
    from PIL import Image

    d, aug = _digits()
    x = d.x_train.numpy()
    for i in range(60):
        cls = int(d.y_train[i])
        for split in ("train", "val"):
            p = tmp_path / split / f"c{cls}"
            p.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(x[i].transpose(1, 2, 0)[..., 0])).save(p / f"{i:03d}.png")
    quiet = dict(img_size=d.img_size, workers=0, log=lambda m: None)
    mem = load_data(str(tmp_path), **quiet)
    st = load_data(str(tmp_path), memory_threshold=0, **quiet)
    assert st.stream is not None
    ids = [torch.tensor([3, 0, 17, 5, 33, 12]), torch.tensor([9, 22, 1, 2, 40, 59])]
    outs = []
    for data in (mem, st):
        tb = TrainBatches(data, aug, seed=1, device=torch.device("cpu"), workers=0)
        tb.start_epoch([i.clone() for i in ids], view=2)
        outs.append([tb(i, 2) for i in ids])
        tb.close()
    assert any((b[1].max(1).values < 1).any() for b in outs[1])  # partners were mixed in
    for a, b in zip(outs[0], outs[1], strict=True):
        for u, v in zip(a, b, strict=True):
            assert torch.equal(u, v)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_cuda_memory_batches_ahead_no_sync_and_equal_to_cpu():
    """The threaded pinned ring: several announced batches (the ring refilled), served under
    ``set_sync_debug_mode("error")`` with device ids, equal to the CPU's batches."""
    d, aug = _digits()
    dev = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator().manual_seed(1)
    ids = [torch.randperm(120, generator=g)[:16] for _ in range(6)]
    ref = [_direct(d, aug, i, 4) for i in ids]
    tb = TrainBatches(d, aug, seed=5, device=dev)
    dev_ids = [i.to(dev) for i in ids]
    tb(dev_ids[0], 4)  # warm-up: the one-time label check
    tb.start_epoch(ids, view=4)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = [tb(i, 4) for i in dev_ids]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    tb.close()
    for r, g_ in zip(ref, got, strict=True):
        assert torch.equal(r[1], g_[1].cpu()) and torch.equal(r[2], g_[2].cpu())
        # pixels: CUDA computes x / 255 as x * (1/255), which may differ in the last bit
        assert torch.allclose(r[0], g_[0].cpu(), rtol=1e-6, atol=1e-6)


def test_threaded_memory_loader_matches_inline_and_stops_cleanly():
    """The prefetch thread (CPU mode of the CUDA producer): same rows in the same order as inline, a
    smaller last batch (the ring's slot is remade), an error raised in the producer reaches the consumer,
    and closing an epoch early stops the thread."""
    from fastkd.data.batches import _MemoryLoader

    d, aug = _digits()
    tb = TrainBatches(d, aug, seed=5, device=torch.device("cpu"))
    extra = tb._extra(2)
    g = torch.Generator().manual_seed(2)
    ids = [torch.randperm(500, generator=g)[:k] for k in (32, 32, 32, 32, 9)]
    inline = _MemoryLoader(d.x_train, d.y_train, torch.device("cpu"))
    ahead = _MemoryLoader(d.x_train, d.y_train, torch.device("cpu"), threaded=True)
    got = list(ahead.epoch(ids, extra_ids=extra))
    ref = list(inline.epoch(ids, extra_ids=extra))
    assert len(got) == len(ref) == 5
    for a, b in zip(ref, got, strict=True):
        assert a.n_main == b.n_main and torch.equal(a.want, b.want) and torch.equal(a.x, b.x)
        assert b.want.shape[0] == 2 * b.n_main  # own ids, then partners

    def boom(b):
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(ahead.epoch(ids, extra_ids=boom))
    import threading

    # (only this epoch's thread: under xdist on a GPU machine another test's suspended epoch in the same
    # worker can hold a live prefetch thread of its own, which failed this check on the H200, 2026-11-27)
    before = {t for t in threading.enumerate() if t.name == "fastkd-batch-prefetch"}
    it = ahead.epoch(iter(ids * 50), extra_ids=extra)
    next(it)
    mine = {t for t in threading.enumerate() if t.name == "fastkd-batch-prefetch"} - before
    assert len(mine) == 1
    it.close()
    assert not any(t.is_alive() for t in mine)
