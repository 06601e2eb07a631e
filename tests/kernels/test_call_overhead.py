"""Per-call overhead of the fused ops (issue 12, item 6): O(1) aten ops and allocations per call.

On the H200 the map loss spent ~1.5 ms of CPU per fwd+bwd (about 9 zeros / fill_ per call plus custom-op
dispatch) against 120 µs of GPU time. Most of those zeros were autograd materialising zero gradients
for outputs nobody differentiates (stats, t_cls, dG, the logit kernels' dS): the autograd formulas now
``set_materialize_grads(False)``. These tests count, with a ``TorchDispatchMode`` on CPU under the
interpreter, (1) what the autograd glue around each op dispatches in a fwd+bwd and (2) the aten ops
the launchers dispatch around their kernels, and fail if either grows past the budget below (the count
today). The counts do not depend on the shapes (checked at two sizes): O(1) per call.

Round 2 (the H200 profile of 2026-11-26: ~0.8 ms of CPU per ``fastkd::token_kd`` forward): eager,
``token_kd_op`` no longer goes through the ``torch.library`` custom op (its dispatch, schema defaults
and autograd wrapper were most of the host time: ``tests/kernels/glue_timing.py``); it runs the same
launchers from a plain ``autograd.Function``, and the custom op is used under torch.compile only. The
token-op glue test therefore counts everything a fwd+bwd dispatches (glue + launchers; kernels
excluded) and its allocations, against budgets equal to today's counts.
"""

import collections

import pytest
import torch
from kd_testutil import DEVICE
from torch.utils._python_dispatch import TorchDispatchMode

from fastkd.kernels import logit_kd as lk
from fastkd.kernels import masked_gen as mg
from fastkd.kernels import token_kd as tk

ALLOC = {"empty", "empty_strided", "new_empty", "new_empty_strided", "zeros", "new_zeros", "zeros_like"}
ALLOC |= {"empty_like", "ones_like", "full", "new_full", "clone", "_to_copy", "contiguous"}
FILL = {"fill_", "zero_", "zeros", "zeros_like", "new_zeros"}


@pytest.fixture(autouse=True)
def kernels_uncounted(monkeypatch):
    """Kernel launches are not aten ops: under the interpreter a launch copies its arguments with aten
    ops of its own, so launches run with the counting mode off (and are counted as launches)."""
    from fastkd.kernels._utils import INTERPRET

    if not INTERPRET:
        yield
        return
    from torch.utils._python_dispatch import _disable_current_modes
    from triton.runtime import interpreter

    orig = interpreter.GridExecutor.__call__

    def call(self, *args, **kwargs):
        LAUNCHES[0] += 1
        with _disable_current_modes():
            return orig(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", call)
    yield


LAUNCHES = [0]


@pytest.fixture(autouse=True)
def fp32_out_gemms_count_once(monkeypatch):
    """``_utils.gemm_to`` with an fp32 output is one cuBLAS call on CUDA (``out_dtype``); its CPU stand-in
    upcasts both operands first. Counted as CUDA runs it: the stand-in runs with the counting mode off
    and the mode records one ``mm`` / ``bmm``."""
    from torch.utils._python_dispatch import _disable_current_modes, _get_current_dispatch_mode

    from fastkd.kernels import _utils

    orig = _utils.gemm_to

    def gemm_to(a, b, dtype, native=None):
        if not (dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16)):
            return orig(a, b, dtype, native)  # no widening: the same aten ops on CUDA, counted as they run
        mode = _get_current_dispatch_mode()
        with _disable_current_modes():
            out = orig(a, b, dtype, native)
        if isinstance(mode, Count):
            mode.ops.append(("bmm" if a.dim() == 3 else "mm", out.numel()))
        return out

    for mod in (tk, mg):
        monkeypatch.setattr(mod, "gemm_to", gemm_to)
    yield


