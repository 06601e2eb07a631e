"""The default teacher: patience recipe, epoch cap scaled with the data, and the worth-it check."""

from __future__ import annotations

import json

import torch

from fastkd.config import parse_args
from fastkd.teachers import default as D
from fastkd.train import __main__ as train

SMALL = [
    "--teacher-embed-dim",
    "32",
    "--teacher-depth",
    "2",
    "--teacher-heads",
    "2",
    "--student-embed-dim",
    "16",
    "--student-depth",
    "1",
    "--student-heads",
    "1",
    "--epochs",
    "1",
    "--batch-size",
    "64",
    "--quiet",
    "--device",
    "cpu",
    "--threads",
    "1",
    "--method",
    "kd",
]


def test_epoch_cap_scales_with_data_and_patience():
    assert D.epoch_cap(1437, 64) == 87  # digits: 23 steps/epoch → ≈ 2000 steps
    assert D.epoch_cap(100_000, 64) == D.MIN_EPOCHS and D.epoch_cap(64, 64) == D.MAX_EPOCHS
    assert D.epoch_cap(1437, 64, epochs=7) == 7  # --teacher-epochs sets the cap by hand
    assert D.epoch_cap(1000, 64) > D.epoch_cap(1437, 64) > D.epoch_cap(5000, 64)
    assert D.patience_for(87) == 17 and D.patience_for(30) == 10 and D.patience_for(3) == 3


def test_worth_warning_is_one_line_naming_the_fix():
    assert D.check_worth(95.0, 90.0) is None
    assert D.check_worth(95.0, None) is None
    for t, s in ((81.1, 86.0), (90.5, 90.0)):  # worse, or not clearly (< MARGIN points) better
        w = D.check_worth(t, s)
        assert w and "\n" not in w and "--teacher" in w and "--teacher-epochs" in w and f"{t:.2f}" in w


def _run(tmp_path, name, *extra):
    lines: list[str] = []
    cfg = parse_args([*SMALL, "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / name), *extra])
    train.run(cfg, log=lambda *a: lines.append(" ".join(map(str, a))))
    return lines


def test_teacher_that_must_win_gets_no_warning(tmp_path):
    """The teacher learns from all 1437 digits; the student from 24: the teacher must win by far."""
    lines = _run(tmp_path, "a", "--train-limit", "24", "--teacher-epochs", "8")
    report = [ln for ln in lines if "vs the student alone" in ln]
    assert len(report) == 1 and not any("warning" in ln for ln in lines), lines
    tdir = next((tmp_path / "work" / "teachers").glob("vit_*"))
    fit = json.loads((tdir / "fit.json").read_text())
    assert fit["epoch_cap"] == 8 and 1 <= fit["best_epoch"] <= fit["epochs_run"] <= 8
    assert fit["top1"] == max(fit["history"])  # the best epoch's weights are the ones kept
    alone = json.loads(
        next((tmp_path / "work" / "student-alone").iterdir()).joinpath("fit.json").read_text()
    )
    assert fit["top1"] >= alone["top1"] + D.MARGIN
    # cached by key: a second run trains neither again, and says the same
    again = _run(tmp_path, "b", "--train-limit", "24", "--teacher-epochs", "8")
    assert not any("training the default" in ln for ln in again)


def test_weak_teacher_warns(tmp_path):
    """A teacher far smaller than the student, on the same images: no better than the student alone."""
    lines = _run(
        tmp_path,
        "a",
        "--train-limit",
        "0",
        "--teacher-epochs",
        "4",
        "--teacher-embed-dim",
        "8",
        "--teacher-depth",
        "1",
        "--teacher-heads",
        "1",
        "--student-embed-dim",
        "48",
        "--student-depth",
        "2",
        "--student-heads",
        "2",
    )
    warn = [ln for ln in lines if "warning" in ln]
    assert len(warn) == 1 and "distillation is unlikely to help" in warn[0], lines


def test_a_teacher_near_chance_is_one_warning_line():
    from fastkd.teachers.default import check_near_chance

    warn = check_near_chance(13.0, 10, "deit_tiny_patch16_224")
    assert warn.startswith("fastkd: warning: the teacher deit_tiny_patch16_224 scores 13.00% val top-1")
    assert "near chance (10.00% for 10 classes)" in warn and "--teacher-finetune" in warn and "\n" not in warn
    assert check_near_chance(20.0, 10, None) is None  # 10 points above chance: no warning
    assert check_near_chance(10.2, 1000, None) is None and check_near_chance(10.0, 1000, None) is not None


def test_an_interrupted_default_teacher_continues_bit_exactly(tmp_path, capsys, monkeypatch):
    """SIGTERM in the middle of the teacher's second epoch (of a 4-epoch cap): its fit writes a
    checkpoint and stops with one line; the same command again continues it, and the teacher, its fit
    record and the run equal an uninterrupted one's. Without it, a long default-teacher fit on a user's
    data started over after any interruption."""
    import os
    import signal

    from safetensors.torch import load_file

    from fastkd.train.trainer import Trainer

    argv = [*SMALL, "--teacher-epochs", "4", "--train-limit", "0"]

    def teacher_dir(work):
        (d,) = [p for p in (work / "teachers").iterdir() if p.is_dir()]
        return d

    ref = tmp_path / "ref"
    assert train.main([*argv, "--workdir", str(ref), "--out", str(ref / "run")]) == 0
    orig, sent = Trainer.step, []

    def step(self, *a, **k):
        out = orig(self, *a, **k)
        if self.step_idx == 30 and not sent:  # in the teacher's fit (22 steps per epoch): epoch 2, step 8
            sent.append(1)
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(Trainer, "step", step)
    part = tmp_path / "part"
    rc = train.main([*argv, "--workdir", str(part), "--out", str(part / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 128 + signal.SIGTERM and len(err) == 1 and "stopped by SIGTERM at step 30" in err[0], err
    tdir = teacher_dir(part)
    meta = json.loads((tdir / "checkpoint" / "state.json").read_text())["meta"]
    assert (meta["epoch"], meta["step_in_epoch"]) == (1, 8) and not (tdir / "fit.json").exists()
    assert not (part / "run").exists()  # the run itself had not started: nothing of it is left
    monkeypatch.undo()
    assert train.main([*argv, "--workdir", str(part), "--out", str(part / "run")]) == 0
    assert "continuing the interrupted training" in capsys.readouterr().out
    a, b = teacher_dir(ref), tdir
    wa, wb = load_file(str(a / "student.safetensors")), load_file(str(b / "student.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    fa, fb = (json.loads((d / "fit.json").read_text()) for d in (a, b))
    assert {k: fa[k] for k in ("top1", "best_epoch", "history")} == {k: fb[k] for k in ("top1", "best_epoch",
                                                                                         "history")}
    assert not (b / "checkpoint").exists()  # removed once fit.json is written
    sa, sb = (load_file(str(d / "run" / "student.safetensors")) for d in (ref, part))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
