"""Running cost on a drifting input mix, with and without a BudgetController.

Run: ``python bench/bench_drift.py --markdown bench/results/drift.md`` (minutes), or
``python -m pytest bench/bench_drift.py`` for one quick case. Each policy is fitted on the validation
outputs for the budget; a stream of 30,000 test samples (``eenet_fast.drift.drift_stream``) drifts
from the natural class mix to 80 % of samples from the three classes the early exits find hardest
(ramp over 3,000 samples), stays there for 12,000 and drifts back. The stream is served in batches
of 64, once with the policy's fixed thresholds and once with a controller (defaults: window 1000,
gain 16, tilt within +-2) built on the validation outputs. Printed per policy and running window
(1000 and 2000 samples, every window after a warm-up of 1000): the largest deviation of the running
cost from the target (the policy's validation cost, which is the budget for every policy that
spends all of it), the share of windows within +-3 %, the mean cost, the accuracy, and the range of
tilts the controller used. A stream without drift (the natural mix throughout) shows what the
controller costs when nothing moves.

Data: the tests' synthetic generator with class-dependent difficulty
(``make_synthetic_outputs(4000, class_skew=1.5)``; without it every class is equally hard and a class
mix cannot drift the cost) and the demo's Fashion-MNIST outputs (trained on first use).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from tabulate import tabulate

from cached_outputs import load_outputs, save_markdown  # beside this file
from eenet_fast import make_policy
from eenet_fast.control import BudgetController, BudgetInfeasibleWarning
from eenet_fast.drift import drift_stream, replay, running_mean

POLICIES = ("eenet", "maxprob", "entropy", "patience", "search")
BUDGETS = {"synthetic (class_skew 1.5)": 0.5, "fashion-mnist": 0.3}
LENGTH, BATCH, WARMUP, WINDOWS, TOLERANCE = 30_000, 64, 1000, (1000, 2000), 0.03


def deviation(costs: torch.Tensor, target: float, window: int) -> tuple[float, float]:
    """Largest ``|running cost / target - 1|`` over windows starting after the warm-up, and the share within tolerance."""
    relative = running_mean(costs[WARMUP:], window) / target - 1
    return float(relative.abs().max()), float((relative.abs() <= TOLERANCE).double().mean())


def run(name: str, policies: tuple[str, ...] = POLICIES) -> list[dict[str, object]]:
    val, test = load_outputs(name)
    budget = BUDGETS[name]
    drifting = drift_stream(test, LENGTH, seed=0)
    calm = drift_stream(test, LENGTH, seed=0, hard_classes=drifting.hard_classes, peak=float(drifting.hard_share[0]))
    rows = []
    for policy_name in policies:
        policy = make_policy(policy_name, **({"progress": False} if policy_name == "eenet" else {})).fit(val, budget)
        for stream_name, stream in (("drift", drifting), ("no drift", calm)):
            controller = BudgetController(policy, val)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", BudgetInfeasibleWarning)
                served = {"fixed": replay(policy, test, stream.indices, BATCH),
                          "controlled": replay(policy, test, stream.indices, BATCH, controller)}
            tilts = [a.log_tilt for a in controller.log] or [0.0]
            for mode, result in served.items():
                row: dict[str, object] = {"policy": policy_name, "stream": stream_name, "thresholds": mode,
                                          "target": controller.target}
                for window in WINDOWS:
                    worst, within = deviation(result.costs, controller.target, window)
                    row[f"max dev % (W={window})"] = 100 * worst
                    row[f"within +-3 % (W={window})"] = f"{100 * within:.1f}%"
                row["mean cost"] = float(result.costs.mean())
                row["accuracy %"] = 100 * float(result.correct.double().mean())
                row["tilt range"] = f"{min(tilts):+.2f} .. {max(tilts):+.2f}" if mode == "controlled" else "-"
                row["infeasible"] = ("yes" if caught else "no") if mode == "controlled" else "-"
                rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    sections = []
    for name in args.data:
        sections.append(f"### {name}: budget {BUDGETS[name]}, stream of {LENGTH} samples in batches of {BATCH}\n\n"
                        f"{tabulate(run(name), headers='keys', tablefmt='github', floatfmt='.4g')}\n")
        print(sections[-1], flush=True)
    save_markdown(sections, args.markdown, __doc__.splitlines()[0])
    return 0


def test_controller_holds_the_running_cost():
    rows = run("synthetic (class_skew 1.5)", ("maxprob",))
    drift = {r["thresholds"]: r for r in rows if r["stream"] == "drift"}
    assert drift["controlled"]["max dev % (W=2000)"] <= 100 * TOLERANCE < drift["fixed"]["max dev % (W=2000)"]
    print("\n" + tabulate(rows, headers="keys", tablefmt="github", floatfmt=".4g"))


if __name__ == "__main__":
    sys.exit(main())
