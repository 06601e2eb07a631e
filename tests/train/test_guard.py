"""Issue 14: nothing lost, nothing mixed. Each case feeds the exact bad input, expects one stderr line naming
the fix (rc 2), and checks the earlier run is left intact, byte for byte where it existed.

(0) ``--resume --out X`` alone restores X's config; (1) run-directory safety; (3) the finiteness guard
covers what is saved; (4) ``validate(cfg)`` before any work; (5) untrusted checkpoints and data;
(6) disk full (safetensors' own error type); (7) outputs follow the umask. (2), resuming under another
world size, is in test_resume_world.py; the cache's disk handling in tests/cache/test_cache_disk.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from fastkd.train import __main__ as train
from fastkd.utils import load_state

TINY = [
    "--student-embed-dim",
    "16",
    "--student-depth",
    "1",
    "--student-heads",
    "1",
    "--train-limit",
    "64",
    "--batch-size",
    "16",
    "--epochs",
    "1",
    "--quiet",
    "--device",
    "cpu",
    "--log-every",
    "1",
]  # 64 / 16 = 4 steps per epoch
KD = [
    "--method",
    "kd",
    "--teacher",
    "fastkd_teacher",
    "--teacher-embed-dim",
    "16",
    "--teacher-depth",
    "1",
    "--teacher-heads",
    "1",
]  # a random tiny timm teacher: nothing is trained for it


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _main(argv, capsys) -> tuple[int, list[str]]:
    rc = train.main([str(a) for a in argv])
    return rc, capsys.readouterr().err.strip().splitlines()


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _run(tmp_path, capsys, *extra, out="r") -> Path:
    run = tmp_path / out
    rc, err = _main([*TINY, *KD, "--workdir", tmp_path / "w", "--out", run, *extra], capsys)
    assert rc == 0, err
    return run


# ---------------------------------------------------------------------------------------------- (0)
def test_resume_alone_restores_the_stored_config(tmp_path, capsys):
    """The README's resume line: the run used --method kd; ``--resume --out X`` alone used to start from the
    default vitkd+nkd config and crash with a raw RuntimeError about parts.1.mask_token."""
    run = _run(tmp_path, capsys, "--ckpt-every", "2")
    rc, err = _main(["--resume", "--out", run], capsys)
    assert rc == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "kd" and summary["steps"] == 4
    assert json.loads((run / "config.json").read_text())["method"]["method"] == "kd"


# ---------------------------------------------------------------------------------------------- (1)
def test_non_empty_out_is_refused_and_left_intact(tmp_path, capsys):
    run = _run(tmp_path, capsys)
    before = _snapshot(run)
    rc, err = _main([*TINY, "--method", "ce", "--workdir", tmp_path / "w", "--out", run], capsys)
    assert rc == 2 and len(err) == 1, err
    assert "already holds a run" in err[0] and "--resume" in err[0] and "--overwrite" in err[0], err
    assert _snapshot(run) == before


def test_overwrite_removes_the_old_checkpoint_too(tmp_path, capsys):
    run = _run(tmp_path, capsys, "--epochs", "2")
    rc, err = _main(
        [
            *TINY,
            "--method",
            "ce",
            "--workdir",
            tmp_path / "w",
            "--out",
            run,
            "--overwrite",
            "--ckpt-every",
            "2",
        ],
        capsys,
    )
    assert rc == 0, err
    _, meta = load_state(run / "checkpoint")
    assert meta["step"] == 4  # the new run's, not the old 8-step one's
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in steps) == 4
    assert json.loads((run / "summary.json").read_text())["method"] == "ce"


def test_default_run_names_differ_by_data(tmp_path, capsys):
    """Same method and seed, two datasets, no --out: two folders (the second used to destroy the first)."""
    paths = []
    for i in range(2):
        rng = np.random.default_rng(i)
        p = tmp_path / f"d{i}.npz"
        np.savez(
            p,
            x_train=rng.integers(0, 256, (64, 8, 8), dtype=np.uint8),
            y_train=np.arange(64) % 4,
            x_val=rng.integers(0, 256, (8, 8, 8), dtype=np.uint8),
            y_val=np.arange(8) % 4,
        )
        paths.append(p)
    for p in paths:
        rc, err = _main([*TINY, "--method", "ce", "--data", p, "--workdir", tmp_path / "w"], capsys)
        assert rc == 0, err
    runs = sorted(d.name for d in (tmp_path / "w").iterdir())
    assert len(runs) == 2 and all(r.startswith("ce-default-s0-d") for r in runs), runs


def test_resume_with_changed_flags_names_them_and_keeps_the_run(tmp_path, capsys):
    run = _run(tmp_path, capsys, "--epochs", "2", "--ckpt-every", "2")
    before = _snapshot(run)
    rc, err = _main(["--resume", "--out", run, "--lr", "0.01", "--batch-size", "32", "--seed", "5"], capsys)
    assert rc == 2 and len(err) == 1, err
    for f in ("lr", "batch_size", "seed"):
        assert f in err[0], err
    assert _snapshot(run) == before


def test_resume_with_resumable_flags_is_recorded_in_history(tmp_path, capsys):
    run = _run(tmp_path, capsys)
    rc, err = _main(["--resume", "--out", run, "--epochs", "2", "--eval-every", "1"], capsys)
    assert rc == 0, err
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["optim"]["epochs"] == 2
    assert cfg["history"][-1]["event"] == "resume"
    assert cfg["history"][-1]["changed"]["epochs"] == [1, 2]
    assert json.loads((run / "summary.json").read_text())["steps"] == 8


# ---------------------------------------------------------------------------------------------- (3)
def _poison_grads_at(monkeypatch, step: int):
    """From training step ``step`` on, the CE gradient is infinite while the loss value stays finite."""
    from fastkd.methods.ce import CELoss

    orig, calls = CELoss.forward, {"n": 0}

    def forward(self, s, t, batch):
        calls["n"] += 1
        out = orig(self, s, t, batch)
        if calls["n"] >= step and out["ce"].requires_grad:
            out["ce"].register_hook(lambda g: g * float("inf"))
        return out

    monkeypatch.setattr(CELoss, "forward", forward)
    return calls


def test_non_finite_gradients_never_reach_a_checkpoint(tmp_path, capsys, monkeypatch):
    calls = _poison_grads_at(monkeypatch, 3)
    run = tmp_path / "r"
    rc, err = _main([*TINY, *KD, "--workdir", tmp_path / "w", "--out", run, "--ckpt-every", "1"], capsys)
    assert rc == 2 and len(err) == 1, err
    assert "non-finite gradients at step 3" in err[0] and "last finite checkpoint (step 2)" in err[0], err
    assert calls["n"] == 3
    state, meta = load_state(run / "checkpoint")
    assert meta["step"] == 2
    for part in ("student", "loss", "opt"):
        for t in torch.utils._pytree.tree_leaves(state[part]):
            assert not isinstance(t, torch.Tensor) or torch.isfinite(t).all(), part

    # (3) resuming the same state with the same lr would repeat it: refused, the run untouched
    monkeypatch.undo()
    before = _snapshot(run)
    rc, err = _main(["--resume", "--out", run], capsys)
    assert rc == 2 and len(err) == 1 and "non-finite" in err[0] and "--lr" in err[0], err
    assert _snapshot(run) == before
    # a lower lr continues from step 2, with the new lr in effect
    rc, err = _main(["--resume", "--out", run, "--lr", "1e-4", "--min-lr", "1e-6"], capsys)
    assert rc == 0, err
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert steps[-1]["lr"] < 1e-4
    assert not (run / "checkpoint" / "nonfinite.json").exists()
    hist = json.loads((run / "config.json").read_text())["history"]
    assert hist[-1]["after_non_finite_step"] == 3 and hist[-1]["changed"]["lr"] == [2e-3, 1e-4]


# ---------------------------------------------------------------------------------------------- (4)
@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--epochs", "0"], "--epochs 0"),
        (["--epochs", "-2"], "--epochs -2"),
        (["--log-every", "0"], "--log-every 0"),
        (["--label-smoothing", "2"], "--label-smoothing 2"),
        (["--lr", "-1"], "--lr -1"),
        (["--kd-T", "0"], "--kd-T 0"),
        (["--batch-size", "0"], "--batch-size 0"),
    ],
)
def test_validate_before_any_work(tmp_path, capsys, argv, needle):
    """Bad numbers fail before any data is loaded or a teacher trained (no --teacher: the default teacher
    would be trained first; a negative --lr used to be refused only after that)."""
    rc, err = _main(
        [*TINY[:-2], "--method", "kd", "--workdir", tmp_path / "w", "--out", tmp_path / "r", *argv], capsys
    )
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "w").exists() and not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "doc, needle",
    [
        ({"optim": {"lrr": 0.1}}, "did you mean 'lr'"),
        ({"optm": {"lr": 0.1}}, "did you mean 'optim'"),
        ({"optim": {"epochs": "3"}}, "optim.epochs = '3'"),
        ({"run": {"log_every": 2.5}}, "run.log_every = 2.5"),
    ],
)
def test_config_file_fields_are_checked(tmp_path, capsys, doc, needle):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(doc))
    rc, err = _main(["--config", cfg, "--out", tmp_path / "r", "--workdir", tmp_path / "w"], capsys)
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "w").exists()


def test_shape_flags_with_a_checkpoint_teacher_conflict(tmp_path, capsys):
    from fastkd.models import create_model, save_model

    t = tmp_path / "t.safetensors"
    save_model(create_model("fastkd_teacher", num_classes=10, img_size=8, in_chans=1), t)
    rc, err = _main(
        [
            *TINY,
            "--method",
            "kd",
            "--teacher",
            t,
            "--teacher-depth",
            "3",
            "--out",
            tmp_path / "r",
            "--workdir",
            tmp_path / "w",
        ],
        capsys,
    )
    assert rc == 2 and len(err) == 1 and "--teacher-depth" in err[0] and "drop the shape flags" in err[0], err


# ---------------------------------------------------------------------------------------------- (5)
def _tiny_ckpt(path: Path) -> Path:
    from fastkd.models import create_model, save_model

    save_model(
        create_model(
            "fastkd_teacher", num_classes=10, img_size=8, in_chans=1, embed_dim=16, depth=1, num_heads=1
        ),
        path,
    )
    return path


def _rewrite_meta(path: Path, change) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
    rec = json.loads(md["fastkd"])
    change(rec)
    save_file(load_file(str(path)), str(path), metadata={**md, "fastkd": json.dumps(rec)})


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda r: r["overrides"].update(pretrained_cfg_overlay={"file": "/etc/passwd"}), "not an allowed"),
        (lambda r: r["overrides"].update(embed_dim=3_000_000), "embed_dim=3000000 is out of range"),
        (lambda r: r.update(name="hf-hub:evil/model"), "invalid architecture"),
        (lambda r: r["overrides"].update(embed_dim=64), "does not fit its recorded architecture"),
    ],
)
def test_checkpoint_metadata_is_untrusted(tmp_path, capsys, change, needle):
    t = _tiny_ckpt(tmp_path / "t.safetensors")
    _rewrite_meta(t, change)
    rc, err = _main(
        [*TINY, "--method", "kd", "--teacher", t, "--out", tmp_path / "r", "--workdir", tmp_path / "w"],
        capsys,
    )
    assert rc == 2 and len(err) == 1 and needle in err[0], err


def test_checkpoint_sha256_verified_on_load(tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    t = _tiny_ckpt(tmp_path / "t.safetensors")
    with safe_open(str(t), framework="pt") as f:
        md = f.metadata()
    sd = load_file(str(t))
    k = sorted(sd)[0]
    sd[k] = sd[k] + 1  # a flipped weight, the metadata untouched
    save_file(sd, str(t), metadata=md)
    argv = [*TINY, "--method", "kd", "--teacher", t, "--workdir", tmp_path / "w"]
    rc, err = _main([*argv, "--out", tmp_path / "r"], capsys)
    assert rc == 2 and len(err) == 1 and "sha256" in err[0] and "--no-verify" in err[0], err
    rc, err = _main([*argv, "--out", tmp_path / "r2", "--no-verify"], capsys)
    assert rc == 0, err


def test_resume_checkpoint_sha256_verified(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    run = _run(tmp_path, capsys, "--epochs", "2")
    doc = json.loads((run / "checkpoint" / "state.json").read_text())
    tf = run / "checkpoint" / doc["tensors"]
    sd = load_file(str(tf))
    sd["t0"] = sd["t0"] + 1
    save_file(sd, str(tf))
    rc, err = _main(["--resume", "--out", run, "--epochs", "3"], capsys)
    assert rc == 2 and len(err) == 1 and "sha256" in err[0], err


def test_imagefolder_symlink_cycle_is_listed_once(tmp_path):
    from PIL import Image

    from fastkd.data.datasets import load_data

    for split in ("train", "val"):
        for c in ("a", "b"):
            d = tmp_path / "ds" / split / c
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((8, 8), 40 * i + (c == "b") * 100, np.uint8)).save(d / f"{i}.png")
    (tmp_path / "ds" / "train" / "a" / "loop").symlink_to("..")  # a cycle back into train/
    (tmp_path / "ds" / "train" / "a" / "self").symlink_to(".")  # a cycle into itself
    (tmp_path / "ds" / "train" / "b" / "to_a").symlink_to("../a")  # another class's images
    d = load_data(str(tmp_path / "ds"))
    assert len(d.y_train) == 6 and d.y_train.tolist().count(0) == 3


@pytest.mark.parametrize(
    "case, needle, rc_want",
    [
        ("single", "only one class", 2),
        ("unseen-val", "no training image", 0),
        ("empty", "have no training image", 0),
    ],
)
def test_npz_label_sets(tmp_path, capsys, case, needle, rc_want):
    rng = np.random.default_rng(0)
    ytr, yva, names = np.arange(64) % 3, np.arange(8) % 3, None
    if case == "single":
        ytr, yva = np.zeros(64, np.int64), np.zeros(8, np.int64)
    elif case == "unseen-val":
        yva = np.arange(8) % 4
    else:
        names = np.array(["a", "b", "c", "d"])
    arrays = dict(
        x_train=rng.integers(0, 256, (64, 8, 8), dtype=np.uint8),
        y_train=ytr,
        x_val=rng.integers(0, 256, (8, 8, 8), dtype=np.uint8),
        y_val=yva,
    )
    if names is not None:
        arrays["class_names"] = names
    p = tmp_path / "d.npz"
    np.savez(p, **arrays)
    rc, err = _main(
        [*TINY, "--method", "ce", "--data", p, "--out", tmp_path / "r", "--workdir", tmp_path / "w"], capsys
    )
    assert rc == rc_want, err
    hits = [e for e in err if needle in e]
    assert len(hits) == 1, err


# ---------------------------------------------------------------------------------------------- (6)
def test_disk_full_from_safetensors_error_type(tmp_path, capsys, monkeypatch):
    """safetensors raises SafetensorError (not OSError) when the disk fills: still the one disk-full line."""
    import safetensors
    import safetensors.torch

    import fastkd.utils

    msg = (
        "Error while serializing: "
        'IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    )
    real = fastkd.utils.save_file
    n = {"calls": 0}

    def save_file(tensors, filename, metadata=None):
        n["calls"] += 1
        if n["calls"] == 2:
            with open(filename, "wb") as fh:
                fh.write(b"\0" * 10)
            raise safetensors.SafetensorError(msg)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(fastkd.utils, "save_file", save_file)
    run = tmp_path / "r"
    rc, err = _main([*TINY, *KD, "--workdir", tmp_path / "w", "--out", run, "--ckpt-every", "2"], capsys)
    assert rc == 2 and len(err) == 1 and "disk full" in err[0] and "--resume" in err[0], err
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]
    assert load_state(run / "checkpoint")[1]["step"] == 2


# ---------------------------------------------------------------------------------------------- (7)
@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_outputs_follow_the_umask(tmp_path, capsys, mask):
    old = os.umask(mask)
    try:
        run = _run(tmp_path, capsys, "--ckpt-every", "2")
    finally:
        os.umask(old)
    for p in run.rglob("*"):
        if p.is_file():
            assert p.stat().st_mode & 0o777 == 0o666 & ~mask, (p, oct(p.stat().st_mode))


def test_a_bad_mimic_gemm_setting_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    """``FASTKD_MIMIC_GEMM`` (the stacked ViTKD mimic's forward route) with a bad value: one error line at
    setup (``set_fused``), before the data, a teacher or the run directory exist."""
    monkeypatch.setenv("FASTKD_MIMIC_GEMM", "cutlass")
    run = tmp_path / "r"
    rc, err = _main([*TINY, *KD, "--fused", "--workdir", tmp_path / "w", "--out", run], capsys)
    assert rc == 2 and err == ["fastkd: error: FASTKD_MIMIC_GEMM='cutlass': use auto, cublas or triton"]
    assert not run.exists() and not (tmp_path / "w").exists()
    from fastkd.ops import routing

    assert not routing.is_fused()  # the failed setup left the dispatch state as it was


# ---------------------------------------------------------------------------------------------- (8)
# one process per folder: a run directory, and the default teacher's (a parallel sweep trains it once)
def test_a_second_process_on_a_running_out_is_one_line_and_touches_nothing(tmp_path, capsys):
    from fastkd.train.rundir import LOCK, run_dir_lock

    run = _run(tmp_path, capsys, "--epochs", "2")
    before = _snapshot(run)
    with run_dir_lock(run):  # the first run, still going (another fd: flock conflicts as across processes)
        assert (run / LOCK).read_text().strip() == str(os.getpid())
        rc, err = _main(["--resume", "--out", run, "--epochs", "3"], capsys)
        assert rc == 2 and len(err) == 1, err
        assert f"in use by another fastkd process (pid {os.getpid()})" in err[0] and "--resume" in err[0]
        rc, err = _main([*TINY, *KD, "--out", run, "--overwrite"], capsys)  # nor replaced under it
        assert rc == 2 and "in use" in err[0], err
        after = _snapshot(run)
        assert after.pop(LOCK) and after == before
    assert _snapshot(run) == before  # the lock file goes with the lock
    rc, err = _main(["--resume", "--out", run, "--epochs", "3"], capsys)  # free again
    assert rc == 0, err


def test_a_run_stopped_by_bad_input_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "new"
    rc, err = _main([*TINY, "--method", "kd", "--teacher", tmp_path / "missing.safetensors", "--out", out,
                     "--workdir", tmp_path / "w"], capsys)
    assert rc == 2 and len(err) == 1, err
    assert not out.exists()


def test_a_second_process_waits_for_the_default_teacher_then_reuses_it(tmp_path, capsys):
    """The sweep case: two runs with no --teacher start together; the second waits on the teacher folder
    (one line), then reuses what the first trained, instead of both training into one folder."""
    import threading

    from fastkd.data import load_data
    from fastkd.teachers.factory import default_teacher_spec
    from fastkd.train.rundir import LOCK
    from fastkd.train.setup import ensure_default_teacher

    argv = [*TINY, "--method", "kd", "--teacher-embed-dim", "16", "--teacher-depth", "1", "--teacher-heads",
            "1", "--teacher-epochs", "2", "--workdir", tmp_path / "w"]
    cfg = train.parse_args([str(a) for a in argv])
    full = load_data(cfg.data.data)
    tdir = default_teacher_spec(cfg, full)[1]
    held, asked, lines = threading.Event(), threading.Event(), []

    def first_log(msg):  # the first process, inside the lock, about to train: hold on until the other asked
        if msg.startswith("fastkd: training the default teacher"):
            held.set()
            asked.wait(60)

    t = threading.Thread(target=ensure_default_teacher, args=(cfg, full), kwargs={"log": first_log})
    t.start()
    assert held.wait(120)

    def log(msg):
        lines.append(msg)
        asked.set()

    path = ensure_default_teacher(cfg, full, log=log)
    t.join()
    assert lines[0].startswith("fastkd: waiting for fastkd process"), lines
    assert "training the default teacher" in lines[0], lines
    assert lines[1:] == [f"fastkd: reusing teacher {path}"], lines  # not trained a second time
    assert path.is_file() and not (tdir / LOCK).exists()


def test_resume_of_a_finished_run_trains_and_rewrites_nothing(tmp_path, capsys):
    run = _run(tmp_path, capsys, "--epochs", "2")
    before = _snapshot(run)
    rc = train.main([str(a) for a in ["--resume", "--out", run]])
    out = capsys.readouterr().out
    assert rc == 0 and "already ran its 2 epochs" in out and "--epochs N (N > 2)" in out, out
    assert _snapshot(run) == before  # summary (its wall time, throughput) and config history untouched


def test_resume_with_epochs_below_the_checkpoint_is_one_line(tmp_path, capsys):
    run = _run(tmp_path, capsys, "--epochs", "2")
    before = _snapshot(run)
    rc, err = _main(["--resume", "--out", run, "--epochs", "1"], capsys)
    assert rc == 2 and len(err) == 1, err
    assert "checkpoint is already in epoch 2, past --epochs 1" in err[0] and "--epochs 2 or more" in err[0]
    assert _snapshot(run) == before


# ---------------------------------------------------------------------------------------------- (9)
# SIGTERM / Ctrl-C: a checkpoint at the next step boundary, one line, and the resume is bit-exact
def _signal_at_step(monkeypatch, at: int, *signals) -> None:
    from fastkd.train.trainer import Trainer

    orig, sent = Trainer.step, []

    def step(self, *a, **k):
        out = orig(self, *a, **k)
        if self.step_idx == at and not sent:
            sent.append(at)
            for s in signals:
                os.kill(os.getpid(), s)  # handled in this (main) thread before the next line runs
        return out

    monkeypatch.setattr(Trainer, "step", step)


def test_sigterm_checkpoints_at_the_next_step_and_the_resume_is_bit_exact(tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file

    full = _run(tmp_path, capsys, "--epochs", "2", out="full")  # 4 steps per epoch
    _signal_at_step(monkeypatch, 6, signal.SIGTERM)
    before = signal.getsignal(signal.SIGTERM)
    part = tmp_path / "part"
    rc, err = _main([*TINY, *KD, "--epochs", "2", "--workdir", tmp_path / "w", "--out", part], capsys)
    assert rc == 128 + signal.SIGTERM and len(err) == 1, err
    assert err[0].startswith("fastkd: stopped by SIGTERM at step 6: checkpoint written in"), err
    assert "--resume" in err[0]
    meta = json.loads((part / "checkpoint" / "state.json").read_text())["meta"]
    assert (meta["epoch"], meta["step_in_epoch"], meta["step"]) == (1, 2, 6)
    assert signal.getsignal(signal.SIGTERM) is before  # the run's handlers are gone with it
    monkeypatch.undo()
    from fastkd.train import trainer as tr

    drawn, write_report = [], tr.write_report

    def draw(*a, **k):
        drawn.append(k["resumed_at"])
        return write_report(*a, **k)

    monkeypatch.setattr(tr, "write_report", draw)
    rc, err = _main(["--resume", "--out", part], capsys)
    assert rc == 0, err
    wa, wb = load_file(str(full / "student.safetensors")), load_file(str(part / "student.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    history = json.loads((part / "config.json").read_text())["history"]
    assert [e["step"] for e in history] == [6] and drawn == [[6]]  # report.png marks where it resumed


def test_a_second_ctrl_c_stops_at_once_keeping_the_last_complete_checkpoint(tmp_path, capsys, monkeypatch):
    from fastkd import stop

    monkeypatch.setattr(stop, "REPEAT_S", 0.0)  # the second press comes later than a forwarded repeat
    _signal_at_step(monkeypatch, 6, signal.SIGINT, signal.SIGINT)
    run = tmp_path / "r"
    rc, err = _main([*TINY, *KD, "--epochs", "2", "--workdir", tmp_path / "w", "--out", run], capsys)
    assert rc == 128 + signal.SIGINT and len(err) == 1, err
    assert "stopped by SIGINT; every file written so far is complete" in err[0] and "--resume" in err[0]
    meta = json.loads((run / "checkpoint" / "state.json").read_text())["meta"]
    assert (meta["epoch"], meta["step_in_epoch"]) == (1, 0)  # the end of epoch 1, not step 6
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]


def test_a_repeat_of_the_same_request_is_not_a_second_signal(tmp_path, capsys, monkeypatch):
    """A Ctrl-C reaches torchrun and its workers (one process group) and torchrun forwards it again; a
    scheduler signals every process of a job and torchrun forwards that too. Two signals within
    ``REPEAT_S`` are one request: the run still checkpoints at the next step (it used to stop at once and
    lose the step's checkpoint)."""
    _signal_at_step(monkeypatch, 6, signal.SIGTERM, signal.SIGTERM, signal.SIGINT)
    run = tmp_path / "r"
    rc, err = _main([*TINY, *KD, "--epochs", "2", "--workdir", tmp_path / "w", "--out", run], capsys)
    assert rc == 128 + signal.SIGTERM and len(err) == 1, err
    assert err[0].startswith("fastkd: stopped by SIGTERM at step 6: checkpoint written in"), err
    meta = json.loads((run / "checkpoint" / "state.json").read_text())["meta"]
    assert (meta["epoch"], meta["step_in_epoch"], meta["step"]) == (1, 2, 6)


def test_a_dropped_interrupt_is_still_honoured_and_nesting_keeps_the_outer_request(monkeypatch):
    """Outside a step loop a signal raises KeyboardInterrupt at once. Python drops an exception raised while
    it runs a weakref callback or a ``__del__`` (seen once in a study: the Ctrl-C vanished and it went on), so
    the request is recorded too, and the next step loop stops at its first step. A ``graceful_stop`` inside
    another (a study's runs) neither reinstalls the handlers nor forgets the outer request."""
    from fastkd import stop

    before = signal.getsignal(signal.SIGINT)
    with stop.graceful_stop():
        handler = signal.getsignal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGINT, None)  # not armed: at once
        assert stop.requested() == "SIGINT"  # … and kept, should that exception be dropped
        with stop.graceful_stop():
            assert signal.getsignal(signal.SIGINT) is handler
        assert stop.requested() == "SIGINT" and signal.getsignal(signal.SIGINT) is handler
        disarm = stop.arm()
        try:
            handler(signal.SIGTERM, None)  # within REPEAT_S: the same request again, ignored
            monkeypatch.setattr(stop, "REPEAT_S", 0.0)
            with pytest.raises(KeyboardInterrupt):  # a second signal, armed or not: at once
                handler(signal.SIGTERM, None)
            assert stop.requested() == "SIGINT"
        finally:
            disarm()
    assert stop.requested() is None and signal.getsignal(signal.SIGINT) is before


def test_a_signal_before_training_stops_at_once_and_leaves_no_folder(tmp_path, capsys, monkeypatch):
    from fastkd.train import __main__ as m

    def build(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(m, "build_trainer", build)
    run = tmp_path / "r"
    rc, err = _main([*TINY, *KD, "--workdir", tmp_path / "w", "--out", run], capsys)
    assert rc == 128 + signal.SIGTERM and len(err) == 1 and "stopped by SIGTERM;" in err[0], err
    assert not run.exists()


def test_a_random_teacher_is_flagged_near_chance(tmp_path, capsys):
    """KD's teacher here is a random-init tiny ViT: on the 10 digit classes it scores about chance (a random
    head mostly predicts one class: 8-12 %), and the run says so in one warning line, then trains anyway."""
    rc = train.main([str(a) for a in [*TINY, *KD, "--workdir", tmp_path / "w", "--out", tmp_path / "r"]])
    out = capsys.readouterr().out
    assert rc == 0
    warn = [ln for ln in out.splitlines() if "near chance" in ln]
    assert len(warn) == 1 and warn[0].startswith("fastkd: warning: the teacher fastkd_teacher scores"), out
    # ... and why: a timm name without weights is a random init (fastkd never downloads), said up front
    assert "fastkd: --teacher fastkd_teacher: a timm name without weights is randomly initialised" in out
    assert "--teacher-weights FILE, hf-hub:timm/<name> or local-dir:<folder>" in out


def test_a_filesystem_without_locks_runs_unguarded_with_one_note(tmp_path, capsys, monkeypatch):
    import errno

    from fastkd.train import rundir

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(rundir.fcntl, "flock", no_locks)
    run = tmp_path / "r"
    rc = train.main([str(a) for a in [*TINY, *KD, "--workdir", tmp_path / "w", "--out", run]])
    out = capsys.readouterr().out
    assert rc == 0 and (run / "summary.json").is_file()
    assert f"fastkd: note: {run}'s filesystem has no file locks (No locks available)" in out, out
    assert not (run / rundir.LOCK).exists()
