"""``python -m fastkd.study``: the same student under every method, paired over seeds, with verdicts.

Each (method, seed) is one ordinary training run (``fastkd.train.setup.build_trainer`` … ``fit``, exactly
what ``python -m fastkd.train`` does) with the same data, epochs, batch size, learning rate, schedule and
augmentation; only the method (and the teacher it needs) changes.

**Pairing.** For one seed every run starts from the same student initialisation (the same architecture is
built right after ``seed_everything(seed)``, and the teacher is built under a forked RNG), sees the same
batches in the same order (``EpochSampler(seed)``) and the same augmented images (a pure function of
(seed, epoch, sample id)). The study checks this: each run records the sha256 of its initial student
weights and of its first epoch's batches (``pairing.json``), and study.md says whether every run of a seed
agreed. The DeiT-distilled students (``deit``, ``cskd+deit``: one extra token and head) share their init
with each other, and the data stream with everyone.

**Report.** Per method: mean ± std top-1 over seeds, and the mean paired gain over ``plain`` (per seed:
method − plain, same seed) with a 95 % t-interval over seeds (mean ± t₀.₉₇₅,ₙ₋₁·sd/√n). **Verdicts** for
the seed papers' claims (``CLAIMS``): "holds" when the 95 % CI of the paired difference lies above 0,
"contradicted" when it lies below 0, "not shown" otherwise (or with fewer than 2 paired seeds).

Runs land in ``<out>/runs/<label>-s<seed>/``; a run whose ``summary.json`` exists is skipped, so an
interrupted study resumes where it stopped. The report (``<out>/study.md``, ``study.json``, ``study.png``)
is rewritten after every seed, so a partial study already has one; ``--report-only`` writes it from the
finished runs without training.

Labels (``--methods``): ``plain`` (CE, label smoothing 0.1, no teacher); ``kd``, ``nkd``, ``vitkd``,
``vitkd+nkd``, ``clskd``: the default ViT teacher; ``deit`` (DeiT hard distillation alone) and
``cskd+deit`` (the CSKD release total): the default CNN teacher and the DeiT-distilled student, so the
two differ only by the CSKD term. Any ``--preset`` name of fastkd.config or ``+``-joined method string
works too; ``label:key=value,key=value`` adds config overrides (ablations: ``cskd+deit:cskd_hard=False``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from fastkd.config import PRESETS, REGIMES, TrainConfig, apply_overrides, parse_methods
from fastkd.data import load_data
from fastkd.methods import registry
from fastkd.stop import Stopped, graceful_stop
from fastkd.stop import report as stop_report
from fastkd.study_report import (  # noqa: F401  (re-exported: the study's statistics and outputs)
    _mean_std,
    mean_std,
    paired_diff,
    render_markdown,
    t_crit,
    verdict,
    write_chart,
)
from fastkd.train.artifacts import repro_info
from fastkd.train.guard import validate
from fastkd.train.rundir import run_dir_lock
from fastkd.train.setup import (
    DISTILLED_BASE,
    build_data,
    build_trainer,
    ensure_default_teacher,
    student_arch,
)
from fastkd.utils import atomic_write_json, atomic_write_text

DEFAULT_METHODS = ("plain", "kd", "nkd", "vitkd", "vitkd+nkd", "clskd", "deit", "cskd+deit")
DEFAULT_SEEDS = "0,1,2,3,4"
# (a, b, claim): "a > b" in paired top-1; the seed papers' claims
CLAIMS = (
    ("vitkd", "plain", "ViTKD > plain"),
    ("vitkd+nkd", "nkd", "ViTKD+NKD > NKD"),
    ("nkd", "plain", "NKD > plain"),
    ("clskd", "plain", "[CLS]-KD > plain"),
    ("clskd", "kd", "[CLS]-KD > KD"),
    ("cskd+deit", "deit", "CSKD+DeiT > DeiT hard distillation alone"),
    ("cskd+deit", "plain", "CSKD+DeiT > plain"),
)
DISTILLED_STUDENT = DISTILLED_BASE  # deit / cskd+deit: the default student plus DeiT's dist token and head
# student epochs per regime (every run of a study shares them); digits8 = the default job's 150
REGIME_EPOCHS = {"digits8": 150, "digits32": 40}
# the default teachers' epoch cap per regime (None: scaled with the data, fastkd.teachers.default); 32×32 is
# ~10× the compute per image, so its teachers get a 25-epoch cap (patience may stop them earlier)
REGIME_TEACHER_EPOCHS = {"digits8": None, "digits32": 25}


# -- labels ------------------------------------------------------------------------------------------
def method_overrides(label: str) -> dict:
    """Config overrides for one study label: a known label, a preset name, or a '+'-joined method, with
    optional ``:key=value,...`` config overrides."""
    base, _, extra = label.partition(":")
    if base == "plain":
        ov = {"method": "ce"}
    elif base in PRESETS and "method" in PRESETS[base][1]:
        ov = dict(PRESETS[base][1])
    else:
        parse_methods(base)  # one clear line for a typo
        ov = {"method": base}
    for kv in filter(None, extra.split(",")):
        k, eq, v = kv.partition("=")
        if not eq:
            raise ValueError(
                f"--methods {label!r}: write overrides as key=value, e.g. cskd+deit:cskd_hard=False"
            )
        ov[k.strip()] = _parse_value(v.strip())
    apply_overrides(TrainConfig(), ov)  # unknown keys: one clear line
    return ov


def _parse_value(v: str):
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    for typ in (int, float):
        try:
            return typ(v)
        except ValueError:
            pass
    return v


def needs_cnn_teacher(overrides: dict) -> bool:
    """CSKD's dense CNN teacher; the ``deit`` baseline uses the same CNN so it pairs with ``cskd+deit``."""
    m = overrides["method"]
    return registry.needs_cnn_teacher(m) or parse_methods(m) == ["deit"]


