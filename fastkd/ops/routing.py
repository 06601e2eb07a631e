"""Routing of ``fastkd.ops.dispatch``: fused mode, ``FASTKD_KERNELS``, the ``@fused`` decorator that sends
each call to triton / compiled / reference, ``describe()``, and the hooks of measured dispatch
(``fastkd.ops.measure``). ``fastkd.ops.dispatch`` re-exports the public names; read its docstring first."""

from __future__ import annotations

import functools
import importlib.util
import os
import statistics
import sys
from collections.abc import Callable, Sequence

import torch

from fastkd.ops import measure as M
from fastkd.ops import reference as R
from fastkd.ops.measure import cache_path
from fastkd.ops.timing import host_and_span_ms

Tensor = torch.Tensor

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
        self.timer: Callable | None = None  # tests: timer(path, run) → ms, instead of CUDA events
        self.measure_devices = ("cuda",)  # tests add "cpu" (with an injected timer)


_S = _State()


def refresh_env() -> None:
    """Re-read ``FASTKD_KERNELS`` (auto | triton | compiled | reference; 0 = reference), and check
    ``FASTKD_MIMIC_GEMM`` (``token_kd.mimic_route`` reads it at each call: a bad value is one error here, at
    setup, before any work, rather than at the first training step)."""
    gemm = os.environ.get("FASTKD_MIMIC_GEMM", "auto")
    if gemm not in ("auto", "cublas", "triton"):
        raise ValueError(f"FASTKD_MIMIC_GEMM={gemm!r}: use auto, cublas or triton")
    _S.mode = _env_mode()
    _S.env_off = _S.mode == "reference"
    M._S.memo.clear()


def kernels_mode() -> str:
    """The ``FASTKD_KERNELS`` setting in force: auto, triton, compiled or reference."""
    return _S.mode


def set_fused(on: bool, *, interpreter: bool = False) -> None:
    """Turn fused mode on or off (process-wide). ``interpreter=True`` (tests only) sends CPU tensors to the
    Triton kernels too, which then run in the Triton interpreter (set ``TRITON_INTERPRET=1`` first)."""
    refresh_env()  # first: a bad setting raises with the state untouched
    _S.fused = bool(on)
    _S.interpreter = bool(on and interpreter)
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
        token_kd.ROUTE_HOOKS = token_kd.RouteHooks(_time_route, _stored_choice, _store_choice)
        _S.kernels = k
    return _S.kernels


def _time_route(run: Callable[[], object], device: torch.device) -> float:
    """GPU ms of a kernel's candidate ``run()``, as the measured dispatch times its paths: warm-up calls (the
    first autotunes), then the median of its reps (``timing.host_and_span_ms``: the span from an idle GPU)."""
    for _ in range(M._WARMUP):
        run()
    return statistics.median(host_and_span_ms(run, device)[1] for _ in range(M._REPS))


def _stored_choice(device: torch.device, key: str) -> str | None:
    """A kernel's timed choice kept in dispatch.json for this GPU and versions (``token_kd.mimic_route``)."""
    rec = M._cache_entries(device).get(key)
    return rec.get("path") if isinstance(rec, dict) else None


def _store_choice(device: torch.device, key: str, path: str, ms: dict[str, float]) -> None:
    """Keep a kernel's timed choice and its ms (a failed candidate's: null) in dispatch.json."""
    finite = {k: (v if v < float("inf") else None) for k, v in ms.items()}
    M._write_cache(device, key, {"path": path, "ms": finite})


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
        if not M.op_summary():
            return (f"measured dispatch on {dev} (triton {triton.__version__}): each fused op times Triton "
                    f"vs the compiled reference at its first call; choices cached in {cache_path()}")
        return _measured_line(dev)
    if _S.mode == "auto" and _S.timer is not None and M.op_summary():
        return _measured_line(dev)  # tests: measured dispatch on CPU with an injected timer
    why = "Triton kernels need CUDA" if dev.type != "cuda" else "Triton is not installed"
    return f"compiled reference losses (torch.compile on {dev.type}; {why})"


def _measured_line(dev: torch.device) -> str:
    """Each measured op's path and the times its rule compared, and the calibrated step's slack."""
    parts = [f"{op} {r['path']}" + _timings(r) for op, r in M.op_summary().items()]
    slack = "" if M._S.slack_ms is None else f" (step slack {M._S.slack_ms:.3g} ms)"
    return f"measured dispatch on {dev}{slack}: " + "; ".join(parts)


