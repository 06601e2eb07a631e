"""bench/summary.py renders the issue-12 and issue-13 target tables (PASS/FAIL with the measured value,
"not measured" where nothing ran) from step_bench.py's JSON and the loss benches' rows. stdlib only."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("fastkd_bench_summary_t", REPO / "bench" / "summary.py")
S = importlib.util.module_from_spec(spec)
spec.loader.exec_module(S)


def _step():
    return {
        "device": "NVIDIA H200",
        "torch": "2.11",
        "triton": "3.6",
        "ratios": {
            "vitkd_nkd_online_fused_compiled / vitkd_nkd_online_compiled": {"value": 0.97, "target": 1.0},
            "vitkd_nkd_cached_fused_compiled / plain_compiled": {"value": 1.4, "target": 1.15},
            "kd_cached_fused_compiled / plain_compiled": {"value": None, "target": 1.05},
            "plain_eager / plain_compiled": {"value": 1.5, "target": None},
        },
        "variants": {
            "plain_compiled": {
                "status": "ok",
                "median_ms": 33.9,
                "img_per_s": 7544,
                "host_syncs_per_step": 0,
            },
            "vitkd_nkd_cached_fused_compiled": {
                "status": "ok",
                "median_ms": 47.0,
                "host_syncs_per_step": 2,
                "cache_wait_share": 0.01,
            },
            "kd_cached_fused_compiled": {"status": "skipped: budget"},
        },
        "dispatch": {
            "ops": {
                "vitkd_mimic_loss": [
                    {
                        "signature": "vitkd_mimic_loss|amp|...",
                        "path": "compiled",
                        "triton_ms": 3.1,
                        "compiled_ms": 1.6,
                    },
                    {
                        "signature": "vitkd_mimic_loss|amp|...b",
                        "path": "triton",
                        "rule": "gpu",
                        "triton_ms": 3.1,
                        "compiled_ms": 1.6,
                        "triton_gpu_ms": 0.8,
                        "compiled_gpu_ms": 1.36,
                        "triton_host_ms": 2.0,
                        "compiled_host_ms": 1.1,
                    },
                ]
            },
            "step_slack_ms": 20.5,
        },
    }


def test_issue12_table():
    text = S.render([], _step(), None, _step()["dispatch"])
    assert "PASS (0.970)" in text and "FAIL (1.400)" in text
    assert "kd_cached_fused_compiled / plain_compiled | ≤ 1.05× | — (not measured)" in text
    assert "plain_eager / plain_compiled" not in text.split("| variant |")[0]  # no target: not judged
    assert "FAIL (2); vitkd_nkd_cached_fused_compiled 2" in text  # host syncs: worst, and where
    assert "PASS (1.00) %" in text  # cache wait share
    assert "Not measured: kd_cached_fused_compiled: skipped: budget" in text
    assert "| vitkd_mimic_loss|amp|... | compiled | wall | 3.1 | 1.6 | — | — | — | — |" in text
    assert "| triton | gpu | 3.1 | 1.6 | 0.8 | 1.36 | 2 | 1.1 |" in text and "slack (GPU − host ms" in text


def _row(loss, provider, ms, shape="deit_s", peak=None, nbytes=None):
    return {
        "bench": "loss",
        "loss": loss,
        "mode": "fwd+bwd",
        "shape": shape,
        "dtype": "train-fp32-strided",
        "provider": provider,
        "median_ms": ms,
        "device": "cuda",
        "device_name": "NVIDIA H200",
        "peak_mem_bytes": peak,
        "bytes": nbytes,
    }


def test_issue13_table_judges_the_training_inputs():
    rows = [
        _row("vitkd_mimic_loss", "eager", 2.6, peak=100),
        _row("vitkd_mimic_loss", "compiled", 1.64),
        _row("vitkd_mimic_loss", "fused", 0.8, peak=50, nbytes=10**9),
        {"bench": "copy", "bytes": 2 * 10**9, "median_ms": 0.5, "device": "cuda"},
    ]
    text = S.render(rows)
    line = next(ln for ln in text.splitlines() if ln.startswith("| vitkd_mimic_loss | deit_s |"))
    assert "PASS (2.05)" in line  # ≥ 1.5× compiled
    assert "FAIL (3.25)" not in line and "PASS (3.25)" in line  # ≥ 3× eager
    assert "FAIL (31.25)" in line  # 1 GB in 0.8 ms = 1.25 TB/s against the 4 TB/s measured copy
    assert "PASS (50.00)" in line  # peak memory: 50 % less than eager
