"""Measured dispatch (issue 12 item 5) on CPU, with an injected timer instead of CUDA events: the faster
path is chosen, the choice is written to dispatch.json, reused, keyed by device/torch/triton/fastkd, the
FASTKD_KERNELS override wins, a corrupt cache is ignored with one line, a signature's decision is stable,
and a torch.compile trace reads the eager decision (``compile_step``)."""

import json
import os

import pytest
import torch

from fastkd.ops import dispatch as KF
from fastkd.ops import measure as M
from fastkd.ops import reference as R


@pytest.fixture
def measured(tmp_path, monkeypatch):
    """Measured mode on CPU: cache in tmp, timer = table of ms per path (counts its calls)."""
    monkeypatch.setenv("FASTKD_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FASTKD_KERNELS", raising=False)
    ms = {"triton": 1.0, "compiled": 2.0, "step": {"host": 5.0, "gpu": 5.0}}  # step: host-bound
    calls = []

    def timer(path, run):
        calls.append(path)
        if path == "step":  # step_balance: the calibrated step's forward, run (its calls are counted)
            run()
        return ms[path]

    monkeypatch.setattr(KF._S, "timer", timer)
    monkeypatch.setattr(KF._S, "measure_devices", ("cuda", "cpu"))
    KF.clear_decisions()
    KF.set_fused(True)
    yield {"ms": ms, "calls": calls, "file": tmp_path / "dispatch.json"}
    KF.set_fused(False)
    KF.clear_decisions()


def _fake_kd():
    """A dispatching kd_loss whose 'Triton' path is a marker (CPU has no kernels)."""

    def kd_loss(s_logits, t_logits, T=4.0):
        return (s_logits * 0).sum() + 123.0

    return KF.fused(lambda s, t, *a, **k: (s, t))(kd_loss)


def _logits(B=3, C=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, C, generator=g) * 3).requires_grad_(), torch.randn(B, C, generator=g) * 3


def test_the_faster_path_is_chosen_and_written(measured):
    fake = _fake_kd()
    s, t = _logits()
    assert float(fake(s, t).detach()) == 123.0  # triton 1 ms < compiled 2 ms
    (key, rec), = KF.decisions().items()
    assert rec["path"] == "triton" and rec["triton_ms"] == 1.0 and rec["compiled_ms"] == 2.0
    assert key.startswith("kd_loss|noamp|float32:c:")
    doc = json.loads(measured["file"].read_text())
    (env, entries), = doc["entries"].items()
    assert entries[key]["path"] == "triton" and entries[key]["compiled_ms"] == 2.0
    # the other way round: a new signature (another width) where the compiled reference wins
    measured["ms"].update(triton=5.0, compiled=2.0)
    s2, t2 = _logits(C=12)
    torch.testing.assert_close(fake(s2, t2), R.kd_loss(s2, t2), rtol=1e-5, atol=1e-7)
    assert [r["path"] for r in KF.decisions().values()] == ["triton", "compiled"]


def test_ties_go_to_the_compiled_reference(measured):
    measured["ms"].update(triton=2.0, compiled=2.0)
    s, t = _logits()
    KF.kd_loss(s, t)
    assert next(iter(KF.decisions().values()))["path"] == "compiled"


def test_the_cache_is_reused_and_keyed(measured, monkeypatch):
    fake = _fake_kd()
    s, t = _logits()
    fake(s, t)
    n = len(measured["calls"])
    assert n == 2 * M._REPS
    KF.clear_decisions()  # a new run: the decision comes from dispatch.json, nothing is timed
    assert float(fake(s, t).detach()) == 123.0
    assert len(measured["calls"]) == n
    assert next(iter(KF.decisions().values()))["source"] == "cache"
    doc = json.loads(measured["file"].read_text())
    (env,) = doc["entries"]
    import triton

    from fastkd import __version__

    assert env == f"cpu|torch {torch.__version__}|triton {triton.__version__}|fastkd {__version__}"
    # another GPU (or torch / triton / fastkd version) measures again, and both are kept
    KF.clear_decisions()
    monkeypatch.setattr(M, "_device_name", lambda dev: "NVIDIA Other")
    fake(s, t)
    assert len(measured["calls"]) == 2 * n
    assert len(json.loads(measured["file"].read_text())["entries"]) == 2


