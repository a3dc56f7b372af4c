"""Exit heads: the modules that turn a stage's output into logits ``[B, C]``.

* :func:`conv_head`: a CNN feature map, pooled to a coarse grid, then linear.
* :class:`TokenHead`: transformer tokens, pooled (class token or masked mean), LayerNorm, linear.
* :func:`pooled_linear_head`: a head *factory* for :func:`eenet_fast.wrap`, which builds a global
  average pool and a linear layer from each stage's example output.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Literal

import torch
from torch import nn

__all__ = ["conv_head", "TokenHead", "pooled_linear_head"]


def conv_head(channels: int, num_classes: int, grid: int = 4) -> nn.Module:
    """Exit head for a CNN feature map ``[B, channels, H, W]``: average pooling to a ``grid x grid``
    layout and a linear layer, giving logits ``[B, num_classes]``. Keeping a coarse layout makes
    early exits far more accurate than a global pool (``grid=1``) for little cost: on the demo's CNN,
    83 % instead of 55 % at the first exit."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(grid), nn.Flatten(1), nn.Linear(channels * grid * grid, num_classes))


class TokenHead(nn.Module):
    """Exit head for transformer states: pool the tokens, LayerNorm, linear.

    Reads ``hidden`` ``[B, T, H]`` (the tensor itself, or ``state["hidden"]``) and gives logits
    ``[B, num_classes]``. ``pool="cls"`` takes token 0; ``pool="mean"`` averages the tokens, only
    those where ``state["attention_mask"]`` (``[B, T]``, nonzero = real token) is set when the state
    has one.
    """

    def __init__(self, hidden_size: int, num_classes: int, pool: Literal["cls", "mean"] = "cls") -> None:
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        self.pool = pool
        self.norm = nn.LayerNorm(hidden_size)
        self.fc = nn.Linear(hidden_size, num_classes)

    def forward(self, state: torch.Tensor | Mapping[str, Any]) -> torch.Tensor:
        hidden = state["hidden"] if isinstance(state, Mapping) else state
        if self.pool == "cls":
            pooled = hidden[:, 0]
        else:
            mask = state.get("attention_mask") if isinstance(state, Mapping) else None
            if mask is None:
                pooled = hidden.mean(1)
            else:
                weight = (mask != 0).to(hidden.dtype).unsqueeze(-1)
                pooled = (hidden * weight).sum(1) / weight.sum(1).clamp_min(1)
        return self.fc(self.norm(pooled))


def pooled_linear_head(num_classes: int) -> Callable[[torch.Tensor], nn.Module]:
    """A head factory: from a stage's example output ``[B, D, ...]`` build global average pooling
    over the trailing dims and ``Linear(D, num_classes)``, on the output's device and, for a
    floating output, in its dtype (a bfloat16 stage gets a bfloat16 head)."""

    def factory(output: torch.Tensor) -> nn.Module:
        if not isinstance(output, torch.Tensor) or output.ndim < 2:
            raise TypeError("pooled_linear_head needs stage outputs that are tensors [B, D, ...]; give heads explicitly")
        pool = nn.Flatten(2) if output.ndim > 2 else nn.Identity()
        head = nn.Sequential(pool, _MeanTrailing(), nn.Linear(output.shape[1], num_classes))
        dtype = output.dtype if output.is_floating_point() else None
        return head.to(device=output.device, dtype=dtype)

    return factory


class _MeanTrailing(nn.Module):
    """``[B, D, L] -> [B, D]`` (mean over ``L``); ``[B, D]`` passes through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(2) if x.ndim == 3 else x
