"""A training step makes no host sync after warm-up, in every mode (issue 12, item 1).

CPU: real ``Trainer.step``s (augment → teacher (online | cached) → student + loss → backward → clip →
AdamW) run under ``SyncGuard`` (tests/train/syncguard.py): ``.item()``, ``.tolist()``, ``.cpu()``,
``.numpy()``, ``int/float/bool/index`` of a tensor, ``.to(<cpu>)``, ``torch.equal``, ``nonzero``,
``unique``, boolean-mask indexing and per-step ``torch.tensor`` raise when fastkd (or timm) code calls
them in the training thread. torch's CPU AdamW reads its CPU step counter with ``.item()`` from torch's
own code, which the guard exempts: on CUDA the trainer's AdamW is the fused one, whose step counter
lives on the device, so it is not a sync there. The guard is shown to catch each kind of host read
planted in a step (``.item()``, ``int(tensor)``, ``if tensor:``, ``.to('cpu')``, ``torch.tensor``, a
boolean mask, ``t[i] = 4.0``, ``torch.bincount``).

CUDA (skipped on CPU; ``bench/gpu_check.sh`` runs it): the same steps under
``torch.cuda.set_sync_debug_mode("error")`` after warm-up.
"""

from __future__ import annotations

import contextlib
import itertools
import json

import numpy as np
import pytest
import torch
from syncguard import HostSync, SyncGuard
from tiny_models import CNN_OV, DEIT, MK, S_OV, T_OV, VIT  # tests/ is on sys.path (tests/conftest.py)

import fastkd.models.cnn  # noqa: F401  (registers fastkd_resnet)
from fastkd.cache.build import build_cache
from fastkd.config import parse_args
from fastkd.data import load_data
from fastkd.methods import ce as ce_module
from fastkd.models import create_model, save_model
from fastkd.ops import dispatch as KF
from fastkd.train.setup import build_trainer

CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _fused_off_after():
    """``--fused`` is process-wide (build_trainer sets it): back to the default after each test."""
    yield
    KF.set_fused(False)


@pytest.fixture(scope="module")
def data():
    return load_data("digits")


@pytest.fixture(scope="module")
def env(tmp_path_factory, data):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("nosync")
    save_model(create_model(VIT, **MK, **T_OV), d / "vit.safetensors")
    save_model(create_model("fastkd_resnet", **MK, **CNN_OV), d / "cnn.safetensors")
    env = {"vit": str(d / "vit.safetensors"), "cnn": str(d / "cnn.safetensors"), "root": d}
    return env


def _argv(env, method, *, teacher="vit", device="cpu", extra=()):
    return [
        "--method", method, "--teacher", env[teacher], "--epochs", "2", "--batch-size", "24",
        "--train-limit", "192", "--warmup-epochs", "0", "--device", device, "--quiet",
        "--workdir", str(env["root"] / "work"), "--eval-every", "0", "--log-every", "1",
        "--grad-clip", "1.0", *extra,
    ]


def _cache(env, method: str, device: str) -> str:
    """A 1-view teacher cache for ``method`` (built once per method and device)."""
    key = f"cache-{method}-{device}"
    if key not in env:
        out = env["root"] / key
        build_cache(parse_args(_argv(env, method, device=device)), out, views=1, log=lambda *a: None,
                    progress=False)
        env[key] = str(out)
    return env[key]


def _trainer(env, data, method, *, teacher="vit", distilled=False, device="cpu", extra=(), cached=False):
    extra = list(extra)
    if cached:
        extra += ["--teacher-cache", _cache(env, method, device)]
    cfg = parse_args(_argv(env, method, teacher=teacher, device=device, extra=extra))
    torch.manual_seed(0)
    arch = (DEIT if distilled else VIT, dict(S_OV))
    tr = build_trainer(cfg, data=data, student_arch=arch, log=lambda *a: None)
    if cached:
        tr.teacher.threaded = True  # as on CUDA: the gathers run in the prefetch thread, not in the step
    return tr


def _steps(tr, warm: int, guarded: int, guard=None, start_step: int = 0):
    """From step ``start_step`` of epoch 0 (> 0: a resumed epoch), ``warm`` steps, then ``guarded`` steps
    inside ``guard`` (a context manager), as ``fit`` runs them: the sampler's device ids, the cached
    teacher's prefetch announced first. A new epoch iterator's one-time work (the ids upload) falls in
    the warm steps."""
    batches = tr.sampler.batches(0, start_step=start_step)
    if tr.teacher is not None:
        tr.teacher.prefetch_epoch(batches, tr.view_of(0))
    tr.batches.start_epoch(batches, tr.view_of(0))  # the loader gathers the epoch's batches ahead, as in fit
    it = iter(batches)
    nxt = (lambda: next(it)) if tr.accum == 1 else (lambda: [next(it) for _ in range(tr.accum)])
    try:
        for _ in range(warm):
            tr.step(nxt(), 0)
        terms = None
        with guard if guard is not None else contextlib.nullcontext():
            for _ in range(guarded):
                terms = tr.step(nxt(), 0)
        return terms
    finally:
        if tr.teacher is not None:
            tr.teacher.close()


