"""The work of the pytest fixture ``early_exit_benchmark``: adaptive early exit against the full
model on the same batches, timed in interleaved rounds inside a pytest-benchmark test.

The fixture itself is registered by the top-level module ``_eenet_fast_pytestplugin`` (entry point
``pytest11``), which imports only pytest, because pytest loads it in every session of anyone who
installed eenet-fast; this module (and torch) is imported when a test asks for the fixture::

    def test_adaptive_vs_full(early_exit_benchmark):
        report = early_exit_benchmark(model, batches, full=net, labels=y)
        assert report.exit_fractions[0] > 0.2

Each round runs the full model over every batch, then the adaptive model (``model(b)`` for ``b`` in
``batches``), each pass timed on its own (with a CUDA synchronisation on a GPU) under
``torch.no_grad``; warm-up rounds run both and are not kept. pytest-benchmark records the adaptive
passes as the test's statistics (``benchmark.pedantic``; the full passes run in its untimed
``setup``); the report's numbers go to ``benchmark.extra_info``. With ``--benchmark-disable``
each model runs once and the report holds that one round.

On the CPU, call :func:`eenet_fast.steady_allocator` once in the benchmark session (a
``conftest.py``), as in the process that calibrated the policy: with glibc's defaults a batch's
activations fault their pages in again on some forwards and not others, and the time shares switch
between two levels at large batches (:mod:`eenet_fast.allocator`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from eenet_fast.batch import batch_size
from eenet_fast.errors import InputError, PolicyError
from eenet_fast.runtime import EarlyExitModel
from eenet_fast.speed import median_iqr
from eenet_fast.timing import full_pass, synchronizer

__all__ = ["EarlyExitReport", "measure_early_exit"]


@dataclass(frozen=True)
class EarlyExitReport:
    """Adaptive early exit against the full model on the same batches (also in ``benchmark.extra_info``).

    Attributes:
        policy: the installed policy's name (``model.policy.name``).
        budget: the average cost per sample it was calibrated for (``model.policy.budget``, in the
            unit of its costs).
        batch_sizes: the distinct batch sizes of ``batches``, ascending.
        samples: ``N``, the samples in all batches together.
        rounds: timed rounds (warm-up not counted).
        adaptive_s: median time of one pass of the adaptive model over all batches, in seconds.
        full_s: the same for the full model, in seconds.
        ratio: median over the rounds of adaptive time / full time (below 1: early exit is faster).
        ratio_iqr: interquartile range of the per-round ratios (their spread; 0 for one round).
        exit_fractions: ``K`` fractions of the samples leaving at each exit (summing to 1).
        accuracy: the adaptive model's accuracy on ``labels`` (``None`` without labels).
        full_accuracy: the full model's accuracy on ``labels`` (``None`` without labels).
    """

    policy: str
    budget: float
    batch_sizes: tuple[int, ...]
    samples: int
    rounds: int
    adaptive_s: float
    full_s: float
    ratio: float
    ratio_iqr: float
    exit_fractions: tuple[float, ...]
    accuracy: float | None = None
    full_accuracy: float | None = None


def measure_early_exit(
    benchmark: Any,
    model: EarlyExitModel,
    batches: Sequence[Any],
    full: Callable[[Any], Any] | None = None,
    *,
    labels: torch.Tensor | None = None,
    rounds: int = 7,
    warmup: int = 1,
) -> EarlyExitReport:
    """Time ``model`` against ``full`` on ``batches`` in interleaved rounds (see the module docstring).

    Args:
        benchmark: pytest-benchmark's ``benchmark`` fixture (the fixture passes it).
        model: a calibrated :class:`~eenet_fast.runtime.EarlyExitModel` in eval mode.
        batches: a list of input batches (tensor or tuple/dict of tensors, batch first) on the
            model's device.
        full: the plain model, called as ``full(batch)`` and returning logits ``[B, C]`` (or an
            output with ``.logits``); ``None``: every stage of ``model`` in order, then its last head.
        labels: ``[N]`` int64 class labels of the concatenated batches, for both accuracies.
        rounds: timed rounds (each: the full model, then the adaptive one, over all batches).
        warmup: untimed rounds first.

    Returns:
        An :class:`EarlyExitReport`; its fields are also written to ``benchmark.extra_info``.

    Raises:
        InputError: ``model`` is not an ``EarlyExitModel``, ``batches`` is empty or a tensor,
            ``labels`` do not match the samples, bad ``rounds``/``warmup``.
        PolicyError: ``model`` has no policy installed.
        RuntimeError: ``model`` or ``full`` is in training mode.
    """
    sizes = _check(model, batches, full, rounds, warmup)
    if labels is not None and tuple(labels.shape) != (sum(sizes),):
        raise InputError(
            f"labels must be [N] with N = {sum(sizes)} samples in the batches, got shape {tuple(labels.shape)}: "
            "give the labels of the concatenated batches, in order"
        )
    run_full, policy = full if full is not None else functools.partial(full_pass, model), model.policy
    sync = synchronizer(model.device)
    times: dict[str, list[float]] = {"full": [], "adaptive": []}
    last: dict[str, list[Any]] = {}

    def timed(name: str, fn: Callable[[Any], Any]) -> list[Any]:
        with torch.no_grad():
            sync()
            start = time.perf_counter()
            outputs = [fn(b) for b in batches]
            sync()
        times[name].append(time.perf_counter() - start)
        last[name] = outputs
        return outputs

    def time_full() -> None:  # pedantic's setup: untimed by pytest-benchmark, right before each adaptive pass
        _logits(timed("full", run_full)[0])  # a full model without logits fails before anything is recorded

    benchmark.pedantic(lambda: timed("adaptive", model), setup=time_full, rounds=rounds, warmup_rounds=warmup)
    kept = len(times["adaptive"]) - (warmup if benchmark.enabled else 0)
    full_s, adaptive_s = np.array(times["full"][-kept:]), np.array(times["adaptive"][-kept:])
    ratio, ratio_iqr = median_iqr((adaptive_s / full_s).tolist())
    exits = torch.cat([out.exits for out in last["adaptive"]]).cpu()
    report = EarlyExitReport(
        policy=policy.name,
        budget=float(policy.budget),
        batch_sizes=tuple(sorted(set(sizes))),
        samples=sum(sizes),
        rounds=kept,
        adaptive_s=float(np.median(adaptive_s)),
        full_s=float(np.median(full_s)),
        ratio=ratio,
        ratio_iqr=ratio_iqr,
        exit_fractions=tuple((torch.bincount(exits, minlength=model.num_exits) / exits.numel()).tolist()),
        accuracy=None if labels is None else _accuracy([out.logits for out in last["adaptive"]], labels),
        full_accuracy=None if labels is None else _accuracy([_logits(out) for out in last["full"]], labels),
    )
    benchmark.extra_info.update(asdict(report))
    return report


def _check(model: Any, batches: Any, full: Any, rounds: int, warmup: int) -> list[int]:
    """The checks of :func:`measure_early_exit`'s arguments; returns the batch sizes."""
    if not isinstance(model, EarlyExitModel):
        raise InputError(f"model must be an EarlyExitModel, got {type(model).__name__}: give eenet_fast.wrap(net) calibrated")
    if model.policy is None:
        raise PolicyError("the model has no exit policy: call model.calibrate(val, budget) or model.load_policy(path) first")
    model.require_eval("benchmark adaptive inference")
    if isinstance(full, torch.nn.Module) and full.training:
        raise RuntimeError("the full model is in training mode: call full.eval() first, as for the adaptive model")
    if isinstance(batches, torch.Tensor) or not isinstance(batches, Sequence) or not len(batches):
        got = "a tensor" if isinstance(batches, torch.Tensor) else repr(batches)[:80]
        raise InputError(f"batches must be a non-empty list of input batches, got {got}: e.g. list(x.split(batch_size))")
    if not isinstance(rounds, int) or rounds < 1 or not isinstance(warmup, int) or warmup < 0:
        raise InputError(f"need rounds >= 1 and warmup >= 0 (ints), got rounds={rounds!r}, warmup={warmup!r}")
    return [batch_size(b) for b in batches]


def _logits(output: Any) -> torch.Tensor:
    """The logits ``[B, C]`` of a full model's output: the tensor itself, or its ``.logits``/``["logits"]``."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if not isinstance(logits, torch.Tensor):
        raise InputError(f"the full model returned {type(output).__name__}: it must return logits [B, C] or an output with .logits")
    return logits


def _accuracy(logits: list[torch.Tensor], labels: torch.Tensor) -> float:
    """Accuracy of the argmax of the concatenated ``[B, C]`` logits against ``labels [N]``."""
    predictions = torch.cat([z.argmax(-1).cpu() for z in logits])
    return float((predictions == labels.cpu()).double().mean())
