"""The study's statistics and outputs: paired differences with 95 % t-intervals, claim verdicts, study.md
and study.png (``fastkd.study`` runs the study and calls these)."""

from __future__ import annotations

import math
import os
from pathlib import Path

# two-sided 95 % Student-t critical values t_{0.975, df}, df = 1..30 (then the normal 1.96 as df → ∞)
_T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


# -- statistics (pure) -------------------------------------------------------------------------------
def t_crit(df: int) -> float:
    """t_{0.975, df}: the two-sided 95 % critical value of Student's t."""
    if df < 1:
        raise ValueError(f"t_crit: df must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    return 1.96 + 2.4 / df  # within 0.002 of the exact value for df > 30


def mean_std(v: list[float]) -> tuple[float, float]:
    m = sum(v) / len(v)
    if len(v) < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


_mean_std = mean_std


def paired_diff(a: dict[int, float], b: dict[int, float]) -> dict:
    """a − b over the seeds both have: {n, seeds, diffs, mean, sd, lo, hi} (95 % t-interval; lo = hi = None
    when n < 2)."""
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    if not d:
        return dict(n=0, seeds=[], diffs=[], mean=None, sd=None, lo=None, hi=None)
    m, sd = mean_std(d)
    if len(d) < 2:
        return dict(n=1, seeds=seeds, diffs=d, mean=m, sd=None, lo=None, hi=None)
    half = t_crit(len(d) - 1) * sd / math.sqrt(len(d))
    return dict(n=len(d), seeds=seeds, diffs=d, mean=m, sd=sd, lo=m - half, hi=m + half)


def verdict(diff: dict) -> str:
    """The claim "a > b": "holds" if the 95 % CI lies above 0, "contradicted" if below, else "not shown"."""
    if diff["lo"] is None:
        return "not shown"
    if diff["lo"] > 0:
        return "holds"
    if diff["hi"] < 0:
        return "contradicted"
    return "not shown"


_mean_std = mean_std


def _fmt(v: list[float] | None) -> str:
    if not v:
        return "–"
    m, s = mean_std(v)
    return f"{m:.2f} ± {s:.2f}"


def _fmt_diff(d: dict) -> str:
    if d["mean"] is None:
        return "–"
    if d["lo"] is None:
        return f"{d['mean']:+.2f} (1 seed)"
    return f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]"


def _teacher_name(row: dict) -> str:
    """Readable teacher name: the run dir of an auto-trained teacher without its hash, else as given."""
    t = str(row.get("teacher") or "")
    p = Path(t)
    name = p.parent.name if p.name == "student.safetensors" else p.name
    head, _, tail = name.rpartition("-")
    return head if head and len(tail) == 16 else name


