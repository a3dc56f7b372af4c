"""What a user measures: adaptive inference against the full model, timed in interleaved rounds.

Each round runs the full model over all the batches, then the adaptive model over the same batches,
so a slow spell of a shared machine slows both sides of one round and cancels in its ratio. The
time share is the median of the rounds' ratios, the figure a time budget promises
(:func:`eenet_fast.timing.measure_shares` predicts the same median). The best of a few passes of
each side timed one after the other reads low and scatters: the demo's policy at budget 0.5, five
measurements of each in one process: 0.453-0.490, against 0.482-0.490 for the median of five
interleaved rounds (the adaptive side's time varies more, so its best lies further below its median).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from eenet_fast.errors import InputError
from eenet_fast.timing import synchronizer

__all__ = ["Speed", "measure_speed"]


@dataclass(frozen=True)
class Speed:
    """Adaptive against full time over ``rounds`` interleaved rounds.

    Attributes:
        share: median over the rounds of adaptive / full time: the time share served.
        share_iqr: interquartile range of the rounds' shares (0 for one round).
        full_s: median seconds of one pass of the full model.
        adaptive_s: median seconds of one adaptive pass.
        rounds: timed rounds.
    """

    share: float
    share_iqr: float
    full_s: float
    adaptive_s: float
    rounds: int

    @property
    def speedup(self) -> float:
        """How many times faster adaptive inference ran: ``1 / share``."""
        return 1.0 / self.share


def median_iqr(values: Sequence[float]) -> tuple[float, float]:
    """The median of per-round ``values`` (at least one) and their interquartile range (the
    ``statistics.quantiles`` quartiles; 0 for one value): how :func:`measure_speed` and the pytest
    plugin report a time share."""
    if len(values) == 1:
        return float(values[0]), 0.0
    q1, _, q3 = statistics.quantiles(values, n=4)
    return float(statistics.median(values)), float(q3 - q1)


def measure_speed(
    adaptive: Callable[[], Any], full: Callable[[], Any], *, rounds: int = 5, warmup: int = 1,
    device: torch.device | str = "cpu",
) -> tuple[Speed, Any]:
    """Time ``full()`` then ``adaptive()`` in each of ``warmup`` untimed and ``rounds`` timed rounds.

    Args:
        adaptive: one pass of adaptive inference (e.g. the model over every batch).
        full: the same pass through the full model.
        rounds: timed rounds (at least 1).
        warmup: untimed rounds first (allocations, caches and lazy initialisation).
        device: where the work runs; on CUDA the clock waits for its queued work.

    Returns:
        The :class:`Speed`, and what the last ``adaptive()`` call returned.

    Raises:
        InputError: ``rounds < 1`` or ``warmup < 0``.
    """
    if rounds < 1 or warmup < 0:
        raise InputError(f"need rounds >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}")
    sync = synchronizer(torch.device(device))
    full_s: list[float] = []
    adaptive_s: list[float] = []
    last = None
    with torch.no_grad():
        for r in range(warmup + rounds):
            sync()
            start = time.perf_counter()
            full()
            sync()
            middle = time.perf_counter()
            last = adaptive()
            sync()
            if r >= warmup:
                full_s.append(middle - start)
                adaptive_s.append(time.perf_counter() - middle)
    median, iqr = median_iqr([a / f for a, f in zip(adaptive_s, full_s)])
    speed = Speed(share=median, share_iqr=iqr, full_s=statistics.median(full_s),
                  adaptive_s=statistics.median(adaptive_s), rounds=rounds)
    return speed, last
