"""Issue 14 (6): ``fastkd.cache`` on a full disk. The free space is checked against the cache's total before
anything is written, and a disk that fills during a shard (where a sparse mmap would die with SIGBUS) gives
one line, rc 2, and nothing partial. Also (4): the cache validates its flags before any work.
"""

from __future__ import annotations

import errno
import os
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

from fastkd.cache import __main__ as cache_cli
from fastkd.cache import build
from fastkd.models import create_model, save_model


@pytest.fixture
def args(tmp_path):
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    npz = tmp_path / "tiny.npz"
    np.savez(npz, x_train=imgs[:64], y_train=d.target[:64], x_val=imgs[64:96], y_val=d.target[64:96])
    torch.manual_seed(0)
    t = tmp_path / "t.safetensors"
    save_model(create_model("vit_tiny_patch16_224", num_classes=10, img_size=8, in_chans=1, patch_size=2,
                            embed_dim=16, depth=1, num_heads=1), t)
    return ["--data", str(npz), "--teacher", str(t), "--method", "kd", "--student-embed-dim", "16",
            "--student-depth", "1", "--student-heads", "1", "--quiet", "--workdir", str(tmp_path / "w"),
            "--views", "2", "--shard-size", "32", "--out", str(tmp_path / "c")]


def _err(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def test_not_enough_free_space_is_refused_before_writing(tmp_path, capsys, monkeypatch, args):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(build.shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 100, 100))
    assert cache_cli.main(args) == 2
    err = _err(capsys)
    assert len(err) == 1 and "not enough disk space" in err[0] and "100 B free" in err[0], err
    assert not (tmp_path / "c").exists()


def test_disk_full_during_a_shard_is_one_line_nothing_partial(tmp_path, capsys, monkeypatch, args):
    calls = {"n": 0}

    def fallocate(fd, off, n):  # the 3rd shard file finds the disk full
        calls["n"] += 1
        if calls["n"] >= 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(build.os, "posix_fallocate", fallocate)
    assert cache_cli.main(args) == 2
    err = _err(capsys)
    assert len(err) == 1 and "disk full" in err[0] and "nothing partial" in err[0], err
    out = Path(tmp_path / "c")
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
    # the shard that was finished is kept (a rerun continues), the failed one left nothing behind
    monkeypatch.undo()
    assert cache_cli.main(args) == 0, _err(capsys)


@pytest.mark.parametrize("flag, value", [("--epochs", "0"), ("--label-smoothing", "1.5")])
def test_cache_validates_flags_first(tmp_path, capsys, args, flag, value):
    assert cache_cli.main([*args, flag, value]) == 2
    err = _err(capsys)
    assert len(err) == 1 and flag in err[0], err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_an_interrupted_build_is_one_line_and_keeps_finished_shards(tmp_path, capsys, monkeypatch, signame):
    """A signal during a cache build stops it at once with one line naming how to continue (the shards
    written so far are complete: a rerun skips them); it used to end in a traceback (Ctrl-C) or silently."""
    import signal

    def build(*a, **k):
        os.kill(os.getpid(), getattr(signal, signame))  # outside any step loop: stops at once

    monkeypatch.setattr(cache_cli, "build_cache", build)
    rc = cache_cli.main(["--method", "kd", "--teacher", "fastkd_teacher", "--quiet", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 128 + getattr(signal, signame) and len(err) == 1, err
    assert err[0].startswith(f"fastkd.cache: stopped by {signame}; every file written so far is complete")
    assert "run the same command to continue (finished shards are kept)" in err[0]
