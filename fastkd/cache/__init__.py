"""``python -m fastkd.cache``: teacher outputs to disk (what ``fastkd.teachers.cached`` reads)."""

from fastkd.cache.build import *  # noqa: F401,F403
from fastkd.cache.build import _Interrupted  # noqa: F401
