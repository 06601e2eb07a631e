"""``python -m fastkd.study``: every method under one recipe, table + chart, resumable."""

from __future__ import annotations

import json
import shutil

import pytest

from fastkd import study

QUICK = [
    "--epochs",
    "1",
    "--teacher-epochs",
    "1",
    "--train-limit",
    "128",
    "--batch-size",
    "64",
    "--device",
    "cpu",
]


def _main(tmp_path, *extra):
    return study.main([*QUICK, "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "study"), *extra])


def test_study_end_to_end_paired_and_resume(tmp_path, capsys):
    methods = "plain,kd,deit,cskd+deit"
    assert _main(tmp_path, "--methods", methods, "--seeds", "0,1") == 0
    out = tmp_path / "study"
    md = (out / "study.md").read_text()
    rows = [
        ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith(("| method", "| claim"))
    ]
    table = [r for r in rows if "**" not in r]
    assert [r.split("|")[1].strip() for r in table] == ["plain", "kd", "deit", "cskd+deit"]
    for r in table:
        cells = [c.strip() for c in r.split("|")[1:-1]]
        assert " ± " in cells[2] and cells[5] == "2", r  # mean ± std over 2 seeds
    assert "fastkd_resnet" in table[2] and "fastkd_resnet" in table[3] and "cls head alone" in table[3]
    assert table[0].split("|")[2].strip() == "–"  # plain: no teacher
    claims = [r for r in rows if "**" in r]
    assert [c.split("|")[1].strip() for c in claims] == [
        "CSKD+DeiT > DeiT hard distillation alone",
        "CSKD+DeiT > plain",
    ]
    assert "same data stream per seed: yes" in md and "same student init per seed and architecture: yes" in md
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rep = json.loads((out / "study.json").read_text())
    assert [len(r["top1"]) for r in rep["rows"]] == [2, 2, 2, 2]
    assert rep["meta"]["threads"] == 1 and "fastkd_commit" in rep["meta"] and "timm" in rep["meta"]
    cskd = rep["rows"][3]
    assert cskd["student"] == study.DISTILLED_STUDENT and len(cskd["top1_cls"]) == 2
    assert rep["rows"][2]["teacher"] == cskd["teacher"]  # deit and cskd+deit: the same CNN teacher
    pair = {p.name: json.loads((p / "pairing.json").read_text()) for p in (out / "runs").iterdir()}
    assert pair["plain-s0"]["init"] == pair["kd-s0"]["init"] != pair["plain-s1"]["init"]
    assert pair["deit-s0"]["init"] == pair["cskd_deit-s0"]["init"]
    assert len({pair[f"{m}-s0"]["data"] for m in ("plain", "kd", "deit", "cskd_deit")}) == 1
    s0 = json.loads((out / "runs" / "kd-s0" / "summary.json").read_text())
    assert s0["method"] == "kd" and s0["epochs"] == 1 and s0["seed"] == 0

    # resume: finished runs are skipped; a missing one is trained again
    stamp = {p.name: (p / "summary.json").stat().st_mtime_ns for p in (out / "runs").iterdir()}
    shutil.rmtree(out / "runs" / "plain-s1")
    # a run made before a config field existed (its config.json lacks it) ran at its default: reused
    cj = out / "runs" / "kd-s0" / "config.json"
    made_before = json.loads(cj.read_text())
    data_sec, model_sec = made_before["data"], made_before["model"]
    del data_sec["rrc_scale"], data_sec["erase"], model_sec["student_drop_path"]
    cj.write_text(json.dumps(made_before))
    capsys.readouterr()
    assert _main(tmp_path, "--methods", methods, "--seeds", "0,1") == 0
    log = capsys.readouterr().out
    assert "training the default" not in log  # both teachers reused
    for p in (out / "runs").iterdir():
        same = (p / "summary.json").stat().st_mtime_ns == stamp[p.name]
        assert same == (p.name != "plain-s1"), p.name
    assert json.loads((out / "runs" / "plain-s1" / "summary.json").read_text())[
        "student_top1"
    ] == pytest.approx(rep["rows"][0]["top1"][1])  # the rerun is bit-identical
    assert (out / "study.md").read_text().count("| plain |") == 1

    # a finished run is never silently reused under another recipe
    capsys.readouterr()
    assert _main(tmp_path, "--methods", "plain", "--seeds", "0", "--epochs", "2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another recipe" in err[0] and "optim.epochs: 1 → 2" in err[0], err


def test_labels_presets_and_bad_input(tmp_path, capsys):
    assert study.method_overrides("plain") == {"method": "ce"}
    assert study.method_overrides("vitkd+nkd") == {"method": "vitkd+nkd"}
    rel = study.method_overrides("clskd-release")
    assert rel["method"] == "clskd+kd+md" and rel["ce_weight"] == 0.0 and rel["kd_T"] == 1.0
    assert study.needs_cnn_teacher({"method": "cskd+deit"})
    assert study.needs_distilled_student({"method": "deit"})
    assert study.needs_cnn_teacher({"method": "deit"})  # the deit baseline shares CSKD's CNN teacher
    abl = study.method_overrides("cskd+deit:cskd_hard=False,cskd_schedule=cos,cskd_weight=0.5")
    assert abl == {"method": "cskd+deit", "cskd_hard": False, "cskd_schedule": "cos", "cskd_weight": 0.5}
    assert not study.needs_cnn_teacher({"method": "clskd+kd"})
    want = {"plain", "kd", "nkd", "vitkd", "vitkd+nkd", "clskd", "deit", "cskd+deit"}
    assert set(study.DEFAULT_METHODS) == want
    bad_inputs = ((["--methods", "plain,vitkdd"], "did you mean 'vitkd'"), (["--seeds", ","], "--seeds"))
    for bad, needle in bad_inputs:
        assert _main(tmp_path, *bad) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err


def test_t_interval_and_paired_diff():
    assert study.t_crit(4) == pytest.approx(2.776) and study.t_crit(1) == pytest.approx(12.706)
    assert study.t_crit(60) == pytest.approx(2.000, abs=2e-3) and study.t_crit(1000) == pytest.approx(
        1.96, abs=3e-3
    )
    a = {0: 90.0, 1: 92.0, 2: 91.0, 3: 95.0, 4: 93.0}
    b = {0: 89.0, 1: 90.0, 2: 90.0, 3: 92.0, 4: 91.0, 9: 50.0}  # seed 9 has no partner: ignored
    d = study.paired_diff(a, b)  # diffs 1, 2, 1, 3, 2: mean 1.8, sd sqrt(0.7)
    assert d["n"] == 5 and d["seeds"] == [0, 1, 2, 3, 4] and d["diffs"] == [1.0, 2.0, 1.0, 3.0, 2.0]
    half = 2.776 * 0.7**0.5 / 5**0.5
    assert d["mean"] == pytest.approx(1.8) and d["sd"] == pytest.approx(0.7**0.5)
    assert (d["lo"], d["hi"]) == pytest.approx((1.8 - half, 1.8 + half))
    one = study.paired_diff({0: 1.0}, {0: 0.0, 1: 2.0})
    assert one["n"] == 1 and one["lo"] is None and study.verdict(one) == "not shown"
    assert study.paired_diff({0: 1.0}, {1: 1.0})["n"] == 0


def test_verdicts():
    assert study.verdict(dict(lo=0.1, hi=2.0)) == "holds"
    assert study.verdict(dict(lo=-2.0, hi=-0.1)) == "contradicted"
    assert study.verdict(dict(lo=-0.5, hi=2.0)) == "not shown"
    assert study.verdict(dict(lo=0.0, hi=2.0)) == "not shown"  # must exclude 0
    assert study.verdict(dict(lo=None, hi=None)) == "not shown"
    # a paired design sees a consistent gain that unpaired seed noise would hide
    a = {s: 80.0 + 5 * (s % 3) + 1.0 for s in range(5)}
    b = {s: 80.0 + 5 * (s % 3) for s in range(5)}
    d = study.paired_diff(a, b)
    assert d["sd"] == 0.0 and study.verdict(d) == "holds"
    assert study.verdict(study.paired_diff(b, a)) == "contradicted"
    claims = {c[2]: (c[0], c[1]) for c in study.CLAIMS}
    assert claims["ViTKD+NKD > NKD"] == ("vitkd+nkd", "nkd")
    assert claims["CSKD+DeiT > DeiT hard distillation alone"] == ("cskd+deit", "deit")
    assert {"ViTKD > plain", "NKD > plain", "[CLS]-KD > plain", "[CLS]-KD > KD", "CSKD+DeiT > plain"} <= set(
        claims
    )


def test_markdown_table_numbers():
    assert study._mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert study._mean_std([5.0]) == (5.0, 0.0)
    teacher = "runs/teachers/vit_tiny_patch16_224-0123456789abcdef/student.safetensors"
    gain = study.paired_diff({0: 90.0, 1: 92.0}, {0: 93.0, 1: 93.0})
    row = dict(
        label="kd",
        method="kd",
        teacher=teacher,
        teacher_top1=97.5,
        student="s",
        top1=[90.0, 92.0],
        top1_mean_std=(91.0, 2**0.5),
        top1_cls=None,
        wall_s=[10.0, 12.0],
        seeds=[0, 1],
        gain_vs_plain=gain,
    )
    plain = dict(
        row,
        label="plain",
        method="ce",
        teacher=None,
        teacher_top1=None,
        top1=[93.0, 93.0],
        top1_mean_std=(93.0, 0.0),
        gain_vs_plain=study.paired_diff({0: 93.0, 1: 93.0}, {0: 93.0, 1: 93.0}),
    )
    claim = dict(claim="KD > plain", a="kd", b="plain", **gain, verdict=study.verdict(gain))
    meta = dict(
        command="python -m fastkd.study",
        regime="digits8",
        data="digits",
        img_size=8,
        train=1437,
        val=360,
        teacher_train=1437,
        epochs=3,
        teacher_epochs=4,
        seeds=[0, 1],
        batch_size=64,
        lr=2e-3,
        machine="x",
        threads=1,
        torch="t",
        date="d",
        runs_done=4,
        runs_total=4,
        run_wall_s_sum=44.0,
        pairing=dict(runs_checked=4, same_data_stream=True, same_init_per_arch=True),
    )
    md = study.render_markdown({"meta": meta, "rows": [row, plain], "claims": [claim]})
    # kd − plain per seed: −3, −1 → mean −2, sd √2, half-width 12.706·√2/√2 = 12.706
    assert "| kd | vit_tiny_patch16_224 (97.50) | 91.00 ± 1.41 | -2.00 [-14.71, +10.71] | 11 | 2 |" in md
    assert "| plain | – | 93.00 ± 0.00 | – | 11 | 2 |" in md
    assert "| KD > plain | -2.00 | [-14.71, +10.71] | 2 | **not shown** |" in md
    assert "same data stream per seed: yes" in md and "Partial" not in md
    assert "Partial study" in study.render_markdown(
        {"meta": dict(meta, runs_done=3), "rows": [row], "claims": []}
    )


def test_a_signal_stops_the_study_with_a_checkpoint_and_the_rerun_resumes_it_bit_exactly(
    tmp_path, capsys, monkeypatch
):
    """The study ran its runs without fastkd's signal handling: a Ctrl-C was once dropped (Python ignores an
    exception raised inside a weakref callback) and the study went on to rc 0; a SIGTERM killed it with no
    line. Now the run in progress checkpoints at its next step, one line, rc 128 + the signal, and the
    same command resumes that run: its student is bit-identical to an uninterrupted study's."""
    import os
    import signal

    from safetensors.torch import load_file

    from fastkd.train.trainer import Trainer

    args = ("--methods", "plain", "--seeds", "0", "--epochs", "2")  # 2 steps per epoch
    assert _main(tmp_path / "full", *args) == 0
    orig, sent = Trainer.step, []

    def step(self, *a, **k):
        out = orig(self, *a, **k)
        if not sent:
            sent.append(self.step_idx)
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(Trainer, "step", step)
    capsys.readouterr()
    assert _main(tmp_path / "part", *args) == 128 + signal.SIGINT
    err = capsys.readouterr().err.strip().splitlines()
    run = tmp_path / "part" / "study" / "runs" / "plain-s0"
    assert len(err) == 1 and err[0].startswith(f"fastkd.study: stopped by SIGINT at step 1: checkpoint "
                                               f"written in {run / 'checkpoint'}"), err
    assert "run the same command to continue" in err[0]
    assert not (run / "summary.json").exists() and not (tmp_path / "part" / "study" / ".fastkd.lock").exists()
    monkeypatch.undo()
    assert _main(tmp_path / "part", *args) == 0
    wa = load_file(str(tmp_path / "full" / "study" / "runs" / "plain-s0" / "student.safetensors"))
    wb = load_file(str(run / "student.safetensors"))
    assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


def test_a_second_study_on_the_same_out_is_one_line(tmp_path, capsys):
    from fastkd.train.rundir import run_dir_lock

    with run_dir_lock(tmp_path / "study"):
        assert _main(tmp_path, "--methods", "plain", "--seeds", "0") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is in use by another fastkd process" in err[0], err


def test_a_study_on_class_folders_without_a_val_split(tmp_path):
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    flat = tmp_path / "flat"
    for c in range(3):
        (flat / f"c{c}").mkdir(parents=True)
        for k, i in enumerate(np.flatnonzero(d.target == c)[:20]):
            Image.fromarray(np.uint8(d.images[i] * 15), "L").save(flat / f"c{c}" / f"{k}.png")
    args = ("--data", str(flat), "--methods", "plain", "--seeds", "0", "--train-limit", "0")
    assert _main(tmp_path, *args) == 2  # one line naming --val-fraction
    assert _main(tmp_path, *args, "--val-fraction", "0.25") == 0
    cfg = json.loads((tmp_path / "study" / "runs" / "plain-s0" / "config.json").read_text())
    assert cfg["data"]["val_fraction"] == 0.25 and cfg["data"]["data"] == str(flat)


def test_a_study_flag_out_of_range_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    """The study checks its flags as fastkd.train does, before loading data or training a teacher."""
    def no_data(*a, **k):
        raise AssertionError("data loaded before the flags were checked")

    monkeypatch.setattr(study, "load_data", no_data)
    for flag, value in (("--val-fraction", "0.7"), ("--lr", "-1")):
        assert _main(tmp_path, "--methods", "plain", "--seeds", "0", flag, value) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{flag} {float(value):g}" in err[0] and "out-of-range" in err[0], err