def render_markdown(report: dict) -> str:
    m, rows, claims = report["meta"], report["rows"], report.get("claims", [])
    p = m.get("pairing", {})
    partial = m.get("runs_done", 0) < m.get("runs_total", 0)
    lines = [
        f"### fastkd study — regime `{m.get('regime')}`: {m['data']} at "
        f"{m.get('img_size')}×{m.get('img_size')} "
        f"({m['train']} train / {m['val']} val images; default teachers on {m.get('teacher_train')})",
        "",
        f"Command: `{m['command']}`  ",
        f"Recipe (every run): {m['epochs']} student epochs, batch {m['batch_size']}, lr {m['lr']} "
        "(AdamW, cosine); "
        f"teachers: {m['teacher_epochs']}; seeds {', '.join(map(str, m['seeds']))}; "
        f"regime overrides {m.get('regime_overrides') or '{}'}.  ",
        f"Machine: {m['machine']}; {m['threads']} torch thread(s); torch {m['torch']}, timm {m.get('timm')}, "
        f"triton {m.get('triton')}; runs made at fastkd {', '.join(m.get('run_commits') or ['?'])} with "
        f"{', '.join(map(str, m.get('run_threads') or ['?']))} torch thread(s); report written at "
        f"{m.get('fastkd_commit')}, {m['date']}.  ",
        f"Runs: {m.get('runs_done')}/{m.get('runs_total')} finished; their wall time "
        f"{m.get('run_wall_s_sum', 0) / 60:.1f} min in all (teacher training not included)."
        + (" **Partial study**: the missing runs are listed as fewer seeds below." if partial else ""),
        f"Pairing check ({p.get('runs_checked')} runs): same data stream per seed: "
        f"{'yes' if p.get('same_data_stream') else 'NO'}; same student init per seed and architecture: "
        f"{'yes' if p.get('same_init_per_arch') else 'NO'}.",
        "",
        "| method | teacher (val top-1) | student top-1, mean ± std | paired gain over plain, mean [95% CI] "
        + (f"| paired gain over {m['also_vs']} " if m.get("also_vs") else "")
        + "| wall s / run | seeds |",
        "|---|---|---|---|" + ("---|" if m.get("also_vs") else "") + "---:|---:|",
    ]
    for r in rows:
        teacher = "–" if r["teacher_top1"] is None else f"{_teacher_name(r)} ({r['teacher_top1']:.2f})"
        top1 = _fmt(r["top1"])
        if r.get("top1_cls"):
            top1 += f" (cls head alone {_fmt(r['top1_cls'])}"
            top1 += f"; dist head alone {_fmt(r['top1_dist'])})" if r.get("top1_dist") else ")"
        g = r.get("gain_vs_plain")
        gain = "–" if not g or r["label"] == "plain" else _fmt_diff(g)
        wall = sum(r["wall_s"]) / len(r["wall_s"])
        label = (
            r["label"]
            if (r["method"] == r["label"] or r["label"] == "plain")
            else f"{r['label']} (`{r['method']}`)"
        )
        if m.get("also_vs"):
            g2 = r.get("gain_vs_also")
            gain += " | " + ("–" if not g2 or r["label"] == m["also_vs"] else _fmt_diff(g2))
        lines.append(f"| {label} | {teacher} | {top1} | {gain} | {wall:.0f} | {len(r['top1'])} |")
    seen = {}
    for r in rows:
        f = r.get("teacher_fit")
        if f and r.get("teacher") not in seen:
            seen[r.get("teacher")] = (
                f"{_teacher_name(r)} {f['top1']:.2f}% (best epoch {f['best_epoch']} of "
                f"{f['epochs_run']} run, cap {f['epoch_cap']}; trained once in {f['wall_s'] / 60:.1f} min)"
            )
    if seen:
        lines += ["", "Default teachers (patience recipe, val top-1): " + "; ".join(seen.values()) + "."]
    lines += [
        "",
        "#### Claims (paired over seeds; verdict from the 95 % t-interval of the per-seed difference)",
        "",
        "| claim | mean difference (points) | 95% CI | seeds | verdict |",
        "|---|---:|---|---:|---|",
    ]
    for c in claims:
        ci = "–" if c["lo"] is None else f"[{c['lo']:+.2f}, {c['hi']:+.2f}]"
        mean = "–" if c["mean"] is None else f"{c['mean']:+.2f}"
        lines.append(f"| {c['claim']} | {mean} | {ci} | {c['n']} | **{c['verdict']}** |")
    lines += [
        "",
        '"holds": the CI lies above 0; "contradicted": below 0; "not shown": it contains 0. '
        f"1 val image = {100 / max(1, m['val']):.2f} points.",
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
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(max(10.0, 2.2 * len(rows)), 4))
    ax.bar(range(len(rows)), means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
    for i, r in enumerate(rows):
        ax.plot([i] * len(r["top1"]), r["top1"], "k.", ms=4)
    lo = min(min(r["top1"]) for r in rows)
    ax.set_ylim(max(0.0, lo - 3.0), min(100.0, max(means) + max(stds) + 1.5))
    ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right")
    ax.set_ylabel("student val top-1 (%)")
    ax.set_title("top-1, mean ± std over seeds")
    g = [
        (i, r["gain_vs_plain"])
        for i, r in enumerate(rows)
        if r.get("gain_vs_plain") and r["label"] != "plain" and r["gain_vs_plain"]["lo"] is not None
    ]
    for i, d in g:
        ax2.errorbar(
            [i],
            [d["mean"]],
            yerr=[[d["mean"] - d["lo"]], [d["hi"] - d["mean"]]],
            fmt="o",
            capsize=4,
            color="tab:green" if d["lo"] > 0 else "tab:red" if d["hi"] < 0 else "tab:gray",
        )
    ax2.axhline(0.0, color="k", lw=0.8)
    ax2.set_xticks(range(len(rows)), labels, rotation=30, ha="right")
    ax2.set_ylabel("paired gain over plain (points)")
    ax2.set_title("paired gain over plain, 95% CI")
    m = report["meta"]
    fig.suptitle(
        f"{m.get('regime')}: {m['data']} {m.get('img_size')}px, {m['epochs']} epochs, "
        f"seeds {','.join(map(str, m['seeds']))}, {m['threads']} thread(s)"
    )
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
