"""Loss dispatch: the public loss API of ``fastkd.ops.reference``, routed to the fastest valid path.

Paths (``describe()`` says which in one line; the trainer prints it once):

* ``reference`` — the eager pure-torch reference. Used when fused mode is off (``set_fused(False)``,
  the default), under ``FASTKD_KERNELS=0|reference``, and for inputs the kernels do not take (fp64 or
  fp16 tensors, top-K records with K > 256).
* ``triton`` — the Triton kernels of ``fastkd.kernels`` (registered torch custom ops, so
  ``torch.compile(fullgraph=True)`` works).
* ``compiled`` — ``torch.compile`` of the reference function (same values). Inside an outer
  ``torch.compile`` (``--fused --compile``) the reference is simply inlined into the outer graph.

**Measured dispatch** (fused mode on CUDA with Triton, ``FASTKD_KERNELS=auto``, the default): for each op
and input *signature* — op, autocast dtype, and per tensor its dtype, stride pattern (contiguous or a
strided view), shape bucket (rows = product of the leading dims rounded up to a power of two, the last
dim exact) and whether it needs a gradient — the first eager call times the Triton path and the compiled
reference on copies of its real inputs (same strides), fwd+bwd when a gradient is needed, with CUDA
events (2 warm-up calls, then the median of 5, the two paths interleaved), and keeps the faster for the
run. The choice is remembered in ``$FASTKD_CACHE_DIR/dispatch.json`` (default
``$XDG_CACHE_HOME/fastkd`` or ``~/.cache/fastkd``), keyed by GPU name, torch, triton and fastkd version,
written atomically; a corrupt file is ignored with one line.

Under ``torch.compile`` tracing the tensors are fake, so nothing can be timed there. ``compile_step(module)``
(the trainer's ``--compile``) therefore runs the module's forward once eagerly before the first compiled
call, RNG state preserved: each fused op meets its real training inputs, measures, and the trace then
reads the decision (a ``torch._dynamo.assume_constant_result`` lookup keyed by the same signature: shapes
are turned into constants by comparisons, so it also works once dims are dynamic). A signature the trace
meets with no decision takes ``compiled`` — exactly what ``--compile`` alone runs — so ``--fused`` is never
slower than the compiled reference by construction.

``FASTKD_KERNELS=auto|triton|compiled|reference`` overrides (``0`` = ``reference``, ``1`` = ``auto``).
On CPU fused mode is the compiled reference (Triton needs CUDA) whatever the setting, except in tests:
``set_fused(True, interpreter=True)`` sends CPU tensors to the Triton kernels (run them under
``TRITON_INTERPRET=1``).

Kernel-covered functions (same names and signatures as the reference): ``kd_loss``, ``kd_loss_topk``,
``nkd_loss``, ``nkd_loss_topk``, ``vitkd_mimic_loss``, ``vitkd_gen_loss``, ``cls_patch_map``,
``cls_patch_map_loss``, plus the fused ``token_kd`` (mimic + map + CLS-embedding inputs of one layer
pair in one pass). Every other reference function is re-exported unchanged (same object).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch._dynamo
import torch.nn.functional as F

from fastkd.ops import reference as R
from fastkd.ops.reference import (  # noqa: F401  (re-exported: not kernel-covered)
    ald,
    cls_embed_loss,
    cskd_alpha,
    cskd_loss,
    deit_hard_loss,
    manifold_loss,
    random_token_mask,
)

Tensor = torch.Tensor

__all__ = [
    "set_fused",
    "is_fused",
    "refresh_env",
    "describe",
    "active_path",
    "kernels_mode",
    "decisions",
    "dispatch_record",
    "compile_step",
    "cache_path",
    "clear_decisions",
    "TokenKD",
    "token_kd",
    "kd_loss",
    "kd_loss_topk",
    "nkd_loss",
    "nkd_loss_topk",
    "vitkd_mimic_loss",
    "vitkd_gen_loss",
    "cls_patch_map",
    "cls_patch_map_loss",
    "cls_embed_loss",
    "random_token_mask",
    "ald",
    "manifold_loss",
    "cskd_loss",
    "cskd_alpha",
    "deit_hard_loss",
]

_FLOAT = (torch.float32, torch.bfloat16)  # what the kernels take; others use the reference


_MODES = ("auto", "triton", "compiled", "reference")
_ENV_ALIASES = {"0": "reference", "1": "auto", "": "auto", "off": "reference", "ref": "reference"}


def _env_mode() -> str:
    raw = os.environ.get("FASTKD_KERNELS", "auto").strip().lower()
    mode = _ENV_ALIASES.get(raw, raw)
    if mode not in _MODES:
        print(f"fastkd: FASTKD_KERNELS={raw!r} is not one of 0, 1, {', '.join(_MODES)}; using auto",
              file=sys.stderr)
        mode = "auto"
    return mode


class _State:
    """Process-wide dispatch state (one instance, ``_S``)."""

    def __init__(self):
        self.fused = False
        self.interpreter = False
        self.mode = _env_mode()
        self.env_off = self.mode == "reference"
        self.kernels = None  # the imported kernel modules, once the Triton path is needed
        self.compiled: dict[str, Callable] = {}  # torch.compile'd reference functions, by name
        self.memo: dict[tuple, str] = {}  # exact call key → path (the per-call fast lookup)
        self.decided: dict[str, dict] = {}  # signature key → decision record (this process)
        self.pending: set[str] = set()  # signatures a trace met with no decision (took "compiled")
        self.file: dict | None = None  # dispatch.json, loaded lazily
        self.env_key: str | None = None
        self.timer: Callable | None = None  # tests: timer(path, run) → ms, instead of CUDA events
        self.measure_devices = ("cuda",)  # tests add "cpu" (with an injected timer)


_S = _State()


def refresh_env() -> None:
    """Re-read ``FASTKD_KERNELS`` (auto | triton | compiled | reference; 0 = reference)."""
    _S.mode = _env_mode()
    _S.env_off = _S.mode == "reference"
    _S.memo.clear()


def kernels_mode() -> str:
    """The ``FASTKD_KERNELS`` setting in force: auto, triton, compiled or reference."""
    return _S.mode


def set_fused(on: bool, *, interpreter: bool = False) -> None:
    """Turn fused mode on or off (process-wide). ``interpreter=True`` (tests only) sends CPU tensors to the
    Triton kernels too, which then run in the Triton interpreter (set ``TRITON_INTERPRET=1`` first)."""
    _S.fused = bool(on)
    _S.interpreter = bool(on and interpreter)
    refresh_env()
    if _S.fused and _S.mode in ("auto", "triton") and (_S.interpreter or _cuda_triton_ok()):
        _load_kernels()


def is_fused() -> bool:
    return _S.fused


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # checked once: not traceable


def _triton_installed() -> bool:
    return _TRITON_INSTALLED


def _cuda_triton_ok() -> bool:
    return torch.cuda.is_available() and _triton_installed()


def _load_kernels():
    """Import the kernel modules (outside any traced region: ``set_fused`` calls this eagerly)."""
    if _S.kernels is None:
        from fastkd.kernels import logit_kd, masked_gen, token_kd

        class _K:
            pass

        k = _K()
        k.logit_kd, k.masked_gen, k.token_kd = logit_kd, masked_gen, token_kd
        _S.kernels = k
    return _S.kernels


def _kern():
    return _S.kernels if _S.kernels is not None else _load_kernels()


def describe(device: torch.device | str | None = None) -> str:
    """One line naming the loss path fused mode takes on ``device`` (default: CUDA if available); with
    measured dispatch, each op's choice and both timings so far."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if not _S.fused:
        return "reference losses (eager torch; --fused is off)"
    if _S.env_off:
        return "reference losses (FASTKD_KERNELS=0 forces the reference path)"
    if dev.type == "cpu" and _S.interpreter:
        return "fused Triton kernels in the Triton interpreter (CPU, tests only)"
    if dev.type == "cuda" and _triton_installed():
        import triton

        if _S.mode == "triton":
            return f"fused Triton kernels (triton {triton.__version__}) on {dev} (FASTKD_KERNELS=triton)"
        if _S.mode == "compiled":
            return f"compiled reference losses on {dev} (FASTKD_KERNELS=compiled)"
        ops = _op_summary()
        if not ops:
            return (f"measured dispatch on {dev} (triton {triton.__version__}): each fused op times Triton vs "
                    f"the compiled reference at its first call; choices cached in {cache_path()}")
        parts = [
            f"{op} {r['path']}"
            + (f" ({_ms(r.get('triton_ms'))} triton / {_ms(r.get('compiled_ms'))} compiled ms)"
               if r.get("triton_ms") is not None or r.get("compiled_ms") is not None else "")
            for op, r in ops.items()
        ]
        return f"measured dispatch on {dev}: " + "; ".join(parts)
    why = "Triton kernels need CUDA" if dev.type != "cuda" else "Triton is not installed"
    return f"compiled reference losses (torch.compile on {dev.type}; {why})"


