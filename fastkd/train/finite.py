"""Finiteness checks of the training state (issue 14): on device in the step, at checkpoint time on host."""

from __future__ import annotations

import torch

__all__ = ["FirstNonFinite", "all_finite", "total_norm"]


def total_norm(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """2-norm over tensors, on device (no sync): non-finite iff any element is (0 for no tensors)."""
    if not tensors:
        return torch.zeros((), device=device)
    norms = torch._foreach_norm([t.detach() for t in tensors])
    # (norms live on their tensors' device, the step's: no copy, so no host round trip on CPU or GPU)
    return torch.linalg.vector_norm(torch.stack([n.float() if n.device == device else n.float().to(device)
                                                 for n in norms]))


def all_finite(state) -> bool:
    """Every floating tensor in a nested state is finite (one host sync: checkpoint time only)."""
    flags = []

    def walk(o):
        if isinstance(o, torch.Tensor):
            if o.is_floating_point() and o.numel():
                flags.append(torch.isfinite(o).all())
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)

    walk(state)
    return bool(torch.stack([f.cpu() for f in flags]).all()) if flags else True


class FirstNonFinite:
    """The first step at which each loss part, the gradient norm or the updated parameters went non-finite,
    kept on device (``track``: no sync, every step) and read on the host at log steps (``first``)."""

    def __init__(self):
        self._bad: torch.Tensor | None = None  # per value: the first bad step, -1 while finite
        self._names: list[str] = []

    def track(self, terms: dict[str, torch.Tensor], params: list[torch.Tensor], step: int, device) -> None:
        names = list(terms) + ["grad_norm"] * ("grad_norm" not in terms) + ["params"]
        grads = [p.grad for p in params if p.grad is not None]
        extra = [] if "grad_norm" in terms else [total_norm(grads, device)]
        extra.append(total_norm(params, device))
        vals = torch.stack([v.detach().float().reshape(()) for v in [*terms.values(), *extra]])
        bad_now = ~torch.isfinite(vals)
        if self._bad is None or self._bad.numel() != vals.numel():
            self._names = names
            self._bad = torch.full_like(vals, -1.0)
        self._bad = torch.where(bad_now & (self._bad < 0), torch.full_like(vals, float(step)), self._bad)

    def first(self) -> tuple[int, str, str] | None:
        """(step, "loss" | "gradients", the parts named) of the first non-finite value; None if all finite
        (one host sync)."""
        if self._bad is None:
            return None
        hits = [(int(b), n) for b, n in zip(self._bad.tolist(), self._names, strict=True) if b >= 0]
        if not hits:
            return None
        step = min(b for b, _ in hits)
        now = [n for b, n in hits if b == step]
        loss_parts = [n for n in now if n not in ("loss", "grad_norm", "params")]
        what = "loss" if loss_parts or "loss" in now else "gradients"
        return step, what, ", ".join(loss_parts or ([] if "loss" in now else now)) or "loss"
