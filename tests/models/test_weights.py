"""Pretrained weights offline: files (.safetensors / .pth, wrapped), hf-hub: from a local HF cache,
local-dir:, position-embedding resampling, head mismatch / re-init, channel adaptation, bad inputs.

The "downloaded" checkpoint is made with timm itself: a tiny ViT (vit_tiny_patch16_224 with depth 2,
width 64, 2 heads) with a 1000-class head at 224 px, saved the ways people receive timm weights.
"""

import json
import os
import socket

import pytest
import timm
import torch
from safetensors.torch import save_file

from fastkd.models.weights import (
    HeadMismatchError,
    WeightsError,
    WeightsNotFoundError,
    apply_weights,
    build_pretrained,
    file_sha256,
    load_state_dict,
    preprocessing,
    reset_head,
    resolve_weights,
)

ARCH = "vit_tiny_patch16_224"
TINY = dict(depth=2, embed_dim=64, num_heads=2)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    src = timm.create_model(ARCH, pretrained=False, num_classes=1000, **TINY).eval()
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    d = tmp_path_factory.mktemp("ckpt")
    save_file(sd, str(d / "model.safetensors"))
    torch.save(sd, d / "pytorch_model.bin")
    torch.save({"state_dict_ema": {f"module.{k}": v for k, v in sd.items()}, "epoch": 300}, d / "ema.pth")
    return d, sd


@pytest.fixture()
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _config():
    return {
        "architecture": ARCH,
        "num_classes": 1000,
        "num_features": 64,
        "model_args": dict(TINY),
        "pretrained_cfg": {
            "tag": "test",
            "input_size": [3, 224, 224],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": 0.9,
            "mean": list(MEAN),
            "std": list(STD),
            "num_classes": 1000,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }


def _same(model, sd, skip=()):
    msd = model.state_dict()
    return all(torch.equal(msd[k], v) for k, v in sd.items() if not k.startswith(skip))


# ----------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------


def test_load_state_dict_formats_and_wrappers(ckpt):
    d, sd = ckpt
    lines = []
    for name in ("model.safetensors", "pytorch_model.bin", "ema.pth"):
        got = load_state_dict(d / name, log=lines.append)
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd), name
    assert len(lines) == 1 and "state_dict_ema" in lines[0]  # the EMA wrapper is named, once


def test_load_state_dict_bad_inputs_one_line(ckpt, tmp_path):
    import argparse

    torch.save({"model": argparse.Namespace(lr=0.1)}, tmp_path / "pickled.pth")  # not weights_only-safe
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    cases = [
        (tmp_path / "missing.pth", WeightsNotFoundError, "does not exist"),
        (tmp_path / "pickled.pth", WeightsError, "never unpickles"),
        (tmp_path / "junk.safetensors", WeightsError, "not a readable .safetensors"),
        (tmp_path / "list.pth", WeightsError, "not a state dict"),
    ]
    for path, err, text in cases:
        with pytest.raises(err, match=text) as ei:
            load_state_dict(path, log=None)
        assert "\n" not in str(ei.value)
    assert issubclass(WeightsNotFoundError, FileNotFoundError) and issubclass(WeightsError, ValueError)


def test_file_sha256(ckpt):
    import hashlib

    p = ckpt[0] / "model.safetensors"
    assert file_sha256(p) == hashlib.sha256(p.read_bytes()).hexdigest()
    assert file_sha256(p, chunk=1000) == file_sha256(p)


# ----------------------------------------------------------------------------------------------------
# name + file
# ----------------------------------------------------------------------------------------------------


def test_build_same_resolution_loads_every_tensor(ckpt, no_network):
    d, sd = ckpt
    for f in ("model.safetensors", "ema.pth"):
        m = build_pretrained(
            ARCH, weights=d / f, num_classes=1000, img_size=224, in_chans=3, log=None, **TINY
        )
        assert _same(m, sd) and m.fastkd_weights["report"]["pos_embed_resampled"] is None
        assert m.fastkd_arch["name"] == ARCH  # built through fastkd.models.create_model (save_model works)


def test_other_resolution_resamples_pos_embed_with_one_line(ckpt):
    d, sd = ckpt
    lines = []
    m = build_pretrained(
        ARCH,
        weights=d / "model.safetensors",
        num_classes=1000,
        img_size=32,
        in_chans=3,
        log=lines.append,
        **TINY,
    )
    assert m.pos_embed.shape == (1, 1 + 2 * 2, 64)
    assert _same(m, {k: v for k, v in sd.items() if k != "pos_embed"})
    assert torch.equal(m.pos_embed[:, :1], sd["pos_embed"][:, :1])  # the CLS position is kept
    assert len(lines) == 1 and "197 -> 5" in lines[0] and "checkpoint filter" in lines[0]
    out = m.eval()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()


def test_head_mismatch_is_one_line_naming_finetune(ckpt):
    d, _ = ckpt
    with pytest.raises(HeadMismatchError) as ei:
        build_pretrained(
            ARCH, weights=d / "model.safetensors", num_classes=10, img_size=32, in_chans=3, log=None, **TINY
        )
    msg = str(ei.value)
    assert (
        "\n" not in msg and "1000-class head" in msg and "10 classes" in msg and "--teacher-finetune" in msg
    )


