"""Adaptive inference that really stops: :class:`EarlyExitModel`.

The data path of :meth:`EarlyExitModel.forward`, for each exit ``k`` in order::

    state  = stages[k](state)                 # only the samples still running
    logits = heads[k](state)
    q, leave = backend.decide(policy, k, logits, history, thresholds[k])
    backend.write_exited(...)                 # the leaving rows' logits, prediction, exit index
    state, ids, history = backend.compact(~leave, state, ids, history)   # not after the last exit

Every per-sample tensor (activations, tuple/dict entries with the batch first, sample ids, earlier
scores and predictions) is compacted together, so a sample's result never depends on which batch
it came in, and no sample is dropped, duplicated or reordered. The backends are in
:mod:`eenet_fast.backends`; calibration in :mod:`eenet_fast.calibration`; costs in
:mod:`eenet_fast.costs`; the policy file in :mod:`eenet_fast.persist`; :func:`eenet_fast.wrap`
builds an :class:`EarlyExitModel` from a model.

Under ``torch.compile(model)`` each exit's stage, head, decision and writes are one graph
(:meth:`EarlyExitModel._exit`; there the writes rewrite every running row, so no shape in the
graph depends on the data), and the compaction between exits runs eagerly: its output size is the kept count, read
on the host, the one graph break per exit. :meth:`EarlyExitModel.compile_stages` compiles the
stages and heads alone.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eenet_fast.backends import Backend, select_backend
from eenet_fast.batch import describe, lead_tensor, map_batch
from eenet_fast.calibration import calibrate, collect
from eenet_fast.control import BudgetController
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
class ExitResult(dict):
    """Result of adaptive inference on a batch of ``B`` samples, in input order.

    Read it by attribute (``out.logits``) or by key (``out["logits"]``): it is also a read-only
    ``dict`` of its fields, as Hugging Face pipelines read model outputs (and move them to the CPU).

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

    def __post_init__(self) -> None:
        dict.update(self, {f.name: getattr(self, f.name) for f in fields(self)})

    def _read_only(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("ExitResult is read-only; build a new one with dataclasses.replace(result, ...)")

    __setitem__ = __delitem__ = __ior__ = update = pop = popitem = clear = setdefault = _read_only  # type: ignore[assignment]

    def __reduce__(self) -> tuple:
        return type(self), tuple(getattr(self, f.name) for f in fields(self))


class EarlyExitModel(nn.Module):
    """A multi-exit model whose forward runs adaptive inference.

    Args:
        stages: ``K`` modules; stage ``k`` reads stage ``k-1``'s output (the input for ``k = 0``).
            Outputs may be a tensor or a tuple/dict of tensors with the batch first.
        heads: ``K`` modules; head ``k`` maps stage ``k``'s output to logits ``[B, C]``.
        backend: ``"torch"``, ``"triton"`` or ``"auto"`` (``triton`` on CUDA tensors when available).
        new_heads: indices of the heads that :func:`wrap` added to a trained model (empty when the
            heads came with the model): :func:`fit_exits` trains only these by default.

    Attributes:
        config: the wrapped model's configuration (a Hugging Face ``PretrainedConfig``: labels,
            problem type), which :func:`wrap` keeps so that a ``transformers`` pipeline takes the
            model; ``None`` for other models.
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
        self.config: Any = None
        self.controller: BudgetController | None = None  # optional: moves the thresholds to hold the budget online

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

    def measure_costs(self, spec: CostSpec, example: Any, batch_size: int | None = None) -> list[float]:
        """See :func:`eenet_fast.costs.measure_costs`."""
        return measure_costs(self, spec, example, batch_size)

    def calibrate(self, val: Any, budget: float | str, policy: str | Policy = "eenet", costs: CostSpec | None = None, **options: Any) -> Policy:
        """See :func:`eenet_fast.calibration.calibrate`."""
        return calibrate(self, val, budget, policy, costs, **options)

    # ------------------------------------------------------------ inference
    @torch.compiler.disable(recursive=False)  # the loop stays Python; torch.compile compiles each _exit
    @torch.no_grad()
    def forward(self, x: Any = None, **inputs: Any) -> ExitResult:
        """Adaptive inference on a batch: a tensor or a tuple/dict of tensors with the batch first,
        given as one argument (``model(x)``, ``model(enc)``) or as keywords (``model(**enc)`` for a
        tokenizer's output, as Hugging Face pipelines call models).

        Under ``torch.compile(model)`` each exit (:meth:`_exit`) is one graph and the compaction
        between exits runs eagerly: its output size is the kept count, read on the host. Each exit
        is a recompilation of :meth:`_exit`: beyond two exits, raise
        ``torch._dynamo.config.recompile_limit`` to about 4 per exit (or use :meth:`compile_stages`).

        Returns:
            :class:`ExitResult` for the ``B`` samples, in input order.

        Raises:
            InputError: the input breaks the per-sample contract or the first stage cannot run on
                it (the message says what it got and what the model holds); a stage's output
                breaks the contract.
        """
        x = _one_batch(x, inputs)
        self.require_eval("run adaptive inference")
        with _SWAP:  # one policy and one set of heads decide the whole batch, even if another thread swaps them
            policy, heads, controller = self.policy, tuple(self.heads), self.controller
        if policy is None:
            raise RuntimeError("no exit policy: call calibrate(val, budget) or load_policy(path) first")
        if controller is not None and controller.policy is not policy:
            raise RuntimeError("the controller was built for another policy: set model.controller = BudgetController(model.policy, val)")
        # read to the host once, before any work is queued: not once per exit, waiting for each stage
        thresholds = (policy.thresholds if controller is None else controller.thresholds()).tolist()
        lead = lead_tensor(x)  # the batch's device: no walk over the model's parameters at every call
        batch, device = lead.shape[0], lead.device
        backend = select_backend(self.backend, device)
        map_batch(lambda t: t, x, batch, "the input")  # the per-sample contract, checked before any work
        # exits after which the leaving rows ride on to the next compaction instead of being gathered
        # out (the time model's plan, where the gather costs more than running them): their id
        # becomes `gone`, the outputs' spare row, which later exits write and nothing reads
        riders = _riders(policy)
        state, (ids, history, out), gone = x, _start(batch, device, spare=bool(riders)), batch
        for k in range(self.num_exits):
            if ids.numel() == 0:
                break
            state, leave, history = self._exit(k, state, ids, history, policy, thresholds[k], heads[k], out)
            if k in riders:
                ids = ids.masked_fill(leave, gone)
                if not bool((ids != gone).any()):  # every row has left: the one host read of this exit
                    break
            elif k < self.num_exits - 1:
                if not riders and device.type == "cpu" and bool(leave.all()):
                    break  # every row has left (common at small batches): nothing to compact or run on
                state, ids, scores, predictions = backend.compact(
                    ~leave & (ids != gone) if riders else ~leave, state, ids, history.scores, history.predictions,
                    where=f"the output of stage {k}",
                )
                history = ExitHistory(scores, predictions)
        result = out.result(policy.num_classes)
        if controller is not None:
            controller.observe(result.exits)
        return result

    def _exit(
        self, k: int, state: Any, ids: torch.Tensor, history: ExitHistory, policy: Policy, threshold: float,
        head: nn.Module, out: "_Results",
    ) -> tuple[Any, torch.Tensor, ExitHistory]:
        """Exit ``k`` on the running rows (sample ids ``ids [B]``): stage, head, decision, and the
        leaving rows' results written to ``out``. Returns the stage output, ``leave [B]`` bool and
        the history with this exit's scores and predictions."""
        state = self.stages[k](state) if k else self._first_stage(self.stages[0], state)
        logits = head(state)
        backend = select_backend(self.backend, logits.device)  # under torch.compile, "auto" is "torch"
        q, prediction, leave, nonfinite = backend.decide(policy, k, logits, history, k == self.num_exits - 1, threshold)
        out.write(backend, k, leave, ids, logits, prediction, nonfinite)
        return state, leave, history if k == self.num_exits - 1 else history.extend(q, prediction)

    def compile_stages(self, **compile_kwargs: Any) -> "EarlyExitModel":
        """``torch.compile`` every stage and head, not the data path between them; ``compile_kwargs``
        go to ``torch.compile`` (``mode=``, ``dynamic=``, ``backend=``). Their parameter names gain
        ``torch.compile``'s ``_orig_mod.``; saved policies load either way. Returns the model."""
        for modules in (self.stages, self.heads):
            for k, module in enumerate(modules):
                modules[k] = torch.compile(module, **compile_kwargs)
        return self

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


@torch.compiler.disable  # reads an attribute: no graph of its own under torch.compile
def _riders(policy: Policy) -> frozenset[int]:
    """The exits after which ``policy``'s time model plans no compaction (``LatencyModel.compact_after``)."""
    plan = None if policy.latency is None else policy.latency.compact_after
    return frozenset() if plan is None else frozenset(k for k, compacts in enumerate(plan) if not compacts)


@torch.compiler.disable  # allocations only: no graph of their own under torch.compile
def _start(batch: int, device: torch.device, spare: bool = False) -> tuple[torch.Tensor, ExitHistory, "_Results"]:
    """The sample ids ``[B]``, the empty history and the outputs of a batch of ``batch`` samples
    (with a ``spare`` row after them for the rows that ride on after leaving)."""
    return torch.arange(batch, device=device), ExitHistory.empty(batch, device), _Results(batch, device, spare)


class _Results:
    """The outputs of :meth:`EarlyExitModel.forward` for ``batch`` samples, in input order, while
    the exits write their leaving rows into them; with ``spare``, one row more (index ``batch``)
    that rows riding on after they left write to, cut off by :meth:`result`."""

    def __init__(self, batch: int, device: torch.device, spare: bool = False) -> None:
        self.batch, rows = batch, batch + int(spare)
        self.logits: torch.Tensor | None = None  # [rows, C] in the heads' dtype, allocated at the first exit
        self.predictions = torch.full((rows,), -1, dtype=torch.long, device=device)
        self.exits = torch.full((rows,), -1, dtype=torch.long, device=device)
        self.nonfinite = torch.zeros(rows, dtype=torch.bool, device=device)

    def write(self, backend: Any, k: int, leave: torch.Tensor, ids: torch.Tensor, logits: torch.Tensor,
              prediction: torch.Tensor, nonfinite: torch.Tensor) -> None:
        """Write the rows leaving at exit ``k`` (``backend.write_exited``)."""
        if self.logits is None:
            self.logits = logits.new_empty(self.exits.shape[0], logits.shape[1])
        backend.write_exited(leave, ids, logits, prediction, nonfinite, k,
                             self.logits, self.predictions, self.exits, self.nonfinite)

    @torch.compiler.disable  # views of the outputs: no graph of their own under torch.compile
    def result(self, num_classes: int) -> ExitResult:
        n = self.batch
        logits = self.logits[:n] if self.logits is not None else torch.empty(0, num_classes, device=self.exits.device)
        return ExitResult(logits, self.predictions[:n], self.exits[:n], self.nonfinite[:n])


def _one_batch(x: Any, inputs: dict[str, Any]) -> Any:
    """The batch given to :meth:`EarlyExitModel.forward`: ``x``, or the keywords as one dict."""
    if inputs and x is not None:
        raise TypeError(
            f"give the batch either as one argument, model(x), or as keywords, model(**batch), not both "
            f"(got x and {sorted(inputs)})"
        )
    if x is None and not inputs:
        raise TypeError("no input: call model(x) with a batch, or model(**batch) with a tokenizer's output")
    return dict(inputs) if inputs else x
