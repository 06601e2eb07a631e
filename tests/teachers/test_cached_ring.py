"""The cached teacher's prefetch ring (issue 12, item 2), on the CPU: records are served in the announced
order, a ring slot is never gathered into while its reader (copy or consumer) still uses it, and an epoch
resumed at a mid-epoch step is served from that step on."""

from __future__ import annotations

import threading

import pytest
import torch

from fastkd.cache.build import build_cache
from fastkd.config import parse_args
from fastkd.data import EpochSampler
from fastkd.models import create_model, save_model
from fastkd.teachers.cached import CachedTeacher, _Ring

VIT = "vit_tiny_patch16_224"
OV = dict(patch_size=2, depth=2, num_heads=2, mlp_ratio=2.0, class_token=True, global_pool="token")
MK = dict(num_classes=10, img_size=8, in_chans=1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("ring")
    save_model(create_model(VIT, **MK, **OV, embed_dim=32), d / "t.safetensors")
    argv = ["--method", "kd+vitkd", "--teacher", str(d / "t.safetensors"), "--batch-size", "16",
            "--train-limit", "160", "--device", "cpu", "--quiet", "--workdir", str(d / "w"),
            "--student-embed-dim", "16", "--student-depth", "2", "--student-heads", "2"]
    build_cache(parse_args(argv), d / "c", views=2, shard_size=48, log=lambda *a: None, progress=False)
    return d / "c"


class _Ev:
    def __init__(self):
        self.waited = 0

    def synchronize(self):
        self.waited += 1


def test_ring_hands_out_slots_in_order_and_never_a_busy_one():
    stop = threading.Event()
    ring = _Ring(2, stop)
    make = lambda: {"a": torch.zeros(3)}  # noqa: E731
    k0, b0 = ring.acquire(make, 3)
    k1, b1 = ring.acquire(make, 3)
    assert (k0, k1) == (0, 1) and b0["a"] is not b1["a"]
    stop.set()  # a busy slot is never handed out: acquire waits (and gives up only when stopped)
    assert ring.acquire(make, 3) is None
    stop.clear()
    ev = _Ev()
    ring.release(0, ev)
    k, b = ring.acquire(make, 3)
    assert k == 0 and b["a"] is b0["a"] and ev.waited == 1  # same buffer, after its copy finished
    ring.release(1)
    k, b = ring.acquire(lambda: {"a": torch.zeros(5)}, 5)  # another batch size: new buffers for that slot
    assert k == 1 and b["a"].shape == (5,) and ring.acquired == 4


def test_release_from_another_thread_unblocks_the_producer():
    stop = threading.Event()
    ring = _Ring(1, stop)
    make = lambda: {"a": torch.zeros(1)}  # noqa: E731
    ring.acquire(make, 1)
    got = []
    th = threading.Thread(target=lambda: got.append(ring.acquire(make, 1)))
    th.start()
    ring.release(0)
    th.join(timeout=30)
    assert not th.is_alive() and got and got[0][0] == 0


@pytest.mark.parametrize("start", [0, 3])
def test_prefetch_serves_every_batch_in_order_without_overwriting(cache, start):
    """Threaded prefetch through the ring (4 slots on the CPU, 10 batches: it wraps twice); every served
    record is kept until the end, so a slot overwritten while still in use would show up as a mismatch.
    ``start`` > 0: an epoch resumed at a mid-epoch step."""
    ct = CachedTeacher(cache, threaded=True, prefetch=2)
    sampler = EpochSampler(160, 16, 0)
    view = 1
    batches = sampler.batches(1, start_step=start)
    ct.prefetch_epoch(batches, view)
    served, want = [], []
    try:
        for ids in batches:
            ct.ready(ids, view)
            served.append(ct(None, ids=ids, view=view))
            want.append({k: v.float() if v.is_floating_point() else v.long()
                         for k, v in ct.load(ids, view).items()})
    finally:
        ct.close()
    assert len(served) == len(sampler) - start and ct.prefetched == len(served)
    assert ct._pf is None or ct._pf.get("ring") is not None
    for got, w in zip(served, want, strict=True):
        assert set(got) == set(w)
        for k in w:
            assert torch.equal(got[k], w[k]), k


def test_an_unannounced_batch_is_gathered_directly(cache):
    ct = CachedTeacher(cache, threaded=True)
    sampler = EpochSampler(160, 16, 0)
    ct.prefetch_epoch(sampler.batches(0), 0)
    other = torch.arange(16)
    got = ct(None, ids=other, view=0)  # not the next announced batch: prefetch stops, direct gather
    assert ct.prefetched == 0 and ct._pf is None
    assert torch.equal(got["logits"] if "logits" in got else got["topk_vals"],
                       ct.load(other, 0)["logits" if "logits" in got else "topk_vals"].float())
    ct.close()
