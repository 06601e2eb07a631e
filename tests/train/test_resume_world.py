"""Issue 14 (2): a run interrupted mid-epoch resumes under another number of processes (2 → 1 and 1 → 2 gloo
ranks on CPU). The remaining samples of the interrupted epoch are re-sharded over the new ranks (the
sampler's global batches do not depend on the world size), one line says the run is exact only up to the
resume point, and the run ends where an uninterrupted single-process run ends: every step logged once, the
same number of steps, weights equal up to DDP's reduction order.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastkd.train import __main__ as train
from fastkd.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
FLAGS = [
    "--student-embed-dim", "16", "--student-depth", "1", "--student-heads", "1", "--train-limit", "64",
    "--batch-size", "16", "--epochs", "1", "--quiet", "--device", "cpu", "--log-every", "1",
    "--method", "ce", "--ckpt-every", "2", "--eval-every", "1",
]  # 4 steps; a checkpoint after step 2, mid-epoch

STOP_AFTER_CKPT = """
import sys
from fastkd.train import __main__ as train
from fastkd.train.trainer import Trainer
orig = Trainer._save_checkpoint
def save(self, d, epoch, step):
    orig(self, d, epoch, step)
    if self.step_idx == 2:
        raise SystemExit(3)  # every rank stops right after the mid-epoch checkpoint
Trainer._save_checkpoint = save
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(_port()), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=400)


def _steps(run: Path) -> list[int]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "student.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ref")
    assert train.main([*FLAGS, "--workdir", str(root / "w"), "--out", str(root / "ref")]) == 0
    return root / "ref"


def _same_run(run: Path, ref: Path) -> None:
    assert _steps(run) == _steps(ref) == [1, 2, 3, 4]
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    wa, wb = _weights(ref), _weights(run)
    for k in wa:  # DDP averages two half-batch gradients: fp32 reduction order only
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-4, msg=k)


def test_resume_2_to_1(tmp_path, reference):
    run = tmp_path / "r"
    script = tmp_path / "stop.py"
    script.write_text(STOP_AFTER_CKPT)
    p = _torchrun([script, *FLAGS, "--workdir", tmp_path / "w", "--out", run], tmp_path)
    assert p.returncode != 0
    assert json.loads((run / "checkpoint" / "state.json").read_text())["meta"]["world"] == 2
    logs: list[str] = []
    cfg = train.parse_args(["--resume", "--out", str(run)])
    train.run(cfg, log=logs.append)
    line = [m for m in logs if "resumed under 1 process" in m]
    assert len(line) == 1 and "written by 2" in line[0]
    assert "exact only up to the resume point (step 2)" in line[0]
    _same_run(run, reference)


def test_resume_1_to_2(tmp_path, reference, monkeypatch):
    run = tmp_path / "r"
    orig = Trainer._save_checkpoint

    def save(self, d, epoch, step):
        orig(self, d, epoch, step)
        if self.step_idx == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save_checkpoint", save)
    # an interrupt stops the run with one line and rc 128 + SIGINT (fastkd.stop)
    assert train.main([*FLAGS, "--workdir", str(tmp_path / "w"), "--out", str(run)]) == 130
    monkeypatch.undo()
    p = _torchrun(["-m", "fastkd.train", "--resume", "--out", run], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("resumed under 2 process(es) (checkpoint written by 1)") == 1, p.stdout
    assert "exact only up to the resume point (step 2)" in p.stdout
    _same_run(run, reference)


def test_a_run_destroys_its_process_group_even_when_it_fails(monkeypatch):
    """``run`` destroys the process group a torchrun rank joined, also when training raises: left to
    exit-time destruction, a gloo rank aborted in CI under load ("terminate called without an active
    exception"). One process: nothing to destroy."""
    from fastkd.train import distributed

    destroyed = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda *a: destroyed.append(1))
    distributed.Dist().close()
    assert destroyed == []
    monkeypatch.setattr(train, "init_distributed", lambda spec: distributed.Dist(rank=1, world=2))

    def fail(*a):
        raise ValueError("boom")

    monkeypatch.setattr(train, "_run", fail)
    cfg = train.parse_args([*FLAGS, "--out", "unused"])
    with pytest.raises(ValueError, match="boom"):
        train.run(cfg)
    assert destroyed == [1]


