"""torch's CPU thread count for a block of code (calibration fits on one thread, timing on the
thread count a policy is served with)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["torch_threads"]


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """torch on ``count`` CPU threads for the block (``None``: as many as it has), then the count it
    had before."""
    saved = torch.get_num_threads()
    torch.set_num_threads(saved if count is None else count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
