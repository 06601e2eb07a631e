"""Shared benchmark fixtures: device, dtype, shape sets, providers, and ``bench_call``.

Run with ``pytest bench/ --benchmark-only`` (plain ``pytest`` skips benchmarks: ``--benchmark-skip``
is in the project's addopts, and ``testpaths`` is ``tests``). Options:

* ``--bench-device auto|cpu|cuda`` (auto: CUDA when available),
* ``--bench-shapes a,b`` (names from ``GPU_SHAPES`` / ``CPU_SHAPES``; default: all of the device's set),
* ``--bench-dtype auto|float32|bfloat16|float16`` (auto: bf16 on CUDA — the AMP training dtype —,
  fp32 on CPU),
* ``--bench-providers eager,compiled,fused`` (default: all three),
* ``--bench-time SECONDS`` (target measured time per benchmark; default 0.4 on CUDA, 0.15 on CPU).

Providers: ``eager`` = ``fastkd.ops.reference``; ``compiled`` = ``torch.compile(reference fn,
dynamic=False)``; ``fused`` = ``fastkd.ops.dispatch`` with ``set_fused(True)`` — Triton kernels, so
CUDA only (on CPU fused mode *is* the compiled reference, which ``compiled`` already measures).
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import pytest
import torch

from fastkd.ops.timing import gpu_and_host_ms

PROVIDERS = ("eager", "compiled", "fused")
MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Shape:
    """One benchmark problem size. N = patch tokens on a square grid (prefix P extra), C classes,
    K = top-K teacher entries of the sparse logit cache."""

    name: str
    B: int
    N: int
    Ds: int
    Dt: int
    C: int
    K: int
    P: int = 1


# DeiT-like student/teacher pairs at 224² (14×14 patches): Ti←S, S←B (the DESIGN target), B←L.
GPU_SHAPES = (
    Shape("deit_t", B=256, N=196, Ds=192, Dt=384, C=1000, K=32),
    Shape("deit_s", B=256, N=196, Ds=384, Dt=768, C=1000, K=32),
    Shape("deit_b", B=256, N=196, Ds=768, Dt=1024, C=1000, K=32),
)
# Small enough that the whole suite (incl. torch.compile on 2 cores) stays well under 5 minutes.
CPU_SHAPES = (
    Shape("cpu_s", B=16, N=16, Ds=32, Dt=64, C=100, K=10),
    Shape("cpu_m", B=32, N=64, Ds=64, Dt=128, C=1000, K=32),
)

def pytest_addoption(parser):
    g = parser.getgroup("fastkd bench")
    g.addoption("--bench-device", default="auto", choices=("auto", "cpu", "cuda"))
    g.addoption("--bench-shapes", default="", help="comma-separated shape names (default: the device's set)")
    g.addoption("--bench-dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    g.addoption("--bench-providers", default=",".join(PROVIDERS))
    g.addoption("--bench-time", type=float, default=None, help="target measured seconds per benchmark")
    g.addoption("--bench-threads", type=int, default=None,
                help="torch CPU threads (default: 1 for CPU benches, unchanged for CUDA)")


def _device(config) -> torch.device:
    choice = config.getoption("--bench-device")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device cuda: no CUDA device here; use --bench-device cpu")
    return torch.device(choice)


def _shapes(config) -> tuple[Shape, ...]:
    pool = GPU_SHAPES if _device(config).type == "cuda" else CPU_SHAPES
    names = [n for n in config.getoption("--bench-shapes").split(",") if n]
    if not names:
        return pool
    known = {s.name: s for s in (*GPU_SHAPES, *CPU_SHAPES)}
    bad = [n for n in names if n not in known]
    if bad:
        raise pytest.UsageError(f"--bench-shapes: unknown {bad}; choose from {sorted(known)}")
    return tuple(known[n] for n in names)


def _providers(config) -> tuple[str, ...]:
    names = [n for n in config.getoption("--bench-providers").split(",") if n]
    bad = [n for n in names if n not in PROVIDERS]
    if bad:
        raise pytest.UsageError(f"--bench-providers: unknown {bad}; choose from {list(PROVIDERS)}")
    return tuple(names)


def pytest_configure(config):
    # CPU benches default to one intra-op thread: on a small shared machine a 2-thread parallel region
    # waits for a preempted worker (a whole scheduler slice, ~10-30 ms) and the timing measures the
    # scheduler, not the op. Set before anything is compiled (inductor reads it at codegen).
    benches_run = config.getoption("benchmark_only", False) or not config.getoption("benchmark_skip", False)
    threads = config.getoption("--bench-threads", default=None)
    if threads is None and benches_run and _device(config).type == "cpu":
        threads = 1
    if threads:
        torch.set_num_threads(threads)
    # Separate static-shape graphs per (loss, shape, dtype) must never hit dynamo's recompile limit:
    # past it a "compiled" benchmark would silently run eagerly.
    from torch._dynamo import config as dynamo_config

    dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, 256)
    if hasattr(dynamo_config, "accumulated_cache_size_limit"):
        dynamo_config.accumulated_cache_size_limit = max(dynamo_config.accumulated_cache_size_limit, 1024)


def pytest_generate_tests(metafunc):
    """Parametrize ``bench_shape``, ``provider`` and ``mode`` for any benchmark that asks for them."""
    if "bench_shape" in metafunc.fixturenames:
        shapes = _shapes(metafunc.config)
        # indirect: the JSON's params then hold the shape's name, the fixture the Shape itself
        metafunc.parametrize("bench_shape", [s.name for s in shapes], indirect=True)
    if "provider" in metafunc.fixturenames:
        metafunc.parametrize("provider", _providers(metafunc.config))
    if "mode" in metafunc.fixturenames:
        metafunc.parametrize("mode", MODES, ids=["fwd", "fwdbwd"])


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    return _device(pytestconfig)


@pytest.fixture
def bench_shape(request) -> Shape:
    return {s.name: s for s in (*GPU_SHAPES, *CPU_SHAPES)}[request.param]


@pytest.fixture(scope="session")
def dtype(pytestconfig, device) -> torch.dtype:
    name = pytestconfig.getoption("--bench-dtype")
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", None)
    except Exception:  # not installed / fails to import
        return None


@pytest.fixture(scope="session")
def env_info(device) -> dict[str, Any]:
    """Device name and library versions recorded with every benchmark."""
    info: dict[str, Any] = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "fastkd": _version("fastkd"),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        info["capability"] = f"sm_{cap[0]}{cap[1]}"
        info["cuda"] = torch.version.cuda
    return info


@functools.cache
def _compiled(name: str) -> Callable:
    from fastkd.ops import reference

    return torch.compile(getattr(reference, name), dynamic=False)


def _fused_module():
    """``fastkd.ops.dispatch`` in fused mode, or a skip with the reason."""
    try:
        functional = importlib.import_module("fastkd.ops.dispatch")
    except ImportError as e:
        pytest.skip(f"fused provider: fastkd.ops.dispatch not importable ({e})")
    if os.environ.get("FASTKD_KERNELS") == "0":
        pytest.skip("fused provider: FASTKD_KERNELS=0 forces the reference")
    if not hasattr(functional, "set_fused"):
        pytest.skip("fused provider: fastkd.ops.dispatch has no set_fused()")
    functional.set_fused(True)
    return functional


@pytest.fixture
def loss_fn(provider: str, device: torch.device) -> Callable[[str], Callable]:
    """``loss_fn(name)`` → the provider's implementation of ``fastkd.ops.reference.<name>``."""
    if provider == "fused" and device.type != "cuda":
        pytest.skip("fused provider: Triton kernels need CUDA (on CPU fused mode = the compiled reference)")

    def get(name: str) -> Callable:
        if provider == "eager":
            from fastkd.ops import reference

            return getattr(reference, name)
        if provider == "compiled":
            return _compiled(name)
        functional = _fused_module()
        if not hasattr(functional, name):
            pytest.skip(f"fused provider: fastkd.ops.dispatch has no {name}")
        return getattr(functional, name)

    return get


