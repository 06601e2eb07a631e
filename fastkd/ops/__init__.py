"""The loss math: ``reference`` (the public functional API, pure torch, fp64-capable — the spec) and
``dispatch`` (the same functions routed to the Triton kernels or a compiled reference)."""
