"""``fastkd.kernels.affine``: RandAugment's geometric ops in one Triton pass equal the torch reference
(``fastkd.data.randaug._affine``, itself bit-identical to PIL: tests/data/test_randaug.py) bit for bit,
under the interpreter on CPU and compiled on a GPU (``DEVICE``): every geometric op at several
magnitudes and both signs, RGB and grayscale, odd sizes, the images that drew another op copied
through, the fill outside."""

from __future__ import annotations

import pytest
import torch
from kd_testutil import DEVICE

from fastkd.data.randaug import OPS, _affine, _geometry
from fastkd.kernels import affine as A

GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


@pytest.mark.parametrize("c,h,w", [(3, 23, 31), (1, 17, 9), (3, 8, 8)])
def test_kernel_equals_the_torch_reference(c, h, w):
    g = torch.Generator().manual_seed(c * 100 + h)
    # every geometric op × magnitudes × signs, plus images that drew a non-geometric op or none
    rows = [(OPS.index(n), m, s) for n in GEOMETRIC for m in (0.0, 2.5, 9.0, 10.0) for s in (False, True)]
    rows += [(OPS.index("Invert"), 9.0, False), (-1, 9.0, False)]
    op = torch.tensor([r[0] for r in rows])
    mag = torch.tensor([r[1] for r in rows], dtype=torch.float64)
    neg = torch.tensor([r[2] for r in rows])
    b = len(rows)
    x = torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8, generator=g)
    fill = torch.tensor([124.0, 116.0, 104.0][:c])
    coef = _geometry(op, mag, neg, h, w)
    sel = sum((op == OPS.index(n)) for n in GEOMETRIC).bool()
    got = A.affine_resample(x.to(DEVICE), coef.to(DEVICE), sel.to(DEVICE), fill.to(DEVICE))
    want = torch.where(sel.view(b, 1, 1, 1), _affine(x, coef, fill), x.to(torch.float32)).to(torch.uint8)
    assert got is not None and got.dtype == torch.uint8 and got.device.type == DEVICE.type
    got = got.cpu()
    assert torch.equal(got, want)
    assert torch.equal(got[~sel], x[~sel])  # the others: copied through, untouched
    moved = got[sel][1:]  # (row 0 is Rotate at magnitude 0: the identity)
    assert (moved == fill.to(torch.uint8).view(1, c, 1, 1)).any()  # some pixels fall outside: the fill


def test_far_outside_points_and_a_block_boundary():
    """Coefficients that send every pixel far outside (no int32 overflow: all fill), and an image larger
    than one program's block (H·W > BLOCK: several programs per image, a partial last block)."""
    x = torch.randint(0, 256, (2, 3, 37, 41), dtype=torch.uint8)
    coef = torch.tensor([[1.0, 0, 1e12, 0, 1, 0], [1.0, 0.3, -3.7, 0.1, 1, 2.2]], dtype=torch.float64)
    fill = torch.tensor([1.0, 2.0, 3.0])
    got = A.affine_resample(x.to(DEVICE), coef.to(DEVICE), torch.tensor([True, True], device=DEVICE),
                            fill.to(DEVICE)).cpu()
    assert torch.equal(got[0], fill.to(torch.uint8).view(3, 1, 1).expand(3, 37, 41))
    assert torch.equal(got[1], _affine(x[1:], coef[1:], fill)[0].to(torch.uint8))
    assert 37 * 41 > A.BLOCK
