"""Stopping a run cleanly on SIGTERM (a scheduler's preemption, ``kill``) or Ctrl-C.

The first signal during the training steps asks the step loop to stop: it writes a checkpoint at a step
boundary (bit-exact to resume, as ``--ckpt-every``'s) and raises ``Stopped``, which ``python -m
fastkd.train`` turns into one line and exit code 128 + the signal. A single process stops at the next step:
the loop only reads a Python flag, no host sync. Under torchrun the ranks must stop at the same step, so they
agree at the next log step (``--log-every``) or epoch end, where they already meet (``Dist.any_signal``); a
signal that reached one rank stops them all. A second signal (more than ``REPEAT_S`` after the first: a
repeat within it is the same request delivered twice, as torchrun forwards what its workers got already),
or one outside the step loop (data loading, building the teacher), stops at once: ``KeyboardInterrupt``,
and the last complete checkpoint is what is kept (every write is atomic). ``fastkd.cache`` and
``fastkd.study`` install the same handlers.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Iterator

__all__ = ["Stopped", "arm", "graceful_stop", "halt", "report", "requested"]

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):  # not an Exception: no broad ``except Exception`` on the way may swallow it
    def __init__(self, signame: str, where: str, step: int):
        super().__init__(f"{signame} at step {step}: checkpoint written in {where}")
        self.signame = signame


# One stop request often arrives twice within milliseconds: a Ctrl-C reaches torchrun and its workers (one
# process group), and torchrun forwards it to them again; a scheduler signals every process of a job, and
# torchrun forwards that too. A repeat within this window is the same request, not "stop at once".
REPEAT_S = 2.0


class _State:
    requested: str | None = None
    at: float = 0.0  # time.monotonic() of the first request
    armed: int = 0  # > 0 inside a step loop that checks ``requested()``
    installed: int = 0  # nesting depth of ``graceful_stop`` (a study's runs inside it)


_STATE = _State()


def _handler(signum, frame) -> None:
    name = signal.Signals(signum).name
    first = _STATE.requested is None
    if not first and time.monotonic() - _STATE.at < REPEAT_S:
        return  # the same request delivered again (see REPEAT_S)
    if first:
        _STATE.requested, _STATE.at = name, time.monotonic()
    if first and _STATE.armed:
        return  # the step loop saves and stops at the next step boundary
    # at once; recorded above too, because Python drops an exception raised while it runs a weakref
    # callback or a __del__ ("Exception ignored in …"; seen once in a study): the next step loop then stops
    raise KeyboardInterrupt(name)


@contextlib.contextmanager
def graceful_stop() -> Iterator[None]:
    """Install the handlers for the duration of a run (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread() or _STATE.installed:
        yield  # another thread, or inside an outer graceful_stop (whose request must survive this one)
        return
    old = {s: signal.signal(s, _handler) for s in SIGNALS}
    _STATE.requested = None
    _STATE.installed += 1
    try:
        yield
    finally:
        _STATE.installed -= 1
        for s, h in old.items():
            signal.signal(s, h)
        _STATE.requested = None


def arm(enabled: bool = True):
    """Mark a step loop that polls ``requested()`` (``enabled``: it does); returns its disarm."""
    n = int(enabled)
    _STATE.armed += n

    def disarm() -> None:
        _STATE.armed -= n

    return disarm


def requested() -> str | None:
    """The name of the signal that asked the step loop to stop, or None."""
    return _STATE.requested


def halt(where, step: int, signame: str | None = None):
    """Raise ``Stopped`` for the signal that asked to stop (``signame``: the one the ranks agreed on, which
    may have reached another rank), the checkpoint just written in ``where`` at ``step``."""
    raise Stopped(signame or _STATE.requested, str(where), step)


def report(e: BaseException, prog: str, cont: str) -> int:
    """The one stderr line for a stop (``Stopped``, or ``KeyboardInterrupt`` from a signal) and its exit code
    (128 + the signal). ``cont``: how to continue."""
    if isinstance(e, Stopped):
        name, what = e.signame, f"stopped by {e}"
    else:
        name = str(e) if str(e) in signal.Signals.__members__ else "SIGINT"
        what = f"stopped by {name}; every file written so far is complete (atomic writes)"
    print(f"{prog}: {what}; {cont}", file=sys.stderr)
    return 128 + signal.Signals[name].value
