"""The multi-exit convention every model in eenet_fast follows.

``model.stages`` and ``model.heads`` are :class:`torch.nn.ModuleList` of equal length ``K``; exit
``k`` is ``heads[k]`` applied to the output of ``stages[k]``, stage ``k`` reads stage ``k-1``'s
output (the input for ``k = 0``), and the last head is the final classifier. Stage outputs may be a
tensor or a tuple/dict of tensors with the batch first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["all_exits", "check_multi_exit"]


def all_exits(stages: Sequence[nn.Module], heads: Sequence[nn.Module], x: Any) -> list[torch.Tensor]:
    """Run every stage once, in order, and every head on its stage's output.

    Returns:
        ``K`` tensors ``[B, C]``: the logits of exits ``0..K-1``.
    """
    logits = []
    for stage, head in zip(stages, heads):
        x = stage(x)
        logits.append(head(x))
    return logits


def check_multi_exit(model: nn.Module) -> tuple[nn.ModuleList, nn.ModuleList]:
    """Check that ``model`` follows the multi-exit convention and return its ``(stages, heads)``.

    Raises:
        TypeError: ``stages`` or ``heads`` is missing or not an ``nn.ModuleList``, or there is no
            callable ``all_exits``.
        ValueError: the two lists are empty or of different lengths.
    """
    stages, heads = getattr(model, "stages", None), getattr(model, "heads", None)
    if not isinstance(stages, nn.ModuleList) or not isinstance(heads, nn.ModuleList):
        raise TypeError(
            f"{type(model).__name__} is not a multi-exit model: it needs `stages` and `heads` attributes "
            "that are nn.ModuleList (exit k = heads[k] on stages[k]'s output)"
        )
    if len(stages) != len(heads) or len(heads) == 0:
        raise ValueError(f"need as many stages as heads, at least one, got {len(stages)} and {len(heads)}")
    if not callable(getattr(model, "all_exits", None)):
        raise TypeError(f"{type(model).__name__} needs a method all_exits(x) -> list of [B, C] logits")
    return stages, heads
