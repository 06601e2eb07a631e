"""fastkd.models: creation, taps vs timm's own loop, dense CNN logits, layer maps, checkpoints."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from fastkd.methods.clskd import clskd_pairs, clskd_student_blocks, layer_map
from fastkd.models import (
    count_flops,
    create_model,
    default_arch,
    forward_taps,
    freeze,
    load_model,
    model_info,
    patch_logits,
    require_cls_token,
    require_dense_head,
    require_dist_head,
    require_vit,
    resolve_model,
    save_model,
)

TINY = dict(patch_size=4, embed_dim=32, depth=3, num_heads=2)


def _vit(distilled=False, **kw):
    name = "deit_tiny_distilled_patch16_224" if distilled else "vit_tiny_patch16_224"
    torch.manual_seed(0)
    return create_model(name, num_classes=5, img_size=16, in_chans=3, **{**TINY, **kw}).eval()


def _manual_blocks(model, x):
    """Reference: timm's ViT trunk written out, returning every raw block output and the final norm."""
    h = model.patch_embed(x)
    h = model._pos_embed(h)
    h = model.patch_drop(h)
    h = model.norm_pre(h)
    outs = []
    for blk in model.blocks:
        h = blk(h)
        outs.append(h)
    return outs, model.norm(h)


@pytest.mark.parametrize("distilled", [False, True])
def test_vit_block_taps_match_manual_loop(distilled):
    model = _vit(distilled)
    x = torch.randn(3, 3, 16, 16)
    taps = forward_taps(model, x, blocks=(0, 1, 2))
    ref, ref_final = _manual_blocks(model, x)
    P = 2 if distilled else 1
    assert taps.num_prefix == P and taps.grid == (4, 4)
    assert sorted(taps.blocks) == [0, 1, 2]
    for i in range(3):
        assert taps.blocks[i].shape == (3, P + 16, 32)
        torch.testing.assert_close(taps.blocks[i], ref[i], rtol=0, atol=0)
    torch.testing.assert_close(taps.tokens, ref_final, rtol=0, atol=0)
    torch.testing.assert_close(taps.tokens, model.forward_features(x), rtol=0, atol=0)


def test_vit_logits_equal_model_forward():
    model = _vit()
    x = torch.randn(2, 3, 16, 16)
    taps = forward_taps(model, x, blocks=(1,))
    assert taps.dist_logits is None and taps.dense_logits is None
    torch.testing.assert_close(taps.logits, model(x), rtol=0, atol=0)


def test_distilled_heads_are_separate_and_not_averaged():
    model = _vit(distilled=True)
    x = torch.randn(2, 3, 16, 16)
    taps = forward_taps(model, x)
    tok = model.forward_features(x)
    torch.testing.assert_close(taps.logits, model.head(tok[:, 0]), rtol=0, atol=0)
    torch.testing.assert_close(taps.dist_logits, model.head_dist(tok[:, 1]), rtol=0, atol=0)
    assert not torch.allclose(taps.logits, taps.dist_logits)
    # timm's eval forward averages the two heads; we return them apart
    torch.testing.assert_close((taps.logits + taps.dist_logits) / 2, model(x))


def test_negative_and_duplicate_indices_and_empty_blocks():
    model = _vit()
    x = torch.randn(2, 3, 16, 16)
    ref, _ = _manual_blocks(model, x)
    taps = forward_taps(model, x, blocks=(-1, 2, 0))
    assert sorted(taps.blocks) == [0, 2]  # -1 is stored under its absolute index 2, once
    torch.testing.assert_close(taps.blocks[2], ref[2], rtol=0, atol=0)
    empty = forward_taps(model, x)
    assert empty.blocks == {}
    torch.testing.assert_close(empty.tokens, taps.tokens, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [3, -4, 100])
def test_out_of_range_block_index(bad):
    model = _vit()
    with pytest.raises(ValueError, match=rf"block index {bad} is out of range .* depth 3"):
        forward_taps(model, torch.randn(1, 3, 16, 16), blocks=(0, bad))


def test_bad_inputs_to_taps():
    model = _vit()
    with pytest.raises(ValueError, match="built for 16x16 images"):
        forward_taps(model, torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="3-channel"):
        forward_taps(model, torch.randn(1, 1, 16, 16))
    cnn = create_model("resnet18", num_classes=3, img_size=32, in_chans=3)
    with pytest.raises(ValueError, match="block taps needs a ViT"):
        forward_taps(cnn, torch.randn(2, 3, 32, 32), blocks=(0,))


