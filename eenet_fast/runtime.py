"""Adaptive inference that really stops: :func:`wrap` and :class:`EarlyExitModel`.

The data path of :meth:`EarlyExitModel.forward`, for each exit ``k`` in order::

    state  = stages[k](state)                 # only the samples still running
    logits = heads[k](state)
    q, leave = backend.decide(policy, k, logits, history, thresholds[k])
    backend.write_exited(...)                 # the leaving rows' logits, prediction, exit index
    state, ids, history = backend.compact(~leave, state, ids, history)

Every per-sample tensor (activations, tuple/dict entries with the batch first, sample ids, earlier
scores and predictions) is compacted together, so a sample's result never depends on which batch
it came in, and no sample is dropped, duplicated or reordered.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from eenet_fast.batch import batch_size, map_batch, move_to
from eenet_fast.compaction import compact_reference, write_exited_reference
from eenet_fast.control import BudgetController
from eenet_fast.decision import exit_flags
from eenet_fast.families import FAMILIES, find_backbone, split_after
from eenet_fast.features import exit_features
from eenet_fast.outputs import ExitOutputs
from eenet_fast.persist import exits_fingerprint, heads_digest, load_policy, save_policy
from eenet_fast.policies import ExitHistory, Policy, make_policy
from eenet_fast.zoo import count_flops

__all__ = ["ExitResult", "EarlyExitModel", "TorchBackend", "TritonBackend", "wrap", "pooled_linear_head"]

Backend = Literal["auto", "torch", "triton"]
CostSpec = Literal["flops", "latency"] | Sequence[float]


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


def compact_state(
    compact: Callable[..., tuple[torch.Tensor, ...]], keep: torch.Tensor, state: Any, *per_sample: torch.Tensor
) -> tuple[Any, ...]:
    """Compact ``state`` (see :func:`map_batch`) and each per-sample tensor with one call of
    ``compact(keep, *tensors)``, so the kept positions are counted once for all of them."""
    batch, leaves = keep.shape[0], []
    map_batch(lambda t: leaves.append(t) or t, state, batch)
    kept = iter(compact(keep, *leaves, *per_sample))
    return (map_batch(lambda t: next(kept), state, batch), *kept)


class TorchBackend:
    """The pure-PyTorch path: the CPU path and the reference of the Triton backend."""

    name = "torch"

    @staticmethod
    def decide(policy: Policy, k: int, logits: torch.Tensor, history: ExitHistory, last: bool, threshold: torch.Tensor):
        """Exit decision at exit ``k`` for logits ``[B, C]`` against ``threshold`` (a 0-d tensor).

        Returns:
            ``(q, prediction, leave, nonfinite)``: ``[B]`` float32 scores, int64 predictions, bool
            exit flags (all true at the last exit) and bool rows with NaN/Inf logits.
        """
        feats = exit_features(logits)
        q = policy.score(k, feats, history).float()
        leave, nonfinite = exit_flags(logits, q, threshold.to(q.device), last)
        return q, feats.prediction, leave, nonfinite

    write_exited = staticmethod(write_exited_reference)

    @staticmethod
    def compact(keep: torch.Tensor, state: Any, *per_sample: torch.Tensor) -> tuple[Any, ...]:
        """Gather the kept rows of ``state`` (any structure, see :func:`map_batch`) and of each tensor."""
        return compact_state(compact_reference, keep, state, *per_sample)


class TritonBackend:
    """Fused Triton kernels (``eenet_fast.kernels``) on CUDA tensors; CPU tensors only under Triton's
    interpreter (``TRITON_INTERPRET=1``). Same interface and results as :class:`TorchBackend`.

    ``decide`` is one launch per exit when the policy has a score head (:meth:`Policy.score_head`)
    and the logits are float32/float16/bfloat16, else :meth:`TorchBackend.decide`; ``compact`` is
    one prefix sum, one host read of the kept count and one gather launch per per-sample tensor.
    """

    name = "triton"

    @staticmethod
    def decide(policy: Policy, k: int, logits: torch.Tensor, history: ExitHistory, last: bool, threshold: torch.Tensor):
        """Exit decision at exit ``k`` for logits ``[B, C]``: see :meth:`TorchBackend.decide`."""
        from eenet_fast.kernels.exit_decision import LOGIT_DTYPES, exit_decision

        head = policy.score_head_on(k, logits.device)
        if head is None or logits.dtype not in LOGIT_DTYPES:
            return TorchBackend.decide(policy, k, logits, history, last, threshold)
        decision = exit_decision(logits, head, history.scores, float(threshold), last)
        return decision.score, decision.prediction, decision.leave, decision.nonfinite

    @staticmethod
    def write_exited(*args: Any) -> None:
        """Scatter the leaving rows' results (see :func:`eenet_fast.compaction.write_exited_reference`)."""
        from eenet_fast.kernels.compaction import write_exited

        write_exited(*args)

    @staticmethod
    def compact(keep: torch.Tensor, state: Any, *per_sample: torch.Tensor) -> tuple[Any, ...]:
        """Gather the kept rows of ``state`` (any structure, see :func:`map_batch`) and of each tensor."""
        from eenet_fast.kernels.compaction import compact

        return compact_state(compact, keep, state, *per_sample)


