"""Confidence features of one exit: the pure-PyTorch reference (and oracle of the fused kernel).

For logits ``z`` of one exit, rows ``[N, C]``:

* ``p = softmax(z)``, computed in float32 whatever the input dtype (float64 rows are first shifted
  by their maximum, so logits of 1e40 stay finite); in the entropy, ``log p`` is clamped at
  float32's lowest, so a class ``3e38`` below the best counts as ``p = 0``: every feature of a
  finite row is finite;
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

__all__ = ["ExitFeatures", "exit_features", "top_class"]


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
    log_probs, probs = _softmax(logits)
    max_score, prediction = probs.max(dim=-1)
    # p log p -> 0 as p -> 0: tiny * log(tiny) == 0 in fp32, and the clamp turns 0 * -inf (a class
    # more than float32's range below the best) into 0 too. sum p log p = -H, so 1 - H / log C is
    # (sum p log p) / log C + 1, in place: two ops fewer at every exit, the same bits
    plogp = (probs * log_probs.clamp_min(torch.finfo(torch.float32).min)).sum(-1)
    entropy_conf = plogp.div_(math.log(logits.shape[1])).add_(1.0)
    return ExitFeatures(probs, max_score, entropy_conf, prediction)


def top_class(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(max_score, prediction)`` of :func:`exit_features`, both ``[N]`` (float32, int64), without
    the entropy: what the last exit, where nothing is decided, needs."""
    return _softmax(logits)[1].max(dim=-1)


def _softmax(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p, p)``, both ``[N, C]`` float32, of logits ``[N, C]`` checked for their shape."""
    if logits.ndim != 2:
        raise InputError(f"expected logits of shape [N, C], got {tuple(logits.shape)}")
    if logits.shape[1] < 2:
        raise InputError(f"need at least 2 classes, got C={logits.shape[1]}")
    if logits.dtype == torch.float64:  # shift in float64: its rows may not fit float32
        logits = logits - logits.amax(dim=-1, keepdim=True)
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return log_probs, log_probs.exp()
