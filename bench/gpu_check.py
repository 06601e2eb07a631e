"""One-call GPU check: the step users run, loss benches, kernel/sync tests, peer + sync probes.

    python3 bench/gpu_check.py OUT_DIR [--budget SECONDS] [--skip STEP,...] [--bench-device cuda|cpu]
        [--step-variants a,b,...] [--step-cap S] [--losses a,b] [--tests all|sync]

Normally started through ``bench/gpu_check.sh OUT_DIR`` (sets PYTHONPATH to the repo, unsets
TRITON_INTERPRET). Needs nothing beyond what the GPU machines carry (torch, triton, timm, pytest,
pytest-benchmark, pytest-xdist if present, nvidia-ml-py); installs nothing. Steps, in priority order,
each a subprocess with its own cap cut to the remaining budget (default 500 s, so the whole check ends
inside 9 minutes); a failing or timed-out step is recorded and the next one runs. Measured-dispatch
decisions go to a fresh FASTKD_CACHE_DIR in the work folder (so the check measures, never reuses).

  env            versions, GPU, the fused-path description                                    cap  40 s
  step           bench/step_bench.py: DeiT-S <- DeiT-B, 224², B=256, bf16, 18+1 variants by priority,
                 interleaved, host syncs per step, ratios vs the issue-12 targets               cap 220 s
  losses_deit_s  bench/test_bench_losses.py training inputs, fwd+bwd, DeiT-S, + copy bandwidth
                 (FASTKD_KERNELS=triton: the fused provider is the kernels, not the dispatch)   cap  75 s
  profile        bench/profile_losses.py: the mimic, map and gen losses at DeiT-S, fused vs compiled,
                 torch.profiler tables into gpu_check.json ("profile_txt")                    cap  95 s
  losses_deit_b  the loss benches at DeiT-B                                                     cap  60 s
  augment        bench/aug_bench.py: RandomResizedCrop and RandAugment at B=256, 224² (the layer kernels
                 vs the torch form, and their bit equality on the device) into gpu_check.json     cap  30 s
  tests          tests/kernels (minus the CPU-only compile check), tests/data/test_augment_device.py
                 and every tests/ file that uses set_sync_debug_mode, real compilation,
                 FASTKD_KERNELS=triton, pytest-xdist -n 8 when installed                        cap 150 s
  sync           bench/sync_probe.py: syncs per step with their sites, what the fused ops are fed  cap  45 s
  step_profile   bench/profile_step.py: torch.profiler tables of the cached vitkd+nkd and the online kd
                 steps (3 steps back to back) into gpu_check.json ("step_profile_txt")        cap  75 s
  peer           bench/peer_bench.py: fastkd kd vs hand-written KD and timm.task               cap  60 s
  train          python -m fastkd.train --fused --epochs 1 --teacher-epochs 1 (summary.json: telemetry
                 + the dispatch record)                                                         cap  45 s

OUT_DIR gets at most 8 files: gpu_check.json (every step's status, rc, seconds, log tail; versions;
tree_digest, the code's digest, matched locally by ``python bench/gpu_check.py --digest``; nvidia-smi
fields; test counts and failures; the training summary), bench_summary.md (PASS/FAIL of every issue-12
and issue-13 target with the measured value, the step variants, the loss table, the dispatch decisions),
step.json, bench.json (merged pytest-benchmark JSON of the loss benches), peer.json, sync.json (+ the
report text), dispatch.json (the decisions the measured dispatch made), log.txt (all step logs).
Exit status 0 when every step that ran passed, else 1. ``--bench-device cpu`` dry-runs the whole
pipeline on a machine without a GPU (tiny CPU shapes, small budgets).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
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

    def run(
        self,
        name: str,
        cmd: list[str],
        cap_s: float,
        reserve_s: float = 15,
        env: dict[str, str] | None = None,
    ) -> dict:
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
                proc = subprocess.Popen(
                    cmd,
                    cwd=REPO,
                    env={**self.env, **(env or {})},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                try:
                    rc = proc.wait(timeout=limit)
                    status = "ok" if rc == 0 else "failed"
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)  # the step's own process group
                    rc = proc.wait()
                    status = "timeout"
            text = log_path.read_text(errors="replace")
            step.update(
                status=status,
                rc=rc,
                seconds=round(time.monotonic() - t0, 1),
                limit_s=round(limit),
                log_tail=text[-3000:],
            )
            head = f"===== {name} ({status}, rc={rc}, {step['seconds']}s): {step['cmd']}"
            self.log_parts.append(f"{head}\n{text}")
        print(f"gpu_check: {name}: {step['status']} {step.get('seconds', '')}", flush=True)
        self.steps.append(step)
        return step

    def python(
        self,
        name: str,
        args: list[str],
        cap_s: float,
        reserve_s: float = 15,
        env: dict[str, str] | None = None,
    ) -> dict:
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
            return json.loads(line[len("GPU_CHECK_ENV ") :])
    return {}


def _nvidia_smi(out: Path) -> dict:
    """nvidia-smi -q into OUT/nvidia-smi.txt (the work dir: appended to log.txt), and the key fields as a
    dict (empty without nvidia-smi)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        _write_atomic(out / "nvidia-smi.txt", "nvidia-smi not found\n")
        return {}
    try:
        q = subprocess.run([exe, "-q"], capture_output=True, text=True, timeout=60)
        _write_atomic(out / "nvidia-smi.txt", q.stdout + q.stderr)
        fields = "name,driver_version,memory.total,power.limit,clocks.max.sm,clocks.max.memory,pci.bus_id"
        c = subprocess.run(
            [exe, f"--query-gpu={fields}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=60,
        )
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
        for c in root.iter("testcase")
        if c.find("failure") is not None or c.find("error") is not None
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


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _sync_tests() -> list[str]:
    """tests/ files that check host syncs on CUDA (they call set_sync_debug_mode)."""
    found = []
    for p in sorted((REPO / "tests").rglob("test_*.py")):
        rel = p.relative_to(REPO).as_posix()
        if rel.startswith("tests/kernels/"):
            continue
        try:
            if "set_sync_debug_mode" in p.read_text(errors="replace"):
                found.append(rel)
        except OSError:
            continue
    return found


_DIGEST_ROOTS = ("fastkd", "kernels", "bench", "tests")
_DIGEST_SUFFIXES = (".py", ".sh", ".toml")


def tree_digest(root: Path = REPO) -> str:
    """sha256 (first 16 hex digits) over the code files of the tree (``.py``, ``.sh``, ``.toml`` below
    fastkd/, kernels/, bench/ but its results, tests/, and pyproject.toml): their relative paths and
    bytes, in sorted order. Identifies the code that ran where the checkout's git history is stale."""
    files = [root / "pyproject.toml"] if (root / "pyproject.toml").is_file() else []
    for top in _DIGEST_ROOTS:
        files += [p for p in (root / top).rglob("*") if p.suffix in _DIGEST_SUFFIXES and p.is_file()]
    h = hashlib.sha256()
    for p in sorted(files, key=lambda q: q.relative_to(root).as_posix()):
        rel = p.relative_to(root).as_posix()
        if rel.startswith("bench/results/") or "__pycache__" in rel:
            continue
        h.update(rel.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv == ["--digest"]:  # the code digest of this checkout (to match a results folder's tree_digest)
        print(tree_digest())
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="output folder (created)")
    ap.add_argument(
        "--budget",
        type=float,
        default=float(os.environ.get("GPU_CHECK_BUDGET_S", 500)),
        help="seconds for all steps together (default 500, env GPU_CHECK_BUDGET_S)",
    )
    ap.add_argument(
        "--skip",
        default="",
        help="comma-separated steps to skip (env, step, losses_deit_s, profile, losses_deit_b, "
        "tests, sync, step_profile, peer, augment, train)",
    )
    ap.add_argument(
        "--step-variants",
        default="",
        help="comma-separated step_bench variants (default: all, in priority order)",
    )
    ap.add_argument(
        "--step-cap",
        type=float,
        default=220,
        help="seconds for the step bench (default 220; a follow-up call gives it less)",
    )
    ap.add_argument(
        "--losses",
        default="",
        help="comma-separated token losses for the loss benches (default: all three)",
    )
    ap.add_argument(
        "--tests",
        default="all",
        choices=("all", "sync"),
        help="sync: only the host-sync tests (tests/ files that use set_sync_debug_mode)",
    )
    ap.add_argument(
        "--bench-device",
        default="cuda",
        choices=("cuda", "cpu"),
        help="cpu: dry-run the pipeline on a machine without a GPU (tiny CPU shapes)",
    )
    args = ap.parse_args(argv)
    cuda = args.bench_device == "cuda"
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fastkd_gpu_check_"))
    r = Runner(out, work, args.budget, {s for s in args.skip.split(",") if s})
    r.env["FASTKD_CACHE_DIR"] = str(work / "cache")  # measure afresh; dispatch.json is copied to OUT
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    report: dict = {
        "started": started,
        "host": platform.node(),
        "repo": str(REPO),
        "budget_s": args.budget,
        "bench_device": args.bench_device,
    }
    small = [] if cuda else ["--small"]
    triton_env = {"FASTKD_KERNELS": "triton"}  # tests and the fused loss provider: the kernels themselves

    def save_report():
        report["steps"] = r.steps
        report["ok"] = all(s["status"] in ("ok", "skipped") for s in r.steps)
        _write_atomic(out / "gpu_check.json", json.dumps(report, indent=1, default=str))

    # env -------------------------------------------------------------------------------------------
    report["nvidia_smi"] = _nvidia_smi(work)
    env_step = r.python("env", ["-c", ENV_SNIPPET], cap_s=40)
    report["versions"] = _env_info(env_step)
    try:
        report["git_commit"] = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        report["git_commit"] = None
    # a device machine's .git may be older than the tree it was sent (the tree travels, its history may
    # not): the digest of the code itself identifies it; ``python bench/gpu_check.py --digest`` on a
    # checkout prints the same value for the same code
    report["tree_digest"] = tree_digest()
    save_report()

    # the step users run (priority 1) ----------------------------------------------------------------
    step_json = work / "step.json"
    cap = args.step_cap if cuda else 150
    inner = max(30, min(cap, r.remaining() - 15) - 30)  # the bench's own budget, inside the step's cap
    r.python(
        "step",
        [
            "bench/step_bench.py",
            str(step_json),
            "--budget",
            str(round(inner)),
            *small,
            *(
                []
                if cuda
                else [
                    "--variants",
                    args.step_variants or "plain_eager,vitkd_nkd_online_eager,"
                    "vitkd_nkd_online_fused,vitkd_nkd_cached_fused,kd_online_fused",
                ]
            ),
            *(["--variants", args.step_variants] if (cuda and args.step_variants) else []),
        ],
        cap_s=cap,
    )
    step = _read_json(step_json)
    if step is not None:
        shutil.copyfile(step_json, out / "step.json")
    save_report()

    # loss benches on the training inputs (priority 2) ------------------------------------------------
    bench_common = [
        "-m",
        "pytest",
        "--benchmark-only",
        "--bench-device",
        args.bench_device,
        "--bench-time",
        "0.05" if cuda else "0.02",
        "-q",
        "-rs",
        "-p",
        "no:cacheprovider",
        "bench/test_bench_losses.py",
    ]
    only = " or ".join(x for x in args.losses.split(",") if x)
    train_sel = f"training_inputs and fwdbwd{f' and ({only})' if only else ''}"
    sel = f"({train_sel}) or copy"
    shapes = ("deit_s", "deit_b") if cuda else ("cpu_s", "cpu_m")
    parts = []
    part = work / f"bench_{shapes[0]}.json"
    r.python(
        f"losses_{shapes[0]}",
        [*bench_common, "--bench-shapes", shapes[0], "-k", sel, f"--benchmark-json={part}"],
        cap_s=75,
        env=triton_env,
    )
    parts.append(part)
    save_report()

    # profile of the token losses at DeiT-S (cuda only): where the fused path's time goes, kernel by kernel
    # (round 2 predicted 0.71 ms fwd+bwd and measured 2.45 ms on the 2026-11-26 H200; bench/NOTES.md); gen
    # last: the H100 measured it 0.89× compiled, its conv kernels per provider should say why
    if cuda:
        prof_dir = work / "prof"
        r.python(
            "profile",
            [
                "bench/profile_losses.py",
                str(prof_dir),
                "--losses",
                "vitkd_mimic_loss,cls_patch_map_loss,vitkd_gen_loss",
                "--shapes",
                "deit_s",
            ],
            cap_s=95,
            env=triton_env,
        )
        try:
            report["profile_txt"] = (prof_dir / "prof.txt").read_text()[-60000:]
        except OSError:
            pass
        save_report()

    # DeiT-B loss benches -----------------------------------------------------------------------------
    part = work / f"bench_{shapes[1]}.json"
    r.python(
        f"losses_{shapes[1]}",
        [
            *bench_common,
            "--bench-shapes",
            shapes[1],
            "-k",
            train_sel,
            f"--benchmark-json={part}",
        ],
        cap_s=60,
        env=triton_env,
    )
    parts.append(part)
    save_report()

    # the DeiT recipe's device augmentation: RRC and RandAugment (kernels vs torch form, their equality;
    # ≈ 8 s, before the tests: the 2026-11-27 H200 call skipped it for budget) -----------------------------
    aug_json = work / "aug.json"
    r.python("augment", ["bench/aug_bench.py", str(aug_json), *small], cap_s=30)
    report["augment"] = _read_json(aug_json)
    save_report()

    # kernel + sync tests with real compilation (priority 3) ------------------------------------------
    junit = work / "junit_tests.xml"
    test_paths = [] if args.tests == "sync" else ["tests/kernels", "tests/data/test_augment_device.py"]
    test_paths = [p for p in test_paths if (REPO / p).exists()]
    test_paths += [p for p in _sync_tests() if p not in test_paths]
    report["test_paths"] = test_paths
    xdist = importlib.util.find_spec("xdist") is not None
    # -v: each result is logged as it lands (the 2026-11-26 H200 run timed out here with failures that the
    # junit file, written only at the end, could not name)
    r.python(
        "tests",
        [
            "-m",
            "pytest",
            *test_paths,
            "-v",
            "--tb=line",
            "-rs",
            "-p",
            "no:cacheprovider",
            "-p",
            "bench.failnow",  # each failure's reason as it lands (the 2026-11-27 run timed out at 98 %)
            "-k",
            "not compile_check",
            *(["-n", "8"] if xdist and cuda else []),
            f"--junitxml={junit}",
        ],
        cap_s=150,
        env=triton_env,
    )
    report["tests"] = _junit_counts(junit)
    save_report()

    # sync probe -------------------------------------------------------------------------------------
    sync_dir = work / "sync"
    r.python("sync", ["bench/sync_probe.py", str(sync_dir), "--budget", "35", *small], cap_s=45)
    if (sync_dir / "sync.json").exists():
        doc = _read_json(sync_dir / "sync.json") or {}
        try:
            doc["report_txt"] = (sync_dir / "sync_report.txt").read_text()
        except OSError:
            pass
        _write_atomic(out / "sync.json", json.dumps(doc, indent=1, default=str))
    save_report()

    # step profile: where the cached and kd steps' time goes (torch.profiler, steps back to back) ----------
    sprof_dir = work / "step_profile"
    r.python("step_profile", ["bench/profile_step.py", str(sprof_dir), *small], cap_s=75)
    try:
        report["step_profile_txt"] = (sprof_dir / "prof_step.txt").read_text()[-30000:]
    except OSError:
        pass
    save_report()

    # peer -------------------------------------------------------------------------------------------
    peer_json = work / "peer.json"
    r.python(
        "peer",
        ["bench/peer_bench.py", str(peer_json), *small],
        cap_s=60,
        env={"PEER_BUDGET": str(round(max(20, min(60, r.remaining() - 15) - 10)))},
    )
    peer = _read_json(peer_json)
    if peer is not None:
        shutil.copyfile(peer_json, out / "peer.json")
    save_report()

    # a training run with telemetry, if time is left -------------------------------------------------
    train_dir = work / "train"
    extra = os.environ.get("GPU_CHECK_TRAIN_ARGS", "").split()
    r.python(
        "train",
        [
            "-m",
            "fastkd.train",
            "--fused",
            "--epochs",
            "1",
            "--teacher-epochs",
            "1",
            "--out",
            str(train_dir),
            "--workdir",
            str(work / "runs"),
            *extra,
        ],
        cap_s=45,
    )
    report["train_summary"] = _read_json(train_dir / "summary.json")

    # dispatch decisions, summary, report ------------------------------------------------------------
    disp = work / "cache" / "dispatch.json"
    if disp.exists():
        shutil.copyfile(disp, out / "dispatch.json")
    merged = _merge_bench([p for p in parts if p.exists()], work)
    if merged is not None:
        shutil.copyfile(merged, out / "bench.json")
    report["bench_parts"] = [p.name for p in parts if p.exists()]
    try:
        rows = SUMMARY.load(str(merged)) if merged is not None else []
        text = SUMMARY.render(rows, step, peer, (step or {}).get("dispatch"))
        _write_atomic(out / "bench_summary.md", text)
        report["bench_summary_md"] = text
    except BaseException as e:  # a summary bug must not lose the raw results (load() raises SystemExit)
        report["bench_summary_error"] = f"{type(e).__name__}: {e}"
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    report["wall_s"] = round(args.budget - r.remaining(), 1)
    extra_logs = []
    for name in ("nvidia-smi.txt",):
        if (work / name).exists():
            extra_logs.append(f"===== {name}\n{(work / name).read_text(errors='replace')}")
    _write_atomic(out / "log.txt", "\n".join([*r.log_parts, *extra_logs]))
    save_report()
    shutil.rmtree(work, ignore_errors=True)
    bad = [s["name"] for s in r.steps if s["status"] not in ("ok", "skipped")]
    print(f"gpu_check: {'all steps passed' if not bad else 'FAILED: ' + ', '.join(bad)} → {out}", flush=True)
    for s in r.steps:
        print(f"  {s['name']:14s} {s['status']:8s} {s.get('seconds', '—')} s", flush=True)
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
