"""The threshold machinery every policy shares: budgets, the exit a score picks, the sequential
quantile walk that turns exit fractions into thresholds, and the exponential tilt of an exit mix
that meets a budget exactly on validation.

A sample leaves at the first exit ``k`` with ``q_k >= T_k``; the last exit has ``T_K = -inf`` and
takes everything left.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from eenet_fast.errors import BudgetError

__all__ = [
    "resolve_budget",
    "parse_budget",
    "assign_exits",
    "exit_mix",
    "average_cost",
    "thresholds_for_fractions",
    "midpoint",
    "tilt",
    "fit_fractions_to_budget",
    "best_over_bases",
    "random_bases",
]


def resolve_budget(budget: float | str, costs: torch.Tensor) -> float:
    """Turn a budget into an absolute average cost per sample and check that it is feasible.

    Args:
        budget: an average cost in the unit of ``costs``, or a fraction of the last exit's cost
            written as a string: ``"0.5x"`` or ``"50%"``.
        costs: ``[K]`` cumulative exit costs.

    Raises:
        BudgetError: the budget cannot be read, is not finite, or is below the cheapest exit's cost
            (no policy can meet it).
    """
    value = parse_budget(budget, float(costs[-1]))
    smallest = float(costs[0])
    if value < smallest:
        raise BudgetError(
            f"budget {value:.6g} is below the cost of the first exit ({smallest:.6g}); no policy can meet it. "
            f"The smallest feasible budget is {smallest:.6g} (every sample leaves at exit 1)"
        )
    return value


def parse_budget(budget: float | str, full_cost: float) -> float:
    """A budget as an average cost: a number, or a string ``"0.3"``, ``"0.5x"`` or ``"50%"`` (the last
    two of ``full_cost``, the last exit's cost). Raises :class:`BudgetError` unless it is a finite number."""
    scale, number = 1.0, budget
    if isinstance(budget, str):
        number = budget.strip()
        if number.endswith("%"):
            scale, number = full_cost / 100, number[:-1]
        elif number.endswith("x"):
            scale, number = full_cost, number[:-1]
    try:
        if isinstance(number, bool):
            raise TypeError("a bool is not a budget")
        value = float(number) * scale
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several numbers
        raise BudgetError(
            f"cannot read budget {budget!r}: give a number (absolute cost) or a fraction of the full "
            "cost such as '0.5x' or '50%'"
        ) from None
    if not math.isfinite(value):
        raise BudgetError(f"budget must be a finite number, got {budget!r}")
    return value


def assign_exits(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """First exit whose score reaches its threshold.

    Args:
        scores: ``[K, N]`` scores ``q_k`` of every sample at every exit.
        thresholds: ``[K]`` thresholds; the last one is ignored (the last exit takes all).

    Returns:
        ``[N]`` int64 exit index in ``[0, K)``.
    """
    num_exits, n = scores.shape
    exits = torch.full((n,), num_exits - 1, dtype=torch.long, device=scores.device)
    for k in reversed(range(num_exits - 1)):
        exits = torch.where(scores[k].float() >= thresholds[k].float(), k, exits)
    return exits


def exit_mix(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """``[K]`` float64: the share of the samples leaving at each exit under ``thresholds`` (see
    :func:`assign_exits`; all zeros for no samples)."""
    num_exits, n = scores.shape
    return torch.bincount(assign_exits(scores, thresholds), minlength=num_exits).double() / max(n, 1)


def average_cost(exits: torch.Tensor, costs: torch.Tensor) -> float:
    """Mean of ``costs[exits]`` (0 for an empty set)."""
    return float(costs.to(exits.device)[exits].mean()) if exits.numel() else 0.0


def thresholds_for_fractions(scores: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """The sequential quantile walk: thresholds that send ``floor(fractions[k] * N)`` samples to exit ``k``.

    Walk the exits in order; among the samples still running, the ``n_k`` highest scores leave. The
    threshold sits halfway between the last score that leaves and the first that stays, so a sample's
    decision does not hinge on the last bit of its score (ties all leave).

    Args:
        scores: ``[K, N]`` scores.
        fractions: ``[K]`` target exit fractions of all ``N`` samples (the last is implied).

    Returns:
        ``[K]`` float32 thresholds, ``T_K = -inf``.
    """
    num_exits, n = scores.shape
    scores = scores.float()
    thresholds = torch.full((num_exits,), -math.inf, dtype=torch.float32)
    running = torch.ones(n, dtype=torch.bool)
    for k in range(num_exits - 1):
        remaining = scores[k][running]
        take = min(int(math.floor(float(fractions[k]) * n + 1e-9)), remaining.numel())
        if take == 0:
            thresholds[k] = math.inf
            continue
        if take == remaining.numel():
            thresholds[k] = -math.inf
        else:
            top = torch.sort(remaining, descending=True).values
            thresholds[k] = midpoint(top[take - 1], top[take])
        running &= ~(scores[k] >= thresholds[k])
    return thresholds


def midpoint(high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """A float32 threshold ``t`` with ``low < t <= high`` (``t == high`` when they are equal or adjacent).

    The mean is taken in float64 and rounded up to float32, so ``q >= t`` in float32 means exactly
    ``q >= (high + low) / 2``.
    """
    mid = (high.double() + low.double()) / 2
    t = mid.float()
    if t.double() < mid:
        t = torch.nextafter(t, torch.tensor(math.inf))
    return t


def tilt(base: torch.Tensor, log_s: float) -> torch.Tensor:
    """Exponential tilt of exit fractions: ``f_k proportional to base_k * s^k``."""
    k = torch.arange(base.numel(), dtype=torch.float64)
    logits = torch.log(base.double().clamp_min(1e-12)) + log_s * k
    return torch.softmax(logits, 0)


def fit_fractions_to_budget(
    scores: torch.Tensor,
    base: torch.Tensor,
    costs: torch.Tensor,
    budget: float,
    iterations: int = 40,
) -> torch.Tensor:
    """Thresholds from exit fractions ``base`` tilted towards later exits as far as the budget allows.

    The fractions ``f_k proportional to base_k * s^k`` move mass to later (dearer) exits as ``s``
    grows; a bisection on ``log s`` finds the largest ``s`` whose quantile-walk thresholds keep the
    average cost over these samples at or below ``budget``. ``base`` uniform gives MSDNet's geometric
    exit mix.

    Returns:
        ``[K]`` float32 thresholds whose average cost on ``scores``' samples is ``<= budget``.
    """

    def walk(log_s: float) -> tuple[torch.Tensor, float]:
        thresholds = thresholds_for_fractions(scores, tilt(base, log_s))
        return thresholds, average_cost(assign_exits(scores, thresholds), costs)

    hi_t, hi_cost = walk(40.0)
    if hi_cost <= budget:
        return hi_t
    lo, hi = -40.0, 40.0
    lo_t, lo_cost = walk(lo)
    if lo_cost > budget:  # only ties can do this: every sample scores the same; send all to exit 1
        return torch.full_like(lo_t, -math.inf)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        t, cost = walk(mid)
        if cost <= budget:
            lo, lo_t = mid, t
        else:
            hi = mid
    return lo_t


def best_over_bases(
    scores: torch.Tensor,
    correct: torch.Tensor,
    costs: torch.Tensor,
    budget: float,
    bases: Sequence[torch.Tensor],
    levels: Sequence[float] = (1.0,),
) -> tuple[torch.Tensor, float]:
    """Fit each base exit mix to the budget and keep the most accurate on these samples.

    Args:
        scores: ``[K, N]`` scores; ``correct``: ``[K, N]`` float, exit ``k`` right on sample ``n``.
        bases: ``[K]`` exit-fraction vectors (see :func:`fit_fractions_to_budget`).
        levels: shares of the budget's slack above the first exit's cost to try spending: more
            compute is not always more accurate (a later exit can be worse than an earlier one).

    Returns:
        The thresholds of the best (base, level) (ties: the lower cost) and its accuracy.
    """
    best: tuple[float, float, torch.Tensor] | None = None
    floor = float(costs[0])
    for base in bases:
        for level in levels:
            thresholds = fit_fractions_to_budget(scores, base, costs, floor + level * (budget - floor))
            exits = assign_exits(scores, thresholds)
            key = (float(correct.gather(0, exits[None]).mean()), -average_cost(exits, costs), thresholds)
            if best is None or key[:2] > best[:2]:
                best = key
    return best[2], best[0]


def random_bases(around: torch.Tensor, count: int, scale: float, generator: torch.Generator) -> list[torch.Tensor]:
    """``count`` exit mixes ``softmax(log(around) + scale * noise)``, noise standard normal."""
    log_base = torch.log(around.double().clamp_min(1e-6))
    return [
        torch.softmax(log_base + scale * torch.randn(around.numel(), generator=generator, dtype=torch.float64), 0)
        for _ in range(count)
    ]
