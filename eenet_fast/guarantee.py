"""A budget with a stated confidence: thresholds certified on held-out validation samples.

Calibration meets the budget on the validation samples it fits; new samples can cost more. With a
confidence level ``1 - delta`` the policy is fitted on one part of the validation outputs and its
thresholds are *certified* on the other, so that

    P( mean cost per sample of new data > budget ) <= delta,

the probability being over the draw of the held-out part, for new samples exchangeable with it (the
"mean cost of new data" is the expected cost per sample, the long-run average of a stream; a finite
batch of ``m`` samples scatters around it by about ``std / sqrt(m)``).

The method is Learn-then-Test (Angelopoulos, Bates, Candes, Jordan, Lei, 2021) with betting
p-values for a bounded mean (Waudby-Smith & Ramdas, JRSS-B 2024; the "WSR" bound of Learn-then-Test
and RCPS), which adapt to the cost's variance and are tighter than Hoeffding-Bentkus here:

1. split the validation outputs (seeded) into a fitting part A and a holdout part B;
2. fit the policy on A and build from A alone a fixed, ordered family of thresholds on its scores,
   from "every sample at exit 1" up to the fitted thresholds. By default (:func:`tilt_family`) the
   exponential tilt of the fitted exit mix towards cheaper exits
   (:func:`~eenet_fast.policies.thresholds.thresholds_for_fractions` of ``tilt(mix, log_s)``) over a
   grid of ``log_s`` up to 0; for a policy whose scores do not change with its fit and whose fit
   picks the exit mix itself (``search``: ``Policy.certify_by = "refit"``), the thresholds it fits
   on A at a grid of lower budgets (:func:`refit_family`), which lose less accuracy per unit of cost
   saved than tilting its mix (200 synthetic splits: 0.65 points given up against 1.01;
   ``bench/results/guarantee-search-refit-2026-11-27.md``; for EENet, whose scores are retrained
   by a fit, refitting only its thresholds lost more than the tilt: 1.48 against 0.90 points on 8
   synthetic splits);
3. on B, test each member's null hypothesis "mean cost > budget" with a valid p-value for the mean
   of a bounded variable (costs lie in ``[c_1, c_K]``; :func:`betting_pvalues`), in that fixed order
   from the cheapest, and keep the last member rejected before the first that is not.

Fixed-sequence testing controls the chance of certifying any member whose mean cost is over the
budget at ``delta`` without a multiplicity correction, because the family comes from A alone and B
is independent of A. The first member (every sample at exit 1) costs ``c_1 <= budget`` for sure, so
there is always an answer.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from eenet_fast.outputs import ExitOutputs
from eenet_fast.policies.thresholds import assign_exits, exit_mix, thresholds_for_fractions, tilt

if TYPE_CHECKING:
    from eenet_fast.policies.base import Policy

__all__ = [
    "ASSUMPTIONS",
    "METHOD",
    "REFIT_METHOD",
    "BudgetGuarantee",
    "betting_pvalues",
    "betting_upper_bound",
    "split_outputs",
    "tilt_family",
    "refit_family",
    "fixed_sequence",
    "certify",
]

METHOD = "Learn-then-Test, fixed sequence over tilted thresholds, betting (WSR) p-values"
REFIT_METHOD = "Learn-then-Test, fixed sequence over thresholds refitted at lower budgets, betting (WSR) p-values"
ASSUMPTIONS = (
    "new samples are exchangeable with the validation samples (same distribution, no drift); the bound is on "
    "the expected cost per sample (a finite batch scatters around it); it does not cover accuracy, a change of "
    "the input mix, or costs other than the calibrated ones"
)
LOG_TILTS = tuple(-0.002 * 1.05**j for j in range(204))  # 0.002 ... 40, finer near the fitted mix
# the refit family's budgets, as shares of the slack above exit 1's cost: finer near the fitted budget,
# where the certified member usually lies (5 % below it on the synthetic splits, 3.5 % on Fashion-MNIST)
REFIT_SHARES = (0.25, 0.5, 0.7, 0.8, 0.85, 0.88, 0.9, 0.91, 0.92, 0.93, 0.94, *(0.945 + 0.005 * j for j in range(11)))


@dataclass(frozen=True)
class BudgetGuarantee:
    """What a certified policy promises: its mean cost on new data is at most its budget with
    probability at least ``confidence``.

    Attributes:
        confidence: the stated level ``1 - delta``.
        method: how the thresholds were certified (:data:`METHOD` or :data:`REFIT_METHOD`).
        n_fit: validation samples the policy was fitted on (part A).
        n_holdout: validation samples the thresholds were certified on (part B).
        holdout_cost: mean cost of the certified thresholds on the holdout.
        upper_bound: the betting upper confidence bound on the certified thresholds' mean cost at
            ``confidence``, from the holdout (at most the budget; the statement that stays valid after
            the selection is "mean cost <= budget").
        log_tilt: how far the fitted exit mix was tilted towards cheaper exits (0: the fitted thresholds
            themselves were certified; ``-inf``: only "every sample at exit 1" could be); ``None`` for a
            refit family.
        assumptions: what the promise assumes and does not cover (:data:`ASSUMPTIONS`).
        fitted_budget: for a refit family, the budget the certified thresholds were fitted at on the
            fitting part (the budget itself: the fitted thresholds; ``c_1``: every sample at exit 1);
            ``None`` for a tilt family.
    """

    confidence: float
    method: str
    n_fit: int
    n_holdout: int
    holdout_cost: float
    upper_bound: float
    log_tilt: float | None
    assumptions: str = ASSUMPTIONS
    fitted_budget: float | None = None

    def record(self) -> dict[str, Any]:
        """A JSON-ready dict (``log_tilt = -inf`` written as the string ``"-inf"``)."""
        out = asdict(self)
        if self.log_tilt is not None and not math.isfinite(self.log_tilt):
            out["log_tilt"] = "-inf"
        return out

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> BudgetGuarantee:
        """The inverse of :meth:`record`."""
        tilt = record["log_tilt"]
        return cls(**{**record, "log_tilt": None if tilt is None else float(tilt)})


def check_confidence(confidence: float, holdout: float) -> None:
    """Raise ``ValueError`` unless ``0 < confidence < 1`` and ``0 < holdout < 1``."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1 (e.g. 0.95), got {confidence}")
    if not 0 < holdout < 1:
        raise ValueError(f"holdout must be a fraction strictly between 0 and 1 (e.g. 0.5), got {holdout}")


