"""Test-session settings: one torch CPU thread; the Triton interpreter on CPU-only machines.

The models here are tiny, so a second OpenMP thread buys little, and on a shared 2-core machine
(CI beside other jobs) spinning OpenMP threads made runs 10x slower. Subprocess tests set
OMP_NUM_THREADS=1 themselves.

Without a GPU the kernel tests (tests/kernels) run Triton in its interpreter, and ``TRITON_INTERPRET=1``
must be set before anything imports triton or the kernels; tests/kernels/conftest.py sets it too, but
other test directories are collected first (tests mirror the source: cache/, data/ < kernels/), so it is
set here, at the start of the session, as before the tree was split.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1)
