"""``python -m fastkd.study``: every method under one recipe, table + chart, resumable."""

from __future__ import annotations

import json
import shutil

import pytest

from fastkd import study

QUICK = ["--epochs", "1", "--teacher-epochs", "1", "--train-limit", "128", "--batch-size", "64",
         "--device", "cpu"]


def _main(tmp_path, *extra):
    return study.main([*QUICK, "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "study"), *extra])


def test_study_end_to_end_and_resume(tmp_path, capsys):
    assert _main(tmp_path, "--methods", "plain,clskd+kd,cskd+deit", "--seeds", "0,1") == 0
    out = tmp_path / "study"
    md = (out / "study.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| method")]
    assert [r.split("|")[1].strip() for r in rows] == ["plain", "clskd+kd", "cskd+deit"]
    for r in rows:
        cells = [c.strip() for c in r.split("|")[1:-1]]
        assert " ± " in cells[2] and cells[4] == "2", r  # mean ± std over 2 seeds
    assert "fastkd_resnet" in rows[2] and "cls head alone" in rows[2]  # CNN teacher; both accuracies
    assert rows[0].split("|")[2].strip() == "–"  # plain: no teacher
    assert "python -m fastkd.study" in md and "Ordering by mean top-1" in md
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rep = json.loads((out / "study.json").read_text())
    assert [len(r["top1"]) for r in rep["rows"]] == [2, 2, 2]
    cskd = rep["rows"][2]
    assert cskd["student"] == study.DISTILLED_STUDENT and len(cskd["top1_cls"]) == 2
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["clskd_kd-s0", "clskd_kd-s1", "cskd_deit-s0", "cskd_deit-s1", "plain-s0", "plain-s1"]
    s0 = json.loads((out / "runs" / "clskd_kd-s0" / "summary.json").read_text())
    assert s0["method"] == "clskd+kd" and s0["epochs"] == 1 and s0["seed"] == 0

    # resume: finished runs are skipped; a missing one is trained again
    stamp = {p.name: (p / "summary.json").stat().st_mtime_ns for p in (out / "runs").iterdir()}
    shutil.rmtree(out / "runs" / "plain-s1")
    capsys.readouterr()
    assert _main(tmp_path, "--methods", "plain,clskd+kd,cskd+deit", "--seeds", "0,1") == 0
    log = capsys.readouterr().out
    assert "training the default" not in log  # both teachers reused
    for p in (out / "runs").iterdir():
        same = (p / "summary.json").stat().st_mtime_ns == stamp[p.name]
        assert same == (p.name != "plain-s1"), p.name
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
    assert not study.needs_cnn_teacher({"method": "clskd+kd"})
    want = {"plain", "kd", "nkd", "vitkd", "vitkd+nkd", "clskd", "clskd+kd", "cskd+deit"}
    assert set(study.DEFAULT_METHODS) == want
    bad_inputs = ((["--methods", "plain,vitkdd"], "did you mean 'vitkd'"), (["--seeds", ","], "--seeds"))
    for bad, needle in bad_inputs:
        assert _main(tmp_path, *bad) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err


def test_markdown_table_numbers():
    assert study._mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert study._mean_std([5.0]) == (5.0, 0.0)
    teacher = "runs/teachers/vit_tiny_patch16_224-0123456789abcdef/student.safetensors"
    row = dict(label="kd", method="kd", teacher=teacher, teacher_top1=97.5, student="s", top1=[90.0, 92.0],
               top1_mean_std=(91.0, 2 ** 0.5), top1_cls=None, wall_s=[10.0, 12.0], seeds=[0, 1])
    plain = dict(row, label="plain", method="ce", teacher=None, teacher_top1=None, top1=[93.0, 93.0],
                 top1_mean_std=(93.0, 0.0))
    meta = dict(command="python -m fastkd.study", data="digits", train=1437, val=360, epochs=3,
                teacher_epochs=4, seeds=[0, 1], batch_size=64, lr=2e-3, machine="x", threads=1, torch="t",
                date="d", study_wall_s=60.0)
    md = study.render_markdown({"meta": meta, "rows": [row, plain]})
    assert "| kd | vit_tiny_patch16_224 (97.50) | 91.00 ± 1.41 | 11 | 2 |" in md
    assert "| plain | – | 93.00 ± 0.00 | 11 | 2 |" in md
    assert "Ordering by mean top-1: plain > kd." in md
