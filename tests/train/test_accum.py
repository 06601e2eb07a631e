"""``--accum-steps K``: an optimizer step over K batches equals one over their union (a batch K times as
big), and a run interrupted between the batches of a step resumes bit-exactly. (The DDP case, where the
first K − 1 backwards skip the all-reduce: ``tests/train/test_ddp.py``.)"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fastkd.config import parse_args
from fastkd.train import __main__ as train
from fastkd.train.setup import build_trainer

TINY = [
    "--train-limit", "192", "--epochs", "2", "--student-embed-dim", "32", "--student-depth", "2",
    "--student-heads", "2", "--quiet", "--log-every", "1", "--eval-every", "1", "--method", "ce",
    "--seed", "2", "--device", "cpu",
]


def _run(root, *extra):
    cfg = parse_args([*TINY, "--workdir", str(root / "work"), "--out", str(root / "run"), *extra])
    return train.run(cfg, log=lambda *a: None)


def _records(root):
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def test_accumulated_step_equals_the_bigger_batch(tmp_path):
    """16 × 2 against 32 × 1: the same 32 ids per optimizer step (the sampler's batches are consecutive
    slices of one epoch order), the same schedule, the mean loss of the two halves."""
    a = _run(tmp_path / "acc", "--batch-size", "16", "--accum-steps", "2")
    b = _run(tmp_path / "big", "--batch-size", "32")
    assert a["steps"] == b["steps"] == 12
    ra, rb = _records(tmp_path / "acc"), _records(tmp_path / "big")
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == list(range(1, 13))
    # measured drift (12 steps): loss 1.0e-7 relative, grad_norm 1.5e-7 relative (two half-batch means
    # halved and added vs one mean over 32: fp32 rounding only); bounds ~10× that
    for x, y in zip(ra, rb, strict=True):
        assert x["lr"] == y["lr"]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6), x["step"]
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=2e-6), x["step"]
    wa = load_file(str(tmp_path / "acc" / "run" / "student.safetensors"))
    wb = load_file(str(tmp_path / "big" / "run" / "student.safetensors"))
    # measured max |Δ| 4.5e-8, and 7.8e-6 for the attention qkv bias (the key bias has an exactly-zero true
    # gradient: AdamW turns the round-off into O(lr) steps, as in the DDP test)
    for k in wa:
        atol = 1e-4 if k.endswith("attn.qkv.bias") else 1e-6
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=k)


def test_an_epochs_tail_too_short_for_a_step_is_skipped(tmp_path):
    """192 images in batches of 16 = 12 batches; K = 5 makes 2 optimizer steps of 5, the last 2 batches
    are skipped, every epoch (the schedule counts 2 steps per epoch)."""
    s = _run(tmp_path, "--batch-size", "16", "--accum-steps", "5", "--warmup-epochs", "0")
    assert s["steps"] == 4
    recs = _records(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and [r["epoch"] for r in recs] == [0, 0, 1, 1]
    assert recs[-1]["lr"] < recs[0]["lr"]  # the cosine reached its last step of 4
    cfg = parse_args([*TINY, "--batch-size", "16", "--accum-steps", "5", "--workdir", str(tmp_path / "w")])
    tr = build_trainer(cfg, log=lambda *a: None)
    assert (tr.micro_per_epoch, tr.steps_per_epoch) == (10, 2)


def test_accum_larger_than_an_epoch_is_one_line(tmp_path):
    cfg = parse_args([*TINY, "--batch-size", "16", "--accum-steps", "2", "--workdir", str(tmp_path / "w")])
    tr = build_trainer(cfg, log=lambda *a: None)
    with pytest.raises(ValueError, match=r"Trainer.step: 1 batch\(es\) for --accum-steps 2"):
        tr.step(next(iter(tr.sampler.batches(0))), 0)
    cfg = parse_args([*TINY, "--batch-size", "64", "--accum-steps", "4", "--workdir", str(tmp_path / "w")])
    with pytest.raises(ValueError, match=r"--accum-steps 4 needs 4 batches per epoch, but the data gives 3 "
                       r"of --batch-size 64; lower --accum-steps or --batch-size"):
        build_trainer(cfg, log=lambda *a: None)
    from fastkd.train.guard import validate

    with pytest.raises(ValueError, match=r"--accum-steps 0 \(must be in \[1, 4096\]\)"):
        validate(parse_args(["--accum-steps", "0"]))


def test_interrupted_between_the_batches_of_a_step_resumes_bit_exactly(tmp_path):
    """A checkpoint after every optimizer step; the run dies in the 2nd batch of step 5 (mid-epoch, the
    gradient of its 1st batch lost): --resume redoes step 5 from its start and ends bit-identical."""
    acc = ["--batch-size", "16", "--accum-steps", "2", "--ckpt-every", "1"]
    _run(tmp_path / "full", *acc)
    part = [*TINY, *acc, "--workdir", str(tmp_path / "part" / "work")]
    part += ["--out", str(tmp_path / "part" / "run")]
    tr = build_trainer(parse_args(part), log=lambda *a: None)
    real, calls = tr._forward_backward, []

    def dies_in_step_5(*a, **k):
        calls.append(1)
        if len(calls) == 10:  # batches 9 and 10 make step 5; batch 9's gradient is lost
            raise KeyboardInterrupt
        return real(*a, **k)

    tr._forward_backward = dies_in_step_5
    with pytest.raises(KeyboardInterrupt):
        tr.fit(tmp_path / "part" / "run")
    state = json.loads((tmp_path / "part" / "run" / "checkpoint" / "state.json").read_text())
    assert state["meta"]["step"] == 4 and state["meta"]["step_in_epoch"] == 8  # in batches of the sampler
    train.run(parse_args([*part, "--resume"]), log=lambda *a: None)
    wa = load_file(str(tmp_path / "full" / "run" / "student.safetensors"))
    wb = load_file(str(tmp_path / "part" / "run" / "student.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ra, rb = _records(tmp_path / "full"), _records(tmp_path / "part")
    assert [(r["step"], r["loss"]) for r in rb] == [(r["step"], r["loss"]) for r in ra]
