"""One-call GPU check: kernel correctness with real compilation, benchmarks, training telemetry.

    python3 bench/gpu_check.py OUT_DIR [--budget SECONDS] [--skip STEP,...]

Normally started through ``bench/gpu_check.sh OUT_DIR`` (sets PYTHONPATH to the repo, unsets
TRITON_INTERPRET). Needs nothing beyond what the GPU machines carry (torch, triton, timm, pytest,
pytest-benchmark, nvidia-ml-py); installs nothing. Steps, in priority order, each in a subprocess
with its own time limit cut to the remaining budget (default 500 s, so the whole check ends inside
9 minutes); a failing or timed-out step is recorded and the next one runs:

  env          versions, GPU (nvidia-smi), the fused-path description
  tests        pytest tests/kernels tests/test_telemetry.py, real Triton compilation
  train        python -m fastkd.train --fused --epochs 1 (telemetry in metrics.jsonl/summary.json);
               env GPU_CHECK_TRAIN_ARGS adds arguments
  bench_main   loss benchmarks at DeiT-S shapes + device copy bandwidth
  bench_step   bench/test_bench_step.py (when present), eager, then bench_step_compiled
               (FASTKD_BENCH_STEP_COMPILE=1)
  bench_deit_t, bench_deit_b   loss benchmarks at DeiT-T and DeiT-B shapes

OUT_DIR gets at most 8 files (the device tool returns no more): gpu_check.json (every step's
status, rc, seconds, log tail; versions; test counts; the training summary), bench.json (merged
pytest-benchmark JSON), bench.csv, bench_summary.md, nvidia-smi.txt, log.txt (all step logs),
train_metrics.jsonl, details.tar.gz (junit XML, per-part bench JSON, the training run without
weights). Exit status 0 when every step that ran passed, else 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH_TIME = "0.2"  # target measured seconds per benchmark (compilation happens in warmup, untimed)
MIN_STEP_S = 20  # a step with less time left than this is skipped


def _load_summary():
    """bench/summary.py as a module (stdlib only: usable even when fastkd itself fails to import)."""
    spec = importlib.util.spec_from_file_location("fastkd_bench_summary", REPO / "bench" / "summary.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SUMMARY = _load_summary()
_write_atomic = SUMMARY.write_atomic


class Runner:
    """Runs the steps against one deadline and records each one."""

    def __init__(self, out: Path, work: Path, budget_s: float, skip: set[str]):
        self.out, self.work, self.skip = out, work, skip
        self.deadline = time.monotonic() + budget_s
        self.steps: list[dict] = []
        self.log_parts: list[str] = []
        self.env = dict(os.environ)
        self.env.pop("TRITON_INTERPRET", None)  # real compilation, whatever the caller had set
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        self.env["PYTHONUNBUFFERED"] = "1"

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, cmd: list[str], cap_s: float, reserve_s: float = 15,
            env: dict[str, str] | None = None) -> dict:
        """Run ``cmd`` in the repo with limit min(cap, remaining − reserve) and ``env`` added to the
        environment; record and return the step."""
        step = {"name": name, "cmd": " ".join([*(f"{k}={v}" for k, v in (env or {}).items()), *cmd])}
        limit = min(cap_s, self.remaining() - reserve_s)
        if name in self.skip:
            step.update(status="skipped", reason="--skip")
        elif limit < MIN_STEP_S:
            step.update(status="skipped", reason=f"time budget: {max(0, self.remaining()):.0f}s left")
        else:
            log_path = self.work / f"{name}.log"
            t0 = time.monotonic()
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(cmd, cwd=REPO, env={**self.env, **(env or {})}, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
                try:
                    rc = proc.wait(timeout=limit)
                    status = "ok" if rc == 0 else "failed"
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)  # the step's own process group
                    rc = proc.wait()
                    status = "timeout"
            text = log_path.read_text(errors="replace")
            step.update(status=status, rc=rc, seconds=round(time.monotonic() - t0, 1), limit_s=round(limit),
                        log_tail=text[-3000:])
            head = f"===== {name} ({status}, rc={rc}, {step['seconds']}s): {step['cmd']}"
            self.log_parts.append(f"{head}\n{text}")
        print(f"gpu_check: {name}: {step['status']} {step.get('seconds', '')}", flush=True)
        self.steps.append(step)
        return step

    def python(self, name: str, args: list[str], cap_s: float, reserve_s: float = 15,
               env: dict[str, str] | None = None) -> dict:
        return self.run(name, [sys.executable, *args], cap_s, reserve_s, env)


ENV_SNIPPET = r"""
import json, platform, sys
info = {"python": sys.version.split()[0], "platform": platform.platform()}
for mod in ("torch", "triton", "timm", "pytest", "pytest_benchmark", "pynvml", "tensorboard", "fastkd"):
    try:
        m = __import__(mod)
        info[mod] = getattr(m, "__version__", "present")
    except Exception as e:
        info[mod] = f"missing ({type(e).__name__}: {e})"
