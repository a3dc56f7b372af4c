"""What an exit costs: FLOPs counted through forward hooks, or wall-clock time measured as adaptive
inference pays it. Costs are cumulative per exit (stages ``0..k`` plus head ``k``) and, from
:func:`measure_costs`, relative to the full model (1.0).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable, Literal

import torch
from torch import nn

from eenet_fast.backends import select_backend
from eenet_fast.batch import batch_size, map_batch, move_to
from eenet_fast.errors import InputError
from eenet_fast.features import exit_features
from eenet_fast.multi_exit import check_multi_exit

if TYPE_CHECKING:
    from eenet_fast.runtime import EarlyExitModel

__all__ = ["CostSpec", "count_flops", "measure_costs", "measure_latency", "best_time"]

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


def measure_costs(model: EarlyExitModel, spec: CostSpec, example: Any, reach: Sequence[float] | None = None) -> list[float]:
    """Cumulative costs of the exits of ``model``, with the full model (every stage and the last
    head, on the whole batch) costing 1.0; explicit numbers are returned as given.

    * ``"flops"``: counted (:func:`count_flops`): stages ``0..k`` plus head ``k``.
    * ``"latency"``: timed on the model's device with ``example``, a batch like those it will
      serve (:func:`measure_latency`).

    Args:
        reach: ``K`` fractions of the samples that reach each stage, only for ``"latency"``.
    """
    if not isinstance(spec, str):
        return [float(c) for c in spec]
    if spec == "flops":
        costs = count_flops(model, example)
        return [c / costs[-1] for c in costs]
    if spec == "latency":
        return measure_latency(model, example, reach)
    raise InputError(f"costs must be 'flops', 'latency' or a list of {model.num_exits} numbers, got {spec!r}")


@torch.no_grad()
def measure_latency(model: EarlyExitModel, example: Any, reach: Sequence[float] | None = None, repeats: int = 7) -> list[float]:
    """Per-sample cumulative median times of the exits over the full model's.

    Exit ``k`` costs what adaptive inference really pays per sample to get there: for every stage
    ``j <= k``, the stage, its head, the exit decision and the compaction after it, timed at the
    batch size that reaches stage ``j`` (``reach[j]`` of the batch; all of it when ``reach`` is
    ``None``) and divided by that batch size. So the last exit costs a little more than 1.0 (it also
    pays the early heads), and a policy's average cost is the fraction of the full model's time that
    adaptive inference takes. Each repeat runs the full model once, then the exits as
    :meth:`EarlyExitModel.forward` does, so every stage is timed on a gathered batch.

    Args:
        example: a batch like those the model will serve (tensor or tuple/dict, batch first).
        reach: ``K`` fractions of the samples that reach each stage (non-increasing, ``reach[0] = 1``).
        repeats: timed repeats (after one warm-up); the median is kept.
    """
    model.require_eval("measure latency")
    device = model.device
    backend = select_backend(model.backend, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - start, out

    x = move_to(example, device)
    batch = batch_size(x)
    num_exits = model.num_exits
    reach = [1.0] * num_exits if reach is None else [min(max(float(r), 0.0), 1.0) for r in reach]
    if len(reach) != num_exits:
        raise InputError(f"reach needs one fraction per exit ({num_exits}), got {len(reach)}")
    counts = [max(1, round(r * batch)) for r in reach] + [0]
    full_times, exit_times = [], [[] for _ in range(num_exits)]
    for _ in range(repeats + 1):  # the first repeat warms up and is not kept
        full = 0.0
        state = x
        for stage in model.stages:
            stage_time, state = timed(lambda: stage(state))
            full += stage_time
        full_times.append(full + timed(lambda: model.heads[-1](state))[0])
        state = map_batch(lambda t: t[: counts[0]], x, batch, "the example")
        for k, (stage, head) in enumerate(zip(model.stages, model.heads)):
            n = counts[k]
            stage_time, state = timed(lambda: stage(state))
            head_time, logits = timed(lambda: head(state))
            keep = torch.arange(n, device=device) < min(counts[k + 1], n)
            ids = torch.arange(n, device=device)
            decide_time, (_, state, _) = timed(lambda: (exit_features(logits), *backend.compact(keep, state, ids)))
            exit_times[k].append((stage_time + head_time + decide_time) / n)

    def median(values: list[float]) -> float:
        kept = sorted(values[1:])
        return kept[len(kept) // 2]

    per_sample_full = median(full_times) / batch
    costs, total = [], 0.0
    for times in exit_times:
        total += median(times)
        costs.append(total / per_sample_full)
    return costs


def best_time(fn: Callable[[], Any], repeats: int = 3) -> float:
    """The shortest wall-clock time, in seconds, of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