def test_patch_logits_and_vit_dense_logits():
    x = torch.randn(2, 3, 16, 16)
    dist = _vit(distilled=True)
    taps = forward_taps(dist, x, dense=True)
    pl = patch_logits(dist, taps.tokens, taps.num_prefix)
    assert pl.shape == (2, 16, 5)
    torch.testing.assert_close(pl, dist.head_dist(taps.tokens[:, 2:]), rtol=0, atol=0)
    assert not torch.allclose(pl, dist.head(taps.tokens[:, 2:]))
    # dense_logits is the same thing on the row-major grid
    torch.testing.assert_close(taps.dense_logits[:, :, 1, 2], pl[:, 1 * 4 + 2], rtol=0, atol=0)
    plain = _vit()
    t2 = forward_taps(plain, x)
    torch.testing.assert_close(
        patch_logits(plain, t2.tokens, 1), plain.head(t2.tokens[:, 1:]), rtol=0, atol=0
    )


@pytest.mark.parametrize("name", ["resnet18", "regnety_002"])
def test_cnn_dense_logits_average_to_logits(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, img_size=64, in_chans=3).double().eval()
    require_dense_head(model)
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    taps = forward_taps(model, x, dense=True)
    assert taps.grid == (2, 3) and taps.dense_logits.shape == (2, 7, 2, 3)
    assert taps.tokens is None and taps.blocks == {} and taps.num_prefix == 0
    torch.testing.assert_close(taps.logits, model(x), rtol=0, atol=0)
    torch.testing.assert_close(taps.dense_logits.mean((2, 3)), taps.logits, rtol=1e-12, atol=1e-12)
    # the locations really differ (the test would be vacuous on a 1x1 map)
    assert (taps.dense_logits[..., 0, 0] - taps.dense_logits[..., 1, 2]).abs().max() > 1e-3
    assert forward_taps(model, x).dense_logits is None


