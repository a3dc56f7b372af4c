"""Early exits for a ResNet you already have: ``wrap(resnet)``, train the new heads, calibrate, serve.

The ResNet here is eenet_fast.zoo.ResNet, which has torchvision's layout (``conv1 .. layer4 avgpool
fc``); ``torchvision.models.resnet18(num_classes=10)`` is wrapped the same way. We first train it
briefly on Fashion-MNIST (standing in for your trained model), then:

1. ``wrap(net)`` puts an exit after each layer group, with ``fc`` as the last exit;
2. ``fit_exits`` trains only the three new heads, the ResNet frozen;
3. EENet is calibrated for an average cost of 0.65 of the full model's measured latency and runs
   for real.

Run: ``python examples/resnet_fashion_mnist.py`` (about a minute on 2 CPU cores; needs
``apt-get install dataset-fashion-mnist``).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from common import calibrate_and_run
from eenet_fast import EarlyExitModel, fit_exits, steady_allocator, wrap
from eenet_fast.datasets import load_fashion_mnist
from eenet_fast.zoo import ResNet


def trained_resnet(data: dict) -> tuple[nn.Module, EarlyExitModel, list, list, list]:
    """The ResNet trained briefly on Fashion-MNIST and wrapped with trained exit heads.

    Returns:
        ``(net, model, train, val, test)``: the ResNet, the wrapped model (eval mode), and lists of
        ``(x, y)`` batches.
    """
    torch.manual_seed(0)
    x, y = data["train"]
    train = [(x[i : i + 128], y[i : i + 128]) for i in range(0, 25_600, 128)]
    val = [(x[i : i + 500], y[i : i + 500]) for i in range(50_000, 55_000, 500)]
    x_test, y_test = data["test"]
    test = [(x_test[i : i + 500], y_test[i : i + 500]) for i in range(0, 5_000, 500)]

    start = time.perf_counter()
    net = ResNet(10, widths=(32, 64, 128, 256), blocks=1, in_channels=1)
    net.maxpool = nn.Identity()  # a small-image stem (as CIFAR ResNets do): layer1 runs at 14x14
    net = net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=len(train))
    net.train()
    for xb, yb in train:  # one epoch on 25,600 images: "your trained ResNet"
        optimizer.zero_grad()
        F.cross_entropy(net(xb), yb).backward()
        optimizer.step()
        schedule.step()
    net.eval()
    print(f"trained the ResNet in {time.perf_counter() - start:.0f} s")

    model = wrap(net, example_input=val[0][0])  # exits after layer1..layer4; checks exit 4 == net(x)
    start = time.perf_counter()
    fit_exits(model, train[:100], 2, lr=3e-3, progress=False, seed=0)  # only the new heads learn
    print(f"trained the {len(model.new_heads)} new exit heads (ResNet frozen) in {time.perf_counter() - start:.0f} s")
    return net, model.eval(), train, val, test


def main() -> dict[str, float]:
    steady_allocator()  # a time budget: keep freed CPU memory, so the time shares measured hold (see the README)
    net, model, _, val, test = trained_resnet(load_fashion_mnist())
    # budgets in measured time (full model = 1.0), where FLOPs undercount the memory-bound early layers
    return calibrate_and_run(model, net, val, test, budgets=(0.6, 0.65, 0.8), budget=0.65, costs="latency")


if __name__ == "__main__":
    main()
