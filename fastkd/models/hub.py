"""Where pretrained weights are and how to read them, offline: files (``.safetensors`` / ``.pth`` /
``.bin``, timm wrappers unwrapped), ``hf-hub:`` names from the local Hugging Face cache, ``local-dir:``
folders. Never the network. Applying them to a model is :mod:`fastkd.models.weights`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
)
"""File names looked for in an hf-hub snapshot or a local-dir folder, in timm's order of preference."""
_EXTS = (".safetensors", ".pth", ".pth.tar", ".bin", ".pt")
_WRAPPERS = ("state_dict_ema", "model_ema", "state_dict", "model")
_PREFIXES = ("module.", "_orig_mod.")
_SIZE_KEYS = ("num_classes", "img_size", "in_chans", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay")


class WeightsError(ValueError):
    """Weights that cannot be used as given (the message is one line naming the fix)."""


class WeightsNotFoundError(FileNotFoundError):
    """Weights that are not on disk (the message says where fastkd looked)."""


class HeadMismatchError(WeightsError):
    """The checkpoint's classifier has another number of classes than the data."""


def _notice(msg: str) -> None:
    print(f"fastkd.weights: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike, chunk: int = 16 << 20) -> str:
    """sha256 hex of a file's bytes, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _unwrap(obj, path: str, log) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for k in _WRAPPERS:
            if k in obj and isinstance(obj[k], dict):
                if log is not None and k != "state_dict":
                    log(f"{path}: using the '{k}' weights of the checkpoint")
                obj = obj[k]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = list(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
        raise WeightsError(
            f"{path}: not a state dict of tensors (found {keys}); save model.state_dict() "
            f"(or a dict with one of {', '.join(_WRAPPERS)})"
        )
    out = {}
    for k, v in obj.items():
        for p in _PREFIXES:
            while k.startswith(p):
                k = k[len(p) :]
        out[k] = v
    return out


def load_state_dict(path: str | os.PathLike, *, log: Callable[[str], None] | None = _notice) -> dict:
    """A timm state dict from ``.safetensors`` or ``.pth``/``.bin``/``.pt`` (torch.load, weights_only=True),
    unwrapped (state_dict_ema / model_ema / state_dict / model) and without module./_orig_mod. prefixes."""
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise WeightsNotFoundError(f"weights file {p!r} does not exist; check the path")
    if p.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            sd = load_file(p, device="cpu")
        except Exception as e:
            raise WeightsError(
                f"{p}: not a readable .safetensors file ({' '.join(str(e).split())}); re-export the weights"
            ) from None
        return _unwrap(sd, p, log)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        first = " ".join(str(e).split())[:200]
        if "weights_only" in str(e) or "Unpickl" in type(e).__name__:
            raise WeightsError(
                f"{p}: holds Python objects besides tensors, which fastkd never unpickles ({first}); "
                "re-save it as torch.save(model.state_dict(), path) or as .safetensors"
            ) from None
        raise WeightsError(
            f"{p}: cannot read it as a torch checkpoint ({first}); re-export the weights"
        ) from None
    return _unwrap(obj, p, log)


# ----------------------------------------------------------------------------------------------------
# resolving hf-hub: / local-dir: / name + file
# ----------------------------------------------------------------------------------------------------


def hf_cache_dir() -> str:
    """The Hugging Face hub cache folder, from the environment at call time (huggingface_hub's rules)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return os.environ["HUGGINGFACE_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    return os.path.join(home, "hub")


def is_pretrained_spec(name: str) -> bool:
    """True for ``hf-hub:...`` and ``local-dir:...`` names."""
    return str(name).startswith(("hf-hub:", "local-dir:"))


@dataclass
class ResolvedWeights:
    """Where weights come from and how to build the model they fit.

    arch: timm model name (may carry a pretrained tag, e.g. ``vit_base_patch16_224.augreg_in21k``);
    file: the weights file; model_args: constructor kwargs from config.json (hf-hub / local-dir);
    pretrained_cfg: config.json's pretrained config (mean, std, input_size, num_classes, classifier, ...),
    empty for a plain name (the model's own timm default then applies); source: 'file' | 'hf-hub' |
    'local-dir'; spec: what the user wrote.
    """

    arch: str
    file: str
    source: str
    spec: str
    model_args: dict = field(default_factory=dict)
    pretrained_cfg: dict = field(default_factory=dict)


def _read_config(path: str) -> tuple[str | None, dict, dict]:
    """timm's config.json -> (architecture, model_args, pretrained_cfg) (same parsing rules as timm)."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable timm config.json ({e}); re-export it") from None
    if not isinstance(cfg, dict):
        raise WeightsError(f"{path}: config.json is not an object; re-export it with timm")
    if "pretrained_cfg" not in cfg:  # legacy single-dict layout
        pcfg = {k: v for k, v in cfg.items() if k not in ("architecture", "num_features")}
        arch = cfg.get("architecture")
    else:
        pcfg = dict(cfg["pretrained_cfg"] or {})
        arch = cfg.get("architecture")
    if "num_classes" in cfg:
        pcfg["num_classes"] = cfg["num_classes"]
    args = {k: v for k, v in (cfg.get("model_args") or {}).items() if k not in _SIZE_KEYS}
    return arch, args, pcfg


def _find_weight_file(folder: str) -> str | None:
    for n in WEIGHT_FILES:
        p = os.path.join(folder, n)
        if os.path.isfile(p):
            return p
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return None
    for ext in _EXTS:
        hits = [n for n in names if n.endswith(ext)]
        if hits:
            return os.path.join(folder, hits[0])
    return None


def resolve_weights(name: str, weights: str | os.PathLike | None = None) -> ResolvedWeights:
    """``hf-hub:<repo>[@rev]`` | ``local-dir:<folder>`` | a timm name + ``weights`` (a file) -> where to load.

    Offline: hf-hub names are looked up in the local cache only. ``weights`` (``--teacher-weights``),
    when given, replaces the file an hf-hub / local-dir name would give.
    Raises WeightsNotFoundError (saying where it looked) or WeightsError, one line each.
    """
    name = str(name)
    wfile = os.fspath(weights) if weights is not None else None
    if name.startswith("hf-hub:"):
        from huggingface_hub import try_to_load_from_cache

        repo = name[len("hf-hub:") :]
        repo_id, _, rev = repo.partition("@")
        rev = rev or None
        if repo_id.count("/") != 1:
            raise WeightsError(
                f"{name}: use hf-hub:<owner>/<model>[@revision], e.g. hf-hub:timm/deit_base_patch16_224"
            )
        cache = hf_cache_dir()

        def cached(fn: str) -> str | None:
            p = try_to_load_from_cache(repo_id, fn, cache_dir=cache, revision=rev)
            return p if isinstance(p, str) and os.path.isfile(p) else None

        cfg_path = cached("config.json")
        arch, args, pcfg = _read_config(cfg_path) if cfg_path else (None, {}, {})
        if wfile is None:
            wfile = next((p for p in map(cached, WEIGHT_FILES) if p), None)
        if wfile is None:
            where = os.path.join(
                cache, f"models--{repo_id.replace('/', '--')}", "snapshots", f"<{rev or 'main'}>"
            )
            raise WeightsNotFoundError(
                f"{name}: weights not in the local Hugging Face cache (looked in {where}/ for "
                f"{', '.join(WEIGHT_FILES[:2])}); fastkd never downloads: set HF_HOME/HF_HUB_CACHE to a "
                f"cache that holds it (huggingface-cli download {repo_id} where there is network), or pass "
                "--teacher-weights FILE"
            )
        arch = arch or repo_id.split("/", 1)[1]
        return ResolvedWeights(arch, wfile, "hf-hub", name, args, pcfg)
    if name.startswith("local-dir:"):
        folder = os.path.expanduser(name[len("local-dir:") :])
        if not os.path.isdir(folder):
            raise WeightsNotFoundError(
                f"{name}: no such folder; give the folder holding config.json + weights"
            )
        cfg_path = os.path.join(folder, "config.json")
        if not os.path.isfile(cfg_path):
            raise WeightsError(
                f"{name}: no config.json in {folder}; export with timm (save_for_hf) or use "
                "--teacher <timm name> --teacher-weights FILE"
            )
        arch, args, pcfg = _read_config(cfg_path)
        if not arch:
            raise WeightsError(f"{cfg_path}: no 'architecture' entry; add the timm model name to it")
        wfile = wfile or _find_weight_file(folder)
        if wfile is None:
            raise WeightsNotFoundError(
                f"{name}: no weights file in {folder} (looked for {', '.join(WEIGHT_FILES[:2])} or any "
                f"{'/'.join(_EXTS)}); put the weights beside config.json"
            )
        return ResolvedWeights(arch, wfile, "local-dir", name, args, pcfg)
    if wfile is None:
        raise WeightsError(
            f"{name}: no weights given; pass --teacher-weights FILE (.safetensors/.pth/.bin), or name them "
            "hf-hub:timm/<name> (local HF cache) or local-dir:<folder>"
        )
    if not os.path.isfile(wfile):
        raise WeightsNotFoundError(f"weights file {wfile!r} does not exist; check the path")
    return ResolvedWeights(name, wfile, "file", name)
