"""Every shipped kernel configuration compiles for sm_80 and sm_90a on this (GPU-less) machine with no
spills and with every ``tl.dot`` on tensor cores (wgmma / mma; only ``exact`` variants may use FMAs):
runs tests/kernels/compile_check.py in a subprocess without TRITON_INTERPRET and prints its table
(registers, dynamic shared memory, local memory, dot lowering per variant; see it with ``pytest -rP``).
``test_dot_rule_rejects_an_fp32_dot`` proves the rule catches the fp32-token builds of before, and that a
kernel launched without FMA contraction (RandAugment's bit-exact layer) is rejected when built with it."""

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


FAMILIES = {
    "token_kd": ("token_kd/fwd", "token_kd/mimic_fwd", "token_kd/bwd", "token_kd/map_bwd", "token_kd/scale"),
    "masked_gen": ("masked_gen/input_fwd", "masked_gen/input_bwd", "masked_gen/loss_fwd"),
    "logit_kd": ("logit_kd/dense", "logit_kd/topk"),
    "randaug": ("randaug/layer", "randaug/stats"),
    "resized_crop": ("resized_crop/C1", "resized_crop/C3"),
}


def _check(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, os.path.join(HERE, "compile_check.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_dot_rule_rejects_an_fp32_dot():
    """The check that would have caught the fp32-token builds: an fp32 "ieee" tl.dot not named ``exact``
    (FMA in TTGIR, no mma in the PTX) is rejected on both targets; a bf16 dot on fp32 tokens passes."""
    out = _check("--selftest")
    print(out.stdout)
    assert out.returncode == 0, f"{out.stdout[-4000:]}\n{out.stderr[-3000:]}"
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("selftest sm_")]
    assert len(lines) == 6 and all(ln.endswith(" OK") for ln in lines), lines
    assert sum("CUDA cores" in ln for ln in lines) == 2
    # and the FMA rule: RandAugment's bit-exact layer kernel built with contraction is rejected (fma.rn in
    # its PTX)
    assert sum("fma.rn in the PTX" in ln for ln in lines) == 1


@pytest.mark.skipif(
    __import__("torch").cuda.is_available() and os.environ.get("FASTKD_COMPILE_CHECK") != "1",
    reason="the CPU proof of the kernels: on a GPU machine they are compiled and run for real by the other "
    "kernel tests (set FASTKD_COMPILE_CHECK=1 to run it there too; ~200 builds)",
)
@pytest.mark.parametrize("module", list(FAMILIES))
def test_every_shipped_config_compiles_for_sm80_and_sm90a_without_spills(module):
    cpus = os.cpu_count() or 2
    jobs = 2 if cpus <= 4 else min(8, cpus // 2)  # 2 on the shared 2-core CI box, 8 on a 16-core GPU box
    out = _check("--jobs", str(jobs), "--only", module)
    print(out.stdout)
    assert out.returncode == 0, f"compile check failed:\n{out.stdout[-6000:]}\n{out.stderr[-3000:]}"
    summary = out.stdout.strip().splitlines()[-1]
    assert " 0 bad" in summary, summary
    rows = [ln for ln in out.stdout.splitlines() if ln.startswith(module + "/")]
    for family in FAMILIES[module]:
        assert any(r.startswith(family) and "sm_80" in r for r in rows), f"no sm_80 build of {family}"
        assert any(r.startswith(family) and "sm_90a" in r for r in rows), f"no sm_90a build of {family}"
    for r in rows:  # tensor cores for every GEMM variant that training feeds (fp32 and bf16 tokens)
        if "/bf16dot/" in r:
            dot = r.split()[-1]
            assert dot in (("wgmma", "mma") if " sm_90a " in r else ("mma",)), r