def _ms(x) -> str:
    return "—" if x is None else f"{x:.3g}"


def _timings(r: dict) -> str:
    """ " (1.2 triton / 1.9 compiled ms)": the times the decision's rule compared (wall, or GPU time; in a
    compiled step's traced form the wall rule compares the reference's GPU time: it is inlined there)."""
    sfx = "_gpu_ms" if r.get("rule") == "gpu" else "_ms"
    inlined = sfx == "_ms" and r.get("inlined")
    t, c = r.get("triton" + sfx), r.get("compiled_gpu_ms" if inlined else "compiled" + sfx)
    if t is None and c is None:
        return ""
    what = ", GPU time" if sfx == "_gpu_ms" else (", the inlined reference's GPU time" if inlined else "")
    return f" ({_ms(t)} triton / {_ms(c)} compiled ms{what})"


def _base_path(xs: Sequence[Tensor]) -> str:
    """The path before measurement: reference / compiled / triton / "measure" (CUDA auto mode)."""
    if not _S.fused or _S.env_off:
        return "reference"
    dev = xs[0].device if xs else torch.device("cpu")
    kernels_here = (dev.type == "cuda" and _triton_installed()) or (dev.type == "cpu" and _S.interpreter)
    if not kernels_here:
        measured = dev.type in _S.measure_devices and _S.timer is not None and _S.mode == "auto"
        if measured and dev.type != "cuda":
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
def dispatch_record(device: torch.device | str | None = None) -> dict:
    """What summary.json records: mode, the one-line description, and per op (and signature) the path
    used and both timings."""
    ops: dict[str, list] = {}
    for key, rec in M._S.decided.items():
        row = {"signature": key, **{k: v for k, v in rec.items() if k != "op"}}
        ops.setdefault(rec["op"], []).append(row)
    return {
        "fused": _S.fused,
        "mode": _S.mode,
        "describe": describe(device),
        "cache": cache_path() if _S.fused and _S.mode == "auto" else None,
        "ops": ops,
        "pending": sorted(M._S.pending),
        "step_slack_ms": M._S.slack_ms,
        "mimic_gemm": _mimic_gemm_record(),
    }


def _mimic_gemm_record() -> list[dict]:
    """The stacked ViTKD mimic's forward-GEMM choice per shape (``token_kd.mimic_route``): route and the
    GPU ms each took at the shape's first call."""
    if _S.kernels is None:
        return []
    tk = _S.kernels.token_kd
    return [
        {"layers": k[0], "B": k[1], "tokens": k[2], "D_s": k[3], "D_t": k[4], "route": tk.MIMIC_ROUTES[k],
         "ms": {name: round(ms, 4) for name, ms in tk.MIMIC_ROUTE_TIMES.get(k, {}).items()}}
        for k in tk.MIMIC_ROUTES
    ]


def _choose(name: str, xs: Sequence[Tensor], runners: dict[str, Callable], args, kwargs) -> str:
    path = _base_path(xs)
    if path != "measure":
        return path
    if torch.compiler.is_compiling():
        return M.traced_choice(M.sig_key(name, xs))
    return M.decide(name, xs, runners, args, kwargs, _S.timer)


def _calibration_active() -> bool:
    return _S.fused and _S.mode == "auto" and (_cuda_triton_ok() or _S.timer is not None)


def compile_step(module: torch.nn.Module, **compile_kwargs) -> Callable:
    """``torch.compile(module)`` whose first call runs the module eagerly first (RNG state kept), so that
    the fused ops measure on real tensors before the trace (nothing can be timed on fake tensors), in the
    form the trace will run them (``measure.traced_form``), and the step's host/GPU balance picks each
    op's rule (``measure.rebalance``)."""
    compiled = torch.compile(module, **compile_kwargs)
    return M.CalibratedStep(module, compiled, _calibration_active, lambda: _S.timer, traced=True)


def calibrate_step(module: torch.nn.Module) -> Callable:
    """The eager step's counterpart of ``compile_step``: the module itself, calibrated before its first
    call (a pass-through when measured dispatch is off)."""
    return M.CalibratedStep(module, module, _calibration_active, lambda: _S.timer)
