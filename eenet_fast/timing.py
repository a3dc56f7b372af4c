"""Time as a function of batch size, so that a time budget holds at the batch size a model serves.

:func:`time_exits` times, on a ladder of batch sizes ``1, 2, 4, ..., n`` (``n`` the serving
batch), the full model (every stage, then the last head) and each exit's *step* as
:meth:`EarlyExitModel.forward` runs it: stage ``k``, head ``k``, the exit decision, the writes of
the leaving rows and the compaction after it (exit 0 also carries what ``forward`` does around
the steps: its checks, allocations and result), timed inside real forwards. The rounds are interleaved
(per round: every size in a shuffled order, the full model then the exits), so a busy spell slows
the model and its exits alike; each timing follows an untimed call of the same work (memory and
caches as in serving, batch after batch); each forward keeps the smallest time over the rounds (a
busy machine only adds time), a step is the difference of two such forwards (never negative: a step
too small to tell from the noise reads 0), and the spread of the rounds is recorded. On one CPU
thread the clock is the thread's CPU time, which time given to other processes does not enter;
with more threads, a machine busy with other processes is found by the CPU time the timing thread
got (:attr:`LatencyModel.cpu_share`) and the ladder is timed again on one thread.

:class:`LatencyModel` holds those times. A step's time ``t_k(m)`` on ``m`` rows is interpolated
linearly between the timed sizes (``t_k(0) = 0``: a stage no sample reaches does not run; the
times are made non-decreasing in ``m``). At batch ``n``, with ``n_k`` samples reaching stage
``k``, adaptive inference takes ``sum_k t_k(n_k)``, against ``T(n)`` for the full model. The
compaction in each step is also timed apart (``compact_times``): where few samples leave an exit,
gathering the others can cost more than running the leavers through the next stage, and
:meth:`LatencyModel.plan` chooses, per exit, the cheaper (the leavers then ride on to the next
compaction, and stage ``k`` runs on the rows kept by the last compaction before it).

A policy is fitted with one cost per exit, so :meth:`LatencyModel.costs` prices each stage around
the rows that reach it, ``m_k = reach_k * n`` (stage 0 always runs on all ``n``). By default at the
margin: on the interpolation segment holding ``m_k``, ``t_k(m) = a_k + b_k m``; a sample pays ``b_k``
for each stage it runs and every sample pays its share of the fixed parts, so exit ``k`` costs
``c_k = (t_0(n) + sum_{j >= 1} a_j + n * sum_{1 <= j <= k} b_j) / T(n)``: a policy's average cost
is its predicted share of the full model's time at batch ``n``, exact for the reach priced at,
and the exit mix is chosen on what one more sample at a stage really costs there. With
``marginal=False`` a sample pays the stage's *average* ``t_k(m_k) / m_k`` instead, so ``c_0`` is
the smallest feasible budget ``t_0(n) / T(n)`` (used when the fixed parts leave no room, and for a
stage whose segment there rises faster than proportionally, where the fixed part would be negative).
:func:`eenet_fast.calibration.calibrate` fits around a reach guessed from the budget, then
around the last policy's reach (a bounded number of fits, aiming lower while the model predicts
more than the budget); finally :func:`measure_shares` times whole adaptive forwards against the full
model on the example batch, with the policy and with every sample leaving at the first exit, back to
back in each round, and the two factors that make the model predict both shares scale the first exit's step
(``LatencyModel.first_correction``) and the later ones (``LatencyModel.correction``: what the steps
timed apart miss) before those fits are repeated (the first of them is measured once before any fit
too: the smallest feasible budget; and the refit policy is measured again, see
:func:`eenet_fast.calibration.calibrate`).
"""

from __future__ import annotations

import copy
import math
import random
import statistics
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

import torch
from tqdm.auto import tqdm

from eenet_fast.backends import select_backend
from eenet_fast.batch import batch_size as batch_size_of, map_batch, move_to
from eenet_fast.errors import InputError
from eenet_fast.policies import ExitHistory, Policy, make_policy
from eenet_fast.threads import torch_threads

if TYPE_CHECKING:
    from eenet_fast.runtime import EarlyExitModel

__all__ = ["LatencyModel", "clock", "ladder", "time_exits", "measure_shares", "measure_floors", "decision_times", "leaving_first"]


def ladder(batch_size: int) -> tuple[int, ...]:
    """The batch sizes timed for a serving batch of ``batch_size``: ``1, 2, 4, ...`` below it, and it."""
    if batch_size < 1:
        raise InputError(f"batch_size must be a positive number of samples, got {batch_size}")
    sizes = [1 << i for i in range(batch_size.bit_length()) if 1 << i < batch_size]
    return (*sizes, batch_size)


