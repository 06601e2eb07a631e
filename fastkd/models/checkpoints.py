"""Checkpoints: a model's weights as ``.safetensors`` with its architecture record (JSON metadata);
``resolve_model`` turns a timm name or a checkpoint path into a model."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile

import torch
from torch import nn

from fastkd.models.zoo import create_model
from fastkd.utils import check_sha256, tensors_sha256, umask_mode

_ARCH_KEY = "fastkd"  # safetensors metadata key holding the JSON record
_FORMAT = 1

# --------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------

_ARCH_FIELDS = ("name", "num_classes", "img_size", "in_chans", "overrides")
_VERIFY = [True]  # sha256 check on load (``--no-verify`` turns it off for the process)

# untrusted metadata: the only architecture keys a checkpoint may carry, each with its value check
_INT = lambda lo, hi: lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi  # noqa: E731
_NUM = lambda lo, hi: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi  # noqa: E731
_BOOL = lambda v: isinstance(v, bool)  # noqa: E731
_INTS = lambda hi: lambda v: isinstance(v, list) and len(v) <= 8 and all(_INT(1, hi)(x) for x in v)  # noqa: E731
_TOP = {"num_classes": _INT(1, 1_000_000), "img_size": _INT(1, 4096), "in_chans": _INT(1, 64)}
_OVERRIDES = {
    "embed_dim": _INT(1, 16384),
    "depth": _INT(1, 256),
    "num_heads": _INT(1, 256),
    "patch_size": _INT(1, 1024),
    "mlp_ratio": _NUM(0.1, 64),
    "class_token": _BOOL,
    "no_embed_class": _BOOL,
    "qkv_bias": _BOOL,
    "reg_tokens": _INT(0, 64),
    "global_pool": lambda v: v in ("token", "avg", "max", "avgmax", "map", ""),
    "drop_rate": _NUM(0, 0.99),
    "drop_path_rate": _NUM(0, 0.99),
    "stem_stride": _INT(1, 8),
    "output_stride": lambda v: v in (8, 16, 32),
    "channels": _INTS(8192),
    "layers": _INTS(64),
    "depths": _INTS(256),  # timm hierarchical models (ConvNeXt, Swin, …)
    "dims": _INTS(16384),
    "embed_dims": _INTS(16384),
    "head_hidden_size": _INT(1, 16384),
}
_MAX_PARAMS = 4_000_000_000


def set_verify(on: bool) -> None:
    """Verify checkpoints' sha256 on load (default) or not (``--no-verify``)."""
    _VERIFY[0] = bool(on)


def check_record(record: dict, path: str) -> None:
    """The architecture record against the allow-list: known keys, sane values (one line otherwise)."""
    name = record.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.]{1,100}", name):
        raise ValueError(f"{path!r}: metadata names an invalid architecture {str(name)[:60]!r}; re-save it")
    for k, ok in _TOP.items():
        if not ok(record.get(k)):
            raise ValueError(f"{path!r}: metadata {k}={str(record.get(k))[:40]} is out of range; re-save it")
    ov = record.get("overrides")
    if not isinstance(ov, dict):
        raise ValueError(f"{path!r}: metadata overrides must be an object; re-save it")
    for k, v in ov.items():
        if k not in _OVERRIDES:
            raise ValueError(
                f"{path!r}: metadata override {str(k)[:40]!r} is not an allowed architecture key "
                f"({', '.join(sorted(_OVERRIDES))}); re-save it with fastkd"
            )
        if not _OVERRIDES[k](v):
            raise ValueError(f"{path!r}: metadata override {k}={str(v)[:40]} is out of range; re-save it")


def _check_sizes(record: dict, path: str) -> None:
    """Build the architecture on the meta device (no memory) and compare every tensor's shape with the
    file's header before the real model is allocated."""
    from safetensors import safe_open

    with torch.device("meta"):
        meta_model = create_model(
            record["name"],
            num_classes=record["num_classes"],
            img_size=record["img_size"],
            in_chans=record["in_chans"],
            **record["overrides"],
        )
    want = {k: tuple(v.shape) for k, v in meta_model.state_dict().items()}
    n = sum(math.prod(s) for s in want.values())
    if n > _MAX_PARAMS:
        raise ValueError(
            f"{path!r}: its metadata describes a model of {n:,} values (> {_MAX_PARAMS:,}); "
            "refusing to build it"
        )
    with safe_open(path, framework="pt") as f:
        for k in f.keys():
            got = tuple(f.get_slice(k).get_shape())
            if want.get(k) != got:
                raise ValueError(
                    f"{path!r}: tensor {k} {list(got)} does not fit its recorded architecture "
                    f"{record['name']} ({list(want[k]) if k in want else 'no such tensor'}); the file is "
                    "inconsistent, re-save it"
                )


