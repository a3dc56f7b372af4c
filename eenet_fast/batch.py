"""Batches as the runtime sees them: a tensor, or a tuple/list/dict of them at any depth.

The per-sample contract: every tensor with at least one dimension in a batch or in a stage's output
state is **per-sample, with the batch first**; adaptive inference compacts all of them together
when samples leave. A value that every sample shares (a lookup table, a position embedding) is
wrapped in :class:`Shared`: compaction and slicing leave it whole, and the stage that reads it takes
``.value``. 0-d tensors and values that are not tensors (``None``, numbers, strings) pass through
unchanged. A tensor whose first dimension is not the batch is an :class:`~eenet_fast.errors.InputError`
that names where it sits, so a shared tensor is never cut down by accident, and one that happens to
have as many rows as the batch is shared only when it says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch

from eenet_fast.errors import InputError

__all__ = ["Shared", "map_batch", "batch_size", "lead_tensor", "move_to", "describe"]


@dataclass(frozen=True, eq=False)
class Shared:
    """A value in a batch or a stage's output state that every sample shares (``value``, e.g. a
    ``[V, D]`` table): compaction and slicing pass it through whole; :func:`move_to` moves it."""

    value: Any


def map_batch(fn: Callable[[torch.Tensor], torch.Tensor], state: Any, size: int, where: str = "the state") -> Any:
    """Apply ``fn`` to every per-sample tensor in ``state`` (a tensor, or tuple/list/dict of them at
    any depth), keeping the structure; :class:`Shared` values, 0-d tensors and non-tensors pass through.

    Raises:
        InputError: a tensor's first dimension is not the batch ``size`` (the message names its
            place in ``state``, ``where`` naming ``state`` itself).
    """
    if isinstance(state, torch.Tensor):
        if not state.ndim:
            return state
        if state.shape[0] != size:
            raise InputError(
                f"{where} is a tensor of shape {tuple(state.shape)}, but every tensor of a batch or of a stage's "
                f"output is per-sample with the batch ({size}) first; wrap a tensor that all samples share in "
                "eenet_fast.Shared(tensor) (the stage reads it as .value)"
            )
        return fn(state)
    if isinstance(state, Mapping):
        return type(state)({key: map_batch(fn, value, size, f"{where}[{key!r}]") for key, value in state.items()})
    if isinstance(state, (tuple, list)):
        return type(state)(map_batch(fn, value, size, f"{where}[{i}]") for i, value in enumerate(state))
    return state


def batch_size(x: Any) -> int:
    """Number of samples in ``x``: the first dimension of ``x``, or of the first tensor with one in
    a tuple/list/dict ``x`` (:class:`Shared` values aside)."""
    return lead_tensor(x).shape[0]


def lead_tensor(x: Any) -> torch.Tensor:
    """The tensor that gives ``x`` its batch size (see :func:`batch_size`): ``x`` itself, or the first
    tensor with a dimension in a tuple/list/dict ``x``."""
    if isinstance(x, torch.Tensor):
        if not x.ndim:
            raise InputError("a 0-d tensor is not a batch: give inputs as [B, ...]")
        return x
    values = x.values() if isinstance(x, Mapping) else x if isinstance(x, (tuple, list)) else ()
    for value in values:
        if isinstance(value, torch.Tensor) and value.ndim:
            return value
    raise InputError(
        f"cannot find the batch in the input: expected a tensor [B, ...] or a tuple/dict of them, got {type(x).__name__}"
    )


def move_to(x: Any, device: torch.device | str) -> Any:
    """``x`` with every tensor in it (at any depth of tuples/lists/dicts, and in :class:`Shared`) moved to ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, Shared):
        return Shared(move_to(x.value, device))
    if isinstance(x, Mapping):
        return type(x)({k: move_to(v, device) for k, v in x.items()})
    if isinstance(x, (tuple, list)):
        return type(x)(move_to(v, device) for v in x)
    return x


def describe(x: Any, batch: int | None = None) -> str:
    """What ``x`` holds, for error messages: every tensor's dtype, shape and device, in ``x``'s
    structure (``"a dict {'x': float32 [3, 2] on cpu}"``). With ``batch``, its signature instead:
    dtypes and shapes with the batch dimension written ``B`` (``"{'x': float32[B, 2]}"``)."""

    def inner(value: Any) -> str:
        if isinstance(value, torch.Tensor):
            dtype = str(value.dtype).removeprefix("torch.")
            if batch is None:
                return f"{dtype} {list(value.shape)} on {value.device}"
            dims = ["B" if i == 0 and d == batch else str(d) for i, d in enumerate(value.shape)]
            return f"{dtype}[{', '.join(dims)}]"
        if isinstance(value, Shared):
            return f"Shared({inner(value.value)})"
        if isinstance(value, Mapping):
            return "{" + ", ".join(f"{key!r}: {inner(v)}" for key, v in value.items()) + "}"
        if isinstance(value, (tuple, list)):
            return "(" + ", ".join(inner(v) for v in value) + ")"
        return type(value).__name__

    if batch is not None:
        return inner(x)
    kind = "tensor" if isinstance(x, torch.Tensor) else type(x).__name__
    return f"a {kind} {inner(x)}"
