"""Batches as the runtime sees them: a tensor, or a tuple/list/dict of tensors with the batch first
(hidden states plus an attention mask, a tokenizer's output, ...). Entries that are not per-sample
tensors (``None``, scalars, tensors without the batch dimension) pass through unchanged."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch

__all__ = ["map_batch", "batch_size", "move_to"]


def map_batch(fn: Callable[[torch.Tensor], torch.Tensor], state: Any, size: int) -> Any:
    """Apply ``fn`` to every tensor in ``state`` (a tensor, or tuple/list/dict of them) whose first
    dimension is the batch (``size``); everything else passes through unchanged."""
    if isinstance(state, torch.Tensor):
        return fn(state) if state.ndim and state.shape[0] == size else state
    if isinstance(state, Mapping):
        return type(state)({key: map_batch(fn, value, size) for key, value in state.items()})
    if isinstance(state, (tuple, list)):
        return type(state)(map_batch(fn, value, size) for value in state)
    return state


def batch_size(x: Any) -> int:
    """Number of samples in ``x``: the first dimension of ``x``, or of the first tensor in a
    tuple/list/dict ``x`` that has one."""
    if isinstance(x, torch.Tensor):
        if not x.ndim:
            raise TypeError("a 0-d tensor is not a batch: give inputs as [B, ...]")
        return x.shape[0]
    values = x.values() if isinstance(x, Mapping) else x if isinstance(x, (tuple, list)) else ()
    for value in values:
        if isinstance(value, torch.Tensor) and value.ndim:
            return value.shape[0]
    raise TypeError(f"cannot find the batch in the input: expected a tensor or a tuple/dict of tensors, got {type(x).__name__}")


def move_to(x: Any, device: torch.device | str) -> Any:
    """``x`` with every tensor in it (at any depth of tuples/lists/dicts) moved to ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, Mapping):
        return type(x)({k: move_to(v, device) for k, v in x.items()})
    if isinstance(x, (tuple, list)):
        return type(x)(move_to(v, device) for v in x)
    return x
