"""What an exit costs: FLOPs counted through forward hooks, or wall-clock time measured as adaptive
inference pays it at the serving batch size (:mod:`eenet_fast.timing`). Costs are cumulative per exit (stages ``0..k`` plus head ``k``) and, from
:func:`measure_costs`, relative to the full model (1.0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from eenet_fast.batch import batch_size
from eenet_fast.errors import InputError
from eenet_fast.multi_exit import check_multi_exit
from eenet_fast.timing import time_exits

if TYPE_CHECKING:
    from eenet_fast.runtime import EarlyExitModel

__all__ = ["CostSpec", "count_flops", "measure_costs"]

CostSpec = Literal["flops", "latency"] | Sequence[float]


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


def measure_costs(model: EarlyExitModel, spec: CostSpec, example: Any, batch_size: int | None = None) -> list[float]:
    """Cumulative costs of the exits of ``model``, with the full model (every stage and the last
    head, on the whole batch) costing 1.0; explicit numbers are returned as given.

    * ``"flops"``: counted (:func:`count_flops`): stages ``0..k`` plus head ``k``.
    * ``"latency"``: timed on the model's device with ``example``, a batch like those it will
      serve, on a ladder of batch sizes up to ``batch_size`` (default: the example's), as
      fractions of the full model's time at that batch size, each later stage priced at its
      average time per row when half the samples reach it (see :mod:`eenet_fast.timing`): the
      first exit's cost is the smallest feasible time budget. ``calibrate(costs="latency")``
      prices around the reach of the policy it fits instead.
    """
    if not isinstance(spec, str):
        return [float(c) for c in spec]
    if spec == "flops":
        costs = count_flops(model, example)
        return [c / costs[-1] for c in costs]
    if spec == "latency":
        return time_exits(model, example, batch_size, progress=False).costs(marginal=False)
    raise InputError(f"costs must be 'flops', 'latency' or a list of {model.num_exits} numbers, got {spec!r}")