def needs_distilled_student(overrides: dict) -> bool:
    return registry.wants_dist_head(overrides["method"], strict=False)


def _sha(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def pairing_signature(trainer) -> dict:
    """sha256 of the student's initial weights and of the first epoch's batches (ids, images, labels)."""
    sd = trainer.student.state_dict()
    init = _sha(*(sd[k] for k in sorted(sd)))
    ids = list(trainer.sampler.batches(0))
    x, y_soft, _ = trainer.batches(ids[0].to(trainer.device), 0)
    return {"init": init, "data": _sha(torch.cat(ids), x, y_soft), "arch": trainer.student_arch[0]}


class Study:
    def __init__(self, args: argparse.Namespace, log=print):
        self.args, self.log = args, log
        self.out = Path(args.out)
        self.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
        if not self.seeds:
            raise ValueError("--seeds is empty; give comma-separated ints, e.g. --seeds 0,1,2,3,4")
        self.labels = [
            m.strip() for m in str(args.methods).split(";" if ";" in args.methods else ",") if m.strip()
        ]
        if not self.labels:
            raise ValueError("--methods is empty; e.g. --methods " + ",".join(DEFAULT_METHODS))
        if args.regime not in REGIMES:
            raise ValueError(f"--regime {args.regime!r}: choose one of {', '.join(REGIMES)}")
        self.regime = dict(REGIMES[args.regime])
        if args.epochs is None:
            args.epochs = REGIME_EPOCHS.get(args.regime, 150)
        if args.teacher_epochs is None:
            args.teacher_epochs = REGIME_TEACHER_EPOCHS.get(args.regime)
        self.overrides = {lab: method_overrides(lab) for lab in self.labels}
        # the full split: each run applies --train-limit (the digits default regime) itself, and the
        # default teachers learn from all of it (fastkd.train.setup)
        img = args.img_size or self.regime.get("img_size")
        validate(self.base_config(0))  # every flag in range (--val-fraction, --lr, …) before any work
        self.data = load_data(args.data, img_size=img, val_fraction=args.val_fraction)
        self.student_data = build_data(self.base_config(0), self.data, log=lambda *a: None)[1]

    def base_config(self, seed: int) -> TrainConfig:
        a = self.args
        cfg = TrainConfig()
        apply_overrides(cfg, self.regime)
        apply_overrides(
            cfg,
            dict(
                data=a.data,
                epochs=a.epochs,
                teacher_epochs=a.teacher_epochs,
                seed=seed,
                workdir=a.workdir,
                device=a.device,
                quiet=True,
                eval_every=0,
                log_every=a.log_every,
                train_limit=a.train_limit,
            ),
        )
        for k in ("img_size", "val_fraction", "batch_size", "lr", "teacher_lr", "warmup_epochs"):
            if getattr(a, k) is not None:
                apply_overrides(cfg, {k: getattr(a, k)})
        return cfg

    def cnn_teacher(self) -> str:
        cfg = apply_overrides(self.base_config(0), {"method": "cskd+deit"})
        return str(ensure_default_teacher(cfg, self.data, log=self.log))

    def run_dir(self, label: str, seed: int) -> Path:
        safe = label.replace("+", "_").replace(":", "-").replace("=", "").replace(",", "-")
        return self.out / "runs" / f"{safe}-s{seed}"

    def run_one(self, label: str, seed: int) -> dict:
        run_dir = self.run_dir(label, seed)
        ov = self.overrides[label]
        cfg = apply_overrides(self.base_config(seed), ov)
        cfg.run = replace(cfg.run, out=str(run_dir), resume=True)
        self._check_same_recipe(run_dir, cfg)
        done = run_dir / "summary.json"
        if done.exists():
            return json.loads(done.read_text())
        if needs_cnn_teacher(ov):
            cfg.model = replace(cfg.model, teacher=self.cnn_teacher())
        arch = student_arch(cfg, self.student_data)
        if needs_distilled_student(ov) and not cfg.model.student:
            arch = (
                student_arch(
                    apply_overrides(TrainConfig.from_dict(cfg.to_dict()), {"method": "deit"}),
                    self.student_data,
                )[0],
                arch[1],
            )
        trainer = build_trainer(cfg, data=self.data, student_arch=arch, log=self.log)
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / "pairing.json").exists():  # the initial weights: before fit (and any resume)
            atomic_write_json(run_dir / "pairing.json", pairing_signature(trainer))
        return trainer.fit(run_dir)

    @staticmethod
    def _check_same_recipe(run_dir: Path, cfg: TrainConfig) -> None:
        """A run directory left by an earlier study is reused only if it was made with this recipe."""
        path = run_dir / "config.json"
        if not path.exists():
            return
        old, new, default = json.loads(path.read_text()), cfg.to_dict(), TrainConfig().to_dict()
        # a field newer than the directory (absent from its config.json) ran at its default then
        was = {sec: {**default[sec], **old.get(sec, {})} for sec in default}
        diff = [
            f"{sec}.{k}: {was[sec].get(k)!r} → {v!r}"
            for sec in ("data", "model", "method", "optim")
            for k, v in new[sec].items()
            if k not in ("teacher", "student") and was[sec].get(k) != v
        ]
        if diff:
            raise ValueError(
                f"{run_dir} was made with another recipe ({'; '.join(diff[:3])}); "
                "use a new --out or delete that directory"
            )

    def finished(self) -> dict[str, list[dict]]:
        res: dict[str, list[dict]] = {lab: [] for lab in self.labels}
        for lab in self.labels:
            for seed in self.seeds:
                p = self.run_dir(lab, seed) / "summary.json"
                if p.exists():
                    s = json.loads(p.read_text())
                    pj = p.parent / "pairing.json"
                    s["pairing"] = json.loads(pj.read_text()) if pj.exists() else None
                    res[lab].append(s)
        return res

    def run(self) -> dict:
        t0 = time.perf_counter()
        total = len(self.labels) * len(self.seeds)
        i = 0
        report = None
        if not self.args.report_only:
            for seed in self.seeds:  # seed-major: a partial study already has every method paired
                for lab in self.labels:
                    i += 1
                    t1 = time.perf_counter()
                    s = self.run_one(lab, seed)
                    self.log(
                        f"study [{i}/{total}] {lab:<12} seed {seed}: top-1 {s['student_top1']:.2f}% "
                        f"(run {s['wall_s']:.0f}s, {time.perf_counter() - t1:.0f}s here, "
                        f"{time.perf_counter() - t0:.0f}s total)"
                    )
                report = self.report(self.finished(), time.perf_counter() - t0)
        report = self.report(self.finished(), time.perf_counter() - t0)
        self.log(f"study: wrote {self.out / 'study.md'} and {self.out / 'study.png'}")
        return report

    # -- outputs -------------------------------------------------------------------------------
    def report(self, results: dict[str, list[dict]], session_wall: float) -> dict:
        a = self.args
        rows = []
        by_seed = {lab: {r["seed"]: r["student_top1"] for r in runs} for lab, runs in results.items()}
        for lab in self.labels:
            runs = results[lab]
            if not runs:
                continue
            top1 = [r["student_top1"] for r in runs]
            t_path = runs[0].get("teacher")
            fit = _teacher_fit(t_path)
            rows.append(
                dict(
                    label=lab,
                    method=self.overrides[lab]["method"],
                    overrides=self.overrides[lab],
                    teacher=t_path,
                    teacher_top1=runs[0].get("teacher_top1"),
                    teacher_fit={
                        k: fit.get(k) for k in ("top1", "best_epoch", "epochs_run", "epoch_cap", "wall_s")
                    }
                    if fit
                    else None,
                    student=runs[0].get("student"),
                    top1=top1,
                    top1_mean_std=mean_std(top1),
                    top1_cls=[r["student_top1_cls"] for r in runs if "student_top1_cls" in r] or None,
                    top1_dist=[r["student_top1_dist"] for r in runs if "student_top1_dist" in r] or None,
                    gain_vs_plain=paired_diff(by_seed[lab], by_seed["plain"]) if "plain" in by_seed else None,
                    gain_vs_also=(
                        paired_diff(by_seed[lab], by_seed[a.also_vs]) if a.also_vs in by_seed else None
                    ),
                    wall_s=[r["wall_s"] for r in runs],
                    seeds=[r["seed"] for r in runs],
                )
            )
        claims = []
        for x, y, text in CLAIMS:
            if x in by_seed and y in by_seed:
                d = paired_diff(by_seed[x], by_seed[y])
                claims.append(dict(claim=text, a=x, b=y, **d, verdict=verdict(d)))
        cfg0 = self.base_config(0)
        run_walls = [w for r in rows for w in r["wall_s"]]
        meta = dict(
            command=a.command,
            regime=a.regime,
            also_vs=a.also_vs,
            regime_overrides=self.regime,
            data=self.student_data.name,
            img_size=self.data.img_size,
            train=len(self.student_data.y_train),
            val=len(self.student_data.y_val),
            teacher_train=len(self.data.y_train),
            epochs=a.epochs,
            teacher_epochs=a.teacher_epochs or "patience (cap scales with the data)",
            seeds=self.seeds,
            batch_size=cfg0.optim.batch_size,
            lr=cfg0.optim.lr,
            pairing=_pairing_check(results),
            machine=_machine(a.device),
            threads=torch.get_num_threads(),
            **{k: v for k, v in repro_info().items() if k != "torch_threads"},
            date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            run_commits=sorted({str((r.get("repro") or {}).get("fastkd_commit")) for r in _all(results)}),
            run_threads=sorted({(r.get("repro") or {}).get("torch_threads") or 0 for r in _all(results)}),
            runs_done=len(run_walls),
            runs_total=len(self.labels) * len(self.seeds),
            run_wall_s_sum=sum(run_walls),
            session_wall_s=session_wall,
        )
        report = {"meta": meta, "rows": rows, "claims": claims}
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out / "study.json", report)
        atomic_write_text(self.out / "study.md", render_markdown(report))
        if rows:
            write_chart(self.out / "study.png", report)
        return report


