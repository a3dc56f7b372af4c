"""Exit costs: FLOPs counted, latency measured, explicit numbers."""

import pytest
import torch

from eenet_fast.costs import count_flops
from eenet_fast.wrapping import wrap
from eenet_fast.zoo import MultiExitCNN


def test_wrap_uses_stages_and_heads_and_costs_are_normalised():
    net = MultiExitCNN(widths=(4, 8, 8)).eval()
    model = wrap(net)
    costs = model.measure_costs("flops", torch.randn(2, 1, 28, 28))
    assert costs[-1] == 1.0 and all(a < b for a, b in zip(costs, costs[1:]))
    latency = model.measure_costs("latency", torch.randn(8, 1, 28, 28))
    assert len(latency) == 3 and latency[0] > 0 and all(a <= b for a, b in zip(latency, latency[1:]))
    assert len(model.measure_costs("latency", torch.randn(3, 1, 28, 28), batch_size=4)) == 3
    assert model.measure_costs([1, 2, 3], None) == [1.0, 2.0, 3.0]
    with torch.no_grad():
        last, expected = model.all_exits(torch.zeros(1, 1, 28, 28))[-1], net(torch.zeros(1, 1, 28, 28))
    assert torch.equal(last, expected)


def test_flops_are_cumulative_and_count_convolutions():
    net = MultiExitCNN(widths=(4, 8), head_grid=1)
    flops = count_flops(net, torch.randn(2, 1, 8, 8))
    # stage 0: conv 1->4 and 4->4 at 8x8 (+2 BN), head 0: linear 4->10
    stage0 = 2 * 64 * 4 * 9 * 1 + 2 * 64 * 4 * 9 * 4 + 2 * (2 * 64 * 4)
    assert flops[0] == pytest.approx(stage0 + 2 * 4 * 10 + 10)
    assert flops[1] > flops[0]