# (method, teacher, distilled student, flags, cached)
CASES = [
    ("ce", "vit", False, (), False),
    ("kd", "vit", False, (), False),
    ("nkd", "vit", False, (), False),
    ("vitkd+nkd", "vit", False, (), False),
    ("clskd+kd", "vit", False, (), False),
    ("md", "vit", False, (), False),
    ("deit", "vit", True, (), False),
    ("cskd", "cnn", False, ("--cskd-per-iter",), False),
    ("vitkd+nkd", "vit", False, ("--fused",), False),
    ("clskd+kd", "vit", False, ("--fused",), False),
    ("vitkd+nkd", "vit", False, (), True),
    ("kd+nkd", "vit", False, ("--fused",), True),
    ("vitkd+nkd", "vit", False, ("--compile",), False),
    ("kd", "vit", False, ("--accum-steps", "2"), False),  # 2 batches per optimizer step
    # the DeiT recipe's augmentation (scale crop, RandAugment, erasing) and an EMA student (mixing's partner
    # lookup runs in the loader's thread on CUDA: tests/data/test_augment_device.py guards the data part)
    ("kd", "vit", False, ("--rrc-scale", "0.08", "--rand-augment", "rand-m9-mstd0.5-inc1", "--erase", "0.25",
                          "--ema-decay", "0.99"), False),
    ("vitkd+nkd", "vit", False, ("--fused", "--accum-steps", "2"), True),
]


def _id(c):
    method, _, dist, flags, cached = c
    return "-".join([method, *(f.strip("-") for f in flags), *(["deit"] if dist else []),
                     "cached" if cached else "online"])


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_step_makes_no_host_sync(env, data, case):
    method, teacher, distilled, flags, cached = case
    tr = _trainer(env, data, method, teacher=teacher, distilled=distilled, extra=flags, cached=cached)
    # (under --compile the guard's patched torch functions make dynamo recompile once: its guards check
    # their identity; the recompile check runs before the guard)
    guard = SyncGuard()
    graphs = None
    if "--compile" in flags:
        from torch._dynamo.utils import counters

        graphs = lambda: counters["stats"]["unique_graphs"]  # noqa: E731
    _steps(tr, warm=2, guarded=0)
    if graphs:  # the training position (epoch_frac) moves every step: no recompile may follow
        before = graphs()
        _steps(tr, warm=2, guarded=0)
        assert graphs() == before, "a step recompiled"
    terms = _steps(tr, warm=1, guarded=2, guard=guard, start_step=2)
    assert guard.hits == []
    assert KF.is_fused() == ("--fused" in flags)  # the guarded steps ran on the path the flags chose
    assert all(torch.isfinite(v).all() for v in terms.values())
    if cached:
        assert tr.teacher.prefetched >= 3


def _planted(name: str, body: str):
    """A function defined as if in fastkd code (its module name is fastkd.*), so the guard watches it."""
    ns = {"__name__": "fastkd.methods.planted", "torch": torch}
    exec(body, ns)
    return ns[name]


@pytest.fixture
def measured_cpu(monkeypatch, tmp_path):
    """Measured dispatch on CPU with an injected timer: the compiled reference is faster on wall and GPU
    time (so no Triton kernel runs on this CPU), and the calibrated step's balance is ``state["step"]``.
    ``state["timed"]`` lists every timing asked for."""
    monkeypatch.setenv("FASTKD_CACHE_DIR", str(tmp_path / "dispatch"))
    monkeypatch.delenv("FASTKD_KERNELS", raising=False)
    state = {"timed": [], "step": {"host": 1.0, "gpu": 30.0}}

    def timer(path, run):
        state["timed"].append(path)
        if path == "step":
            run()
            return state["step"]
        return {"wall": {"triton": 2.0, "compiled": 1.0}[path], "gpu": {"triton": 1.5, "compiled": 1.0}[path],
                "host": 0.5}

    monkeypatch.setattr(KF._S, "timer", timer)
    monkeypatch.setattr(KF._S, "measure_devices", ("cuda", "cpu"))
    KF.clear_decisions()
    yield state
    KF.clear_decisions()