def _all(results: dict[str, list[dict]]) -> list[dict]:
    return [r for runs in results.values() for r in runs]


def _teacher_fit(path: str | None) -> dict | None:
    if not path:
        return None
    p = Path(path).parent / "fit.json"
    return json.loads(p.read_text()) if p.exists() else None


def _pairing_check(results: dict[str, list[dict]]) -> dict:
    """Per seed: do all runs share the data stream, and all runs of one student arch the same init?"""
    by_seed: dict[int, list[dict]] = {}
    for runs in results.values():
        for r in runs:
            if r.get("pairing"):
                by_seed.setdefault(r["seed"], []).append(r["pairing"])
    data_ok = all(len({p["data"] for p in ps}) == 1 for ps in by_seed.values())
    init_ok = all(
        len({p["init"] for p in ps if p["arch"] == arch}) == 1
        for ps in by_seed.values()
        for arch in {p["arch"] for p in ps}
    )
    n = sum(len(ps) for ps in by_seed.values())
    return {"runs_checked": n, "same_data_stream": data_ok, "same_init_per_arch": init_ok}


def _machine(device: str) -> str:
    gpu = torch.cuda.is_available() and device != "cpu"
    cpu = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    return cpu + (f", {torch.cuda.get_device_name()}" if gpu else "")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastkd.study", description=__doc__.split("\n\n")[0])
    p.add_argument("--regime", default="digits8", help=f"one of {', '.join(REGIMES)} (fastkd.config.REGIMES)")
    p.add_argument("--data", default="digits", help="digits | DIR | FILE.npz (as fastkd.train)")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--val-fraction", type=float, default=None,
                   help="class folders, no val split: hold out this share of each class (as fastkd.train)")
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="comma-separated study labels (';'-separated when a label carries ':key=value,...')",
    )
    p.add_argument("--seeds", default=DEFAULT_SEEDS, help=f"comma-separated seeds (default {DEFAULT_SEEDS})")
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"student epochs, every run (default per regime: {REGIME_EPOCHS})",
    )
    p.add_argument(
        "--teacher-epochs",
        type=int,
        default=None,
        help="the default teachers' epoch cap (default: scaled with the data; patience stops earlier)",
    )
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--teacher-lr", type=float, default=None)
    p.add_argument("--warmup-epochs", type=float, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--workdir", default="runs", help="where the default teachers are trained and reused")
    p.add_argument("--out", default=None, help="default: runs/study-<regime>")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--report-only", action="store_true", help="write the report from the finished runs")
    p.add_argument(
        "--also-vs", default=None, help="a second paired-gain column against this label (e.g. deit)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: bit-reproducible, and these tiny models gain little from more; "
        "0 = torch's default)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # the command that (re)produces this report: --report-only writes the same report the run would
    args.command = " ".join(["python -m fastkd.study", *(a for a in argv if a != "--report-only")])
    if args.out is None:
        args.out = f"runs/study-{args.regime}"
    repro_info()  # pins the fastkd commit this process runs (a later checkout does not change it)
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        # SIGTERM / Ctrl-C: the run in progress checkpoints at its next step; rerunning resumes it
        with graceful_stop(), run_dir_lock(Path(args.out), busy="wait for it to end, or pick another --out"):
            Study(args).run()
    except (ValueError, FileNotFoundError) as e:
        print(f"fastkd.study: error: {e}", file=sys.stderr)
        return 2
    except (Stopped, KeyboardInterrupt) as e:
        return stop_report(e, "fastkd.study", "run the same command to continue (finished runs are kept, the "
                           "interrupted one resumes from its checkpoint)")
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
