"""Telemetry: structure of the step split, 'no GPU' degradation, NVML arithmetic (fake NVML), summary.

Nothing here asserts a duration: only identities that hold by construction (phases + other = step,
shares sum to 1, img/s = images / timed seconds) and the shape of the records.
"""

from __future__ import annotations

import math
import types

import pytest
import torch

from fastkd import telemetry as T

PHASES = ("data", "teacher", "student", "loss", "optim")


def _work(n: int = 8) -> None:
    a = torch.randn(n, n)
    (a @ a).sum()


def _run_steps(timer: T.StepTimer, steps: int, batch: int, phases=PHASES) -> None:
    for _ in range(steps):
        for name in phases:
            with timer.phase(name):
                _work()
        timer.step_done(batch)


def _check_split(rec: dict, phases, steps: int, images: int) -> None:
    assert rec["timed_steps"] == steps
    assert rec["timed_images"] == images
    assert rec["step_ms"] > 0
    phase_sum = sum(rec[f"{p}_ms"] for p in phases)
    for p in phases:
        assert rec[f"{p}_ms"] >= 0
    # phases + other = step, and the shares (incl. other) sum to 1, by construction
    assert math.isclose(phase_sum + rec["other_ms"], rec["step_ms"], rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(sum(rec[f"{p}_share"] for p in (*phases, "other")), 1.0, rel_tol=1e-9)
    # phases never overlap and lie inside the step window (CPU clock is monotonic)
    assert rec["other_ms"] >= -1e-9
    assert math.isclose(rec["img_per_s"], images / rec["timed_s"], rel_tol=1e-9)
    assert math.isclose(rec["timed_s"] * 1e3, rec["step_ms"] * steps, rel_tol=1e-9)


def test_step_timer_cpu_split_and_window_reset():
    timer = T.StepTimer("cpu")
    assert timer.read() == {}  # nothing timed yet
    _run_steps(timer, steps=3, batch=5)
    rec = timer.read()
    _check_split(rec, PHASES, steps=3, images=15)
    assert rec["data_wait_share"] == rec["data_share"]
    assert timer.read() == {}  # the window was reset
    _run_steps(timer, steps=2, batch=4, phases=("data", "student"))
    rec2 = timer.read()
    _check_split(rec2, ("data", "student"), steps=2, images=8)
    assert "teacher_ms" not in rec2  # phases are per window
    tot = timer.totals()
    assert tot["timed_steps"] == 5 and tot["timed_images"] == 23
    assert math.isclose(tot["timed_s"], rec["timed_s"] + rec2["timed_s"], rel_tol=1e-9)
    assert math.isclose(tot["teacher_ms"] * 5, rec["teacher_ms"] * 3, rel_tol=1e-9)


def test_step_timer_exact_split_with_a_fake_clock():
    """Gaps between phases count as 'other'; step time runs from the previous step's end."""
    now = [0.0]
    timer = T.StepTimer("cpu")
    timer._clock = lambda: now[0]
    with timer.phase("data"):  # window starts at 0
        now[0] = 0.002
    now[0] = 0.003
    with timer.phase("student"):
        now[0] = 0.007
    now[0] = 0.008
    timer.step_done(3)  # step 1: 8 ms = data 2 + student 4 + other 2
    with timer.phase("optim"):
        now[0] = 0.009
    now[0] = 0.010
    timer.step_done(3)  # step 2: 2 ms = optim 1 + other 1
    now[0] = 0.500  # time between the last step and the read (eval, logging) is not step time
    rec = timer.read()
    expect = {"timed_steps": 2, "timed_images": 6, "step_ms": 5.0, "data_ms": 1.0, "student_ms": 2.0,
              "optim_ms": 0.5, "other_ms": 1.5, "data_share": 0.2, "img_per_s": 600.0, "timed_s": 0.010}
    for key, value in expect.items():
        assert rec[key] == pytest.approx(value), key
    now[0] = 1.0  # the next window starts at its first phase, not at the read
    with timer.phase("data"):
        now[0] = 1.001
    timer.step_done(1)
    assert timer.read()["step_ms"] == pytest.approx(1.0)


def test_step_timer_repeated_phase_adds_up_and_open_step_carries_over():
    timer = T.StepTimer(torch.device("cpu"))
    for _ in range(2):
        with timer.phase("student"):
            _work()
        with timer.phase("loss"):
            _work()
        with timer.phase("student"):  # backward, same bucket
            _work()
        timer.step_done(3)
    with timer.phase("data"):  # an unfinished step at read time
        _work()
    rec = timer.read()
    _check_split(rec, ("student", "loss"), steps=2, images=6)
    assert "data_ms" not in rec and "data_wait_share" not in rec
    timer.step_done(3)  # completes the carried-over step
    rec2 = timer.read()
    _check_split(rec2, ("data",), steps=1, images=3)


def test_step_timer_folds_finished_steps_when_logging_is_rare():
    timer = T.StepTimer("cpu")
    timer.MAX_PENDING = 4
    _run_steps(timer, steps=10, batch=2)
    assert len(timer._done) < 4  # folded on the way, without a read
    rec = timer.read()
    _check_split(rec, PHASES, steps=10, images=20)
    _check_split(timer.totals(), PHASES, steps=10, images=20)


def test_step_timer_phase_records_even_when_body_raises():
    timer = T.StepTimer("cpu")
    with pytest.raises(ValueError), timer.phase("student"):
        raise ValueError("boom")
    timer.step_done(1)
    assert "student_ms" in timer.read()


def test_gpu_monitor_cpu_device_is_inert():
    mon = T.GpuMonitor("cpu")
    assert mon.name == T.NO_GPU and not mon.available
    assert mon.sample() == {} and mon.energy_j() is None and mon.means() == {}
    mon.close()
    mon.close()  # idempotent


def test_gpu_monitor_without_nvml_library_says_no_gpu(monkeypatch):
    pynvml = pytest.importorskip("pynvml")

    def no_lib():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_lib)
    mon = T.GpuMonitor(torch.device("cuda", 0), interval_s=0.01)
    assert mon.name == T.NO_GPU and not mon.available
    assert mon.sample() == {} and mon.energy_j() is None
    assert mon._thread is None
    mon.close()


