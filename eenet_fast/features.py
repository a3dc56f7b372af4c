"""Confidence features of one exit: the pure-PyTorch reference (and oracle of the fused kernel).

For logits ``z`` of one exit, rows ``[N, C]``:

* ``p = softmax(z)``, computed in float32 whatever the input dtype, after shifting each row by its
  maximum in the input's precision (float64 logits of 1e40 stay finite) and clamping the shifted
  values at float32's lowest (a class ``3e38`` below the best has ``p = 0`` and ``log p`` finite),
  so every feature of a finite row is finite;
* ``m = max_c p_c``: the maximum score, in ``[1/C, 1]``;
* ``e = 1 - H(p) / log C`` with ``H(p) = -sum_c p_c log p_c`` (``0 log 0 = 0``): the entropy
  confidence, 1 for a one-hot ``p`` and 0 for the uniform distribution;
* ``prediction = argmax_c z_c`` (the first index among ties).

Everything is vectorised over rows; no Python loop over samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from eenet_fast.errors import InputError

__all__ = ["ExitFeatures", "exit_features"]


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


def exit_features(logits: torch.Tensor) -> ExitFeatures:
    """Compute the confidence features of one exit.

    Args:
        logits: ``[N, C]`` logits, any floating dtype, any strides.

    Returns:
        :class:`ExitFeatures` with float32 tensors on ``logits``' device.
    """
    if logits.ndim != 2:
        raise InputError(f"expected logits of shape [N, C], got {tuple(logits.shape)}")
    num_classes = logits.shape[1]
    if num_classes < 2:
        raise InputError(f"need at least 2 classes, got C={num_classes}")
    log_probs = torch.log_softmax(_shifted(logits), dim=-1)
    probs = log_probs.exp()
    max_score, prediction = probs.max(dim=-1)
    entropy = -(probs * log_probs).sum(-1)  # p log p -> 0 as p -> 0, and tiny * log(tiny) == 0 in fp32
    entropy_conf = 1.0 - entropy / math.log(num_classes)
    return ExitFeatures(probs, max_score, entropy_conf, prediction)


def _shifted(logits: torch.Tensor) -> torch.Tensor:
    """``z - max_c z`` per row as float32, at least float32's lowest value: the same softmax as ``z``
    (for float32 rows bit for bit what ``log_softmax`` computes internally), finite for any finite row."""
    wide = logits if logits.dtype == torch.float64 else logits.float()
    return (wide - wide.amax(dim=-1, keepdim=True)).float().clamp_min(torch.finfo(torch.float32).min)
