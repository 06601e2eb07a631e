"""``python -m fastkd.train``: distil a student from a teacher (or train one alone)."""

from fastkd.train.trainer import *  # noqa: F401,F403