def save_model(model: nn.Module, path: str | os.PathLike, meta: dict | None = None) -> None:
    """Write ``model``'s weights to ``path`` (.safetensors), atomically (temp file + os.replace).

    The safetensors metadata key ``"fastkd"`` holds a JSON object: the architecture
    (``model.fastkd_arch`` from ``create_model``: name, num_classes, img_size, in_chans, overrides)
    merged with ``meta`` (any JSON-serialisable extras, e.g. top1, epochs). ``meta`` may repeat an
    architecture key only with the same value; a model not built by ``create_model`` must get all of
    name/num_classes/img_size/in_chans (and optionally overrides) in ``meta``.
    """
    from safetensors.torch import save_model as st_save_model

    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"checkpoint path must end with .safetensors, got {path!r}")
    meta = dict(meta or {})
    arch = dict(getattr(model, "fastkd_arch", None) or {})
    for key in _ARCH_FIELDS:
        if key in meta:
            if key in arch and meta[key] != arch[key]:
                raise ValueError(f"meta[{key!r}]={meta[key]!r} contradicts the model's {key}={arch[key]!r}")
            arch[key] = meta.pop(key)
    arch.setdefault("overrides", {})
    missing = [k for k in _ARCH_FIELDS if k not in arch]
    if missing:
        raise ValueError(
            f"cannot save {type(model).__name__}: architecture unknown (missing {missing}); build it with "
            f"fastkd.models.create_model or pass them in meta"
        )
    record = {
        **meta,
        **{k: arch[k] for k in _ARCH_FIELDS},
        "format": _FORMAT,
        "tensors_sha256": tensors_sha256(model.state_dict()),
    }
    try:
        text = json.dumps(record, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"checkpoint meta must be JSON-serialisable: {e}") from None
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        st_save_model(model, tmp, metadata={_ARCH_KEY: text, "format": "pt"})
        os.chmod(tmp, umask_mode())  # mkstemp made it 0600: follow the user's umask
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_meta(path: str | os.PathLike) -> dict:
    """The fastkd JSON record of a checkpoint (no tensors loaded); ValueError/FileNotFoundError if absent."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist; check the path")
    try:
        with safe_open(path, framework="pt") as f:
            md = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error type for non-safetensors files
        raise ValueError(f"{path!r} is not a readable .safetensors file ({e}); save it with fastkd") from None
    if _ARCH_KEY not in md:
        raise ValueError(
            f"{path!r} has no fastkd metadata (not written by fastkd.models.save_model), so its architecture "
            f"is unknown; re-save it with save_model(model, path, meta)"
        )
    try:
        record = json.loads(md[_ARCH_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path!r} has corrupt fastkd metadata ({e}); re-save it") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path!r} has corrupt fastkd metadata (not an object); re-save it")
    missing = [k for k in _ARCH_FIELDS if k not in record]
    if missing:
        raise ValueError(f"{path!r} fastkd metadata lacks {missing}; re-save it with save_model")
    check_record(record, path)
    return record


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model saved at ``path`` with ``create_model`` and load its weights strictly.

    Returns (model on ``map_location``, meta) where meta is the stored JSON record (architecture fields +
    the extras given to ``save_model``; also set as ``model.fastkd_meta``). The model is in train mode, as
    ``create_model`` returns it.
    """
    from safetensors.torch import load_model as st_load_model

    record = read_meta(path)
    _check_sizes(record, os.fspath(path))
    model = create_model(
        record["name"],
        num_classes=record["num_classes"],
        img_size=record["img_size"],
        in_chans=record["in_chans"],
        **record["overrides"],
    )
    try:
        st_load_model(model, os.fspath(path), strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:300]
        raise ValueError(
            f"{os.fspath(path)!r} weights do not match its architecture {record['name']}: {first}"
        ) from None
    if _VERIFY[0] and record.get("tensors_sha256") is not None:
        check_sha256(model.state_dict(), record["tensors_sha256"], f"checkpoint {os.fspath(path)!r}")
    model.fastkd_meta = record
    return model.to(map_location), record


def _looks_like_path(s: str) -> bool:
    return os.sep in s or "/" in s or s.endswith((".safetensors", ".pth", ".pt", ".bin", ".ckpt"))


def resolve_model(
    name_or_path: str | os.PathLike, *, num_classes: int, img_size: int, in_chans: int, **overrides
) -> nn.Module:
    """A checkpoint path or a model name -> model.

    An existing file is loaded with ``load_model`` (its record is then also at ``model.fastkd_meta``); its
    num_classes / in_chans / img_size must match the data, and any ``overrides`` given must equal the
    checkpoint's (one clear line otherwise). Anything else is a model name for ``create_model``. A
    path-like string that does not exist is a FileNotFoundError, not an unknown-name error.
    """
    s = os.fspath(name_or_path)
    if os.path.isfile(s):
        model, meta = load_model(s)
        data = dict(num_classes=num_classes, in_chans=in_chans, img_size=img_size)
        bad = [f"{k}={meta[k]} (data: {v})" for k, v in data.items() if meta[k] != v]
        if bad:
            raise ValueError(
                f"checkpoint {s!r} does not fit the data: {', '.join(bad)}; train a teacher for this data "
                f"or pick the matching dataset"
            )
        diff = [k for k, v in overrides.items() if k not in meta["overrides"] or meta["overrides"][k] != v]
        if diff:
            saved = {k: meta["overrides"].get(k) for k in diff}
            asked = {k: overrides[k] for k in diff}
            raise ValueError(
                f"checkpoint {s!r} was built with overrides {saved}, not {asked}; "
                f"drop the overrides to use the checkpoint as saved"
            )
        return model
    if _looks_like_path(s):
        if s.endswith((".pth", ".pt", ".bin", ".ckpt")):
            raise ValueError(f"{s!r}: only .safetensors checkpoints written by fastkd are supported")
        raise FileNotFoundError(f"checkpoint {s!r} does not exist; check the path (or give a model name)")
    return create_model(s, num_classes=num_classes, img_size=img_size, in_chans=in_chans, **overrides)