def _ms(x) -> str:
    return "—" if x is None else f"{x:.3g}"


def _base_path(xs: Sequence[Tensor]) -> str:
    """The path before measurement: reference / compiled / triton / "measure" (CUDA auto mode)."""
    if not _S.fused or _S.env_off:
        return "reference"
    dev = xs[0].device if xs else torch.device("cpu")
    kernels_here = (dev.type == "cuda" and _triton_installed()) or (dev.type == "cpu" and _S.interpreter)
    if not kernels_here:
        if dev.type in _S.measure_devices and dev.type != "cuda" and _S.timer is not None and _S.mode == "auto":
            return "measure"  # tests: measured dispatch on CPU with an injected timer
        return "compiled"
    if not all(x.dtype in _FLOAT for x in xs if x.is_floating_point()):
        return "reference"  # e.g. fp64 / fp16: the kernels take fp32 and bf16
    if _S.mode in ("triton", "compiled"):
        return _S.mode
    if dev.type == "cpu":  # the interpreter (tests): always the kernels
        return "triton"
    return "measure"


def active_path(*tensors: Tensor | None) -> str:
    """ "reference", "triton" or "compiled": the path a call with these tensors takes (``"auto"``:
    measured dispatch, decided per op and signature at the first call — see ``decisions()``)."""
    xs = [x for x in tensors if x is not None]
    path = _base_path(xs)
    return "auto" if path == "measure" else path


