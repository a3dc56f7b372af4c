"""The classic exit policies EENet is compared with, and the oracle upper bound."""

from __future__ import annotations

import math

import torch

from eenet_fast.decision import ScoreHeadParams
from eenet_fast.features import ExitFeatures
from eenet_fast.guarantee import BudgetGuarantee, check_confidence
from eenet_fast.outputs import ExitOutputs
from eenet_fast.policies import options
from eenet_fast.policies.base import ExitHistory, Policy
from eenet_fast.policies.thresholds import (
    assign_exits,
    average_cost,
    best_over_bases,
    exit_mix,
    fit_fractions_to_budget,
    random_bases,
)

__all__ = ["MaxProbPolicy", "EntropyPolicy", "PatiencePolicy", "SearchPolicy", "OraclePolicy"]


class MaxProbPolicy(Policy):
    """MSDNet-style budgeted exits: score = max softmax score ``m_k``; exit fractions follow a
    geometric law ``p_k proportional to s^k`` with ``s`` as large as the budget allows."""

    name = "maxprob"

    def score(self, k: int, features: ExitFeatures, history: ExitHistory) -> torch.Tensor:
        return features.max_score

    def score_head(self, k: int) -> ScoreHeadParams:
        return ScoreHeadParams.select(0)

    def _fit(self, val: ExitOutputs, budget: float) -> torch.Tensor:
        uniform = torch.full((val.num_exits,), 1.0 / val.num_exits, dtype=torch.float64)
        return fit_fractions_to_budget(self.exit_scores(val), uniform, val.costs, budget)


class EntropyPolicy(MaxProbPolicy):
    """BranchyNet-style exits: the geometric exit mix of :class:`MaxProbPolicy` on the entropy
    confidence ``e_k = 1 - H(p_k) / log C`` instead of the max score."""

    name = "entropy"

    def score(self, k: int, features: ExitFeatures, history: ExitHistory) -> torch.Tensor:
        return features.entropy_conf

    def score_head(self, k: int) -> ScoreHeadParams:
        return ScoreHeadParams.select(1)


class PatiencePolicy(Policy):
    """PABEE: leave once the prediction has stayed the same for ``P`` consecutive exits.

    The score at exit ``k`` is the number of exits right before ``k`` that agree with exit ``k``'s
    prediction without a break; a sample leaves when it reaches ``P`` (``P = 0`` sends everything to
    exit 1). Fitting picks the ``P`` with the best validation accuracy within the budget.
    """

    name = "patience"

    def __init__(self) -> None:
        super().__init__()
        self.patience: int | None = None

    def score(self, k: int, features: ExitFeatures, history: ExitHistory) -> torch.Tensor:
        if k == 0:
            return torch.zeros_like(features.max_score)
        same = history.predictions[:, -1] == features.prediction
        return torch.where(same, history.scores[:, -1] + 1, torch.zeros_like(features.max_score))

    def _fit(self, val: ExitOutputs, budget: float) -> torch.Tensor:
        scores = self.exit_scores(val)
        correct = val.correct
        candidates: list[tuple[float, float, torch.Tensor]] = []
        for patience in range(val.num_exits):
            thresholds = torch.full((val.num_exits,), float(patience))
            thresholds[-1] = -math.inf
            exits = assign_exits(scores, thresholds)
            cost = average_cost(exits, val.costs)
            if cost <= budget:
                accuracy = float(correct.gather(0, exits[None]).float().mean())
                candidates.append((accuracy, cost, thresholds))
        # P = 0 (everything at exit 1) always fits a feasible budget; best accuracy, then lowest cost
        thresholds = max(candidates, key=lambda c: (c[0], -c[1]))[2]
        self.patience = int(thresholds[0]) if val.num_exits > 1 else 0
        return thresholds