def _triton_unavailable(device: torch.device) -> str | None:
    """Why the triton backend cannot run on ``device`` (``None`` when it can)."""
    try:
        from eenet_fast.kernels.exit_decision import INTERPRET
    except ImportError as error:
        return f"triton cannot be imported ({error})"
    if device.type != "cuda" and not INTERPRET:
        return (
            f"the model is on {device} and the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set "
            "before eenet_fast.kernels is imported, to run them in Triton's CPU interpreter)"
        )
    return None


def _backend(name: str, device: torch.device):
    if name == "torch":
        return TorchBackend
    if name == "auto":
        return TritonBackend if device.type == "cuda" and _triton_unavailable(device) is None else TorchBackend
    if name == "triton":
        reason = _triton_unavailable(device)
        if reason is not None:
            raise RuntimeError(f"backend='triton' is not available: {reason}; use backend='torch' (or 'auto')")
        return TritonBackend
    raise ValueError(f"unknown backend {name!r}; choose 'auto', 'torch' or 'triton'")


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
            raise ValueError(f"need one head per stage and at least one of each, got {len(stages)} stages and {len(heads)} heads")
        self.stages = stages if isinstance(stages, nn.ModuleList) else nn.ModuleList(stages)
        self.heads = heads if isinstance(heads, nn.ModuleList) else nn.ModuleList(heads)
        self.backend = backend
        self.new_heads = tuple(sorted(set(new_heads)))
        if any(not 0 <= k < len(heads) for k in self.new_heads):
            raise ValueError(f"new_heads {self.new_heads} must index the {len(heads)} heads")
        self.policy: Policy | None = None
        self.controller: BudgetController | None = None  # optional: moves the thresholds to hold the budget

    @property
    def num_exits(self) -> int:
        return len(self.heads)

    # --------------------------------------------------------- every exit
    def all_exits(self, x: Any) -> list[torch.Tensor]:
        """Run every stage once and every head: ``K`` logits ``[B, C]`` (for training and calibration)."""
        logits = []
        for stage, head in zip(self.stages, self.heads):
            x = stage(x)
            logits.append(head(x))
        return logits

    @torch.no_grad()
    def collect(self, loader: Iterable, *, progress: bool = True, costs: Sequence[float] | None = None) -> ExitOutputs:
        """Exit outputs of a whole loader of ``x`` or ``(x, y)`` batches (eval mode, no grad).

        Returns:
            :class:`ExitOutputs` with float32 logits ``[K, N, C]``, labels when the loader has them.
        """
        self._require_eval("collect")
        chunks: list[list[torch.Tensor]] = [[] for _ in range(self.num_exits)]
        labels = []
        device = self._device()
        for batch in tqdm(loader, desc="collecting exit outputs", disable=not progress, leave=False):
            x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) and len(batch) == 2 else (batch, None)
            for k, z in enumerate(self.all_exits(move_to(x, device))):
                chunks[k].append(z.float().cpu())
            if y is not None:
                labels.append(torch.as_tensor(y).cpu())
        if not chunks[0]:
            raise ValueError("the loader gave no batches; nothing to collect")
        scores = torch.stack([torch.cat(c) for c in chunks])
        return ExitOutputs(scores, torch.cat(labels) if labels else None, costs)

    # ---------------------------------------------------------------- costs
    def measure_costs(self, spec: CostSpec, example: Any, reach: Sequence[float] | None = None) -> list[float]:
        """Cumulative costs of the exits, with the full model (every stage and the last head, on the
        whole batch) costing 1.0; explicit numbers are returned as given.

        * ``"flops"``: counted (:func:`eenet_fast.zoo.count_flops`): stages ``0..k`` plus head ``k``.
        * ``"latency"``: timed on the model's device with ``example``, a batch like those it will
          serve. Exit ``k`` costs what adaptive inference really pays per sample to get there: for
          every stage ``j <= k``, the stage, its head, the exit decision and the compaction after
          it, timed at the batch size that reaches stage ``j`` (``reach[j]`` of the batch; all of it
          when ``reach`` is ``None``) and divided by that batch size. So the last exit costs a
          little more than 1.0 (it also pays the early heads), and a policy's average cost is the
          fraction of the full model's time that adaptive inference takes.

        Args:
            reach: ``K`` fractions of the samples that reach each stage (non-increasing, ``reach[0]
                = 1``), e.g. from a policy fitted on the unreached costs; only for ``"latency"``.
        """
        if not isinstance(spec, str):
            return [float(c) for c in spec]
        if spec == "flops":
            costs = count_flops(self, example)
            return [c / costs[-1] for c in costs]
        if spec == "latency":
            return self._latency(example, reach)
        raise ValueError(f"costs must be 'flops', 'latency' or a list of {self.num_exits} numbers, got {spec!r}")

    @torch.no_grad()
    def _latency(self, example: Any, reach: Sequence[float] | None, repeats: int = 7) -> list[float]:
        """Per-sample cumulative median times of the exits over the full model's (see :meth:`measure_costs`).

        Each repeat runs the full model once, then the exits as :meth:`forward` does: stage, head,
        decision features and compaction of the state down to the samples that reach the next
        stage, so that every stage is timed on a gathered batch with the caches as they really are.
        """
        self._require_eval("measure latency")
        device = self._device()
        backend = _backend(self.backend, device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

        def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
            sync()
            start = time.perf_counter()
            out = fn()
            sync()
            return time.perf_counter() - start, out

        x = move_to(example, device)
        batch = batch_size(x)
        reach = [1.0] * self.num_exits if reach is None else [min(max(float(r), 0.0), 1.0) for r in reach]
        if len(reach) != self.num_exits:
            raise ValueError(f"reach needs one fraction per exit ({self.num_exits}), got {len(reach)}")
        counts = [max(1, round(r * batch)) for r in reach] + [0]
        full_times, exit_times = [], [[] for _ in range(self.num_exits)]
        for _ in range(repeats + 1):  # the first repeat warms up and is not kept
            full = 0.0
            state = x
            for stage in self.stages:
                stage_time, state = timed(lambda: stage(state))
                full += stage_time
            full_times.append(full + timed(lambda: self.heads[-1](state))[0])
            state = map_batch(lambda t: t[: counts[0]], x, batch)
            for k, (stage, head) in enumerate(zip(self.stages, self.heads)):
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

    # ---------------------------------------------------------- calibration
    def calibrate(
        self,
        val: Iterable | ExitOutputs,
        budget: float | str,
        policy: str | Policy = "eenet",
        costs: CostSpec = "flops",
        *,
        example: Any = None,
        confidence: float | None = None,
        **policy_options: Any,
    ) -> Policy:
        """Fit an exit policy for an average-cost ``budget`` and install it on this model.

        Args:
            val: a loader of ``(x, y)`` batches, or cached :class:`ExitOutputs` of this model.
            budget: average cost per sample; with ``costs="flops"`` or ``"latency"`` the full model
                costs 1.0 (``0.5`` = half of it; with ``"latency"``, half of its time); with
                explicit costs, in their unit.
            policy: a policy name (``eenet``, ``maxprob``, ...) or an unfitted :class:`Policy`.
            costs: ``"flops"``, ``"latency"`` or ``K`` cumulative costs (see :meth:`measure_costs`).
                With ``"latency"`` the policy is fitted twice: the second time on costs timed at
                the batch sizes the first policy lets reach each stage.
            example: a batch like those the model will serve, to measure ``"flops"`` or
                ``"latency"`` costs when ``val`` is cached outputs (default: the loader's first batch).
                Cached outputs that hold costs and no ``example`` keep their costs.
            confidence: certify the budget at this level (see :meth:`Policy.fit`).
            policy_options: passed to the policy's constructor.
        """
        if isinstance(val, ExitOutputs):
            outputs = val
            if example is not None or outputs.costs is None:
                if isinstance(costs, str) and example is None:
                    raise ValueError("cached outputs without costs need explicit costs=[c1, ..., cK] or example=<a batch>")
                outputs = outputs.with_costs(self.measure_costs(costs, move_to(example, self._device())))
        else:
            outputs = self.collect(val)
            if example is None:
                example = next(iter(val))
                example = example[0] if isinstance(example, (tuple, list)) and len(example) == 2 else example
            example = move_to(example, self._device())
            outputs = outputs.with_costs(self.measure_costs(costs, example))
        if outputs.num_exits != self.num_exits:
            raise ValueError(f"the outputs have {outputs.num_exits} exits but this model has {self.num_exits}")

        def fit(outputs: ExitOutputs) -> Policy:
            unfitted = make_policy(policy, **policy_options) if isinstance(policy, str) else copy.deepcopy(policy)
            return unfitted.fit(outputs, budget, confidence=confidence)

        fitted = fit(outputs)
        if costs == "latency" and example is not None:  # re-time each stage at the batch the policy lets reach it
            exits = fitted.assign(outputs)
            reach = [float((exits >= k).double().mean()) for k in range(self.num_exits)]
            fitted = fit(outputs.with_costs(self.measure_costs("latency", example, reach)))
        if not fitted.deployable:
            raise ValueError(f"policy {fitted.name!r} needs labels at inference and cannot run in a model")
        self.policy = fitted
        return fitted

    # ------------------------------------------------------------ inference
    @torch.no_grad()
    def forward(self, x: Any) -> ExitResult:
        """Adaptive inference on a batch (tensor or tuple/dict of tensors with the batch first).

        Returns:
            :class:`ExitResult` for the ``B`` samples, in input order.
        """
        self._require_eval("run adaptive inference")
        if self.policy is None:
            raise RuntimeError("no exit policy: call calibrate(val, budget) or load_policy(path) first")
        if self.controller is not None and self.controller.policy is not self.policy:
            raise RuntimeError("the controller was built for another policy: set model.controller = BudgetController(model.policy, val)")
        thresholds = self.policy.thresholds if self.controller is None else self.controller.thresholds()
        backend = _backend(self.backend, self._device())
        batch = batch_size(x)
        device = self._device()
        ids = torch.arange(batch, device=device)
        history = ExitHistory.empty(batch, device)
        out_logits: torch.Tensor | None = None
        out_exits = torch.full((batch,), -1, dtype=torch.long, device=device)
        out_predictions = torch.full((batch,), -1, dtype=torch.long, device=device)
        out_nonfinite = torch.zeros(batch, dtype=torch.bool, device=device)
        state = x
        for k, (stage, head) in enumerate(zip(self.stages, self.heads)):
            if ids.numel() == 0:
                break
            state = stage(state)
            logits = head(state)
            if out_logits is None:
                out_logits = logits.new_empty(batch, logits.shape[1])
            q, prediction, leave, nonfinite = backend.decide(
                self.policy, k, logits, history, k == self.num_exits - 1, thresholds[k]
            )
            backend.write_exited(leave, ids, logits, prediction, nonfinite, k,
                                 out_logits, out_predictions, out_exits, out_nonfinite)
            history = history.extend(q, prediction)
            keep = ~leave
            state, ids, scores, predictions = backend.compact(keep, state, ids, history.scores, history.predictions)
            history = ExitHistory(scores, predictions)
        if out_logits is None:  # empty batch: no head ran
            out_logits = torch.empty(0, self.policy.num_classes, device=device)
        if self.controller is not None:
            self.controller.observe(out_exits)
        return ExitResult(out_logits, out_predictions, out_exits, out_nonfinite)

    # ------------------------------------------------------- saving the policy
    def save_policy(self, path: str | Path) -> None:
        """Write the calibrated policy to one safetensors file (no pickle), with the weights of the
        heads :func:`wrap` added (``new_heads``), a fingerprint of the exits and a digest of every
        head's weights (see :mod:`eenet_fast.persist`)."""
        if self.policy is None:
            raise RuntimeError("no policy to save: call calibrate(val, budget) first")
        added = {f"{k}.{name}": t for k in self.new_heads for name, t in self.heads[k].state_dict().items()}
        save_policy(self.policy, path, exits_fingerprint(self.heads), heads_digest(self.heads), added)

    def load_policy(self, path: str | Path) -> Policy:
        """Install a policy saved by :meth:`save_policy`, first restoring the added heads' weights it
        holds; fails if it was calibrated for other exits, or for heads with other weights."""
        saved = load_policy(path, exits_fingerprint(self.heads))
        if saved.policy.thresholds.numel() != self.num_exits:
            raise ValueError(f"{path} holds a policy for {saved.policy.thresholds.numel()} exits, this model has {self.num_exits}")
        by_head: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in saved.head_weights.items():
            k, name = key.split(".", 1)
            by_head.setdefault(int(k), {})[name] = value
        for k, state in by_head.items():
            if k not in self.new_heads:
                raise ValueError(f"{path} holds weights for exit head {k}, which is not a head wrap added to this model")
            self.heads[k].load_state_dict(state)
        if heads_digest(self.heads) != saved.heads_digest:
            raise ValueError(
                f"{path} was calibrated on exit heads with other weights than this model's (the model was "
                "trained again, converted to another dtype, or its heads were not saved with the policy); "
                "calibrate this model instead"
            )
        self.policy = saved.policy
        return saved.policy

    # ---------------------------------------------------------------- utils
    def _device(self) -> torch.device:
        param = next(self.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def _require_eval(self, what: str) -> None:
        if self.training:
            raise RuntimeError(
                f"cannot {what} in training mode: BatchNorm and dropout would make a sample's result depend "
                "on its batch. Call model.eval() first (use all_exits(x) to train)"
            )


def pooled_linear_head(num_classes: int) -> Callable[[torch.Tensor], nn.Module]:
    """A head factory: from a stage's example output ``[B, D, ...]`` build global average pooling
    over the trailing dims and ``Linear(D, num_classes)``."""

    def factory(output: torch.Tensor) -> nn.Module:
        if not isinstance(output, torch.Tensor) or output.ndim < 2:
            raise TypeError("pooled_linear_head needs stage outputs that are tensors [B, D, ...]; give heads explicitly")
        pool = nn.Flatten(2) if output.ndim > 2 else nn.Identity()
        return nn.Sequential(pool, _MeanTrailing(), nn.Linear(output.shape[1], num_classes)).to(output.device)

    return factory


class _MeanTrailing(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(2) if x.ndim == 3 else x


def wrap(
    model: nn.Module,
    *,
    exits_after: Sequence[int] | None = None,
    heads: Sequence[nn.Module] | Callable[[Any], nn.Module] | None = None,
    example_input: Any = None,
    backend: Backend = "auto",
) -> EarlyExitModel:
    """Turn a model into an :class:`EarlyExitModel`. Three forms:

    * **a recognised backbone** (see :mod:`eenet_fast.families`): a torchvision-style ResNet, a
      Hugging Face ViT image classifier or a BERT-style sequence classifier. ``wrap(model)`` alone
      places exits after every layer group (ResNet) or every few layers (about 4 exits), with new
      heads (:func:`~eenet_fast.families.conv_head`, :class:`~eenet_fast.families.TokenHead`) on the
      early exits and the model's own classifier as the last exit. ``exits_after`` (0-based block
      indices, ending at the last block) moves the exits; ``heads`` replaces the early exits' heads
      (``K - 1`` modules, or a factory called on each early stage's output for ``example_input``).
      With ``example_input``, the last exit is checked against ``model(example_input)``.
    * **a module with** ``stages`` **and** ``heads`` (``nn.ModuleList`` of equal length): used as is.
    * **an** ``nn.Sequential`` split after the module indices ``exits_after`` (the last index must be
      the last module), with ``heads`` one module per exit or a factory called on each stage's output
      for ``example_input`` (e.g. :func:`pooled_linear_head`). When the sequential already ends in
      the classifier, give ``nn.Identity()`` as the last head.

    The wrapped model shares its parameters with ``model`` and keeps its train/eval mode.
    """
    if isinstance(getattr(model, "stages", None), nn.ModuleList) and isinstance(getattr(model, "heads", None), nn.ModuleList):
        if exits_after is not None or heads is not None:
            raise ValueError("this model already has stages and heads; do not pass exits_after or heads")
        out = EarlyExitModel(model.stages, model.heads, backend)
        return out.train(model.training)
    backbone = find_backbone(model)
    if backbone is not None:
        cuts = list(backbone.default_exits if exits_after is None else exits_after)
        stages = backbone.stages(cuts)
        if heads is None:
            early = [backbone.new_head(i) for i in cuts[:-1]]
        else:
            early = _build_heads(heads, stages[:-1], example_input)
        if len(early) != len(stages) - 1:
            raise ValueError(
                f"a {backbone.family} with exits after {backbone.block_name}s {cuts} needs {len(stages) - 1} "
                f"early-exit heads (its own classifier is the last exit), got {len(early)}"
            )
        _match_model(early, model)
        out = EarlyExitModel(stages, [*early, backbone.output_head], backend, new_heads=range(len(early)))
        out.train(model.training)
        if example_input is not None:
            _check_last_exit(out, model, example_input, backbone.family)
        return out
    if not isinstance(model, nn.Sequential):
        raise TypeError(
            f"cannot find exits in {type(model).__name__}: it is none of the recognised families "
            f"({', '.join(FAMILIES)}; see eenet_fast.families). Give a module with `stages` and `heads` "
            "(nn.ModuleList), or an nn.Sequential with exits_after=[...] and heads=..., or build "
            "EarlyExitModel(stages=[...], heads=[...]) yourself"
        )
    if exits_after is None or heads is None:
        raise ValueError("an nn.Sequential needs exits_after=[i, ...] (module indices) and heads (modules or a factory)")
    stages = split_after(list(model), exits_after, "module")
    built = _build_heads(heads, stages, example_input)
    if len(built) != len(stages):
        raise ValueError(f"exits_after gives {len(stages)} exits but {len(built)} heads were given")
    new = range(len(built)) if _is_factory(heads) else ()
    return EarlyExitModel(stages, built, backend, new_heads=new).train(model.training)


def _is_factory(heads: Any) -> bool:
    return callable(heads) and not isinstance(heads, (nn.Module, Sequence))


def _build_heads(heads: Any, stages: Sequence[nn.Module], example_input: Any) -> list[nn.Module]:
    """``heads`` as a list: the modules given, or a factory called on each stage's output for ``example_input``."""
    if not _is_factory(heads):
        return list(heads)
    if example_input is None:
        raise ValueError("a head factory needs example_input (one batch) to learn each stage's output shape")
    built, x = [], example_input
    with torch.no_grad():
        for stage in stages:
            x = stage(x)
            built.append(heads(x))
    return built


def _match_model(heads: list[nn.Module], model: nn.Module) -> None:
    """Put new heads on the device and floating dtype of the model's parameters."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is not None:
        for head in heads:
            head.to(device=param.device, dtype=param.dtype)


@torch.no_grad()
def _check_last_exit(wrapped: EarlyExitModel, model: nn.Module, example_input: Any, family: str) -> None:
    """Raise unless the last exit of ``wrapped`` gives ``model``'s logits on ``example_input``."""
    was_training = model.training
    model.eval()
    try:
        expected = model(**example_input) if isinstance(example_input, Mapping) else model(example_input)
        expected = getattr(expected, "logits", expected)
        got = wrapped.all_exits(example_input)[-1]
    finally:
        model.train(was_training)
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
        raise ValueError(
            f"{type(model).__name__} looks like a {family} but its forward computes something else than the "
            "layout eenet_fast.families expects (the last exit does not reproduce its output); wrap it with "
            "explicit stages and heads: EarlyExitModel(stages=[...], heads=[...])"
        )
