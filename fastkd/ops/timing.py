"""CUDA timing for the measured dispatch (``fastkd.ops.measure``) and the benches: wall time with the host
in the loop, GPU time with the host's work hidden (as in a GPU-bound step), the host's enqueue time, and a
step forward's host time against the span of its GPU work."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

_SLEEP_CYCLES_PER_MS: list[float] = []


def gpu_and_host_ms(fn: Callable[[], object], device: torch.device, wall_ms: float,
                    calls: int = 1) -> tuple[float, float]:
    """(GPU ms, host ms) per ``fn()`` with the host's work hidden, as in a GPU-bound training step, where
    the host enqueues ahead and only the GPU time counts. A ``torch.cuda._sleep`` kernel keeps the stream
    busy while the host enqueues ``calls`` calls (it lasts 1.5 × their wall time ``wall_ms`` each, plus
    1 ms); CUDA events then time the queued calls back to back, and ``perf_counter`` the enqueueing. If
    the host did not finish in time the GPU figure includes the wait: an upper bound."""
    if not _SLEEP_CYCLES_PER_MS:  # the sleep kernel counts clock cycles: calibrate cycles per ms once
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        a.record()
        torch.cuda._sleep(10_000_000)
        b.record()
        b.synchronize()
        _SLEEP_CYCLES_PER_MS.append(10_000_000 / max(a.elapsed_time(b), 1e-3))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    torch.cuda._sleep(int((1.5 * calls * wall_ms + 1.0) * _SLEEP_CYCLES_PER_MS[0]))
    start.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) * 1e3
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls, host / calls


def cuda_times(run: Callable[[], None], device: torch.device) -> dict[str, float]:
    """One timed call: wall ms with the host in the loop (CUDA events around an idle-GPU call), and GPU
    and host ms with the host's work hidden (``gpu_and_host_ms``)."""
    _, wall = host_and_span_ms(run, device)
    try:
        gpu, host = gpu_and_host_ms(run, device, wall)
    except Exception:  # no usable sleep kernel: the wall time stands for both (no GPU-time answer then)
        gpu = host = wall
    return {"wall": wall, "gpu": gpu, "host": host}


def as_times(t) -> dict[str, float]:
    """A timer's answer as {wall, gpu, host} ms: a bare number is a wall time that is also the GPU time,
    with no host time (tests' timers)."""
    if isinstance(t, dict):
        wall = float(t["wall"])
        return {"wall": wall, "gpu": float(t.get("gpu", wall)), "host": float(t.get("host", 0.0))}
    return {"wall": float(t), "gpu": float(t), "host": 0.0}


def host_and_span_ms(run: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(host ms, GPU span ms) of one ``run()``: the host's enqueue time (``perf_counter``) and the span of
    its GPU work (CUDA events from an idle GPU). When the host is the bottleneck the two are about equal;
    the GPU span minus the host time is the step's slack."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    t0 = time.perf_counter()
    run()
    host = (time.perf_counter() - t0) * 1e3
    end.record()
    end.synchronize()
    return host, start.elapsed_time(end)
