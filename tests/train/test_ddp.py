"""Issue 8: ``torchrun`` DDP on CPU (2 gloo processes) matches a single-process run, same global batch.

The single-process run (in this process) and the 2-process run (``python -m torch.distributed.run``) use the
same flags: method ``kd`` (deterministic: no random masks, so every step's loss is a function of the
weights and the batch only), global ``--batch-size 32``, 2 epochs of 192 images (12 steps), ``--log-every 1``.
Each rank gets half of every global batch (``EpochSampler``), DDP averages the gradients and the logged
scalars are averaged over ranks, so the logged curve is the single-process one up to fp32 reduction order.
Both the online teacher (the tiny default teacher, trained once in the shared ``--workdir``) and the cached
teacher are checked. Only rank 0 writes: one metrics record per step, one checkpoint file, one summary.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastkd.config import parse_args
from fastkd.train import __main__ as train

REPO = Path(__file__).resolve().parents[2]  # the checkout (tests/train/ → ..): torchrun runs its fastkd

FLAGS = [
    "--teacher-embed-dim", "32", "--teacher-depth", "2", "--teacher-heads", "2", "--teacher-epochs", "2",
    "--student-embed-dim", "32", "--student-depth", "2", "--student-heads", "2",
    "--train-limit", "192", "--epochs", "2", "--batch-size", "32", "--quiet", "--device", "cpu",
    "--eval-every", "1", "--log-every", "1", "--method", "kd", "--seed", "3",
]
RUN_FILES = ["checkpoint", "config.json", "loss_modules.safetensors", "metrics.jsonl", "report.png",
             "student.safetensors", "summary.json"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """1 intra-op thread, like each torchrun worker (OMP_NUM_THREADS=1): tiny shapes run much faster than
    with 2 threads on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(argv: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "fastkd.train", *map(str, argv)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-4000:])
    return p


