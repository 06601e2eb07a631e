"""Real data and real teachers end to end through the CLI, offline (issue 15).

Inputs are built here: a JPEG ImageFolder from the bundled digits (32-48 px, mixed aspect ratios), tar
shards of the same images, a "downloaded" timm checkpoint (timm's own state dict with a 1000-class head,
as .safetensors and .pth) and an HF-cache layout for hf-hub: names. Each trains 1 epoch with tiny
models and builds a teacher cache; each bad input ends in one line.
"""

from __future__ import annotations

import io
import json
import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastkd.cache.__main__ import main as cache_main
from fastkd.train.__main__ import main as train_main

CLASSES, N_TRAIN, N_VAL = 3, 8, 3
ARCH = "vit_tiny_patch16_224"
TINY_T = ["--teacher-embed-dim", "32", "--teacher-depth", "1", "--teacher-heads", "2"]
STUDENT = ["--student", ARCH, "--student-embed-dim", "16", "--student-depth", "1", "--student-heads", "2",
           "--student-patch-size", "8"]
COMMON = ["--img-size", "32", "--epochs", "1", "--batch-size", "8", "--quiet", "--threads", "1",
          "--method", "kd", "--eval-every", "1"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    real_connect = socket.socket.connect

    def connect(self, *a, **k):  # unix sockets (DataLoader workers share fds through them) are local
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError("network access attempted")
        return real_connect(self, *a, **k)

    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _write_folder(root):
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    for split, n, off in (("train", N_TRAIN, 0), ("val", N_VAL, 50)):
        for c in range(CLASSES):
            (root / split / f"class{c}").mkdir(parents=True)
            for k, i in enumerate(np.flatnonzero(d.target == c)[off : off + n]):
                w, h = 32 + 8 * (k % 3), 32 + 8 * ((k + 1) % 2)  # mixed sizes, non-square
                im = Image.fromarray(imgs[i], "L").resize((w, h), Image.Resampling.BILINEAR)
                Image.merge("RGB", (im, im, im.point(lambda v: 255 - v))).save(
                    root / split / f"class{c}" / f"{k:03d}.jpg", quality=95
                )
    return root


def _write_shards(folder, out, split, n=2):
    files = sorted((folder / split).rglob("*.jpg"))
    classes = sorted(p.name for p in (folder / split).iterdir())
    out.mkdir(exist_ok=True)
    for s, chunk in enumerate(np.array_split(np.arange(len(files)), n)):
        with tarfile.open(out / f"{split}-{s:04d}.tar", "w") as tf:
            for i in chunk:
                p = files[i]
                key = f"{p.parent.name}_{p.stem}"
                for name, payload in ((f"{key}.jpg", p.read_bytes()),
                                      (f"{key}.cls", str(classes.index(p.parent.name)).encode())):
                    ti = tarfile.TarInfo(name)
                    ti.size = len(payload)
                    tf.addfile(ti, io.BytesIO(payload))
    return str(out / f"{split}-{{0000..{n - 1:04d}}}.tar")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    import timm
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("real")
    folder = _write_folder(root / "imgs")
    shards = root / "shards"
    tr, va = _write_shards(folder, shards, "train"), _write_shards(folder, shards, "val")
    torch.manual_seed(0)
    t = timm.create_model(ARCH, pretrained=False, num_classes=1000, embed_dim=32, depth=1, num_heads=2)
    sd = {k: v.contiguous() for k, v in t.state_dict().items()}  # 1000-class head, 224px pos-embed
    save_file(sd, root / "model.safetensors")
    torch.save({"state_dict_ema": sd}, root / "teacher.pth")
    # an HF-cache layout (what huggingface_hub writes), with a head for our 3 classes
    t3 = timm.create_model(ARCH, pretrained=False, num_classes=CLASSES, embed_dim=32, depth=1, num_heads=2)
    rev = "0123456789abcdef0123456789abcdef01234567"
    base = root / "hf" / "hub" / "models--timm--tiny_digits_vit"
    snap = base / "snapshots" / rev
    snap.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(rev)
    save_file({k: v.contiguous() for k, v in t3.state_dict().items()}, snap / "model.safetensors")
    (snap / "config.json").write_text(json.dumps({
        "architecture": ARCH, "num_classes": CLASSES,
        "model_args": {"embed_dim": 32, "depth": 1, "num_heads": 2},
        "pretrained_cfg": {"input_size": [3, 224, 224], "mean": list(MEAN), "std": list(STD),
                           "num_classes": CLASSES, "first_conv": "patch_embed.proj", "classifier": "head"},
    }))
    return dict(root=root, folder=str(folder), shards_train=tr, shards_val=va,
                st=str(root / "model.safetensors"), pth=str(root / "teacher.pth"),
                hf=str(root / "hf" / "hub"))


@pytest.fixture()
def moved(monkeypatch):
    """Shapes of whole-split uint8 tensors sent to a device (the device must only ever get batches)."""
    moved = []
    real_to = torch.Tensor.to

    def spy(self, *a, **k):
        to_device = any(isinstance(v, (str, torch.device)) for v in (*a, *k.values()))
        if to_device and self.dtype == torch.uint8 and self.dim() == 4 and self.shape[0] >= CLASSES * N_TRAIN:
            moved.append(tuple(self.shape))
        return real_to(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    return moved


def _train(argv, capsys):
    rc = train_main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _summary(out):
    return json.loads((out / "summary.json").read_text())


def _one_line_error(rc, err, *needles):
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("fastkd")]
    assert lines and "\n" not in lines[-1] and "Traceback" not in err, err
    for n in needles:
        assert n in lines[-1], (n, lines[-1])


def _cache_then_train(argv_data, tmp_path, capsys, teacher):
    """Build a teacher cache through the same loader + augmentation, then train from it."""
    cache = tmp_path / "cache"
    from pathlib import Path

    tuned = list(Path(argv_data[argv_data.index("--workdir") + 1]).glob("teachers/finetuned-*/student.*"))
    before = [p.stat().st_mtime_ns for p in tuned]
    rc = cache_main([*argv_data, *teacher, *STUDENT, *COMMON, "--out", str(cache)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert len(tuned) == ("--teacher-finetune" in teacher)  # trained once (by the run before) ...
    assert [p.stat().st_mtime_ns for p in tuned] == before  # ... and reused by the cache build
    man = json.loads((cache / "manifest.json").read_text())
    assert man["complete"] and man["data"]["n_train"] == CLASSES * N_TRAIN
    # --verify re-runs the teacher as the build ran it: the same weights (not a random init of the timm
    # name), fed the same renormalised input; both were missed once, and every field then mismatched
    rc = cache_main(["--verify", "6", "--out", str(cache)])
    outs, err = capsys.readouterr()
    assert rc == 0, outs + err
    assert "6 records, OK" in outs and "FAIL" not in outs
    out = tmp_path / "from-cache"
    rc, _, err = _train([*argv_data, *teacher, *STUDENT, *COMMON, "--teacher-cache", str(cache),
                         "--out", str(out)], capsys)
    assert rc == 0, err
    assert _summary(out)["teacher_mode"] == "cached"
    return man


def test_folder_streamed_with_finetuned_safetensors_teacher(inputs, tmp_path, capsys, moved):
    """A JPEG folder streamed by a worker, a 1000-class checkpoint fine-tuned (new 3-class head) first,
    reused by the cache build, which replays the same loader + augmentation."""
    data = ["--data", inputs["folder"], "--memory-threshold", "0", "--workers", "1",
            "--workdir", str(tmp_path / "w")]
    teacher = ["--teacher", ARCH, "--teacher-weights", inputs["st"], *TINY_T, "--teacher-finetune", "1"]
    out = tmp_path / "run"
    rc, outs, err = _train([*data, *teacher, *STUDENT, *COMMON, "--out", str(out)], capsys)
    assert rc == 0, err
    s = _summary(out)
    assert s["loader"] == "stream" and s["student_top1"] is not None and s["img_per_s"] > 0
    assert s["teacher_finetune_top1"] is not None and s["teacher_finetune_mode"] == "full"
    assert s["loader_wait_share"] is not None and "data_wait_share" in s
    assert "streaming it from disk" in outs + err and "replaced by a new 3-class head" in outs + err
    assert "position embeddings resampled 197 -> 5" in outs + err
    assert not moved, f"whole-set tensors moved: {moved}"  # only batches travel
    man = _cache_then_train(data, tmp_path, capsys, teacher)
    assert "finetuned-" in man["teacher"]["source"] and man["teacher"]["sha256"]


def test_shards_in_memory_with_pth_teacher_head_finetune(inputs, tmp_path, capsys, moved):
    data = ["--data", inputs["shards_train"], "--val-data", inputs["shards_val"], "--workers", "0",
            "--workdir", str(tmp_path / "w")]
    base = ["--teacher", ARCH, "--teacher-weights", inputs["pth"], *TINY_T]
    # the 1000-class head does not fit 3 classes: one line naming the fix
    rc, _, err = _train([*data, *base, *STUDENT, *COMMON, "--out", str(tmp_path / "x")], capsys)
    _one_line_error(rc, err, "1000-class head", "3 classes", "--teacher-finetune")
    teacher = [*base, "--teacher-finetune", "1", "--teacher-finetune-mode", "head"]
    out = tmp_path / "run"
    rc, outs, err = _train([*data, *teacher, *STUDENT, *COMMON, "--out", str(out)], capsys)
    assert rc == 0, err
    s = _summary(out)
    assert s["loader"] == "memory" and s["teacher_finetune_mode"] == "head"
    assert "decoding once into memory" in outs + err
    assert not moved, f"whole-set tensors moved: {moved}"  # x_train stays on the CPU, batches travel
    _cache_then_train(data, tmp_path, capsys, teacher)


def test_hf_hub_and_local_dir_teachers(inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", inputs["hf"])
    data = ["--data", inputs["folder"], "--workers", "0", "--workdir", str(tmp_path / "w")]
    teacher = ["--teacher", "hf-hub:timm/tiny_digits_vit"]
    out = tmp_path / "run"
    rc, outs, err = _train([*data, *teacher, *STUDENT, *COMMON, "--out", str(out)], capsys)
    assert rc == 0, err
    assert _summary(out)["teacher"] == "hf-hub:timm/tiny_digits_vit"
    assert "renormalised on the device" in outs + err  # ImageNet mean/std vs the data's
    _cache_then_train(data, tmp_path, capsys, teacher)
    # the same export as a local folder (config.json + model.safetensors)
    from pathlib import Path

    snap = next(Path(inputs["hf"]).glob("models--timm--tiny_digits_vit/snapshots/*"))
    rc, outs, err = _train([*data, "--teacher", f"local-dir:{snap}", *STUDENT, *COMMON,
                            "--out", str(tmp_path / "local")], capsys)
    assert rc == 0, err
    assert _summary(tmp_path / "local")["teacher"] == f"local-dir:{snap}"
    # not in the cache: one line saying where it looked
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    rc, _, err = _train([*data, "--teacher", "hf-hub:timm/deit_base_patch16_224", *STUDENT, *COMMON,
                         "--out", str(tmp_path / "y")], capsys)
    _one_line_error(rc, err, "never downloads", str(tmp_path / "empty"))


def test_synthetic_trains_with_no_disk(tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = _train(["--data", "synthetic:40", "--workdir", str(tmp_path / "w"), *STUDENT, *COMMON,
                         "--method", "ce", "--out", str(out)], capsys)
    assert rc == 0, err
    s = _summary(out)
    assert s["data"] == "synthetic:40" and s["student_top1"] is not None


def test_bad_inputs_end_in_one_line(inputs, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(inputs["folder"], bad)
    (bad / "train" / "class1" / "002.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    argv = ["--data", str(bad), "--workdir", str(tmp_path / "w"), "--method", "ce", *STUDENT,
            "--img-size", "32", "--epochs", "1", "--batch-size", "8", "--quiet", "--threads", "1"]
    for extra in ([], ["--memory-threshold", "0", "--workers", "1"]):  # in memory and streamed
        rc, _, err = _train([*argv, *extra, "--out", str(tmp_path / "x")], capsys)
        _one_line_error(rc, err, "002.jpg", "--on-bad-image skip")
    rc, outs, err = _train([*argv, "--on-bad-image", "skip", "--out", str(tmp_path / "ok")], capsys)
    assert rc == 0, err
    assert "skipped: cannot read image" in outs + err and "002.jpg" in outs + err
    rc, _, err = _train(["--data", inputs["shards_train"], *STUDENT, *COMMON], capsys)
    _one_line_error(rc, err, "--val-data")
    rc, _, err = _train(["--data", str(tmp_path / "nope-{0000..0001}.tar"), "--val-data", "v.tar",
                         *STUDENT, *COMMON], capsys)
    _one_line_error(rc, err, "shard(s) missing")
    rc, _, err = _train(["--data", inputs["folder"], "--teacher", ARCH, "--teacher-weights",
                         str(tmp_path / "missing.safetensors"), *STUDENT, *COMMON], capsys)
    _one_line_error(rc, err, "does not exist")
    rc, _, err = _train(["--data", inputs["folder"], "--teacher", ARCH, "--teacher-finetune", "1",
                         *STUDENT, *COMMON], capsys)
    _one_line_error(rc, err, "--teacher-weights")


def test_ddp_streamed_eval_is_sharded_and_reduced(inputs, tmp_path):
    """2 gloo processes on a streamed folder: each rank decodes its share of val (9 images: 5 + 4), the
    hits are summed over ranks -- the top-1 equals a single-process evaluation of the saved student."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from fastkd.data import load_data
    from fastkd.models import load_model
    from fastkd.train.trainer import evaluate

    out = tmp_path / "ddp"
    argv = ["--data", inputs["folder"], "--memory-threshold", "0", "--workers", "1", *STUDENT, *COMMON,
            "--method", "ce", "--device", "cpu", "--out", str(out), "--workdir", str(tmp_path / "w")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(port), "-m", "fastkd.train", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    p = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-4000:])
    s = _summary(out)
    assert s["loader"] == "stream"
    d = load_data(inputs["folder"], img_size=32, memory_threshold=0, workers=0, log=lambda m: None)
    model, _ = load_model(out / "student.safetensors")
    assert evaluate(model, d, "cpu")["top1"] == pytest.approx(s["student_top1"])


def test_data_bench_cli(inputs):
    """python -m fastkd.data --bench DIR: the loader alone, one line with img/s."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    p = subprocess.run([sys.executable, "-m", "fastkd.data", "--bench", inputs["folder"], "--img-size", "32",
                        "--batch-size", "8", "--workers", "1"], cwd=repo, env=env, capture_output=True,
                       text=True, timeout=200)
    assert p.returncode == 0, p.stderr
    assert "img/s" in p.stdout and "1 workers" in p.stdout


def test_student_weights_set_the_run_normalisation(inputs, tmp_path, capsys):
    """--student-weights: the student starts from the checkpoint (new 3-class head), and the batches are
    normalised with its pretrained mean/std."""
    out = tmp_path / "run"
    student = ["--student", ARCH, "--student-embed-dim", "32", "--student-depth", "1", "--student-heads", "2",
               "--student-weights", inputs["st"]]
    rc, outs, err = _train(["--data", inputs["folder"], "--workers", "0", "--workdir", str(tmp_path / "w"),
                            *student, *COMMON, "--method", "ce", "--out", str(out)], capsys)
    assert rc == 0, err
    assert "--student-weights" in outs + err and "replaced by a new 3-class head" in outs + err
    assert "normalising batches with the student's pretrained mean (0.5, 0.5, 0.5)" in outs + err
    from fastkd.models.checkpoints import read_meta

    assert read_meta(out / "student.safetensors")["input_mean"] == [0.5, 0.5, 0.5]


def test_every_train_flag_has_help_with_its_default():
    from fastkd.config import CHOICES, METHODS, build_parser

    p = build_parser()
    for a in p._actions:
        if a.dest == "help":
            continue
        assert a.help and "(default" in a.help, a.option_strings
        if a.dest in CHOICES:
            assert a.choices in (None, CHOICES[a.dest]) and "choices:" in a.help
    method = next(a for a in p._actions if a.dest == "method")
    assert all(m in method.help for m in METHODS)


def test_memory_and_stream_give_the_same_batches(inputs):
    """The same folder held in memory and streamed: same fingerprint, same normalisation, same
    augmented batches (mixup + cutmix + flip: partners fetched by the loader)."""
    from fastkd.data import load_data
    from fastkd.data.augment import AugmentConfig
    from fastkd.data.batches import TrainBatches

    quiet = dict(img_size=32, workers=0, log=lambda m: None)
    mem = load_data(inputs["folder"], **quiet)
    st = load_data(inputs["folder"], memory_threshold=0, **quiet)
    assert mem.stream is None and st.stream is not None and st.x_train is None
    assert (mem.fingerprint, mem.mean, mem.std) == (st.fingerprint, st.mean, st.std)
    aug = AugmentConfig.default_for(32)
    aug.mixup_alpha, aug.cutmix_alpha, aug.hflip = 0.8, 1.0, True
    ids = [torch.tensor([3, 0, 17, 5]), torch.tensor([9, 22, 1, 2])]
    outs = []
    for d in (mem, st):
        tb = TrainBatches(d, aug, seed=1, device=torch.device("cpu"), workers=0)
        tb.start_epoch(ids, view=2)
        outs.append([tb(i, 2) for i in ids])
        tb.close()
    for a, b in zip(outs[0], outs[1], strict=True):
        for u, v in zip(a, b, strict=True):
            assert torch.equal(u, v)


def test_memory_or_streamed_folder_trains_the_same_student_bit_for_bit(inputs, tmp_path, capsys):
    """Whether a folder is decoded into memory or streamed by workers is a speed choice: the same seed must
    give the same student (the loaders used to move torch's global RNG, so the init differed)."""
    from safetensors.torch import load_file

    base = ["--data", inputs["folder"], "--workdir", str(tmp_path / "w"), *STUDENT, *COMMON, "--method", "ce"]
    runs = {"memory": [], "stream0": ["--memory-threshold", "0", "--workers", "0"],
            "stream1": ["--memory-threshold", "0", "--workers", "1"]}
    weights = {}
    for name, flags in runs.items():
        rc, _, err = _train([*base, *flags, "--out", str(tmp_path / name)], capsys)
        assert rc == 0, err
        assert _summary(tmp_path / name)["loader"] == ("memory" if name == "memory" else "stream")
        weights[name] = load_file(str(tmp_path / name / "student.safetensors"))
    ref = weights.pop("memory")
    for name, w in weights.items():
        assert all(torch.equal(ref[k], w[k]) for k in ref), name


def test_class_folders_without_a_val_split_train_with_val_fraction(inputs, tmp_path, capsys):
    """A folder of class folders with no train/ + val/ split (how many datasets come) trains with
    --val-fraction; without it the error names the flag; a resume with another fraction is refused (the
    split is part of the data)."""
    import shutil

    flat = tmp_path / "flat"
    for split in ("train", "val"):
        for c in (Path(inputs["folder"]) / split).iterdir():
            (flat / c.name).mkdir(parents=True, exist_ok=True)
            for f in c.iterdir():
                shutil.copy(f, flat / c.name / f"{split}_{f.name}")
    out = tmp_path / "run"
    common = [a for a in COMMON if a != "--quiet"]  # the data line says what was held out
    argv = ["--data", str(flat), *STUDENT, *common, "--method", "ce", "--workdir", str(tmp_path / "w")]
    rc, _, err = _train([*argv, "--out", str(out)], capsys)
    _one_line_error(rc, err, "has no train/ or val/", "--val-fraction 0.1")
    rc, out_txt, err = _train([*argv, "--val-fraction", "0.25", "--out", str(out)], capsys)
    assert rc == 0, err
    assert "9 of 33 images held out as val" in out_txt + err  # 3 classes × 11 images, 3 held out each
    s = _summary(out)
    assert json.loads((out / "config.json").read_text())["data"]["val_fraction"] == 0.25 and s["epochs"] == 1
    rc, _, err = _train(["--resume", "--out", str(out), "--val-fraction", "0.5"], capsys)
    _one_line_error(rc, err, "val_fraction 0.25 → 0.5")


RECIPE = ["--rrc-scale", "0.08", "--hflip", "--rand-augment", "rand-m9-mstd0.5-inc1", "--erase", "0.25",
          "--mixup", "0.8", "--cutmix", "1.0", "--student-drop-path", "0.1", "--accum-steps", "2",
          "--ema-decay", "0.9", "--val-crop-pct", "0.875"]


def test_deits_training_recipe_on_a_streamed_folder_and_its_teacher_cache(inputs, tmp_path, capsys):
    """The README's ImageNet-style recipe, all flags at once, on a streamed JPEG folder with a fine-tuned
    downloaded teacher: the run trains (an EMA student beside it, 1 optimizer step of 2 batches), and a
    teacher cache built with the same flags replays the same augmentation (manifest) and trains."""
    data = ["--data", inputs["folder"], "--memory-threshold", "0", "--workers", "1",
            "--workdir", str(tmp_path / "w"), *RECIPE]
    teacher = ["--teacher", ARCH, "--teacher-weights", inputs["st"], *TINY_T, "--teacher-finetune", "1"]
    out = tmp_path / "run"
    rc, _, err = _train([*data, *teacher, *STUDENT, *COMMON, "--out", str(out)], capsys)
    assert rc == 0, err
    s = _summary(out)
    assert s["steps"] == 1 and s["student_ema_top1"] is not None and s["loader"] == "stream"
    assert (out / "student_ema.safetensors").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["rand_augment"] == "rand-m9-mstd0.5-inc1" and cfg["optim"]["accum_steps"] == 2
    man = _cache_then_train(data, tmp_path, capsys, teacher)
    aug = man["augment"]
    assert (aug["rrc_scale"], aug["randaug_n"], aug["erase_prob"], aug["crop_pad"]) == (0.08, 2, 0.25, 0)
