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

import os
import sys
from collections.abc import Callable

import torch
from torch import nn

from fastkd.models.hub import (
    HeadMismatchError,
    ResolvedWeights,
    WeightsError,
    WeightsNotFoundError,
    _notice,
    file_sha256,
    hf_cache_dir,
    is_pretrained_spec,
    load_state_dict,
    resolve_weights,
)

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


def input_renorm(
    model: nn.Module,
    src: tuple[tuple[float, ...], tuple[float, ...]],
    dst: tuple[tuple[float, ...], tuple[float, ...]],
    *,
    what: str = "--teacher",
    log: Callable[[str], None] | None = _notice,
) -> bool:
    """Feed ``model`` inputs normalised with ``dst`` = (mean, std) when the batches come normalised with
    ``src``: ``x_t = (x_s * std_s + mean_s - mean_t) / std_t``, applied on the device by a forward
    pre-hook on the model's first conv (its per-channel scale/shift are non-persistent buffers, so they
    follow ``.to(device)`` and leave the state dict alone). False (nothing done) when they agree."""
    (ms, ss), (mt, st) = src, dst
    c = max(len(ms), len(mt))
    ms, ss, mt, st = ([float(v) for v in t] * (c // len(t)) for t in (ms, ss, mt, st))
    if all(abs(a - b) < 1e-7 for a, b in zip(ms + ss, mt + st, strict=True)):
        return False
    name = _first_conv(model) or next(
        (n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None
    )
    if name is None:
        raise WeightsError(f"{what}: no input conv to renormalise the input at; use a timm ViT or CNN")
    conv = model.get_submodule(name)
    scale = torch.tensor([s / t for s, t in zip(ss, st, strict=True)]).view(1, c, 1, 1)
    shift = torch.tensor([(a - b) / t for a, b, t in zip(ms, mt, st, strict=True)]).view(1, c, 1, 1)
    dev = conv.weight.device
    conv.register_buffer("fastkd_in_scale", scale.to(dev), persistent=False)
    conv.register_buffer("fastkd_in_shift", shift.to(dev), persistent=False)
    if getattr(conv, "_fastkd_renorm_hook", None) is None:
        def hook(mod, args):
            x = args[0]
            return (x * mod.fastkd_in_scale.to(x.dtype) + mod.fastkd_in_shift.to(x.dtype), *args[1:])

        conv._fastkd_renorm_hook = conv.register_forward_pre_hook(hook)
    if log is not None:
        r = lambda t: "(" + ", ".join(f"{v:.3f}" for v in t) + ")"  # noqa: E731
        log(
            f"{what}: expects mean {r(mt)} std {r(st)}, the batches have mean {r(ms)} std {r(ss)}: its "
            "input is renormalised on the device"
        )
    return True