import torch
info["cuda_available"] = torch.cuda.is_available()
info["torch_cuda"] = torch.version.cuda
info["cudnn"] = torch.backends.cudnn.version()
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, capability=f"sm_{p.major}{p.minor}", gpu_mem_gib=round(p.total_memory / 2**30, 1),
                sm_count=p.multi_processor_count)
try:
    import fastkd.kernels  # noqa: F401  (the source-checkout mapping of kernels/)
    info["fastkd.kernels"] = "importable"
except Exception as e:
    info["fastkd.kernels"] = f"NOT importable ({type(e).__name__}: {e})"
try:
    from fastkd.ops import dispatch as KF
    KF.set_fused(True)
    info["fused_path"] = KF.describe(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
except Exception as e:
    info["fused_path"] = f"unavailable ({type(e).__name__}: {e})"
print("GPU_CHECK_ENV " + json.dumps(info))
"""


def _env_info(step: dict) -> dict:
    for line in step.get("log_tail", "").splitlines():
        if line.startswith("GPU_CHECK_ENV "):
            return json.loads(line[len("GPU_CHECK_ENV "):])
    return {}


def _nvidia_smi(out: Path) -> dict:
    """nvidia-smi -q into nvidia-smi.txt, and the key fields as a dict (empty without nvidia-smi)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        _write_atomic(out / "nvidia-smi.txt", "nvidia-smi not found\n")
        return {}
    try:
        q = subprocess.run([exe, "-q"], capture_output=True, text=True, timeout=60)
        _write_atomic(out / "nvidia-smi.txt", q.stdout + q.stderr)
        fields = "name,driver_version,memory.total,power.limit,clocks.max.sm,clocks.max.memory,pci.bus_id"
        c = subprocess.run([exe, f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=60)
        values = [v.strip() for v in c.stdout.splitlines()[0].split(",")] if c.stdout.strip() else []
        return dict(zip(fields.split(","), values, strict=False))
    except (OSError, subprocess.SubprocessError) as e:
        _write_atomic(out / "nvidia-smi.txt", f"nvidia-smi failed: {e}\n")
        return {}


def _junit_counts(path: Path) -> dict | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    keys = ("tests", "failures", "errors", "skipped")
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}
    counts["failed_tests"] = [
        f"{c.get('classname')}::{c.get('name')}"
        for c in root.iter("testcase") if c.find("failure") is not None or c.find("error") is not None
    ][:50]
    return counts


def _merge_bench(parts: list[Path], out: Path) -> Path | None:
    docs = []
    for p in parts:
        try:
            docs.append(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    if not docs:
        return None
    merged = dict(docs[0])
    merged["benchmarks"] = [b for d in docs for b in d.get("benchmarks", [])]
    path = out / "bench.json"
    _write_atomic(path, json.dumps(merged, indent=1))
    return path


def _summarize(bench_json: Path, out: Path) -> str | None:
    """bench_summary.md and bench.csv via bench/summary.py (in-process)."""
    summary = SUMMARY
    rows = summary.load(str(bench_json))
    text = summary.render(rows)
    _write_atomic(out / "bench_summary.md", text)
    summary.write_csv(rows, str(out / "bench.csv"))
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="output folder (created)")
    ap.add_argument("--budget", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET_S", 500)),
                    help="seconds for all steps together (default 500, env GPU_CHECK_BUDGET_S)")
    ap.add_argument("--skip", default="", help="comma-separated steps to skip (env, tests, train, bench_*)")
    ap.add_argument("--bench-device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: dry-run the pipeline on a machine without a GPU (small CPU shapes)")
    args = ap.parse_args(argv)
    cuda = args.bench_device == "cuda"
    main_shapes, more_shapes = ("deit_s", ("deit_t", "deit_b")) if cuda else ("cpu_s", ("cpu_m",))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fastkd_gpu_check_"))
    r = Runner(out, work, args.budget, {s for s in args.skip.split(",") if s})
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    report: dict = {"started": started, "host": platform.node(), "repo": str(REPO), "budget_s": args.budget}

    # env -------------------------------------------------------------------------------------------
    report["nvidia_smi"] = _nvidia_smi(out)
    env_step = r.python("env", ["-c", ENV_SNIPPET], cap_s=90)
    report["versions"] = _env_info(env_step)
    try:
        report["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        report["git_commit"] = None

    # correctness with real compilation ------------------------------------------------------------
    junit = work / "junit_tests.xml"
    test_paths = [p for p in ("tests/kernels", "tests/test_telemetry.py") if (REPO / p).exists()]
    r.python("tests", ["-m", "pytest", *test_paths, "-q", "-rs", "-p", "no:cacheprovider",
                       f"--junitxml={junit}"], cap_s=150)
    report["tests"] = _junit_counts(junit)

    # training with telemetry -----------------------------------------------------------------------
    train_dir = work / "train"
    extra = os.environ.get("GPU_CHECK_TRAIN_ARGS", "").split()  # e.g. "--method kd+vitkd --compile"
    r.python("train", ["-m", "fastkd.train", "--fused", "--epochs", "1", "--out", str(train_dir), *extra],
             cap_s=150)
    try:
        report["train_summary"] = json.loads((train_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        report["train_summary"] = None
    if (train_dir / "metrics.jsonl").exists():
        shutil.copyfile(train_dir / "metrics.jsonl", out / "train_metrics.jsonl")

    # benchmarks ------------------------------------------------------------------------------------
    bench_common = ["-m", "pytest", "--benchmark-only", "--bench-device", args.bench_device,
                    "--bench-time", BENCH_TIME, "-q", "-rs", "-p", "no:cacheprovider"]
    parts = []
    part = work / "bench_main.json"
    r.python("bench_main", [*bench_common, "bench/test_bench_losses.py", "--bench-shapes", main_shapes,
                            f"--benchmark-json={part}"], cap_s=200)
    parts.append(part)
    if (REPO / "bench" / "test_bench_step.py").exists():
        for name, compiled in (("bench_step", "0"), ("bench_step_compiled", "1")):
            part = work / f"{name}.json"
            r.python(name, [*bench_common, "bench/test_bench_step.py", f"--benchmark-json={part}"],
                     cap_s=150, env={"FASTKD_BENCH_STEP_COMPILE": compiled})
            parts.append(part)
    for shape in more_shapes:  # one call per shape: a timeout loses one shape's results, not all
        part = work / f"bench_{shape}.json"
        r.python(f"bench_{shape}", [*bench_common, "bench/test_bench_losses.py", "--bench-shapes", shape,
                                    "-k", "not copy", f"--benchmark-json={part}"], cap_s=120, reserve_s=10)
        parts.append(part)
    merged = _merge_bench([p for p in parts if p.exists()], out)
    report["bench_parts"] = [p.name for p in parts if p.exists()]
    if merged is not None:
        try:
            report["bench_summary_md"] = _summarize(merged, out)
        except Exception as e:  # a summary bug must not lose the raw results
            report["bench_summary_error"] = f"{type(e).__name__}: {e}"

    # report ----------------------------------------------------------------------------------------
    report["steps"] = r.steps
    report["ok"] = all(s["status"] in ("ok", "skipped") for s in r.steps)
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _write_atomic(out / "log.txt", "\n".join(r.log_parts))
    _write_atomic(out / "gpu_check.json", json.dumps(report, indent=1, default=str))
    with tarfile.open(out / ".details.tar.gz.tmp", "w:gz") as tar:
        for p in sorted(work.rglob("*")):
            if p.is_file() and p.suffix not in (".safetensors", ".pt") and "checkpoint" not in p.parts:
                tar.add(p, arcname=str(p.relative_to(work)))
    os.replace(out / ".details.tar.gz.tmp", out / "details.tar.gz")
    shutil.rmtree(work, ignore_errors=True)
    bad = [s["name"] for s in r.steps if s["status"] not in ("ok", "skipped")]
    print(f"gpu_check: {'all steps passed' if not bad else 'FAILED: ' + ', '.join(bad)} → {out}", flush=True)
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
