"""The demo's model zoo: a small multi-exit CNN and a torchvision-layout ResNet (both follow the
multi-exit convention of :mod:`eenet_fast.multi_exit` or are recognised by :func:`eenet_fast.wrap`)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from eenet_fast.heads import conv_head
from eenet_fast.multi_exit import all_exits

__all__ = ["MultiExitCNN", "ResNet"]


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class MultiExitCNN(nn.Module):
    """A plain CNN for small images with one exit after each stage.

    Stage ``k`` is (Conv3x3-BN-ReLU) x 2 at width ``widths[k]``, followed by a 2x2 max-pool except
    for the last stage; so the resolution halves from stage to stage while the width grows. Head ``k``
    average-pools its stage's output to a ``head_grid x head_grid`` grid and applies
    ``Linear(widths[k] * head_grid**2, num_classes)``: keeping a coarse layout makes the exits far
    more accurate than a global pool for a negligible cost (on Fashion-MNIST after 3 epochs: exit 1
    about 83 % instead of 55 %, and the last exit 89 % instead of 84 %, below exit 2).

    The default widths grow faster than the resolution shrinks, so that later stages are dearer
    and early exits save real time: on 28x28 inputs the cumulative costs of the three exits are
    about 12 %, 40 % and 100 % of the full model's 18 MFLOPs per image (see :func:`eenet_fast.costs.count_flops`),
    and on a 2-core CPU about 30 %, 55 % and 100 % of its wall time. Parameters and activations
    are kept channels-last (``forward`` and ``all_exits`` convert their input), which is about
    1.5-2x faster on CPU for these narrow convolutions.

    Args:
        in_channels: channels of the input images.
        num_classes: classes ``C``.
        widths: output channels of each stage; ``len(widths)`` is the number of exits ``K``.
        head_grid: side of the pooled grid read by every head (1: global average pool).
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, widths: Sequence[int] = (12, 32, 96), head_grid: int = 4
    ) -> None:
        super().__init__()
        if len(widths) < 1 or any(w < 1 for w in widths):
            raise ValueError(f"widths must be a non-empty sequence of positive ints, got {tuple(widths)}")
        if in_channels < 1 or num_classes < 2:
            raise ValueError(f"need in_channels >= 1 and num_classes >= 2, got {in_channels} and {num_classes}")
        self.stages = nn.ModuleList()
        self.heads = nn.ModuleList()
        previous = in_channels
        for k, width in enumerate(widths):
            layers = _conv_bn_relu(previous, width) + _conv_bn_relu(width, width)
            if k < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            self.stages.append(nn.Sequential(*layers))
            self.heads.append(conv_head(width, num_classes, head_grid))
            previous = width
        self.to(memory_format=torch.channels_last)

    @property
    def num_exits(self) -> int:
        """Number of exits ``K``."""
        return len(self.heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the full model: every stage, then the last head only.

        Args:
            x: ``[B, in_channels, H, W]`` float images.

        Returns:
            ``[B, num_classes]`` logits of the last exit.
        """
        x = x.contiguous(memory_format=torch.channels_last)
        for stage in self.stages:
            x = stage(x)
        return self.heads[-1](x)

    def all_exits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Run every stage once, in order, and every head on its stage's output.

        Args:
            x: ``[B, in_channels, H, W]`` float images.

        Returns:
            ``K`` tensors ``[B, num_classes]``: the logits of exits ``0..K-1``.
        """
        return all_exits(self.stages, self.heads, x.contiguous(memory_format=torch.channels_last))


class _BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (a 1x1 projection when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + shortcut)


class ResNet(nn.Module):
    """A single-exit ResNet with torchvision's module layout and forward (``conv1 bn1 relu maxpool
    layer1..layer4 avgpool fc``), for examples and tests where torchvision is not installed:
    :func:`eenet_fast.wrap` treats it exactly as it treats ``torchvision.models.resnet18()``.

    ``ResNet()`` is ResNet-18's shape (widths 64..512, two basic blocks per group); pass small
    ``widths`` for a model that trains in seconds on a CPU.

    Args:
        num_classes: outputs of ``fc``.
        widths: channels of ``layer1..layerN`` (layer ``i > 1`` halves the resolution).
        blocks: basic blocks per layer group.
        in_channels: input channels (3 for RGB, 1 for grey images).
        stem_stride: stride of ``conv1`` (7x7; 2 as in ImageNet models, 1 for small images) and of
            ``maxpool`` (3x3).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        widths: Sequence[int] = (64, 128, 256, 512),
        blocks: int = 2,
        in_channels: int = 3,
        stem_stride: int = 2,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 7, stem_stride, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stem_stride, 1)
        previous = widths[0]
        for i, width in enumerate(widths):
            group = [_BasicBlock(previous if b == 0 else width, width, 2 if i and b == 0 else 1) for b in range(blocks)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*group))
            previous = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(previous, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` of images ``[B, in_channels, H, W]``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        i = 1
        while hasattr(self, f"layer{i}"):
            x = getattr(self, f"layer{i}")(x)
            i += 1
        return self.fc(torch.flatten(self.avgpool(x), 1))
