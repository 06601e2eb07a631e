"""Training telemetry: per-phase step time without host syncs, img/s, peak memory, NVML power/energy.

Three pieces, combined by :class:`Telemetry`:

* :class:`StepTimer` — the training loop wraps each part of a step in ``timer.phase(name)``
  (``'data'``, ``'teacher'``, ``'student'``, ``'loss'``, ``'optim'``; any name works) and calls
  ``timer.step_done(n_images)`` after it. On CUDA each phase records two CUDA events on the current
  stream (no synchronisation); on CPU, where ops run synchronously, it reads ``time.perf_counter``.
  ``read()`` (log steps only) synchronises once and returns means over the steps since the last read.
  On CUDA the times are spans on the GPU timeline: a host-side wait (e.g. for data) that the GPU
  spends busy with queued work costs nothing and shows as ~0 ms, which is the cost that matters.
  Phases must not nest or overlap; step time not covered by a phase is reported as ``other``.
* :class:`GpuMonitor` — NVML (``nvidia-ml-py``): GPU busy-time % (``nvmlDeviceGetUtilizationRates``:
  the share of the last sample period in which a kernel ran), memory used, power, and the total
  energy counter. Without NVML or a CUDA device it is inert and names itself ``'no GPU'``.
* :class:`Telemetry` — both, plus peak memory (``torch.cuda.max_memory_allocated`` or the process'
  peak RSS on CPU) and optional TensorBoard scalars.

Record keys (``StepTimer.read`` / ``Telemetry.log``; the same keys, over the whole run, in
``Telemetry.summary``): ``step_ms`` (mean step time), ``img_per_s``, per phase ``<name>_ms`` (mean
per step) and ``<name>_share`` (of ``step_ms``), ``other_ms`` / ``other_share``, ``data_wait_share``
(= ``data_share`` + ``cache_wait_share``: the batch, and the cached teacher's record, which the trainer
times as phase ``cache_wait``; the DESIGN target < 3 %), ``peak_mem_mb``, and on a GPU ``gpu_util``,
``gpu_mem_mb``, ``gpu_power_w``, ``energy_j``, ``energy_per_image_j``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

NO_GPU = "no GPU"


def require_tensorboard() -> None:
    """Raise a one-line ``RuntimeError`` naming the fix when the ``tensorboard`` package is missing."""
    if importlib.util.find_spec("tensorboard") is None:
        raise RuntimeError("--tensorboard needs the tensorboard package: pip install tensorboard")


# ------------------------------------------------------------------------------------------ step timer
class StepTimer:
    """Per-phase step timing; no host synchronisation until :meth:`read`.

    A *window* starts at the first ``phase``/``step_done`` after construction or a ``read`` and ends
    at the last completed ``step_done``; step time is the window length / steps in it, so gaps
    between steps (host stalls) count, while time spent between ``read`` and the next phase (eval,
    logging) does not.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._open: list[tuple[str, Any, Any]] = []  # (name, start mark, end mark) of the current step
        self._done: list[tuple[list[tuple[str, Any, Any]], Any, int]] = []  # (phases, end mark, n_images)
        self._window_start: Any = None
        self._win = _Totals()
        self._tot = _Totals()
        self._clock = time.perf_counter  # the CPU clock (replaceable in tests)

    # -- hot path (no sync) --------------------------------------------------------------------------
    def _mark(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(torch.cuda.current_stream(self.device))
            return ev
        return self._clock()

    def _begin(self) -> None:
        if self._window_start is None:
            self._window_start = self._mark()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the enclosed block as phase ``name`` of the current step (repeated names add up)."""
        self._begin()
        start = self._mark()
        try:
            yield
        finally:
            self._open.append((name, start, self._mark()))

    def step_done(self, n_images: int) -> None:
        """Close the current step, which processed ``n_images`` images."""
        self._begin()
        end = self._mark()
        self._done.append((self._open, end, int(n_images)))
        self._open = []
        if len(self._done) >= self.MAX_PENDING:  # the loop logs rarely: fold finished steps, no sync
            k = 0
            while k < len(self._done) and self._finished(self._done[k][1]):
                k += 1
            if k:
                self._fold(k)

    # -- log steps ----------------------------------------------------------------------------------
    MAX_PENDING = 512  # steps kept unread before the already-finished ones are folded in

    def _finished(self, mark: Any) -> bool:
        return mark.query() if self.cuda else True  # cudaEventQuery never blocks

    def _elapsed_ms(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def _fold(self, k: int) -> None:
        """Fold the first ``k`` completed steps (their events must have finished) into the window and
        the run totals; the window then continues from the last folded step's end."""
        steps, self._done = self._done[:k], self._done[k:]
        end = steps[-1][1]
        window_ms = self._elapsed_ms(self._window_start, end)
        phase_ms: dict[str, float] = {}
        for phases, _, _ in steps:
            for name, a, b in phases:
                phase_ms[name] = phase_ms.get(name, 0.0) + self._elapsed_ms(a, b)
        images = sum(n for _, _, n in steps)
        for acc in (self._win, self._tot):
            acc.add(len(steps), images, window_ms, phase_ms)
        self._window_start = end

    def _collect(self) -> None:
        """Fold every completed step (synchronises the device once on CUDA)."""
        if self._done:
            if self.cuda:
                torch.cuda.synchronize(self.device)
            self._fold(len(self._done))
        # phases of an unfinished step (if any) belong to the next window, which then starts where
        # the last completed step ended; otherwise the next window starts at the next phase.
        if not self._open:
            self._window_start = None

    def read(self) -> dict[str, float]:
        """Means over the completed steps since the last ``read`` (``{}`` if none); resets the window."""
        self._collect()
        out = self._win.stats()
        self._win = _Totals()
        return out

    def totals(self) -> dict[str, float]:
        """The same statistics over every completed step since construction (does not reset ``read``)."""
        self._collect()
        return self._tot.stats()


class _Totals:
    """Accumulated step count, images, window time and per-phase time (all ms)."""

    def __init__(self) -> None:
        self.steps = 0
        self.images = 0
        self.ms = 0.0
        self.phase_ms: dict[str, float] = {}

    def add(self, steps: int, images: int, ms: float, phase_ms: dict[str, float]) -> None:
        self.steps += steps
        self.images += images
        self.ms += ms
        for k, v in phase_ms.items():
            self.phase_ms[k] = self.phase_ms.get(k, 0.0) + v

    def stats(self) -> dict[str, float]:
        if self.steps == 0:
            return {}
        step_ms = self.ms / self.steps
        out = {
            "timed_steps": self.steps,
            "timed_images": self.images,
            "timed_s": self.ms / 1e3,
            "step_ms": step_ms,
            "img_per_s": self.images / (self.ms / 1e3) if self.ms > 0 else float("nan"),
        }
        share = lambda ms: ms / step_ms if step_ms > 0 else float("nan")
        for name, ms in self.phase_ms.items():
            out[f"{name}_ms"] = ms / self.steps
            out[f"{name}_share"] = share(ms / self.steps)
        other = step_ms - sum(self.phase_ms.values()) / self.steps
        out["other_ms"] = other
        out["other_share"] = share(other)
        waits = [k for k in ("data", "cache_wait") if k in self.phase_ms]
        if waits:  # the step waiting for its inputs: the next batch, the next cached teacher record
            out["data_wait_share"] = sum(out[f"{k}_share"] for k in waits)
        return out


# ----------------------------------------------------------------------------------------- GPU monitor
class GpuMonitor:
    """NVML view of the GPU behind ``device``; quietly inert (``name == 'no GPU'``) without one.

    ``interval_s``: when given and a GPU is present, a daemon thread calls :meth:`sample` that often,
    so ``means()`` covers the whole run rather than only log steps. NVML calls never synchronise CUDA.
    """

    def __init__(self, device: torch.device | str, *, interval_s: float | None = None):
        self.name = NO_GPU
        self.available = False
        self._nvml: Any = None
        self._handle: Any = None
        self._lock = threading.Lock()
        self._sums = {"gpu_util": 0.0, "gpu_power_w": 0.0}
        self._counts = {"gpu_util": 0, "gpu_power_w": 0}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        device = torch.device(device)
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = _nvml_handle(pynvml, device)
            name = pynvml.nvmlDeviceGetName(self._handle)
            self.name = name.decode() if isinstance(name, bytes) else str(name)
            self.available = True
        except Exception:  # no NVML library / driver / device: report 'no GPU', quietly
            self._shutdown_nvml()
            self.name = NO_GPU
            self.available = False
            return
        if interval_s:
            self._thread = threading.Thread(target=self._poll, args=(float(interval_s),), daemon=True)
            self._thread.start()

    def _poll(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.sample()

    def sample(self) -> dict[str, float]:
        """``gpu_util`` (busy-time %), ``gpu_mem_mb`` (used), ``gpu_power_w``; ``{}`` without a GPU.

        A metric the device does not support is left out.
        """
        if not self.available:
            return {}
        nv, h = self._nvml, self._handle
        out: dict[str, float] = {}
        with contextlib.suppress(Exception):
            out["gpu_util"] = float(nv.nvmlDeviceGetUtilizationRates(h).gpu)
        with contextlib.suppress(Exception):
            out["gpu_mem_mb"] = nv.nvmlDeviceGetMemoryInfo(h).used / 2**20
        with contextlib.suppress(Exception):
            out["gpu_power_w"] = nv.nvmlDeviceGetPowerUsage(h) / 1e3  # mW -> W
        with self._lock:
            for k in self._sums:
                if k in out:
                    self._sums[k] += out[k]
                    self._counts[k] += 1
        return out

    def means(self) -> dict[str, float]:
        """Means of ``gpu_util`` / ``gpu_power_w`` over every sample so far (keys ``*_mean``)."""
        with self._lock:
            return {f"{k}_mean": self._sums[k] / self._counts[k] for k in self._sums if self._counts[k]}

    def energy_j(self) -> float | None:
        """The GPU's total energy counter in J (``nvmlDeviceGetTotalEnergyConsumption``, mJ), or None."""
        if not self.available:
            return None
        try:
            return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1e3
        except Exception:  # not supported on this GPU (pre-Volta) or in this mode
            return None

    def _shutdown_nvml(self) -> None:
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
        self._nvml = None

    def close(self) -> None:
        """Stop the sampling thread and shut NVML down; idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._shutdown_nvml()
        self.available = False


def _nvml_handle(nv: Any, device: torch.device) -> Any:
    """NVML handle of a torch CUDA device: by UUID, then PCI bus id (both survive
    ``CUDA_VISIBLE_DEVICES`` renumbering), then by index."""
    index = device.index if device.index is not None else 0
    with contextlib.suppress(Exception):
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        return nv.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
    with contextlib.suppress(Exception):
        p = torch.cuda.get_device_properties(index)
        bus = f"{p.pci_domain_id:08x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0"
        return nv.nvmlDeviceGetHandleByPciBusId(bus)
    return nv.nvmlDeviceGetHandleByIndex(index)


# ------------------------------------------------------------------------------------------- telemetry
def _peak_mem_mb(device: torch.device) -> float | None:
    """Peak memory so far: CUDA allocator peak on a CUDA device, else the process' peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux
    except Exception:  # no resource module (Windows)
        return None


class Telemetry:
    """Step timer + NVML monitor + peak memory + optional TensorBoard scalars for one training run.

    ``tensorboard_dir``: write every numeric field of each :meth:`log` record as a scalar there;
    raises a one-line ``RuntimeError`` when the ``tensorboard`` package is missing.
    ``monitor``: a ready :class:`GpuMonitor` to use instead of creating one (tests, shared monitors).
    """

    def __init__(
        self,
        device: torch.device | str,
        *,
        tensorboard_dir: str | None = None,
        monitor: GpuMonitor | None = None,
        nvml_interval_s: float | None = 1.0,
    ):
        self.device = torch.device(device)
        self.timer = StepTimer(self.device)
        self.gpu = monitor if monitor is not None else GpuMonitor(self.device, interval_s=nvml_interval_s)
        self._writer = None
        if tensorboard_dir:
            require_tensorboard()
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=tensorboard_dir)
        self._t0 = time.perf_counter()
        self._energy0 = self.gpu.energy_j()
        self._energy_last = self._energy0
        self._images_last = 0
        self._images = 0

    def log(self, step: int, extra: dict) -> dict:
        """One log step: synchronises once, returns ``{**extra, **telemetry}`` (the metrics.jsonl record).

        Telemetry fields: the timer's window means (see the module docstring), ``peak_mem_mb``, the
        NVML sample, and on a GPU with an energy counter ``energy_j`` (spent since the previous log)
        and ``energy_per_image_j`` (that / images timed since the previous log).
        """
        rec = dict(extra)
        rec.update(self.timer.read())
        self._images += int(rec.get("timed_images", 0))
        peak = _peak_mem_mb(self.device)
        if peak is not None:
            rec["peak_mem_mb"] = peak
        rec.update(self.gpu.sample())
        energy = self.gpu.energy_j()
        if energy is not None and self._energy_last is not None:
            rec["energy_j"] = energy - self._energy_last
            images = self._images - self._images_last
            if images > 0:
                rec["energy_per_image_j"] = rec["energy_j"] / images
        self._energy_last = energy
        self._images_last = self._images
        if self._writer is not None:
            for key, value in rec.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    if math.isfinite(value):
                        self._writer.add_scalar(key, value, step)
            self._writer.flush()
        return rec

    def summary(self) -> dict:
        """Run totals (for summary.json): timer statistics over every step, peak memory, GPU name or
        ``'no GPU'``, total energy and energy per timed image (None without an energy counter), and
        mean GPU util / power over the run's samples. ``telemetry_wall_s`` counts since construction."""
        tot = self.timer.totals()
        out: dict[str, Any] = {"telemetry_wall_s": time.perf_counter() - self._t0, **tot}
        out.setdefault("img_per_s", None)
        out.setdefault("step_ms", None)
        out["peak_mem_mb"] = _peak_mem_mb(self.device)
        out["peak_mem_kind"] = "cuda_max_allocated" if self.device.type == "cuda" else "process_peak_rss"
        out["gpu"] = self.gpu.name
        energy = self.gpu.energy_j()
        total_j = energy - self._energy0 if energy is not None and self._energy0 is not None else None
        images = tot.get("timed_images", 0)
        out["energy_j"] = total_j
        out["energy_per_image_j"] = total_j / images if total_j is not None and images else None
        out.update(self.gpu.means())
        return out

    def close(self) -> None:
        """Flush and close the TensorBoard writer, stop NVML; idempotent."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.gpu.close()
