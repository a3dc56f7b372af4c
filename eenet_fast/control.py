"""Online budget control: hold the running average cost at the budget while the input mix drifts.

A calibrated policy meets its budget on data like its validation set. When harder inputs arrive,
more samples reach the late exits and a fixed policy overspends for as long as they last. A
:class:`BudgetController` watches the exits the served batches take and moves the thresholds along
the calibration's own family, the exponential tilt of the calibrated exit mix (``f_k proportional
to base_k * s^k``; ``log_s < 0`` sends more samples out early), within bounds:

* it tabulates, on calibration outputs, the thresholds and their mean cost ``cost_cal(log_s)`` for
  ``log_s`` on a grid over ``[-max_tilt, max_tilt]`` (``log_s = 0``: the policy's own thresholds);
* ``drift``, its estimate of how much dearer the current inputs are per sample, integrates the
  overspend of every batch, ``(1 - (1 - gain / window)^B) * (batch_cost - target)``, a time
  constant of ``window / gain`` samples; because it integrates what was really spent, an
  overspend is paid back and the running average settles on the target (not just near it);
* before each batch it uses the dearest tilt whose ``cost_cal`` is at most ``target - drift``;
* when even ``-max_tilt`` costs more than that, the budget cannot be held within the calibrated
  range: :attr:`BudgetController.infeasible` turns true, a warning is issued (once per controller)
  and the log says so; ``drift`` stops integrating at either end of the range (no wind-up), so the
  controller answers at once when the inputs ease.

Two calls connect it to a server or to :class:`~eenet_fast.runtime.EarlyExitModel` (its
``controller`` attribute): :meth:`BudgetController.thresholds` before a batch, and
:meth:`BudgetController.observe` with the exits the batch took.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import deque
from dataclasses import dataclass

import torch

from eenet_fast.outputs import ExitOutputs
from eenet_fast.policies.base import Policy
from eenet_fast.policies.thresholds import assign_exits, thresholds_for_fractions, tilt

__all__ = ["Adjustment", "BudgetController", "BudgetInfeasibleWarning"]

logger = logging.getLogger(__name__)


class BudgetInfeasibleWarning(RuntimeWarning):
    """The budget cannot be held without tilting the exit mix beyond the controller's bounds."""


@dataclass(frozen=True)
class Adjustment:
    """One change of the controller's setting.

    Attributes:
        seen: samples observed when it was made.
        window_cost: mean cost of the last ``window`` samples (fewer at the start).
        drift: estimated extra cost per sample of the current inputs over the calibration outputs
            (held at the end of the calibrated range when the inputs go beyond it).
        log_tilt: the new tilt (0: the policy's thresholds; negative: cheaper).
        expected_cost: the new thresholds' mean cost on the calibration outputs.
        infeasible: the tilt is at ``-max_tilt`` and the inputs cost more than it can save.
    """

    seen: int
    window_cost: float
    drift: float
    log_tilt: float
    expected_cost: float
    infeasible: bool


