"""Deprecated package: the loss math lives in ``fastkd.ops`` and the loss parts in ``fastkd.methods``;
``fastkd.losses.reference`` stays importable as an alias of ``fastkd.ops.reference``."""
