"""Calibration of a runnable model: collect its exit outputs from a loader, measure its costs, fit
an exit policy for a budget and install it (:func:`calibrate`; ``model.calibrate`` is the same)."""

from __future__ import annotations

import copy
import inspect
import logging
import math
import statistics
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Callable

import torch
from tqdm.auto import tqdm

from eenet_fast.batch import move_to
from eenet_fast.costs import CostSpec, measure_costs
from eenet_fast.errors import BudgetError, InputError, PolicyError
from eenet_fast.outputs import ExitOutputs
from eenet_fast.policies import POLICIES, Policy, make_policy, parse_budget
from eenet_fast.policies.thresholds import assign_exits, exit_mix, thresholds_for_fractions, tilt
from eenet_fast.allocator import allocator_is_steady
from eenet_fast.speed import median_iqr
from eenet_fast.timing import (
    BUSY_CPU_SHARE, LatencyModel, decision_times, leaving_first, measure_floors, measure_shares, reach, time_exits,
)

logger = logging.getLogger(__name__)

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
    batch_size: int | None = None,
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
            outputs' own costs for :class:`ExitOutputs`. With ``"latency"`` the budget is a share of
            the full model's time at ``batch_size``: the exits are timed on a ladder of batch sizes
            up to it and each stage's time fitted as a function of its batch
            (:mod:`eenet_fast.timing`); the policy keeps that model as ``policy.latency``.
        example: a batch like those the model will serve, to measure ``"flops"`` or ``"latency"``
            (default: the loader's first batch; required for cached outputs). Its rows are repeated
            to fill larger batches; for ``"latency"`` on a GPU, give a whole serving batch of real
            rows: there a stage's time can jump with its batch size, and repeated rows can send a
            stage a number of rows on the other side of the jump than real batches do (the ResNet
            example at batch 4096 on an H200, one policy: 0.59 of the full model's time on 256
            rows repeated, 0.82 on 4096 test rows). At a small ``batch_size``, give more rows than
            that (a few hundred): whole adaptive forwards are timed on up to 256 of them in
            distinct batches, so the share of rows that runs on is the policy's, not one batch's.
        progress: progress bars (collection, and the policy's training when it has one).
        batch_size: with ``costs="latency"``, the batch size served (default: the example's).
        confidence: certify the budget at this level (e.g. 0.95) on a held-out half of the
            validation outputs (see :meth:`Policy.fit` and :mod:`eenet_fast.guarantee`).
        policy_options: passed to the policy's constructor.

    Raises:
        InputError: cached outputs with ``costs="flops"``/``"latency"`` and no ``example``, or
            with no costs at all; outputs of another number of exits.
        PolicyError: a policy that needs labels at inference, or bad policy options.
        BudgetError: a budget that cannot be read or met (for a time budget: at ``batch_size``; the
            message gives the smallest feasible budget at each batch size timed, each measured in
            whole forwards: about 7 s more on the demo CNN at batch 256).

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
    if batch_size is not None and costs != "latency":
        raise InputError(f"batch_size={batch_size} sets the batch a time budget holds at: it needs costs='latency'")
    if isinstance(val, ExitOutputs):
        outputs = val
        if isinstance(costs, str) and example is None:
            raise InputError(
                f"costs={costs!r} on cached outputs needs example=<a batch like those the model serves> to "
                f"measure them with; or omit costs to use the outputs' own costs"
            )
        if costs is None and outputs.costs is None:
            raise InputError("the cached outputs hold no costs: give costs=[c1, ..., cK], or 'flops'/'latency' with example=")
    else:
        costs = "flops" if costs is None else costs
        outputs, first = _collect(model, val, progress, None)
        example = first if example is None else example
    if example is not None:
        example = move_to(example, model.device)
    if costs is not None and costs != "latency":
        outputs = outputs.with_costs(measure_costs(model, costs, example))
    if outputs.num_exits != model.num_exits:
        raise InputError(f"the outputs have {outputs.num_exits} exits but this model has {model.num_exits}")

    def fit(outputs: ExitOutputs, budget: float | str = budget) -> Policy:
        return copy.deepcopy(unfitted).fit(outputs, budget, confidence=confidence)

    if costs == "latency":
        fitted = _fit_for_time(model, outputs, budget, fit, example, batch_size, progress, certified=confidence is not None)
    else:
        fitted = fit(outputs)
    model.policy = fitted
    return fitted


def _fit_for_time(
    model: EarlyExitModel, outputs: ExitOutputs, budget: float | str, fit: Callable[[ExitOutputs, float], Policy],
    example: Any, batch_size: int | None, progress: bool, certified: bool = False,
) -> Policy:
    """Fit a policy for a time budget at the serving batch size (see :mod:`eenet_fast.timing`).

    The exits are timed with the max-score decision, the first exit's step is scaled to the measured
    share of forwards in which every sample leaves there (:func:`_measured_floor`: whether the budget
    can be met at all is decided on that measurement), and the first fit prices the stages around a
    reach guessed from the budget. When the fitted policy's own decision costs more (EENet's
    scheduler), the exits are timed again with it, on the threads of the first timing (one, when
    the machine was busy). The next fits price around the last policy's
    reach on ``outputs``; while the model predicts more time than the budget there, the target is
    lowered in proportion (at most three fits). Where the fixed parts of the later stages leave no
    room at the margin, the stages are priced at their average. Last, whole adaptive forwards are
    timed against the full model on the example batch, with the policy and with every sample
    leaving at the first exit (:func:`_corrections`); when the factors that make the model predict
    both shares differ from 1 by more than 2 %, the first exit's step and the later ones are scaled
    by them and those fits repeated, from the last reach (with one fit alone, its reach moved and
    overshot the budget: the ResNet example at batch 32 and 0.7 fell back to a tilt predicted at
    0.67). The refit policy is measured the same way once more; when its share misses the corrected
    model's prediction by more than :data:`VERIFIED_ERROR` of the budget, the factors of that
    measurement replace the first ones and the fits are repeated once more (one correction alone: the
    ResNet example at batch 1024 and 0.5, a later factor of 1.83 measured at the first policy's reach
    left the refit policy at 0.44 of the full model's time); that refit policy is measured as well,
    and where it spends more than the budget, the most accurate of the measured policies within it is
    installed instead (:func:`_within_measured`). After each round of fits the exit mix is chosen on the time model itself
    (:func:`_most_accurate_in_time`; not for a ``certified`` policy, whose thresholds are the
    certified ones). The policy keeps the model as ``policy.latency``."""
    if model.device.type == "cpu" and not allocator_is_steady():
        warnings.warn(
            "glibc gives the memory of freed activations back to the system and faults it in again on the next "
            "forward, by a threshold that moves as the process runs: time shares measured on the CPU can switch "
            "between two levels (the ResNet example at batch 1024: 0.34 or 0.46 for its first exit), and a budget "
            "calibrated in one misses in the other. Call eenet_fast.steady_allocator() once, before calibrating "
            "and in the process that serves (or preload jemalloc/tcmalloc)",
            stacklevel=3,
        )
    latency = _measured_floor(model, None, example, time_exits(model, example, batch_size, progress=progress))
    value = _feasible(model, budget, example, latency)
    smallest = latency.smallest_budgets()[latency.batch_size]
    guess = min(max((value - smallest) / max(1.0 - smallest, 1e-9), 0.25), 1.0)

    def fit_at(shares: list[float], target: float) -> Policy:
        try:
            return fit(outputs.with_costs(latency.costs(shares)), target)
        except BudgetError:  # the later stages' fixed parts exceed the budget's room: price at the average
            return fit(outputs.with_costs(latency.costs(shares, marginal=False)), target)

    def reach_of(policy: Policy) -> list[float]:
        return reach(policy.assign(outputs), model.num_exits)

    def settle(shares: list[float]) -> tuple[Policy, list[float]]:
        """Fit around ``shares``, then around each fit's own reach, aiming lower while the model
        predicts more than the budget there (at most three fits, never below the floor)."""
        smallest, target = latency.smallest_budgets()[latency.batch_size], value
        for _ in range(3):
            fitted = fit_at(shares, target)
            shares = reach_of(fitted)
            predicted = latency.predicted_fraction(shares)
            if predicted <= value * 1.01 or target <= smallest:
                break
            target = max(smallest, target * value / predicted)
        return fitted, shares

    fitted = fit_at([guess**k for k in range(model.num_exits)], value)
    extra = decision_times(model, fitted, latency.batch_sizes, outputs.num_classes)
    extra -= decision_times(model, make_policy("maxprob"), latency.batch_sizes, outputs.num_classes)
    timed_with = None  # the policy whose decision the exits were timed with (None: the max-score one)
    if float((extra / latency.exit_times.clamp_min(1e-9)).max()) > 0.02:  # a dearer decision: time it in the forwards
        timed_with = fitted
        latency = time_exits(model, example, batch_size, policy=timed_with, threads=latency.threads, progress=progress)
        latency = _measured_floor(model, timed_with, example, latency)
        _feasible(model, value, example, latency, timed_with)
    fitted, shares = settle(reach_of(fitted))
    if not certified:
        shares = _most_accurate_in_time(fitted, outputs, latency, value)
    # whole adaptive forwards against the full model on the example: what the steps timed apart
    # miss; the refitted policy is measured once more, and corrected again unless that holds. A
    # policy refit after the last correction is measured too (it is not corrected again)
    measured: list[tuple[float, float, Policy, LatencyModel]] = []  # (share, noise, policy, its time model)
    for check in range(CORRECTION_PASSES + 1):
        fitted.latency = latency.planned(shares)  # the compaction plan its forwards follow
        first, rest, error, share, noise = _corrections(model, fitted, example, latency)
        measured.append((share, noise, fitted, fitted.latency))
        logger.info("time budget %.3f at batch %d: policy %d measured at %.3f of the full model's time on the example, "
                    "%+.3f off the model; factors measured %.3f / %.3f", value, latency.batch_size, check, share, error, first, rest)
        if check == CORRECTION_PASSES or (check and abs(error) <= VERIFIED_ERROR * value):
            break
        if abs(first / latency.first_factor - 1) <= 0.02 and abs(rest / latency.correction - 1) <= 0.02:
            break
        latency = latency.corrected(rest, first)
        _feasible(model, value, example, latency, timed_with)
        fitted, shares = settle(shares)
        if not certified:
            shares = _most_accurate_in_time(fitted, outputs, latency, value)
    # fitted for the budget asked (or less, where the prediction overshot), with the plan for its reach
    fitted, latency = _within_measured(measured, outputs, value)
    fitted.budget = value
    warn_if_starved(fitted, outputs, latency, model, example)
    return fitted


MEASURED_OVER = 0.05  # a policy measured above (1 + this) x the budget on the example is replaced by a measured one within it


def _within_measured(measured: list[tuple[float, float, Policy, LatencyModel]], outputs: ExitOutputs, value: float) -> tuple[Policy, LatencyModel]:
    """The policy to install, with its time model, from the policies measured on the example
    (``(share, noise, policy, latency)`` in the order measured; the last one is the final fit): the
    last one, unless its measured share exceeds the budget by more than :data:`MEASURED_OVER` and
    twice the noise of its median (on a busy CPU at batch 1 to 32 one policy read 0.83 of the full
    model's time on the example and served 0.60; the noise keeps such a reading from counting); then the
    most accurate on ``outputs`` of those measured within it (a correction measured at one policy's
    reach moved the refit policy to where it did not hold: on an H200, the ResNet example at batch
    4096 and 0.7, a later factor of 0.75 measured below a step in the last stage's time, from 0.5 ms
    to 3.9 ms between 1536 and 2048 rows, and a refit policy beyond it served 0.90,
    ``bench/results/gpu-h200-diagnose-4096-2026-11-28.md``). When none is within, the cheapest
    measured one, with a warning."""
    def fits(m: tuple[float, float, Policy, LatencyModel]) -> bool:
        share, noise, _, _ = m
        return share - 2 * noise <= value * (1 + MEASURED_OVER)

    share, _, policy, latency = measured[-1]
    if fits(measured[-1]):
        return policy, latency
    within = [m for m in measured if fits(m)]
    if within:
        chosen, _, policy, latency = max(within, key=lambda m: (_accuracy(m[2], outputs), m[0]))
        logger.info("time budget %.3f: the last policy measured at %.3f; installed the one measured at %.3f", value, share, chosen)
        return policy, latency
    share, _, policy, latency = min(measured, key=lambda m: m[0])
    warnings.warn(
        f"no policy fitted for the time budget {value} was measured within it on the example: the cheapest took "
        f"{share:.3f} of the full model's time there (the time model, corrected by whole forwards, still misses "
        "at this batch size). Installed it; measure it with eenet_fast.measure_speed at the batch size served, "
        "and lower the budget if it spends too much",
        stacklevel=3,
    )
    return policy, latency


def _accuracy(policy: Policy, outputs: ExitOutputs) -> float:
    """``policy``'s accuracy on the labelled ``outputs``."""
    return float(outputs.correct.gather(0, policy.assign(outputs)[None]).double().mean())


MIN_LATER_REACH = 0.05  # below this share of samples beyond the first exit, one factor for every step
CORRECTION_ROUNDS = 15  # the demo CNN at batch 256, 2 threads: one share spread 0.48-0.52 over 5 rounds, 0.48-0.49 over 15
CORRECTION_PASSES = 2  # measure, correct and refit; measure the refit policy, and correct and refit again if it missed (then measure that one)
VERIFIED_ERROR = 0.03  # a refit policy whose measured share is within this fraction of the budget of its prediction stays


def _measured_floor(model: EarlyExitModel, policy: Policy | None, example: Any, latency: LatencyModel) -> LatencyModel:
    """``latency`` with the first exit's step scaled (within [0.5, 2]) so that it predicts the
    measured time share of forwards in which every sample leaves at the first exit (``policy``'s
    decision, default the max-score one; median over :data:`CORRECTION_ROUNDS` paired rounds of
    :func:`measure_shares`): the smallest feasible budget, which decides whether a budget can be
    met. Read off the ladder (a difference of two minima) it is noisier: the ResNet example at batch
    1024, two threads, 0.31 and 0.42 in two calibrations minutes apart, where the paired share read
    0.31-0.33 over eight measurements."""
    (floor,), _ = measure_shares(model, [leaving_first(model, example, policy)], example, latency.batch_size,
                                 CORRECTION_ROUNDS, latency.threads)
    return latency.corrected(latency.correction, _bounded(statistics.median(floor) / latency.corrected(1.0).predicted_fraction([1.0])))


def _bounded(factor: float) -> float:
    """A correction factor kept within [0.5, 2]: a measurement further off is not trusted further."""
    return min(max(factor, 0.5), 2.0)


def _corrections(model: EarlyExitModel, policy: Policy, example: Any, latency: LatencyModel) -> tuple[float, float, float, float, float]:
    """The factors on the first exit's step and on the later ones (each within [0.5, 2]) that make
    ``latency`` predict two measured time shares on the example batch (:func:`measure_shares`, the
    medians over the rounds): forwards in which every sample leaves at the first exit, and forwards
    with ``policy``, back to back in each round. The later steps' share is the median of the two
    forwards' difference in each round: timed apart (two medians, or two minima, subtracted), the
    later factor of one policy at batch 256 spread 1.23-1.49 over eight measurements, where what
    disturbs a round slows both forwards. When fewer than :data:`MIN_LATER_REACH` of the samples
    run on, both factors are the policy's share's. Third, the policy's measured share less the one
    ``latency`` as it stands predicts for it (at the example's reach): how far the model missed.
    Fourth, the policy's measured share itself, and fifth the noise of that median (its standard
    error for normal rounds, from their interquartile range: ``1.25 * IQR / 1.35 / sqrt(rounds)``)."""
    plain, plan = latency.corrected(1.0), None if policy.latency is None else policy.latency.compact_after
    (shares, firsts), (example_reach, _) = measure_shares(
        model, [policy, leaving_first(model, example, policy)], example, latency.batch_size, CORRECTION_ROUNDS, latency.threads
    )
    predicted, first_predicted = plain.predicted_fraction(example_reach, plan=plan), plain.predicted_fraction([1.0])
    share, iqr = median_iqr(shares)
    noise = 1.25 * iqr / 1.35 / math.sqrt(len(shares))
    error = share - latency.predicted_fraction(example_reach, plan=plan)
    if example_reach[1] < MIN_LATER_REACH:
        return (_bounded(share / predicted),) * 2 + (error, share, noise)
    first, later = _bounded(statistics.median(firsts) / first_predicted), predicted - first_predicted
    rest = _bounded(statistics.median(s - f for s, f in zip(shares, firsts)) / later) if later > 0 else first
    return first, rest, error, share, noise


TIME_TILTS = tuple(0.125 * j for j in range(-64, 65))  # log_s from -8 to 8: towards earlier or later exits


def _most_accurate_in_time(policy: Policy, outputs: ExitOutputs, latency: LatencyModel, value: float) -> list[float]:
    """Give ``policy`` the most accurate exit mix on ``outputs`` whose predicted time share at the
    serving batch (``latency``, each mix at its own reach) is within the time budget ``value``;
    returns that mix's reach (the share of the samples running each stage).

    Candidates: the fitted thresholds, and the fitted and the uniform exit mixes tilted towards
    earlier or later exits (:func:`~eenet_fast.policies.thresholds.tilt`, over :data:`TIME_TILTS`),
    as thresholds on the policy's own scores. A fit prices each stage around one reach; a stage's
    time is concave in its rows (a fixed part per call), so a stage few samples reach looks dear per
    sample and successive fits can settle there (measured: 99 % of the samples at the first exit, 7
    points below the full model, at batch 32 and a budget of 0.7 of its time, of which it used
    0.56). Judged at each candidate's own reach, the time model decides. Among the candidates as
    accurate as the best one within the noise of a paired comparison on ``outputs`` (:func:`_tied`),
    the one that spends the most of the budget wins: near the full model's accuracy the validation
    accuracy is flat, and its top is a matter of a few samples (measured on the demo CNN at batch 256
    and a budget of 0.7: mixes predicted at 0.61 to 0.70 within 0.05 points, and the top chosen
    anywhere among them). The policy's costs become
    the stages' average prices at the chosen reach, under which its mean cost on ``outputs`` is
    its predicted time share. When no candidate fits the budget the policy is left as it is (its own
    reach is returned)."""
    scores = policy.exit_scores(outputs)
    correct = outputs.correct.float()
    num_exits = outputs.num_exits
    uniform = torch.full((num_exits,), 1.0 / num_exits, dtype=torch.float64)
    bases = (exit_mix(scores, policy.thresholds), uniform)
    candidates = [policy.thresholds] + [thresholds_for_fractions(scores, tilt(base, s)) for base in bases for s in TIME_TILTS]
    within: list[tuple[float, torch.Tensor, list[float], torch.Tensor]] = []  # (predicted, thresholds, reach, right)
    for thresholds in candidates:
        exits = assign_exits(scores, thresholds)
        shares = reach(exits, num_exits)
        predicted = latency.predicted_fraction(shares)
        if predicted <= value * 1.01:
            within.append((predicted, thresholds, shares, correct.gather(0, exits[None])[0]))
    if not within:
        return reach(assign_exits(scores, policy.thresholds), num_exits)
    best = max(within, key=lambda c: (float(c[3].sum()), -c[0]))[3]
    tied = [c for c in within if _tied(best, c[3])]
    _, policy.thresholds, shares, _ = max(tied, key=lambda c: c[0])
    policy.costs = torch.tensor(latency.costs(shares, marginal=False), dtype=policy.costs.dtype)
    return shares


def _tied(best: torch.Tensor, other: torch.Tensor) -> bool:
    """Whether ``other`` (``[N]`` 0/1, each sample right or not) is as accurate as ``best`` within the
    noise of a paired comparison: ``best`` is right on at most ``sqrt(d)`` more samples, ``d`` the
    samples on which the two disagree (one standard deviation of that difference when neither is
    better, McNemar's test)."""
    return float((best - other).sum()) <= math.sqrt(float((best != other).sum()))


def _feasible(model: EarlyExitModel, budget: float | str, example: Any, latency: LatencyModel, policy: Policy | None = None) -> float:
    """:func:`check_time_budget`, with the floors at the smaller batch sizes measured in whole
    forwards (:func:`~eenet_fast.timing.measure_floors`, with ``policy``'s decision) before the
    error names them, when the budget is infeasible."""
    if parse_budget(budget, 1.0) < latency.smallest_budgets()[latency.batch_size]:
        latency = measure_floors(model, example, latency, policy)
    return check_time_budget(budget, latency)


def check_time_budget(budget: float | str, latency: LatencyModel) -> float:
    """A time ``budget`` as a share of the full model's time (``"0.5x"`` and ``"50%"`` are half of
    it). Raises :class:`BudgetError` when no policy can meet it at the serving batch size, naming
    the smallest feasible budget at each batch size timed (the error's ``smallest_feasible`` holds
    the one at the serving batch size)."""
    value = parse_budget(budget, 1.0)
    smallest = latency.smallest_budgets()
    n = latency.batch_size
    if value < smallest[n]:
        table = ", ".join(f"{m}: {b:.3f}" for m, b in smallest.items())
        error = BudgetError(
            f"a time budget of {value:.3g} cannot be met at batch size {n}: even with every sample leaving at the "
            f"first exit, adaptive inference takes {smallest[n]:.3f} of the full model's time there (the first stage, "
            f"its head, the exit decision and the compaction). Smallest feasible budget by batch size ("
            + ("measured in whole forwards" if latency.floors else f"predicted by the time model away from {n}") + f"): {table}. "
            f"Raise the budget, serve larger batches, or run the full model"
            + (" (early exit does not pay at this batch size)" if smallest[n] >= 1 else "")
        )
        error.smallest_feasible = smallest[n]
        raise error
    return value


def warn_if_starved(policy: Policy, outputs: ExitOutputs, latency: LatencyModel, model: EarlyExitModel, example: Any) -> None:
    """Warn when a time-budget policy gives up far more accuracy than the FLOPs say it must.

    If the max-score policy fitted on FLOPs costs at the same budget stays within 1 point of the
    full model (the last exit) on the validation outputs while ``policy`` falls more than 3 points
    below it, the measured times make the later exits look dear: the machine may have been busy
    while timing, or the early stages really are slow (high resolution). The warning gives both
    costs and the timing spread, and says which of the two the timing thread's share of the wall
    time (:attr:`LatencyModel.cpu_share`) points to."""
    full = float(outputs.correct[-1].double().mean())
    ours = _accuracy(policy, outputs)
    if full - ours <= 0.03:
        return
    flops = measure_costs(model, "flops", example)
    try:
        easy = make_policy("maxprob").fit(outputs.with_costs(flops), min(float(policy.budget), 1.0))
    except BudgetError:
        return
    if full - _accuracy(easy, outputs) > 0.01:
        return
    busy = latency.cpu_share < BUSY_CPU_SHARE
    warnings.warn(
        f"the time-budget policy is {100 * (full - ours):.1f} points less accurate than the full model on validation, "
        f"where the FLOPs say the same budget costs under 1 point: measured time costs per exit "
        f"{[round(c, 3) for c in latency.costs()]} against FLOPs {[round(c, 3) for c in flops]}, timing spread up "
        f"to {100 * float(latency.spread.max()):.0f} %. The machine was "
        + ("busy" if busy else "not busy") + f" while timing (the timing thread ran {100 * latency.cpu_share:.0f} % "
        "of the time): " + ("calibrate again when it is quiet" if busy else
                            "the early stages are slow for their FLOPs here; raise the budget, or calibrate with costs='flops'"),
        stacklevel=3,
    )
