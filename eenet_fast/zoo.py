"""Small multi-exit networks, a torchvision-layout ResNet, and a FLOP counter for any model built of
``stages`` and ``heads``.

Convention shared by every multi-exit model in this package: ``model.stages`` and ``model.heads``
are :class:`torch.nn.ModuleList` of equal length ``K``; exit ``k`` is ``heads[k]`` applied to the
output of ``stages[k]``, stage ``k`` reads stage ``k-1``'s output, and ``model.all_exits(x)``
returns the ``K`` exits' logits ``[B, C]`` in order. The last head is the final classifier.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from eenet_fast.batch import batch_size

__all__ = ["MultiExitCNN", "ResNet", "count_flops", "check_multi_exit"]


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
    about 12 %, 40 % and 100 % of the full model's 18 MFLOPs per image (see :func:`count_flops`),
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
            self.heads.append(
                nn.Sequential(
                    nn.AdaptiveAvgPool2d(head_grid), nn.Flatten(), nn.Linear(width * head_grid**2, num_classes)
                )
            )
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
        x = x.contiguous(memory_format=torch.channels_last)
        logits = []
        for stage, head in zip(self.stages, self.heads):
            x = stage(x)
            logits.append(head(x))
        return logits


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


def _layer_flops(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> float:
    """FLOPs of one call of a counted layer, summed over the batch (2 per multiply-add)."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        macs = output.numel() * (module.in_channels // module.groups) * kh * kw
        return 2.0 * macs + (output.numel() if module.bias is not None else 0)
    if isinstance(module, nn.Linear):
        return 2.0 * output.numel() * module.in_features + (output.numel() if module.bias is not None else 0)
    return 2.0 * inputs[0].numel()  # batch norm at inference: one multiply and one add per element


def count_flops(model: nn.Module, example_input: Any) -> list[float]:
    """Cumulative FLOPs per sample to reach and evaluate each exit of a multi-exit model.

    Exit ``k`` costs stages ``0..k`` plus head ``k``. Counted, with one multiply-add as 2 FLOPs:

    * ``nn.Conv2d``: ``2 * (C_in / groups) * kh * kw`` per output element, plus 1 for a bias;
    * ``nn.Linear``: ``2 * in_features`` per output element, plus 1 for a bias;
    * ``nn.BatchNorm1d/2d/3d``: 2 per element (scale and shift, as at inference).

    Activations, pooling, softmax, embeddings, layer norms, attention's matrix products (they are
    not modules) and other element-wise or data-movement operations are not counted: for
    transformers on long sequences, prefer measured latency. The model is run once through ``model.all_exits(example_input)`` in eval mode under
    ``torch.no_grad`` (its train/eval mode is restored afterwards), with forward hooks on every
    counted layer. Layers inside ``heads[k]`` are charged to head ``k``; every other counted layer
    (those of the stages, and any outside both lists such as a stem) is charged to the stage that
    last started running, or stage 0 before any has.

    Args:
        model: a module with ``stages`` and ``heads`` (equal-length ``nn.ModuleList``) and
            ``all_exits(x) -> list[Tensor]``.
        example_input: one batch of the model's input (a tensor ``[B, ...]`` or a tuple/dict of tensors
            with the batch first); costs are divided by ``B``.

    Returns:
        ``K`` floats, strictly increasing when every stage has a counted layer: the cumulative FLOPs
        per sample of exits ``0..K-1``.
    """
    stages, heads = check_multi_exit(model)
    num_exits = len(heads)
    stage_flops = [0.0] * num_exits
    head_flops = [0.0] * num_exits
    current_stage = 0
    head_of = {id(m): k for k, head in enumerate(heads) for m in head.modules()}

    def enter_stage(k: int):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            nonlocal current_stage
            current_stage = k

        return hook

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        flops = _layer_flops(module, inputs, output)
        if id(module) in head_of:
            head_flops[head_of[id(module)]] += flops
        else:
            stage_flops[current_stage] += flops

    counted = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    handles = [stage.register_forward_pre_hook(enter_stage(k)) for k, stage in enumerate(stages)]
    handles += [m.register_forward_hook(count) for m in model.modules() if isinstance(m, counted)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model.all_exits(example_input)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    batch = batch_size(example_input)
    cumulative, total = [], 0.0
    for k in range(num_exits):
        total += stage_flops[k]
        cumulative.append((total + head_flops[k]) / batch)
    return cumulative


def check_multi_exit(model: nn.Module) -> tuple[nn.ModuleList, nn.ModuleList]:
    """Check that ``model`` follows the multi-exit convention and return its ``(stages, heads)``.

    Raises:
        TypeError: ``stages`` or ``heads`` is missing or not an ``nn.ModuleList``, or there is no
            callable ``all_exits``.
        ValueError: the two lists are empty or of different lengths.
    """
    stages, heads = getattr(model, "stages", None), getattr(model, "heads", None)
    if not isinstance(stages, nn.ModuleList) or not isinstance(heads, nn.ModuleList):
        raise TypeError(
            f"{type(model).__name__} is not a multi-exit model: it needs `stages` and `heads` attributes "
            "that are nn.ModuleList (exit k = heads[k] on stages[k]'s output)"
        )
    if len(stages) != len(heads) or len(heads) == 0:
        raise ValueError(f"need as many stages as heads, at least one, got {len(stages)} and {len(heads)}")
    if not callable(getattr(model, "all_exits", None)):
        raise TypeError(f"{type(model).__name__} needs a method all_exits(x) -> list of [B, C] logits")
    return stages, heads