class SearchPolicy(MaxProbPolicy):
    """Direct search for max-score thresholds with the best validation accuracy within the budget.

    Thresholds are parametrised by the exit mix they produce: starting from MSDNet's geometric mix,
    ``rounds`` rounds of ``samples`` random mixes around the best one so far (the spread halving each
    round) are each fitted to the budget (and to half and three quarters of its slack above the
    first exit's cost, since a later exit is not always more accurate), and the most accurate on
    validation is kept.

    Args:
        rounds: search rounds.
        samples: random mixes per round.
        seed: makes the search deterministic.
    """

    name = "search"
    certify_by = "refit"  # its fit picks the exit mix: refits at lower budgets beat tilting that mix

    def __init__(self, rounds: int = 4, samples: int = 16, seed: int = 0) -> None:
        super().__init__()
        self.rounds = options.integer(self.name, "rounds", rounds, 0)
        self.samples = options.integer(self.name, "samples", samples, 1)
        self.seed = options.seed(self.name, seed)

    def _fit(self, val: ExitOutputs, budget: float) -> torch.Tensor:
        scores, correct = self.exit_scores(val), val.correct.float()
        generator = torch.Generator().manual_seed(self.seed)
        best = torch.full((val.num_exits,), 1.0 / val.num_exits, dtype=torch.float64)
        thresholds, accuracy = best_over_bases(scores, correct, val.costs, budget, [best])
        for round_ in range(self.rounds):
            bases = random_bases(best, self.samples, 2.0 / 2**round_, generator)
            trial, trial_accuracy = best_over_bases(scores, correct, val.costs, budget, bases, levels=(0.5, 0.75, 1.0))
            if trial_accuracy > accuracy:
                thresholds, accuracy = trial, trial_accuracy
                best = exit_mix(scores, trial)
        return thresholds


class OraclePolicy(Policy):
    """The upper bound: every sample leaves at its first correct exit (the first exit when none is
    correct), as far as the budget allows; needs labels, so it cannot be deployed.

    On any labelled set it maximises the number of correct samples under the average-cost budget
    (a greedy knapsack: the cheapest rescues first).
    """

    name = "oracle"
    deployable = False

    def score(self, k: int, features: ExitFeatures, history: ExitHistory) -> torch.Tensor:
        raise TypeError("the oracle needs labels: use assign(outputs) on labelled outputs")

    def fit(
        self, val: ExitOutputs, budget: float | str, *, confidence: float | None = None, holdout: float = 0.5, seed: int = 0
    ) -> "OraclePolicy":
        """Fit on all of ``val``; with ``confidence`` the guarantee says the budget holds by construction."""
        super().fit(val, budget)
        if confidence is not None:
            check_confidence(confidence, holdout)
            cost = average_cost(self.assign(val), self.costs)
            self.guarantee = BudgetGuarantee(confidence, "by construction", val.num_samples, 0, cost, self.budget, 0.0,
                                             "the oracle spends at most the budget on every labelled set it is applied to")
        return self

    def _fit(self, val: ExitOutputs, budget: float) -> torch.Tensor:
        thresholds = torch.zeros(val.num_exits)
        thresholds[-1] = -math.inf
        return thresholds  # a placeholder: the oracle decides per sample from labels

    def assign(self, outputs: ExitOutputs) -> torch.Tensor:
        self._check_fitted(outputs)
        correct = outputs.correct
        costs = self.costs
        any_correct = correct.any(0)
        first = correct.to(torch.uint8).argmax(0)
        extra = torch.where(any_correct, costs[first] - costs[0], torch.full_like(costs[first], math.inf))
        exits = torch.zeros(outputs.num_samples, dtype=torch.long)
        allowance = (self.budget - float(costs[0])) * outputs.num_samples
        order = torch.argsort(extra, stable=True)
        spend = torch.cumsum(extra[order], 0)
        chosen = order[(spend <= allowance + 1e-9) & torch.isfinite(extra[order])]
        exits[chosen] = first[chosen]
        return exits
