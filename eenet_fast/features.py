"""Confidence features of one exit: the pure-PyTorch reference (and oracle of the fused kernel).

For logits ``z`` of one exit, rows ``[N, C]``:

* ``p = softmax(z)``, computed in float32 whatever the input dtype;
* ``m = max_c p_c``: the maximum score, in ``[1/C, 1]``;
* ``e = 1 - H(p) / log C`` with ``H(p) = -sum_c p_c log p_c`` (``0 log 0 = 0``): the entropy
  confidence, 1 for a one-hot ``p`` and 0 for the uniform distribution;
* ``prediction = argmax_c z_c`` (the first index among ties).

Across exits, :func:`agreement` gives ``v_k``: the share of exits ``1..k`` whose prediction equals
exit ``k``'s (1 when every earlier exit agrees, ``1/k`` when none does).

Everything is vectorised over rows; no Python loop over samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["ExitFeatures", "exit_features", "agreement"]


@dataclass(frozen=True)
class ExitFeatures:
    """Features of one exit for ``N`` samples.

    Attributes:
        probs: ``[N, C]`` float32 softmax probabilities.
        max_score: ``[N]`` float32, ``max_c p_c``.
        entropy_conf: ``[N]`` float32, ``1 - H(p) / log C``.
        prediction: ``[N]`` int64, ``argmax_c p_c``.
    """

    probs: torch.Tensor
    max_score: torch.Tensor
    entropy_conf: torch.Tensor
    prediction: torch.Tensor


def exit_features(scores: torch.Tensor, *, is_probs: bool = False) -> ExitFeatures:
    """Compute the confidence features of one exit.

    Args:
        scores: ``[N, C]`` logits (or probabilities when ``is_probs``), any floating dtype, any strides.
        is_probs: ``scores`` already holds probabilities (rows summing to 1).

    Returns:
        :class:`ExitFeatures` with float32 tensors on ``scores``' device.
    """
    if scores.ndim != 2:
        raise ValueError(f"expected scores of shape [N, C], got {tuple(scores.shape)}")
    num_classes = scores.shape[1]
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes, got C={num_classes}")
    x = scores.float()
    if is_probs:
        probs = x
        log_probs = torch.log(probs.clamp_min(torch.finfo(torch.float32).tiny))
    else:
        log_probs = torch.log_softmax(x, dim=-1)
        probs = log_probs.exp()
    max_score, prediction = probs.max(dim=-1)
    entropy = -(probs * log_probs).sum(-1)  # p log p -> 0 as p -> 0, and tiny * log(tiny) == 0 in fp32
    entropy_conf = 1.0 - entropy / math.log(num_classes)
    return ExitFeatures(probs, max_score, entropy_conf, prediction)


def agreement(predictions: torch.Tensor) -> torch.Tensor:
    """Share of exits ``1..k`` that agree with exit ``k``, for every exit ``k``.

    Args:
        predictions: ``[K, N]`` int64 predictions of exits ``1..K``.

    Returns:
        ``[K, N]`` float32; row ``k`` is ``v_k = (1/k) * sum_{j<=k} [pred_j == pred_k]`` (1-based ``k``).
    """
    if predictions.ndim != 2:
        raise ValueError(f"expected predictions of shape [K, N], got {tuple(predictions.shape)}")
    num_exits = predictions.shape[0]
    same = predictions.unsqueeze(0) == predictions.unsqueeze(1)  # [k, j, N]: pred_j == pred_k
    lower = torch.ones(num_exits, num_exits, dtype=torch.bool, device=predictions.device).tril()
    counts = (same & lower.unsqueeze(-1)).sum(1).float()
    return counts / torch.arange(1, num_exits + 1, device=predictions.device, dtype=torch.float32).unsqueeze(1)
