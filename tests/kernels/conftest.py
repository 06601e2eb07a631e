"""Kernel tests: numerics of every Triton kernel against the fp64 reference.

Without a GPU the kernels run in the Triton interpreter: ``TRITON_INTERPRET=1`` must be set before
``fastkd.kernels`` is imported (``triton.jit`` decides at decoration time), so this conftest sets it at
collection. With a GPU (and ``TRITON_INTERPRET`` unset) the same tests run the compiled kernels on CUDA.
The interpreter flag leaks into the rest of a CPU-only pytest session; nothing else there uses Triton
(``fastkd.functional`` sends CPU tensors to the compiled reference, never to Triton).
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

_loaded = [
    m
    for m in ("fastkd.kernels.token_kd", "fastkd.kernels.masked_gen", "fastkd.kernels.logit_kd")
    if m in sys.modules
]
if _loaded and not torch.cuda.is_available() and not sys.modules["fastkd.kernels._utils"].INTERPRET:
    raise pytest.UsageError(
        f"{_loaded} were imported before TRITON_INTERPRET=1 was set, so they cannot run on this CPU-only "
        "machine; run `pytest tests/kernels` in its own process"
    )


@pytest.fixture(autouse=True)
def _triton_when_fused_on_a_gpu(monkeypatch):
    """On a GPU these tests check the kernels, so fused mode takes the Triton path (``FASTKD_KERNELS=triton``,
    unless the caller set it): under the default ``auto`` the measured dispatch may pick the compiled
    reference on a fast GPU, and the tests that assert the Triton path ran failed on the H200 (2026-11-27,
    ``bench/results/h200-2026-11-27/``). On CPU nothing changes (the interpreter path)."""
    if not torch.cuda.is_available() or "FASTKD_KERNELS" in os.environ:
        yield
        return
    from fastkd.ops import routing

    monkeypatch.setenv("FASTKD_KERNELS", "triton")
    routing.refresh_env()
    yield
    monkeypatch.delenv("FASTKD_KERNELS")
    routing.refresh_env()