class BudgetController:
    """Adjusts a fitted policy's thresholds so that the running average cost stays at ``target``.

    Args:
        policy: a fitted, deployable policy (its thresholds are never modified).
        calibration: exit outputs like those the policy was calibrated on (e.g. the validation
            outputs; labels are not needed): the tilt family and its costs are tabulated there.
        target: the average cost to hold (default: what the policy spends on ``calibration``, at most
            its budget: a policy that chose to spend less, or was certified below it, stays there).
        window: samples in the running window (:meth:`window_cost`, the log).
        gain: corrections per window: ``drift`` integrates the overspend at ``gain / window`` per
            sample (a time constant of ``window / gain`` samples; larger follows drift faster and
            moves the thresholds more from batch to batch).
        max_tilt: bound on ``|log_s|``, the calibrated range of adjustment.
        step: grid step of ``log_s``.
        log_size: adjustments kept in :attr:`log` (the oldest are dropped).
    """

    def __init__(
        self,
        policy: Policy,
        calibration: ExitOutputs,
        *,
        target: float | None = None,
        window: int = 1000,
        gain: float = 16.0,
        max_tilt: float = 2.0,
        step: float = 0.01,
        log_size: int = 10_000,
    ) -> None:
        if policy.thresholds is None or not policy.deployable:
            raise ValueError(f"the controller needs a fitted, deployable policy; {policy.name!r} is not one")
        if window < 1 or not 0 < gain < window or max_tilt <= 0 or not 0 < step <= max_tilt:
            raise ValueError(
                f"need window >= 1, 0 < gain < window and 0 < step <= max_tilt; got window={window}, gain={gain}, "
                f"max_tilt={max_tilt}, step={step}"
            )
        self.policy = policy
        self.costs = policy.costs.double()
        self.window, self.gain, self.max_tilt = window, gain, max_tilt
        scores = policy.exit_scores(calibration)
        mix = torch.bincount(assign_exits(scores, policy.thresholds), minlength=scores.shape[0]).double()
        mix /= max(calibration.num_samples, 1)
        half = round(max_tilt / step)
        self.tilts = torch.arange(-half, half + 1, dtype=torch.float64) * step
        table = [thresholds_for_fractions(scores, tilt(mix, float(s))) for s in self.tilts]
        table[half] = policy.thresholds.float().cpu()  # tilt 0 is the policy itself
        self.table = torch.stack(table)  # [G, K]
        expected = torch.stack([self.costs[assign_exits(scores, t)].mean() for t in self.table])
        self.expected = torch.cummax(expected, 0).values  # [G]: monotone, for the inverse
        self.target = min(float(policy.budget), float(expected[half])) if target is None else float(target)
        self.index = self.half = half
        self.drift = 0.0
        self.seen = 0
        self.infeasible = False
        self._warned = False
        self._recent: deque[float] = deque(maxlen=window)
        self._recent_sum = 0.0
        self.log: deque[Adjustment] = deque(maxlen=log_size)

    @property
    def log_tilt(self) -> float:
        """The current tilt (0: the policy's own thresholds)."""
        return float(self.tilts[self.index])

    def thresholds(self) -> torch.Tensor:
        """``[K]`` float32 (CPU) thresholds to run the next batch with."""
        return self.table[self.index]

    def window_cost(self) -> float:
        """Mean cost of the last ``window`` observed samples (``nan`` before the first)."""
        return self._recent_sum / len(self._recent) if self._recent else math.nan

    def observe(self, exits: torch.Tensor) -> None:
        """Take in the exits (``[B]`` int64, any device) of a batch run with :meth:`thresholds`, and
        set the thresholds of the next batch."""
        exits = exits.detach().to("cpu", torch.long).flatten()
        if not exits.numel():
            return
        if int(exits.min()) < 0 or int(exits.max()) >= self.costs.numel():
            raise ValueError(f"exits must lie in [0, {self.costs.numel() - 1}], got [{int(exits.min())}, {int(exits.max())}]")
        spent = self.costs[exits]
        weight = 1 - (1 - self.gain / self.window) ** exits.numel()  # at most 1: never overshoots
        raw = self.drift + weight * (float(spent.mean()) - self.target)
        low, high = self.target - float(self.expected[-1]), self.target - float(self.expected[0])
        self.drift = min(max(raw, low), high)  # no wind-up beyond the calibrated range
        for c in spent.tolist()[-self.window :]:
            if len(self._recent) == self.window:
                self._recent_sum -= self._recent.popleft()
            self._recent.append(c)
            self._recent_sum += c
        self.seen += exits.numel()
        self._set(self.target - self.drift, infeasible=raw > high)

    def _set(self, want: float, infeasible: bool) -> None:
        """Move to the dearest tilt whose calibration cost is at most ``want`` (the cheapest when none is);
        among tilts of equal cost, the one nearest 0."""
        index = max(int(torch.searchsorted(self.expected, torch.tensor([want], dtype=torch.float64), right=True)) - 1, 0)
        same = torch.tensor([float(self.expected[index])], dtype=torch.float64)  # among equal costs, the tilt nearest 0
        first, last = (int(torch.searchsorted(self.expected, same, right=right)) for right in (False, True))
        index = min(max(self.half, first), last - 1)
        if index == self.index and infeasible == self.infeasible:
            return
        if infeasible and not self._warned:
            warnings.warn(
                f"the budget {self.target:.4g} cannot be held within the controller's range: even the cheapest "
                f"tilt (log_s = {-self.max_tilt}) costs {float(self.expected[0]):.4g} on calibration data and the "
                f"inputs now cost at least {self.drift:.4g} more per sample than those; raise max_tilt or the budget "
                "(the controller's log records every episode)",
                BudgetInfeasibleWarning,
                stacklevel=3,
            )
            self._warned = True
        self.index, self.infeasible = index, infeasible
        entry = Adjustment(self.seen, self.window_cost(), self.drift, self.log_tilt, float(self.expected[index]), infeasible)
        self.log.append(entry)
        logger.debug("budget controller: %s", entry)
