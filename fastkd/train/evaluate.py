"""Validation top-1: ``evaluate`` (sharded over ranks, one all_reduce; the method's eval rule picks the
heads). Used by the trainer, the default-teacher factory and the cache build."""

from __future__ import annotations

import torch
from torch import nn

from fastkd.data import Dataset
from fastkd.data.augment import eval_batch
from fastkd.data.batches import val_batches
from fastkd.models import forward_taps, model_info
from fastkd.train.distributed import Dist

__all__ = ["evaluate", "head_logits"]


def head_logits(taps) -> torch.Tensor:
    """The eval rule's logits (fp32) from ``forward_taps``: the head's; a distilled model's mean of its cls
    and dist heads, with the mean dense dist-head logits as a third term when they were asked for."""
    logits = taps.logits.float()
    if taps.dist_logits is None:
        return logits
    if taps.dense_logits is not None:
        return (logits + taps.dist_logits.float() + taps.dense_logits.float().mean(dim=(2, 3))) / 3
    return (logits + taps.dist_logits.float()) / 2


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Dataset,
    device,
    amp: bool = False,
    *,
    dense_heads: bool = False,
    batch_size: int = 512,
    dist: Dist | None = None,
    workers: int | None = None,
) -> dict[str, float]:
    """Top-1 on the val split. Distilled students: mean of the two heads (+ cls-only and dist-only top-1).

    dense_heads (a method's eval rule, CSKD release): a distilled student's top-1 is the argmax of the
    mean of (cls logits, dist logits, mean over patches of the dense dist-head logits).
    Sharded: each rank evaluates its share of the val ids (``eval_id_batches``), hits are summed over
    the ranks with one all_reduce; every rank returns the same numbers. Streamed val data is decoded by
    a loader over the val split.
    """
    was = model.training
    model.eval()
    dist = dist or Dist()
    has_dist = model_info(model).has_dist_head
    dense = dense_heads and has_dist
    hits = torch.zeros(3, dtype=torch.float64, device=device)  # top1, top1_cls, top1_dist (no host sync)
    for xb, y in val_batches(data, device, batch_size, dist.rank, dist.world, workers=workers):
        x = eval_batch(xb, data.mean, data.std)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            taps = forward_taps(model, x, dense=dense)
        if taps.dist_logits is not None:
            hits[1] += (taps.logits.argmax(-1) == y).sum()
            hits[2] += (taps.dist_logits.argmax(-1) == y).sum()
        hits[0] += (head_logits(taps).argmax(-1) == y).sum()
    if dist.world > 1:
        torch.distributed.all_reduce(hits)
    model.train(was)
    n = len(data.y_val)
    top1, top1_cls, top1_dist = (100.0 * v / n for v in hits.tolist())
    out = {"top1": top1}
    if has_dist:
        out["top1_cls"] = top1_cls
        out["top1_dist"] = top1_dist
    return out
