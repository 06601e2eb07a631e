"""``python -m fastkd.study``: the same student under every method, one recipe, several seeds.

Each (method, seed) is one ordinary training run (``fastkd.train.Trainer`` … ``fit``, exactly what
``python -m fastkd.train`` does) with the same data, epochs, batch size, learning rate, schedule and
augmentation; only the method (and the teacher it needs) changes. Runs land in
``<out>/runs/<label>-s<seed>/`` and a run whose ``summary.json`` exists is skipped, so an interrupted
study resumes where it stopped. At the end ``<out>/study.md`` (markdown table: mean ± std top-1 over
seeds, mean wall time, seed count, teacher accuracies), ``<out>/study.json`` (every number) and
``<out>/study.png`` (bar chart with std error bars) are written atomically.

Methods (``--methods``, comma-separated): the labels below, any ``--preset`` name of fastkd.config
(e.g. ``clskd-release``), or any ``+``-joined method string.

- ``plain``: the student alone (CE, label smoothing 0.1) — no teacher;
- ``kd``, ``nkd``, ``vitkd``, ``vitkd+nkd``, ``clskd``, ``clskd+kd``: the default ViT teacher (trained
  once and reused, see fastkd.train); CE(ls 0.1) stays in every total;
- ``cskd+deit``: the CSKD release total (½ CE + ½ DeiT hard + CSKD) with the default CNN teacher
  (``fastkd.methods.cskd.default_cnn_arch``, trained once with the same teacher recipe) and the
  DeiT-distilled version of the default student (same width/depth/heads/patch, plus a dist token and
  head). Its top-1 is the CSKD eval (mean of cls, dist and dense dist-head logits); the cls-head top-1
  is listed beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from fastkd.config import PRESETS, ModelConfig, OptimConfig, TrainConfig, apply_overrides, parse_methods
from fastkd.data import load_data
from fastkd.methods import registry
from fastkd.models import default_arch
from fastkd.train.setup import build_data, build_trainer, ensure_default_teacher
from fastkd.utils import atomic_write_json, atomic_write_text

DEFAULT_METHODS = ("plain", "kd", "nkd", "vitkd", "vitkd+nkd", "clskd", "clskd+kd", "cskd+deit")
DISTILLED_STUDENT = "deit_tiny_distilled_patch16_224"

# The study recipe, sized for 2 CPU cores on digits (every run shares it): 25 student epochs (the
# default job trains 80; everything else is the default recipe) and the default teacher recipe
# (60 epochs), so the ViT teacher is the one ``python -m fastkd.train`` trains and caches.
# study.md records the measured wall times.
DEFAULTS = dict(epochs=OptimConfig().epochs, teacher_epochs=ModelConfig().teacher_epochs, seeds="0,1,2")


def method_overrides(label: str) -> dict:
    """Config overrides for one study label: a known label, a preset name, or a '+'-joined method."""
    if label == "plain":
        return {"method": "ce"}
    if label in PRESETS:
        return dict(PRESETS[label][1])
    parse_methods(label)  # one clear line for a typo
    return {"method": label}


def needs_cnn_teacher(overrides: dict) -> bool:
    return registry.needs_cnn_teacher(overrides["method"])


def needs_distilled_student(overrides: dict) -> bool:
    return registry.wants_dist_head(overrides["method"], strict=False)


def _mean_std(v: list[float]) -> tuple[float, float]:
    m = sum(v) / len(v)
    if len(v) < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


def _fmt(v: list[float] | None) -> str:
    if not v:
        return "–"
    m, s = _mean_std(v)
    return f"{m:.2f} ± {s:.2f}"


class Study:
    def __init__(self, args: argparse.Namespace, log=print):
        self.args, self.log = args, log
        self.out = Path(args.out)
        self.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
        if not self.seeds:
            raise ValueError("--seeds is empty; give comma-separated ints, e.g. --seeds 0,1,2")
        self.labels = [m.strip() for m in str(args.methods).split(",") if m.strip()]
        if not self.labels:
            raise ValueError("--methods is empty; e.g. --methods " + ",".join(DEFAULT_METHODS))
        self.overrides = {lab: method_overrides(lab) for lab in self.labels}
        # the full split: each run applies --train-limit (the digits default regime) itself, and the
        # default teachers learn from all of it (fastkd.train.setup)
        self.data = load_data(args.data, img_size=args.img_size)
        self.student_data = build_data(self.base_config(0), self.data, log=lambda *a: None)[1]

    def base_config(self, seed: int) -> TrainConfig:
        a = self.args
        cfg = TrainConfig()
        apply_overrides(cfg, dict(
            data=a.data, img_size=a.img_size, epochs=a.epochs, teacher_epochs=a.teacher_epochs, seed=seed,
            workdir=a.workdir, device=a.device, quiet=True, eval_every=0, log_every=a.log_every,
            train_limit=a.train_limit,
        ))
        for k in ("batch_size", "lr", "teacher_lr", "warmup_epochs"):
            if getattr(a, k) is not None:
                apply_overrides(cfg, {k: getattr(a, k)})
        return cfg

    def cnn_teacher(self, overrides: dict) -> str:
        cfg = apply_overrides(self.base_config(0), overrides)
        return str(ensure_default_teacher(cfg, self.data, log=self.log))

    def run_one(self, label: str, seed: int) -> dict:
        run_dir = self.out / "runs" / f"{label.replace('+', '_')}-s{seed}"
        ov = self.overrides[label]
        cfg = apply_overrides(self.base_config(seed), ov)
        cfg.run = replace(cfg.run, out=str(run_dir), resume=True)
        d = self.data
        arch = default_arch("student", d.img_size, d.in_chans, d.num_classes)
        if needs_distilled_student(ov):
            arch = (DISTILLED_STUDENT, arch[1])
            cfg.model = replace(cfg.model, student=DISTILLED_STUDENT)
        self._check_same_recipe(run_dir, cfg)
        done = run_dir / "summary.json"
        if done.exists():
            return json.loads(done.read_text())
        if needs_cnn_teacher(ov):
            cfg.model = replace(cfg.model, teacher=self.cnn_teacher(ov))
        trainer = build_trainer(cfg, data=d, student_arch=arch, log=self.log)
        return trainer.fit(run_dir)

    @staticmethod
    def _check_same_recipe(run_dir: Path, cfg: TrainConfig) -> None:
        """A run directory left by an earlier study is reused only if it was made with this recipe."""
        path = run_dir / "config.json"
        if not path.exists():
            return
        old, new = json.loads(path.read_text()), cfg.to_dict()
        diff = [
            f"{sec}.{k}: {old.get(sec, {}).get(k)!r} → {v!r}"
            for sec in ("data", "model", "method", "optim")
            for k, v in new[sec].items()
            if k != "teacher" and old.get(sec, {}).get(k) != v
        ]
        if diff:
            raise ValueError(
                f"{run_dir} was made with another recipe ({'; '.join(diff[:3])}); "
                "use a new --out or delete that directory"
            )

    def run(self) -> dict:
        t0 = time.perf_counter()
        total = len(self.labels) * len(self.seeds)
        results: dict[str, list[dict]] = {lab: [] for lab in self.labels}
        i = 0
        for seed in self.seeds:  # seed-major: a partial study already has every method once
            for lab in self.labels:
                i += 1
                t1 = time.perf_counter()
                s = self.run_one(lab, seed)
                results[lab].append(s)
                self.log(
                    f"study [{i}/{total}] {lab:<12} seed {seed}: top-1 {s['student_top1']:.2f}% "
                    f"(run {s['wall_s']:.0f}s, {time.perf_counter() - t1:.0f}s here, "
                    f"{time.perf_counter() - t0:.0f}s total)"
                )
        report = self.report(results, time.perf_counter() - t0)
        self.log(f"study: wrote {self.out / 'study.md'} and {self.out / 'study.png'}")
        return report

    # -- outputs -------------------------------------------------------------------------------
    def report(self, results: dict[str, list[dict]], study_wall: float) -> dict:
        a = self.args
        rows = []
        for lab in self.labels:
            runs = results[lab]
            top1 = [r["student_top1"] for r in runs]
            rows.append(dict(
                label=lab,
                method=self.overrides[lab]["method"],
                teacher=runs[0].get("teacher"),
                teacher_top1=runs[0].get("teacher_top1"),
                student=runs[0].get("student"),
                top1=top1,
                top1_mean_std=_mean_std(top1),
                top1_cls=[r["student_top1_cls"] for r in runs if "student_top1_cls" in r] or None,
                wall_s=[r["wall_s"] for r in runs],
                seeds=[r["seed"] for r in runs],
            ))
        meta = dict(
            command=a.command,
            data=self.student_data.name, train=len(self.student_data.y_train),
            val=len(self.student_data.y_val),
            epochs=a.epochs, teacher_epochs=a.teacher_epochs, seeds=self.seeds,
            batch_size=self.base_config(0).optim.batch_size, lr=self.base_config(0).optim.lr,
            machine=_machine(a.device),
            threads=torch.get_num_threads(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
            study_wall_s=study_wall,
        )
        report = {"meta": meta, "rows": rows}
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out / "study.json", report)
        atomic_write_text(self.out / "study.md", render_markdown(report))
        write_chart(self.out / "study.png", report)
        return report


def _machine(device: str) -> str:
    gpu = torch.cuda.is_available() and device != "cpu"
    cpu = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    return cpu + (f", {torch.cuda.get_device_name()}" if gpu else "")


def _teacher_name(row: dict) -> str:
    """Readable teacher name: the run dir of an auto-trained teacher without its hash, else as given."""
    t = str(row.get("teacher") or "")
    p = Path(t)
    name = p.parent.name if p.name == "student.safetensors" else p.name
    head, _, tail = name.rpartition("-")
    return head if head and len(tail) == 16 else name


def render_markdown(report: dict) -> str:
    m, rows = report["meta"], report["rows"]
    lines = [
        f"## fastkd study — {m['data']} ({m['train']} train / {m['val']} val images)",
        "",
        f"Command: `{m['command']}`  ",
        f"Recipe (every run): {m['epochs']} epochs, batch {m['batch_size']}, lr {m['lr']} (AdamW, cosine), "
        f"teachers trained for {m['teacher_epochs']} epochs; seeds {', '.join(map(str, m['seeds']))}.  ",
        f"Machine: {m['machine']} ({m['threads']} torch threads); torch {m['torch']}; {m['date']}; "
        f"whole study {m['study_wall_s'] / 60:.1f} min (teacher training included when not cached).",
        "",
        "| method | teacher (val top-1) | student val top-1 (mean ± std) | wall s / run | seeds |",
        "|---|---|---|---:|---:|",
    ]
    for r in rows:
        teacher = "–" if r["teacher_top1"] is None else f"{_teacher_name(r)} ({r['teacher_top1']:.2f})"
        top1 = _fmt(r["top1"])
        if r.get("top1_cls"):
            top1 += f" (cls head alone {_fmt(r['top1_cls'])})"
        wall = sum(r["wall_s"]) / len(r["wall_s"])
        label = r["label"] if r["method"] in (r["label"], "ce") else f"{r['label']} (`{r['method']}`)"
        lines.append(f"| {label} | {teacher} | {top1} | {wall:.0f} | {len(r['top1'])} |")
    order = sorted(rows, key=lambda r: -r["top1_mean_std"][0])
    lines += [
        "",
        "Ordering by mean top-1: " + " > ".join(r["label"] for r in order) + ".",
        f"Std is the sample standard deviation over seeds; with few seeds and a {m['val']}-image val set "
        f"(1 image = {100 / max(1, m['val']):.2f} points) differences below ~1 std are not meaningful.",
        "",
    ]
    return "\n".join(lines)


def write_chart(path: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    labels = [r["label"] for r in rows]
    means = [r["top1_mean_std"][0] for r in rows]
    stds = [r["top1_mean_std"][1] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows)), 4))
    ax.bar(range(len(rows)), means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
    for i, r in enumerate(rows):
        ax.plot([i] * len(r["top1"]), r["top1"], "k.", ms=4)
    lo = min(min(r["top1"]) for r in rows)
    ax.set_ylim(max(0.0, lo - 3.0), min(100.0, max(means) + max(stds) + 1.5))
    ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right")
    ax.set_ylabel("student val top-1 (%)")
    m = report["meta"]
    ax.set_title(f"{m['data']}: {m['epochs']} epochs, seeds {','.join(map(str, m['seeds']))} (mean ± std)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastkd.study", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="digits", help="digits | DIR | FILE.npz (as fastkd.train)")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated study labels")
    p.add_argument("--seeds", default=DEFAULTS["seeds"], help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="student epochs, every run")
    p.add_argument("--teacher-epochs", type=int, default=DEFAULTS["teacher_epochs"])
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--teacher-lr", type=float, default=None)
    p.add_argument("--warmup-epochs", type=float, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--workdir", default="runs", help="where the default teachers are trained and reused")
    p.add_argument("--out", default="runs/study")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default 1: these tiny models gain little from more, and OpenMP threads "
        "spin badly when the cores are shared; 0 = torch's default)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command = " ".join(["python -m fastkd.study", *argv])
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        Study(args).run()
    except (ValueError, FileNotFoundError) as e:
        print(f"fastkd.study: error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
