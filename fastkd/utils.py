"""Small I/O helpers: atomic writes and pickle-free state (safetensors + JSON)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def umask_mode() -> int:
    """0o666 & ~umask: the mode an ordinary open() would give a new file (mkstemp gives 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def disk_full(e: BaseException) -> bool:
    """True for ENOSPC, as an OSError or as safetensors' own error type (its message carries the OS error)."""
    if isinstance(e, OSError):
        return e.errno == errno.ENOSPC
    msg = str(e)
    return type(e).__name__ == "SafetensorError" and ("code: 28" in msg or "No space left" in msg
                                                       or "StorageFull" in msg)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, umask_mode())  # mkstemp made it 0600: outputs follow the user's umask
        os.replace(tmp, path)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True


def _flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """Replace every tensor in a nested dict/list structure by a {'__t__': key} reference."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__t__": key}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"state at {prefix!r} has non str/int keys")
        return {"__dict__": [[k, _flatten(v, tensors, f"{prefix}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {
            "__list__": [_flatten(v, tensors, f"{prefix}[{i}]") for i, v in enumerate(obj)],
            "tuple": isinstance(obj, tuple),
        }
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix!r} without pickle")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__t__" in obj:
            return tensors[obj["__t__"]]
        if "__dict__" in obj:
            return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            items = [_unflatten(v, tensors) for v in obj["__list__"]]
            return tuple(items) if obj.get("tuple") else items
    return obj


def save_state(directory: str | Path, state: dict, meta: dict) -> None:
    """Save a nested state (model/optimizer/scheduler dicts, RNG tensors) without pickle.

    Atomic as a pair: tensors go to a new uniquely named safetensors file, then ``state.json``
    (structure + meta + the tensor file's name) is atomically replaced, then the old tensor file
    is removed. A crash at any point leaves the previous checkpoint loadable.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(state, tensors, "state")
    old = None
    if (d / "state.json").exists():
        with _suppress():
            old = json.loads((d / "state.json").read_text()).get("tensors")
    name = f"state-{meta.get('step', 0)}-{os.getpid()}.safetensors"
    tmp = d / f".{name}.tmp"
    try:
        save_file(tensors, str(tmp))
        os.chmod(tmp, umask_mode())  # safetensors creates 0600 files: follow the user's umask
        os.replace(tmp, d / name)
        doc = {"meta": meta, "tensors": name, "sha256": tensors_sha256(tensors), "tree": tree}
        atomic_write_json(d / "state.json", doc)
    except BaseException:  # e.g. ENOSPC: no partial or orphaned file; the previous checkpoint stays
        with _suppress():
            tmp.unlink()
        if name != old:
            with _suppress():
                (d / name).unlink()
        raise
    if old and old != name:
        with _suppress():
            (d / old).unlink()


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in name order: what a checkpoint holds."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_sha256(tensors: dict[str, torch.Tensor], want: str | None, where: str) -> None:
    """ValueError (one line) if the tensors do not hash to the recorded sha256 (None: nothing recorded)."""
    if want is not None and tensors_sha256(tensors) != want:
        raise ValueError(
            f"{where}: the tensors do not match their recorded sha256 (corrupted or altered file); "
            "restore it, or pass --no-verify to load it anyway"
        )


def load_state(
    directory: str | Path, map_location: str | torch.device = "cpu", *, verify: bool = True
) -> tuple[dict, dict]:
    d = Path(directory)
    try:
        doc = json.loads((d / "state.json").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no checkpoint in {d} (state.json missing); start without --resume"
        ) from None
    except json.JSONDecodeError as e:
        raise ValueError(
            f"checkpoint {d / 'state.json'} is corrupted ({e}); remove it and start without --resume"
        ) from None
    tfile = d / doc["tensors"]
    if not tfile.exists():
        raise ValueError(f"checkpoint {d} is incomplete: {tfile.name} is missing; remove {d} and start again")
    tensors = load_file(str(tfile), device=str(map_location))
    if verify:
        check_sha256(tensors, doc.get("sha256"), f"checkpoint {tfile}")
    return _unflatten(doc["tree"], tensors), doc["meta"]