def _records(run: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_top1" in r]


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _compare(single: Path, ddp: Path, parts: tuple[str, ...]) -> None:
    # rank 0 alone wrote the run directory: the same files as a single-process run, each step logged once
    # (both ranks appending to metrics.jsonl would log it twice), one checkpoint tensor file
    assert sorted(p.name for p in ddp.iterdir()) == RUN_FILES
    ckpt = json.loads((ddp / "checkpoint" / "state.json").read_text())
    assert ckpt["meta"] == {"epoch": 2, "step_in_epoch": 0, "step": 12, "world": 2}
    assert sorted(p.name for p in (ddp / "checkpoint").iterdir()) == sorted(["state.json", ckpt["tensors"]])
    s1, v1 = _records(single)
    s2, v2 = _records(ddp)
    assert [r["step"] for r in s2] == [r["step"] for r in s1] == list(range(1, 13))
    assert [(r["epoch"], r["step"]) for r in v2] == [(r["epoch"], r["step"]) for r in v1] == [(1, 6), (2, 12)]
    # measured drift, single vs 2 gloo ranks (12 steps, online and cached): logged loss and ce <= 2.1e-7
    # relative (1-2 ulp of fp32: two half-batch means averaged vs one mean over 32); the kd part <= 3.1e-7
    # absolute, which is 1.1e-5 relative as kd ≈ 0.027 is a small difference of O(1) log-probabilities;
    # grad_norm (after DDP's bucketed gradient all-reduce) <= 1.5e-7 relative
    for a, b in zip(s1, s2, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])
        for k in parts:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=3e-6), (a["step"], k, a[k], b[k])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5), a["step"]
        assert b["lr"] == a["lr"]
    sum1, sum2 = (json.loads((r / "summary.json").read_text()) for r in (single, ddp))
    assert sum1["steps"] == sum2["steps"] == 12
    # final weights: measured max |Δ| <= 7.5e-7 for every tensor but the attention qkv biases (<= 1.7e-5):
    # the key bias has an exactly-zero true gradient (softmax is shift invariant), so AdamW's m/sqrt(v)
    # turns the round-off left in it into O(lr) steps
    wa, wb = _load(single / "student.safetensors"), _load(ddp / "student.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        atol = 1e-4 if k.endswith("attn.qkv.bias") else 5e-6
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=atol, msg=k)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The 2-process online run first, in a fresh workdir: rank 0 trains the tiny default teacher while rank 1
    waits at the barrier, then loads it. Then the single-process run, which reuses that teacher."""
    root = tmp_path_factory.mktemp("ddp")
    work = root / "work"
    p = _torchrun([*FLAGS, "--workdir", work, "--out", root / "ddp"])
    logs: list[str] = []
    cfg = parse_args([*FLAGS, "--workdir", str(work), "--out", str(root / "single")])
    train.run(cfg, log=logs.append)
    assert any("reusing teacher" in m for m in logs)
    teachers = list((work / "teachers").glob("*/student.safetensors"))
    assert len(teachers) == 1
    return SimpleNamespace(root=root, work=work, teacher=teachers[0], single=root / "single",
                           ddp_log=p.stdout)


def test_ddp_online_teacher_matches_single_process(env):
    log = env.ddp_log
    # rank 0 talks, once; it trained the default teacher once (rank 1 did not train another)
    assert log.count("student val top-1") == 1, log
    assert "2 processes (gloo), global batch 32" in log
    assert log.count("training the default teacher") == 1, log
    _compare(env.single, env.root / "ddp", ("ce", "kd"))


def test_ddp_cached_teacher_matches_single_process(env):
    from fastkd.cache.build import build_cache

    # the cache names the teacher file explicitly (a cache built for the default teacher with --train-limit
    # and --teacher-* shape flags does not match the run's default-teacher key: reported to the cache owner)
    # a checkpoint teacher is used as saved: the --teacher-* shape flags would conflict (issue 14)
    shape = {"--teacher-embed-dim", "--teacher-depth", "--teacher-heads"}
    plain = [f for i, f in enumerate(FLAGS) if f not in shape and (i == 0 or FLAGS[i - 1] not in shape)]
    tflags = [*plain, "--workdir", str(env.work), "--teacher", str(env.teacher)]
    cache = env.root / "cache"
    build_cache(parse_args(tflags), cache, views=2, log=lambda *a: None, progress=False)
    single = env.root / "single-cached"
    cfg = parse_args([*tflags, "--teacher-cache", str(cache), "--out", str(single)])
    s = train.run(cfg, log=lambda *a: None)
    assert s["teacher_mode"] == "cached"
    out = env.root / "ddp-cached"
    p = _torchrun([*tflags, "--teacher-cache", cache, "--out", out])
    assert p.stdout.count("student val top-1") == 1, p.stdout
    assert json.loads((out / "summary.json").read_text())["teacher_mode"] == "cached"
    _compare(single, out, ("ce", "kd"))


def _checkpoint_teacher(flags: list[str], env) -> list[str]:
    """``flags`` with the default teacher's file as ``--teacher`` (its shape flags dropped: a checkpoint is
    used as saved). Another --batch-size would key, and train, another default teacher."""
    shape = {"--teacher-embed-dim", "--teacher-depth", "--teacher-heads"}
    kept = [f for i, f in enumerate(flags) if f not in shape and (i == 0 or flags[i - 1] not in shape)]
    return [*kept, "--teacher", str(env.teacher), "--workdir", str(env.work)]


def test_ddp_accumulated_steps_match_single_process(env):
    """``--accum-steps 2`` at ``--batch-size 16`` under 2 ranks: each optimizer step takes 2 global batches
    of 16 (8 per rank), the first backward skips DDP's all-reduce (``no_sync``), the second reduces the
    sum; the run matches the single-process run at ``--batch-size 32`` (the same 32 ids per step)."""
    i = FLAGS.index("--batch-size")
    flags = _checkpoint_teacher([*FLAGS[:i], "--batch-size", "16", "--accum-steps", "2", *FLAGS[i + 2:]], env)
    out = env.root / "ddp-accum"
    p = _torchrun([*flags, "--out", out])
    assert "2 processes (gloo), global batch 16" in p.stdout, p.stdout
    _compare(env.single, out, ("ce", "kd"))


HOOK_COUNT = """
import os, sys, torch.distributed as dist
from fastkd.config import parse_args
from fastkd.train.distributed import init_distributed
from fastkd.train.setup import build_trainer

calls = []
def hook(state, bucket):  # DDP's all-reduce of one gradient bucket, counted
    calls.append(1)
    fut = dist.all_reduce(bucket.buffer().div_(dist.get_world_size()), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])

d = init_distributed("cpu")
tr = build_trainer(parse_args(sys.argv[1:]), dist=d, log=lambda *a: None)
tr.step_module.register_comm_hook(None, hook)
it = iter(tr.sampler.batches(0))
counts = []
for s in range(3):
    n = len(calls)
    tr.step([next(it), next(it)], 0)
    counts.append(len(calls) - n)
with open(os.path.join(os.environ["COUNT_DIR"], f"rank{d.rank}.txt"), "w") as fh:  # a file per rank
    fh.write(" ".join(map(str, counts)))
"""


def test_ddp_accumulation_all_reduces_once_per_step(env, tmp_path):
    """The first backward of the process all-reduces (DDP records its static graph there), then only the last
    batch of each step does: 1 bucket all-reduce per optimizer step, not per batch."""
    script = tmp_path / "count.py"
    script.write_text(HOOK_COUNT)
    flags = _checkpoint_teacher([*FLAGS, "--batch-size", "16", "--accum-steps", "2"], env)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script), *flags]
    env_vars = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "COUNT_DIR": str(tmp_path)}
    p = subprocess.run(cmd, cwd=REPO, env=env_vars, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-4000:])
    for rank in (0, 1):  # bucket all-reduces per step (the tiny student's gradients are one bucket)
        assert (tmp_path / f"rank{rank}.txt").read_text() == "2 1 1", rank
