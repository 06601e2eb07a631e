"""``SyncGuard``: make every host sync that fastkd (or timm) code would make on a GPU raise, on the CPU.

On a CUDA device these calls read device memory on the host, or copy host memory up without pinning, and
so block the host until the GPU catches up (a host sync): ``Tensor.item``, ``.tolist``, ``.cpu``,
``.numpy``, ``int()`` / ``float()`` / ``bool()`` / ``operator.index()`` of a tensor (``__int__``,
``__float__``, ``__bool__``, ``__index__``: ``if t:``, ``range(t)``), ``.to(<cpu>)``, ``torch.equal``,
``nonzero`` (also ``torch.nonzero``, ``torch.where(cond)`` with one argument), ``torch.unique``,
``torch.masked_select``, ``bincount`` (CUDA sizes its output from the input's maximum, read on the host
even with ``minlength``: the sync the H200 found in RandAugment's Equalize, 2026-11-27), indexing or
item assignment with a boolean mask (data-dependent shapes),
item assignment of a Python number (``t[i] = 4.0``: the number is copied up from pageable host memory;
``t[i:i+1].fill_(4.0)`` passes it as a kernel argument instead) and ``torch.tensor`` /
``torch.as_tensor`` (a per-step tensor from host data: a pageable host→device copy on a GPU).

A call raises ``HostSync`` only when it is made directly by code of a module named ``fastkd.*`` or
``timm.*``, in the thread that entered the guard. torch's own Python code is exempt: torch's CPU AdamW
reads its step counter with ``.item()`` (``torch.optim``'s ``_get_value``); on CUDA the trainer uses
the fused AdamW, whose step counter is a device tensor, so that read is not a sync there. A teacher
cache's prefetch thread is exempt too (another thread: its host reads never block the step).
"""

from __future__ import annotations

import sys
import threading

import torch

_WATCHED = ("fastkd", "timm")


class HostSync(AssertionError):
    pass


class SyncGuard:
    def __init__(self, modules: tuple[str, ...] = _WATCHED):
        self.modules = modules
        self.saved: list[tuple[object, str, object]] = []
        self.thread = None
        self.hits: list[str] = []

    # -- caller check ---------------------------------------------------------------------------------
    def _check(self, what: str, depth: int = 2) -> None:
        if threading.get_ident() != self.thread:
            return
        f = sys._getframe(depth)
        mod = f.f_globals.get("__name__", "")
        if mod.split(".")[0] in self.modules:
            msg = f"host sync: {what} called from {mod} ({f.f_code.co_filename}:{f.f_lineno})"
            self.hits.append(msg)
            raise HostSync(msg)

    def _patch(self, owner, name: str, make) -> None:
        orig = getattr(owner, name)
        self.saved.append((owner, name, orig))
        setattr(owner, name, make(orig))

    def __enter__(self) -> SyncGuard:
        self.thread = threading.get_ident()
        chk = self._check

        def always(what):
            def make(orig):
                def wrapped(*args, **kwargs):
                    chk(what)
                    return orig(*args, **kwargs)

                return wrapped

            return make

        T = torch.Tensor
        for name in ("item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__",
                     "nonzero", "unique", "bincount"):
            self._patch(T, name, always(f"Tensor.{name}"))
        for name in ("equal", "nonzero", "unique", "masked_select", "bincount", "tensor", "as_tensor"):
            self._patch(torch, name, always(f"torch.{name}"))

        def is_cpu(d) -> bool:
            if isinstance(d, str):
                return d.split(":")[0] == "cpu"
            return isinstance(d, torch.device) and d.type == "cpu"

        def make_to(orig):
            def to(self_, *args, **kwargs):
                if any(is_cpu(a) for a in args) or is_cpu(kwargs.get("device")):
                    chk("Tensor.to(<cpu>)")
                return orig(self_, *args, **kwargs)

            return to

        self._patch(T, "to", make_to)

        def bool_index(idx) -> bool:
            items = idx if isinstance(idx, tuple) else (idx,)
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)

        def make_getitem(orig):
            def getitem(self_, idx):
                if bool_index(idx):
                    chk("boolean-mask indexing")
                return orig(self_, idx)

            return getitem

        self._patch(T, "__getitem__", make_getitem)

        def make_setitem(orig):
            def setitem(self_, idx, value):
                if bool_index(idx):
                    chk("boolean-mask item assignment")
                if isinstance(value, (bool, int, float, complex)):
                    chk("item assignment of a host number (t[i] = x)")
                return orig(self_, idx, value)

            return setitem

        self._patch(T, "__setitem__", make_setitem)

        def make_where(orig):
            def where(*args, **kwargs):
                if len(args) + len(kwargs) == 1:
                    chk("torch.where(cond)")
                return orig(*args, **kwargs)

            return where

        self._patch(torch, "where", make_where)
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, orig in reversed(self.saved):
            setattr(owner, name, orig)
        self.saved.clear()
        self.thread = None
