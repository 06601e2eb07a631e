"""Checkpoints: a model's weights as ``.safetensors`` with its architecture record (JSON metadata);
``resolve_model`` turns a timm name or a checkpoint path into a model."""

from __future__ import annotations

import json
import os
import tempfile

import torch
from torch import nn

from fastkd.models.zoo import create_model

_ARCH_KEY = "fastkd"  # safetensors metadata key holding the JSON record
_FORMAT = 1

# --------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------

_ARCH_FIELDS = ("name", "num_classes", "img_size", "in_chans", "overrides")


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
    record = {**meta, **{k: arch[k] for k in _ARCH_FIELDS}, "format": _FORMAT}
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
    missing = [k for k in _ARCH_FIELDS if k not in record]
    if missing:
        raise ValueError(f"{path!r} fastkd metadata lacks {missing}; re-save it with save_model")
    return record


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model saved at ``path`` with ``create_model`` and load its weights strictly.

    Returns (model on ``map_location``, meta) where meta is the stored JSON record (architecture fields +
    the extras given to ``save_model``; also set as ``model.fastkd_meta``). The model is in train mode, as
    ``create_model`` returns it.
    """
    from safetensors.torch import load_model as st_load_model

    record = read_meta(path)
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