def test_reinit_head_for_finetune_is_seeded_and_keeps_the_body(ckpt):
    d, sd = ckpt
    lines = []
    state = torch.random.get_rng_state()
    kw = dict(
        weights=d / "model.safetensors", num_classes=10, img_size=32, in_chans=3, reinit_head=True, **TINY
    )
    a = build_pretrained(ARCH, seed=5, log=lines.append, **kw)
    b = build_pretrained(ARCH, seed=5, log=None, **kw)
    c = build_pretrained(ARCH, seed=6, log=None, **kw)
    assert a.head.weight.shape == (10, 64) and torch.equal(a.head.weight, b.head.weight)
    assert not torch.equal(a.head.weight, c.head.weight) and torch.all(a.head.bias == 0)
    assert 0.005 < float(a.head.weight.detach().std()) < 0.03  # trunc-normal(0.02), not a default Linear init
    assert _same(a, sd, skip=("head.", "pos_embed"))
    assert a.fastkd_weights["report"]["head"] == "reinitialized"
    assert any("new 10-class head" in s for s in lines)
    # a checkpoint without any head is a mismatch too
    headless = {k: v for k, v in sd.items() if not k.startswith("head.")}
    m = timm.create_model(ARCH, num_classes=1000, **TINY)
    with pytest.raises(HeadMismatchError, match="no classifier head"):
        apply_weights(m, headless, log=None)
    torch.random.set_rng_state(state)


def test_reset_head_changes_size_and_uses_its_own_generator():
    m = timm.create_model(ARCH, num_classes=1000, **TINY)
    before = torch.random.get_rng_state()
    reset_head(m, 7, seed=1)
    assert torch.equal(before, torch.random.get_rng_state())
    assert m.head.weight.shape == (7, 64) and m.num_classes == 7


def test_wrong_architecture_is_one_line(ckpt):
    d, _ = ckpt
    for over, text in (
        (dict(depth=3, embed_dim=64, num_heads=2), "missing"),
        (dict(depth=2, embed_dim=32, num_heads=2), "do not fit"),
    ):
        with pytest.raises(WeightsError, match=text) as ei:
            build_pretrained(
                ARCH,
                weights=d / "model.safetensors",
                num_classes=1000,
                img_size=224,
                in_chans=3,
                log=None,
                **over,
            )
        assert "\n" not in str(ei.value) and "architecture" in str(ei.value)


def test_grayscale_data_adapts_input_conv_and_preprocessing(ckpt):
    d, sd = ckpt
    lines = []
    m = build_pretrained(
        ARCH,
        weights=d / "model.safetensors",
        num_classes=1000,
        img_size=32,
        in_chans=1,
        log=lines.append,
        **TINY,
    )
    assert torch.allclose(m.patch_embed.proj.weight[:, 0], sd["patch_embed.proj.weight"].sum(1))
    assert any("1 channel" in s for s in lines)
    p = preprocessing(m, in_chans=1)
    assert len(p["mean"]) == 1 and len(p["std"]) == 1


def test_name_without_weights_and_missing_file():
    with pytest.raises(WeightsError, match="--teacher-weights FILE"):
        resolve_weights(ARCH)
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        resolve_weights(ARCH, "/nonexistent/model.safetensors")


# ----------------------------------------------------------------------------------------------------
# hf-hub: and local-dir:
# ----------------------------------------------------------------------------------------------------


def _hf_cache(root, ckpt_dir, repo="timm/tiny_vit_test", rev="0123456789abcdef0123456789abcdef01234567"):
    """The layout huggingface_hub writes: models--owner--name/{refs/main, snapshots/<rev>/...}."""
    base = root / "hub" / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / rev
    snap.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(rev)
    (snap / "model.safetensors").write_bytes((ckpt_dir / "model.safetensors").read_bytes())
    (snap / "config.json").write_text(json.dumps(_config()))
    return snap


def test_hf_hub_from_local_cache_offline(ckpt, tmp_path, monkeypatch, no_network):
    d, sd = ckpt
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    snap = _hf_cache(tmp_path / "hf", d)
    r = resolve_weights("hf-hub:timm/tiny_vit_test")
    assert r.source == "hf-hub" and r.arch == ARCH and r.model_args == TINY
    assert os.path.samefile(r.file, snap / "model.safetensors")
    m = build_pretrained("hf-hub:timm/tiny_vit_test", num_classes=1000, img_size=32, in_chans=3, log=None)
    assert (m.embed_dim, len(m.blocks)) == (64, 2)  # model_args from config.json
    assert _same(m, {k: v for k, v in sd.items() if k != "pos_embed"})
    p = preprocessing(m)
    assert p["mean"] == MEAN and p["std"] == STD and p["input_size"] == (3, 224, 224)
    assert p["interpolation"] == "bicubic" and p["crop_pct"] == 0.9
    # a revision by commit hash works too
    assert resolve_weights("hf-hub:timm/tiny_vit_test@0123456789abcdef0123456789abcdef01234567").file


