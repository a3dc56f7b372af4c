"""EENet against maxprob on real cached outputs of a small multi-exit CNN trained on Fashion-MNIST."""

import pytest
import torch

from eenet_fast import evaluate, make_policy
from eenet_fast.datasets import load_fashion_mnist
from eenet_fast.training import fit_exits
from eenet_fast.wrapping import wrap
from eenet_fast.zoo import MultiExitCNN


@pytest.fixture(scope="module")
def cached_outputs():
    data = load_fashion_mnist()
    x, y = data["train"]
    torch.manual_seed(0)
    net = MultiExitCNN(widths=(4, 8, 16))
    fit_exits(net, [(x[i : i + 128], y[i : i + 128]) for i in range(0, 12_800, 128)], 1, progress=False, seed=0, lr=3e-3)
    model = wrap(net).eval()
    costs = model.measure_costs("flops", x[:4])
    val = model.collect([(x[i : i + 1000], y[i : i + 1000]) for i in range(50_000, 60_000, 1000)], progress=False, costs=costs)
    xt, yt = data["test"]
    test = model.collect([(xt[i : i + 1000], yt[i : i + 1000]) for i in range(0, 10_000, 1000)], progress=False, costs=costs)
    return val, test


@pytest.mark.slow
def test_eenet_is_at_least_as_accurate_as_maxprob_on_real_outputs(cached_outputs):
    val, test = cached_outputs
    c = val.costs
    for frac in (0.2, 0.4, 0.6):
        budget = float(c[0] + frac * (c[-1] - c[0]))
        eenet = evaluate(make_policy("eenet", progress=False).fit(val, budget), test)
        maxprob = evaluate(make_policy("maxprob").fit(val, budget), test)
        assert eenet.accuracy >= maxprob.accuracy - 0.003, (budget, eenet.accuracy, maxprob.accuracy)
        assert eenet.avg_cost <= 1.03 * budget and maxprob.avg_cost <= 1.03 * budget
