"""Same seed + same torch threads + same versions → bit-identical numbers on CPU; summary.json says which."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from fastkd.config import parse_args
from fastkd.train import __main__ as train

TINY = [
    "--teacher-embed-dim",
    "32",
    "--teacher-depth",
    "2",
    "--teacher-heads",
    "2",
    "--train-limit",
    "128",
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
    "1",
    "--eval-every",
    "1",
    "--device",
    "cpu",
    "--threads",
    "1",
]


def _run(tmp_path, name, *extra):
    out = tmp_path / name
    cfg = parse_args([*TINY, "--workdir", str(tmp_path / "work"), "--out", str(out), *extra])
    train.run(cfg, log=lambda *a: None)
    weights = load_file(str(out / "student.safetensors"))  # (the file's metadata order is not stable)
    losses = [
        r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]
    return json.loads((out / "summary.json").read_text()), weights, losses


def test_same_seed_and_threads_is_bit_identical(tmp_path):
    before = torch.get_num_threads()
    try:
        s1, w1, l1 = _run(tmp_path, "a", "--method", "vitkd+nkd")
        s2, w2, l2 = _run(tmp_path, "b", "--method", "vitkd+nkd")
    finally:
        torch.set_num_threads(before)
    assert l1 == l2 and len(l1) > 2  # every logged loss, bit for bit
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)  # every weight bit
    assert s1["student_top1"] == s2["student_top1"] and s1["teacher_top1"] == s2["teacher_top1"]
    r = s1["repro"]
    assert r["torch_threads"] == 1 and r["torch"] == torch.__version__ and r["timm"]
    assert "triton" in r and "fastkd_commit" in r


def test_threads_flag_sets_torch_threads():
    before = torch.get_num_threads()
    assert parse_args([]).run.threads is None  # default: torch's own thread count
    assert parse_args(["--threads", "2"]).run.threads == 2
    torch.set_num_threads(before)