class _FakeNvml(types.SimpleNamespace):
    """Minimal pynvml stand-in: a GPU whose energy counter grows 2500 mJ per read."""

    def __init__(self):
        super().__init__(inits=0, shutdowns=0, energy_mj=1_000_000)

    def nvmlInit(self):
        self.inits += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetHandleByUUID(self, uuid):
        raise RuntimeError("unused")

    def nvmlDeviceGetHandleByPciBusId(self, bus):
        raise RuntimeError("unused")

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("handle", i)

    def nvmlDeviceGetName(self, h):
        return b"Fake H100"

    def nvmlDeviceGetUtilizationRates(self, h):
        return types.SimpleNamespace(gpu=80, memory=30)

    def nvmlDeviceGetMemoryInfo(self, h):
        return types.SimpleNamespace(used=3 * 2**30, total=80 * 2**30, free=77 * 2**30)

    def nvmlDeviceGetPowerUsage(self, h):
        return 350_000  # mW

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        self.energy_mj += 2500
        return self.energy_mj


@pytest.fixture
def fake_nvml(monkeypatch):
    fake = _FakeNvml()
    monkeypatch.setitem(__import__("sys").modules, "pynvml", fake)
    return fake


def test_gpu_monitor_with_fake_nvml(fake_nvml):
    mon = T.GpuMonitor(torch.device("cuda", 0))
    assert mon.available and mon.name == "Fake H100"
    s = mon.sample()
    assert s == {"gpu_util": 80.0, "gpu_mem_mb": 3072.0, "gpu_power_w": 350.0}
    mon.sample()
    assert mon.means() == {"gpu_util_mean": 80.0, "gpu_power_w_mean": 350.0}
    assert mon.energy_j() == pytest.approx(1002.5)  # 1_002_500 mJ
    mon.close()
    assert fake_nvml.shutdowns == 1 and mon.sample() == {} and mon.energy_j() is None


def test_gpu_monitor_unsupported_metrics_are_left_out(fake_nvml):
    def unsupported(h):
        raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")

    fake_nvml.nvmlDeviceGetPowerUsage = unsupported
    fake_nvml.nvmlDeviceGetTotalEnergyConsumption = unsupported
    mon = T.GpuMonitor(torch.device("cuda", 0))
    assert set(mon.sample()) == {"gpu_util", "gpu_mem_mb"}
    assert mon.energy_j() is None
    mon.close()