@dataclass(frozen=True)
class LatencyModel:
    """Measured times of a model's exits by batch size (see the module doc).

    Attributes:
        batch_sizes: the ladder ``[L]`` of batch sizes timed, increasing (the last is the serving batch).
        exit_times: ``[K, L]`` float64 seconds, best time of each exit's step at each batch size.
        full_times: ``[L]`` float64 seconds, best time of the full model.
        spread: ``[K + 1, L]`` float64, interquartile range over the rounds / median (the exits,
            then the full model): how much the machine disturbed each point.
        correction: a factor on the steps of the later exits (all of them, with ``first_correction``
            ``None``), from timing whole adaptive forwards against the full model
            (:func:`measure_shares`): what the steps timed apart miss.
        first_correction: the factor on the first exit's step (``None``: ``correction``), from
            timing forwards in which every sample leaves there. Apart, the two errors differ: demo
            CNN, batch 256, two threads, the ladder priced the first step 3-9 % high and the second
            stage, which in a real forward follows a first stage on the whole batch, about a third low.
        threads: the CPU threads torch ran on while timing (one when the machine was busy).
        cpu_share: the CPU time the timing thread got over the wall time while timing (1.0 when
            the threads had their cores to themselves, and off the CPU); below
            :data:`BUSY_CPU_SHARE` other work competed for the cores.
        compact_times: ``[K, L]`` float64 seconds of the compaction after each exit (of half the
            rows; 0 after the last), part of ``exit_times``; ``None`` when not timed apart (every
            plan compacts after every exit).
        compact_after: the compaction plan the runtime follows, one flag per exit before the last
            (``None``: compact after every exit). Where it is false, the rows leaving there are not
            gathered out: they ride along to the next compaction, their results already written
            (:meth:`plan` chooses it).
        floors: ``(batch size, share)`` pairs: the smallest feasible time budget measured in whole
            forwards at batch sizes other than the serving one (:func:`measure_floors`); empty when
            not measured (:meth:`smallest_budgets` then predicts them).
    """

    batch_sizes: tuple[int, ...]
    exit_times: torch.Tensor
    full_times: torch.Tensor
    spread: torch.Tensor
    correction: float = 1.0
    threads: int = 1
    cpu_share: float = 1.0
    first_correction: float | None = None
    compact_times: torch.Tensor | None = None
    compact_after: tuple[bool, ...] | None = None
    floors: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        sizes, num_sizes = self.batch_sizes, len(self.batch_sizes)
        if not sizes or list(sizes) != sorted(set(sizes)) or sizes[0] < 1:
            raise ValueError(f"batch_sizes must be increasing positive sizes, got {list(sizes)}")
        if self.exit_times.ndim != 2 or self.exit_times.shape[1] != num_sizes or self.full_times.shape != (num_sizes,):
            raise ValueError(
                f"need exit_times [K, {num_sizes}] and full_times [{num_sizes}], got "
                f"{list(self.exit_times.shape)} and {list(self.full_times.shape)}"
            )
        if self.spread.shape != (self.exit_times.shape[0] + 1, num_sizes):
            raise ValueError(f"need spread [K + 1, {num_sizes}], got {list(self.spread.shape)}")
        for factor in (self.correction, self.first_factor):
            if not (math.isfinite(factor) and factor > 0):
                raise ValueError(f"correction must be a positive number, got {factor}")
        if self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        if self.compact_times is not None and (
            self.compact_times.shape != self.exit_times.shape or not bool(torch.isfinite(self.compact_times).all())
            or bool((self.compact_times < 0).any())
        ):
            raise ValueError(f"need compact_times [K, {num_sizes}] of finite seconds >= 0, got {list(self.compact_times.shape)}")
        if self.compact_after is not None and len(self.compact_after) != self.exit_times.shape[0] - 1:
            raise ValueError(f"need one compaction flag per exit before the last, got {len(self.compact_after)}")
        for m, share in self.floors:
            if m not in sizes or not (math.isfinite(share) and share > 0):
                raise ValueError(f"floors must pair timed batch sizes {list(sizes)} with positive shares, got {list(self.floors)}")
        times_ok = torch.isfinite(self.exit_times).all() and torch.isfinite(self.full_times).all()
        if not (times_ok and (self.exit_times >= 0).all() and (self.full_times > 0).all()):
            raise ValueError("times must be finite, the exits' >= 0 and the full model's > 0")

    @property
    def first_factor(self) -> float:
        """The factor on the first exit's step (``first_correction``, else ``correction``)."""
        return self.correction if self.first_correction is None else self.first_correction

    def factor(self, k: int) -> float:
        """The correction on exit ``k``'s step."""
        return self.first_factor if k == 0 else self.correction

    @property
    def num_exits(self) -> int:
        return self.exit_times.shape[0]

    @property
    def batch_size(self) -> int:
        """The serving batch size the model was timed for (the top of the ladder)."""
        return self.batch_sizes[-1]

    def _segment(self, times: torch.Tensor, m: float) -> tuple[float, float]:
        """``(a, b)``: the interpolation segment of one time series holding ``m`` rows, as ``a + b m``
        (knots ``(0, 0)`` and the timed sizes, times made non-decreasing; beyond the last size, the last segment)."""
        sizes = torch.tensor((0, *self.batch_sizes), dtype=torch.float64)
        values = torch.cummax(torch.cat([times.new_zeros(1), times.double()]), 0).values
        i = int(torch.searchsorted(sizes, torch.tensor(float(m), dtype=torch.float64), right=True)) - 1
        i = min(max(i, 0), len(sizes) - 2)
        b = float((values[i + 1] - values[i]) / (sizes[i + 1] - sizes[i]))
        return float(values[i]) - b * float(sizes[i]), b

    def exit_time(self, k: int, m: float) -> float:
        """Interpolated seconds of exit ``k``'s step on ``m`` rows (0 for none)."""
        if m <= 0:
            return 0.0
        a, b = self._segment(self.exit_times[k], m)
        return (a + b * m) * self.factor(k)

    def full_time(self, n: float) -> float:
        """Interpolated seconds of the full model on a batch of ``n``."""
        a, b = self._segment(self.full_times, n)
        return a + b * n

    def compact_time(self, k: int, m: float) -> float:
        """Interpolated seconds of the compaction after exit ``k`` on ``m`` rows (0 when not timed apart)."""
        if self.compact_times is None or m <= 0:
            return 0.0
        a, b = self._segment(self.compact_times[k], m)
        return (a + b * m) * self.factor(k)

    def predicted_fraction(self, reach: Sequence[float], n: int | None = None, plan: Sequence[bool] | None = None) -> float:
        """Predicted time of a batch of ``n`` (default: the serving batch) in which a share
        ``reach[k]`` of the samples runs stage ``k``, as a fraction of the full model's time on it,
        under the compaction ``plan`` (default: the model's own, ``compact_after``, else the best
        one for this reach, :meth:`plan`)."""
        n = self.batch_size if n is None else n
        plan = plan if plan is not None else self.compact_after if self.compact_after is not None else self.plan(reach, n)
        return self._planned_time(reach, n, plan) / self.full_time(n)

    def step_time(self, k: int, rows: float, kept: float | None) -> float:
        """Seconds of exit ``k``'s step on ``rows`` rows whose compaction gathers ``kept`` of them
        (``None``: no compaction, the leavers ride on). The compaction was timed gathering half
        of the rows; its time is taken as proportional to the rows gathered (none kept: none)."""
        if rows <= 0:
            return 0.0
        gather = self.compact_time(k, rows)
        return self.exit_time(k, rows) - gather + (0.0 if kept is None else gather * 2 * min(kept, rows) / rows)

    def _planned_time(self, reach: Sequence[float], n: float, plan: Sequence[bool]) -> float:
        """Seconds of a batch of ``n`` at ``reach`` under ``plan``: stage ``k`` runs on the rows kept
        by the last compaction before it (:meth:`step_time`)."""
        total, rows = 0.0, float(n)
        for k, r in enumerate(reach):
            if k and plan[k - 1]:
                rows = r * n
            if r <= 0:
                break
            compacts = k < len(reach) - 1 and plan[k]
            total += self.step_time(k, rows, reach[k + 1] * n if compacts else None)
        return total

    def plan(self, reach: Sequence[float], n: int | None = None) -> tuple[bool, ...]:
        """The compaction plan (one flag per exit before the last) of the least predicted time at
        ``reach`` and batch ``n``: gather the kept rows after an exit, or let the few leaving rows
        ride along to the next compaction, where that costs less than the gather. Dynamic
        programming over the last compaction before each stage (``O(K^2)`` plans priced)."""
        n = self.batch_size if n is None else n
        num_exits = len(reach)
        if self.compact_times is None or num_exits < 2:
            return (True,) * (num_exits - 1)
        # best[j]: (seconds, plan) of the steps so far, the next stage running on the rows kept at exit j - 1
        best = {0: (0.0, ())}
        for k in range(num_exits - 1):
            step: dict[int, tuple[float, tuple[bool, ...]]] = {}
            for j, (seconds, flags) in best.items():
                rows = reach[j] * n if reach[k] > 0 else 0.0  # no sample reaches stage k: it does not run
                for compacts, nxt in ((True, k + 1), (False, j)):
                    cost = seconds + self.step_time(k, rows, reach[k + 1] * n if compacts else None)
                    if nxt not in step or cost < step[nxt][0]:
                        step[nxt] = (cost, (*flags, compacts))
            best = step
        last = num_exits - 1
        return min(((s + (self.step_time(last, reach[j] * n, None) if reach[last] > 0 else 0.0), f) for j, (s, f) in best.items()),
                   key=lambda c: c[0])[1]

    def planned(self, reach: Sequence[float]) -> "LatencyModel":
        """The model with :meth:`plan` at ``reach`` (and the serving batch) as the plan the runtime follows."""
        return replace(self, compact_after=self.plan(reach))

    def costs(self, reach: Sequence[float] | None = None, n: int | None = None, *, marginal: bool = True) -> list[float]:
        """``K`` cumulative per-sample costs at batch ``n`` (default: the serving batch), as fractions
        of the full model's time there, each stage priced around the rows ``reach[k] * n`` that run
        it (``reach``: the share of the samples that runs each stage; default: half of them beyond
        the first stage, which always runs on all); at the margin, or at the average with
        ``marginal=False``. See the module doc."""
        n = self.batch_size if n is None else n
        reach = [1.0] + [0.5] * (self.num_exits - 1) if reach is None else [1.0, *reach[1:]]
        if len(reach) != self.num_exits:
            raise InputError(f"reach needs one share per exit ({self.num_exits}), got {len(reach)}")
        # the gather after the first exit is paid per row kept (:meth:`step_time`; timed gathering half)
        gather = self.compact_time(0, n)
        fixed, per_sample = self.step_time(0, n, 0.0), [0.0]
        for k in range(1, self.num_exits):
            m = max(min(float(reach[k]), 1.0) * n, 1e-6)  # below one row: the [0, 1] segment, a whole stage
            a, b = self._segment(self.exit_times[k], m)
            kept = gather / (n / 2) if k == 1 else 0.0
            if marginal and a >= 0:
                fixed, per_sample = fixed + a * self.factor(k), [*per_sample, b * self.factor(k) + kept]
            else:
                per_sample.append(self.exit_time(k, m) / m + kept)
        full = self.full_time(n)
        costs = [(fixed + n * c) / full for c in torch.tensor(per_sample, dtype=torch.float64).cumsum(0).tolist()]
        for k in range(1, len(costs)):  # a flat segment would tie two exits: costs must rise
            costs[k] = max(costs[k], costs[k - 1] * (1 + 1e-9))
        return costs

    def smallest_budgets(self) -> dict[int, float]:
        """The smallest feasible time budget (every sample leaving at the first exit) at each timed batch size.

        At the serving batch size this is the floor measured in whole forwards (calibration's first
        correction); at the others the floor measured by :func:`measure_floors` (``floors``: the
        demo measures them, and so does a calibration whose budget is infeasible, for its error),
        else the ladder's prediction with that correction applied, which is noisy at small sizes:
        on the demo CNN, timed up to 256, two ladders read 1.05 and 0.81 at batch 1 where whole
        forwards measured 0.92 and 0.77."""
        measured = dict(self.floors)
        return {n: measured[n] if n in measured and n != self.batch_size else self.predicted_fraction([1.0], n, plan=())
                for n in self.batch_sizes}  # no row kept: no gather

    def with_extra(self, extra: torch.Tensor) -> "LatencyModel":
        """The model with ``extra`` (``[K, L]`` seconds) added to the exit steps."""
        return replace(self, exit_times=(self.exit_times + extra).clamp_min(0))

    def corrected(self, factor: float, first: float | None = None) -> "LatencyModel":
        """The model with the later exits' steps scaled by ``factor`` and the first exit's by
        ``first`` (default: ``factor`` too), replacing any earlier correction."""
        return replace(self, correction=float(factor), first_correction=None if first is None else float(first))

    def record(self) -> dict[str, Any]:
        """A JSON-ready dict (seconds), read back by :meth:`from_record`."""
        return {
            "batch_sizes": list(self.batch_sizes),
            "exit_times": self.exit_times.tolist(),
            "full_times": self.full_times.tolist(),
            "spread": self.spread.tolist(),
            "correction": self.correction,
            "first_correction": self.first_correction,
            "threads": self.threads,
            "cpu_share": self.cpu_share,
            "compact_times": None if self.compact_times is None else self.compact_times.tolist(),
            "compact_after": None if self.compact_after is None else list(self.compact_after),
            "floors": [[m, share] for m, share in self.floors],
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "LatencyModel":
        """The model :meth:`record` wrote. Raises ``ValueError``, ``KeyError`` or ``TypeError`` on a bad record."""
        return cls(
            tuple(int(m) for m in record["batch_sizes"]),
            torch.tensor(record["exit_times"], dtype=torch.float64),
            torch.tensor(record["full_times"], dtype=torch.float64),
            torch.tensor(record["spread"], dtype=torch.float64),
            float(record.get("correction", 1.0)),
            int(record.get("threads", 1)),
            float(record.get("cpu_share", 1.0)),
            None if record.get("first_correction") is None else float(record["first_correction"]),
            None if record.get("compact_times") is None else torch.tensor(record["compact_times"], dtype=torch.float64),
            None if record.get("compact_after") is None else tuple(bool(f) for f in record["compact_after"]),
            tuple((int(m), float(share)) for m, share in record.get("floors", [])),
        )


def _rows(x: Any, n: int) -> Any:
    """``n`` rows of the batch ``x``, repeating its rows when it holds fewer."""
    batch = batch_size_of(x)
    index = torch.arange(n) % batch
    return map_batch(lambda t: t[index.to(t.device)] if n != batch else t, x, batch, "the example")


def _best_spread(values: list[float]) -> tuple[float, float]:
    """The smallest of the timings (a busy machine only ever adds time: the least disturbed round
    is the best estimate of the work itself) and their spread, interquartile range / median."""
    ordered = sorted(values)
    q = lambda p: ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))]  # noqa: E731
    median = q(0.5)
    return ordered[0], (q(0.75) - q(0.25)) / median if median > 0 else 0.0


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What waits for ``device``'s queued work before a clock is read (nothing on the CPU)."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def clock(device: torch.device) -> Callable[[], float]:
    """The clock that times work on ``device``: on one CPU thread the thread's CPU time (torch runs
    the work on the calling thread, and time the system gives to other processes does not count:
    demo CNN on one thread beside a two-thread torch process on 2 cores, the wall clock's rounds
    spread by up to 166 % and put the first exit at batch 32 at 0.74 of the full model in one of two
    ladders, against 0.46-0.50 quiet; the thread's CPU time spread by at most 33 %); otherwise the
    wall clock (torch's other threads, or the device, do the work), and on Windows, whose thread
    clock ticks in steps of about 16 ms."""
    one_cpu_thread = device.type == "cpu" and torch.get_num_threads() == 1
    return time.thread_time if one_cpu_thread and sys.platform != "win32" else time.perf_counter


