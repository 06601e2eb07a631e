"""``python -m fastkd.cache``: build (and/or verify) a teacher cache from the command line."""

from __future__ import annotations

import datetime
import os
import sys

import torch

from fastkd.cache.build import build_cache
from fastkd.cache.format import DEFAULT_MAX_GB, DEFAULT_TOPK, CacheError, read_manifest
from fastkd.cache.verify import verify_cache
from fastkd.config import build_parser, config_from_args
from fastkd.stop import Stopped, graceful_stop
from fastkd.stop import report as stop_report
from fastkd.train.guard import validate

_CACHE_ARGS = ("views", "logits", "topk", "feat_dtype", "max_gb", "shard_size", "cache_batch_size", "verify",
               "worker", "verify_tol")


def parse_cache_args(argv: list[str] | None = None):
    """(TrainConfig, cache options) from the command line: every ``fastkd.train`` flag plus the cache's.

    Without ``--method`` (and no preset) the cache stores logits only (``--method kd``)."""
    p = build_parser("precompute teacher outputs for python -m fastkd.train --teacher-cache DIR")
    p.prog = "python -m fastkd.cache"
    g = p.add_argument_group("cache")
    g.add_argument("--views", type=int, default=1,
                   help="augmented views per sample; epoch e trains on view e mod V")
    g.add_argument("--logits", choices=("topk", "dense"), default="topk",
                   help="sparse top-K (default) or dense fp16")
    g.add_argument("--topk", type=int, default=None,
                   help=f"K of the top-K logits (default: {DEFAULT_TOPK}, at most C)")
    g.add_argument("--feat-dtype", choices=("float16", "float32"), default="float16",
                   help="dtype of the feature signals")
    g.add_argument("--max-gb", type=float, default=DEFAULT_MAX_GB, help="refuse to write a bigger cache")
    g.add_argument("--shard-size", type=int, default=None, help="samples per shard file")
    g.add_argument("--cache-batch-size", type=int, default=256, help="teacher batch size while building")
    g.add_argument("--worker", default="0/1",
                   help="i/n: build every n-th shard starting at i (parallel builds)")
    g.add_argument("--verify", type=int, default=None, metavar="N",
                   help="re-run the teacher on N random records and report the largest difference "
                        "(alone with --out: verify an existing cache)")
    g.add_argument("--verify-tol", type=float, default=5e-3, help="relative tolerance of --verify")
    args = p.parse_args(argv)
    cfg = config_from_args(args, skip=_CACHE_ARGS, defaults={"method": "kd"})
    try:
        wi, wn = (int(s) for s in str(args.worker).split("/"))
    except ValueError:
        raise CacheError(f"--worker {args.worker!r}: use i/n, e.g. 0/2") from None
    opts = {k: getattr(args, k) for k in _CACHE_ARGS}
    opts["worker"] = (wi, wn)
    explicit = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
    alone = {"--verify", "--out", "--verify-tol", "--quiet"}
    opts["verify_only"] = args.verify is not None and explicit <= alone
    return cfg, opts


def main(argv: list[str] | None = None) -> int:
    try:
        with graceful_stop():  # a default teacher trained first stops at a step with its checkpoint
            return _main(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"fastkd.cache: error: {e}", file=sys.stderr)
        return 2
    except (Stopped, KeyboardInterrupt) as e:
        return stop_report(e, "fastkd.cache", "run the same command to continue (finished shards are kept)")


def _torchrun_worker(o: dict, explicit_worker: bool) -> tuple[int, int]:
    """Under ``torchrun`` each rank is a worker: rank r of W builds shards r, r + W, … on its own GPU
    (LOCAL_RANK). The ranks join a gloo group only to meet once at the end (no time limit there: a
    build can take hours), so that rank 0 reports the whole cache and ``--verify`` runs on it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return o["worker"]
    if explicit_worker:
        raise CacheError("under torchrun each rank is a worker already; leave --worker out")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    return int(os.environ["RANK"]), world


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, o = parse_cache_args(argv)
    if not cfg.run.out:
        raise CacheError("give the cache directory with --out DIR")
    o["worker"] = _torchrun_worker(o, any(a.split("=")[0] == "--worker" for a in argv))
    ranks = torch.distributed.is_initialized()
    rank0 = not ranks or torch.distributed.get_rank() == 0  # only rank 0 talks under torchrun
    log = (lambda *a: None) if cfg.run.quiet or not rank0 else print
    try:
        if not o["verify_only"]:
            validate(cfg)  # every flag in range before the teacher runs
            build_cache(
                cfg, cfg.run.out, views=o["views"], logits=o["logits"], topk=o["topk"],
                feat_dtype=o["feat_dtype"], max_gb=o["max_gb"], shard_size=o["shard_size"],
                batch_size=o["cache_batch_size"],
                worker=o["worker"], log=log, progress=not cfg.run.quiet and rank0,
            )
        if ranks:
            torch.distributed.barrier()  # every rank's shards are written: the last one wrote the manifest
            if not rank0:
                return 0
            man = read_manifest(cfg.run.out)  # complete, or one line saying what is missing
            log(f"fastkd.cache: complete: {man['num_shards']} shard(s) by {o['worker'][1]} ranks in "
                f"{cfg.run.out}")
        if o["verify"]:
            res = verify_cache(cfg.run.out, o["verify"], rel_tol=o["verify_tol"], log=print)
            return 0 if res["ok"] else 1
        return 0
    finally:
        if ranks:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
