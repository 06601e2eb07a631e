"""``--ema-decay D``: the EMA student is the recurrence ema ← D·ema + (1 − D)·student over the student's
weights after each optimizer step, is evaluated under the method's eval rule and saved (its bit-exact resume:
``tests/train/test_train.py``)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fastkd.config import parse_args
from fastkd.models import load_model
from fastkd.train import __main__ as train
from fastkd.train.evaluate import evaluate
from fastkd.train.guard import validate
from fastkd.train.setup import build_trainer

TINY = [
    "--train-limit", "192", "--epochs", "2", "--batch-size", "32", "--student-embed-dim", "32",
    "--student-depth", "2", "--student-heads", "2", "--quiet", "--log-every", "1", "--eval-every", "1",
    "--method", "ce", "--seed", "4", "--device", "cpu", "--ema-decay", "0.8",
]


def test_ema_is_the_recurrence_over_the_students_weights(tmp_path):
    tr = build_trainer(parse_args([*TINY, "--workdir", str(tmp_path)]), log=lambda *a: None)
    ref = {k: v.detach().clone() for k, v in tr.student.state_dict().items()}  # the EMA starts at the init
    for ids in list(tr.sampler.batches(0))[:4]:
        tr.step(ids, 0)
        for k, v in tr.student.state_dict().items():
            ref[k] = torch.lerp(ref[k], v.detach(), 0.2) if v.is_floating_point() else v.detach().clone()
    ema = tr.ema.model.state_dict()
    assert ema.keys() == ref.keys()
    assert all(torch.equal(ema[k], ref[k]) for k in ref)
    assert not all(torch.equal(ema[k], v) for k, v in tr.student.state_dict().items())  # it lags
    assert not any(p.requires_grad for p in tr.ema.model.parameters())  # never trained, never decayed


def test_ema_is_evaluated_saved_and_loadable(tmp_path):
    cfg = parse_args([*TINY, "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "run")])
    s = train.run(cfg, log=lambda *a: None)
    run = tmp_path / "run"
    evals = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if "val_top1" in ln]
    assert [e["epoch"] for e in evals] == [1, 2] and all("val_ema_top1" in e for e in evals)
    assert s["student_ema_top1"] == evals[-1]["val_ema_top1"]
    model, meta = load_model(str(run / "student_ema.safetensors"))
    assert meta["class_names"] == [str(c) for c in range(10)]  # what predict needs, as for the student
    tr = build_trainer(cfg, log=lambda *a: None)
    again = evaluate(model, tr.data, torch.device("cpu"))["top1"]
    assert again == s["student_ema_top1"]  # the saved file is the model that was evaluated
    assert not torch.equal(load_file(str(run / "student_ema.safetensors"))["head.weight"],
                           load_file(str(run / "student.safetensors"))["head.weight"])


def test_ema_of_a_distilled_student_uses_its_eval_rule(tmp_path):
    cfg = parse_args([*TINY, "--workdir", str(tmp_path), "--method", "deit", "--teacher", "fastkd_resnet"])
    tr = build_trainer(cfg, log=lambda *a: None)
    tr.step(next(iter(tr.sampler.batches(0))), 0)
    got = tr.evaluate_model(tr.ema.model)
    assert set(got) == {"top1", "top1_cls", "top1_dist"}  # both heads averaged, each reported
    assert got == evaluate(tr.ema.model, tr.data, torch.device("cpu"), dense_heads=True)


@pytest.mark.parametrize("decay", ["1", "-0.5"])
def test_bad_decay_is_one_line(decay):
    with pytest.raises(ValueError, match=rf"--ema-decay {float(decay)} \(must be in \[0, 1\)\)"):
        validate(parse_args(["--ema-decay", decay]))


def test_report_draws_the_ema_curve(tmp_path, monkeypatch):
    import matplotlib.axes

    from fastkd.train.artifacts import write_report

    labels, plot = [], matplotlib.axes.Axes.plot

    def spy(self, *a, **k):
        labels.append(k.get("label"))
        return plot(self, *a, **k)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    evals = [{"epoch": e, "val_top1": 10.0 * e, "val_ema_top1": 9.0 * e} for e in (1, 2)]
    write_report(tmp_path / "r.png", [{"step": 1, "loss": 1.0}], evals)
    assert "EMA student top-1" in labels and (tmp_path / "r.png").stat().st_size > 0
    labels.clear()
    write_report(tmp_path / "r.png", [{"step": 1, "loss": 1.0}], [{"epoch": 1, "val_top1": 5.0}])
    assert "EMA student top-1" not in labels
