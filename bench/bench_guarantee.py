"""Does a budget certified at 95 % hold on data the calibration has not seen, and what does it cost?

Run: ``python bench/bench_guarantee.py --splits 200 --markdown bench/results/guarantee.md`` (the
issue's figures; hours on a busy 2-core CPU), or ``python -m pytest bench/bench_guarantee.py`` for a
quick check on a few splits. For each data set the validation and test outputs are pooled and split
again at random (same sizes) ``--splits`` times; on each split every policy is fitted on the
validation part three times, plainly (the budget met on validation), with ``confidence=0.95``
(fitted on half of it, certified on the other half) and plainly on that half alone, and all are
evaluated on the test part. Printed per policy: the share of splits whose test cost is within the
budget (the promise says at least 95 % for the mean cost of new data; a finite test set adds its
own scatter), the same share without certification, the test accuracy the certification gives up
against the plain fit (mean and its standard error, in points) and how much of it the fit on half
the samples alone gives up (the rest is the margin the holdout's bound takes off the cost).

Data: the tests' synthetic outputs (``make_synthetic_outputs(4000, seed=1)`` and ``seed=2``) and
the demo's Fashion-MNIST outputs (``eenet_runs/demo/{val,test}.npz``, trained on first use, about 2
minutes on an idle 2-core CPU). EENet and search run a reduced configuration (EENet 10 epochs and 4
restarts instead of 40 and 16; search 2 rounds of 8 mixes instead of 4 of 16) so that 200 splits
take hours, not a day; both fits of a split use the same configuration.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tabulate import tabulate
from tqdm.auto import tqdm

from cached_outputs import load_outputs, save_markdown  # beside this file
from eenet_fast import ExitOutputs, evaluate, make_policy
from eenet_fast.guarantee import split_outputs
from eenet_fast.policies import POLICIES

OPTIONS = {"eenet": {"epochs": 10, "restarts": 4, "progress": False}, "search": {"rounds": 2, "samples": 8}}
HOLDOUT = 0.5  # the certified fit's share of the validation samples held out (Policy.fit's default)
BUDGETS = {"synthetic": 0.5, "fashion-mnist": 0.3}  # absolute costs; both are fractions of the full model
CUTS = tuple(0.004 * j for j in range(1, 11))  # --hindsight: plain fits at budget * (1 - cut)


@dataclass(frozen=True)
class Split:
    """One policy on one split: test cost and accuracy, plain and certified."""

    policy: str
    plain_cost: float
    plain_accuracy: float
    certified_cost: float
    certified_accuracy: float
    upper_bound: float
    fit_part_accuracy: float  # fitted plainly on the certified fit's fitting part alone (no certification)
    cut_costs: tuple[float, ...] = ()  # --hindsight: plain fits at budget * (1 - CUTS[j])
    cut_accuracies: tuple[float, ...] = ()


def run(val: ExitOutputs, test: ExitOutputs, budget: float, splits: int, policies: list[str],
        confidence: float = 0.95, progress: bool = True, hindsight: bool = False) -> list[Split]:
    """Fit every policy plainly and certified on ``splits`` random re-splits of ``val + test``; with
    ``hindsight`` also plainly at the budget cut by each of :data:`CUTS`."""
    pool = ExitOutputs(torch.cat([val.logits, test.logits], 1), torch.cat([val.labels, test.labels]), val.costs)
    rows = []
    for split in tqdm(range(splits), desc="splits", disable=not progress):
        perm = torch.randperm(pool.num_samples, generator=torch.Generator().manual_seed(split))
        v, t = pool.subset(perm[: val.num_samples]), pool.subset(perm[val.num_samples :])
        for name in policies:
            plain = evaluate(make_policy(name, **OPTIONS.get(name, {})).fit(v, budget), t)
            policy = make_policy(name, **OPTIONS.get(name, {})).fit(v, budget, confidence=confidence, seed=split,
                                                                    holdout=HOLDOUT)
            certified = evaluate(policy, t)
            fit_part, _ = split_outputs(v, HOLDOUT, split)  # the part the certified fit was fitted on
            on_fit_part = evaluate(make_policy(name, **OPTIONS.get(name, {})).fit(fit_part, budget), t)
            cut = [evaluate(make_policy(name, **OPTIONS.get(name, {})).fit(v, budget * (1 - c)), t)
                   for c in (CUTS if hindsight else ())]
            rows.append(Split(name, plain.avg_cost, plain.accuracy, certified.avg_cost, certified.accuracy,
                              policy.guarantee.upper_bound, on_fit_part.accuracy,
                              tuple(e.avg_cost for e in cut), tuple(e.accuracy for e in cut)))
    return rows


def summarize(rows: list[Split], budget: float, confidence: float = 0.95) -> list[dict[str, float | str]]:
    """Per policy: coverage (certified and plain), accuracy given up (mean, standard error), costs."""
    out = []
    for name in dict.fromkeys(r.policy for r in rows):
        mine = [r for r in rows if r.policy == name]
        given_up = torch.tensor([100 * (r.plain_accuracy - r.certified_accuracy) for r in mine], dtype=torch.float64)
        out.append({
            "policy": name,
            "splits": len(mine),
            "coverage %": 100 * sum(r.certified_cost <= budget for r in mine) / len(mine),
            "plain coverage %": 100 * sum(r.plain_cost <= budget for r in mine) / len(mine),
            "accuracy given up (pt)": float(given_up.mean()),
            "std err (pt)": float(given_up.std() / math.sqrt(len(mine))) if len(mine) > 1 else float("nan"),
            "of which fitting on half (pt)": sum(100 * (r.plain_accuracy - r.fit_part_accuracy) for r in mine) / len(mine),
            "certified test cost": sum(r.certified_cost for r in mine) / len(mine),
            "plain test cost": sum(r.plain_cost for r in mine) / len(mine),
            "worst certified cost / budget": max(r.certified_cost for r in mine) / budget,
            "worst plain cost / budget": max(r.plain_cost for r in mine) / budget,
            **hindsight_cut(mine, budget, confidence),
        })
    return out


def hindsight_cut(rows: list[Split], budget: float, confidence: float) -> dict[str, float | str]:
    """The smallest of :data:`CUTS` whose plain fits (on all the validation samples, no holdout) keep
    the test cost within the budget in a ``confidence`` share of the splits, chosen knowing the test
    costs, and the test accuracy it gives up against the plain fit: what a cut of the budget by one
    fixed margin, tuned in hindsight, gives up to meet the coverage the promise asks for. Empty
    without ``--hindsight``."""
    if not rows[0].cut_costs:
        return {}
    for j, cut in enumerate(CUTS):
        if sum(r.cut_costs[j] <= budget for r in rows) >= confidence * len(rows):
            given_up = sum(100 * (r.plain_accuracy - r.cut_accuracies[j]) for r in rows) / len(rows)
            return {"hindsight cut %": 100 * cut, "its accuracy given up (pt)": given_up}
    return {"hindsight cut %": f"> {100 * CUTS[-1]:.3g}", "its accuracy given up (pt)": "-"}


def table(summary: list[dict[str, float | str]]) -> str:
    return tabulate(summary, headers="keys", tablefmt="github", floatfmt=".4g")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=int, default=200)
    parser.add_argument("--data", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    parser.add_argument("--policy", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables to this file")
    parser.add_argument("--hindsight", action="store_true",
                        help="also fit plainly at the budget cut by 0.4 %% ... 4 %% and report the smallest cut that "
                             "meets the coverage in hindsight (10 more fits per split and policy)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # thousands of small ops: more threads only contend on a shared machine
    sections = []
    for name in args.data:
        val, test = load_outputs(name)
        budget = BUDGETS[name]
        rows = run(val, test, budget, args.splits, args.policy, args.confidence, hindsight=args.hindsight)
        sections.append(
            f"### {name}: {val.num_samples} validation / {test.num_samples} test samples, costs "
            f"{', '.join(f'{c:.4g}' for c in val.costs.tolist())}, budget {budget}, confidence {args.confidence}, "
            f"{args.splits} splits\n\n{table(summarize(rows, budget, args.confidence))}\n"
        )
        print(sections[-1], flush=True)
    save_markdown(sections, args.markdown, __doc__.splitlines()[0])
    return 0


def test_certified_budget_on_a_few_splits():
    """A quick run: the certified fits keep the synthetic test cost within the budget more often than
    the plain ones (the full figures need ``--splits 200``)."""
    val, test = load_outputs("synthetic")
    summary = summarize(run(val, test, 0.5, 8, ["maxprob", "patience"], progress=False), 0.5)
    for row in summary:
        assert row["coverage %"] >= row["plain coverage %"]
    print("\n" + table(summary))


def test_the_hindsight_cut_is_the_smallest_that_covers():
    """Coverage counted per cut over the splits; the first cut reaching the level is reported."""
    costs = [(0.52, 0.50, 0.49), (0.51, 0.505, 0.48), (0.49, 0.48, 0.47), (0.50, 0.49, 0.48)]  # 3 of CUTS per split
    rows = [Split("p", 0.5, 0.8, 0.5, 0.8, 0.5, 0.8, c + (0.4,) * (len(CUTS) - 3), (0.79, 0.78, 0.77) + (0.7,) * (len(CUTS) - 3))
            for c in costs]
    found = hindsight_cut(rows, 0.5, 0.75)  # cut 0 covers 2 of 4 splits, cut 1 covers 3
    assert found["hindsight cut %"] == 100 * CUTS[1] and math.isclose(found["its accuracy given up (pt)"], 2.0)
    assert hindsight_cut(rows, 0.5, 1.0)["hindsight cut %"] == 100 * CUTS[2]
    assert hindsight_cut([Split("p", 0.5, 0.8, 0.5, 0.8, 0.5, 0.8)], 0.5, 0.95) == {}


if __name__ == "__main__":
    sys.exit(main())
