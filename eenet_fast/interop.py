"""An :class:`~eenet_fast.runtime.EarlyExitModel` for runtimes outside PyTorch: each exit as an
ONNX file, and the exit decision as plain tensors (``pip install 'eenet-fast[export]'``).

:func:`export_onnx` writes, in a directory:

* ``exit_<k>.onnx`` for each exit ``k``: stage ``k`` then head ``k``; input ``state`` (the model's
  input for ``k = 0``, else the ``next_state`` output of exit ``k - 1``), outputs ``next_state`` and
  ``logits`` ``[B, C]``; the batch dimension is dynamic, so a runtime feeds only the rows still running.
* ``decision.safetensors``: ``thresholds`` ``[K]`` float32 and each exit's score head
  ``<k>.class_weight``, ``<k>.linear``, ``<k>.mlp_weight``, ``<k>.mlp_bias``, ``<k>.mlp_out``
  (absent entries are ``None``; see :mod:`eenet_fast.decision`): with ``p = softmax(logits)``,
  ``g = [max p, 1 - H(p) / log C, q_0 .. q_{j-1}]`` (this sample's scores at the earlier exits),
  ``q = w . p + u . g + v . relu(A g + b)``, a row leaves at exit ``k`` when ``q >= T_k`` and its
  logits are finite; every row leaves at the last exit.

:func:`load_decision` reads the decision back as :class:`~eenet_fast.decision.ScoreHeadParams`,
ready for :func:`~eenet_fast.decision.decide_reference`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from eenet_fast.decision import ScoreHeadParams
from eenet_fast.runtime import EarlyExitModel

__all__ = ["export_onnx", "load_decision"]

_HEAD_FIELDS = ("class_weight", "linear", "mlp_weight", "mlp_bias", "mlp_out")


class _Exit(nn.Module):
    """Stage then head: ``state -> (state, logits)``."""

    def __init__(self, stage: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.stage, self.head = stage, head

    def forward(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.stage(state)
        return state, self.head(state)


@torch.no_grad()
def export_onnx(model: EarlyExitModel, example_input: torch.Tensor, directory: str | Path) -> list[Path]:
    """Write ``exit_<k>.onnx`` for every exit and ``decision.safetensors`` (see the module) to ``directory``.

    Args:
        model: an eval-mode model with a calibrated policy that has score heads (every policy but
            ``patience`` and ``oracle``), whose stages pass one tensor from one to the next.
        example_input: one batch ``[B, ...]`` with ``B >= 2`` (the batch dimension is exported as dynamic).

    Returns:
        The paths written: the ``K`` ONNX files, then the decision file.
    """
    model.require_eval("export")
    policy = model.policy
    score_heads = [policy.score_head(k) for k in range(model.num_exits)] if policy is not None else []
    if policy is None or any(head is None for head in score_heads):
        raise ValueError("export_onnx needs a calibrated policy with score heads (maxprob, entropy, search or eenet)")
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter)
    except ImportError:
        raise ImportError("export_onnx needs onnx and onnxscript: pip install 'eenet-fast[export]'") from None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths, state = [], example_input
    batch = torch.export.Dim("batch")
    for k, (stage, head) in enumerate(zip(model.stages, model.heads)):
        if not isinstance(state, torch.Tensor):
            raise TypeError(
                f"export_onnx exports stages that pass one tensor; stage {k} reads a {type(state).__name__}. "
                "Export those stages with torch.onnx.export yourself"
            )
        paths.append(directory / f"exit_{k}.onnx")
        torch.onnx.export(
            _Exit(stage, head).eval(), (state,), paths[-1], input_names=["state"], output_names=["next_state", "logits"],
            dynamic_shapes=({0: batch},), dynamo=True,
        )  # fmt: skip
        state = stage(state)
    tensors = {"thresholds": policy.thresholds.float().contiguous()}
    for k, score_head in enumerate(score_heads):
        fields = {name: getattr(score_head, name) for name in _HEAD_FIELDS}
        tensors.update({f"{k}.{name}": t.contiguous() for name, t in fields.items() if t is not None})
    paths.append(directory / "decision.safetensors")
    save_file({name: t.cpu() for name, t in tensors.items()}, str(paths[-1]), metadata={"policy": policy.name})
    return paths


def load_decision(path: str | Path) -> tuple[torch.Tensor, list[ScoreHeadParams]]:
    """``(thresholds [K], score heads)`` from a ``decision.safetensors`` written by :func:`export_onnx`."""
    tensors = load_file(str(path))
    thresholds = tensors["thresholds"]
    heads = [ScoreHeadParams(**{name: tensors.get(f"{k}.{name}") for name in _HEAD_FIELDS}) for k in range(thresholds.numel())]
    return thresholds, heads
