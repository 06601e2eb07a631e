"""Deprecated alias of ``fastkd.ops.reference`` (the same module object)."""

import sys

from fastkd.ops import reference

sys.modules[__name__] = reference