# Untimed calls of a forward for this long before it is timed, in the ladder and in measure_shares:
# adaptive forwards run slow for about 8 calls after other work (demo CNN, batch 8, every sample at
# exit 1: 1211, 933, 855, 799 us for calls 1-4 after the full model's, 734 us by call 12), and a
# server runs them back to back. Timed after one untimed call, calibrations at batch 8 and 32
# predicted 5 % more time than they served (median of 15, both models; the mean error 8.0 %), with
# the warm-up 1 % (4.1 %); with six pairs more from a noisy hour, 21 pairs: 8.4 % against 6.7 %, not
# significant (bench/results/overhead-cuts-2026-11-28.md). At 256 rows and more one call outlasts it.
WARMUP_SECONDS = 0.02


def _timed(fn: Callable[[], Any], repeats: int, sync: Callable[[], None], now: Callable[[], float],
           warmup: float = 0.0) -> float:
    """Seconds per call of ``fn`` over ``repeats`` calls on the clock ``now``, after untimed calls
    of the same work for ``warmup`` seconds of wall time, at least one (memory and caches as in
    serving, where one batch follows another)."""
    deadline = time.perf_counter() + warmup
    fn()
    sync()
    while time.perf_counter() < deadline:
        fn()
        sync()
    start = now()
    for _ in range(repeats):
        fn()
    sync()
    return (now() - start) / repeats


