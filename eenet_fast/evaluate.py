"""Evaluate fitted policies on labelled exit outputs, and the policy x budget comparison."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
from tabulate import tabulate
from tqdm.auto import tqdm

from eenet_fast.errors import BudgetError, InputError, PolicyError
from eenet_fast.outputs import ExitOutputs
from eenet_fast.policies import POLICIES, Policy, make_policy, resolve_budget
from eenet_fast.policies.thresholds import average_cost
from eenet_fast.timing import LatencyModel, reach

__all__ = ["Evaluation", "Comparison", "evaluate", "check_exits", "check_pair", "compare", "format_table"]


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
        guarantee: the policy's certified budget (:meth:`BudgetGuarantee.record`), ``None`` without one.
        time: for a time budget (``policy.latency``): the serving ``batch_size``, the
            ``predicted_time_share`` of the full model's time for these exits at that batch size,
            the ``smallest_budget`` feasible there, and the model's end-to-end ``correction`` of the
            later exits' steps and ``first_correction`` of the first exit's, and the compaction
            plan ``compact_after`` (a flag per exit before the last, ``None``: after every exit);
            ``None`` otherwise.
    """

    policy: str
    budget: float
    accuracy: float
    avg_cost: float
    exit_fractions: list[float]
    per_exit_accuracy: list[float | None]
    exits: torch.Tensor
    guarantee: dict[str, Any] | None = None
    time: dict[str, Any] | None = None

    def record(self) -> dict[str, Any]:
        """A JSON-ready dict without the per-sample exits (and without ``guarantee`` or ``time`` when
        there is none)."""
        out = asdict(self)
        out.pop("exits")
        for key in ("guarantee", "time"):
            if out[key] is None:
                out.pop(key)
        return out


def evaluate(policy: Policy, outputs: ExitOutputs) -> Evaluation:
    """Run a fitted policy on labelled ``outputs`` of at least one sample (their own costs are ignored:
    the policy's are used)."""
    _require_samples(outputs, "outputs to evaluate on")
    exits = policy.assign(outputs)
    correct = outputs.correct.gather(0, exits[None])[0]
    num_exits = outputs.num_exits
    counts = torch.bincount(exits, minlength=num_exits)
    hits = torch.bincount(exits, weights=correct.double(), minlength=num_exits)
    n = outputs.num_samples
    return Evaluation(
        policy=policy.name,
        budget=float(policy.budget),
        accuracy=float(correct.double().sum()) / n,
        avg_cost=average_cost(exits, policy.costs),
        exit_fractions=(counts.double() / n).tolist(),
        per_exit_accuracy=[float(h / c) if c else None for h, c in zip(hits, counts)],
        exits=exits,
        guarantee=None if policy.guarantee is None else policy.guarantee.record(),
        time=None if policy.latency is None else _time_record(policy.latency, exits, num_exits),
    )


ROUNDING = 1e-4  # a score this close to its threshold may fall on either side in a real forward


def check_exits(policy: Policy, outputs: ExitOutputs, exits: torch.Tensor, tolerance: float = ROUNDING) -> int:
    """Check the exits ``[N]`` (int64) adaptive inference took against ``policy``'s offline
    assignment on ``outputs``, the same samples' cached exit outputs.

    A sample may leave at another exit only where, at the first exit where the two differ, its
    offline score lies within ``tolerance`` of the threshold: the network's logits differ in their
    last bits between batch sizes (up to 1e-6 on the demo CNN, batches of 32, 256 and 1000), so a
    score that close can fall on either side.

    Returns:
        The number of samples that left at another exit that way.

    Raises:
        RuntimeError: other samples left at another exit (the message names the first of them).
    """
    offline = policy.assign(outputs)
    exits = exits.to(offline.device)
    if exits.shape != offline.shape:
        raise InputError(f"need one exit per sample of the outputs ({offline.shape[0]}), got exits of shape {tuple(exits.shape)}")
    differ = (exits != offline).nonzero().squeeze(1)
    if differ.numel() == 0:
        return 0
    first = torch.minimum(exits[differ], offline[differ])
    scores = policy.exit_scores(outputs)[first, differ]
    thresholds = policy.thresholds.to(scores)[first]
    far = ((scores - thresholds).abs() > tolerance).nonzero().squeeze(1)
    if far.numel():
        i = int(far[0])
        raise RuntimeError(
            f"adaptive inference took other exits than the offline simulation for {far.numel()} sample(s) whose scores "
            f"are not within {tolerance:g} of a threshold: sample {int(differ[i])} left at exit {int(exits[differ[i]]) + 1} "
            f"instead of {int(offline[differ[i]]) + 1}, its score at exit {int(first[i]) + 1} being {float(scores[i]):.6g} "
            f"against the threshold {float(thresholds[i]):.6g}. The outputs must come from the same model and inputs"
        )
    return int(differ.numel())


def _time_record(latency: LatencyModel, exits: torch.Tensor, num_exits: int) -> dict[str, Any]:
    """What a time budget's model predicts for these exits (see :attr:`Evaluation.time`)."""
    return {
        "batch_size": latency.batch_size,
        "predicted_time_share": latency.predicted_fraction(reach(exits, num_exits)),
        "smallest_budget": latency.smallest_budgets()[latency.batch_size],
        "correction": latency.correction,
        "first_correction": latency.first_factor,
        "compact_after": None if latency.compact_after is None else list(latency.compact_after),
    }


