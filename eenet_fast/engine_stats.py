"""Live statistics of an :class:`~eenet_fast.engine.ExitEngine`: batch sizes per stage, exit mix,
running average cost against the budget, latency percentiles. Thread-safe; the engine's worker
records, any thread reads a :meth:`EngineStats.snapshot`."""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any

__all__ = ["EngineStats", "percentile"]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values`` by linear interpolation (NaN when empty)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


class EngineStats:
    """Counters since the engine started, and latencies of the last ``window`` samples answered.

    Args:
        costs: ``[K]`` cumulative cost of each exit (the policy's costs).
        budget: the average cost per sample the policy was fitted for (``None`` if unknown).
        window: how many recent sample latencies the percentiles are taken over.
    """

    def __init__(self, costs: Sequence[float], budget: float | None, window: int = 20_000) -> None:
        self.costs = [float(c) for c in costs]
        self.budget = budget
        num_exits = len(self.costs)
        self._lock = threading.Lock()
        self._steps = [0] * num_exits
        self._rows = [0] * num_exits
        self._exits = [0] * num_exits
        self._cost = 0.0
        self._requests = {"accepted": 0, "answered": 0, "failed": 0, "rejected": 0}
        self._latency: deque[tuple[int, float]] = deque(maxlen=window)

    def step(self, stage: int, rows: int) -> None:
        """Stage ``stage`` ran on a batch of ``rows`` samples."""
        with self._lock:
            self._steps[stage] += 1
            self._rows[stage] += rows

    def request(self, outcome: str, count: int = 1) -> None:
        """Count requests by outcome: ``accepted``, ``answered``, ``failed`` or ``rejected``."""
        with self._lock:
            self._requests[outcome] += count

    def answered(self, exits: Sequence[Sequence[int]], latencies_s: Sequence[float]) -> None:
        """Requests were answered: request ``i``'s samples left at ``exits[i]`` after ``latencies_s[i]`` seconds."""
        with self._lock:
            self._requests["answered"] += len(exits)
            for request, latency in zip(exits, latencies_s):
                for k in request:
                    self._exits[k] += 1
                    self._cost += self.costs[k]
                    self._latency.append((k, latency))

    def running_cost(self) -> tuple[float | None, float | None]:
        """``(average cost per answered sample, its ratio to the budget)``; ``None`` before any answer."""
        with self._lock:
            samples, cost = sum(self._exits), self._cost
        if not samples:
            return None, None
        return cost / samples, cost / samples / self.budget if self.budget else None

    def snapshot(self, queues: Sequence[int] = ()) -> dict[str, Any]:
        """A JSON-ready view: ``requests`` (counts by outcome), ``samples`` (answered),
        ``stages`` (per stage: ``steps``, ``mean_batch``, ``queue``), ``exit_counts``, ``exit_mix``,
        ``avg_cost``, ``budget``, ``cost_over_budget`` and ``latency_ms`` (``p50``, ``p90``,
        ``p99``, and ``by_exit``: the same per exit), over the last ``window`` samples; ``None``
        where nothing was measured yet."""
        with self._lock:
            steps, rows, exits = list(self._steps), list(self._rows), list(self._exits)
            cost, requests, latency = self._cost, dict(self._requests), list(self._latency)
        samples = sum(exits)
        avg_cost = cost / samples if samples else None
        stages = [
            {"steps": s, "mean_batch": r / s if s else None, "queue": queues[k] if k < len(queues) else 0}
            for k, (s, r) in enumerate(zip(steps, rows))
        ]

        def summary(values: list[float]) -> dict[str, float | None]:
            return {f"p{q}": 1000 * percentile(values, q) if values else None for q in (50, 90, 99)}

        by_exit = [summary([t for e, t in latency if e == k]) for k in range(len(exits))]
        return {
            "requests": requests,
            "samples": samples,
            "stages": stages,
            "exit_counts": exits,
            "exit_mix": [e / samples if samples else None for e in exits],
            "avg_cost": avg_cost,
            "budget": self.budget,
            "cost_over_budget": avg_cost / self.budget if self.budget and samples else None,
            "latency_ms": {**summary([t for _, t in latency]), "by_exit": by_exit},
        }