def test_convnext_dense_logits_norm_per_location():
    torch.manual_seed(0)
    model = create_model("convnext_atto", num_classes=4, img_size=64, in_chans=3).double().eval()
    require_dense_head(model)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    taps = forward_taps(model, x, dense=True)
    f = model.forward_features(x)
    ref = model.head.fc(model.head.norm(f).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(taps.dense_logits, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(taps.logits, model(x), rtol=0, atol=0)
    # pooling then LayerNorm is not linear: the documented mismatch
    assert not torch.allclose(taps.dense_logits.mean((2, 3)), taps.logits)


def test_nonlinear_or_nonmean_heads_are_refused():
    mlp = create_model("convnext_atto", num_classes=4, img_size=32, in_chans=3, head_hidden_size=16).eval()
    with pytest.raises(ValueError, match="convnext_atto.*hidden MLP"):
        forward_taps(mlp, torch.randn(2, 3, 32, 32), dense=True)
    with pytest.raises(ValueError, match="hidden MLP"):
        require_dense_head(mlp)
    forward_taps(mlp, torch.randn(2, 3, 32, 32))  # logits alone are fine
    maxpool = create_model("resnet18", num_classes=4, img_size=32, in_chans=3, global_pool="max").eval()
    with pytest.raises(ValueError, match="resnet18 pools with 'max'.*global_pool='avg'"):
        forward_taps(maxpool, torch.randn(2, 3, 32, 32), dense=True)


def test_model_info_and_requirements():
    info = model_info(_vit(distilled=True))
    assert (info.kind, info.depth, info.embed_dim, info.num_prefix, info.grid) == ("vit", 3, 32, 2, (4, 4))
    assert info.has_dist_head and info.has_cls_token and info.num_classes == 5
    cnn = create_model("resnet18", num_classes=3, img_size=32, in_chans=1)
    ci = model_info(cnn)
    assert (ci.kind, ci.depth, ci.num_features, ci.num_prefix, ci.grid) == ("cnn", 4, 512, 0, None)
    with pytest.raises(ValueError, match="vitkd student needs a ViT.*resnet18 is a cnn"):
        require_vit(cnn, "vitkd student")
    no_cls = _vit(class_token=False, global_pool="avg")
    assert model_info(no_cls).num_prefix == 0
    with pytest.raises(ValueError, match="clskd needs a CLS token.*class_token=True"):
        require_cls_token(no_cls, "clskd")
    with pytest.raises(ValueError, match="deit needs a distillation token"):
        require_dist_head(_vit(), "deit")
    assert require_cls_token(_vit()).num_prefix == 1


def test_layer_map():
    assert [layer_map(i, 12, 6) for i in range(12)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert [layer_map(i, 6, 12) for i in range(6)] == [1, 3, 5, 7, 9, 11]
    assert [layer_map(i, 12, 12) for i in range(12)] == list(range(12))
    assert [layer_map(i, 4, 6) for i in range(4)] == [1, 2, 4, 5]  # 1.5 -> 2, 4.5 -> 5 (half up)
    with pytest.raises(ValueError, match="out of range for student depth 12"):
        layer_map(12, 12, 6)
    with pytest.raises(ValueError, match="out of range"):
        layer_map(-1, 12, 6)


def test_clskd_pairs():
    assert clskd_student_blocks(12) == [0, 1, 2, 3, 8, 9, 10, 11]
    assert clskd_pairs(12, 12) == [(i, i) for i in (0, 1, 2, 3, 8, 9, 10, 11)]
    assert clskd_pairs(12, 6) == [(0, 0), (1, 0), (2, 1), (3, 1), (8, 4), (9, 4), (10, 5), (11, 5)]
    assert clskd_student_blocks(6) == [0, 1, 2, 3, 4, 5]
    assert clskd_student_blocks(2) == [0, 1]
    assert clskd_pairs(4, 6, student_blocks=[-1, 0, 3]) == [(0, 1), (3, 5)]
    with pytest.raises(ValueError, match="clskd student block 12 is out of range for student depth 12"):
        clskd_pairs(12, 6, student_blocks=[0, 12])


def test_save_load_round_trip(tmp_path):
    model = _vit(distilled=True)
    path = tmp_path / "sub" / "student.safetensors"
    save_model(model, path, {"top1": 0.5, "method": "deit"})
    assert sorted(os.listdir(path.parent)) == ["student.safetensors"]  # no temp file left behind
    loaded, meta = load_model(path)
    assert meta["top1"] == 0.5 and meta["method"] == "deit"
    assert meta["name"] == "deit_tiny_distilled_patch16_224" and meta["overrides"] == TINY
    assert (meta["num_classes"], meta["img_size"], meta["in_chans"]) == (5, 16, 3)
    loaded.eval()
    x = torch.randn(2, 3, 16, 16)
    a, b = forward_taps(model, x, (1,)), forward_taps(loaded, x, (1,))
    assert torch.equal(a.logits, b.logits) and torch.equal(a.dist_logits, b.dist_logits)
    assert torch.equal(a.blocks[1], b.blocks[1])
    # BN buffers round-trip too
    cnn = create_model("resnet18", num_classes=3, img_size=32, in_chans=1).eval()
    cnn.bn1.running_mean.uniform_()
    save_model(cnn, tmp_path / "t.safetensors", {})
    cnn2, _ = load_model(tmp_path / "t.safetensors")
    xc = torch.randn(2, 1, 32, 32)
    assert torch.equal(cnn(xc), cnn2.eval()(xc))


def test_checkpoint_errors(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="no fastkd metadata"):
        load_model(plain)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable .safetensors"):
        load_model(junk)
    with pytest.raises(ValueError, match="must end with .safetensors"):
        save_model(_vit(), tmp_path / "x.pt", {})
    with pytest.raises(ValueError, match="JSON"):
        save_model(_vit(), tmp_path / "y.safetensors", {"bad": object()})
    assert not (tmp_path / "y.safetensors").exists()
    # metadata record is JSON under the "fastkd" key
    save_model(_vit(), tmp_path / "ok.safetensors", {"note": "x"})
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ok.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["fastkd"])["note"] == "x"


def test_resolve_model(tmp_path):
    path = tmp_path / "teacher.safetensors"
    save_model(_vit(), path, {})
    m = resolve_model(str(path), num_classes=5, img_size=16, in_chans=3)
    assert m.fastkd_meta["name"] == "vit_tiny_patch16_224"
    assert resolve_model(str(path), num_classes=5, img_size=16, in_chans=3, depth=3) is not None
    with pytest.raises(ValueError, match=r"does not fit the data: num_classes=5 \(data: 10\)"):
        resolve_model(str(path), num_classes=10, img_size=16, in_chans=3)
    with pytest.raises(ValueError, match="was built with overrides"):
        resolve_model(str(path), num_classes=5, img_size=16, in_chans=3, depth=6)
    with pytest.raises(FileNotFoundError):
        resolve_model(str(tmp_path / "nope.safetensors"), num_classes=5, img_size=16, in_chans=3)
    built = resolve_model("resnet18", num_classes=4, img_size=32, in_chans=1)
    assert model_info(built).kind == "cnn" and built.fc.out_features == 4


def test_create_model_names_and_overrides():
    msg = "unknown model 'vit_tiny_patch16_22'.*did you mean vit_tiny_patch16_224"
    with pytest.raises(ValueError, match=msg):
        create_model("vit_tiny_patch16_22", num_classes=3, img_size=32, in_chans=3)
    with pytest.raises(ValueError, match="'resnet18' does not accept the override embed_dim=16"):
        create_model("resnet18", num_classes=3, img_size=32, in_chans=3, embed_dim=16)
    with pytest.raises(ValueError, match="never downloads"):
        create_model("resnet18", num_classes=3, img_size=32, in_chans=3, pretrained=True)
    with pytest.raises(ValueError, match="not a multiple of .* patch size 16; pass patch_size=8 .*"
                                         "--student-patch-size .*--img-size that is a multiple of 16"):
        create_model("vit_tiny_patch16_224", num_classes=3, img_size=40, in_chans=3)
    cnn = create_model("resnet18", num_classes=3, img_size=32, in_chans=1)  # img_size dropped for CNNs
    assert cnn.conv1.in_channels == 1 and "img_size" not in cnn.fastkd_arch["overrides"]


@pytest.mark.parametrize(
    "img, patch, grid", [(8, 2, (4, 4)), (28, 4, (7, 7)), (32, 4, (8, 8)), (224, 16, (14, 14))]
)
def test_default_arch(img, patch, grid):
    name, ov = default_arch("teacher", img, 1, 10)
    assert name == "vit_tiny_patch16_224" and ov["patch_size"] == patch
    assert (ov["embed_dim"], ov["depth"], ov["num_heads"], ov["mlp_ratio"]) == (128, 6, 4, 4.0)
    assert ov["class_token"] is True and ov["global_pool"] == "token"
    _, sv = default_arch("student", img, 1, 10)
    assert (sv["embed_dim"], sv["depth"], sv["num_heads"], sv["patch_size"]) == (64, 4, 2, patch)
    if img <= 32:
        s = create_model("fastkd_student", num_classes=10, img_size=img, in_chans=1)
        t = create_model("fastkd_teacher", num_classes=10, img_size=img, in_chans=1)
        assert model_info(s).grid == grid and model_info(t).depth == 6
        ratio = count_flops(t, img, 1) / count_flops(s, img, 1)
        assert 3.5 <= ratio <= 6.0, ratio


def test_default_arch_errors():
    with pytest.raises(ValueError, match="role must be"):
        default_arch("teacher2", 8, 1, 10)
    with pytest.raises(ValueError, match="resize the images"):
        default_arch("student", 31, 1, 10)


def test_count_flops_matches_vit_formula():
    model = create_model(
        "vit_tiny_patch16_224", num_classes=10, img_size=32, in_chans=3, patch_size=4, embed_dim=64, depth=4,
        num_heads=2,
    )
    model.train()
    L, D, Np, P, C, p, cin = 4, 64, 64, 1, 10, 4, 3
    N = Np + P
    expect = L * (24 * N * D * D + 4 * N * N * D) + 2 * Np * D * (p * p * cin) + 2 * D * C
    assert count_flops(model, 32, 3) == expect
    assert model.training  # mode restored


def test_freeze():
    model = freeze(_vit().train())
    assert not model.training and all(not m.training for m in model.modules())
    assert all(not p.requires_grad for p in model.parameters())
    out = forward_taps(model, torch.randn(2, 3, 16, 16), blocks=(0,))
    assert not out.logits.requires_grad and not out.blocks[0].requires_grad


def test_forward_taps_compiles_fullgraph():
    model = _vit(distilled=True)
    x = torch.randn(2, 3, 16, 16)
    fn = torch.compile(lambda x: forward_taps(model, x, (0, -1), dense=True), backend="eager", fullgraph=True)
    got, ref = fn(x), forward_taps(model, x, (0, -1), dense=True)
    for a, b in [(got.logits, ref.logits), (got.dist_logits, ref.dist_logits), (got.blocks[2], ref.blocks[2]),
                 (got.dense_logits, ref.dense_logits)]:
        torch.testing.assert_close(a, b, rtol=0, atol=0)
