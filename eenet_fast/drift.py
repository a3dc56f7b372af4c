"""Drift streams from cached exit outputs: the input mix moves to the classes the early exits find
hardest, stays there, and moves back, to measure running cost and accuracy with and without a
:class:`~eenet_fast.control.BudgetController`.

A stream is a sequence of sample indices into the outputs (drawn with replacement, seeded). At each
position the share of samples from the hard classes follows a schedule: their natural share, a
linear ramp up to ``peak``, a plateau, a ramp back down, the natural share again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from eenet_fast.outputs import ExitOutputs
from eenet_fast.policies.base import Policy
from eenet_fast.policies.thresholds import assign_exits

if TYPE_CHECKING:
    from eenet_fast.control import BudgetController

__all__ = ["DriftStream", "Replay", "class_difficulty", "hardest_classes", "drift_stream", "replay", "running_mean"]

PHASES = (0.2, 0.1, 0.4, 0.1, 0.2)  # calm, ramp up, plateau, ramp down, calm: shares of the stream


@dataclass(frozen=True)
class DriftStream:
    """A drifting order of samples.

    Attributes:
        indices: ``[L]`` int64 sample indices into the outputs the stream was drawn from.
        hard_share: ``[L]`` float64 target share of hard-class samples at each position.
        hard_classes: ``[H]`` int64 the over-represented classes.
    """

    indices: torch.Tensor
    hard_share: torch.Tensor
    hard_classes: torch.Tensor

    def __len__(self) -> int:
        return self.indices.numel()


def class_difficulty(outputs: ExitOutputs) -> torch.Tensor:
    """``[C]`` float64 error rate of the early exits (all but the last; the only one when ``K = 1``)
    on the samples of each true class, averaged over those exits; NaN for a class without samples."""
    correct = outputs.correct
    early = correct[:-1] if outputs.num_exits > 1 else correct
    errors = (~early).double().mean(0)  # [N]
    labels = outputs.require_labels()
    totals = torch.bincount(labels, weights=errors, minlength=outputs.num_classes)
    counts = torch.bincount(labels, minlength=outputs.num_classes).double()
    return totals / counts


def hardest_classes(outputs: ExitOutputs, count: int) -> torch.Tensor:
    """``[count]`` int64: the classes whose samples the early exits get wrong most, hardest first."""
    if not 1 <= count < outputs.num_classes:
        raise ValueError(f"count must lie in [1, {outputs.num_classes - 1}] (some classes must stay easy), got {count}")
    difficulty = torch.nan_to_num(class_difficulty(outputs), nan=-1.0)  # absent classes are never chosen
    return torch.argsort(difficulty, descending=True, stable=True)[:count]


def _schedule(length: int, base: float, peak: float) -> torch.Tensor:
    """``[length]`` float64 share: ``base``, ramp to ``peak``, ``peak``, ramp to ``base``, ``base``."""
    edges = torch.tensor(PHASES, dtype=torch.float64).cumsum(0) * length
    t = torch.arange(length, dtype=torch.float64) + 0.5
    up = ((t - edges[0]) / (edges[1] - edges[0])).clamp(0, 1)
    down = ((t - edges[2]) / (edges[3] - edges[2])).clamp(0, 1)
    return base + (peak - base) * (up - down)


def drift_stream(
    outputs: ExitOutputs,
    length: int,
    *,
    hard_classes: torch.Tensor | None = None,
    num_hard: int | None = None,
    peak: float = 0.8,
    seed: int = 0,
) -> DriftStream:
    """A seeded stream of ``length`` sample indices whose class mix drifts to the hard classes and back.

    Args:
        outputs: labelled exit outputs to draw from.
        length: samples in the stream.
        hard_classes: the classes to over-represent (default: the ``num_hard`` of :func:`hardest_classes`).
        num_hard: how many (default ``C // 3``, at least 1).
        peak: share of hard-class samples on the plateau (their natural share before and after).
        seed: the same seed gives the same stream.
    """
    labels = outputs.require_labels()
    if hard_classes is None:
        hard_classes = hardest_classes(outputs, num_hard or max(1, outputs.num_classes // 3))
    hard_classes = torch.as_tensor(hard_classes, dtype=torch.long)
    is_hard = torch.isin(labels, hard_classes)
    hard, easy = is_hard.nonzero().squeeze(1), (~is_hard).nonzero().squeeze(1)
    if not hard.numel() or not easy.numel():
        raise ValueError(
            f"the outputs need samples of both the hard classes {hard_classes.tolist()} and the others to drift between"
        )
    if not 0 <= peak <= 1:
        raise ValueError(f"peak is a share of samples in [0, 1], got {peak}")
    share = _schedule(length, float(is_hard.double().mean()), peak)
    g = torch.Generator().manual_seed(seed)
    from_hard = torch.rand(length, generator=g, dtype=torch.float64) < share
    pick_hard = hard[torch.randint(hard.numel(), (length,), generator=g)]
    pick_easy = easy[torch.randint(easy.numel(), (length,), generator=g)]
    return DriftStream(torch.where(from_hard, pick_hard, pick_easy), share, hard_classes)


def running_mean(values: torch.Tensor, window: int) -> torch.Tensor:
    """``[L - window + 1]`` float64 means of every ``window`` consecutive values of ``values [L]``."""
    if not 1 <= window <= values.numel():
        raise ValueError(f"window must lie in [1, {values.numel()}], got {window}")
    sums = torch.cat([torch.zeros(1, dtype=torch.float64), values.double().cumsum(0)])
    return (sums[window:] - sums[:-window]) / window


@dataclass(frozen=True)
class Replay:
    """What a policy did on a stream: ``costs [L]`` float64, ``correct [L]`` bool, ``exits [L]`` int64."""

    costs: torch.Tensor
    correct: torch.Tensor
    exits: torch.Tensor


def replay(
    policy: Policy,
    outputs: ExitOutputs,
    indices: torch.Tensor,
    batch_size: int = 64,
    controller: BudgetController | None = None,
) -> Replay:
    """Serve the samples ``indices`` of ``outputs`` in batches, offline: each batch takes the exits the
    runtime would (the policy's scores against its thresholds, or the controller's, which then
    observes the batch's exits)."""
    scores = policy.exit_scores(outputs)  # [K, N], computed once: a sample's scores do not depend on its batch
    exits = torch.empty(indices.numel(), dtype=torch.long)
    for start in range(0, indices.numel(), batch_size):
        idx = indices[start : start + batch_size]
        thresholds = policy.thresholds if controller is None else controller.thresholds()
        exits[start : start + idx.numel()] = assign_exits(scores[:, idx], thresholds)
        if controller is not None:
            controller.observe(exits[start : start + idx.numel()])
    correct = outputs.correct[exits, indices]
    return Replay(policy.costs.double()[exits], correct, exits)
