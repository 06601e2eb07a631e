"""Measured dispatch's machinery (``fastkd.ops.dispatch`` uses it): input signatures, timing the Triton
path against the compiled reference, the decisions and their JSON cache.

**Measured dispatch** (fused mode on CUDA with Triton, ``FASTKD_KERNELS=auto``, the default): for each op
and input *signature* — op, CUDA autocast on or off, and per tensor its dtype, stride pattern (contiguous or a
strided view), shape bucket (rows = product of the leading dims rounded up to a power of two, the last
dim exact) and whether it needs a gradient — the first eager call times the Triton path and the compiled
reference on copies of its real inputs (same strides), fwd+bwd when a gradient is needed (2 warm-up calls,
then the median of 5, the two paths interleaved; ``fastkd.ops.timing``). Each path gets three numbers:
wall time with the host in the loop, GPU time with the host's work hidden, and host (enqueue) time. The
decision keeps two answers: the faster on wall time (``wall_path``, the default: right when the host is
the bottleneck) and on GPU time (``gpu_path``). The step's calibration (``CalibratedStep``) then times the
step forward's host work against its GPU work, and ``rebalance`` takes the GPU-time answer for the ops
whose host work the step's slack hides. In a compiled step's traced form the wall rule charges the
compiled reference its GPU time only (the step's graph inlines it; the Triton path keeps its host work).
The choices are remembered in ``$FASTKD_CACHE_DIR/dispatch.json``
(default ``$XDG_CACHE_HOME/fastkd`` or ``~/.cache/fastkd``), keyed by GPU name, torch, triton and fastkd
version, written atomically; a corrupt file is ignored with one line.

Under ``torch.compile`` tracing the tensors are fake, so nothing can be timed there. ``compile_step(module)``
(the trainer's ``--compile``; ``calibrate_step`` without it) therefore runs the module's forward eagerly
before the first compiled call, RNG state preserved: each fused op meets its real training inputs and
measures, a second forward times the step's balance, and the trace then reads the decision (a
``torch._dynamo.assume_constant_result`` lookup keyed by the same signature: shapes are turned into
constants by comparisons, so it also works once dims are dynamic). A signature the trace meets with no
decision takes ``compiled``, exactly what ``--compile`` alone runs. So ``--fused`` picks the Triton path
only where it measured faster, on wall time or (its host work hidden) on GPU time.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections.abc import Callable, Sequence

import torch
import torch._dynamo

from fastkd.ops.timing import as_times, cuda_times, host_and_span_ms

Tensor = torch.Tensor


class _Decisions:
    def __init__(self):
        self.memo: dict[tuple, tuple[str, dict]] = {}  # exact call key → (signature key, its record)
        self.counts: dict[str, int] | None = None  # calls per signature, while ``step_balance`` counts
        self.slack_ms: float | None = None  # the calibrated step's GPU − host ms (``rebalance``), if any
        self.traced_form = False  # a compiled step is calibrating: ops run (and key) as the trace runs them
        self.decided: dict[str, dict] = {}  # signature key → decision record (this process)
        self.pending: set[str] = set()  # signatures a trace met with no decision (took "compiled")
        self.file: dict | None = None  # dispatch.json, loaded lazily
        self.env_key: str | None = None


_S = _Decisions()

_WARMUP, _REPS = 2, 5


def _pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def _concrete(n) -> int:
    """A Python int equal to ``n``. Under tracing a dynamic dim is a SymInt: comparisons guard on it and
    are concrete, so a binary search turns it into a constant (specializing the trace to this value)."""
    if not torch.compiler.is_compiling():
        return int(n)
    lo, hi = 0, 1
    while hi <= n:
        hi *= 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if mid <= n:
            lo = mid
        else:
            hi = mid
    return lo


def _tensor_sig(x: Tensor) -> str:
    size = [_concrete(d) for d in x.shape]
    stride = [_concrete(d) for d in x.stride()]
    contig, expect = True, 1
    for n, st in zip(reversed(size), reversed(stride)):  # noqa: B905  (equal lengths; traceable on torch 2.6+)
        if n != 1 and st != expect:
            contig = False
        expect *= n
    rows = 1
    for n in size[:-1]:
        rows *= n
    width = size[-1] if size else 1
    grad = "g" if (x.requires_grad and torch.is_grad_enabled()) else ""
    return f"{str(x.dtype).removeprefix('torch.')}:{'c' if contig else 'v'}:{_pow2(rows)}x{width}{grad}"


def _amp_tag(xs: Sequence[Tensor]) -> str:
    """CUDA autocast on or off (fastkd's autocast is always bf16; only the flag, which every torch ≥ 2.4
    constant-folds under tracing, so the eager and the traced key agree)."""
    dev = xs[0].device.type if xs else "cpu"
    return "amp" if dev == "cuda" and torch.is_autocast_enabled("cuda") else "noamp"


def traced_form() -> bool:
    """Whether ops run in the form a ``torch.compile`` trace gives them: inside a trace, and while a compiled
    step calibrates (``CalibratedStep``), so that each op is measured as the trace will run it. Some eager
    paths have no traced counterpart (ViTKD's stacked mimic op and its whole-token input)."""
    return _S.traced_form or torch.compiler.is_compiling()


def sig_key(name: str, xs: Sequence[Tensor]) -> str:
    """op | autocast | per tensor dtype:stride pattern:rows bucket x width[g] [| traced]: the decision's
    key. The traced form is its own decision (measured in that form)."""
    parts = [name, _amp_tag(xs), *(_tensor_sig(x) for x in xs)]
    return "|".join([*parts, "traced"] if traced_form() else parts)


def _fast_key(name: str, xs: Sequence[Tensor]) -> tuple:
    """Exact per-call key (eager only): (name, form, amp, grad mode, per tensor dtype/size/stride/grad)."""
    amp = xs[0].device.type == "cuda" and torch.is_autocast_enabled("cuda") if xs else False
    return (name, _S.traced_form, amp, torch.is_grad_enabled(),
            *((x.dtype, tuple(x.shape), x.stride(), x.requires_grad) for x in xs))


def cache_path() -> str:
    """Where measured-dispatch decisions are remembered: ``$FASTKD_CACHE_DIR/dispatch.json`` (default
    ``$XDG_CACHE_HOME/fastkd`` or ``~/.cache/fastkd``)."""
    root = os.environ.get("FASTKD_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "fastkd")
    return os.path.join(root, "dispatch.json")


def _env_key(device: torch.device) -> str:
    """GPU name | torch | triton | fastkd: decisions hold for this combination only."""
    if _S.env_key is None or not _S.env_key.startswith(_device_name(device) + "|"):
        try:
            import triton

            tv = triton.__version__
        except ImportError:
            tv = "none"
        from fastkd import __version__ as fv

        _S.env_key = f"{_device_name(device)}|torch {torch.__version__}|triton {tv}|fastkd {fv}"
    return _S.env_key


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def _read_cache_file(quiet: bool = False) -> dict:
    path = cache_path()
    try:
        with open(path) as fh:
            doc = json.load(fh)
        if not isinstance(doc, dict) or not isinstance(doc.get("entries"), dict):
            raise ValueError("no 'entries' object")
        return doc
    except FileNotFoundError:
        return {"version": 1, "entries": {}}
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        if not quiet:
                print(f"fastkd: ignoring the unreadable dispatch cache {path} ({type(e).__name__}: {e}); "
                  "measuring again", file=sys.stderr)
        return {"version": 1, "entries": {}}


def _cache_entries(device: torch.device) -> dict:
    if _S.file is None:
        _S.file = _read_cache_file()
    return _S.file["entries"].setdefault(_env_key(device), {})


def _write_cache(device: torch.device, key: str, rec: dict) -> None:
    """Merge this decision into dispatch.json (re-read first: other processes may have added theirs),
    then write it atomically. A read-only cache dir costs the memory only, never the run."""
    doc = _read_cache_file(quiet=True) if os.path.exists(cache_path()) else {"version": 1, "entries": {}}
    doc.setdefault("version", 1)
    doc["entries"].setdefault(_env_key(device), {})[key] = rec
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            json.dump(doc, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        print(f"fastkd: cannot write the dispatch cache {path} ({e}); decisions kept for this run only",
              file=sys.stderr)
    _S.file = doc


def clear_decisions() -> None:
    """Forget this process's decisions (the file stays; tests and benches)."""
    _S.memo.clear()
    _S.decided.clear()
    _S.pending.clear()
    _S.slack_ms = None
    _S.file = None
    _S.env_key = None


def decisions() -> dict[str, dict]:
    """Signature key → {op, path, triton_ms, compiled_ms, source: measured | cache | trace-default}."""
    return {k: dict(v) for k, v in _S.decided.items()}


def op_summary() -> dict[str, dict]:
    """Per op, the decision of its most-called (here: first decided) signature, for one-line reports."""
    out: dict[str, dict] = {}
    for rec in _S.decided.values():
        out.setdefault(rec["op"], rec)
    return out


def _clone_like(x: Tensor, grad: bool) -> Tensor:
    """A copy of ``x`` with the same size, strides (a strided view stays one) and values."""
    y = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    y.copy_(x.detach())
    return y.requires_grad_(grad)


def patch_view(x: Tensor) -> tuple[Tensor, int] | None:
    """(base, P) when ``x`` is exactly ``base[:, P:]`` of a 3-D ``[B, P+N, D]`` tensor (what ViTKD's taps
    pass: a block output's patch rows), else None. Eager only: ``_base`` of a traced view is not relied on."""
    base = x._base
    if base is None or torch.compiler.is_compiling() or base.dim() != 3 or x.dim() != 3:
        return None
    P = base.shape[1] - x.shape[1]
    same = (
        P > 0
        and base.dtype == x.dtype
        and base.requires_grad == x.requires_grad
        and (base.shape[0], base.shape[2]) == (x.shape[0], x.shape[2])
        and base.stride() == x.stride()
        and x.storage_offset() == base.storage_offset() + P * base.stride(1)
    )
    return (base, P) if same else None


def _clone_args(obj, leaves: list):
    if isinstance(obj, Tensor):
        grad = obj.is_floating_point() and obj.requires_grad and torch.is_grad_enabled()
        pv = patch_view(obj)
        if pv is not None:  # a patch view stays a view of a copied base, and the gradient goes to that base,
            base = _clone_like(pv[0], grad)  # as in training: each path pays (or skips) what it does there
            if grad:
                leaves.append(base)
            return base[:, pv[1] :]
        y = _clone_like(obj, grad)
        if grad:
            leaves.append(y)
        return y
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_clone_args(o, leaves) for o in obj)
    if isinstance(obj, torch.nn.Module) and torch.is_grad_enabled():
        # a module argument (ViTKD's generator) is trained in the step: its weight gradients are part of
        # each path's backward (cuDNN's weight-gradient convolutions differ by input layout), so they are
        # timed too. ``autograd.grad`` returns them; nothing accumulates into ``.grad``.
        leaves.extend(p for p in obj.parameters() if p.requires_grad)
    return obj


def _outputs(out) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [o for o in out if isinstance(o, Tensor)]
    return []


def _measure(name: str, runners: dict[str, Callable], args, kwargs, device: torch.device, timer=None) -> dict:
    """Time each path on copies of the real inputs: fwd (+bwd w.r.t. what needs a gradient)."""
    leaves: list[Tensor] = []
    cargs = _clone_args(args, leaves)
    ckw = {k: _clone_args(v, leaves) for k, v in kwargs.items()}

    def make(fn):
        def run():
            outs = [o for o in _outputs(fn(*cargs, **ckw)) if o.is_floating_point()]
            if leaves and any(o.requires_grad for o in outs):
                total = sum(o.float().sum() for o in outs if o.requires_grad)
                torch.autograd.grad(total, leaves, allow_unused=True)

        return run

    runs = {p: make(fn) for p, fn in runners.items()}
    times: dict[str, list[dict[str, float]]] = {p: [] for p in runs}
    errors: dict[str, str] = {}
    for p, run in runs.items():  # warm-up: compilation, autotuning, allocator
        try:
            for _ in range(_WARMUP):
                run() if timer is None else None
        except Exception as e:  # a path that fails here is never chosen
            errors[p] = f"{type(e).__name__}: {e}"[:300]
    for _ in range(_REPS):  # interleaved, so drift hits both paths alike
        for p, run in runs.items():
            if p in errors:
                continue
            try:
                t = timer(p, run) if timer is not None else cuda_times(run, device)
            except Exception as e:
                errors[p] = f"{type(e).__name__}: {e}"[:300]
                continue
            times[p].append(as_times(t))
    med = {
        p: {m: statistics.median(t[m] for t in ts) for m in ("wall", "gpu", "host")}
        for p, ts in times.items()
        if ts and p not in errors
    }
    rec = {"op": name, "source": "measured", "reps": _REPS}
    for p in runners:
        for m, suffix in (("wall", "_ms"), ("gpu", "_gpu_ms"), ("host", "_host_ms")):
            rec[p + suffix] = round(med[p][m], 4) if p in med else None
    if errors:
        rec["errors"] = errors
    # traced form: the step's graph inlines the reference (GPU time, no host work of its own; the H200,
    # 2026-11-27: NKD's Triton path won standalone, 1.09 vs 1.22 ms wall at 0.02 ms GPU, and cost the step)
    inlined = rec["inlined"] = traced_form()
    # ties go to the compiled reference (the path --compile alone runs)
    for m in ("wall", "gpu"):
        cost = {p: med[p]["gpu" if inlined and p == "compiled" else m] for p in med}
        rec[f"{m}_path"] = min(cost, key=lambda p: (cost[p], p != "compiled")) if med else "reference"
    return _use(rec, "wall")


def _use(rec: dict, rule: str) -> dict:
    """Make ``rec`` take its answer under ``rule`` ("wall" or "gpu"): its ``path`` is then that answer."""
    rec["path"], rec["rule"] = rec[f"{rule}_path"], rule
    return rec


def decide(name: str, xs: Sequence[Tensor], runners: dict[str, Callable], args, kwargs, timer=None) -> str:
    """The path of an eager call in measured mode: memo → this process → dispatch.json → measure."""
    fk = _fast_key(name, xs)
    hit = _S.memo.get(fk)
    if hit is None:
        key = sig_key(name, xs)
        rec = _S.decided.get(key)
        if rec is None:
            device = xs[0].device
            cached = _cache_entries(device).get(key)
            # measured again: a record without both answers or (traced) from before the inlined rule
            fresh = isinstance(cached, dict) and "gpu_path" in cached and "inlined" in cached
            if fresh and cached.get("path") in runners:
                rec = _use({**cached, "op": name, "source": "cache"}, "wall")
            else:
                rec = _measure(name, runners, args, kwargs, device, timer)
                _write_cache(device, key, {k: v for k, v in rec.items() if k not in ("source", "rule")})
            _S.decided[key] = rec
            _S.pending.discard(key)
        hit = _S.memo[fk] = (key, rec)  # the record itself: a rebalance updates it in place
    key, rec = hit
    if _S.counts is not None:  # the balance pass counts each signature's calls per step
        _S.counts[key] = _S.counts.get(key, 0) + 1
    return rec["path"]


def rebalance(slack_ms: float, calls: dict[str, int] | None = None) -> list[str]:
    """Re-decide for a step whose GPU time exceeds its host time by ``slack_ms`` (its *slack*).

    Each decision keeps two answers: the faster path on wall time with the host in the loop (``wall_path``;
    the default, right for a host-bound step) and on GPU time with the host's work hidden (``gpu_path``).
    In a GPU-bound step the host runs ahead, so an op's cost there is its GPU time as long as the host
    stays ahead. Ops whose GPU-time path differs are switched to it, largest GPU saving first (times its
    calls per step, ``calls``: signature key → count), while the switched paths' host time, whole (their
    other path may cost no host time at all when it is inlined in a compiled step) and counted with the
    GPU time they save, fits in half the slack (margin for the step's backward, whose slack is not
    measured, and for noise). With ``calls`` given, a signature it does not count (such as an online
    teacher's op, outside the timed forward) keeps its wall answer. Returns the keys switched. The records
    change in place, so eager calls read the new paths; a ``torch.compile`` trace after this reads them
    too."""
    _S.slack_ms = float(slack_ms)
    budget = 0.5 * max(float(slack_ms), 0.0)
    cands = []
    for key, rec in _S.decided.items():
        _use(rec, "wall")
        wp, gp = rec["wall_path"], rec["gpu_path"]
        if gp == wp or rec.get(f"{gp}_gpu_ms") is None or rec.get(f"{wp}_gpu_ms") is None:
            continue
        n = 1 if calls is None else calls.get(key, 0)
        if n == 0:
            continue  # not run by the timed forward (e.g. the online teacher's ops): its count is unknown
        saving = n * (rec[f"{wp}_gpu_ms"] - rec[f"{gp}_gpu_ms"])
        cost = n * (rec.get(f"{gp}_host_ms") or 0.0) + saving
        cands.append((saving, key, cost))
    switched = []
    for saving, key, cost in sorted(cands, key=lambda c: (-c[0], c[1])):
        if saving > 0 and cost <= budget:
            budget -= cost
            _use(_S.decided[key], "gpu")
            switched.append(key)
    return switched


def apply_switched(keys) -> list[str]:
    """Restore a ``rebalance`` outcome (a resumed run, so that it takes the paths the original took): the
    signatures in ``keys`` take their GPU-time answer, every other its wall answer. Returns those applied."""
    wanted, applied = set(keys), []
    for key, rec in _S.decided.items():
        _use(rec, "gpu" if key in wanted else "wall")
        if key in wanted:
            applied.append(key)
    return applied


def step_balance(run: Callable[[], object], device: torch.device, timer=None) -> tuple[float, float, dict]:
    """(host ms, GPU ms, calls per signature) of one ``run()`` of a step forward (``timing.host_and_span_ms``;
    tests pass ``timer("step", run)`` → {"host": …, "gpu": …})."""
    _S.counts = {}
    try:
        if timer is not None:
            t = timer("step", run)
            host, gpu = float(t["host"]), float(t["gpu"])
        else:
            host, gpu = host_and_span_ms(run, device)
        return host, gpu, dict(_S.counts)
    finally:
        _S.counts = None


@torch._dynamo.assume_constant_result
def traced_choice(key: str) -> str:
    """Inside a torch.compile trace: the decision for ``key`` (a constant of the graph), or "compiled"
    when none was made (recorded as pending: the path --compile alone runs)."""
    rec = _S.decided.get(key)
    if rec is None:
        _S.pending.add(key)
        return "compiled"
    return rec["path"]


class CalibratedStep:
    """``compile_step``'s (and ``calibrate_step``'s) callable. Before the first call of the step:

    1. one eager forward of the module lets every fused op measure on its real inputs;
    2. a second one times the step forward's host work against its GPU work (``step_balance``);
    3. ``rebalance`` then moves ops to their faster path on GPU time where the host's slack hides their
       host work.

    Both forwards keep the RNG state and drop their output. Then the wrapped callable (``torch.compile``'d
    or the module itself) runs, and reads the final decisions. A resumed run sets ``restore`` (the
    original's switched signatures, from its checkpoint) and takes those paths instead of steps 2–3, so a
    resume stays exact."""

    def __init__(self, module: torch.nn.Module, compiled: Callable, active: Callable[[], bool],
                 timer: Callable[[], Callable | None] = lambda: None, traced: bool = False):
        self.module, self.compiled, self.active, self.timer = module, compiled, active, timer
        self.traced = traced  # ``compiled`` is a torch.compile'd module: calibrate in the traced form
        self.calibrated = False
        self.balance: dict | None = None  # {host_ms, gpu_ms, slack_ms, switched}: what step 2 found
        self.restore: list[str] | None = None  # a resumed run: the switched signatures of the original

    def __call__(self, *args, **kwargs):
        if not self.calibrated:
            self.calibrated = True
            if self.active():
                _S.traced_form = self.traced
                try:
                    self._calibrate(args, kwargs)
                finally:
                    _S.traced_form = False
        return self.compiled(*args, **kwargs)

    def _calibrate(self, args, kwargs):
        """Steps 1–3 (or the restore of a resumed run), in the form the wrapped step runs its ops."""
        inner = getattr(self.module, "module", self.module)  # DDP: no reducer bookkeeping
        devs = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devs):
            inner(*args, **kwargs)
        timer = self.timer()
        if self.restore is not None:  # resumed: the original run's paths, not a new measurement
            self.balance = {"switched": apply_switched(self.restore), "restored": True}
        elif timer is not None or devs:
            device = torch.device("cuda", devs[0]) if devs else torch.device("cpu")
            try:
                with torch.random.fork_rng(devices=devs):
                    host, gpu, calls = step_balance(lambda: inner(*args, **kwargs), device, timer)
            except Exception as e:  # the balance is an optimisation: without it the wall rule stands
                self.balance = {"error": f"{type(e).__name__}: {e}"[:300]}
            else:
                switched = rebalance(gpu - host, calls)
                self.balance = {"host_ms": round(host, 3), "gpu_ms": round(gpu, 3),
                                "slack_ms": round(gpu - host, 3), "switched": switched}

    def __getattr__(self, name):
        return getattr(self.__dict__["compiled"], name)