class Count(TorchDispatchMode):
    """Every aten op dispatched inside the mode, with the numel of its (first) output."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        self.ops.append(
            (func.overloadpacket.__name__, first.numel() if isinstance(first, torch.Tensor) else 0)
        )
        return out

    def names(self):
        return collections.Counter(n for n, _ in self.ops)

    def allocs(self):
        return sum(1 for n, _ in self.ops if n in ALLOC)

    def big_fills(self):
        """zero-fills of more than one element (a 0-d zero for an unused upstream scalar is fine)."""
        return [(n, k) for n, k in self.ops if n in FILL and k > 1]


def _inputs(B, N, D_s, D_t, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE)
    s = r(B, 1 + N, D_s).requires_grad_()
    t = r(B, 1 + N, D_t)
    W = (r(D_t, D_s) * D_s**-0.5).requires_grad_()
    b = r(D_t).requires_grad_()
    tok = r(D_t).requires_grad_()
    mask = (torch.rand(B, N, generator=g) > 0.5).to(DEVICE)
    logits = r(B, 10).requires_grad_()
    return dict(s=s, t=t, W=W, b=b, tok=tok, mask=mask, logits=logits, t_logits=r(B, 10), N=N)


def _map(x, amp):  # as the dispatch calls it: the mean's 1/(B·N) is the op's map_scale
    B, N = x["s"].shape[0], x["N"]
    t = x["t"][..., : x["s"].shape[-1]]
    return tk.token_kd_op(x["s"], t, None, None, 1, 1, False, True, amp, map_scale=1.0 / (B * N))[1]


def _mimic(x, amp):  # ViTKD's α/B as the op's mim_scale, as the dispatch passes it
    B = x["s"].shape[0]
    return tk.token_kd_op(x["s"][:, 1:], x["t"][:, 1:], x["W"], x["b"], 0, 0, True, False, amp,
                          mim_scale=3e-5 / B)[0]


def _mimic_residual(
    x, amp
):  # with amp: the forward stores the bf16 residual, the backward does not recompute
    return tk.token_kd_op(x["s"][:, 1:], x["t"][:, 1:], x["W"], x["b"], 0, 0, True, False, amp, True)[0]


def _fused(x, amp):
    mim, msum, a_s, s_cls, _, _ = tk.token_kd_op(x["s"], x["t"], x["W"], x["b"], 1, 1, True, True, amp)
    return mim + msum + s_cls.sum()


def _gen(x, amp):
    N = x["N"]
    h = int(N**0.5)
    xin = mg.gen_input_op(x["s"][:, 1:], x["mask"], x["W"], x["b"], x["tok"], h, h, torch.float32, amp)
    return mg.gen_loss_op(xin, x["t"][:, 1:], x["mask"], 0.5, True)[0]


def _kd(x, amp):
    return lk.logit_kd_op(
        x["logits"], x["t_logits"], torch.empty(0, dtype=torch.long, device=DEVICE), 2.0, 1.0, False, True
    )[0]


OPS = {
    "map": _map,
    "mimic": _mimic,
    "mimic_residual": _mimic_residual,
    "fused": _fused,
    "gen": _gen,
    "kd": _kd,
}
# aten ops one fwd+bwd dispatches, measured (incl. the test's backward(): ones_like, AccumulateGrad's add_,
# the patch view's slice / slice_backward). gen / kd: custom ops, which count 1 (launchers not seen);
# token ops (eager autograd.Function since round 2): glue + launchers, kernels excluded. Round 1 had
# map 14 glue + 14 launcher ops, mimic 16 + 21 (recompute), fused 16 + 20.
GLUE_BUDGET = {"map": 17, "mimic": 31, "mimic_residual": 31, "fused": 33, "gen": 14, "kd": 7}
# with amp (bf16 autocast) the mimic term alone stores the bf16 residual by default (eager, a backward
# follows): the views of the packed residual, the 2g scales and the dW cast
# (and takes Y = S Wᵀ from cuBLAS: the copy_ of S to bf16, one more mm)
# and the bf16 copy of W, made once per fwd+bwd (detach + _to_copy)
# and, for patch views, dS = r·bf16(2g·W) written in s's dtype by the GEMM (no scale pass: new_empty + mul
# of W, the view), dW written in W's dtype by the GEMM (no cast)
GLUE_BUDGET_AMP = {"mimic": 58, "mimic_residual": 58, "fused": 39}
# allocations per fwd+bwd of the token ops (outputs, dS, gR / residual, partial sums, a 0-d zero for a
# term that is off, the test's ones_like seed)
ALLOC_BUDGET = {"map": 7, "mimic": 10, "mimic_residual": 10, "fused": 10}
# fused amp: + the bf16 W. Mimic amp: + bf16(2g·W) − the scale pass's dS − the dW cast
ALLOC_BUDGET_AMP = {"fused": 11}


def _glue(name, x, amp):
    OPS[name](x, amp).backward()  # warm-up: first-call autotuning (on a GPU) is not per-call overhead
    with Count() as c:
        OPS[name](x, amp).backward()
    return c


@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("name", list(OPS))
def test_autograd_glue_is_o1_and_materialises_no_zero_grads(name, amp):
    small = _glue(name, _inputs(3, 16, 24, 40), amp)
    big = _glue(name, _inputs(5, 64, 40, 48, seed=1), amp)
    assert small.names() == big.names(), "the op count depends on the shape"
    assert small.big_fills() == [], f"zero-filled tensors per call: {small.big_fills()}"
    n = len(small.ops)
    budget = GLUE_BUDGET_AMP.get(name, GLUE_BUDGET[name]) if amp else GLUE_BUDGET[name]
    assert n <= budget, f"{name}: {n} aten ops per fwd+bwd > budget {budget}: {small.names()}"
    if name in ALLOC_BUDGET:
        allocs = ALLOC_BUDGET_AMP.get(name, ALLOC_BUDGET[name]) if amp else ALLOC_BUDGET[name]
        assert small.allocs() <= allocs, (
            f"{name}: {small.allocs()} allocations per fwd+bwd > budget {allocs}: {small.names()}"
        )


# aten ops dispatched inside the launchers (forward + backward, kernels excluded), measured
LAUNCHER_BUDGET = {  # (ops, allocations): outputs, the compact gR / dS and, under amp, the bf16 copy of W
    "map": (14, 8),
    "mimic": (21, 13),
    "fused": (20, 11),
}


# under amp the mimic GEMMs run on cuBLAS (round 2): + S rounded to bf16 (alloc + copy_), Y = S Wᵀ (mm, t)
# in the forward and again in the recompute backward; called directly, the launchers each cast W to bf16
LAUNCHER_BUDGET_AMP = {"map": (14, 8), "mimic": (29, 13), "fused": (24, 10)}  # dW written in W's dtype


def _launchers(name, x, amp):
    s, t, W, b = x["s"].detach(), x["t"], x["W"].detach(), x["b"].detach()
    if name == "map":
        args = (s, t[..., : s.shape[-1]], None, None, 1, 1, False, True)
    elif name == "mimic":
        args = (s[:, 1:], t[:, 1:], W, b, 0, 0, True, False)
    else:
        args = (s, t, W, b, 1, 1, True, True)
    g = torch.tensor(0.5, device=DEVICE)

    def once():
        _, _, a_s, s_cls, _, stats = tk.token_kd_forward(*args, amp=amp)
        tk.token_kd_backward(
            g,
            g,
            None,
            None,
            *args[:4],
            a_s,
            stats,
            s_cls,
            *args[4:],
            args[2] is not None,
            args[3] is not None,
            amp=amp,
        )

    once()  # warm-up: first-call autotuning (on a GPU) is not per-call overhead
    with Count() as c:
        once()
    return c


@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("name", list(LAUNCHER_BUDGET))
def test_launchers_dispatch_o1_aten_ops(name, amp):
    small = _launchers(name, _inputs(3, 16, 24, 40), amp)
    big = _launchers(name, _inputs(5, 64, 40, 48, seed=1), amp)
    assert small.names() == big.names(), "the op count depends on the shape"
    assert small.big_fills() == [], f"zero fills inside the launchers: {small.big_fills()}"
    ops, allocs = (LAUNCHER_BUDGET_AMP if amp else LAUNCHER_BUDGET)[name]
    assert len(small.ops) <= ops, f"{name}: {len(small.ops)} aten ops > budget {ops}: {small.names()}"
    assert small.allocs() <= allocs, (
        f"{name}: {small.allocs()} allocations > budget {allocs}: {small.names()}"
    )


@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("name", ["map", "mimic", "mimic_residual", "fused"])
def test_eager_path_equals_custom_op(name, amp, monkeypatch):
    """The eager ``autograd.Function`` path and the custom op (what torch.compile runs) give the same loss
    and gradients: same launchers, same flags (the custom op gets ``save_residual`` explicitly)."""
    x = _inputs(3, 16, 24, 40)
    leaves = [x["s"], x["W"], x["b"]]

    def run():
        for v in leaves:
            v.grad = None
        out = OPS[name](x, amp)
        out.backward()
        return [out.detach().clone()] + [v.grad.clone() if v.grad is not None else None for v in leaves]

    eager = run()
    save = name == "mimic_residual" or (name == "mimic" and amp)  # eager default: store when grads follow
    real = tk.token_kd_custom_op

    def custom(s, t, w, b, ps, pt, mim, cmap, amp_=None, save_residual=None, mim_scale=1.0, map_scale=1.0):
        sr = save if save_residual is None else save_residual
        return real(s, t, w, b, ps, pt, mim, cmap, amp_, sr, mim_scale, map_scale)

    monkeypatch.setattr(tk, "token_kd_op", custom)
    ref = run()
    for a, b_ in zip(eager, ref, strict=True):
        assert (a is None) == (b_ is None)
        if a is not None:  # same launchers and inputs: equal up to run-to-run GEMM order on a GPU
            torch.testing.assert_close(a, b_, rtol=1e-6, atol=0)


def _two_layers(x, x2, stacked: bool):
    """ViTKD's two mimic layers under autocast: one ``mimic_layers_op`` or two one-layer ops."""
    vs = (x, x2)
    if stacked:
        return tk.mimic_layers_op([v["s"] for v in vs], [v["t"][:, 1:] for v in vs], [v["W"] for v in vs],
                                  [v["b"] for v in vs], 1)
    return sum(tk.token_kd_op(v["s"], v["t"][:, 1:], v["W"], v["b"], 1, 0, True, False, True, True)[0]
               for v in vs)