def _compiled(name: str, fn: Callable | None = None) -> Callable:
    if name not in _S.compiled:
        _S.compiled[name] = torch.compile(fn or getattr(R, name))
    return _S.compiled[name]


def _call(name: str, path: str, *args, **kwargs):
    """Run reference function ``name`` eagerly or compiled, per ``path``."""
    fn = getattr(R, name)
    return _compiled(name)(*args, **kwargs) if path == "compiled" else fn(*args, **kwargs)


def _needs_grad(x: Tensor) -> bool:
    return x.requires_grad and torch.is_grad_enabled()


def _unit_stride(x: Tensor) -> Tensor:
    return x if x.dim() == 0 or x.stride(-1) == 1 else x.contiguous()


def fused(tensors: Callable[..., tuple], unsupported: Callable[..., bool] | None = None):
    """Make a Triton implementation the dispatching version of the reference function of the same name.

    ``tensors(*args, **kwargs)`` → the tensors that decide the path and key the measured decision (none:
    the reference); ``unsupported(*args, **kwargs)`` → True for inputs the kernels do not take (then the
    eager reference). Paths other than "triton" call the reference, eagerly or ``torch.compile``d; the
    decorated function runs only on the Triton path. The wrapper carries the reference's name, signature
    and docstring.
    """

    def deco(kernel_fn: Callable) -> Callable:
        name = kernel_fn.__name__
        ref = getattr(R, name)
        runners = {"triton": kernel_fn, "compiled": lambda *a, **k: _compiled(name)(*a, **k)}

        @functools.wraps(ref)
        def dispatched(*args, **kwargs):
            ts = tensors(*args, **kwargs)
            xs = [x for x in ts if x is not None] if ts else []
            if not xs:
                return ref(*args, **kwargs)
            path = _base_path(xs)
            if path in ("triton", "measure") and unsupported is not None and unsupported(*args, **kwargs):
                path = "reference"
            if path == "measure":
                path = _choose(name, xs, runners, args, kwargs)
            if path == "triton":
                return kernel_fn(*args, **kwargs)
            return _call(name, path, *args, **kwargs)

        dispatched.kernel_fn = kernel_fn
        return dispatched

    return deco


