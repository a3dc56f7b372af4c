"""The exit decision as plain tensors: score-head parameters and the pure-PyTorch reference.

At exit ``k`` a policy that can be written as a *score head* scores each sample from its logits
``z`` (``[B, C]``) and its earlier scores::

    p = softmax(z)                        (float32, whatever the dtype of z)
    g = [m, e, q_0, ..., q_{j-1}]         m = max_c p_c, e = 1 - H(p) / log C, j <= k earlier scores
    q = w . p + u . g + v . relu(A g + b)
    leave = q >= T_k and the row is finite   (every row leaves at the last exit)

:class:`ScoreHeadParams` holds ``w, u, A, b, v``; :meth:`Policy.score_head` gives them for the
policies that fit this form (``maxprob``, ``entropy``, ``search``, ``eenet``).
:func:`decide_reference` is the reference of the fused Triton kernel
(``eenet_fast.kernels.exit_decision``): built on :func:`~eenet_fast.features.exit_features` with the
same operations as the policies' own ``score``, so it returns exactly their scores.

Rows with NaN or Inf logits are flagged ``nonfinite`` and never leave early; their score and
prediction are unspecified (the reference and the kernel may disagree there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from eenet_fast.features import exit_features

__all__ = ["ScoreHeadParams", "Decision", "check_decision_inputs", "decide_reference", "exit_flags", "head_score", "nonfinite_rows"]


@dataclass(frozen=True)
class ScoreHeadParams:
    """``q = w . p + u . g + v . relu(A g + b)`` with ``g = [m, e, q_0, ..., q_{j-1}]``, all float32.

    The head reads ``n = j + 2`` confidences: the max score, the entropy confidence and the first
    ``j`` earlier scores (EENet at exit ``k`` reads all ``j = k``; ``maxprob`` and ``entropy`` read
    none, so an earlier NaN score cannot leak into their decision).

    Attributes:
        class_weight: ``w``, ``[C]``, or ``None`` for no per-class term.
        linear: ``u``, ``[n]``.
        mlp_weight: ``A``, ``[H, n]``, or ``None`` for no hidden layer.
        mlp_bias: ``b``, ``[H]`` (``None`` exactly when ``mlp_weight`` is).
        mlp_out: ``v``, ``[H]`` (``None`` exactly when ``mlp_weight`` is).
    """

    class_weight: torch.Tensor | None
    linear: torch.Tensor
    mlp_weight: torch.Tensor | None = None
    mlp_bias: torch.Tensor | None = None
    mlp_out: torch.Tensor | None = None

    def __post_init__(self) -> None:
        mlp = (self.mlp_weight, self.mlp_bias, self.mlp_out)
        if any(t is None for t in mlp) and any(t is not None for t in mlp):
            raise ValueError("mlp_weight, mlp_bias and mlp_out must be given together (or all be None)")
        for name in ("class_weight", "linear", "mlp_weight", "mlp_bias", "mlp_out"):
            t = getattr(self, name)
            if t is not None and (not isinstance(t, torch.Tensor) or t.dtype != torch.float32):
                raise TypeError(f"ScoreHeadParams.{name} must be a float32 tensor, got {getattr(t, 'dtype', type(t))}")
            if t is not None and t.device != self.linear.device:
                raise ValueError(f"ScoreHeadParams.{name} is on {t.device} but linear is on {self.linear.device}")
        if self.linear.ndim != 1 or self.linear.numel() < 2:
            raise ValueError(f"linear must have shape [n >= 2] (m, e, earlier scores), got {tuple(self.linear.shape)}")
        if self.class_weight is not None and self.class_weight.ndim != 1:
            raise ValueError(f"class_weight must have shape [C], got {tuple(self.class_weight.shape)}")
        if self.mlp_weight is not None:
            width = self.mlp_weight.shape[0]
            if self.mlp_weight.shape != (width, self.num_inputs) or width < 1:
                raise ValueError(
                    f"mlp_weight must have shape [H, {self.num_inputs}], got {tuple(self.mlp_weight.shape)}"
                )
            if self.mlp_bias.shape != (width,) or self.mlp_out.shape != (width,):
                raise ValueError(
                    f"mlp_bias and mlp_out must have shape [{width}], got {tuple(self.mlp_bias.shape)} "
                    f"and {tuple(self.mlp_out.shape)}"
                )

    @classmethod
    def select(cls, index: int) -> "ScoreHeadParams":
        """The head ``q = g[index]``: ``0`` for the max score, ``1`` for the entropy confidence."""
        linear = torch.zeros(2)
        linear[index] = 1.0
        return cls(None, linear)

    @property
    def num_inputs(self) -> int:
        """``n = j + 2``: the confidences the head reads."""
        return self.linear.numel()

    @property
    def mlp_width(self) -> int:
        """Width ``H`` of the hidden layer (0 without one)."""
        return 0 if self.mlp_weight is None else self.mlp_weight.shape[0]

    def to(self, device: torch.device | str) -> "ScoreHeadParams":
        """The same head on ``device`` (no copy when it is there already)."""
        move = lambda t: None if t is None else t.detach().to(device, non_blocking=True)  # noqa: E731
        return ScoreHeadParams(
            move(self.class_weight), move(self.linear), move(self.mlp_weight), move(self.mlp_bias), move(self.mlp_out)
        )


@dataclass(frozen=True)
class Decision:
    """The exit decision for ``B`` rows.

    Attributes:
        score: ``[B]`` float32 ``q_k``.
        prediction: ``[B]`` int64 ``argmax_c p_c`` (the first index among ties).
        leave: ``[B]`` bool, ``q_k >= T_k`` on finite rows (all true at the last exit).
        nonfinite: ``[B]`` bool, the row holds NaN or Inf.
    """

    score: torch.Tensor
    prediction: torch.Tensor
    leave: torch.Tensor
    nonfinite: torch.Tensor


def check_decision_inputs(logits: torch.Tensor, head: ScoreHeadParams, prev_scores: torch.Tensor) -> None:
    """Raise a clear error unless ``logits [B, C]`` (floating, ``C >= 2``), ``head`` and
    ``prev_scores [B, >= n - 2]`` (float32) fit together on one device."""
    if logits.ndim != 2:
        raise ValueError(f"expected logits of shape [B, C], got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    batch, num_classes = logits.shape
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes, got C={num_classes}")
    if head.class_weight is not None and head.class_weight.numel() != num_classes:
        raise ValueError(f"the head's class_weight has {head.class_weight.numel()} classes, the logits {num_classes}")
    if prev_scores.ndim != 2 or prev_scores.shape[0] != batch or prev_scores.dtype != torch.float32:
        raise ValueError(
            f"prev_scores must be float32 [B={batch}, k], got {prev_scores.dtype} {tuple(prev_scores.shape)}"
        )
    if prev_scores.shape[1] < head.num_inputs - 2:
        raise ValueError(
            f"the head reads {head.num_inputs - 2} earlier scores, prev_scores has {prev_scores.shape[1]}"
        )
    if not logits.device == prev_scores.device == head.linear.device:
        raise ValueError(
            f"logits ({logits.device}), prev_scores ({prev_scores.device}) and the head ({head.linear.device}) "
            "must be on one device"
        )


def decide_reference(
    logits: torch.Tensor,
    head: ScoreHeadParams,
    prev_scores: torch.Tensor,
    threshold: float | torch.Tensor,
    last: bool = False,
) -> Decision:
    """The exit decision in plain PyTorch (several kernels; the reference of the fused one).

    Args:
        logits: ``[B, C]`` logits, any floating dtype and strides.
        head: the policy's score head at this exit (on ``logits``' device).
        prev_scores: ``[B, k]`` float32 earlier scores; the head reads the first ``n - 2``.
        threshold: ``T_k`` (a float32 value); ignored at the last exit.
        last: this is the last exit: every row leaves.

    Returns:
        :class:`Decision`; ``score`` equals the policy's own ``score`` bit for bit.
    """
    check_decision_inputs(logits, head, prev_scores)
    feats = exit_features(logits)
    g = torch.cat([feats.max_score[:, None], feats.entropy_conf[:, None], prev_scores[:, : head.num_inputs - 2]], 1)
    q = head_score(feats.probs, g, head.class_weight, head.linear, head.mlp_weight, head.mlp_bias, head.mlp_out)
    leave, nonfinite = exit_flags(logits, q, threshold, last)
    return Decision(q, feats.prediction, leave, nonfinite)


def head_score(
    probs: torch.Tensor,
    g: torch.Tensor,
    class_weight: torch.Tensor | None,
    linear: torch.Tensor,
    mlp_weight: torch.Tensor | None = None,
    mlp_bias: torch.Tensor | None = None,
    mlp_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``q = w . p + u . g + v . relu(A g + b)`` (``[N]`` float32) of ``probs [N, C]`` and
    ``g [N, n]``: the one computation of the score head, shared by EENet's ``ScoreHead`` (with
    autograd, in training) and :func:`decide_reference`, so the two agree bit for bit. Two
    ``addmv`` instead of products and sums: few ops, as it runs at every exit of every batch."""
    q = g @ linear
    if class_weight is not None:
        q = torch.addmv(q, probs, class_weight)
    if mlp_weight is not None:
        q = torch.addmv(q, F.linear(g, mlp_weight, mlp_bias).relu_(), mlp_out)
    return q


def exit_flags(
    logits: torch.Tensor, score: torch.Tensor, threshold: float | torch.Tensor, last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(leave, nonfinite)``, both ``[B]`` bool: a row leaves when ``score >= threshold`` and its
    logits ``[B, C]`` are all finite; at the last exit every row leaves."""
    nonfinite = nonfinite_rows(logits)
    leave = torch.ones_like(nonfinite) if last else (score >= threshold).masked_fill_(nonfinite, False)
    return leave, nonfinite


def nonfinite_rows(logits: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: the row of ``logits [B, C]`` holds a NaN or an Inf.

    The row's sum in float64 is finite exactly when every entry is (float32 and narrower values
    cannot overflow it; NaN and Inf carry through, and Inf - Inf is NaN), and ``s - s`` is 0 exactly
    when ``s`` is finite: three ops on the rows, where ``isfinite(logits).all(1)`` takes six.
    Float64 rows could overflow their sum, so they take the exact test."""
    if logits.dtype == torch.float64:
        return ~torch.isfinite(logits).all(1)
    total = logits.sum(1, dtype=torch.float64)
    return (total - total) != 0