def split_outputs(outputs: ExitOutputs, holdout: float, seed: int) -> tuple[ExitOutputs, ExitOutputs]:
    """A seeded random split into a fitting part and a holdout of ``round(holdout * N)`` samples.

    Raises:
        ValueError: when either part would be empty.
    """
    n = outputs.num_samples
    n_holdout = round(holdout * n)
    if not 1 <= n_holdout <= n - 1:
        raise ValueError(
            f"cannot split {n} validation samples into a fitting part and a holdout of {holdout:.0%}: "
            "both need samples; give more validation samples or another holdout fraction"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return outputs.subset(perm[n_holdout:]), outputs.subset(perm[:n_holdout])


# ------------------------------------------------------------------------------------ the bound
def betting_pvalues(x: torch.Tensor, level: float, delta: float, cap: float = 0.75) -> torch.Tensor:
    """p-values of ``H0: mean > level`` for variables in ``[0, 1]``, by betting (Waudby-Smith & Ramdas).

    For each row, a gambler starts with capital 1 and bets a predictable fraction ``lam_t`` on the
    next sample being below ``level``: ``K_t = prod_{i <= t} (1 + lam_i (level - x_i))``. Under
    ``H0`` the capital is a nonnegative supermartingale, so by Ville's inequality
    ``P(max_t K_t >= 1 / delta) <= delta`` and ``p = min(1, 1 / max_t K_t)`` is a valid p-value
    for i.i.d. (or exchangeable) samples in any fixed order. The bets are the predictable plug-in of
    the paper tuned for ``n`` samples: ``lam_t = min(sqrt(2 log(1/delta) / (n var_{t-1})), cap / (1 - level))``
    with ``var`` a running variance estimate (Waudby-Smith & Ramdas, "Estimating means of bounded
    random variables by betting", JRSS-B 2024, Sec. 5; the WSR bound of Learn-then-Test).

    Args:
        x: ``[J, n]`` samples in ``[0, 1]``, one row per hypothesis, in the order they are bet on.
        level: the null's boundary in ``[0, 1]``.
        delta: the level the bets are tuned for (any value gives valid p-values).
        cap: the largest bet as a share of ``1 / (1 - level)`` (below 1 keeps the capital positive).

    Returns:
        ``[J]`` float64 p-values in ``[0, 1]`` (0 when ``level >= 1``: no mean can exceed it).
    """
    x = x.double().clamp(0, 1)
    rows, n = x.shape
    if level >= 1:
        return torch.zeros(rows, dtype=torch.float64)
    if level <= 0 or n == 0:
        return torch.ones(rows, dtype=torch.float64)
    t = torch.arange(1, n + 1, dtype=torch.float64)
    mean = (0.5 + x.cumsum(1)) / (t + 1)
    var = (0.25 + ((x - mean) ** 2).cumsum(1)) / (t + 1)
    var_before = torch.cat([torch.full((rows, 1), 0.25, dtype=torch.float64), var[:, :-1]], 1)
    bets = torch.sqrt(2 * math.log(1 / delta) / (n * var_before)).clamp(max=cap / (1 - level))
    log_capital = torch.log1p(bets * (level - x)).cumsum(1)
    return torch.exp(-log_capital.max(1).values.clamp_min(0))


def betting_upper_bound(x: torch.Tensor, delta: float, iterations: int = 30) -> float:
    """The upper confidence bound ``inf{level : p(level) <= delta}`` of :func:`betting_pvalues` on the
    mean of the samples ``x [n]`` in ``[0, 1]`` (bisection: the capital grows with ``level``)."""
    lo, hi = 0.0, 1.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if float(betting_pvalues(x[None], mid, delta)[0]) <= delta:
            hi = mid
        else:
            lo = mid
    return hi


# ------------------------------------------------------------------- the family and the selection
def tilt_family(scores: torch.Tensor, fitted: torch.Tensor) -> tuple[list[torch.Tensor], list[float]]:
    """The fixed, ordered family of thresholds to certify, cheapest first.

    Args:
        scores: ``[K, N]`` the policy's scores on the fitting part.
        fitted: ``[K]`` the thresholds fitted there.

    Returns:
        ``[K]`` float32 thresholds and their ``log_s``: every sample at exit 1 (``-inf``), then the
        fitted exit mix tilted by each of :data:`LOG_TILTS` from the farthest, then ``fitted`` (0).
    """
    first = torch.full((scores.shape[0],), -math.inf, dtype=torch.float32)
    mix = exit_mix(scores, fitted)
    members = [first] + [thresholds_for_fractions(scores, tilt(mix, s)) for s in reversed(LOG_TILTS)] + [fitted]
    return members, [-math.inf, *reversed(LOG_TILTS), 0.0]


def refit_family(policy: Policy, fit_part: ExitOutputs) -> tuple[list[torch.Tensor], list[float]]:
    """The fixed, ordered family of a refit, cheapest first: every sample at exit 1, then the thresholds
    ``policy`` fits on ``fit_part`` at the budgets ``c_1 + share * (budget - c_1)`` for each of
    :data:`REFIT_SHARES`, then its fitted thresholds.

    Only for policies whose scores do not depend on their fit (the thresholds of every member apply
    to the same scores) and are fitted already on ``fit_part`` (``policy.budget``, ``policy.costs``).
    It fits the policy ``len(REFIT_SHARES)`` (22) more times: a certified ``search`` takes that much
    longer than a plain one (about 0.8 s a fit on 5,000 samples with 2 rounds of 8 mixes on this
    project's CPU; the defaults search 4 rounds of 16).

    Returns:
        ``[K]`` float32 thresholds and the budget each was fitted at (``c_1`` for the first).
    """
    low = float(policy.costs[0])
    budgets = [low + share * (policy.budget - low) for share in REFIT_SHARES]
    first = torch.full((fit_part.num_exits,), -math.inf, dtype=torch.float32)
    members = [first] + [policy._fit(fit_part, b) for b in budgets] + [policy.thresholds]
    return members, [low, *budgets, policy.budget]


def fixed_sequence(pvalues: torch.Tensor, delta: float) -> int:
    """Fixed-sequence testing: the index of the last hypothesis rejected (``p <= delta``) before the
    first that is not, taking hypothesis 0 as rejected (its null is false for sure)."""
    accepted = (pvalues[1:] > delta).nonzero()
    return int(accepted[0]) if accepted.numel() else pvalues.numel() - 1


def certify(
    policy: Policy, fit_part: ExitOutputs, holdout: ExitOutputs, budget: float, confidence: float
) -> tuple[torch.Tensor, BudgetGuarantee]:
    """Certify a policy fitted on ``fit_part`` on ``holdout`` (see the module's docstring).

    Args:
        policy: fitted on ``fit_part`` (its ``thresholds`` and ``costs`` set).
        budget: the absolute budget.
        confidence: ``1 - delta``.

    Returns:
        ``[K]`` float32 thresholds whose mean cost on new data is at most ``budget`` with probability
        at least ``confidence``, and the :class:`BudgetGuarantee` that says so.
    """
    delta = 1 - confidence
    costs = policy.costs.double()
    low, span = float(costs[0]), float(costs[-1] - costs[0])
    refit = policy.certify_by == "refit"
    if refit:
        members, labels = refit_family(policy, fit_part)
    else:
        members, labels = tilt_family(policy.exit_scores(fit_part), policy.thresholds)
    scores = policy.exit_scores(holdout)
    n = holdout.num_samples
    spent = torch.stack([costs[assign_exits(scores, t)] for t in members])  # [J, n]
    if span > 0:
        pvalues = betting_pvalues((spent - low) / span, (budget - low) / span, delta)
    else:  # one exit: nothing to choose, and the cost is c_1 <= budget
        pvalues = torch.zeros(len(members), dtype=torch.float64)
    chosen = fixed_sequence(pvalues, delta)
    if chosen == 0 or span == 0:
        upper = low  # every sample at exit 1 costs exactly c_1
    else:
        upper = low + span * betting_upper_bound((spent[chosen] - low) / span, delta)
    guarantee = BudgetGuarantee(
        confidence=confidence,
        method=REFIT_METHOD if refit else METHOD,
        n_fit=fit_part.num_samples,
        n_holdout=n,
        holdout_cost=float(spent[chosen].mean()),
        upper_bound=min(upper, budget),
        log_tilt=None if refit else labels[chosen],
        fitted_budget=labels[chosen] if refit else None,
    )
    return members[chosen], guarantee
