"""Teacher cache: online == cached losses, exact replay (also across 2 processes), resume after a killed
build, manifest mismatch / corruption errors, top-K record size, --max-gb, --verify, training from a cache.

Everything runs on a tiny .npz cut of digits (96 train / 40 val 8x8 images) with a 3-block teacher, so
each build takes well under a second after the imports.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fastkd.cache import __main__ as cache_cli
from fastkd.cache import build
from fastkd.cache import format as cache_format
from fastkd.cache.build import build_cache
from fastkd.cache.format import CacheError, default_topk, topk_record
from fastkd.cache.verify import verify_cache
from fastkd.config import parse_args
from fastkd.models import create_model, save_model
from fastkd.ops import reference as R
from fastkd.teachers.cached import CachedTeacher
from fastkd.train import setup
from fastkd.train.setup import build_trainer

REPO = Path(__file__).resolve().parents[1]
TEACHER = dict(patch_size=2, embed_dim=32, depth=3, num_heads=2)
FEAT = "kd+nkd+vitkd"


def _teacher(path: Path, seed: int) -> str:
    torch.manual_seed(seed)
    m = create_model("vit_tiny_patch16_224", num_classes=10, img_size=8, in_chans=1, **TEACHER)
    save_model(m, path)
    return str(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("cache")
    d = load_digits()
    imgs = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    y = d.target.astype(np.int64)
    npz = root / "tiny.npz"
    np.savez(npz, x_train=imgs[:96], y_train=y[:96], x_val=imgs[96:136], y_val=y[96:136])
    other = imgs[:136].copy()
    other[0, 0, 0] ^= 1  # one pixel differs: another dataset
    npz2 = root / "tiny2.npz"
    np.savez(npz2, x_train=other[:96], y_train=y[:96], x_val=other[96:136], y_val=y[96:136])
    env = SimpleNamespace(root=root, npz=str(npz), npz2=str(npz2), t_a=_teacher(root / "ta.safetensors", 1),
                          t_b=_teacher(root / "tb.safetensors", 2))

    def args(*extra, teacher=None, data=None):
        return [
            "--data", data or env.npz, "--teacher", teacher or env.t_a, "--student-embed-dim", "16",
            "--student-depth", "2", "--student-heads", "2", "--batch-size", "32", "--mixup", "0.8",
            "--cutmix", "1.0", "--quiet", "--workdir", str(root / "work"), *extra,
        ]

    env.args = args
    quiet = dict(log=lambda *a: None, progress=False)
    env.quiet = quiet
    # the reference caches: features + exact top-K (K = C = 10), features + dense logits, logits top-4
    env.topk = root / "topk"
    build_cache(parse_args(args("--method", FEAT)), env.topk, views=2, shard_size=32, **quiet)
    env.dense = root / "dense"
    build_cache(parse_args(args("--method", FEAT)), env.dense, views=2, logits="dense", shard_size=32,
                **quiet)
    env.top4 = root / "top4"
    build_cache(parse_args(args("--method", "kd")), env.top4, views=1, topk=4, shard_size=40, **quiet)
    return env


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def _shard_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.glob("v*.npy"))}


# ----------------------------------------------------------------------------------------- records
def test_topk_record_size(env):
    for C in (2, 10, 100, 1000, 21841, 32767):
        K = default_topk(C)
        assert K == min(C, 10)
        man = {"topk_vals": {"dtype": "float16", "shape": [K]}, "topk_ids": {"dtype": "int16", "shape": [K]},
               "topk_lse": {"dtype": "float32", "shape": []}}
        assert cache_format.record_bytes(man) == 4 * K + 4
    # 6·(2+4)+4 = 40 <= 44 bytes
    assert cache_format.ids_dtype(40000) == np.int32 and default_topk(40000) == 6
    man = json.loads((env.top4 / "manifest.json").read_text())
    assert man["record_bytes"] == 4 * 4 + 4 and man["topk"] == 4
    assert man["fields"]["topk_ids"]["dtype"] == "int16"
    # on disk: the arrays hold exactly record_bytes per sample (+ one .npy header per file)
    data_bytes = 0
    for s in man["shards"].values():
        for f, info in s["files"].items():
            arr = np.load(env.top4 / info["file"], mmap_mode="r")
            assert arr.shape[0] == s["stop"] - s["start"] and arr.dtype == np.dtype(man["fields"][f]["dtype"])
            data_bytes += arr.nbytes
    assert data_bytes == 96 * (4 * 4 + 4)
    # record semantics: values are the largest logits (descending), lse the full logsumexp
    z = torch.randn(3, 50)
    rec = topk_record(z, 5)
    assert rec["topk_vals"].dtype == torch.float16 and rec["topk_ids"].dtype == torch.int16
    torch.testing.assert_close(rec["topk_vals"].float(), z.topk(5).values.half().float())
    assert torch.equal(rec["topk_ids"].long(), z.topk(5).indices)
    torch.testing.assert_close(rec["topk_lse"], torch.logsumexp(z, 1))


# ------------------------------------------------------------------------------ online == cached
@pytest.mark.parametrize("kind", ["topk", "dense"])
def test_online_and_cached_teachers_give_the_same_losses(env, kind):
    path = env.topk if kind == "topk" else env.dense
    on = build_trainer(parse_args(env.args("--method", FEAT)), log=lambda *a: None)
    ca = build_trainer(parse_args(env.args("--method", FEAT, "--teacher-cache", str(path))),
                       log=lambda *a: None)
    assert ca.teacher.kind == "cached" and ca.teacher.views == 2
    ca.student.load_state_dict(on.student.state_dict())
    ca.loss_fn.load_state_dict(on.loss_fn.state_dict())
    assert ca.teacher_top1 == pytest.approx(on.teacher_top1)
    ids = next(iter(on.sampler.batches(1)))
    x, ys, yh = on.batch(ids, 1)
    for epoch in (1, 3):  # epoch e trains on view e mod V: the same images as the online run's epoch 1
        xc, ysc, yhc = ca.batch(ids, epoch)
        assert torch.equal(x, xc) and torch.equal(ys, ysc) and torch.equal(yh, yhc)
    t_on = on.teacher(x, ids=ids, view=1)
    t_ca = ca.teacher(x, ids=ids, view=ca.view_of(1))
    if kind == "dense":
        assert set(t_ca) == set(t_on)
        fp16 = {k: v.half().float() for k, v in t_on.items()}
    else:
        assert set(t_ca) == {"topk_vals", "topk_ids", "topk_lse", "vitkd_0", "vitkd_1", "vitkd_last"}
        assert torch.equal(t_ca["topk_ids"], t_on["logits"].topk(10).indices)  # K = C: exact ranking
        fp16 = {k: v.half().float() for k, v in t_on.items() if k != "logits"}
        fp16["topk_vals"] = t_on["logits"].topk(10).values.half().float()
        fp16["topk_lse"] = torch.logsumexp(t_on["logits"], 1)
    for k, v in fp16.items():
        assert t_ca[k].dtype == torch.float32
        torch.testing.assert_close(t_ca[k], v, rtol=2e-3, atol=2e-3 * v.abs().max().item())
    terms = []
    for tr, sig in ((on, t_on), (ca, t_ca)):
        torch.manual_seed(0)  # the same ViTKD token mask
        terms.append({k: v.detach() for k, v in tr.step_module(x, sig, ys, yh, 1.0).items()})
    assert set(terms[0]) == set(terms[1]) >= {"ce", "kd", "nkd", "vitkd_mim", "vitkd_gen", "loss"}
    for k in terms[0]:
        # fp16 storage: ~5e-4 relative per teacher value
        torch.testing.assert_close(terms[1][k], terms[0][k], rtol=3e-3, atol=1e-6)


def test_sparse_topk_cache_feeds_kd_and_nkd_without_dense_teacher(env):
    """K < C: the cached record gives the losses of the implied (remainder-uniform) teacher."""
    on = build_trainer(parse_args(env.args("--method", "kd+nkd")), log=lambda *a: None)
    argv = env.args("--method", "kd+nkd", "--teacher-cache", str(env.top4))
    ca = build_trainer(parse_args(argv), log=lambda *a: None)
    ca.student.load_state_dict(on.student.state_dict())
    ids = next(iter(on.sampler.batches(0)))
    x, ys, yh = on.batch(ids, 0)
    t_ca = ca.teacher(x, ids=ids, view=0)
    assert t_ca["topk_vals"].shape == (32, 4) and "logits" not in t_ca
    rec = topk_record(on.teacher(x)["logits"], 4)
    s = on.student(x).detach()
    for fn, extra in ((R.kd_loss_topk, ()), (R.nkd_loss_topk, (yh,))):
        want = fn(s, rec["topk_vals"].float(), rec["topk_ids"], rec["topk_lse"], *extra)
        got = fn(s, t_ca["topk_vals"], t_ca["topk_ids"], t_ca["topk_lse"], *extra)
        torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-5)
    terms = ca.step_module(x, t_ca, ys, yh, 0.0)
    want = R.kd_loss_topk(s, t_ca["topk_vals"], t_ca["topk_ids"], t_ca["topk_lse"])
    torch.testing.assert_close(terms["kd"], want)


def test_clskd_and_md_signals_cache_and_pair_mismatch_is_refused(env, tmp_path):
    """[CLS]-KD / manifold signals are cached by their names like any other; a run whose layer pairs
    tap other teacher blocks under the same names (another student depth) is refused."""
    out = tmp_path / "clskd"
    base = ("--method", "clskd+md", "--clskd-blocks", "0,1")
    build_cache(parse_args(env.args(*base)), out, views=1, shard_size=96, **env.quiet)
    fields = json.loads((out / "manifest.json").read_text())["fields"]
    assert fields["clskd_cls_1"]["shape"] == [32] and fields["clskd_map_0"]["shape"] == [16]
    assert fields["md_tok_0"]["shape"] == [17, 32]
    on = build_trainer(parse_args(env.args(*base)), log=lambda *a: None)
    ca = build_trainer(parse_args(env.args(*base, "--teacher-cache", str(out))), log=lambda *a: None)
    ca.teacher.check_signals(ca.loss_fn)
    ca.student.load_state_dict(on.student.state_dict())
    ca.loss_fn.load_state_dict(on.loss_fn.state_dict())
    ids = next(iter(on.sampler.batches(0)))
    x, ys, yh = on.batch(ids, 0)
    terms = []
    for tr in (on, ca):
        sig = tr.teacher(x, ids=ids, view=0)
        torch.manual_seed(0)  # the same manifold random-level token draw
        terms.append({k: v.detach() for k, v in tr.step_module(x, sig, ys, yh, 0.0).items()})
    assert {"clskd_cls", "clskd_map", "md"} <= set(terms[0])
    for k in terms[0]:
        torch.testing.assert_close(terms[1][k], terms[0][k], rtol=3e-3, atol=1e-6)
    # student depth 3 with --clskd-blocks 0,1: pairs (0,0),(1,1) instead of (0,1),(1,2), same names
    with pytest.raises(CacheError) as e:  # refused when the trainer is built, before any step
        build_trainer(parse_args(env.args(*base, "--student-depth", "3", "--teacher-cache", str(out))),
                log=lambda *a: None)
    assert "teacher blocks [1, 2]" in _one_line(e) and "needs blocks [0, 1]" in str(e.value)


# ------------------------------------------------------------------------------------------ replay
def test_replay_is_exact_whatever_the_batch_and_across_two_processes(env, tmp_path):
    tr = build_trainer(parse_args(env.args("--method", "ce")), log=lambda *a: None)
    ids = torch.tensor([5, 17, 3, 90, 41, 0, 64, 33])
    x, ys, _ = tr.batch(ids, 1)
    assert (ys.max(1).values < 1).any()  # mixup/cutmix partners are in play
    perm = torch.tensor([7, 2, 5, 0, 6, 1, 4, 3])
    xp, ysp, _ = tr.batch(ids[perm], 1)
    assert torch.equal(xp, x[perm]) and torch.equal(ysp, ys[perm])
    for i in (0, 3):  # a sample alone is the same as in any batch
        assert torch.equal(tr.batch(ids[i : i + 1], 1)[0], x[i : i + 1])
    # two workers, this process (--worker 0/2) and another one (python -m fastkd.cache --worker 1/2),
    # build the same bytes as the single-process build: every image (mixup partners included) replays
    out = tmp_path / "two"
    part = build_cache(parse_args(env.args("--method", FEAT)), out, views=2, shard_size=32, worker=(0, 2),
                       **env.quiet)
    assert not part["complete"] and part["built"] == ["v0000-s000000", "v0000-s000002", "v0001-s000001"]
    cmd = [sys.executable, "-m", "fastkd.cache", *env.args("--method", FEAT), "--views", "2",
           "--shard-size", "32", "--out", str(out), "--worker", "1/2"]
    p = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, timeout=240)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    man = json.loads((out / "manifest.json").read_text())
    ref = json.loads((env.topk / "manifest.json").read_text())
    assert man["complete"] and man["fields"] == ref["fields"] and man["num_shards"] == 6
    mine, theirs = _shard_bytes(out), _shard_bytes(env.topk)
    assert mine.keys() == theirs.keys()
    for name in mine:
        a, b = np.load(out / name), np.load(env.topk / name)
        assert np.array_equal(a, b), name


@pytest.mark.parametrize("threaded", [False, True], ids=["inline", "thread"])
def test_prefetch_serves_the_announced_batches_in_order(env, threaded):
    ct = CachedTeacher(env.topk, threaded=threaded)
    batches = [torch.tensor([3, 50, 7]), torch.tensor([95, 0, 33]), torch.tensor([40, 41, 42, 90])]
    want = [ct.load(b, 1) for b in batches]
    assert want[0]["vitkd_0"].dtype == torch.float16 and want[0]["topk_ids"].dtype == torch.int16
    ct.prefetch_epoch(iter(batches), 1)
    for b, w in zip(batches[:2], want, strict=False):
        got = ct(None, ids=b, view=1)
        assert set(got) == set(w)
        for k in w:
            assert torch.equal(got[k], w[k].float() if w[k].is_floating_point() else w[k].long()), k
    assert ct.prefetched == 2
    # a call out of the announced order is still served right: a direct gather, prefetch stops
    got = ct(None, ids=torch.tensor([5, 6]), view=1)
    assert torch.equal(got["topk_lse"], ct.load(torch.tensor([5, 6]), 1)["topk_lse"])
    assert ct.prefetched == 2 and ct._pf is None
    with pytest.raises(CacheError, match="view 2 out of range"):
        ct(None, ids=torch.tensor([0]), view=2)
    with pytest.raises(CacheError, match=r"ids must lie in \[0, 96\)"):
        ct(None, ids=torch.tensor([96]), view=0)
    ct.close()


# ------------------------------------------------------------------------------------------ resume
def test_resume_after_a_killed_build_keeps_finished_shards(env, tmp_path):
    out = tmp_path / "resume"
    cfg = parse_args(env.args("--method", FEAT))
    with pytest.raises(build._Interrupted):
        build_cache(cfg, out, views=2, shard_size=32, stop_after=2, **env.quiet)
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    with pytest.raises(CacheError, match="incomplete"):
        CachedTeacher(out)
    done = sorted(p.name for p in out.glob("*.done.json"))
    assert done == ["v0000-s000000.done.json", "v0000-s000001.done.json"]
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("v0000-s00000[01].*.npy")}
    assert len(kept) == 2 * 6
    # a shard killed mid-write leaves a temp file: ignored and overwritten
    (out / ".v0000-s000002.vitkd_0.npy.tmp").write_bytes(b"partial garbage")
    res = build_cache(cfg, out, views=2, shard_size=32, **env.quiet)
    assert res["complete"] and res["skipped"] == ["v0000-s000000", "v0000-s000001"]
    assert res["built"] == ["v0000-s000002", "v0001-s000000", "v0001-s000001", "v0001-s000002"]
    for name, stamp in kept.items():  # finished shards were not recomputed
        p = out / name
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp
    assert not list(out.glob(".*.tmp"))
    assert _shard_bytes(out) == _shard_bytes(env.topk)  # same as the uninterrupted build
    # complete: a rerun does nothing; another spec in the same directory is refused
    again = build_cache(cfg, out, views=2, shard_size=32, **env.quiet)
    assert again["built"] == []
    with pytest.raises(CacheError) as e:
        build_cache(cfg, out, views=3, shard_size=32, **env.quiet)
    assert "views" in _one_line(e) and "another --out" in str(e.value)


# ---------------------------------------------------------------------------------------- safety
@pytest.mark.parametrize(
    "change, expect",
    [
        (dict(extra=("--seed", "1")), "seed differs"),
        (dict(teacher="b"), "teacher differs"),
        (dict(extra=("--mixup", "0.2")), "augmentation differs: mixup_alpha"),
        (dict(data="npz2"), "data differs"),
        (dict(method="vitkd", path="top4"), "lacks vitkd_0, vitkd_1, vitkd_last"),
    ],
    ids=["seed", "teacher", "aug", "data", "field"],
)
def test_trainer_refuses_a_mismatched_cache(env, change, expect):
    path = getattr(env, change.get("path", "topk"))
    teacher = env.t_b if change.get("teacher") == "b" else None
    data = env.npz2 if change.get("data") == "npz2" else None
    argv = env.args("--method", change.get("method", "kd"), *change.get("extra", ()),
                    "--teacher-cache", str(path), teacher=teacher, data=data)
    with pytest.raises(CacheError) as e:
        build_trainer(parse_args(argv), log=lambda *a: None)
    msg = _one_line(e)
    assert expect in msg, msg
    assert str(path) in msg


def test_corrupted_and_truncated_shards_are_named(env, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(env.topk, bad)
    victim = bad / "v0001-s000001.vitkd_1.npy"
    raw = bytearray(victim.read_bytes())
    raw[-7] ^= 0x40
    victim.write_bytes(bytes(raw))
    with pytest.raises(CacheError) as e:
        CachedTeacher(bad)
    assert "v0001-s000001.vitkd_1.npy is corrupted" in _one_line(e)
    # lazy verification: opens, serves intact shards, names the bad one on first touch
    ct = CachedTeacher(bad, verify="lazy")
    ok = ct(None, ids=torch.tensor([0, 40, 70]), view=0)
    assert ok["vitkd_1"].shape == (3, 16, 32)
    ct(None, ids=torch.tensor([1, 2]), view=1)  # shard 0 of view 1: intact
    with pytest.raises(CacheError, match="v0001-s000001.vitkd_1.npy is corrupted"):
        ct(None, ids=torch.tensor([3, 40]), view=1)
    # ... also when the prefetch thread touches it first: the error reaches the training thread
    ct = CachedTeacher(bad, verify="lazy", threaded=True)
    ct.prefetch_epoch(iter([torch.tensor([1, 2]), torch.tensor([3, 40])]), 1)
    ct(None, ids=torch.tensor([1, 2]), view=1)
    with pytest.raises(CacheError, match="v0001-s000001.vitkd_1.npy is corrupted"):
        ct(None, ids=torch.tensor([3, 40]), view=1)
    ct.close()
    # truncation is caught at open, even without checksums
    short = bad / "v0000-s000002.topk_vals.npy"
    short.write_bytes(short.read_bytes()[:-10])
    with pytest.raises(CacheError) as e:
        CachedTeacher(bad, verify="none")
    assert "v0000-s000002.topk_vals.npy is truncated" in _one_line(e)
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match="corrupted"):
        CachedTeacher(bad)
    with pytest.raises(CacheError, match="does not exist"):
        CachedTeacher(tmp_path / "nowhere")


def test_max_gb_refusal_writes_nothing(env, tmp_path):
    out = tmp_path / "big"
    with pytest.raises(CacheError) as e:
        build_cache(parse_args(env.args("--method", FEAT)), out, views=2, max_gb=1e-4, **env.quiet)
    msg = _one_line(e)
    assert "--max-gb 0.0001" in msg and "GB" in msg
    assert not out.exists() or not any(out.iterdir())


def test_another_cache_in_out_is_one_line_naming_the_fields(env, tmp_path):
    out = tmp_path / "c"
    shutil.copytree(env.top4, out)  # a kd cache (top-4 logits) is there
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(CacheError) as e:
        build_cache(parse_args(env.args("--method", FEAT)), out, views=1, topk=4, shard_size=40, **env.quiet)
    msg = _one_line(e)
    assert "already holds a different cache (fields: topk_vals, topk_ids, topk_lse there, topk_vals, " \
           "topk_ids, topk_lse, vitkd_0, vitkd_1, vitkd_last now)" in msg and "another --out" in msg, msg
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_verify_reports_agreement_and_catches_a_wrong_record(env, tmp_path, capsys):
    res = verify_cache(env.topk, 24, log=lambda *a: None)
    assert res["ok"] and res["records"] == 24
    assert set(res["fields"]) == {"topk_vals", "topk_ids", "topk_lse", "vitkd_0", "vitkd_1", "vitkd_last"}
    for f, r in res["fields"].items():
        assert r["max_abs"] <= 2e-3 * max(1.0, r["scale"]), (f, r)  # fp16 rounding only
    assert cache_cli.main(["--verify", "8", "--out", str(env.dense)]) == 0
    # a wrong record with a consistent checksum (e.g. a buggy writer) is caught by re-running the teacher
    bad = tmp_path / "wrong"
    shutil.copytree(env.top4, bad)
    f = bad / "v0000-s000001.topk_lse.npy"
    arr = np.load(f)
    arr[3] += 1.0
    np.save(f, arr)
    man = json.loads((bad / "manifest.json").read_text())
    info = man["shards"]["v0000-s000001"]["files"]["topk_lse"]
    info["sha256"] = hashlib.sha256(f.read_bytes()).hexdigest()
    info["bytes"] = f.stat().st_size
    (bad / "manifest.json").write_text(json.dumps(man))
    assert cache_cli.main(["--verify", "96", "--out", str(bad)]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_train_from_cache_runs_no_teacher_and_prefetches(env, tmp_path, monkeypatch):
    def no_teacher(*a, **k):
        raise AssertionError("the teacher model must not be loaded when training from a cache")

    monkeypatch.setattr(setup, "resolve_teacher", no_teacher)
    cfg = parse_args(env.args("--method", "kd+nkd", "--epochs", "3", "--teacher-cache", str(env.topk),
                              "--eval-every", "3", "--log-every", "1"))
    tr = build_trainer(cfg, log=lambda *a: None)
    s = tr.fit(tmp_path / "run")
    assert s["teacher_mode"] == "cached" and s["student_top1"] is not None
    assert s["teacher_top1"] == json.loads((env.topk / "manifest.json").read_text())["teacher"]["top1"]
    assert tr.teacher.calls == tr.step_idx == 9 and tr.teacher.prefetched == 9  # every batch came prefetched
    assert 0 <= s["teacher_share"] < 1


def test_a_second_build_of_the_same_worker_slot_is_one_line_and_other_slots_build(env, tmp_path):
    """Two `fastkd.cache` builds on one --out and the same --worker slot used to build the same shards side
    by side (consistent, atomic, but all the work twice). The slot is locked now: the second build stops
    with one line naming the holder's pid, writes nothing, and another slot builds alongside."""
    from fastkd.train.rundir import run_dir_lock

    out = tmp_path / "c"
    cfg = parse_args(env.args("--method", "kd"))
    with run_dir_lock(out, name=".fastkd.worker0.lock"):  # another build holds slot 0
        with pytest.raises(ValueError) as e:
            build_cache(cfg, out, views=1, topk=4, shard_size=40, **env.quiet)
        msg = _one_line(e)
        assert f"(pid {os.getpid()})" in msg and "--worker j/2" in msg, msg
        assert sorted(p.name for p in out.iterdir()) == [".fastkd.worker0.lock"]  # nothing written
        res = build_cache(cfg, out, views=1, topk=4, shard_size=40, worker=(1, 2), **env.quiet)
        assert res["built"] == ["v0000-s000001"] and not res["complete"]
    assert not (out / ".fastkd.worker1.lock").exists()  # each build lets go of its slot
    res = build_cache(cfg, out, views=1, topk=4, shard_size=40, worker=(0, 2), **env.quiet)
    assert res["complete"] and res["built"] == ["v0000-s000000", "v0000-s000002"]
    assert not [p for p in out.iterdir() if p.name.endswith(".lock")]


