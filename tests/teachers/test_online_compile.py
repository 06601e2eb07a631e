"""Under --compile the online teacher's tap forward is compiled too (issue 12, item 3): no grad, eval mode,
the same signals as the eager teacher within fp32 tolerance."""

from __future__ import annotations

import pytest
import torch

from fastkd.config import parse_args
from fastkd.data import load_data
from fastkd.models import create_model, save_model
from fastkd.teachers.online import OnlineTeacher
from fastkd.train.setup import build_trainer

VIT = "vit_tiny_patch16_224"
OV = dict(patch_size=2, depth=3, num_heads=2, mlp_ratio=2.0, class_token=True, global_pool="token")
MK = dict(num_classes=10, img_size=8, in_chans=1)


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("online")
    save_model(create_model(VIT, **MK, **OV, embed_dim=32), d / "t.safetensors")
    return str(d / "t.safetensors")


def _trainer(tmp_path, teacher_path, *flags):
    cfg = parse_args([
        "--method", "vitkd+clskd+kd", "--teacher", teacher_path, "--epochs", "1", "--batch-size", "16",
        "--train-limit", "64", "--device", "cpu", "--quiet", "--workdir", str(tmp_path / "w"),
        "--student-embed-dim", "16", "--student-depth", "3", "--student-heads", "2", *flags,
    ])
    return build_trainer(cfg, data=load_data("digits"), log=lambda *a: None)


def test_compile_wraps_the_teacher_forward_and_matches_eager(tmp_path, teacher_path):
    tr = _trainer(tmp_path, teacher_path, "--compile")
    t = tr.teacher
    assert isinstance(t, OnlineTeacher) and t.compiled
    assert t._fwd is not t.signals and hasattr(t._fwd, "_torchdynamo_orig_callable")
    from torch._dynamo.utils import counters

    orig = t.signals
    ids = next(iter(tr.sampler.batches(0)))
    x, _, _ = tr.batches(ids, 0)
    g0 = counters["stats"]["unique_graphs"]
    got = t(x, ids=ids, view=0)
    g1 = counters["stats"]["unique_graphs"]
    got2 = t(x, ids=ids, view=0)
    assert g1 > g0 and counters["stats"]["unique_graphs"] == g1  # compiled once, then reused
    with torch.no_grad():
        want = orig(x)
    assert set(got) == set(want) and len(got) > 3
    for k in want:
        assert not got[k].requires_grad and not got[k].is_inference()
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got2[k], want[k], rtol=1e-5, atol=1e-5)
    assert not t.model.training
    terms = tr.step(ids, 0)  # the student step consumes the compiled teacher's signals (and backprops)
    assert torch.isfinite(terms["loss"])


def test_eager_run_keeps_the_eager_teacher(tmp_path, teacher_path):
    tr = _trainer(tmp_path, teacher_path)
    assert not tr.teacher.compiled and tr.teacher._fwd == tr.teacher.signals
