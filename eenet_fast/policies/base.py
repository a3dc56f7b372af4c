"""The policy interface (:class:`Policy`) and what a sample carries between exits (:class:`ExitHistory`).

A policy scores each sample at each exit, ``q_k`` (``[N]`` float32), from that exit's confidence
features and the sample's history (earlier scores and predictions). A sample leaves at the first
exit ``k`` with ``q_k >= T_k``; the last exit has ``T_K = -inf`` and takes everything left. Fitting a
policy for a budget sets its scorer (if it learns one) and its thresholds ``T`` on validation
outputs so that the validation average cost is at most the budget.

The same :meth:`Policy.score` runs offline over whole data sets and online inside the runtime on
compacted batches, so the offline simulation and real early exit take the same decisions.

A policy is an ``nn.Module``: installed in an :class:`~eenet_fast.runtime.EarlyExitModel` it is
the submodule ``policy``, so its tensors (thresholds, costs, learned weights) follow the model's
``.to(device)`` and appear in ``state_dict()``. They keep their own dtypes (float32 thresholds and
weights, float64 costs) under ``.half()`` or ``.to(dtype)``: a decision must not change with the
precision the network runs in. A fitted policy's parameters need no gradients.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from eenet_fast.decision import ScoreHeadParams
from eenet_fast.errors import InputError, PolicyError
from eenet_fast.features import ExitFeatures
from eenet_fast.outputs import ExitOutputs
from eenet_fast.policies.thresholds import assign_exits, average_cost, resolve_budget
from eenet_fast.threads import torch_threads

if TYPE_CHECKING:
    from eenet_fast.guarantee import BudgetGuarantee
    from eenet_fast.timing import LatencyModel

__all__ = ["ExitHistory", "Policy"]


@dataclass(frozen=True)
class ExitHistory:
    """What a sample carries from exits ``0..k-1`` to exit ``k``.

    Attributes:
        scores: ``[N, k]`` float32 policy scores at the earlier exits.
        predictions: ``[N, k]`` int64 predictions of the earlier exits.
    """

    scores: torch.Tensor
    predictions: torch.Tensor

    @classmethod
    def empty(cls, n: int, device: torch.device | str = "cpu") -> "ExitHistory":
        return cls(torch.empty(n, 0, device=device), torch.empty(n, 0, dtype=torch.long, device=device))

    def extend(self, score: torch.Tensor, prediction: torch.Tensor) -> "ExitHistory":
        return ExitHistory(
            torch.cat([self.scores, score.unsqueeze(1)], 1),
            torch.cat([self.predictions, prediction.unsqueeze(1)], 1),
        )


class Policy(nn.Module, ABC):
    """An exit policy: scores per exit plus thresholds fitted for a budget.

    Subclasses implement :meth:`score` and :meth:`_fit`. After :meth:`fit`, ``thresholds`` is a
    ``[K]`` float32 buffer (``T_K = -inf``), ``costs`` the ``[K]`` float64 buffer of costs,
    ``budget`` the absolute budget it was fitted for and ``guarantee`` what a fit with a confidence
    certified.
    """

    name: ClassVar[str]
    deployable: ClassVar[bool] = True  # False for policies that need labels at inference (the oracle)
    # how a fit with a confidence builds the family of thresholds it certifies (eenet_fast.guarantee):
    # "tilt" (tilts of the fitted exit mix) or "refit" (fits at lower budgets: scores independent of the fit)
    certify_by: ClassVar[str] = "tilt"

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("thresholds", None)
        self.register_buffer("costs", None)
        self.budget: float | None = None
        self.num_classes: int | None = None
        self.guarantee: BudgetGuarantee | None = None
        self.latency: LatencyModel | None = None  # a time budget's cost model (set by calibrate(costs="latency"))
        self._score_heads_on: dict[tuple[int, str], ScoreHeadParams | None] = {}

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "Policy":
        """Follow a move of the model to another device, but keep every tensor's dtype (see the module doc)."""
        return super()._apply(lambda t: t.to(fn(t).device), *args, **kwargs)

    def forward(self, *args: Any) -> Any:
        raise TypeError(
            "a policy is not called like a layer: use policy.score(k, features, history) for exit k, or "
            "run the EarlyExitModel it is installed in"
        )

    # -------------------------------------------------------------- scoring
    @abstractmethod
    def score(self, k: int, features: ExitFeatures, history: ExitHistory) -> torch.Tensor:
        """Score ``q_k`` (``[N]`` float32) of every sample at exit ``k`` (0-based)."""

    def score_head(self, k: int) -> ScoreHeadParams | None:
        """The score at exit ``k`` as plain tensors, for the fused decision of the Triton backend.

        Returns:
            :class:`~eenet_fast.decision.ScoreHeadParams` (float32, on the CPU) with which
            :func:`~eenet_fast.decision.decide_reference` gives exactly :meth:`score`, or ``None``
            when the score is not of that form (the runtime then calls :meth:`score`).
        """
        return None

    def score_head_on(self, k: int, device: torch.device) -> ScoreHeadParams | None:
        """:meth:`score_head` on ``device``, built once per fitted policy, exit and device (the
        Triton backend and EENet's :meth:`score` ask for it at every exit of every batch)."""
        key = (k, str(device))
        if key not in self._score_heads_on:
            head = self.score_head(k)
            self._score_heads_on[key] = None if head is None else head.to(device)
        return self._score_heads_on[key]

    def exit_scores(self, outputs: ExitOutputs) -> torch.Tensor:
        """``[K, N]`` scores of every sample at every exit, computed exit by exit as at inference."""
        history = ExitHistory.empty(outputs.num_samples)
        rows = []
        for k, feats in enumerate(outputs.features):
            q = self.score(k, feats, history).float()
            rows.append(q)
            history = history.extend(q, feats.prediction)
        return torch.stack(rows)

    # -------------------------------------------------------------- fitting
    def fit(
        self, val: ExitOutputs, budget: float | str, *, confidence: float | None = None, holdout: float = 0.5, seed: int = 0
    ) -> "Policy":
        """Fit on validation outputs (with labels and costs) for an average-cost ``budget``.

        With ``confidence`` (e.g. 0.95) the policy is fitted on a seeded ``1 - holdout`` share of
        ``val`` and its thresholds are certified on the rest, so that the mean cost per sample of new
        data is at most the budget with probability at least ``confidence``; ``guarantee`` then holds
        the :class:`~eenet_fast.guarantee.BudgetGuarantee` (see :mod:`eenet_fast.guarantee`).
        """
        costs = val.require_costs()
        val.require_labels()
        if val.num_samples == 0:
            raise InputError("cannot fit a policy on an empty validation set: give outputs of at least one sample")
        self.costs, self.num_classes = costs, val.num_classes
        self.budget = resolve_budget(budget, costs)
        self._score_heads_on = {}  # the score heads change with the fit
        self.guarantee = self.latency = None
        fit_part = val
        if confidence is not None:
            from eenet_fast import guarantee  # it builds on this module

            guarantee.check_confidence(confidence, holdout)
            fit_part, holdout_part = guarantee.split_outputs(val, holdout, seed)
        # one thread: fitting is thousands of small ops, which gain nothing from more threads and slow
        # down many times over when another process holds a core
        with torch_threads(1):
            self.thresholds = self._fit(fit_part, self.budget)
        self.requires_grad_(False)
        exits = self.assign(fit_part)
        cost = average_cost(exits, costs)
        if cost > self.budget * (1 + 1e-9):  # the fitting routines guarantee this; keep them honest
            raise RuntimeError(f"{self.name}: validation cost {cost:.6g} exceeds the budget {self.budget:.6g}")
        if confidence is not None:
            with torch_threads(1):
                self.thresholds, self.guarantee = guarantee.certify(self, fit_part, holdout_part, self.budget, confidence)
        return self

    @abstractmethod
    def _fit(self, val: ExitOutputs, budget: float) -> torch.Tensor:
        """Return ``[K]`` thresholds meeting ``budget`` on ``val``."""

    def _check_fitted(self, outputs: ExitOutputs) -> None:
        if self.thresholds is None:
            raise RuntimeError(f"policy {self.name!r} is not fitted: call .fit(val, budget) first")
        if outputs.num_exits != self.thresholds.numel() or outputs.num_classes != self.num_classes:
            raise PolicyError(
                f"policy {self.name!r} was fitted for {self.thresholds.numel()} exits and {self.num_classes} "
                f"classes, got outputs with {outputs.num_exits} exits and {outputs.num_classes} classes"
            )

    def assign(self, outputs: ExitOutputs) -> torch.Tensor:
        """``[N]`` int64: the exit each sample leaves at."""
        self._check_fitted(outputs)
        scores = self.exit_scores(outputs)
        return assign_exits(scores, self.thresholds.to(scores.device))

    # ---------------------------------------------------- saving and loading
    def options(self) -> dict[str, Any]:
        """Constructor options needed to rebuild this policy from a file (JSON-ready)."""
        return {}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Learned tensors beyond thresholds and costs (e.g. scheduler weights)."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_tensors` gave, after thresholds, costs and classes are set.

        Raises:
            PolicyError: tensors this policy does not have, or that do not fit it.
        """
        if tensors:
            raise PolicyError(f"{self.name}: unexpected tensors {', '.join(sorted(tensors))} (this policy learns none)")

    def __repr__(self) -> str:
        budget = "unfitted" if self.budget is None else f"budget={self.budget:.6g}"
        return f"{type(self).__name__}({budget})"
