"""Turn a model into an :class:`~eenet_fast.runtime.EarlyExitModel`: :func:`wrap` finds or cuts
its stages, builds the early exits' heads, and checks that the last exit reproduces the model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable

import torch
from torch import nn

from eenet_fast.backends import Backend
from eenet_fast.families import FAMILIES, find_backbone, split_after
from eenet_fast.runtime import EarlyExitModel

__all__ = ["wrap"]


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
      heads (:func:`~eenet_fast.heads.conv_head`, :class:`~eenet_fast.heads.TokenHead`) on the
      early exits and the model's own classifier as the last exit. ``exits_after`` (0-based block
      indices, ending at the last block) moves the exits; ``heads`` replaces the early exits' heads
      (``K - 1`` modules, or a factory called on each early stage's output for ``example_input``).
      With ``example_input``, the last exit is checked against ``model(example_input)``.
    * **a module with** ``stages`` **and** ``heads`` (``nn.ModuleList`` of equal length): used as is.
    * **an** ``nn.Sequential`` split after the module indices ``exits_after`` (the last index must be
      the last module), with ``heads`` one module per exit or a factory called on each stage's output
      for ``example_input`` (e.g. :func:`~eenet_fast.heads.pooled_linear_head`). When the sequential already ends in
      the classifier, give ``nn.Identity()`` as the last head.

    The wrapped model shares its parameters with ``model`` and keeps its train/eval mode and its
    ``config`` (so ``pipeline("text-classification", model=wrap(bert), tokenizer=tok)`` works).
    """
    out = _wrap(model, exits_after, heads, example_input, backend)
    out.config = getattr(model, "config", None)
    return out


def _wrap(model: nn.Module, exits_after: Sequence[int] | None, heads: Any, example_input: Any, backend: Backend) -> EarlyExitModel:
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