@pytest.fixture
def bench_call(device: torch.device, env_info: dict, pytestconfig) -> Callable[..., Any]:
    """``bench_call(benchmark, fn, *, bytes_moved=None, shape=None, info=None, group=None, warmup=3)``.

    Runs ``fn`` ``warmup`` times untimed (absorbs compilation, autotuning, allocator growth),
    measures the peak memory of one call on CUDA (``torch.cuda.max_memory_allocated`` above what
    was allocated before the call: the op's own working memory), calibrates rounds × iterations to
    the target time, then times ``fn`` with ``benchmark.pedantic``; on CUDA every timed call ends
    with ``torch.cuda.synchronize()``. ``extra_info`` gets ``env_info``, the ``shape`` (name and
    sizes), ``info``, ``dtype`` when given in ``info``, ``bytes``,
    ``gbps`` (bytes / median time), ``peak_mem_bytes`` (None on CPU), ``rounds``, ``iterations``, and
    on CUDA ``gpu_ms`` and ``host_ms`` (``fastkd.ops.timing.gpu_and_host_ms``: the GPU time per call with
    the host's work hidden, as in a GPU-bound step, and the host's enqueue time per call).
    Returns the last result of ``fn``.
    """
    cuda = device.type == "cuda"
    target = pytestconfig.getoption("--bench-time") or (0.4 if cuda else 0.15)

    def run(benchmark, fn: Callable[[], Any], *, bytes_moved: int | None = None, shape: Shape | None = None,
            info: dict | None = None, group: str | None = None, warmup: int = 3):
        def timed():
            out = fn()
            if cuda:
                torch.cuda.synchronize(device)
            return out

        for _ in range(warmup):
            timed()
        peak = None
        if cuda:
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            timed()
            peak = torch.cuda.max_memory_allocated(device) - base
        t0 = time.perf_counter()
        timed()
        one = max(time.perf_counter() - t0, 1e-7)
        # short calls run several iterations per round so timer resolution does not matter
        iterations = max(1, min(100, math.ceil(2e-4 / one)))
        rounds = max(5, min(500, int(target / (one * iterations))))
        benchmark.extra_info.update(env_info)
        if shape is not None:
            benchmark.extra_info["shape"] = shape.name
            benchmark.extra_info.update({f"shape_{k}": v for k, v in asdict(shape).items() if k != "name"})
        benchmark.extra_info.update(info or {})
        benchmark.extra_info.update(bytes=bytes_moved, peak_mem_bytes=peak)
        benchmark.extra_info.update(rounds=rounds, iterations=iterations)
        if hasattr(os, "getloadavg"):  # a loaded machine explains noisy CPU numbers
            benchmark.extra_info["loadavg_1m"] = os.getloadavg()[0]
        if group is not None:
            benchmark.group = group
        result = benchmark.pedantic(timed, rounds=rounds, iterations=iterations, warmup_rounds=1)
        stats = getattr(benchmark, "stats", None)
        if stats is not None and bytes_moved:
            median = stats.stats.median
            benchmark.extra_info["gbps"] = bytes_moved / median / 1e9 if median > 0 else None
        if cuda and stats is not None:
            try:
                gpu, host = gpu_and_host_ms(fn, device, stats.stats.median * 1e3, calls=10)
                benchmark.extra_info.update(gpu_ms=gpu, host_ms=host)
            except Exception as e:  # a failed extra measurement must not lose the wall-clock one
                benchmark.extra_info["gpu_ms_error"] = f"{type(e).__name__}: {e}"[:300]
        return result

    return run
