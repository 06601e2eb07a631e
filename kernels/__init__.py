"""Fused Triton kernels of fastkd, one kernel family per module (installed as ``fastkd.kernels``).

* ``token_kd``   — ViTKD mimic MSE + [CLS]-KD CLS–patch map loss + CLS-embedding inputs, one pass
* ``masked_gen`` — ViTKD generation: generator input (projection + mask token), masked MSE + its gradient
* ``logit_kd``   — Hinton KD and NKD from dense or sparse top-K teacher logits, loss and dS in one pass
* ``affine``     — RandAugment's geometric ops: a per-image affine resample of uint8 images (data path)

Each registers torch custom ops (``fastkd::...``). Importing this package imports nothing; import a
module to get its kernels (with ``TRITON_INTERPRET=1`` set first to run them on CPU). Use them through
``fastkd.functional``, which dispatches per device and falls back to the reference.
"""
