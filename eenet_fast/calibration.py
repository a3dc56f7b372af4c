"""Calibration of a runnable model: collect its exit outputs from a loader, measure its costs, fit
an exit policy for a budget and install it (:func:`calibrate`; ``model.calibrate`` is the same)."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from eenet_fast.batch import move_to
from eenet_fast.costs import CostSpec, measure_costs
from eenet_fast.errors import InputError, PolicyError
from eenet_fast.outputs import ExitOutputs
from eenet_fast.policies import POLICIES, Policy, make_policy, parse_budget

if TYPE_CHECKING:
    from eenet_fast.runtime import EarlyExitModel

__all__ = ["collect", "calibrate"]


def _split(batch: Any) -> tuple[Any, Any]:
    """``(x, y)`` of a loader's batch: ``(x, y)`` pairs, or ``x`` alone (``y = None``)."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    return batch, None


@torch.no_grad()
def _collect(model: EarlyExitModel, loader: Iterable, progress: bool, costs: Sequence[float] | None) -> tuple[ExitOutputs, Any]:
    """:func:`collect`, reading ``loader`` once, and its first batch's inputs (on the model's device)."""
    model.require_eval("collect exit outputs")
    chunks: list[list[torch.Tensor]] = [[] for _ in range(model.num_exits)]
    labels, first = [], None
    device = model.device
    for batch in tqdm(loader, desc="collecting exit outputs", disable=not progress, leave=False):
        x, y = _split(batch)
        x = move_to(x, device)
        first = x if first is None else first
        for k, z in enumerate(model.all_exits(x)):
            chunks[k].append(z.float().cpu())
        if y is not None:
            labels.append(torch.as_tensor(y).cpu())
    if first is None:
        raise InputError("the loader gave no batches; nothing to collect: give a loader of at least one batch")
    logits = torch.stack([torch.cat(c) for c in chunks])
    return ExitOutputs(logits, torch.cat(labels) if labels else None, costs), first


def collect(
    model: EarlyExitModel, loader: Iterable, *, progress: bool = True, costs: Sequence[float] | None = None
) -> ExitOutputs:
    """Exit outputs of a whole loader of ``x`` or ``(x, y)`` batches (eval mode, no grad).

    Returns:
        :class:`ExitOutputs` with float32 logits ``[K, N, C]``, labels when the loader has them, and
        ``costs`` when given.
    """
    return _collect(model, loader, progress, costs)[0]


def calibrate(
    model: EarlyExitModel,
    val: Iterable | ExitOutputs,
    budget: float | str,
    policy: str | Policy = "eenet",
    costs: CostSpec | None = None,
    *,
    example: Any = None,
    progress: bool = True,
    confidence: float | None = None,
    **policy_options: Any,
) -> Policy:
    """Fit an exit policy for an average-cost ``budget`` and install it on ``model``.

    Args:
        val: a loader (any iterable, read once) of ``(x, y)`` batches, or cached
            :class:`ExitOutputs` of this model.
        budget: average cost per sample; with ``costs="flops"`` or ``"latency"`` the full model
            costs 1.0 (``0.5`` = half of it; with ``"latency"``, half of its time); with explicit
            costs or the cached outputs' own costs, in their unit; ``"0.5x"``/``"50%"`` is a
            fraction of the last exit's cost in any unit.
        policy: a policy name (``eenet``, ``maxprob``, ...) or an unfitted :class:`Policy`.
        costs: ``"flops"``, ``"latency"`` or ``K`` cumulative costs (see
            :func:`eenet_fast.costs.measure_costs`). Default: ``"flops"`` for a loader, the cached
            outputs' own costs for :class:`ExitOutputs`. With ``"latency"`` the policy is fitted
            twice: the second time on costs timed at the batch sizes the first policy lets reach
            each stage.
        example: a batch like those the model will serve, to measure ``"flops"`` or ``"latency"``
            (default: the loader's first batch; required for cached outputs).
        progress: progress bars (collection, and the policy's training when it has one).
        confidence: certify the budget at this level (e.g. 0.95) on a held-out half of the
            validation outputs (see :meth:`Policy.fit` and :mod:`eenet_fast.guarantee`).
        policy_options: passed to the policy's constructor.

    Raises:
        InputError: cached outputs with ``costs="flops"``/``"latency"`` and no ``example``, or
            with no costs at all; outputs of another number of exits.
        PolicyError: a policy that needs labels at inference, or bad policy options.
        BudgetError: a budget that cannot be read or met.

    The policy, its options and the budget's syntax are checked before any output is collected.
    """
    if isinstance(policy, str):
        options = dict(policy_options)
        if policy in POLICIES and "progress" in inspect.signature(POLICIES[policy]).parameters:
            options.setdefault("progress", progress)
        unfitted = make_policy(policy, **options)
    else:
        unfitted = policy
    if not unfitted.deployable:
        raise PolicyError(f"policy {unfitted.name!r} needs labels at inference and cannot run in a model")
    parse_budget(budget, 1.0)  # the full cost is not known yet: this checks that the budget can be read
    if isinstance(val, ExitOutputs):
        outputs = val
        if isinstance(costs, str):
            if example is None:
                raise InputError(
                    f"costs={costs!r} on cached outputs needs example=<a batch like those the model serves> to "
                    f"measure them with; or omit costs to use the outputs' own costs"
                )
            outputs = outputs.with_costs(measure_costs(model, costs, move_to(example, model.device)))
        elif costs is not None:
            outputs = outputs.with_costs(costs)
        elif outputs.costs is None:
            raise InputError("the cached outputs hold no costs: give costs=[c1, ..., cK], or 'flops'/'latency' with example=")
    else:
        costs = "flops" if costs is None else costs
        outputs, first = _collect(model, val, progress, None)
        example = first if example is None else move_to(example, model.device)
        outputs = outputs.with_costs(measure_costs(model, costs, example))
    if outputs.num_exits != model.num_exits:
        raise InputError(f"the outputs have {outputs.num_exits} exits but this model has {model.num_exits}")

    def fit(outputs: ExitOutputs) -> Policy:
        return copy.deepcopy(unfitted).fit(outputs, budget, confidence=confidence)

    fitted = fit(outputs)
    if costs == "latency":  # re-time each stage at the batch the policy lets reach it
        exits = fitted.assign(outputs)
        reach = [float((exits >= k).double().mean()) for k in range(model.num_exits)]
        fitted = fit(outputs.with_costs(measure_costs(model, "latency", example, reach)))
    model.policy = fitted
    return fitted
