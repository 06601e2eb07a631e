"""fastkd: fast, faithful knowledge distillation for Vision Transformers."""

__version__ = "0.1.0"