# aten ops / allocations of one fwd+bwd of two mimic layers under autocast (incl. the test's backward):
# one op over the layer stack vs two one-layer ops (measured: 113 ops, 21 allocations); the stack makes
# 3 batched GEMMs instead of 6, one autograd node instead of 2, no dS scale pass (dX is the fp32-out
# GEMM's output) and no dW cast (the host path of bench/NOTES.md). The Triton GEMM route: no Y (its bmm,
# transpose and unbind)
LAYERS_BUDGET = {"cublas": (52, 7), "triton": (49, 7)}


@pytest.mark.parametrize("route", ["cublas", "triton"])
def test_mimic_layers_glue_is_o1_and_half_of_two_ops(route, monkeypatch):
    monkeypatch.setenv("FASTKD_MIMIC_GEMM", route)
    counts = {}
    for shape, seed in (((3, 16, 24, 40), 0), ((5, 64, 40, 48), 1)):
        x, x2 = _inputs(*shape, seed=seed), _inputs(*shape, seed=seed + 7)
        for stacked in (True, False):
            _two_layers(x, x2, stacked).backward()  # warm-up
            LAUNCHES[0] = 0
            with Count() as c:
                _two_layers(x, x2, stacked).backward()
            c.launches = LAUNCHES[0]
            counts[(shape, stacked)] = c
    small, big = counts[((3, 16, 24, 40), True)], counts[((5, 64, 40, 48), True)]
    assert small.names() == big.names(), "the op count depends on the shape"
    assert small.big_fills() == [], f"zero-filled tensors per call: {small.big_fills()}"
    ops, allocs = LAYERS_BUDGET[route]
    assert len(small.ops) <= ops, f"{len(small.ops)} aten ops > budget {ops}: {small.names()}"
    assert small.allocs() <= allocs, f"{small.allocs()} allocations > budget {allocs}: {small.names()}"
    two = counts[((3, 16, 24, 40), False)]
    gemms = 3 if route == "cublas" else 2  # the triton route's forward GEMM is inside the epilogue kernel
    assert small.names()["bmm"] == gemms and two.names()["mm"] == 2 * gemms
    from fastkd.kernels._utils import INTERPRET

    if INTERPRET:  # Triton launches: one epilogue per layer (two ops: an epilogue and a scale pass each)
        assert (small.launches, two.launches) == (2, 4)
    assert len(small.ops) < 0.5 * len(two.ops) and small.allocs() < 0.5 * two.allocs()


