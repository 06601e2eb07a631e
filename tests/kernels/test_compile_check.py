"""Every shipped kernel configuration compiles for sm_80 and sm_90a on this (GPU-less) machine with no
spills: runs tests/kernels/compile_check.py in a subprocess without TRITON_INTERPRET and prints its table
(registers, dynamic shared memory, local memory per variant; see it with ``pytest -rP``)."""

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


FAMILIES = {
    "token_kd": ("token_kd/fwd", "token_kd/bwd", "token_kd/map_bwd"),
    "masked_gen": ("masked_gen/input_fwd", "masked_gen/input_bwd", "masked_gen/loss_fwd"),
    "logit_kd": ("logit_kd/dense", "logit_kd/topk"),
}


@pytest.mark.parametrize("module", list(FAMILIES))
def test_every_shipped_config_compiles_for_sm80_and_sm90a_without_spills(module):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "compile_check.py"), "--jobs", "2", "--only", module],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    print(out.stdout)
    assert out.returncode == 0, f"compile check failed:\n{out.stdout[-6000:]}\n{out.stderr[-3000:]}"
    summary = out.stdout.strip().splitlines()[-1]
    assert " 0 bad" in summary, summary
    rows = [ln for ln in out.stdout.splitlines() if ln.startswith(module + "/")]
    for family in FAMILIES[module]:
        assert any(r.startswith(family) and "sm_80" in r for r in rows), f"no sm_80 build of {family}"
        assert any(r.startswith(family) and "sm_90a" in r for r in rows), f"no sm_90a build of {family}"
