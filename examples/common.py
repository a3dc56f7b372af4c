"""The part every example shares: calibrate a wrapped model on validation batches, compare the
policies on test batches, then run real adaptive inference and time it against the original model."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from eenet_fast import EarlyExitModel, compare, measure_speed
from eenet_fast.evaluate import check_exits, format_table


def calibrate_and_run(
    model: EarlyExitModel,
    full_model: Callable[[Any], torch.Tensor],
    val: Sequence[tuple[Any, torch.Tensor]],
    test: Sequence[tuple[Any, torch.Tensor]],
    *,
    budgets: Sequence[float] = (0.4, 0.6, 0.8),
    budget: float = 0.6,
    costs: str = "flops",
) -> dict[str, float]:
    """Print the policy x budget table and the adaptive run at ``budget`` (full model = 1.0).

    Args:
        model: the wrapped model, trained exits, eval mode.
        full_model: the original model's forward, returning logits ``[B, C]`` (the speed baseline).
        val, test: lists of ``(x, y)`` batches.
    """
    example = val[0][0]
    cost = model.measure_costs(costs, example)
    val_out = model.collect(val, progress=False, costs=cost)
    test_out = model.collect(test, progress=False, costs=cost)
    exit_accuracy = test_out.correct.float().mean(1).tolist()
    singles = ", ".join(f"exit {k + 1}: {100 * a:.1f} % at cost {c:.2f}" for k, (a, c) in enumerate(zip(exit_accuracy, cost)))
    print(f"single exits on test ({costs} costs, full model = 1.0): {singles}")
    rows = compare(val_out, test_out, budgets, ("eenet", "maxprob", "entropy"), progress=False)
    print(format_table([row.record() for row in rows]))

    model.calibrate(val_out, budget, "eenet", costs=costs, example=example, progress=False)
    speed, results = measure_speed(lambda: [model(x) for x, _ in test], lambda: [full_model(x) for x, _ in test],
                                   device=model.device)
    exits = torch.cat([r.exits for r in results])
    correct = torch.cat([r.predictions.cpu() == y for r, (_, y) in zip(results, test)])
    rounding = check_exits(model.policy, test_out, exits)  # raises unless a score at its threshold
    summary = {
        "accuracy": correct.float().mean().item(),
        "full_accuracy": exit_accuracy[-1],
        "mean_cost": model.policy.costs[exits.cpu()].mean().item(),
        "speedup": speed.speedup,
    }
    print(
        f"adaptive inference, eenet at budget {budget}: accuracy {100 * summary['accuracy']:.1f} % "
        f"(full model {100 * summary['full_accuracy']:.1f} %), mean cost {summary['mean_cost']:.2f}, "
        f"{speed.full_s:.2f} s -> {speed.adaptive_s:.2f} s on the test set (medians of {speed.rounds} interleaved rounds), "
        f"time share {speed.share:.3f} (the rounds' median ratio: {summary['speedup']:.2f}x); "
        + ("exits identical to the offline simulation" if not rounding else
           f"exits as the offline simulation's but for {rounding} sample(s) whose scores lie at a threshold")
    )
    return summary