def test_a_busy_out_stops_every_rank_with_one_line(tmp_path):
    """Under torchrun only rank 0 takes the --out lock; the ranks agree on it first, so when another process
    holds it every rank stops with one line (rank 1 used to die in the next barrier with a traceback)."""
    from fastkd.train.rundir import run_dir_lock

    run = tmp_path / "r"
    with run_dir_lock(run):
        p = _torchrun(["-m", "fastkd.train", *FLAGS, "--workdir", tmp_path / "w", "--out", run], tmp_path)
    assert p.returncode != 0
    # one error line from each rank (counted, not split: the two ranks share stderr and were seen to land
    # on one line when they wrote at the same moment)
    assert p.stderr.count("fastkd: error: --out") == 2, p.stderr[-3000:]
    assert p.stderr.count("is in use by another fastkd process") == 2, p.stderr[-3000:]
    assert "[rank1]" not in p.stderr and "[rank0]" not in p.stderr, p.stderr[-3000:]  # no rank traceback
    assert not run.exists()


SIGTERM_RANK1_AT_5 = """
import os, signal, sys, time
from fastkd.train import __main__ as train
from fastkd import stop
from fastkd.train.trainer import Trainer
stop.REPEAT_S = 0.5  # below the 1 s step that follows, so torchrun's own SIGTERM counts as a second signal
orig, save = Trainer.step, Trainer._save_checkpoint
def step(self, *a, **k):
    out = orig(self, *a, **k)
    if self.step_idx == 5 and (self.dist.rank == 1 or os.environ.get("BOTH")):
        os.kill(os.getpid(), signal.SIGTERM)  # rank 1 only (a kill of one pid), or both (a scheduler)
    if self.step_idx == 6:
        time.sleep(1)
    return out
def slow_save(self, *a, **k):
    if self.dist.rank == 0 and self.step_idx == 6:
        time.sleep(3)  # a big checkpoint: rank 1 must not exit (and torchrun end rank 0) before it is written
    return save(self, *a, **k)
Trainer.step, Trainer._save_checkpoint = step, slow_save
sys.exit(train.main(sys.argv[1:]))
"""


STOP_FLAGS = [*FLAGS, "--epochs", "2", "--log-every", "2", "--ckpt-every", "0"]  # 4 steps per epoch


@pytest.fixture(scope="module")
def full_2rank(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("full2")
    p = _torchrun(["-m", "fastkd.train", *STOP_FLAGS, "--workdir", root / "w", "--out", root / "full"], root)
    assert p.returncode == 0, p.stderr[-3000:]
    return root / "full"


@pytest.mark.parametrize("both", [False, True], ids=["rank1", "both"])
def test_a_sigterm_to_one_rank_stops_every_rank_at_the_next_log_step_with_a_checkpoint(
    tmp_path, both, full_2rank
):
    """Under torchrun a signal used to stop its rank at once, with a traceback, and leave the others stuck in
    the next collective. Now the ranks agree at the next log step: all of them stop there with a
    checkpoint, one line each, rc 128 + SIGTERM; the resume under torchrun ends where an uninterrupted
    2-process run ends, bit for bit. ``both``: every rank got it (a scheduler), so rank 1's exit, which
    makes torchrun SIGTERM rank 0 again, must wait until rank 0 has written the checkpoint."""
    flags, full = STOP_FLAGS, full_2rank
    script = tmp_path / "term.py"
    script.write_text(SIGTERM_RANK1_AT_5)
    run = tmp_path / "r"
    p = _torchrun([script, *flags, "--workdir", tmp_path / "w", "--out", run], tmp_path,
                  env={"BOTH": "1"} if both else {})
    assert p.returncode != 0
    # counted, not split by line: the two ranks share stderr
    line = "fastkd: stopped by SIGTERM at step 6: checkpoint written in"
    assert p.stderr.count(line) == 2, p.stderr[-3000:]
    assert "[rank1]" not in p.stderr and "[rank0]" not in p.stderr, p.stderr[-3000:]  # no rank traceback
    meta = json.loads((run / "checkpoint" / "state.json").read_text())["meta"]
    assert (meta["epoch"], meta["step_in_epoch"], meta["step"], meta["world"]) == (1, 2, 6, 2)
    assert _steps(run) == [1, 2, 4, 6]
    p = _torchrun(["-m", "fastkd.train", "--resume", "--out", run], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert _steps(run) == _steps(full) == [1, 2, 4, 6, 8]
    wa, wb = _weights(full), _weights(run)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