def test_a_signature_decides_once(measured):
    """Same dtype / stride pattern / shape bucket → one measurement; a strided view is another signature."""
    fake = _fake_kd()
    s, t = _logits(B=3, C=10)
    for _ in range(3):
        fake(s, t)
    s5, t5 = _logits(B=4, C=10)  # rows 3 and 4 share the bucket 4
    fake(s5, t5)
    assert len(KF.decisions()) == 1 and len(measured["calls"]) == 2 * M._REPS
    wide = torch.randn(4, 20)
    fake(s5, wide[:, :10])  # a strided teacher view
    keys = list(KF.decisions())
    assert len(keys) == 2 and ":v:" in keys[1] and ":v:" not in keys[0]
    measured["ms"].update(triton=9.0)  # later timings never flip a made decision
    fake(s, t)
    assert next(iter(KF.decisions().values()))["path"] == "triton"


@pytest.mark.parametrize("env, path", [("compiled", "compiled"), ("reference", "reference"),
                                       ("0", "reference"), ("triton", "compiled")])
def test_the_env_override_wins(measured, monkeypatch, env, path):
    """FASTKD_KERNELS forces a path and nothing is measured (triton on CPU: no kernels → compiled)."""
    monkeypatch.setenv("FASTKD_KERNELS", env)
    KF.set_fused(True)
    s, t = _logits()
    assert KF.active_path(s, t) == path
    torch.testing.assert_close(KF.kd_loss(s, t), R.kd_loss(s, t), rtol=1e-5, atol=1e-7)
    assert measured["calls"] == [] and KF.decisions() == {}
    assert KF.kernels_mode() == {"0": "reference"}.get(env, env)


