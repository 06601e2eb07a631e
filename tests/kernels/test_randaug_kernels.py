"""``fastkd.kernels.randaug``: a RandAugment layer as two Triton passes equals the torch form
(``fastkd.data.randaug._stats`` and ``_layer_torch``, themselves bit-identical to PIL:
tests/data/test_randaug.py) bit for bit, under the interpreter on CPU and compiled on a GPU (``DEVICE``):
every op at several magnitudes and both signs, RGB and grayscale, odd sizes (several programs per image, a
partial last block, images too small for SMOOTH's interior), flat and saturated images, points far outside.
The reference always runs on the CPU."""

from __future__ import annotations

import pytest
import torch
from kd_testutil import DEVICE

from fastkd.data import randaug as RA
from fastkd.kernels import randaug as K

FILL = torch.tensor([124.0, 116.0, 104.0])


def _images(b, c, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8, generator=g)
    x[0] = 77  # flat: AutoContrast's and Equalize's identity cases
    if b > 1:
        x[1, :, : h // 2] = 0  # saturated at both ends
        x[1, :, h // 2 :] = 255
    if b > 2:  # few levels: Equalize's step from a spiky histogram
        x[2] = (x[2] // 64) * 64
    return x


def _every_op():
    rows = [(i, m, s) for i in range(len(RA.OPS)) for m in (0.0, 3.7, 9.0, 10.0) for s in (False, True)]
    rows.append((-1, 9.0, False))  # a skipped layer
    op = torch.tensor([r[0] for r in rows])
    mag = torch.tensor([r[1] for r in rows], dtype=torch.float64)
    neg = torch.tensor([r[2] for r in rows])
    return op, mag, neg


@pytest.mark.parametrize("c,h,w", [(3, 23, 31), (1, 17, 9), (3, 8, 8), (3, 37, 41), (1, 2, 5)])
def test_the_statistics_equal_the_torch_form(c, h, w):
    x = _images(6, c, h, w, seed=h * w)
    xi = x.to(torch.int64)
    lo, hi, hist, gsum = RA._stats(x, xi, RA._gray(xi))
    got = K.layer_stats(x.to(DEVICE))
    assert got is not None
    for name, a, ref in zip(("lo", "hi", "hist", "grey sum"), got, (lo, hi, hist, gsum), strict=True):
        assert torch.equal(a.cpu().to(torch.int64), ref.to(torch.int64)), name


def test_the_statistics_span_several_programs():
    """An image larger than one program's block: the atomics add the blocks up, the last one partial."""
    h, w = 61, 53
    assert h * w > 2 * K.STATS_BLOCK and (h * w) % K.STATS_BLOCK
    x = _images(3, 3, h, w, seed=1)
    xi = x.to(torch.int64)
    ref = RA._stats(x, xi, RA._gray(xi))
    got = K.layer_stats(x.to(DEVICE))
    assert all(torch.equal(a.cpu().to(torch.int64), r.to(torch.int64)) for a, r in zip(got, ref, strict=True))
    assert int(got[2].sum()) == 3 * 3 * h * w  # every pixel counted once, none of the dead lanes


def test_the_table_kernel_knows_the_op_indices():
    assert all(RA.OPS[i] == name for name, i in K.TABLE_OPS.items())
    assert set(K.TABLE_OPS) == set(RA._LUT_OPS)


@pytest.mark.parametrize("c,h,w", [(3, 23, 31), (1, 17, 9), (3, 2, 5)])
def test_the_tables_equal_the_torch_form(c, h, w):
    """Every op (the point ops' tables, the identity for the others) at several magnitudes and both signs,
    from the statistics of random, flat, saturated and few-level images."""
    op, mag, neg = _every_op()
    b = len(op)
    x = _images(b, c, h, w, seed=7 * h)
    x[5] = 0  # more flat images: AutoContrast's hi == lo and Equalize's zero step on other ops' rows too
    x[9, :, ::2] = 200
    xi = x.to(torch.int64)
    stats = RA._stats(x, xi, RA._gray(xi))
    want = RA._luts(op, mag, neg, *stats, h * w).to(torch.uint8)
    dev = [t.to(DEVICE) for t in (op, mag, RA._factor(mag / 10.0, neg))]
    kstats = [t.to(DEVICE) for t in K.layer_stats(x.to(DEVICE))]
    got = K.layer_tables(*dev, *kstats, h * w)
    assert got is not None and got.dtype == torch.uint8
    got = got.cpu()
    for i in range(b):
        name = RA.OPS[int(op[i])] if op[i] >= 0 else "none"
        assert torch.equal(got[i], want[i]), f"{name} m={float(mag[i])} neg={bool(neg[i])}"


@pytest.mark.parametrize("c,h,w", [(3, 23, 31), (1, 17, 9), (3, 8, 8), (3, 19, 29), (3, 2, 7)])
def test_a_layer_equals_the_torch_form(c, h, w):
    op, mag, neg = _every_op()
    b = len(op)
    x = _images(b, c, h, w, seed=c * 100 + h)
    want = RA._layer_torch(x, op, mag, neg, FILL[:c])
    xd, od, md, nd, fd = (t.to(DEVICE) for t in (x, op, mag, neg, FILL[:c]))
    params = RA._kernel_params(od[:, None], md[:, None], nd[:, None], c, h, w)  # one layer
    got = RA._layer_kernels(xd, [p[0] for p in params], fd)
    assert got is not None and got.dtype == torch.uint8 and got.device.type == DEVICE.type
    got = got.cpu()
    for i in range(b):  # per image, so that a failure names the op
        name = RA.OPS[int(op[i])] if op[i] >= 0 else "none"
        assert torch.equal(got[i], want[i]), f"{name} m={float(mag[i])} neg={bool(neg[i])}"
    assert torch.equal(got[op < 0], x[op < 0])  # a skipped layer: untouched
    moved = got[(op == RA.OPS.index("Rotate")) & (mag == 9.0)]
    assert (moved == FILL[:c].to(torch.uint8).view(1, c, 1, 1)).any()  # some pixels fall outside: the fill


def test_far_outside_points_and_a_block_boundary():
    """Coefficients that send every pixel far outside (no int32 overflow: all fill), and an image larger
    than one program's block (several programs per image, a partial last block)."""
    h, w = 37, 41
    assert h * w > K.BLOCK and (h * w) % K.BLOCK
    x = _images(2, 3, h, w, seed=3)
    coef = torch.tensor([[1.0, 0, 1e12, 0, 1, 0], [1.0, 0.3, -3.7, 0.1, 1, 2.2]], dtype=torch.float64)
    kind = torch.full((2,), K.KIND_GEOMETRIC, dtype=torch.int32)
    lut = torch.zeros(2, 3, 256, dtype=torch.uint8)
    got = K.apply_layer(*(t.to(DEVICE) for t in (x, kind, torch.ones(2), coef, lut, FILL))).cpu()
    assert torch.equal(got[0], FILL.to(torch.uint8).view(3, 1, 1).expand(3, h, w))
    assert torch.equal(got[1], RA._affine(x[1:], coef[1:], FILL)[0].to(torch.uint8))


def test_rand_augment_takes_the_kernels_and_matches_the_torch_form(monkeypatch):
    """Two layers end to end: the kernel path (forced here, as on CUDA) and the torch form agree."""
    g = torch.Generator().manual_seed(5)
    b = 24
    x = _images(b, 3, 29, 33, seed=9)
    op = torch.randint(-1, len(RA.OPS), (b, 2), generator=g)
    mag = torch.rand(b, 2, generator=g, dtype=torch.float64) * 10
    neg = torch.rand(b, 2, generator=g) > 0.5
    want = RA.rand_augment(x, op, mag, neg, FILL)
    calls = []
    real = RA._layer_kernels
    monkeypatch.setattr(RA, "_kernels_here", lambda t: True)
    monkeypatch.setattr(RA, "_layer_kernels", lambda *a: calls.append(1) or real(*a))
    got = RA.rand_augment(*(t.to(DEVICE) for t in (x, op, mag, neg, FILL)))
    assert calls == [1, 1] and torch.equal(got.cpu(), want)


def test_a_kernel_failure_is_one_line_then_the_torch_form(monkeypatch, capsys):
    """A build or launch error on the user's GPU: one stderr line, then ``None`` from every call (the
    caller's torch form runs)."""

    class Broken:
        def __getitem__(self, grid):
            raise RuntimeError("no kernel image for this GPU\nmore detail")

    from fastkd.kernels import _utils

    monkeypatch.setattr(_utils, "INTERPRET", False)
    monkeypatch.setattr(K, "_GUARD", _utils.TorchFallback("RandAugment's Triton kernels"))
    assert K._launch(Broken(), (1, 1), ()) is False
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(no kernel image for this GPU); using the torch form" in err
    x = torch.zeros(1, 3, 4, 4, dtype=torch.uint8, device=DEVICE)
    assert K.layer_stats(x) is None and K._usable(x) is False
    assert capsys.readouterr().err == ""  # reported once


def test_color_on_a_grey_image_is_a_copy():
    """The caller sends a grey image's Color the identity table; sent as Color anyway, it stays in bounds
    (one channel read) and leaves the image as it is (a grey image is its own degenerate)."""
    x = _images(3, 1, 9, 11, seed=4)
    kind = torch.full((3,), K.KIND_COLOR, dtype=torch.int32)
    f = torch.tensor([0.1, 1.0, 1.9])
    lut = torch.zeros(3, 1, 256, dtype=torch.uint8)
    got = K.apply_layer(*(t.to(DEVICE) for t in (x, kind, f, torch.zeros(3, 6, dtype=torch.float64), lut,
                                                  FILL[:1])))
    assert torch.equal(got.cpu(), x)
