"""``fastkd.kernels.resized_crop``: RandomResizedCrop's resize in one Triton pass equals the torch form
(``fastkd.data.augment.resized_crop`` on the CPU, itself torchvision's bilinear resized crop:
tests/data/test_rrc.py) bit for bit, under the interpreter on CPU and compiled on a GPU (``DEVICE``): boxes
of every shape (the whole image, one pixel, one row, one column, thin and wide, at the far corner), RGB and
grayscale, odd sizes, several programs per image, and values that land on .5 ties."""

from __future__ import annotations

import pytest
import torch
from kd_testutil import DEVICE

from fastkd.data import augment as A
from fastkd.kernels import resized_crop as K


def _boxes(h, w, n, seed):
    g = torch.Generator().manual_seed(seed)
    fixed = [(0, 0, h, w), (h - 1, w - 1, 1, 1), (2, 0, 1, w), (0, 3, h, 1), (1, 2, h // 3, w - 4),
             (h // 2, 1, h - h // 2, w // 5 + 1)]
    rand = []
    for _ in range(n - len(fixed)):
        bh = int(torch.randint(1, h + 1, (1,), generator=g))
        bw = int(torch.randint(1, w + 1, (1,), generator=g))
        rand.append((int(torch.randint(0, h - bh + 1, (1,), generator=g)),
                     int(torch.randint(0, w - bw + 1, (1,), generator=g)), bh, bw))
    return [torch.tensor(c) for c in zip(*(fixed + rand), strict=True)]


def _torch_form(x, box, monkeypatch):
    monkeypatch.setattr(A, "_crop_kernel_here", lambda t: False)
    out = A.resized_crop(x, *box)
    monkeypatch.undo()
    return out


@pytest.mark.parametrize("c,h,w", [(3, 29, 31), (1, 17, 9), (3, 8, 8), (3, 40, 37)])
def test_the_kernel_equals_the_torch_form(c, h, w, monkeypatch):
    g = torch.Generator().manual_seed(h * w)
    n = 14
    x = torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=g)
    x[3] = (torch.arange(w) % 2 * 255).to(torch.uint8)  # 0/255 stripes: half-way values land on .5 ties
    box = _boxes(h, w, n, seed=c + h)
    want = _torch_form(x, box, monkeypatch)
    got = K.resized_crop(x.to(DEVICE), *(t.to(DEVICE) for t in box))
    assert got is not None and got.dtype == torch.uint8 and got.device.type == DEVICE.type
    got = got.cpu()
    for i in range(n):
        assert torch.equal(got[i], want[i]), f"box {[int(t[i]) for t in box]}"
    assert torch.equal(got[0], x[0])  # the whole image: the identity


def test_ties_round_half_to_even():
    """A 2-pixel box stretched to 3 columns: the middle output reads source 0.5 exactly, a .5 tie, which
    torch.round (the torch form) sends to the even level: 10.5 → 10, 11.5 → 12 (floor(v + .5) would give
    11 and 12)."""
    x = torch.tensor([[[[10, 11, 99]]], [[[11, 12, 99]]]], dtype=torch.uint8)
    box = [torch.tensor(v).to(DEVICE) for v in ((0, 0), (0, 0), (1, 1), (2, 2))]
    got = K.resized_crop(x.to(DEVICE), *box).cpu()
    assert got[:, 0, 0].tolist() == [[10, 10, 11], [11, 12, 12]]


def test_resized_crop_takes_the_kernel_when_it_can(monkeypatch):
    calls = []
    real = K.resized_crop
    monkeypatch.setattr(K, "resized_crop", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(A, "_crop_kernel_here", lambda t: True)
    x = torch.randint(0, 256, (3, 3, 11, 13), dtype=torch.uint8)
    box = _boxes(11, 13, 6, seed=1)
    box = [t[:3] for t in box]
    got = A.resized_crop(x.to(DEVICE), *(t.to(DEVICE) for t in box))
    assert calls == [1]
    assert torch.equal(got.cpu(), _torch_form(x, box, monkeypatch))
