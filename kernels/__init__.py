"""Triton kernels of eenet_fast, shipped as ``eenet_fast.kernels``.

Each kernel lives in its own module beside its torch wrapper; the pure-PyTorch reference it must
match lives in the library (``eenet_fast.features`` for the confidence features).
"""
