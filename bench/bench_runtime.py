"""Adaptive inference on the demo model (Fashion-MNIST 3-exit CNN) against the full model, on this CPU.

Run: ``python -m pytest bench/bench_runtime.py`` (trains and caches the demo model in
``eenet_runs/demo`` on first use, about 2 minutes). Every row passes the 10,000 test images in
batches of 256; EENet is calibrated on the validation outputs for each budget with two cost
measures: ``flops`` (counted; full model = 1) and ``latency`` (this machine's measured time per
exit, so 0.5 is half of the full model's time). A budget below the first exit's cost under a
measure is skipped with that reason. ``extra_info`` holds the speed-up over the full model measured
in the same run, the exit mix and the test accuracy.
"""

from pathlib import Path

import pytest
import torch

from eenet_fast import evaluate
from eenet_fast.demo import DemoConfig, prepare_demo

BATCH = 256
_full_time: dict[str, float] = {}


@pytest.fixture(scope="module")
def demo():
    parts = prepare_demo(DemoConfig(out=Path("eenet_runs/demo"), progress=False), log=lambda _: None)
    latency = parts.model.measure_costs("latency", parts.x_test[:BATCH])
    batches = list(parts.x_test.split(BATCH))
    return parts, {"flops": parts.val, "latency": parts.val.with_costs(latency)}, batches


def test_full_model(benchmark, demo):
    parts, _, batches = demo
    benchmark.group = "demo CNN, 10k test images, batch 256"

    def run():
        with torch.no_grad():
            for b in batches:
                parts.net(b)

    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    _full_time["mean"] = benchmark.stats.stats.mean


@pytest.mark.parametrize("costs", ["flops", "latency"])
@pytest.mark.parametrize("budget", [0.3, 0.5, 0.7])
def test_adaptive(benchmark, demo, budget, costs):
    parts, vals, batches = demo
    benchmark.group = "demo CNN, 10k test images, batch 256"
    model = parts.model
    if budget < float(vals[costs].costs[0]):
        pytest.skip(f"budget {budget} is below the first exit's {costs} cost {float(vals[costs].costs[0]):.3f}")
    policy = model.calibrate(vals[costs], budget, policy="eenet", progress=False)
    results = benchmark.pedantic(lambda: [model(b) for b in batches], rounds=5, iterations=1, warmup_rounds=1)
    predictions = torch.cat([r.predictions for r in results])
    expected = evaluate(policy, parts.test)
    assert torch.equal(torch.cat([r.exits for r in results]), expected.exits)
    benchmark.extra_info.update(
        accuracy=float((predictions == parts.y_test).double().mean()),
        exit_fractions=expected.exit_fractions,
        speedup_vs_full=_full_time.get("mean", float("nan")) / benchmark.stats.stats.mean,
    )