@dataclass(frozen=True)
class Comparison:
    """One policy fitted on validation outputs for one budget, evaluated on validation and test:
    a row of :func:`compare`'s table."""

    policy: Policy
    val: Evaluation
    test: Evaluation

    def record(self) -> dict[str, Any]:
        """Test numbers (:meth:`Evaluation.record`) plus ``val_avg_cost``, ``val_accuracy``,
        ``val_exit_fractions`` and ``val_per_exit_accuracy``."""
        record = self.test.record()
        record.update(
            val_avg_cost=self.val.avg_cost,
            val_accuracy=self.val.accuracy,
            val_exit_fractions=self.val.exit_fractions,
            val_per_exit_accuracy=self.val.per_exit_accuracy,
        )
        return record


def _require_samples(outputs: ExitOutputs, what: str) -> None:
    if outputs.num_samples == 0:
        raise InputError(f"the {what} hold no samples: give outputs of at least one sample")


def check_pair(val: ExitOutputs, test: ExitOutputs, policies: Sequence[str]) -> None:
    """Raise :class:`InputError` unless ``val`` and ``test`` are labelled outputs of one model, of at
    least one sample each, with the same known costs (:class:`PolicyError` unless every policy name exists)."""
    val.require_costs()
    val.require_labels()
    test.require_labels()
    _require_samples(val, "validation outputs")
    _require_samples(test, "test outputs")
    if (val.num_exits, val.num_classes) != (test.num_exits, test.num_classes):
        raise InputError(
            f"validation has {val.num_exits} exits x {val.num_classes} classes but test has "
            f"{test.num_exits} x {test.num_classes}: they must come from the same model"
        )
    if test.costs is not None and not bool((test.costs == val.costs).all()):
        raise InputError(
            f"the validation and test outputs hold different costs ({val.costs.tolist()} vs "
            f"{test.costs.tolist()}); give both the same costs (--costs on the command line)"
        )
    unknown = [name for name in policies if name not in POLICIES]
    if unknown:
        raise PolicyError(f"unknown policy {', '.join(unknown)}; choose from {', '.join(POLICIES)}")
    if not policies:
        raise PolicyError(f"no policy given; choose from {', '.join(POLICIES)}")


def compare(
    val: ExitOutputs,
    test: ExitOutputs,
    budgets: Sequence[float | str],
    policies: Iterable[str] = POLICIES,
    *,
    seed: int = 0,
    policy_options: Mapping[str, Mapping[str, Any]] | None = None,
    progress: bool = True,
    confidence: float | None = None,
    holdout: float = 0.5,
) -> list[Comparison]:
    """Fit every policy at every budget on ``val`` and evaluate it on ``val`` and ``test``.

    Args:
        budgets: average costs (or fractions of the full cost such as ``"0.5x"``).
        policies: policy names (see :data:`eenet_fast.policies.POLICIES`).
        seed: seed of the policies that take one (``eenet``, ``search``).
        policy_options: extra constructor options per policy name, e.g. ``{"eenet": {"epochs": 10}}``.
        confidence: certify each budget at this level on a ``holdout`` share of ``val`` split with
            ``seed`` (see :meth:`Policy.fit`); ``None`` meets the budget on all of ``val``.

    Returns:
        One :class:`Comparison` per (policy, budget), policy-major (``.record()`` for JSON).
    """
    policies = list(policies)
    check_pair(val, test, policies)
    if not budgets:
        raise BudgetError("no budget given: give at least one average cost (or a fraction such as '0.5x')")
    for budget in budgets:  # every budget checked before the first policy is fitted
        resolve_budget(budget, val.costs)
    policy_options = policy_options or {}
    jobs = [(name, budget) for name in policies for budget in budgets]
    results = []
    for name, budget in tqdm(jobs, desc="calibrating", disable=not progress, leave=False):
        options: dict[str, Any] = {"eenet": {"seed": seed, "progress": False}, "search": {"seed": seed}}.get(name, {})
        options.update(policy_options.get(name, {}))
        policy = make_policy(name, **options).fit(val, budget, confidence=confidence, holdout=holdout, seed=seed)
        results.append(Comparison(policy, evaluate(policy, val), evaluate(policy, test)))
    return results


def format_table(records: Sequence[Mapping[str, Any]]) -> str:
    """The policy x budget table (GitHub Markdown) of :meth:`Comparison.record` records."""
    rows = [
        [
            r["policy"],
            f"{r['budget']:.4g}",
            f"{100 * r['accuracy']:.2f}",
            f"{r['avg_cost']:.4g}",
            f"{r['val_avg_cost']:.4g}",
            " / ".join(f"{100 * f:.1f}" for f in r["exit_fractions"]),
        ]
        for r in records
    ]
    headers = ["policy", "budget", "test acc %", "test cost", "val cost", "exit mix % (exit 1 / ... / K)"]
    if any("guarantee" in r for r in records):  # the certified budgets: the promise and how it went
        headers += ["confidence %", "holdout cost", "upper bound", "test cost <= budget"]
        for row, r in zip(rows, records):
            g = r.get("guarantee")
            row += ["-"] * 4 if g is None else [
                f"{100 * g['confidence']:.4g}", f"{g['holdout_cost']:.4g}", f"{g['upper_bound']:.4g}",
                "yes" if r["avg_cost"] <= r["budget"] else "no",
            ]
    if any("time" in r for r in records):  # time budgets: the batch size they hold at and the predicted share
        headers += ["batch", "predicted time share"]
        for row, r in zip(rows, records):
            t = r.get("time")
            row += ["-"] * 2 if t is None else [t["batch_size"], f"{t['predicted_time_share']:.3f}"]
    return tabulate(rows, headers=headers, tablefmt="github")
