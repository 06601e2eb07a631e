"""fastkd: fast, faithful knowledge distillation for Vision Transformers."""

import os as _os

__version__ = "0.1.0"

# In a plain source checkout (PYTHONPATH=<repo>, no install — the GPU machines), map
# ``fastkd.kernels`` onto the top-level ``kernels/`` directory, as the installed package does
# through its package-dir mapping.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "pyproject.toml")) and _os.path.isdir(
    _os.path.join(_root, "kernels")
):
    __path__.append(_root)  # noqa: F821  (package __path__)
