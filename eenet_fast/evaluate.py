"""Evaluate fitted policies on labelled exit outputs, and the policy x budget comparison."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from eenet_fast.outputs import ExitOutputs
from eenet_fast.policies import POLICIES, Policy, make_policy
from eenet_fast.policies.base import average_cost

__all__ = ["Evaluation", "evaluate", "compare"]


@dataclass(frozen=True)
class Evaluation:
    """How a policy did on one set of outputs.

    Attributes:
        policy: the policy's name.
        budget: the absolute budget it was fitted for.
        accuracy: fraction of samples whose exit predicts them correctly, in ``[0, 1]``.
        avg_cost: mean cost of the exits taken.
        exit_fractions: ``[K]`` share of samples leaving at each exit.
        per_exit_accuracy: ``[K]`` accuracy among the samples leaving at each exit (``None`` if none).
        exits: ``[N]`` int64 exit of every sample.
    """

    policy: str
    budget: float
    accuracy: float
    avg_cost: float
    exit_fractions: list[float]
    per_exit_accuracy: list[float | None]
    exits: torch.Tensor

    def record(self) -> dict[str, Any]:
        """A JSON-ready dict without the per-sample exits."""
        out = asdict(self)
        out.pop("exits")
        return out


def evaluate(policy: Policy, outputs: ExitOutputs) -> Evaluation:
    """Run a fitted policy on labelled ``outputs`` (their own costs are ignored: the policy's are used)."""
    exits = policy.assign(outputs)
    correct = outputs.correct.gather(0, exits[None])[0]
    num_exits = outputs.num_exits
    counts = torch.bincount(exits, minlength=num_exits)
    hits = torch.bincount(exits, weights=correct.double(), minlength=num_exits)
    n = max(outputs.num_samples, 1)
    return Evaluation(
        policy=policy.name,
        budget=float(policy.budget),
        accuracy=float(correct.double().sum()) / n,
        avg_cost=average_cost(exits, policy.costs),
        exit_fractions=(counts.double() / n).tolist(),
        per_exit_accuracy=[float(h / c) if c else None for h, c in zip(hits, counts)],
        exits=exits,
    )


def compare(
    val: ExitOutputs,
    test: ExitOutputs,
    budgets: Sequence[float | str],
    policies: Iterable[str] = POLICIES,
    *,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Fit every policy at every budget on ``val`` and evaluate on ``test``.

    Returns:
        One record per (policy, budget): ``policy, budget, accuracy, avg_cost, val_avg_cost,
        exit_fractions, per_exit_accuracy``.
    """
    policies = list(policies)
    records = []
    jobs = [(name, budget) for name in policies for budget in budgets]
    for name, budget in tqdm(jobs, desc="calibrating", disable=not progress, leave=False):
        options = {"seed": seed, "progress": False} if name == "eenet" else {}
        policy = make_policy(name, **options).fit(val, budget)
        result = evaluate(policy, test)
        record = result.record()
        record["val_avg_cost"] = evaluate(policy, val).avg_cost
        records.append(record)
    return records