def _fit(env, data, out, *extra, quiet=True):
    argv = [a for a in _argv(env, "kd", extra=("--fused", *extra)) if quiet or a != "--quiet"]
    torch.manual_seed(0)
    tr = build_trainer(parse_args(argv), data=data, student_arch=(VIT, dict(S_OV)), log=lambda *a: None)
    tr.fit(out)
    KF.clear_decisions()  # as a new process would: its decisions come from dispatch.json
    return tr


def test_the_eager_fused_step_calibrates_once_then_makes_no_sync(env, data, measured_cpu):
    """The eager ``--fused`` step is calibrated (``calibrate_step``) at its first call: every fused op
    measures and one more forward is timed for the step's balance, with each signature's calls counted.
    Later steps time nothing and make no host sync."""
    tr = _trainer(env, data, "vitkd+nkd", extra=("--fused",))
    _steps(tr, warm=1, guarded=0)
    assert tr._fwd.balance == {"host_ms": 1.0, "gpu_ms": 30.0, "slack_ms": 29.0, "switched": []}
    assert measured_cpu["timed"].count("step") == 1 and tr._calibrated()
    ops = {r["op"]: r for r in KF.decisions().values()}
    assert {"vitkd_mimic_loss", "vitkd_gen_loss", "nkd_loss"} <= set(ops), sorted(ops)
    assert all(r["path"] == "compiled" and r["gpu_path"] == "compiled" for r in ops.values())
    n = len(measured_cpu["timed"])
    guard = SyncGuard()
    _steps(tr, warm=1, guarded=2, guard=guard, start_step=1)
    assert guard.hits == [] and len(measured_cpu["timed"]) == n


def test_a_resume_takes_the_original_runs_dispatch(env, data, measured_cpu, tmp_path):
    """The checkpoint records which ops the calibration moved to their GPU-time path (here none: the
    compiled reference wins both ways); a resumed run restores that instead of timing its own balance."""
    _fit(env, data, tmp_path / "run", "--epochs", "1")
    tr = _fit(env, data, tmp_path / "run", "--epochs", "2", "--resume")
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["meta"]["dispatch_switched"] == [] and tr._fwd.restore == []
    assert tr._fwd.balance == {"switched": [], "restored": True}
    assert measured_cpu["timed"].count("step") == 1  # only the first run timed its balance


def test_fit_reports_the_calibration_once(env, data, measured_cpu, monkeypatch, tmp_path, capsys):
    """A calibrated run says once, after its first step, which path each fused op took and the step's
    slack (``describe``); an uncalibrated one (CPU without a timer) says nothing more."""
    measured_cpu["step"] = {"host": 1.0, "gpu": 9.0}
    _fit(env, data, tmp_path / "a", "--epochs", "1", quiet=False)
    out = capsys.readouterr().out  # the bar's messages (tqdm.write) go to stdout
    lines = [ln for ln in out.splitlines() if "calibrated at step 1" in ln]
    assert len(lines) == 1, out
    assert "step slack 8 ms" in lines[0] and "kd_loss compiled" in lines[0], lines[0]
    monkeypatch.setattr(KF._S, "timer", None)
    _fit(env, data, tmp_path / "b", "--epochs", "1", quiet=False)
    assert "calibrated at step 1" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "body",
    [
        "def plant(logits, y_soft):\n    logits.sum().item()\n",
        "def plant(logits, y_soft):\n    int(y_soft.argmax())\n",
        "def plant(logits, y_soft):\n    if (logits > 0).any():\n        pass\n",
        "def plant(logits, y_soft):\n    y_soft.to('cpu')\n",
        "def plant(logits, y_soft):\n    torch.tensor(0.5)\n",
        "def plant(logits, y_soft):\n    logits[y_soft > 0.5]\n",
        "def plant(logits, y_soft):\n    w = torch.ones_like(y_soft)\n    w[-1] = 4.0\n",
        "def plant(logits, y_soft):\n    torch.bincount(y_soft.argmax(1), minlength=y_soft.shape[1])\n",
    ],
    ids=["item", "int", "bool", "to-cpu", "torch.tensor", "bool-mask", "setitem-number", "bincount"],
)
def test_guard_catches_a_planted_sync(env, data, monkeypatch, body):
    """The guard is not vacuous: one host read planted in the CE part of a real step is caught."""
    tr = _trainer(env, data, "kd")
    plant = _planted("plant", body)
    orig = ce_module.soft_ce

    def soft_ce(logits, y_soft, smoothing):
        plant(logits, y_soft)
        return orig(logits, y_soft, smoothing)

    _steps(tr, warm=1, guarded=0)
    monkeypatch.setattr(ce_module, "soft_ce", soft_ce)
    guard = SyncGuard()
    with pytest.raises(HostSync, match="fastkd.methods.planted"):
        _steps(tr, warm=1, guarded=1, guard=guard, start_step=2)
    assert len(guard.hits) == 1


