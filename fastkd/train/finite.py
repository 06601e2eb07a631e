"""Finiteness checks of the training state (issue 14): on device in the step, at checkpoint time on host."""

from __future__ import annotations

import torch

__all__ = ["all_finite", "total_norm"]


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