def test_gpu_monitor_background_sampling(fake_nvml):
    mon = T.GpuMonitor(torch.device("cuda", 0), interval_s=0.001)
    for _ in range(5000):  # wait (not time) for the thread's first samples
        if mon.means():
            break
        __import__("time").sleep(0.001)
    assert mon.means()["gpu_util_mean"] == 80.0
    mon.close()
    assert mon._thread is None


def test_telemetry_energy_per_image_from_counter_deltas(fake_nvml):
    mon = T.GpuMonitor(torch.device("cuda", 0))
    tel = T.Telemetry("cpu", monitor=mon)  # CPU timer, fake GPU monitor
    _run_steps(tel.timer, steps=2, batch=10)
    rec = tel.log(2, {"step": 2, "loss": 1.5})
    assert rec["step"] == 2 and rec["loss"] == 1.5
    # one counter read since construction: 2500 mJ for 20 images
    assert rec["energy_j"] == pytest.approx(2.5)
    assert rec["energy_per_image_j"] == pytest.approx(2.5 / 20)
    assert rec["gpu_power_w"] == 350.0
    _run_steps(tel.timer, steps=1, batch=5)
    rec = tel.log(3, {})
    assert rec["energy_per_image_j"] == pytest.approx(2.5 / 5)
    s = tel.summary()
    assert s["gpu"] == "Fake H100"
    assert s["energy_j"] == pytest.approx(7.5)  # three counter reads after the initial one
    assert s["energy_per_image_j"] == pytest.approx(7.5 / 25)
    assert s["gpu_util_mean"] == 80.0
    tel.close()


def test_telemetry_cpu_log_and_summary():
    tel = T.Telemetry("cpu")
    assert tel.gpu.name == T.NO_GPU
    _run_steps(tel.timer, steps=3, batch=7)
    rec = tel.log(3, {"loss": 0.25})
    _check_split(rec, PHASES, steps=3, images=21)
    assert rec["loss"] == 0.25 and rec["peak_mem_mb"] > 0
    assert not any(k.startswith(("gpu_", "energy")) for k in rec)
    _run_steps(tel.timer, steps=2, batch=7)  # not logged: summary still counts them
    s = tel.summary()
    for key in ("telemetry_wall_s", "img_per_s", "step_ms", "peak_mem_mb", "peak_mem_kind", "gpu",
                "energy_j", "energy_per_image_j", "data_share", "optim_ms", "other_share"):
        assert key in s, key
    _check_split(s, PHASES, steps=5, images=35)
    assert s["gpu"] == "no GPU" and s["energy_j"] is None and s["energy_per_image_j"] is None
    assert s["peak_mem_kind"] == "process_peak_rss"
    tel.close()
    tel.close()


def test_telemetry_summary_before_any_step():
    tel = T.Telemetry("cpu")
    s = tel.summary()
    assert s["img_per_s"] is None and s["step_ms"] is None and s["gpu"] == "no GPU"
    tel.close()


def test_tensorboard_missing_is_one_clear_line(monkeypatch, tmp_path):
    real = T.importlib.util.find_spec
    fake = lambda name, *a: None if name == "tensorboard" else real(name, *a)
    monkeypatch.setattr(T.importlib.util, "find_spec", fake)
    with pytest.raises(RuntimeError, match="pip install tensorboard"):
        T.Telemetry("cpu", tensorboard_dir=str(tmp_path / "tb"))


def test_tensorboard_scalars_written(tmp_path):
    pytest.importorskip("tensorboard")
    tel = T.Telemetry("cpu", tensorboard_dir=str(tmp_path / "tb"))
    _run_steps(tel.timer, steps=1, batch=2)
    tel.log(1, {"loss": 1.0, "note": "text is skipped", "flag": True})
    tel.close()
    assert any((tmp_path / "tb").iterdir())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA event timing needs a GPU")
def test_step_timer_cuda_events_structure():
    dev = torch.device("cuda")
    tel = T.Telemetry(dev)
    a = torch.randn(512, 512, device=dev)
    for _ in range(3):
        for name in ("data", "student", "optim"):
            with tel.timer.phase(name):
                (a @ a).sum()
        tel.timer.step_done(4)
    rec = tel.log(3, {})
    assert rec["timed_steps"] == 3 and rec["timed_images"] == 12
    assert math.isclose(sum(rec[f"{p}_share"] for p in ("data", "student", "optim", "other")), 1.0)
    assert rec["peak_mem_mb"] > 0
    s = tel.summary()
    assert s["peak_mem_kind"] == "cuda_max_allocated"
    tel.close()
