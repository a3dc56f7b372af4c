"""The two implementations of the per-exit work of :meth:`EarlyExitModel.forward`: the exit
decision, the scatter of the leaving rows' results, and the compaction of the kept rows.

* :class:`TorchBackend`: plain PyTorch (:mod:`eenet_fast.decision`, :mod:`eenet_fast.compaction`);
  the CPU path and the reference.
* :class:`TritonBackend`: the fused kernels of :mod:`eenet_fast.kernels` on CUDA tensors.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch

from eenet_fast.batch import map_batch
from eenet_fast.compaction import compact_reference, write_exited_reference
from eenet_fast.decision import exit_flags, nonfinite_rows
from eenet_fast.errors import InputError
from eenet_fast.features import exit_features, top_class
from eenet_fast.policies import ExitHistory, Policy

__all__ = ["Backend", "TorchBackend", "TritonBackend", "compact_state", "select_backend", "triton_unavailable"]

Backend = Literal["auto", "torch", "triton"]


def compact_state(
    compact: Callable[..., tuple[torch.Tensor, ...]],
    keep: torch.Tensor,
    state: Any,
    *per_sample: torch.Tensor,
    where: str = "the stage's output",
) -> tuple[Any, ...]:
    """Compact ``state`` (every per-sample tensor in it, see :func:`map_batch`; ``where`` names it in
    errors) and each tensor of ``per_sample`` with one call of ``compact(keep, *tensors)``, so the
    kept positions are counted once for all of them."""
    batch, leaves = keep.shape[0], []
    map_batch(lambda t: leaves.append(t) or t, state, batch, where)
    kept = iter(compact(keep, *leaves, *per_sample))
    return (map_batch(lambda t: next(kept), state, batch), *kept)


class TorchBackend:
    """The pure-PyTorch path: the CPU path and the reference of the Triton backend."""

    name = "torch"

    @staticmethod
    def decide(policy: Policy, k: int, logits: torch.Tensor, history: ExitHistory, last: bool, threshold: float):
        """Exit decision at exit ``k`` for logits ``[B, C]`` against ``threshold`` (the policy's
        ``thresholds[k]``, or a :class:`~eenet_fast.control.BudgetController`'s, read to the host
        once per batch: a device tensor here would cost a host read at every exit).

        Returns:
            ``(q, prediction, leave, nonfinite)``: ``[B]`` float32 scores, int64 predictions, bool
            exit flags (all true at the last exit) and bool rows with NaN/Inf logits. At the last
            exit, where every row leaves, nothing is scored: ``q`` is the max score there.
        """
        if last:
            max_score, prediction = top_class(logits)
            nonfinite = nonfinite_rows(logits)
            return max_score, prediction, torch.ones_like(nonfinite), nonfinite
        feats = exit_features(logits)
        q = policy.score(k, feats, history).float()
        leave, nonfinite = exit_flags(logits, q, threshold, last)
        return q, feats.prediction, leave, nonfinite

    write_exited = staticmethod(write_exited_reference)

    @staticmethod
    @torch.compiler.disable  # the output size is the kept count, read on the host: eager under torch.compile
    def compact(keep: torch.Tensor, state: Any, *per_sample: torch.Tensor, where: str = "the stage's output") -> tuple[Any, ...]:
        """Gather the kept rows of ``state`` (any structure, see :func:`map_batch`) and of each tensor."""
        return compact_state(compact_reference, keep, state, *per_sample, where=where)


class TritonBackend:
    """Fused Triton kernels (``eenet_fast.kernels``) on CUDA tensors; CPU tensors only under Triton's
    interpreter (``TRITON_INTERPRET=1``). Same interface and results as :class:`TorchBackend`
    (but for the score at the last exit, which nothing reads: the kernel computes it there).

    ``decide`` is one launch per exit when the policy has a score head (:meth:`Policy.score_head`)
    and the logits are float32/float16/bfloat16, else :meth:`TorchBackend.decide`; ``compact`` is
    one prefix sum, one host read of the kept count and one gather launch per per-sample tensor.
    """

    name = "triton"

    @staticmethod
    def decide(policy: Policy, k: int, logits: torch.Tensor, history: ExitHistory, last: bool, threshold: float):
        """Exit decision at exit ``k`` for logits ``[B, C]``: see :meth:`TorchBackend.decide`."""
        from eenet_fast.kernels.exit_decision import LOGIT_DTYPES, exit_decision

        head = policy.score_head_on(k, logits.device)
        if head is None or logits.dtype not in LOGIT_DTYPES:
            return TorchBackend.decide(policy, k, logits, history, last, threshold)
        decision = exit_decision(logits, head, history.scores, threshold, last)
        return decision.score, decision.prediction, decision.leave, decision.nonfinite

    @staticmethod
    def write_exited(*args: Any) -> None:
        """Scatter the leaving rows' results (see :func:`eenet_fast.compaction.write_exited_reference`)."""
        from eenet_fast.kernels.compaction import write_exited

        write_exited(*args)

    @staticmethod
    @torch.compiler.disable  # the output size is the kept count, read on the host: eager under torch.compile
    def compact(keep: torch.Tensor, state: Any, *per_sample: torch.Tensor, where: str = "the stage's output") -> tuple[Any, ...]:
        """Gather the kept rows of ``state`` (any structure, see :func:`map_batch`) and of each tensor."""
        from eenet_fast.kernels.compaction import compact

        return compact_state(compact, keep, state, *per_sample, where=where)


def triton_unavailable(device: torch.device) -> str | None:
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


def select_backend(name: str, device: torch.device) -> type[TorchBackend] | type[TritonBackend]:
    """The backend class for ``name`` (``"auto"``, ``"torch"`` or ``"triton"``) on ``device``."""
    if name == "torch":
        return TorchBackend
    if name == "auto":  # under torch.compile, the plain decision: inductor fuses it, the kernels would break the graph
        fused = device.type == "cuda" and not torch.compiler.is_compiling() and triton_unavailable(device) is None
        return TritonBackend if fused else TorchBackend
    if name == "triton":
        reason = triton_unavailable(device)
        if reason is not None:
            raise RuntimeError(f"backend='triton' is not available: {reason}; use backend='torch' (or 'auto')")
        return TritonBackend
    raise InputError(f"unknown backend {name!r}; choose 'auto', 'torch' or 'triton'")
