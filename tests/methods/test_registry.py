"""The method registry: every method declares a typed config whose fields are the flat CLI/config.json
fields of ``MethodConfig`` (same names, types and defaults), and build_loss reads them from there."""

import dataclasses
from typing import get_type_hints

from fastkd.config import MethodConfig
from fastkd.methods.base import typed_config
from fastkd.methods.registry import registered


def test_every_method_config_is_a_slice_of_method_config():
    flat = {f.name: f for f in dataclasses.fields(MethodConfig)}
    flat_types = get_type_hints(MethodConfig)
    for m in registered():
        assert m.config is not None, f"{m.name} declares no typed config"
        hints = get_type_hints(m.config)
        for f in dataclasses.fields(m.config):
            assert f.name in flat, f"{m.name}: {f.name} is not a MethodConfig field (a CLI flag)"
            assert f.default == flat[f.name].default, f"{m.name}: {f.name} default differs from MethodConfig"
            assert hints[f.name] == flat_types[f.name], f"{m.name}: {f.name} type differs from MethodConfig"


def test_typed_config_reads_the_run_flags():
    mcfg = MethodConfig(kd_T=2.5, kd_weight=0.3)
    kd = next(m for m in registered() if m.name == "kd")
    cfg = typed_config(kd, mcfg)
    assert (cfg.kd_T, cfg.kd_weight) == (2.5, 0.3) and type(cfg) is kd.config