# ------------------------------------------------------------------------------- measured dispatch
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
    for n, st in zip(reversed(size), reversed(stride), strict=True):
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
    dev = xs[0].device.type if xs else "cpu"
    if dev == "cuda" and torch.is_autocast_enabled("cuda"):
        return "amp-" + str(torch.get_autocast_dtype("cuda")).removeprefix("torch.")
    return "noamp"


def _sig_key(name: str, xs: Sequence[Tensor]) -> str:
    """op | autocast | per tensor dtype:stride pattern:rows bucket x width[g]: the decision's key."""
    return "|".join([name, _amp_tag(xs), *(_tensor_sig(x) for x in xs)])


def _fast_key(name: str, xs: Sequence[Tensor]) -> tuple:
    """Exact per-call key (eager only): (name, amp, grad mode, per tensor dtype/size/stride/requires_grad)."""
    amp = xs[0].device.type == "cuda" and torch.is_autocast_enabled("cuda") if xs else False
    return (name, amp, torch.is_grad_enabled(),
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
    _S.file = None
    _S.env_key = None


def decisions() -> dict[str, dict]:
    """Signature key → {op, path, triton_ms, compiled_ms, source: measured | cache | trace-default}."""
    return {k: dict(v) for k, v in _S.decided.items()}


def _op_summary() -> dict[str, dict]:
    """Per op, the decision of its most-called (here: first decided) signature, for one-line reports."""
    out: dict[str, dict] = {}
    for rec in _S.decided.values():
        out.setdefault(rec["op"], rec)
    return out


def dispatch_record(device: torch.device | str | None = None) -> dict:
    """What summary.json records: mode, the one-line description, and per op (and signature) the path
    used and both timings."""
    ops: dict[str, list] = {}
    for key, rec in _S.decided.items():
        ops.setdefault(rec["op"], []).append({"signature": key, **{k: v for k, v in rec.items() if k != "op"}})
    return {
        "fused": _S.fused,
        "mode": _S.mode,
        "describe": describe(device),
        "cache": cache_path() if _S.fused and _S.mode == "auto" else None,
        "ops": ops,
        "pending": sorted(_S.pending),
    }


def _clone_like(x: Tensor, grad: bool) -> Tensor:
    """A copy of ``x`` with the same size, strides (a strided view stays one) and values."""
    y = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    y.copy_(x.detach())
    return y.requires_grad_(grad)


def _clone_args(obj, leaves: list):
    if isinstance(obj, Tensor):
        grad = obj.is_floating_point() and obj.requires_grad and torch.is_grad_enabled()
        y = _clone_like(obj, grad)
        if grad:
            leaves.append(y)
        return y
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_clone_args(o, leaves) for o in obj)
    return obj


def _outputs(out) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [o for o in out if isinstance(o, Tensor)]
    return []


