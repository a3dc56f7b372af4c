"""Adaptive inference on the demo model (Fashion-MNIST 3-exit CNN) against the full model, on this CPU.

Run: ``python -m pytest bench/bench_runtime.py`` (trains and caches the demo model in
``eenet_runs/demo`` on first use, about 2 minutes). Every row passes the 10,000 test images in
batches of 256; EENet is calibrated on the validation outputs for each budget with two cost
measures: ``flops`` (counted; full model = 1) and ``latency`` (this machine's measured time per
exit, each stage timed at the batch size the policy lets reach it, so 0.5 is half of the full
model's time). A budget below the first exit's cost under a
measure is skipped with that reason. ``extra_info`` holds the speed-up over the full model measured
in the same run (ratio of the mean times, and of the best rounds, which a busy machine disturbs
less), the exit mix and the test accuracy.
"""

from pathlib import Path

import pytest
import torch

from eenet_fast import evaluate
from eenet_fast.evaluate import check_exits
from eenet_fast.demo import DemoConfig, prepare_demo

BATCH = 256
_full_time: dict[str, float] = {}


@pytest.fixture(scope="module")
def demo():
    parts = prepare_demo(DemoConfig(out=Path("eenet_runs/demo"), progress=False), log=lambda _: None)
    first_exit = {"flops": float(parts.val.costs[0]), "latency": parts.model.measure_costs("latency", parts.x_test[:BATCH])[0]}
    return parts, first_exit, list(parts.x_test.split(BATCH))


def test_full_model(benchmark, demo):
    parts, _, batches = demo
    benchmark.group = "demo CNN, 10k test images, batch 256"

    def run():
        with torch.no_grad():
            for b in batches:
                parts.net(b)

    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    _full_time.update(mean=benchmark.stats.stats.mean, min=benchmark.stats.stats.min)


@pytest.mark.parametrize("costs", ["flops", "latency"])
@pytest.mark.parametrize("budget", [0.3, 0.5, 0.7])
def test_adaptive(benchmark, demo, budget, costs):
    parts, first_exit, batches = demo
    benchmark.group = "demo CNN, 10k test images, batch 256"
    model = parts.model
    if budget < first_exit[costs]:
        pytest.skip(f"budget {budget} is below the first exit's {costs} cost {first_exit[costs]:.3f}")
    example = parts.x_test[:BATCH] if costs == "latency" else None
    policy = model.calibrate(parts.val, budget, policy="eenet", costs=costs, example=example, progress=False)
    results = benchmark.pedantic(lambda: [model(b) for b in batches], rounds=5, iterations=1, warmup_rounds=1)
    predictions = torch.cat([r.predictions for r in results])
    expected = evaluate(policy, parts.test)
    check_exits(policy, parts.test, torch.cat([r.exits for r in results]))  # raises unless a score at its threshold
    benchmark.extra_info.update(
        accuracy=float((predictions == parts.y_test).double().mean()),
        exit_fractions=expected.exit_fractions,
        speedup_vs_full=_full_time.get("mean", float("nan")) / benchmark.stats.stats.mean,
        speedup_vs_full_best_round=_full_time.get("min", float("nan")) / benchmark.stats.stats.min,
    )
