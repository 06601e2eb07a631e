"""Pinned host buffers reused round-robin by a prefetch thread: the ring the cached teacher and the in-memory
batch loader gather into before their host→device copies (shared so both follow one reuse rule)."""

from __future__ import annotations

import queue
import threading

__all__ = ["Ring", "offer"]


class Ring:
    """Host buffers reused round-robin by the prefetch thread (producer).

    ``acquire`` → (k, slot k's buffers) once slot k is free: released by ``release(k, event)`` and, when an
    event was given (the host→device copy that reads the slot), that event has completed. A slot is never
    gathered into while its copy (CUDA) or its consumer (CPU) still reads it. ``stop`` unblocks a waiting
    producer (acquire then returns None)."""

    def __init__(self, n: int, stop: threading.Event):
        self.n, self.stop = int(n), stop
        self.slots: list[dict | None] = [None] * self.n
        self.free = [True] * self.n
        self.events: list = [None] * self.n
        self.next = 0
        self.cond = threading.Condition()
        self.acquired = 0  # slots handed out so far (tests)

    def acquire(self, make, batch: int):
        k = self.next
        with self.cond:
            while not self.free[k]:
                if self.stop.is_set():
                    return None
                self.cond.wait(timeout=0.05)
            self.free[k] = False
            ev, self.events[k] = self.events[k], None
        if ev is not None:
            ev.synchronize()  # this thread waits for the copy that last read slot k; the step never does
        bufs = self.slots[k]
        if bufs is None or any(t.shape[0] != batch for t in bufs.values()):
            bufs = self.slots[k] = make()
        self.next = (k + 1) % self.n
        self.acquired += 1
        return k, bufs

    def release(self, k: int, event=None) -> None:
        with self.cond:
            self.events[k] = event
            self.free[k] = True
            self.cond.notify_all()


def offer(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put ``item`` on the producer's bounded queue, waiting while it is full; False once ``stop`` is set
    (the consumer went away), so a producer never blocks forever."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


END = object()  # what a producer thread offers after its last item


def produce(q: queue.Queue, stop: threading.Event, body) -> None:
    """A prefetch thread's target: run ``body()`` (which offers the items), then offer ``END``; an
    exception is handed to the consumer as ``("error", e)`` instead, to be raised in the training thread.
    Both are offered until ``stop`` (a body that returns early because ``stop`` is set offers nothing)."""
    try:
        body()
    except BaseException as e:  # handed to the training thread, raised there
        offer(q, ("error", e), stop)
        return
    offer(q, END, stop)