def _repeats_for(seconds: float) -> int:
    """Calls per timing so that one lasts about 5 ms: one busy spell or the clock does not decide."""
    return max(1, min(256, math.ceil(5e-3 / max(seconds, 1e-9))))


BUSY_CPU_SHARE = 0.85  # the timing thread ran less than this share of the wall time: other work competes


@torch.no_grad()
def time_exits(
    model: EarlyExitModel,
    example: Any,
    batch_size: int | None = None,
    *,
    rounds: int = 5,
    policy: Policy | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> LatencyModel:
    """Time the full model and every exit's step on the ladder of batch sizes up to ``batch_size``.

    Exit ``k``'s step is timed inside :meth:`EarlyExitModel.forward` itself, so what a real
    forward pays (its checks and allocations, caches cooled by the stages between two decisions)
    is in it: forward with every sample leaving at exit ``k``, minus forward with every sample
    leaving at exit ``k - 1``, plus the compaction of half the rows after exit ``k``.

    Args:
        example: a batch like those the model serves (tensor or tuple/dict, batch first); its rows
            are repeated to fill larger batches.
        batch_size: the serving batch size (default: the example's).
        rounds: timed rounds after one warm-up; each forward keeps the smallest.
        policy: the fitted policy whose decision the forwards run (its thresholds are replaced
            while timing; default: the max-score decision).
        threads: the CPU threads to time on (default: torch's current setting).
        progress: a progress bar over the rounds.

    When the timing thread runs less than :data:`BUSY_CPU_SHARE` of the wall time on the CPU (it
    always has work: its share of each parallel region and everything between them; measured on
    the demo CNN with 2 threads on 2 cores: 1.00 quiet, 0.60-0.67 beside a one-thread matrix
    product, 0.50 beside a two-thread torch process or two spinning ones), the ladder is timed again on one thread, with a
    warning: a parallel region waits for its slowest thread, so a competitor distorts the time
    shares of a multi-threaded model (measured on the demo CNN at batch 256, 2 threads on 2 cores
    beside one busy process: exit 3 took 2.4x the full model), while one thread is timed on its own
    CPU time (:func:`clock`). One thread's shares are not the multi-threaded ones, though: the
    stages lose a thread and the exits' small operations do not, so the exits look cheaper
    (``bench/bench_budget.py --load``, demo CNN: policies fitted this way spent 4-8 % over the
    budget when served quiet on 2 threads at batch 256 and 1024, and 20 % at batch 32). The model
    records the threads it was timed with (``LatencyModel.threads``); :func:`measure_shares` uses as
    many, and so should serving.
    """
    with torch_threads(threads):
        latency = _time_ladder(model, example, batch_size, rounds, policy, progress)
    if latency.cpu_share < BUSY_CPU_SHARE and latency.threads > 1:
        warnings.warn(
            f"the machine is busy: the timing thread ran {100 * latency.cpu_share:.0f} % of the time (other work "
            f"competes for the cores), so its {latency.threads} threads wait on each other; timing again with one thread. The policy will "
            f"be fitted to one thread's time shares, where the stages lose a thread and the exits' small operations do "
            f"not: served on {latency.threads} threads it can spend more than the budget. Calibrate on a quiet machine, "
            "or serve with torch.set_num_threads(1)",
            stacklevel=3,
        )
        with torch_threads(1):
            latency = _time_ladder(model, example, batch_size, rounds, policy, progress)
    return latency


def _time_ladder(
    model: EarlyExitModel, example: Any, batch_size: int | None, rounds: int, policy: Policy | None, progress: bool
) -> LatencyModel:
    """:func:`time_exits` on the current threads."""
    model.require_eval("time the exits")
    if rounds < 1:
        raise InputError(f"rounds must be at least 1, got {rounds}")
    device = model.device
    x = move_to(example, device)
    sizes = ladder(batch_size_of(x) if batch_size is None else int(batch_size))
    forward_to, compact_half = _runners(model, x, policy)
    sync = synchronizer(device)
    num_exits = model.num_exits
    # per size: the forward to each exit, the full model, then each exit's compaction
    samples = {n: [[] for _ in range(2 * num_exits + 1)] for n in sizes}
    inputs = {n: _rows(x, n) for n in sizes}
    repeats = {n: 1 for n in sizes}
    order = list(sizes)
    now, threads = clock(device), torch.get_num_threads()
    wall, cpu = time.perf_counter(), time.thread_time()
    for r in tqdm(range(rounds + 1), desc="timing the exits", disable=not progress, leave=False):
        random.Random(r).shuffle(order)
        for n in order:
            forwards = [_timed(lambda: forward_to(k, inputs[n]), repeats[n], sync, now, WARMUP_SECONDS) for k in range(num_exits)]
            full = _timed(lambda: full_pass(model, inputs[n]), repeats[n], sync, now, WARMUP_SECONDS)
            states = _stage_outputs(model, inputs[n])  # untimed: kept alive, they would slow the passes above
            compactions = [_timed(lambda: compact_half(k, states[k]), repeats[n], sync, now) for k in range(num_exits - 1)] + [0.0]
            states = None  # freed before the next size is timed
            if r == 0:  # warm-up: sets the calls per timing
                repeats[n] = _repeats_for(full)
                continue
            for k, seconds in enumerate([*forwards, full, *compactions]):
                samples[n][k].append(seconds)
    # the share of the wall time this thread ran: 1 when the threads had their cores to themselves
    cpu_share = (time.thread_time() - cpu) / (time.perf_counter() - wall) if device.type == "cpu" else 1.0
    exit_times = torch.empty(num_exits, len(sizes), dtype=torch.float64)
    compact_times = torch.empty(num_exits, len(sizes), dtype=torch.float64)
    full_times = torch.empty(len(sizes), dtype=torch.float64)
    spread = torch.empty(num_exits + 1, len(sizes), dtype=torch.float64)
    for i, n in enumerate(sizes):
        best = [_best_spread(values)[0] for values in samples[n]]
        # a step is the difference of the best forwards to its exit and to the one before (each the
        # least disturbed of its rounds; the best of the rounds' differences would be biased low)
        to_exit = torch.tensor(best[:num_exits], dtype=torch.float64).cummax(0).values
        compact_times[:, i] = torch.tensor(best[num_exits + 1:], dtype=torch.float64)
        exit_times[:, i] = torch.diff(to_exit, prepend=to_exit.new_zeros(1)) + compact_times[:, i]
        full_times[i] = best[num_exits]
        steps = [[b - a for a, b in zip([0.0] * len(samples[n][0]) if k == 0 else samples[n][k - 1], samples[n][k])]
                 for k in range(num_exits)]
        for k, values in enumerate([*steps, samples[n][num_exits]]):
            spread[k, i] = _best_spread(values)[1]
    return LatencyModel(sizes, exit_times, full_times, spread, threads=threads, cpu_share=min(cpu_share, 1.0),
                        compact_times=compact_times)


def reach(exits: torch.Tensor, num_exits: int) -> list[float]:
    """The share of the samples that runs each of the ``num_exits`` stages, from their exits ``[N]``
    (int64): what :meth:`LatencyModel.predicted_fraction` and :meth:`LatencyModel.costs` take."""
    return [float((exits >= k).double().mean()) for k in range(num_exits)]


def full_pass(model: EarlyExitModel, x: Any) -> torch.Tensor:
    """Every stage of ``model`` in order, then its last head: what the plain model costs. Returns
    the logits ``[B, C]``."""
    for stage in model.stages:
        x = stage(x)
    return model.heads[-1](x)


def _stage_outputs(model: EarlyExitModel, x: Any) -> list[Any]:
    """The output of every stage on the batch ``x``."""
    states = []
    for stage in model.stages:
        x = stage(x)
        states.append(x)
    return states


def _runners(model: EarlyExitModel, x: Any, policy: Policy | None) -> tuple[Callable[[int, Any], None], Callable[[int, Any], None]]:
    """``forward_to(k, batch)``: :meth:`EarlyExitModel.forward` with every sample leaving at exit
    ``k`` (``policy``'s decision, or the max-score one; the model's policy and controller are put
    back after); ``compact_half(k, state)``: the compaction after exit ``k`` of every other row of
    the stage output ``state`` with its ids and history."""
    backend = select_backend(model.backend, model.device)
    stand_in = _runnable_copy(model, x, policy)
    forced = {k: torch.tensor([math.inf] * k + [-math.inf] * (model.num_exits - k), device=model.device)
              for k in range(model.num_exits)}

    def forward_to(k: int, batch: Any) -> None:
        stand_in.thresholds = forced[k]
        with _installed(model, stand_in):
            model(batch)

    def compact_half(k: int, state: Any) -> None:
        n = batch_size_of(state)
        keep = torch.arange(n, device=model.device) % 2 == 0
        history = torch.zeros(n, k + 1, device=model.device), torch.zeros(n, k + 1, dtype=torch.long, device=model.device)
        backend.compact(keep, state, torch.arange(n, device=model.device), *history)

    return forward_to, compact_half


@torch.no_grad()
def _runnable_copy(model: EarlyExitModel, x: Any, policy: Policy | None = None) -> Policy:
    """A copy of ``policy`` (default: the max-score decision) that runs in ``model``'s forward on
    batches like ``x`` once its ``thresholds`` (``[K]``) are set."""
    copied = copy.deepcopy(policy) if policy is not None else make_policy("maxprob")
    copied.num_classes = model.heads[0](model.stages[0](_rows(x, 1))).shape[1]
    return copied


def leaving_first(model: EarlyExitModel, x: Any, policy: Policy | None = None) -> Policy:
    """:func:`_runnable_copy` of ``policy`` that sends every sample out at the first exit: the
    fastest adaptive forward, whose time share is the smallest feasible time budget."""
    copied = _runnable_copy(model, x, policy)
    copied.thresholds = torch.full((model.num_exits,), -math.inf, device=model.device)
    return copied


@contextmanager
def _installed(model: EarlyExitModel, policy: Policy) -> Iterator[None]:
    """``policy`` installed on ``model`` without a controller for the block; the model's own after."""
    saved = model.policy, model.controller
    model.policy, model.controller = policy, None
    try:
        yield
    finally:
        model.policy, model.controller = saved


@torch.no_grad()
def measure_shares(
    model: EarlyExitModel, policies: Sequence[Policy], example: Any, batch_size: int, rounds: int = 5,
    threads: int | None = None,
) -> tuple[list[list[float]], list[list[float]]]:
    """Adaptive inference with each of ``policies`` against the full model on batches of
    ``batch_size`` rows of ``example`` (:func:`_batches`: distinct rows where it holds more, else its
    rows repeated), timed back to back in each of ``rounds`` rounds.

    Args:
        threads: the CPU threads to time on (default: torch's current setting).

    Returns:
        For each policy, its time share in each round (adaptive / full time of the same round, as
        the bench and users measure it: a busy spell slows both), and the share of the rows that ran
        each stage (the reach its shares belong to). Shares of two policies in the same round are
        paired: their difference is spared what disturbed that round as a whole.
    """
    batches = _batches(move_to(example, model.device), batch_size)
    full_passes = lambda: [full_pass(model, x) for x in batches]  # noqa: E731
    forwards = lambda: [model(x) for x in batches]  # noqa: E731
    sync, reaches = synchronizer(model.device), []
    with torch_threads(threads):
        now = clock(model.device)  # on the threads timed: one thread is timed on its own CPU time
        for policy in policies:
            with _installed(model, policy):
                reaches.append(reach(torch.cat([result.exits for result in forwards()]), model.num_exits))
        repeats = _repeats_for(_timed(full_passes, 1, sync, now))  # the warm-up sets the calls per timing
        shares: list[list[float]] = [[] for _ in policies]
        for _ in range(rounds):
            full = _timed(full_passes, repeats, sync, now, WARMUP_SECONDS)
            for policy, own in zip(policies, shares):
                with _installed(model, policy):
                    own.append(_timed(forwards, repeats, sync, now, WARMUP_SECONDS) / full)
    return shares, reaches


FLOOR_ROUNDS = 5  # demo CNN, 2 threads, batch 1 to 256: about 7 s in all; one size's median moved by up to 0.09 between
# two sweeps. 15 rounds (20 s) were no closer: two such sweeps differed by up to 0.19, at batch 1 (the machine's level moved)


def measure_floors(model: EarlyExitModel, example: Any, latency: LatencyModel, policy: Policy | None = None,
                   rounds: int = FLOOR_ROUNDS) -> LatencyModel:
    """``latency`` with the smallest feasible time budget measured at each of its batch sizes
    below the serving one (``floors``, read by :meth:`LatencyModel.smallest_budgets`): the median
    time share over ``rounds`` rounds of :func:`measure_shares` of forwards in which every sample
    leaves at the first exit (``policy``'s decision, default the max-score one), on
    ``latency.threads`` threads and distinct batches of ``example`` where it holds more rows.
    The ladder's prediction there is a difference of minima timed apart, with the serving size's
    correction applied: on the demo CNN it put batch 1 at 1.05-1.39 where whole forwards measured
    0.72-0.94."""
    leaving = leaving_first(model, example, policy)
    floors = []
    for n in latency.batch_sizes[:-1]:
        (shares,), _ = measure_shares(model, [leaving], example, n, rounds, latency.threads)
        floors.append((n, statistics.median(shares)))
    return replace(latency, floors=tuple(floors))


MEASURED_ROWS = 256  # whole forwards are timed over up to this many distinct rows of the example (or one batch) ...
MEASURED_BATCHES = 64  # ... in at most this many batches


def _batches(x: Any, n: int) -> list[Any]:
    """The batches of ``n`` rows of the example ``x`` that whole forwards are timed on: consecutive
    batches of its own rows where it holds more than ``n`` (at most :data:`MEASURED_BATCHES`, and
    :data:`MEASURED_ROWS` rows in all unless one batch holds more), else its rows repeated to ``n``.
    A policy's time share depends on which rows it sends on: at batch 8, the 8 rows of one batch
    give a reach in steps of 1/8 that may sit far from the policy's mean (demo CNN at 8 / 0.7: a policy
    sending 4 % of the test samples past the first exit measured 0.505 on the example's first 8 rows
    and served 0.645 over 64 batches of test rows)."""
    size = batch_size_of(x)
    count = min(size // n, MEASURED_BATCHES, max(1, MEASURED_ROWS // n))
    if count <= 1:
        return [_rows(x, n)]
    return [map_batch(lambda t, i=i: t[i * n:(i + 1) * n], x, size, "the example") for i in range(count)]


@torch.no_grad()
def decision_times(model: EarlyExitModel, policy: Policy, batch_sizes: Sequence[int], num_classes: int, repeats: int = 50) -> torch.Tensor:
    """``[K, L]`` seconds of ``policy``'s exit decision alone (features, score, flags) on random
    logits of each batch size, the smallest of ``repeats`` calls: with the max-score decision as the
    baseline, what a policy's scorer adds to each exit's step."""
    backend, sync, now = select_backend(model.backend, model.device), synchronizer(model.device), clock(model.device)
    times = torch.empty(model.num_exits, len(batch_sizes), dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    for i, n in enumerate(batch_sizes):
        logits = torch.randn(n, num_classes, generator=generator).to(model.device)
        for k in range(model.num_exits):
            history = ExitHistory(torch.rand(n, k, generator=generator).to(model.device), torch.zeros(n, k, dtype=torch.long, device=model.device))
            last = k == model.num_exits - 1
            threshold = 0.5
            times[k, i] = min(_timed(lambda: backend.decide(policy, k, logits, history, last, threshold), 1, sync, now)
                              for _ in range(repeats))
    return times