def test_hf_hub_not_cached_says_where_it_looked(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(WeightsNotFoundError) as ei:
        resolve_weights("hf-hub:timm/deit_base_patch16_224.fb_in1k")
    msg = str(ei.value)
    assert "\n" not in msg and str(tmp_path / "empty") in msg
    assert "models--timm--deit_base_patch16_224.fb_in1k" in msg and "never downloads" in msg
    with pytest.raises(WeightsError, match="owner"):
        resolve_weights("hf-hub:deit_base")


def test_local_dir(ckpt, tmp_path, no_network):
    d, sd = ckpt
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes((d / "pytorch_model.bin").read_bytes())
    with pytest.raises(WeightsError, match="no config.json"):
        resolve_weights(f"local-dir:{folder}")
    (folder / "config.json").write_text(json.dumps(_config()))
    m = build_pretrained(f"local-dir:{folder}", num_classes=1000, img_size=224, in_chans=3, log=None)
    assert _same(m, sd) and m.fastkd_weights["source"] == "local-dir"
    assert preprocessing(m)["mean"] == MEAN
    with pytest.raises(WeightsNotFoundError, match="no such folder"):
        resolve_weights(f"local-dir:{tmp_path / 'nope'}")
    os.remove(folder / "pytorch_model.bin")
    with pytest.raises(WeightsNotFoundError, match="no weights file"):
        resolve_weights(f"local-dir:{folder}")


def test_plain_name_preprocessing_from_timm_default(ckpt):
    d, _ = ckpt
    m = build_pretrained(
        "deit_tiny_patch16_224",
        weights=d / "model.safetensors",
        num_classes=1000,
        img_size=224,
        in_chans=3,
        log=None,
        **TINY,
    )
    assert preprocessing(m)["mean"] == tuple(timm.data.IMAGENET_DEFAULT_MEAN)


def test_distilled_two_heads_and_cnn_head(tmp_path):
    torch.manual_seed(1)
    deit = "deit_tiny_distilled_patch16_224"
    src = timm.create_model(deit, num_classes=1000, **TINY)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "deit.safetensors"))
    with pytest.raises(HeadMismatchError):
        build_pretrained(
            deit,
            weights=tmp_path / "deit.safetensors",
            num_classes=5,
            img_size=32,
            in_chans=3,
            log=None,
            **TINY,
        )
    m = build_pretrained(
        deit,
        weights=tmp_path / "deit.safetensors",
        num_classes=5,
        img_size=32,
        in_chans=3,
        reinit_head=True,
        log=None,
        **TINY,
    )
    assert m.head.weight.shape == m.head_dist.weight.shape == (5, 64)  # both heads replaced
    assert torch.equal(m.dist_token, src.dist_token) and m.pos_embed.shape == (1, 2 + 4, 64)

    cnn = timm.create_model("resnet10t", num_classes=1000)
    torch.save({"model": cnn.state_dict()}, tmp_path / "r.pth")
    r = build_pretrained(
        "resnet10t", weights=tmp_path / "r.pth", num_classes=1000, img_size=32, in_chans=3, log=None
    )
    assert torch.equal(r.fc.weight, cnn.fc.weight)
    r = build_pretrained(
        "resnet10t",
        weights=tmp_path / "r.pth",
        num_classes=3,
        img_size=32,
        in_chans=3,
        reinit_head=True,
        log=None,
    )
    assert r.fc.weight.shape[0] == 3


def test_hf_hub_without_config_uses_the_repo_name(ckpt, tmp_path, monkeypatch):
    d, sd = ckpt
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    snap = _hf_cache(tmp_path / "hf", d, repo=f"timm/{ARCH}.augreg_in21k")
    os.remove(snap / "config.json")
    r = resolve_weights(f"hf-hub:timm/{ARCH}.augreg_in21k")
    assert r.arch == f"{ARCH}.augreg_in21k" and r.pretrained_cfg == {}
    m = build_pretrained(
        f"hf-hub:timm/{ARCH}.augreg_in21k", num_classes=1000, img_size=224, in_chans=3, log=None, **TINY
    )
    assert _same(m, sd) and preprocessing(m)["mean"] == (0.5, 0.5, 0.5)  # timm's cfg for that tag


def test_headless_model_and_custom_fix_line(ckpt):
    d, sd = ckpt
    m = timm.create_model(ARCH, num_classes=0, **TINY)  # features only: the checkpoint's head is not used
    assert apply_weights(m, sd, log=None)["head"] == "none" and _same(m, sd, skip=("head.",))
    with pytest.raises(HeadMismatchError, match="pass --student-init-head"):
        build_pretrained(
            ARCH,
            weights=d / "model.safetensors",
            num_classes=4,
            img_size=224,
            in_chans=3,
            what="--student-weights",
            head_fix="pass --student-init-head",
            log=None,
            **TINY,
        )