def test_torchrun_ranks_are_workers_and_build_the_same_cache(env, tmp_path):
    """``torchrun -m fastkd.cache``: rank r of W builds shards r, r + W, … (on its own GPU when there is one),
    the ranks meet at the end, and rank 0 alone reports the complete cache and verifies it. The bytes are
    the single-process build's. Before, every rank built every shard into one folder (now: the second
    would be refused by the worker-slot lock)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "tr"
    argv = [a for a in env.args("--method", FEAT) if a != "--quiet"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(port), "-m", "fastkd.cache", *argv, "--views", "2",
           "--shard-size", "32", "--out", str(out), "--verify", "8"]
    env_vars = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, env=env_vars, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count(f"fastkd.cache: complete: 6 shard(s) by 2 ranks in {out}") == 1, p.stdout
    assert p.stdout.count("fastkd.cache verify: 8 records, OK") == 1, p.stdout  # rank 0 only
    mine, theirs = _shard_bytes(out), _shard_bytes(env.topk)
    assert mine.keys() == theirs.keys() and all(mine[k] == theirs[k] for k in mine)
    bad = subprocess.run([*cmd[:-6], "--worker", "0/2", "--out", str(tmp_path / "x")], env=env_vars,
                         capture_output=True, text=True, timeout=400)
    assert bad.returncode != 0 and bad.stderr.count("leave --worker out") == 2, bad.stderr[-3000:]
