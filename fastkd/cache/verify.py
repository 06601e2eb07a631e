"""``verify_cache``: re-run the teacher on random records and compare them with the cache."""

from __future__ import annotations

import os

import numpy as np
import torch

from fastkd.cache.build import run_parts
from fastkd.cache.format import TOPK_FIELDS, CacheError, check_run, read_manifest
from fastkd.config import TrainConfig
from fastkd.methods.registry import build_loss
from fastkd.models import model_info
from fastkd.teachers.cached import CachedTeacher
from fastkd.teachers.factory import teacher_for_batches, teacher_identity
from fastkd.teachers.online import OnlineTeacher


def verify_cache(path: str | os.PathLike, n: int, *, seed: int = 0, rel_tol: float = 5e-3, log=print) -> dict:
    """Re-run the teacher on ``n`` random (view, id) records and compare with the cache.

    Per field: the largest |cached − fresh| (top-K: fresh logits at the cached ids vs topk_vals,
    fresh logsumexp vs topk_lse, and for topk_ids how far the cached set falls below the fresh K-th
    largest logit, 0 when it is a true top-K). ``ok`` is True when each difference is within
    ``rel_tol · max(1, max|fresh|)`` (fp16 storage rounds to ~5e-4 relative).
    Returns {"fields": {name: {"max_abs", "scale", "ok"}}, "ok", "records"}.
    """
    man = read_manifest(path)
    cfg = TrainConfig.from_dict(man["config"])
    rp = run_parts(cfg, log)
    d = rp.data
    check_run(man, None, d, rp.aug, where=str(path))
    src = man["teacher"]["source"]
    if not (os.path.isfile(src) or man["teacher"]["default_key"] is None):
        raise CacheError(f"cannot verify {path}: its teacher {src} is gone; restore it to re-run the teacher")
    # the same resolution as the build (and as fastkd.train): the default or fine-tuned teacher's checkpoint
    # recorded in the manifest, else --teacher as the config says (a timm name with its shape flags or
    # pretrained weights, or a checkpoint), fed the build's batches (renormalised to the teacher's own
    # input normalisation, as it ran there), and identified as the build identified it
    ckpt = src if man["teacher"]["default_key"] is not None else None
    t_model = teacher_for_batches(cfg, rp.full, ckpt, (d.mean, d.std)).to(rp.device)
    if teacher_identity(cfg, rp.full, t_model)["sha256"] != man["teacher"]["sha256"]:
        raise CacheError(f"cannot verify {path}: the teacher {src} changed since the cache was built")
    loss = build_loss(cfg.method, rp.s_info, model_info(t_model), epochs=cfg.optim.epochs)
    teacher = OnlineTeacher(t_model, loss)
    ct = CachedTeacher(path, verify="open")
    rng = np.random.default_rng(seed)
    total = ct.views * ct.n
    pick = rng.choice(total, size=min(n, total), replace=False)
    worst: dict[str, list[float]] = {}
    amp = bool(man.get("amp")) and rp.device.type == "cuda"
    for v in sorted(set((pick // ct.n).tolist())):
        ids = torch.from_numpy(np.sort(pick[pick // ct.n == v] % ct.n))
        x, _, _ = rp.batches(ids, v)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            fresh = {k: t.float().cpu() for k, t in teacher(x, ids=ids, view=v).items()}
        cached = {k: t.double() for k, t in ct.load(ids, v).items()}
        diffs: dict[str, tuple[float, float]] = {}
        if "topk_vals" in cached:
            z = fresh["logits"].double()
            tid = cached["topk_ids"].long()
            at = z.gather(1, tid)
            kth = z.topk(tid.shape[1], dim=1).values[:, -1]
            diffs["topk_vals"] = ((at - cached["topk_vals"]).abs().max().item(), z.abs().max().item())
            diffs["topk_lse"] = ((torch.logsumexp(z, 1) - cached["topk_lse"]).abs().max().item(),
                                 torch.logsumexp(z, 1).abs().max().item())
            diffs["topk_ids"] = ((kth - at.min(1).values).clamp_min(0).max().item(), z.abs().max().item())
        for f, spec in ct.fields.items():
            if f in TOPK_FIELDS:
                continue
            ref = fresh[spec["source"]].double()
            diffs[f] = ((ref - cached[f]).abs().max().item() if ref.numel() else 0.0,
                        ref.abs().max().item() if ref.numel() else 0.0)
        for f, (dmax, scale) in diffs.items():
            w = worst.setdefault(f, [0.0, 0.0])
            w[0], w[1] = max(w[0], dmax), max(w[1], scale)
    ct.close()
    res = {"records": int(len(pick)), "fields": {}}
    for f, (dmax, scale) in worst.items():
        res["fields"][f] = {"max_abs": dmax, "scale": scale, "ok": dmax <= rel_tol * max(1.0, scale)}
        log(f"fastkd.cache verify: {f:>12s}  max |cached - fresh| = {dmax:.3g}  (|fresh| <= {scale:.3g})"
            f"  {'ok' if res['fields'][f]['ok'] else 'FAIL'}")
    res["ok"] = all(r["ok"] for r in res["fields"].values())
    log(f"fastkd.cache verify: {len(pick)} records, {'OK' if res['ok'] else 'MISMATCH'} "
        f"(tolerance {rel_tol:g} x max(1, |fresh|))")
    return res