def test_guard_ignores_other_threads_and_torch_internals():
    g = SyncGuard()
    x = torch.ones(3)
    with g:
        x.sum().item()  # this test module is not fastkd code
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))])
        opt.param_groups[0]["params"][0].grad = torch.ones(2)
        opt.step()  # torch's own .item() of the CPU step counter
        plant = _planted("plant", "def plant(t):\n    return t.item()\n")
        out = []
        import threading

        th = threading.Thread(target=lambda: out.append(plant(x.sum())))
        th.start()
        th.join()
        assert out == [3.0]  # another thread: not watched
        with pytest.raises(HostSync):
            plant(x.sum())
    assert plant(x.sum()) == 3.0  # outside the guard: restored


def test_sampler_device_ids_keep_the_order():
    """The sampler's device batches are the host batches (same order), from any start step."""
    from fastkd.data import EpochSampler

    dev = "cuda" if CUDA else "cpu"
    s = EpochSampler(100, 16, 3, device=dev)
    for start in (0, 2):
        got = [b.cpu() for b in s.batches(1, start_step=start)]
        want = list(s.host_batches(1, start_step=start))
        assert len(got) == len(want) == len(s) - start
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
    host = EpochSampler(100, 16, 3)  # the default (host) sampler: the same batches
    assert all(torch.equal(a, b) for a, b in zip(host.batches(1), s.host_batches(1), strict=True))
    assert np.array_equal(torch.cat(list(s.host_batches(1))).numpy(), s.order(1)[: 16 * len(s)].numpy())


# ------------------------------------------------------------------------------------------------ CUDA
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (bench/gpu_check.sh runs it)")
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_cuda_step_has_no_sync_under_sync_debug_mode(env, data, case):
    method, teacher, distilled, flags, cached = case
    tr = _trainer(env, data, method, teacher=teacher, distilled=distilled, extra=(*flags, "--amp"),
                  device="cuda", cached=cached)
    _steps(tr, warm=2, guarded=0)
    torch.cuda.synchronize()
    terms = _steps(tr, warm=1, guarded=2, guard=_CudaSyncError(), start_step=2)
    torch.cuda.synchronize()
    assert KF.is_fused() == ("--fused" in flags)
    assert all(torch.isfinite(v).all() for v in terms.values())


class _CudaSyncError:
    def __enter__(self):
        torch.cuda.set_sync_debug_mode("error")
        return self

    def __exit__(self, *a):
        torch.cuda.set_sync_debug_mode(0)


def test_cached_prefetch_keeps_itertools_repeat_working(env, data):
    """The bench's way (an endless repeat of one batch announced) is served from the prefetch too."""
    tr = _trainer(env, data, "kd+nkd", cached=True)
    ids = next(iter(tr.sampler.batches(0)))
    tr.teacher.prefetch_epoch(itertools.repeat(ids), 0)
    try:
        for _ in range(3):
            tr.step(ids, 0)
        assert tr.teacher.prefetched == 3
    finally:
        tr.teacher.close()


def test_summary_reports_the_data_wait_share(env, data, tmp_path):
    """A cached run times the wait for the teacher's record as phase cache_wait; summary.json's
    data_wait_share is the data phase plus that wait."""
    tr = _trainer(env, data, "kd+nkd", cached=True)
    s = tr.fit(tmp_path / "run")
    assert "cache_wait_share" in s and "data_share" in s
    assert s["data_wait_share"] == pytest.approx(s["data_share"] + s["cache_wait_share"])
    assert 0 <= s["data_wait_share"] < 1
    assert tr.teacher.prefetched == tr.step_idx  # every step's record came through the prefetch ring


def test_random_draws_compile_with_a_dynamic_batch():
    """--compile: once a process has compiled the step for two batch sizes, dynamo makes the batch dimension
    symbolic; the ViTKD mask and the manifold row draw must still trace (torch.rand / torch.randperm with an
    explicit generator=None take the overload without symbolic sizes and fail to trace)."""
    from fastkd.ops.reference import manifold_loss, random_token_mask

    @torch.compile(dynamic=True)
    def f(x, a, b):
        m = random_token_mask(x.shape[0], x.shape[1], 0.5, device=x.device)
        return (x * m).sum() + manifold_loss([a], [b], k=5)

    for batch in (3, 5):
        out = f(torch.randn(batch, 16), torch.randn(batch, 4, 8), torch.randn(batch, 4, 8))
        assert torch.isfinite(out)
