"""Test-session settings: one torch CPU thread.

The models here are tiny, so a second OpenMP thread buys little, and on a shared 2-core machine
(CI beside other jobs) spinning OpenMP threads made runs 10x slower. Subprocess tests set
OMP_NUM_THREADS=1 themselves.
"""

import torch

torch.set_num_threads(1)
