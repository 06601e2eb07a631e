"""Deprecated alias of ``fastkd.ops.dispatch`` (the same module object), kept so that code written against
the old path (tests/kernels, bench/test_bench_losses.py) keeps importing; new code imports fastkd.ops."""

import sys

from fastkd.ops import dispatch

sys.modules[__name__] = dispatch
