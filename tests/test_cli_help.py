"""Every entry point's ``--help`` prints its usage and exits 0.

argparse %-formats each help string, so a stray ``%`` in one (the digits32 preset's "35%") crashed
``python -m fastkd.train --help`` and ``python -m fastkd.cache --help`` with a TypeError.
"""

from __future__ import annotations

import importlib

import pytest

ENTRY_POINTS = ["fastkd.train.__main__", "fastkd.cache.__main__", "fastkd.study", "fastkd.data.stream",
                "fastkd.predict"]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_prints_usage_and_exits_0(module, capsys):
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--help" in out
    if module.startswith(("fastkd.train", "fastkd.cache")):
        assert "--preset" in out and "35%" in out  # the escaped "%" reaches the text unescaped