def test_the_autotuner_is_consulted_once_per_key(monkeypatch):
    """``_utils.launch`` remembers the autotuner's choice per key (the key's argument values and every tensor
    argument's dtype, as ``triton.autotune`` keys its own cache): a repeated call launches that config
    directly, skipping ``Autotuner.run`` and its ≈ 14 µs cache hit; another shape or dtype consults the
    autotuner again. The values are the same either way."""
    from triton.runtime import autotuner

    from fastkd.kernels import _utils

    monkeypatch.setattr(_utils, "_TUNED", {})
    runs = []
    orig = autotuner.Autotuner.run

    def run(self, *a, **k):
        runs.append(self.fn.__name__)
        return orig(self, *a, **k)

    monkeypatch.setattr(autotuner.Autotuner, "run", run)
    x = _inputs(3, 16, 24, 40)

    def fwd_bwd(case, amp):
        out = case(x, amp)
        grads = torch.autograd.grad(out, [x["s"], x["W"]], allow_unused=True)
        return [out.detach(), *(g for g in grads if g is not None)]

    first = fwd_bwd(_mimic, False)
    n = len(runs)
    assert n >= 1 and set(runs) <= {"_token_kd_fwd_kernel", "_token_kd_bwd_kernel"}, runs
    again = fwd_bwd(_mimic, False)
    assert len(runs) == n, f"the autotuner was consulted again on a known key: {runs[n:]}"
    for a, b in zip(first, again, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    fwd_bwd(_mimic, True)  # under autocast the DOT_BF16 key changes: the autotuner decides anew
    assert len(runs) > n
    m = len(runs)
    x = _inputs(5, 64, 24, 40)  # another M
    fwd_bwd(_mimic, False)
    assert len(runs) > m


def test_the_launch_memo_key_covers_every_autotune_key():
    """``_utils._tuned_key`` differs whenever ``triton.autotune``'s own key would: a key argument's value,
    given by position or as a constexpr (whichever way the call site passes it), or a tensor's dtype."""
    from types import SimpleNamespace

    from fastkd.kernels._utils import _tuned_key

    k = SimpleNamespace(arg_names=["x_ptr", "M", "D", "FLAG", "BLOCK"], keys=["M", "D", "FLAG"])
    x = torch.empty(4)
    base = _tuned_key(k, (x, 8, 16), {"FLAG": True, "BLOCK": 32})
    assert base == _tuned_key(k, (x, 8, 16), {"FLAG": True, "BLOCK": 64})  # not a key: same entry
    assert base != _tuned_key(k, (x, 9, 16), {"FLAG": True, "BLOCK": 32})  # positional key value
    assert base != _tuned_key(k, (x, 8, 16), {"FLAG": False, "BLOCK": 32})  # constexpr key value
    assert base != _tuned_key(k, (x.bfloat16(), 8, 16), {"FLAG": True, "BLOCK": 32})  # a tensor's dtype
    assert base == _tuned_key(k, (x, 8), {"D": 16, "FLAG": True})  # D by name: the same values, same entry
    assert _tuned_key(k, (x, 8), {"D": 16, "FLAG": True}) != _tuned_key(k, (x, 8), {"D": 17, "FLAG": True})


@pytest.mark.parametrize("loss", ["cls_patch_map_loss", "vitkd_mimic_loss"])
def test_the_dispatch_launches_nothing_around_the_token_ops(loss, monkeypatch):
    """The public map and mimic losses on the Triton path dispatch, fwd+bwd, exactly the aten ops of their
    op: the map's mean (1/(B·N)) and ViTKD's α/B are the ops' factors, applied in the kernels, not a
    division / multiplication launched around them with its own autograd node (each a launch and a node
    of host work per call: bench/NOTES.md). The values are the reference's (test_functional_triton)."""
    from fastkd import functional as KF

    x, x2 = _inputs(3, 16, 24, 40), _inputs(3, 16, 24, 40, seed=5)
    seen = []
    if loss == "cls_patch_map_loss":
        real = tk.token_kd_op
        monkeypatch.setattr(tk, "token_kd_op", lambda *a, **k: seen.append(k) or real(*a, **k))

        def public():
            return KF.cls_patch_map_loss(x["s"], x["t"][..., :24], 1, 1)

        def bare():
            return real(x["s"], x["t"][..., :24], None, None, 1, 1, False, True, False, **seen[0])[1]
    else:
        real = tk.mimic_layers_op
        monkeypatch.setattr(tk, "mimic_layers_op", lambda *a: seen.append(a[5:]) or real(*a))
        sv, ts = [x["s"][:, 1:], x2["s"][:, 1:]], [x["t"][:, 1:], x2["t"][:, 1:]]

        def public():
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
                return KF.vitkd_mimic_loss(sv, ts, [x["W"], x2["W"]], [x["b"], x2["b"]], alpha=3e-5)

        def bare():
            return real([x["s"], x2["s"]], [t.detach() for t in ts], [x["W"], x2["W"]], [x["b"], x2["b"]], 1,
                        *seen[0])

    KF.set_fused(True, interpreter=DEVICE.type == "cpu")
    try:
        counts = {}
        for name, fn in (("public", public), ("bare", bare)):
            fn().backward()  # warm-up (and, for the public call, records the op's arguments)
            with Count() as c:
                fn().backward()
            counts[name] = c.names()
    finally:
        KF.set_fused(False)
    if loss == "cls_patch_map_loss":
        assert seen[0] == {"map_scale": 1.0 / (3 * 16)}, seen[0]
    else:
        assert seen[0] == (3e-5 / 3,), seen[0]
    extra = counts["public"] - counts["bare"]
    views = {"detach", "alias", "slice", "view", "as_strided", "_unsafe_view", "select", "t", "transpose"}
    assert set(extra) <= views, f"{loss}: aten ops around the op: {dict(extra)}"


def test_autotune_choices_are_kept_on_disk(monkeypatch):
    """The shipped kernels' ``triton.autotune`` keeps its timings in Triton's disk cache (``cache_results``,
    keyed by GPU, versions, kernel source and tuning key): a resumed run on the same machine takes the same
    configs, so the same summation order and bits, without tuning again. (Triton turns it off itself under
    the interpreter, where nothing is timed.)"""
    import triton

    from fastkd.kernels import _utils

    assert _utils._AUTOTUNE_CACHE, f"triton {triton.__version__}'s autotune has no cache_results (≥ 3.2 does)"
    seen = {}
    monkeypatch.setattr(triton, "autotune", lambda configs, key, **kw: seen.update(kw) or (lambda fn: fn))
    _utils.autotune([_utils.Cfg(16, 16, 16, 4, 2)], key=["M"])
    assert seen.get("cache_results") is True


@pytest.mark.parametrize("b,size", [(4, 12), (9, 20)])
def test_a_randaugment_layer_is_three_launches_and_o1_aten_ops(b, size):
    """RandAugment on a GPU (``fastkd.data.randaug``): the parameters of every layer once per call, then per
    layer the statistics, the tables and the layer itself, 3 launches around a handful of allocations,
    whatever the batch and image size. The H200 measured the torch form's ≈ 60 aten ops a layer (and a
    host sync) at 11.4 ms for two layers; the host work of each launch counts in a balanced step."""
    from fastkd.data import randaug as RA

    g = torch.Generator().manual_seed(b)
    x = torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g).to(DEVICE)
    op = torch.randint(-1, len(RA.OPS), (b, 2), generator=g).to(DEVICE)
    mag = (torch.rand(b, 2, generator=g, dtype=torch.float64) * 10).to(DEVICE)
    neg = (torch.rand(b, 2, generator=g) > 0.5).to(DEVICE)
    fill = torch.tensor([124.0, 116.0, 104.0]).to(DEVICE)
    params = RA._kernel_params(op, mag, neg, 3, size, size)
    first = [p[0] for p in params]  # the first layer's row of each
    RA._layer_kernels(x, first, fill)  # warm-up: builds the kernels
    LAUNCHES[0] = 0
    with Count() as c:
        out = RA._layer_kernels(x, first, fill)
    assert out is not None and LAUNCHES[0] == (3 if DEVICE.type == "cpu" else 0)
    names = c.names()
    # the statistics' four accumulators, the table and the output: allocations only, nothing copied
    assert c.allocs() == 6 and set(names) <= {"empty", "full", "zeros", "empty_like", "fill_", "zero_"}, names
