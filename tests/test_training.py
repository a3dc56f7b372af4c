import pytest
import torch

from eenet_fast.datasets import load_digits_split
from eenet_fast.training import exit_loss, fit_exits
from eenet_fast.zoo import MultiExitCNN


def test_exit_loss_weights_later_exits_more():
    labels = torch.tensor([0, 1])
    good, bad = torch.tensor([[5.0, -5.0], [-5.0, 5.0]]), torch.zeros(2, 2)
    assert exit_loss([bad, good], labels, distill=False) < exit_loss([good, bad], labels, distill=False)


def test_fit_exits_trains_heads_only_when_the_backbone_is_frozen():
    torch.manual_seed(0)
    data = load_digits_split(seed=0)
    x, y = data["train"]
    loader = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 512, 64)]
    net = MultiExitCNN(widths=(4, 8), head_grid=2)
    stage_before = [p.clone() for p in net.stages.parameters()]
    bn = net.stages[0][1].running_mean.clone()
    head_before = [p.clone() for p in net.heads.parameters()]
    losses = fit_exits(net, loader, 2, train="heads", progress=False, seed=0)
    assert len(losses) == 2 and losses[1] < losses[0]
    assert all(torch.equal(a, b) for a, b in zip(stage_before, net.stages.parameters()))
    assert torch.equal(bn, net.stages[0][1].running_mean)
    assert not any(torch.equal(a, b) for a, b in zip(head_before, net.heads.parameters()))
    assert all(p.requires_grad for p in net.parameters()) and not net.training


def test_fit_exits_rejects_an_empty_loader():
    with pytest.raises(ValueError, match="empty"):
        fit_exits(MultiExitCNN(widths=(4, 8)), [], 1, progress=False)
