"""Pretrained timm weights, offline: files, ``hf-hub:`` names from the local HF cache, ``local-dir:``.

Nothing here touches the network. ``hf-hub:timm/<name>[@rev]`` is looked up in the local Hugging Face
cache only (``huggingface_hub.try_to_load_from_cache``: a pure file lookup under ``$HF_HUB_CACHE``, else
``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``, read at call time); when the weights are not there,
one line says where it looked. ``local-dir:<folder>`` reads timm's export layout (``config.json`` +
``model.safetensors`` / ``pytorch_model.bin`` / ...). A plain timm name takes its weights from a file.

Loading, in order (:func:`build_pretrained` / :func:`apply_weights`):

1. ``load_state_dict``: ``.safetensors`` via safetensors; ``.pth``/``.bin``/``.pt`` via
   ``torch.load(weights_only=True)`` (never arbitrary unpickling); the wrappers timm writes
   (``state_dict_ema``, ``model_ema``, ``state_dict``, ``model`` -- EMA first, as timm prefers) are
   unwrapped, and ``module.`` (DDP) / ``_orig_mod.`` (torch.compile) prefixes stripped.
2. Head check: the checkpoint's classifier rows vs the data's classes. A mismatch is one line naming the
   fix (``--teacher-finetune EPOCHS`` re-initializes the head and fine-tunes it); the head is dropped
   and re-initialized (:func:`reset_head`, seeded) only when the caller asks (``reinit_head=True``).
   Never a silently random head.
3. timm's own ``checkpoint_filter_fn`` of the model's module, which among other things resamples the
   absolute position embeddings (and the patch embedding) to the model's resolution; one line says so
   when it did.
4. An input conv trained on 3 channels is adapted to 1-channel data with ``timm.models.adapt_input_conv``
   (one line), then ``load_state_dict``; any other missing / unexpected / mis-shaped key is one line
   naming the architecture fix.

:func:`preprocessing` returns the weights' own mean/std/input size (the pretrained config), and
:func:`file_sha256` the checksum a fine-tuned teacher's cache key uses.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "HeadMismatchError",
    "ResolvedWeights",
    "WeightsError",
    "WeightsNotFoundError",
    "apply_weights",
    "build_pretrained",
    "checkpoint_num_classes",
    "classifier_names",
    "drop_head",
    "file_sha256",
    "hf_cache_dir",
    "is_pretrained_spec",
    "load_state_dict",
    "preprocessing",
    "reset_head",
    "resolve_weights",
]

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


# ----------------------------------------------------------------------------------------------------
# applying weights to a model
# ----------------------------------------------------------------------------------------------------


def classifier_names(model: nn.Module) -> tuple[str, ...]:
    """The model's classifier module names from its pretrained config ('head'; DeiT-distilled: 'head',
    'head_dist'; ResNet: 'fc')."""
    c = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    names = (c,) if isinstance(c, str) else tuple(c)
    return tuple(n for n in names if _has_module(model, n))


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def checkpoint_num_classes(state_dict: dict, heads: tuple[str, ...]) -> int | None:
    """Rows of the first classifier weight in the state dict (None: the checkpoint has no head)."""
    for h in heads:
        w = state_dict.get(f"{h}.weight")
        if w is not None:
            return int(w.shape[0])
    return None


def drop_head(state_dict: dict, heads: tuple[str, ...]) -> dict:
    """The state dict without the classifier tensors of ``heads`` (for a new head of another size)."""
    pre = tuple(f"{h}." for h in heads)
    return {k: v for k, v in state_dict.items() if not k.startswith(pre)}


def _model_num_classes(model: nn.Module, heads: tuple[str, ...]) -> int:
    nc = getattr(model, "num_classes", None)
    if isinstance(nc, int):
        return nc
    for h in heads:
        m = model.get_submodule(h)
        if isinstance(m, nn.Linear):
            return m.out_features
    return 0


@torch.no_grad()
def reset_head(model: nn.Module, num_classes: int | None = None, *, seed: int = 0) -> nn.Module:
    """Re-initialize the classifier(s) for fine-tuning: ``reset_classifier(num_classes)`` when the size
    changes, then trunc-normal(std 0.02) weights and zero biases (timm's ViT head init), drawn from a
    generator seeded with ``seed`` -- the global RNG is not touched."""
    heads = classifier_names(model)
    if num_classes is not None and num_classes != _model_num_classes(model, heads):
        with torch.random.fork_rng(devices=[]):  # the new module's default init must not move the global RNG
            model.reset_classifier(num_classes)
    g = torch.Generator().manual_seed(int(seed))
    for h in heads:
        for m in model.get_submodule(h).modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                w = nn.init.trunc_normal_(torch.empty(m.weight.shape), std=0.02, generator=g)  # on the CPU
                m.weight.copy_(w.to(m.weight.dtype))
                if m.bias is not None:
                    m.bias.zero_()
    return model


def _first_conv(model: nn.Module) -> str | None:
    c = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    c = c[0] if isinstance(c, (list, tuple)) and c else c
    return c if isinstance(c, str) and _has_module(model, c) else None


def apply_weights(
    model: nn.Module,
    state_dict: dict,
    *,
    what: str = "--teacher",
    reinit_head: bool = False,
    seed: int = 0,
    head_fix: str | None = None,
    log: Callable[[str], None] | None = _notice,
) -> dict:
    """Load a timm state dict into a timm model built for the data (any num_classes / img_size / in_chans).

    reinit_head: when the checkpoint's classes differ from the model's (or it has no head), drop its head
        and re-initialize the model's (seeded) instead of raising HeadMismatchError.
    what: how messages name the weights (the flag the user passed). head_fix: the fix a head mismatch
        names (default: ``--teacher-finetune EPOCHS``).
    Returns a report: {'head': 'loaded' | 'reinitialized', 'ckpt_classes', 'pos_embed_resampled':
    (old, new) or None, 'in_chans_adapted': (old, new) or None}.
    """
    sd = dict(state_dict)
    heads = classifier_names(model)
    n_model = _model_num_classes(model, heads)
    n_ckpt = checkpoint_num_classes(sd, heads)
    report: dict = {
        "head": "loaded",
        "ckpt_classes": n_ckpt,
        "pos_embed_resampled": None,
        "in_chans_adapted": None,
    }
    if heads and not n_model:  # a head-less model (num_classes=0, features only): the checkpoint's head goes
        sd = drop_head(sd, heads)
        report["head"] = "none"
    elif heads and n_ckpt != n_model:
        if not reinit_head:
            has = f"a {n_ckpt}-class head" if n_ckpt is not None else "no classifier head"
            fix = head_fix or (
                f"add --teacher-finetune EPOCHS to replace the head by a new {n_model}-class one "
                "(re-initialized) and fine-tune it on the training split, or use weights trained on "
                "these classes"
            )
            raise HeadMismatchError(
                f"{what}: the checkpoint has {has} but the data has {n_model} classes; {fix}"
            )
        sd = drop_head(sd, heads)
        report["head"] = "reinitialized"
    # timm's own filter: remaps foreign layouts and resamples position / patch embeddings to this model
    mod = sys.modules.get(type(model).__module__)
    filt = getattr(mod, "checkpoint_filter_fn", None)
    old_pe = sd.get("pos_embed")
    old_pe_shape = tuple(old_pe.shape) if old_pe is not None else None
    if filt is not None:
        try:
            sd = filt(sd, model)
        except Exception as e:  # timm asserts / shape errors inside the filter
            raise WeightsError(
                f"{what}: timm's checkpoint filter for {type(model).__name__} failed "
                f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); pass the architecture the weights "
                "were trained with"
            ) from None
    if old_pe_shape is not None and "pos_embed" in sd and tuple(sd["pos_embed"].shape) != old_pe_shape:
        report["pos_embed_resampled"] = (old_pe_shape, tuple(sd["pos_embed"].shape))
        if log is not None:
            log(
                f"{what}: position embeddings resampled {old_pe_shape[1]} -> {sd['pos_embed'].shape[1]} "
                f"tokens "
                f"for this resolution (timm's checkpoint filter)"
            )
    conv = _first_conv(model)
    if conv is not None and f"{conv}.weight" in sd:
        w = sd[f"{conv}.weight"]
        want = model.get_submodule(conv).weight.shape
        if w.ndim == 4 and w.shape[1] != want[1] and w.shape[0] == want[0]:
            from timm.models import adapt_input_conv

            sd[f"{conv}.weight"] = adapt_input_conv(int(want[1]), w)
            report["in_chans_adapted"] = (int(w.shape[1]), int(want[1]))
            if log is not None:
                log(
                    f"{what}: input conv adapted from {w.shape[1]} to {want[1]} channel(s) "
                    "(timm's adapt_input_conv)"
                )
    try:
        res = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        detail = lines[0] if lines else " ".join(str(e).split())[:200]
        raise WeightsError(
            f"{what}: the weights do not fit {type(model).__name__} ({detail}); pass the architecture "
            "(name and size) the weights were trained with"
        ) from None
    pre = tuple(f"{h}." for h in heads)
    missing = [k for k in res.missing_keys if not (report["head"] == "reinitialized" and k.startswith(pre))]
    if missing or res.unexpected_keys:
        raise WeightsError(
            f"{what}: the weights do not fit {type(model).__name__}: {len(missing)} missing "
            f"({', '.join(missing[:3])}), {len(res.unexpected_keys)} unexpected "
            f"({', '.join(res.unexpected_keys[:3])}); pass the architecture the weights were trained with"
        )
    if report["head"] == "reinitialized":
        reset_head(model, seed=seed)
        if log is not None:
            was = f"{n_ckpt}-class" if n_ckpt is not None else "no"
            log(
                f"{what}: checkpoint head ({was}) replaced by a new {n_model}-class head (seed {seed}) "
                "to fine-tune"
            )
    return report


def build_pretrained(
    name: str,
    *,
    num_classes: int,
    img_size: int,
    in_chans: int,
    weights: str | os.PathLike | None = None,
    reinit_head: bool = False,
    seed: int = 0,
    what: str = "--teacher",
    head_fix: str | None = None,
    create: Callable[..., nn.Module] | None = None,
    log: Callable[[str], None] | None = _notice,
    **overrides,
) -> nn.Module:
    """Build ``name``'s architecture for the data and load its pretrained weights, offline.

    name: ``hf-hub:<repo>``, ``local-dir:<folder>`` or a timm name (then ``weights`` is required).
    create: ``create(arch, num_classes=, img_size=, in_chans=, **kwargs)`` (default:
        ``fastkd.models.create_model``, which never downloads). ``overrides`` beat config.json's model_args.
    The model gets ``pretrained_cfg`` from config.json (so :func:`preprocessing` returns the weights'
    mean/std) and ``fastkd_weights`` = {'spec', 'source', 'file', 'arch', 'report'}.
    """
    r = resolve_weights(name, weights)
    sd = load_state_dict(r.file, log=log)
    if create is None:
        from fastkd.models import create_model as create
    kwargs = {**r.model_args, **overrides}
    model = create(r.arch, num_classes=num_classes, img_size=img_size, in_chans=in_chans, **kwargs)
    if r.pretrained_cfg:
        model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), **r.pretrained_cfg}
    report = apply_weights(
        model, sd, what=f"{what} {name}", reinit_head=reinit_head, seed=seed, head_fix=head_fix, log=log
    )
    model.fastkd_weights = dict(spec=name, source=r.source, file=r.file, arch=r.arch, report=report)
    return model


def preprocessing(model: nn.Module, in_chans: int | None = None) -> dict:
    """The weights' own preprocessing (timm ``resolve_data_config`` on the model's pretrained config):
    {'mean', 'std', 'input_size', 'interpolation', 'crop_pct'}. With ``in_chans == 1`` an RGB mean/std
    collapses to its channel average (the input conv was adapted the same way)."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    mean, std = tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
    if in_chans == 1 and len(mean) != 1:
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
    return dict(
        mean=mean,
        std=std,
        input_size=tuple(cfg["input_size"]),
        interpolation=cfg.get("interpolation"),
        crop_pct=cfg.get("crop_pct"),
    )
