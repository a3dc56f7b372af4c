"""The policy interface and the threshold machinery every policy shares.

A policy scores each sample at each exit, ``q_k`` (``[N]`` float32), from that exit's confidence
features and the sample's history (earlier scores and predictions). A sample leaves at the first
exit ``k`` with ``q_k >= T_k``; the last exit has ``T_K = -inf`` and takes everything left. Fitting a
policy for a budget sets its scorer (if it learns one) and its thresholds ``T`` on validation
outputs so that the validation average cost is at most the budget.

The same :meth:`Policy.score` runs offline over whole data sets and online inside the runtime on
compacted batches, so the offline simulation and real early exit take the same decisions.

A policy is an ``nn.Module``: installed in an :class:`~eenet_fast.runtime.EarlyExitModel` it is
the submodule ``policy``, so its tensors (thresholds, costs, learned weights) follow the model's
``.to(device)`` and appear in ``state_dict()``. They keep their own dtypes (float32 thresholds and
weights, float64 costs) under ``.half()`` or ``.to(dtype)``: a decision must not change with the
precision the network runs in. A fitted policy's parameters need no gradients.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Sequence

import torch
from torch import nn

from eenet_fast.decision import ScoreHeadParams
from eenet_fast.errors import BudgetError, InputError, PolicyError
from eenet_fast.features import ExitFeatures
from eenet_fast.outputs import ExitOutputs

if TYPE_CHECKING:
    from eenet_fast.guarantee import BudgetGuarantee

__all__ = [
    "ExitHistory",
    "Policy",
    "resolve_budget",
    "parse_budget",
    "assign_exits",
    "average_cost",
    "thresholds_for_fractions",
    "fit_fractions_to_budget",
    "best_over_bases",
    "random_bases",
]


@dataclass(frozen=True)
class ExitHistory:
    """What a sample carries from exits ``0..k-1`` to exit ``k``.

    Attributes:
        scores: ``[N, k]`` float32 policy scores at the earlier exits.
        predictions: ``[N, k]`` int64 predictions of the earlier exits.
    """

    scores: torch.Tensor
    predictions: torch.Tensor

    @classmethod
    def empty(cls, n: int, device: torch.device | str = "cpu") -> "ExitHistory":
        return cls(torch.empty(n, 0, device=device), torch.empty(n, 0, dtype=torch.long, device=device))

    def extend(self, score: torch.Tensor, prediction: torch.Tensor) -> "ExitHistory":
        return ExitHistory(
            torch.cat([self.scores, score.unsqueeze(1)], 1),
            torch.cat([self.predictions, prediction.unsqueeze(1)], 1),
        )


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


def _tilt(base: torch.Tensor, log_s: float) -> torch.Tensor:
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
        thresholds = thresholds_for_fractions(scores, _tilt(base, log_s))
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


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one CPU thread: fitting is thousands of small ops, which gain nothing from more
    threads and slow down many times over when another process holds a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Policy(nn.Module, ABC):
    """An exit policy: scores per exit plus thresholds fitted for a budget.

    Subclasses implement :meth:`score` and :meth:`_fit`. After :meth:`fit`, ``thresholds`` is a
    ``[K]`` float32 buffer (``T_K = -inf``), ``costs`` the ``[K]`` float64 buffer of costs,
    ``budget`` the absolute budget it was fitted for and ``guarantee`` what a fit with a confidence
    certified.
    """

    name: ClassVar[str]
    deployable: ClassVar[bool] = True  # False for policies that need labels at inference (the oracle)

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("thresholds", None)
        self.register_buffer("costs", None)
        self.budget: float | None = None
        self.num_classes: int | None = None
        self.guarantee: BudgetGuarantee | None = None
        self._score_heads_on: dict[tuple[int, str], ScoreHeadParams | None] = {}

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "Policy":
        """Follow a move of the model to another device, but keep every tensor's dtype (see the module doc)."""
        return super()._apply(lambda t: t.to(fn(t).device), *args, **kwargs)

    def forward(self, *args: Any) -> Any:
        raise TypeError(
            "a policy is not called like a layer: use policy.score(k, features, history) for exit k, or "
            "run the EarlyExitModel it is installed in"
        )

    # -------------------------------------------------------------- scoring
    @abstractmethod
    def score(self, k: int, features: ExitFeatures, history: ExitHistory) -> torch.Tensor:
        """Score ``q_k`` (``[N]`` float32) of every sample at exit ``k`` (0-based)."""

    def score_head(self, k: int) -> ScoreHeadParams | None:
        """The score at exit ``k`` as plain tensors, for the fused decision of the Triton backend.

        Returns:
            :class:`~eenet_fast.decision.ScoreHeadParams` (float32, on the CPU) with which
            :func:`~eenet_fast.decision.decide_reference` gives exactly :meth:`score`, or ``None``
            when the score is not of that form (the runtime then calls :meth:`score`).
        """
        return None

    def score_head_on(self, k: int, device: torch.device) -> ScoreHeadParams | None:
        """:meth:`score_head` on ``device``, built once per fitted policy, exit and device (the
        Triton backend asks for it at every exit of every batch)."""
        key = (k, str(device))
        if key not in self._score_heads_on:
            head = self.score_head(k)
            self._score_heads_on[key] = None if head is None else head.to(device)
        return self._score_heads_on[key]

    def exit_scores(self, outputs: ExitOutputs) -> torch.Tensor:
        """``[K, N]`` scores of every sample at every exit, computed exit by exit as at inference."""
        history = ExitHistory.empty(outputs.num_samples)
        rows = []
        for k, feats in enumerate(outputs.features):
            q = self.score(k, feats, history).float()
            rows.append(q)
            history = history.extend(q, feats.prediction)
        return torch.stack(rows)

    # -------------------------------------------------------------- fitting
    def fit(
        self, val: ExitOutputs, budget: float | str, *, confidence: float | None = None, holdout: float = 0.5, seed: int = 0
    ) -> "Policy":
        """Fit on validation outputs (with labels and costs) for an average-cost ``budget``.

        With ``confidence`` (e.g. 0.95) the policy is fitted on a seeded ``1 - holdout`` share of
        ``val`` and its thresholds are certified on the rest, so that the mean cost per sample of new
        data is at most the budget with probability at least ``confidence``; ``guarantee`` then holds
        the :class:`~eenet_fast.guarantee.BudgetGuarantee` (see :mod:`eenet_fast.guarantee`).
        """
        costs = val.require_costs()
        val.require_labels()
        if val.num_samples == 0:
            raise InputError("cannot fit a policy on an empty validation set: give outputs of at least one sample")
        self.costs, self.num_classes = costs, val.num_classes
        self.budget = resolve_budget(budget, costs)
        self._score_heads_on = {}  # the score heads change with the fit
        self.guarantee = None
        fit_part = val
        if confidence is not None:
            from eenet_fast import guarantee  # it builds on this module

            guarantee.check_confidence(confidence, holdout)
            fit_part, holdout_part = guarantee.split_outputs(val, holdout, seed)
        with _one_thread():
            self.thresholds = self._fit(fit_part, self.budget)
        self.requires_grad_(False)
        exits = self.assign(fit_part)
        cost = average_cost(exits, costs)
        if cost > self.budget * (1 + 1e-9):  # the fitting routines guarantee this; keep them honest
            raise RuntimeError(f"{self.name}: validation cost {cost:.6g} exceeds the budget {self.budget:.6g}")
        if confidence is not None:
            with _one_thread():
                self.thresholds, self.guarantee = guarantee.certify(self, fit_part, holdout_part, self.budget, confidence)
        return self

    @abstractmethod
    def _fit(self, val: ExitOutputs, budget: float) -> torch.Tensor:
        """Return ``[K]`` thresholds meeting ``budget`` on ``val``."""

    def _check_fitted(self, outputs: ExitOutputs) -> None:
        if self.thresholds is None:
            raise RuntimeError(f"policy {self.name!r} is not fitted: call .fit(val, budget) first")
        if outputs.num_exits != self.thresholds.numel() or outputs.num_classes != self.num_classes:
            raise PolicyError(
                f"policy {self.name!r} was fitted for {self.thresholds.numel()} exits and {self.num_classes} "
                f"classes, got outputs with {outputs.num_exits} exits and {outputs.num_classes} classes"
            )

    def assign(self, outputs: ExitOutputs) -> torch.Tensor:
        """``[N]`` int64: the exit each sample leaves at."""
        self._check_fitted(outputs)
        scores = self.exit_scores(outputs)
        return assign_exits(scores, self.thresholds.to(scores.device))

    # ---------------------------------------------------- saving and loading
    def options(self) -> dict[str, Any]:
        """Constructor options needed to rebuild this policy from a file (JSON-ready)."""
        return {}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Learned tensors beyond thresholds and costs (e.g. scheduler weights)."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_tensors` gave, after thresholds, costs and classes are set.

        Raises:
            PolicyError: tensors this policy does not have, or that do not fit it.
        """
        if tensors:
            raise PolicyError(f"{self.name}: unexpected tensors {', '.join(sorted(tensors))} (this policy learns none)")

    def __repr__(self) -> str:
        budget = "unfitted" if self.budget is None else f"budget={self.budget:.6g}"
        return f"{type(self).__name__}({budget})"


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