def test_auto_is_the_default_and_cpu_keeps_the_compiled_reference(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTKD_KERNELS", raising=False)
    monkeypatch.setenv("FASTKD_CACHE_DIR", str(tmp_path))
    KF.clear_decisions()
    KF.set_fused(True)
    try:
        s, t = _logits()
        assert KF.kernels_mode() == "auto"
        assert KF.active_path(s, t) == "compiled"  # no timer: CPU is never measured
        KF.kd_loss(s, t)
        assert KF.decisions() == {} and not (tmp_path / "dispatch.json").exists()
        assert "compiled reference" in KF.describe("cpu")
    finally:
        KF.set_fused(False)


def test_a_corrupt_cache_is_ignored_with_one_line(measured, capsys):
    measured["file"].write_text("{not json")
    s, t = _logits()
    KF.kd_loss(s, t)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "ignoring the unreadable dispatch cache" in err[0], err
    doc = json.loads(measured["file"].read_text())  # rewritten, valid
    assert len(next(iter(doc["entries"].values()))) == 1


def test_the_write_is_atomic(measured, monkeypatch):
    """A failing write leaves the old file whole (written to a temp file, then renamed)."""
    s, t = _logits()
    KF.kd_loss(s, t)
    before = measured["file"].read_text()
    KF.clear_decisions()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    s2, t2 = _logits(C=12)
    KF.kd_loss(s2, t2)  # the run goes on; the decision is kept in memory
    assert measured["file"].read_text() == before and len(KF.decisions()) == 1


def test_describe_and_the_summary_record(measured):
    fake = _fake_kd()
    s, t = _logits()
    fake(s, t)
    line = KF.describe("cpu")
    assert "\n" not in line
    rec = KF.dispatch_record("cpu")
    (op_rec,) = rec["ops"]["kd_loss"]
    assert op_rec["path"] == "triton" and op_rec["triton_ms"] == 1.0 and op_rec["compiled_ms"] == 2.0
    assert rec["mode"] == "auto" and rec["cache"] == str(measured["file"])
    json.dumps(rec)


def test_token_kd_is_measured_too(measured):
    measured["ms"].update(triton=3.0, compiled=1.0)
    g = torch.Generator().manual_seed(0)
    st = torch.randn(2, 5, 8, generator=g).requires_grad_()
    tt = torch.randn(2, 5, 12, generator=g)
    w = torch.randn(12, 8, generator=g).requires_grad_()
    out = KF.token_kd(st, tt, w, None)
    ref = KF._token_kd_reference(st, tt, w, None, 1, 1, True, True)
    torch.testing.assert_close(out.mimic, ref.mimic)
    (key,) = KF.decisions()
    assert key.startswith("token_kd|") and KF.decisions()[key]["path"] == "compiled"


def test_a_compiled_step_reads_the_eager_decision(measured):
    """compile_step measures eagerly on its first call; the fullgraph trace then takes that path. A
    signature the trace meets with no decision takes the compiled reference and is listed as pending."""
    fake = _fake_kd()

    class Step(torch.nn.Module):
        def forward(self, s, t):
            return fake(s, t) * 2.0

    step = KF.compile_step(Step(), fullgraph=True)
    s, t = _logits()
    assert float(step(s, t).detach()) == 246.0  # triton (the marker) chosen eagerly, then traced
    assert len(KF.decisions()) == 1 and KF.dispatch_record()["pending"] == []
    bare = torch.compile(lambda a, b: fake(a, b) * 2.0, fullgraph=True)
    s2, t2 = _logits(B=9, C=7)
    torch.testing.assert_close(bare(s2, t2), 2.0 * R.kd_loss(s2, t2), rtol=1e-5, atol=1e-6)
    assert len(KF.dispatch_record()["pending"]) == 1 and len(KF.decisions()) == 1


def test_patch_views_are_measured_as_training_passes_them():
    """The paths are timed on copies of the inputs; a patch view x[:, P:] of a block output stays a view of a
    copied base, and the gradient goes to that base, as in training: the compiled reference pays its
    SliceBackward there and the fused mimic (which takes x whole) does not. Other tensors are copied with
    their strides."""
    x = torch.randn(3, 5, 8, requires_grad=True)
    other = torch.randn(3, 4, 8, requires_grad=True)
    leaves = []
    v, o = M._clone_args([x[:, 1:], other[:, :, :6]], leaves)
    assert v._base is not None and v._base is leaves[0] and leaves[0].shape == x.shape
    assert torch.equal(v, x[:, 1:]) and v.stride() == x[:, 1:].stride()
    assert o._base is None and o.stride() == other[:, :, :6].stride() and leaves[1] is o
    loss = (v * 2).sum()
    (g,) = torch.autograd.grad(loss, [leaves[0]])
    assert torch.equal(g[:, 0], torch.zeros(3, 8)) and torch.equal(g[:, 1:], torch.full((3, 4, 8), 2.0))
    names = set()
    stack = [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None:
            names.add(fn.name())
            stack.extend(f for f, _ in fn.next_functions)
    assert "SliceBackward0" in names  # what the compiled reference pays in training


def test_a_module_arguments_weight_gradients_are_timed():
    """ViTKD's generator is passed to vitkd_gen_loss as a module and trained in the step: each path's timed
    backward includes its weight gradients (returned by autograd.grad, never accumulated into .grad)."""
    gen = torch.nn.Linear(4, 4)
    hits = []
    gen.weight.register_hook(lambda g: hits.append(g.shape))
    x = torch.randn(3, 4, requires_grad=True)

    def path(x_, mod):
        return mod(x_).pow(2).sum()

    def timer(p, run):
        run()
        return {"triton": 1.0, "compiled": 2.0}[p]

    rec = M._measure("gen_like", {"triton": path, "compiled": path}, (x, gen), {}, torch.device("cpu"), timer)
    assert rec["path"] == "triton" and hits and all(h == (4, 4) for h in hits)
    assert gen.weight.grad is None and x.grad is None


# ----------------------------------------------------------------- the rule of a GPU-bound step
def _times(wall, gpu, host):
    return {"wall": wall, "gpu": gpu, "host": host}


def test_a_record_keeps_the_wall_and_the_gpu_answer(measured):
    """Each path is timed on wall (host in the loop) and on GPU time (host hidden); the wall answer is the
    default, and both are recorded and written."""
    measured["ms"].update(triton=_times(3.0, 1.0, 2.5), compiled=_times(2.0, 1.8, 0.4))
    fake = _fake_kd()
    s, t = _logits()
    torch.testing.assert_close(fake(s, t), R.kd_loss(s, t), rtol=1e-5, atol=1e-7)  # compiled: wall rule
    (rec,) = KF.decisions().values()
    assert (rec["path"], rec["rule"], rec["wall_path"], rec["gpu_path"]) == ("compiled", "wall", "compiled",
                                                                             "triton")
    assert (rec["triton_ms"], rec["triton_gpu_ms"], rec["triton_host_ms"]) == (3.0, 1.0, 2.5)
    (entries,) = json.loads(measured["file"].read_text())["entries"].values()
    assert next(iter(entries.values()))["gpu_path"] == "triton"


@pytest.mark.parametrize("slack, path", [(10.0, "triton"), (6.0, "compiled"), (0.0, "compiled")])
def test_rebalance_takes_the_gpu_answer_where_the_slack_hides_its_host_work(measured, slack, path):
    """Switching costs the new path's whole host time plus the GPU time it saves (both come out of the
    slack), within half the slack: 2.5 + 0.8 = 3.3 ms fits 10 / 2, not 6 / 2."""
    measured["ms"].update(triton=_times(3.0, 1.0, 2.5), compiled=_times(2.0, 1.8, 0.4))
    fake = _fake_kd()
    s, t = _logits()
    fake(s, t)
    switched = M.rebalance(slack)
    (key, rec), = KF.decisions().items()
    assert rec["path"] == path and switched == ([key] if path == "triton" else [])
    assert (float(fake(s, t).detach()) == 123.0) == (path == "triton")  # the memo follows
    assert KF.dispatch_record()["step_slack_ms"] == slack
    assert rec["rule"] == ("gpu" if path == "triton" else "wall")
    from fastkd.ops.routing import _timings

    assert _timings(rec) == (" (1 triton / 1.8 compiled ms, GPU time)" if path == "triton"
                             else " (3 triton / 2 compiled ms)")
    M.rebalance(0.0)  # a later host-bound verdict restores the wall answer
    assert KF.decisions()[key]["path"] == "compiled"


def test_rebalance_spends_the_slack_on_the_largest_saving_first():
    """Two ops, slack for one: the one saving more GPU time per step (calls × saving) is switched."""
    M.clear_decisions()
    try:
        for key, gpu_t in (("a", 1.5), ("b", 1.8)):
            M._S.decided[key] = {"op": key, "path": "compiled", "wall_path": "compiled", "gpu_path": "triton",
                                 "triton_gpu_ms": gpu_t, "compiled_gpu_ms": 2.0, "triton_host_ms": 1.0}
        # a: saving 0.5, cost 1.5; b: saving 4 × 0.2 = 0.8, cost 4 + 0.8 = 4.8. Budget 5: b only (4.8), then
        # 0.2 is left, too little for a
        assert M.rebalance(10.0, {"a": 1, "b": 4}) == ["b"]
        assert M.rebalance(20.0, {"a": 1, "b": 4}) == ["b", "a"]
        assert M.rebalance(3.0, {"a": 1, "b": 4}) == ["a"]
        # a signature the timed forward did not run (count unknown) keeps its wall answer
        assert M.rebalance(20.0, {"b": 4}) == ["b"] and M._S.decided["a"]["path"] == "compiled"
    finally:
        M.clear_decisions()


def test_a_cached_decision_is_rebalanced_too(measured):
    """dispatch.json keeps both answers; a decision read from it takes the step's rule like a measured one
    (the cached ``path`` is the wall answer)."""
    measured["ms"].update(triton=_times(3.0, 1.0, 0.5), compiled=_times(2.0, 1.8, 0.4))
    s, t = _logits()
    _fake_kd()(s, t)
    KF.clear_decisions()
    n = len(measured["calls"])
    fake = _fake_kd()
    fake(s, t)
    (rec,) = KF.decisions().values()
    assert len(measured["calls"]) == n and rec["source"] == "cache" and rec["path"] == "compiled"
    M.rebalance(10.0)
    assert float(fake(s, t).detach()) == 123.0


@pytest.mark.parametrize("compile_", [True, False])
@pytest.mark.parametrize("step, path", [({"host": 2.0, "gpu": 30.0}, "triton"),
                                        ({"host": 2.0, "gpu": 10.0}, "compiled"),
                                        ({"host": 9.0, "gpu": 10.0}, "compiled")])
def test_the_calibrated_step_picks_the_rule_from_its_balance(measured, compile_, step, path):
    """compile_step and calibrate_step time one more eager forward (host vs GPU) after the ops measured, and
    rebalance with the calls each signature made in it (here 3 per step) before the first real call, which
    then takes the rebalanced path. Switching costs 3 × 1.0 ms host + 3 × 0.8 ms saved = 5.4 ms of slack:
    it fits half of 28 (triton), not half of 8 (one call's 1.8 would), nor a host-bound step's 1."""
    measured["ms"].update(triton=_times(3.0, 1.0, 1.0), compiled=_times(2.0, 1.8, 0.4), step=step)
    torch._dynamo.reset()  # the same forward code in each case: no trace of an earlier case reused
    fake = _fake_kd()

    class Step(torch.nn.Module):
        def forward(self, s, t):
            return fake(s, t) + fake(s, t) + fake(s, t)

    wrap = KF.compile_step(Step(), fullgraph=True) if compile_ else KF.calibrate_step(Step())
    s, t = _logits()
    out = float(wrap(s, t).detach())
    assert (out == 369.0) == (path == "triton"), out
    assert wrap.balance["slack_ms"] == step["gpu"] - step["host"]
    assert wrap.balance["switched"] == (list(KF.decisions()) if path == "triton" else [])
    assert M._S.slack_ms == wrap.balance["slack_ms"]


def test_a_failed_balance_keeps_the_wall_rule(measured):
    """Timing the step's balance is an optimisation: if it fails, the step runs with the wall answers and
    the error is recorded (never a failed first step)."""

    def broken(path, run):
        if path == "step":
            raise RuntimeError("no events here")
        return {"triton": _times(3.0, 1.0, 0.1), "compiled": _times(2.0, 1.8, 0.1)}[path]

    M._S.slack_ms = None
    KF._S.timer = broken
    fake = _fake_kd()

    class Step(torch.nn.Module):
        def forward(self, s, t):
            return fake(s, t)

    wrap = KF.calibrate_step(Step())
    s, t = _logits()
    torch.testing.assert_close(wrap(s, t), R.kd_loss(s, t), rtol=1e-5, atol=1e-7)  # compiled (wall)
    assert wrap.balance == {"error": "RuntimeError: no events here"} and M._S.slack_ms is None
    assert next(iter(KF.decisions().values()))["rule"] == "wall"


def test_a_resumed_step_takes_the_original_paths(measured):
    """A resumed run restores the original run's switched signatures (from its checkpoint) instead of timing
    its own balance, so a resume stays exact whatever its slack would say now."""
    measured["ms"].update(triton=_times(3.0, 1.0, 1.0), compiled=_times(2.0, 1.8, 0.4),
                          step={"host": 2.0, "gpu": 30.0})
    fake = _fake_kd()

    class Step(torch.nn.Module):
        def forward(self, s, t):
            return fake(s, t)

    s, t = _logits()
    first = KF.calibrate_step(Step())
    assert float(first(s, t).detach()) == 123.0 and first.balance["switched"]  # GPU-bound: triton
    switched = first.balance["switched"]
    measured["ms"].update(step={"host": 9.0, "gpu": 10.0})  # the resumed run's host would say compiled
    for restore, marker in ((switched, True), ([], False)):
        M.rebalance(0.0)  # the process forgets the switch; a new run reads the cache
        n = len(measured["calls"])
        resumed = KF.calibrate_step(Step())
        resumed.restore = restore
        out = float(resumed(s, t).detach())
        assert (out == 123.0) == marker and resumed.balance == {"switched": restore, "restored": True}
        assert measured["calls"][n:] == []  # nothing timed: neither the ops (decided) nor the step
    assert measured["calls"].count("step") == 1  # the first run's balance only


@pytest.mark.parametrize("compile_", [True, False])
def test_a_compiled_step_calibrates_in_the_traced_form(measured, compile_):
    """compile_step calibrates its ops in the form its trace runs them (``measure.traced_form``; some eager
    paths have no traced counterpart), under keys of their own; calibrate_step in the eager form. The flag
    is off again after the calibration."""
    torch._dynamo.reset()
    seen = []

    def kd_loss(s_logits, t_logits, T=4.0):
        seen.append(M.traced_form())
        return (s_logits * 0).sum() + 123.0

    fake = KF.fused(lambda s, t, *a, **k: (s, t))(kd_loss)

    class Step(torch.nn.Module):
        def forward(self, s, t):
            return fake(s, t)

    wrap = KF.compile_step(Step(), fullgraph=True) if compile_ else KF.calibrate_step(Step())
    s, t = _logits()
    assert float(wrap(s, t).detach()) == 123.0
    (key,) = KF.decisions()
    assert key.endswith("|traced") == compile_ and not M._S.traced_form
    assert seen and all(x == compile_ for x in seen), seen  # calibration, and the trace: one form


def test_a_cached_record_without_both_answers_is_measured_again(measured):
    """dispatch.json records written before the GPU-time rule have one answer only: they are measured again
    (and rewritten with both), not reused without a GPU-time answer."""
    fake = _fake_kd()
    s, t = _logits()
    fake(s, t)
    doc = json.loads(measured["file"].read_text())
    (entries,) = doc["entries"].values()
    for rec in entries.values():  # make it an old-style record
        for k in ("wall_path", "gpu_path", "triton_gpu_ms", "compiled_gpu_ms"):
            rec.pop(k)
    measured["file"].write_text(json.dumps(doc))
    KF.clear_decisions()
    n = len(measured["calls"])
    fake(s, t)
    (rec,) = KF.decisions().values()
    assert rec["source"] == "measured" and len(measured["calls"]) == n + 2 * M._REPS and "gpu_path" in rec


@pytest.mark.parametrize("compile_", [True, False])
@pytest.mark.parametrize("triton, traced_path", [(_times(1.0, 0.9, 0.8), "compiled"),
                                                 (_times(0.4, 0.3, 0.1), "triton")])
def test_a_compiled_step_charges_the_inlined_reference_its_gpu_time(measured, compile_, triton, traced_path):
    """In the traced form the compiled reference is inlined in the step's graph, so the wall rule charges it
    its GPU time (0.5 ms) and the Triton path its whole wall time: triton's 1.0 ms beats the reference's
    standalone 2.0 ms eagerly but not its 0.5 ms inlined (the H200's NKD case, 2026-11-27); a 0.4 ms
    triton beats both. The record says it was decided inlined; a host-bound step switches nothing."""
    measured["ms"].update(triton=triton, compiled=_times(2.0, 0.5, 1.5))
    torch._dynamo.reset()
    fake = _fake_kd()

    class Step(torch.nn.Module):
        def forward(self, s, t):
            return fake(s, t)

    wrap = KF.compile_step(Step(), fullgraph=True) if compile_ else KF.calibrate_step(Step())
    s, t = _logits()
    out = float(wrap(s, t).detach())
    want = traced_path if compile_ else "triton"
    assert (out == 123.0) == (want == "triton"), out
    (rec,) = KF.decisions().values()
    assert (rec["path"], rec["rule"], rec["inlined"]) == (want, "wall", compile_)
    assert rec["compiled_ms"] == 2.0  # the record keeps what was measured
    from fastkd.ops import routing

    shown = routing._timings(rec)  # what describe() and the run's summary print: the times compared
    ref = "0.5 compiled ms, the inlined reference's GPU time)" if compile_ else "2 compiled ms)"
    assert shown == f" ({triton['wall']:.3g} triton / {ref}"


def test_a_traced_record_from_before_the_inlined_rule_is_measured_again(measured):
    """A dispatch.json record without the ``inlined`` field (written before the rule) is measured again."""
    torch._dynamo.reset()
    fake = _fake_kd()

    class Step(torch.nn.Module):
        def forward(self, s, t):
            return fake(s, t)

    s, t = _logits()
    KF.compile_step(Step(), fullgraph=True)(s, t)
    doc = json.loads(measured["file"].read_text())
    (entries,) = doc["entries"].values()
    (key,) = [k for k in entries if k.endswith("|traced")]
    entries[key].pop("inlined")
    measured["file"].write_text(json.dumps(doc))
    KF.clear_decisions()
    torch._dynamo.reset()
    n = len(measured["calls"])
    KF.compile_step(Step(), fullgraph=True)(s, t)
    assert KF.decisions()[key]["source"] == "measured"
    assert measured["calls"][n:].count("triton") == M._REPS  # timed again
    assert "inlined" in json.loads(measured["file"].read_text())["entries"][next(iter(doc["entries"]))][key]
