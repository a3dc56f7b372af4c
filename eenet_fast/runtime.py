"""Adaptive inference that really stops: :class:`EarlyExitModel`.

The data path of :meth:`EarlyExitModel.forward`, for each exit ``k`` in order::

    state  = stages[k](state)                 # only the samples still running
    logits = heads[k](state)
    q, leave = backend.decide(policy, k, logits, history)
    backend.write_exited(...)                 # the leaving rows' logits, prediction, exit index
    state, ids, history = backend.compact(~leave, state, ids, history)

Every per-sample tensor (activations, tuple/dict entries with the batch first, sample ids, earlier
scores and predictions) is compacted together, so a sample's result never depends on which batch
it came in, and no sample is dropped, duplicated or reordered. The backends are in
:mod:`eenet_fast.backends`; calibration in :mod:`eenet_fast.calibration`; costs in
:mod:`eenet_fast.costs`; the policy file in :mod:`eenet_fast.persist`; :func:`eenet_fast.wrap`
builds an :class:`EarlyExitModel` from a model.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eenet_fast.backends import Backend, select_backend
from eenet_fast.batch import batch_size, describe, map_batch
from eenet_fast.calibration import calibrate, collect
from eenet_fast.costs import CostSpec, measure_costs
from eenet_fast.errors import EENetError, InputError
from eenet_fast.multi_exit import all_exits
from eenet_fast.outputs import ExitOutputs
from eenet_fast.persist import load_policy, save_policy
from eenet_fast.policies import ExitHistory, Policy

__all__ = ["ExitResult", "EarlyExitModel"]

# Held while a forward reads the heads and the policy and while load_policy replaces them, so a
# forward sees the model before a swap or after it, never a mix (one lock for all models: it is
# held for microseconds, and a module attribute would stop the model from being deep-copied).
_SWAP = threading.Lock()


@dataclass(frozen=True)
class ExitResult:
    """Result of adaptive inference on a batch of ``B`` samples, in input order.

    Attributes:
        logits: ``[B, C]`` logits of the exit each sample left at (the heads' dtype).
        predictions: ``[B]`` int64 predicted class (``argmax`` of the softmax of ``logits``).
        exits: ``[B]`` int64 exit index in ``[0, K)``.
        nonfinite: ``[B]`` bool, the sample met NaN/Inf logits at an exit (it never leaves early then).
    """

    logits: torch.Tensor
    predictions: torch.Tensor
    exits: torch.Tensor
    nonfinite: torch.Tensor


class EarlyExitModel(nn.Module):
    """A multi-exit model whose forward runs adaptive inference.

    Args:
        stages: ``K`` modules; stage ``k`` reads stage ``k-1``'s output (the input for ``k = 0``).
            Outputs may be a tensor or a tuple/dict of tensors with the batch first.
        heads: ``K`` modules; head ``k`` maps stage ``k``'s output to logits ``[B, C]``.
        backend: ``"torch"``, ``"triton"`` or ``"auto"`` (``triton`` on CUDA tensors when available).
        new_heads: indices of the heads that :func:`wrap` added to a trained model (empty when the
            heads came with the model): :func:`fit_exits` trains only these by default.
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        heads: Sequence[nn.Module],
        backend: Backend = "auto",
        new_heads: Sequence[int] = (),
    ) -> None:
        super().__init__()
        if len(stages) != len(heads) or not len(heads):
            raise InputError(f"need one head per stage and at least one of each, got {len(stages)} stages and {len(heads)} heads")
        self.stages = stages if isinstance(stages, nn.ModuleList) else nn.ModuleList(stages)
        self.heads = heads if isinstance(heads, nn.ModuleList) else nn.ModuleList(heads)
        self.backend = backend
        self.new_heads = tuple(sorted(set(new_heads)))
        if any(not 0 <= k < len(heads) for k in self.new_heads):
            raise InputError(f"new_heads {self.new_heads} must index the {len(heads)} heads")
        self.policy: Policy | None = None

    @property
    def num_exits(self) -> int:
        return len(self.heads)

    @property
    def device(self) -> torch.device:
        """The device of the model's first parameter (the CPU for a model without parameters)."""
        param = next(self.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def all_exits(self, x: Any) -> list[torch.Tensor]:
        """Run every stage once and every head: ``K`` logits ``[B, C]`` (for training and calibration)."""
        return all_exits(self.stages, self.heads, x)

    # ---------------------------------------------- calibration (eenet_fast.calibration)
    def collect(self, loader: Iterable, *, progress: bool = True, costs: Sequence[float] | None = None) -> ExitOutputs:
        """See :func:`eenet_fast.calibration.collect`."""
        return collect(self, loader, progress=progress, costs=costs)

    def measure_costs(self, spec: CostSpec, example: Any, reach: Sequence[float] | None = None) -> list[float]:
        """See :func:`eenet_fast.costs.measure_costs`."""
        return measure_costs(self, spec, example, reach)

    def calibrate(self, val: Any, budget: float | str, policy: str | Policy = "eenet", costs: CostSpec | None = None, **options: Any) -> Policy:
        """See :func:`eenet_fast.calibration.calibrate`."""
        return calibrate(self, val, budget, policy, costs, **options)

    # ------------------------------------------------------------ inference
    @torch.no_grad()
    def forward(self, x: Any) -> ExitResult:
        """Adaptive inference on a batch: a tensor or a tuple/dict of tensors with the batch first
        (see :mod:`eenet_fast.batch` for the per-sample contract and :class:`~eenet_fast.batch.Shared`).

        Returns:
            :class:`ExitResult` for the ``B`` samples, in input order.

        Raises:
            InputError: the input breaks the per-sample contract or the first stage cannot run on
                it (the message says what it got and what the model holds); a stage's output
                breaks the contract.
        """
        self.require_eval("run adaptive inference")
        with _SWAP:  # one policy and one set of heads decide the whole batch, even if another thread swaps them
            policy, heads = self.policy, tuple(self.heads)
        if policy is None:
            raise RuntimeError("no exit policy: call calibrate(val, budget) or load_policy(path) first")
        device = self.device
        backend = select_backend(self.backend, device)
        batch = batch_size(x)
        map_batch(lambda t: t, x, batch, "the input")
        ids = torch.arange(batch, device=device)
        history = ExitHistory.empty(batch, device)
        out_logits: torch.Tensor | None = None
        out_exits = torch.full((batch,), -1, dtype=torch.long, device=device)
        out_predictions = torch.full((batch,), -1, dtype=torch.long, device=device)
        out_nonfinite = torch.zeros(batch, dtype=torch.bool, device=device)
        state = x
        for k, (stage, head) in enumerate(zip(self.stages, heads)):
            if ids.numel() == 0:
                break
            state = stage(state) if k else self._first_stage(stage, state)
            logits = head(state)
            if out_logits is None:
                out_logits = logits.new_empty(batch, logits.shape[1])
            q, prediction, leave, nonfinite = backend.decide(policy, k, logits, history, k == self.num_exits - 1)
            backend.write_exited(leave, ids, logits, prediction, nonfinite, k,
                                 out_logits, out_predictions, out_exits, out_nonfinite)
            history = history.extend(q, prediction)
            keep = ~leave
            state, ids, scores, predictions = backend.compact(
                keep, state, ids, history.scores, history.predictions, where=f"the output of stage {k}"
            )
            history = ExitHistory(scores, predictions)
        if out_logits is None:  # empty batch: no head ran
            out_logits = torch.empty(0, policy.num_classes, device=device)
        return ExitResult(out_logits, out_predictions, out_exits, out_nonfinite)

    def _first_stage(self, stage: nn.Module, x: Any) -> Any:
        """``stage(x)``; a failure there is almost always an input of the wrong dtype, shape or
        device, so it becomes an :class:`InputError` saying what the input and the model hold."""
        try:
            return stage(x)
        except (EENetError, torch.cuda.OutOfMemoryError):
            raise
        except (RuntimeError, TypeError, ValueError, IndexError, KeyError, AttributeError) as error:
            param = next((p for p in stage.parameters() if p.is_floating_point()), None)
            holds = "no parameters" if param is None else f"{param.dtype} parameters on {param.device}"
            detail = (str(error).strip().splitlines() or [""])[0]
            raise InputError(
                f"the model's first stage cannot run on the input, {describe(x)}: {type(error).__name__}: "
                f"{detail}. The stage holds {holds}: give inputs of the dtype, shape and device the model was "
                "built and calibrated for"
            ) from error

    # ------------------------------------------------- the policy file (eenet_fast.persist)
    def save_policy(self, path: str | Path) -> None:
        """Write the calibrated policy to one safetensors file, bound to this model's stages and heads
        (see :func:`eenet_fast.persist.save_policy`)."""
        if self.policy is None:
            raise RuntimeError("no policy to save: call calibrate(val, budget) first")
        save_policy(self.policy, path, self.heads, self.new_heads, stages=self.stages)

    def load_policy(self, path: str | Path) -> Policy:
        """Install a policy saved by :meth:`save_policy`, with the added heads' weights it holds.

        The whole file is checked first (:func:`eenet_fast.persist.load_policy`: integrity, every
        field, exits, classes, head and backbone weights); only then are the heads (by new modules
        holding the saved weights) and the policy replaced, in one step: a refused file leaves the
        model as it was, and a forward running meanwhile finishes with the heads and policy it began with.
        """
        saved = load_policy(path, self.heads, self.new_heads, stages=self.stages)
        with _SWAP:
            for k, head in saved.heads.items():
                self.heads[k] = head
            self.policy = saved.policy
        return saved.policy

    def require_eval(self, what: str) -> None:
        """Raise unless the model is in eval mode (``what`` names the refused action)."""
        if self.training:
            raise RuntimeError(
                f"cannot {what} in training mode: BatchNorm and dropout would make a sample's result depend "
                "on its batch. Call model.eval() first (use all_exits(x) to train)"
            )
