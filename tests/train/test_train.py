"""End-to-end CPU training: the run-directory contract, teacher reuse, resume, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from fastkd.config import parse_args
from fastkd.train import __main__ as train
from fastkd.train.setup import build_trainer

TINY = [
    "--teacher-embed-dim",
    "32",
    "--teacher-depth",
    "2",
    "--teacher-heads",
    "2",
    "--train-limit",
    "192",
    "--epochs",
    "2",
    "--batch-size",
    "32",
    "--teacher-epochs",
    "2",
    "--student-embed-dim",
    "32",
    "--student-depth",
    "2",
    "--student-heads",
    "2",
    "--quiet",
    "--log-every",
    "2",
    "--eval-every",
    "1",
]


def _run(tmp_path, *extra):
    cfg = parse_args([*TINY, "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "run"), *extra])
    return cfg, train.run(cfg, log=lambda *a: None)


def test_run_directory_contract(tmp_path):
    cfg, summary = _run(tmp_path, "--method", "vitkd+nkd")
    run = tmp_path / "run"
    for f in (
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "student.safetensors",
        "loss_modules.safetensors",
        "report.png",
    ):
        assert (run / f).exists(), f
    s = json.loads((run / "summary.json").read_text())
    for k in ("method", "teacher_top1", "student_top1", "epochs", "wall_s", "img_per_s"):
        assert s[k] is not None, k
    assert s["method"] == "vitkd+nkd" and s["epochs"] == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert {"ce", "nkd", "vitkd_mim", "vitkd_gen", "loss"} <= set(steps[0])
    assert any("val_top1" in r for r in rows)
    # the teacher was trained once and is reused (same key) by the next run
    teachers = list((tmp_path / "work" / "teachers").glob("*/student.safetensors"))
    assert len(teachers) == 1
    logs = []
    cfg2 = parse_args(
        [*TINY, "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "run2"), "--method", "kd"]
    )
    train.run(cfg2, log=logs.append)
    assert any("reusing teacher" in m for m in logs)


def test_seeded_cpu_runs_repeat(tmp_path):
    _, a = _run(tmp_path / "a", "--method", "ce", "--seed", "3")
    _, b = _run(tmp_path / "b", "--method", "ce", "--seed", "3")
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "a" / "run" / "student.safetensors"))
    wb = load_file(str(tmp_path / "b" / "run" / "student.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["student_top1"] == b["student_top1"]


@pytest.mark.parametrize("ema", [(), ("--ema-decay", "0.8")], ids=["plain", "ema"])
def test_resume_after_interrupted_epoch_boundary(tmp_path, ema):
    """Uninterrupted 2 epochs vs 1 epoch + interrupt + --resume: identical weights (and EMA weights)."""
    _run(tmp_path / "full", "--method", "ce", "--seed", "1", *ema)
    part = [*TINY, "--workdir", str(tmp_path / "part" / "work"), "--out", str(tmp_path / "part" / "run")]
    part += ["--method", "ce", "--seed", "1", *ema]
    tr = build_trainer(parse_args(part), log=lambda *a: None)
    orig = tr.sampler.batches

    def one_epoch_then_die(epoch, *a, **k):
        if epoch == 1:
            raise KeyboardInterrupt
        yield from orig(epoch, *a, **k)

    tr.sampler.batches = one_epoch_then_die
    with pytest.raises(KeyboardInterrupt):
        tr.fit(tmp_path / "part" / "run")
    train.run(parse_args([*part, "--resume"]), log=lambda *a: None)
    from safetensors.torch import load_file

    for name in ("student.safetensors", "student_ema.safetensors")[: 1 + bool(ema)]:
        wa = load_file(str(tmp_path / "full" / "run" / name))
        wb = load_file(str(tmp_path / "part" / "run" / name))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--method", "vitkd+foo"], "unknown method 'foo'"),
        (["--method", "nkdd"], "did you mean 'nkd'"),
        (["--data", "/no/such/dir"], "no such file"),
        (
            ["--method", "deit", "--student", "vit_tiny_patch16_224", "--student-patch-size", "2"],
            "DeiT-distilled student",
        ),
        (["--student", "vit_tiny_patch16_2244"], "did you mean"),
    ],
)
def test_bad_input_one_clear_line(tmp_path, capsys, argv, needle):
    rc = train.main([*TINY, "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "r"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and needle in err[0], err


def test_training_the_teacher_does_not_move_the_students_random_stream(tmp_path):
    """The first run trains the default teacher, the second reuses it: same seed → identical student
    (ViTKD masks come from the global RNG; the teacher is built under a forked RNG)."""
    from safetensors.torch import load_file

    base = [*TINY, "--workdir", str(tmp_path / "work"), "--method", "vitkd+nkd", "--seed", "2"]
    train.run(parse_args([*base, "--out", str(tmp_path / "first")]), log=lambda *a: None)
    train.run(parse_args([*base, "--out", str(tmp_path / "again")]), log=lambda *a: None)
    wa = load_file(str(tmp_path / "first" / "student.safetensors"))
    wb = load_file(str(tmp_path / "again" / "student.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