def _cuda_time(run: Callable[[], None], device: torch.device) -> float:
    """One timed call in ms (CUDA events)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _measure(name: str, runners: dict[str, Callable], args, kwargs, device: torch.device) -> dict:
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
    times: dict[str, list[float]] = {p: [] for p in runs}
    errors: dict[str, str] = {}
    for p, run in runs.items():  # warm-up: compilation, autotuning, allocator
        try:
            for _ in range(_WARMUP):
                run() if _S.timer is None else None
        except Exception as e:  # a path that fails here is never chosen
            errors[p] = f"{type(e).__name__}: {e}"[:300]
    for _ in range(_REPS):  # interleaved, so drift hits both paths alike
        for p, run in runs.items():
            if p in errors:
                continue
            try:
                ms = _S.timer(p, run) if _S.timer is not None else _cuda_time(run, device)
            except Exception as e:
                errors[p] = f"{type(e).__name__}: {e}"[:300]
                continue
            times[p].append(float(ms))
    med = {p: statistics.median(t) for p, t in times.items() if t and p not in errors}
    rec = {"op": name, "source": "measured", "reps": _REPS}
    for p in runners:
        rec[f"{p}_ms"] = round(med[p], 4) if p in med else None
    if errors:
        rec["errors"] = errors
    # ties go to the compiled reference (the path --compile alone runs)
    rec["path"] = min(med, key=lambda p: (med[p], p != "compiled")) if med else "reference"
    return rec


def _decide(name: str, xs: Sequence[Tensor], runners: dict[str, Callable], args, kwargs) -> str:
    """The path of an eager call in measured mode: memo → this process → dispatch.json → measure."""
    fk = _fast_key(name, xs)
    path = _S.memo.get(fk)
    if path is not None:
        return path
    key = _sig_key(name, xs)
    rec = _S.decided.get(key)
    device = xs[0].device
    if rec is None:
        cached = _cache_entries(device).get(key)
        if isinstance(cached, dict) and cached.get("path") in runners:
            rec = {**cached, "op": name, "source": "cache"}
        else:
            rec = _measure(name, runners, args, kwargs, device)
            _write_cache(device, key, {k: v for k, v in rec.items() if k != "source"})
        _S.decided[key] = rec
        _S.pending.discard(key)
    _S.memo[fk] = rec["path"]
    return rec["path"]


@torch._dynamo.assume_constant_result
def _traced_choice(key: str) -> str:
    """Inside a torch.compile trace: the decision for ``key`` (a constant of the graph), or "compiled"
    when none was made (recorded as pending: the path --compile alone runs)."""
    rec = _S.decided.get(key)
    if rec is None:
        _S.pending.add(key)
        return "compiled"
    return rec["path"]


def _choose(name: str, xs: Sequence[Tensor], runners: dict[str, Callable], args, kwargs) -> str:
    path = _base_path(xs)
    if path != "measure":
        return path
    if torch.compiler.is_compiling():
        return _traced_choice(_sig_key(name, xs))
    return _decide(name, xs, runners, args, kwargs)


class _CalibratedStep:
    """``compile_step``'s callable: before the first compiled call, one eager forward of the module (RNG
    state preserved, output dropped) lets every fused op measure on its real inputs."""

    def __init__(self, module: torch.nn.Module, compiled: Callable):
        self.module, self.compiled, self.calibrated = module, compiled, False

    def __call__(self, *args, **kwargs):
        if not self.calibrated:
            self.calibrated = True
            if _S.fused and _S.mode == "auto" and (_cuda_triton_ok() or _S.timer is not None):
                inner = getattr(self.module, "module", self.module)  # DDP: no reducer bookkeeping
                devs = [torch.cuda.current_device()] if torch.cuda.is_available() else []
                with torch.random.fork_rng(devices=devs):
                    inner(*args, **kwargs)
        return self.compiled(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.__dict__["compiled"], name)


def compile_step(module: torch.nn.Module, **compile_kwargs) -> Callable:
    """``torch.compile(module)`` whose first call measures the fused ops eagerly first (see the module
    docstring: nothing can be timed on fake tensors)."""
    return _CalibratedStep(module, torch.compile(module, **compile_kwargs))


# ------------------------------------------------------------------------------------------ logit KD
@fused(lambda s_logits, t_logits, *a, **k: (s_logits, t_logits))
def kd_loss(s_logits: Tensor, t_logits: Tensor, T: float = 4.0) -> Tensor:
    k = _kern().logit_kd
    s, t = _unit_stride(s_logits), _unit_stride(t_logits.detach())
    dummy = torch.empty(0, dtype=torch.long, device=s.device)
    return k.logit_kd_op(s, t, dummy, float(T), 1.0, False, _needs_grad(s))[0]


@fused(lambda s_logits, t_logits, *a, **k: (s_logits, t_logits), lambda s, *a, **k: s.dim() != 2)
def nkd_loss(
    s_logits: Tensor, t_logits: Tensor, target: Tensor, tau: float = 1.0, gamma: float = 1.0
) -> Tensor:
    B, C = s_logits.shape
    y = R._labels(target, B, C)
    k = _kern().logit_kd
    s, t = _unit_stride(s_logits), _unit_stride(t_logits.detach())
    return k.logit_kd_op(s, t, y, float(tau), float(gamma), True, _needs_grad(s))[0]


def _topk_ok(t_vals: Tensor) -> bool:
    return t_vals.dim() == 2 and t_vals.shape[1] <= _kern().logit_kd.MAX_TOPK


# top-K records: the student's logits decide the path (the record's values may be fp16; the launcher
# checks them); K above the kernels' MAX_TOPK takes the reference
@fused(lambda s_logits, *a, **k: (s_logits,), lambda s_logits, t_vals, *a, **k: not _topk_ok(t_vals))
def kd_loss_topk(s_logits: Tensor, t_vals: Tensor, t_ids: Tensor, t_lse: Tensor, T: float = 4.0) -> Tensor:
    k = _kern().logit_kd
    s = _unit_stride(s_logits)
    dummy = torch.empty(0, dtype=torch.long, device=s.device)
    vals, ids, lse = _unit_stride(t_vals.detach()), _unit_stride(t_ids), t_lse.detach()
    return k.logit_kd_topk_op(s, vals, ids, lse, dummy, float(T), 1.0, False, _needs_grad(s))[0]


@fused(
    lambda s_logits, *a, **k: (s_logits,),
    lambda s_logits, t_vals, *a, **k: not _topk_ok(t_vals) or s_logits.dim() != 2,
)
def nkd_loss_topk(
    s_logits: Tensor,
    t_vals: Tensor,
    t_ids: Tensor,
    t_lse: Tensor,
    target: Tensor,
    tau: float = 1.0,
    gamma: float = 1.0,
) -> Tensor:
    B, C = s_logits.shape
    y = R._labels(target, B, C)
    k = _kern().logit_kd
    s = _unit_stride(s_logits)
    vals, ids, lse = _unit_stride(t_vals.detach()), _unit_stride(t_ids), t_lse.detach()
    return k.logit_kd_topk_op(s, vals, ids, lse, y, float(tau), float(gamma), True, _needs_grad(s))[0]


# ---------------------------------------------------------------------------------------- token KD
class TokenKD(NamedTuple):
    """Outputs of ``token_kd`` (None where not requested).

    mimic: 0-d Σ_{n,d} (W s + b − t)² over patch tokens (raw sum; ViTKD multiplies by α/B);
    cls_map: 0-d mean over B·N of (a_t − a_s)² (the [CLS]-KD map loss);
    s_cls [B, D_s] / t_cls [B, D_t]: norm of the student / teacher CLS token, fp32 — the inputs of
    ``cls_embed_loss`` (which re-normalises them: a no-op up to rounding).
    """

    mimic: Tensor | None
    cls_map: Tensor | None
    s_cls: Tensor | None
    t_cls: Tensor | None


def _token_kd_reference(s_tokens, t_tokens, weight, bias, num_prefix_s, num_prefix_t, mimic, cls_map):
    mim = cmap = s_cls = t_cls = None
    if mimic:
        B = s_tokens.shape[0]
        mim = R.vitkd_mimic_loss(
            [s_tokens[:, num_prefix_s:]], [t_tokens[:, num_prefix_t:]], [weight], [bias], alpha=float(B)
        )
    if cls_map:
        cmap = R.cls_patch_map_loss(s_tokens, t_tokens, num_prefix_s, num_prefix_t)
        s_cls = F.normalize(s_tokens[:, 0].to(cmap.dtype), dim=-1, eps=1e-12)
        t_cls = F.normalize(t_tokens[:, 0].detach().to(cmap.dtype), dim=-1, eps=1e-12)
    return TokenKD(mim, cmap, s_cls, t_cls)


def token_kd(
    s_tokens: Tensor,
    t_tokens: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    num_prefix_s: int = 1,
    num_prefix_t: int = 1,
    mimic: bool = True,
    cls_map: bool = True,
) -> TokenKD:
    """Mimic MSE + CLS–patch map loss + CLS-embedding inputs of one layer pair, in one pass.

    s_tokens [B, P_s+N, D_s], t_tokens [B, P_t+N, D_t] (all tokens, CLS at index 0); weight [D_t, D_s] /
    bias [D_t] of the mimic projection (None = identity / 0). Returns ``TokenKD`` (see its docstring).
    """
    if not (mimic or cls_map):
        raise ValueError("token_kd: nothing to compute; pass mimic=True and/or cls_map=True")
    args = (s_tokens, t_tokens, weight, bias, num_prefix_s, num_prefix_t, mimic, cls_map)
    xs = [x for x in (s_tokens, t_tokens, weight, bias) if x is not None]
    path = _choose("token_kd", xs, _TOKEN_KD_RUNNERS, args, {})
    if path == "reference":
        return _token_kd_reference(*args)
    if path == "compiled":
        return _token_kd_compiled(*args)
    return _token_kd_triton(*args)


def _token_kd_compiled(*args) -> TokenKD:
    return TokenKD(*_compiled("_token_kd", _token_kd_reference)(*args))


def _token_kd_triton(s_tokens, t_tokens, weight, bias, num_prefix_s, num_prefix_t, mimic, cls_map) -> TokenKD:
    k = _kern().token_kd
    mim, msum, _, s_cls, t_cls, _ = k.token_kd_op(
        _unit_stride(s_tokens),
        _unit_stride(t_tokens.detach()),
        weight if mimic else None,
        bias if mimic else None,
        num_prefix_s,
        num_prefix_t,
        mimic,
        cls_map,
    )
    if not cls_map:
        return TokenKD(mim, None, None, None)
    B, N = s_tokens.shape[0], s_tokens.shape[1] - num_prefix_s
    return TokenKD(mim if mimic else None, msum / (B * N), s_cls, t_cls)


_TOKEN_KD_RUNNERS = {"triton": _token_kd_triton, "compiled": _token_kd_compiled}


def _mimic_tensors(s_feats, t_feats, weights=None, biases=None, *a, **k):
    n = len(s_feats)
    ws = [None] * n if weights is None else list(weights)
    bs = [None] * n if biases is None else list(biases)
    return (*s_feats, *t_feats, *ws, *bs)


def _mimic_unsupported(s_feats, t_feats, weights=None, biases=None, *a, **k):
    n = len(s_feats)
    return (
        len(t_feats) != n
        or (weights is not None and len(weights) != n)
        or (biases is not None and len(biases) != n)
    )


@fused(_mimic_tensors, _mimic_unsupported)
def vitkd_mimic_loss(
    s_feats: Sequence[Tensor],
    t_feats: Sequence[Tensor],
    weights: Sequence[Tensor | None] | None,
    biases: Sequence[Tensor | None] | None,
    alpha: float = 3e-5,
) -> Tensor:
    """One kernel launch per layer."""
    n = len(s_feats)
    ws = [None] * n if weights is None else list(weights)
    bs = [None] * n if biases is None else list(biases)
    k = _kern().token_kd
    B = s_feats[0].shape[0]
    total = None
    for i, (s, t, w, b) in enumerate(zip(s_feats, t_feats, ws, bs, strict=True)):
        if s.dim() != 3 or t.dim() != 3 or s.shape[:2] != t.shape[:2] or s.shape[0] != B:
            raise ValueError(
                f"vitkd_mimic_loss layer {i}: student {tuple(s.shape)} and teacher {tuple(t.shape)} "
                f"need the same [B, N] (B={B})"
            )
        term = k.token_kd_op(_unit_stride(s), _unit_stride(t.detach()), w, b, 0, 0, True, False)[0]
        total = term if total is None else total + term
    return total * (alpha / B)


@fused(lambda tokens, *a, **k: (tokens,), lambda tokens, *a, **k: tokens.dim() != 3)
def cls_patch_map(tokens: Tensor, num_prefix: int = 1) -> Tensor:
    k = _kern().token_kd
    return k.token_kd_op(_unit_stride(tokens), None, None, None, num_prefix, 0, False, True)[2]


@fused(lambda s_tokens, t_tokens, *a, **k: (s_tokens, t_tokens), lambda s, *a, **k: s.dim() != 3)
def cls_patch_map_loss(
    s_tokens: Tensor, t_tokens: Tensor, num_prefix_s: int = 1, num_prefix_t: int = 1
) -> Tensor:
    return _token_kd_triton(s_tokens, t_tokens, None, None, num_prefix_s, num_prefix_t, False, True).cls_map


# ----------------------------------------------------------------------------------- ViTKD generation
def _gen_tensors(s_last, t_last, mask, weight, bias, mask_token, *a, **k):
    return (s_last, t_last, weight, bias, mask_token)


def _gen_unsupported(s_last, t_last, *a, **k):
    return s_last.dim() != 3 or t_last.dim() != 3


@fused(_gen_tensors, _gen_unsupported)
def vitkd_gen_loss(
    s_last: Tensor,
    t_last: Tensor,
    mask: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mask_token: Tensor,
    generator: Callable[[Tensor], Tensor],
    beta: float = 3e-6,
    mask_ratio: float = 0.5,
    *,
    grid: tuple[int, int] | None = None,
) -> Tensor:
    """Triton path: one kernel builds the generator input (projection + mask-token substitution, laid out
    channels_last [B, D_t, h, w]); the generator runs in torch (cuDNN); one kernel computes the masked
    squared error and its gradient. Under autocast the generator input is made in the autocast dtype."""
    B, N, _ = s_last.shape
    d_t = t_last.shape[-1]
    if t_last.shape[:2] != (B, N):
        raise ValueError(
            f"s_last {tuple(s_last.shape)} and t_last {tuple(t_last.shape)} need the same [B, N]"
        )
    if tuple(mask.shape) != (B, N) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool [B, N] = [{B}, {N}], got {mask.dtype} {tuple(mask.shape)}")
    if mask_token.numel() != d_t:
        raise ValueError(f"mask_token must have D_t = {d_t} elements, got {mask_token.numel()}")
    if not 0.0 < mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1], got {mask_ratio}")
    h, w = R._resolve_grid(N, grid, "vitkd_gen_loss")
    dev_type = s_last.device.type
    if torch.is_autocast_enabled(dev_type) and torch.get_autocast_dtype(dev_type) == torch.bfloat16:
        x_dtype = torch.bfloat16  # the generator's convolutions would cast it to bf16 anyway
    else:
        x_dtype = R._work_dtype(s_last, t_last, weight, bias, mask_token)
    k = _kern().masked_gen
    x = k.gen_input_op(_unit_stride(s_last), mask, weight, bias, mask_token, h, w, x_dtype)
    g = generator(x)
    if tuple(g.shape) != (B, d_t, h, w):
        raise ValueError(
            f"generator must map [B, D_t, h, w] = {(B, d_t, h, w)} to itself, got {tuple(g.shape)}"
        )
    if g.dtype not in _FLOAT:
        g = g.float()
    loss, _ = k.gen_loss_op(g, _unit_stride(t_last.detach()), mask, beta / (mask_ratio * B), _needs_grad(g))
    return loss
