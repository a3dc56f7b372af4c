"""Training of every exit of a multi-exit model at once, as in the EENet release.

Loss of a batch with ``K`` exits and logits ``z_1..z_K`` (1-based ``k``)::

    L = sum_k  k / (K (K + 1) / 2) * CE(z_k, y)
        + [last quarter of the steps]  w * T^2 * sum_{k<K} KL(softmax(z_K / T) || softmax(z_k / T))

with the teacher ``z_K`` detached: later exits weigh more, and in the last quarter of training the
early exits are also pulled towards the final classifier's softened outputs (self-distillation).
"""

from __future__ import annotations

from collections.abc import Iterable, Sized
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from eenet_fast.batch import move_to
from eenet_fast.multi_exit import check_multi_exit

__all__ = ["fit_exits", "exit_loss"]


def exit_loss(
    logits: list[torch.Tensor],
    labels: torch.Tensor,
    *,
    distill: bool,
    distill_temperature: float = 3.0,
    distill_weight: float = 0.01,
) -> torch.Tensor:
    """Multi-exit loss of one batch.

    Args:
        logits: ``K`` tensors ``[B, C]``, the exits' logits in order (the last is the teacher).
        labels: ``[B]`` int64 class indices.
        distill: add the self-distillation term.
        distill_temperature: softmax temperature ``T`` of the distillation term.
        distill_weight: weight ``w`` of the distillation term (multiplied by ``T^2``).

    Returns:
        Scalar float tensor: the weighted cross-entropy (plus distillation), averaged over the batch.
    """
    num_exits = len(logits)
    total_weight = num_exits * (num_exits + 1) / 2
    loss = sum((k + 1) / total_weight * F.cross_entropy(z, labels) for k, z in enumerate(logits))
    if distill and num_exits > 1:
        teacher = F.log_softmax(logits[-1].detach() / distill_temperature, dim=-1)
        kl = sum(
            F.kl_div(F.log_softmax(z / distill_temperature, dim=-1), teacher, reduction="batchmean", log_target=True)
            for z in logits[:-1]
        )
        loss = loss + distill_weight * distill_temperature**2 * kl
    return loss


def fit_exits(
    model: nn.Module,
    loader: Iterable[tuple[Any, torch.Tensor]],
    epochs: int,
    *,
    lr: float = 1e-3,
    train: Literal["auto", "new_heads", "heads", "all"] = "auto",
    distill_temperature: float = 3.0,
    distill_weight: float = 0.01,
    device: torch.device | str | None = None,
    progress: bool = True,
    seed: int | None = None,
) -> list[float]:
    """Train every exit of a multi-exit model with AdamW and the loss of :func:`exit_loss`.

    Self-distillation is on for the optimiser steps in the last quarter of training (step
    ``s`` of ``S = epochs * len(loader)``, 0-based, distils when ``s >= floor(0.75 * S)``).

    Args:
        model: an ``nn.Module`` with ``stages`` and ``heads`` (equal-length ``nn.ModuleList``) and
            ``all_exits(x) -> list`` of ``K`` logits ``[B, C]``.
        loader: a sized iterable (e.g. a ``DataLoader``) of ``(x, y)`` batches, ``x`` the model's input
            (a tensor ``[B, ...]`` or a dict/tuple of tensors with the batch first, such as a
            tokenizer's output) and ``y`` int64 labels ``[B]``; it is iterated once per epoch.
        epochs: passes over ``loader``, at least 1.
        lr: AdamW learning rate (default weight decay 1e-2).
        train: which parameters learn; all others get ``requires_grad=False`` during training (the
            flags are restored at the end) and their modules stay in eval mode, so batch-norm
            statistics do not move.

            * ``"all"``: every parameter (a multi-exit model trained from scratch);
            * ``"heads"``: every head, the stages frozen;
            * ``"new_heads"``: only the heads :func:`eenet_fast.wrap` added to a trained model
              (``model.new_heads``); the backbone and the model's own classifier stay as they are;
            * ``"auto"`` (default): ``"new_heads"`` when the model has new heads, else ``"all"``.
        distill_temperature: temperature ``T`` of the self-distillation term, > 0.
        distill_weight: weight of the self-distillation term, >= 0 (0 switches it off).
        device: where to train; defaults to the device of the model's first parameter. The model is
            moved there.
        progress: show a tqdm bar over the batches, with the running mean loss.
        seed: if given, ``torch.manual_seed(seed)`` first (also fixes a ``DataLoader``'s shuffling
            when it draws from the global generator).

    Returns:
        ``epochs`` floats: the mean loss per sample of each epoch.

    Raises:
        TypeError: ``model`` is not a multi-exit model, or ``loader`` has no length.
        ValueError: bad arguments, an empty loader, or ``all_exits`` returning the wrong number of
            exits.

    The model is left in eval mode.
    """
    _, heads = check_multi_exit(model)
    new_heads = tuple(getattr(model, "new_heads", ()))
    if train == "auto":
        train = "new_heads" if new_heads else "all"
    if train == "new_heads" and not new_heads:
        raise ValueError("train='new_heads' but the model has no new heads (model.new_heads is empty); use 'heads' or 'all'")
    if train not in ("new_heads", "heads", "all"):
        raise ValueError(f"train must be 'auto', 'new_heads', 'heads' or 'all', got {train!r}")
    learning = [model] if train == "all" else list(heads) if train == "heads" else [heads[k] for k in new_heads]
    if not isinstance(loader, Sized):
        raise TypeError("loader must have a length (a DataLoader or a list of (x, y) batches)")
    if len(loader) == 0:
        raise ValueError("loader is empty: it yields no batch to train on")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if distill_temperature <= 0 or distill_weight < 0:
        raise ValueError(
            f"need distill_temperature > 0 and distill_weight >= 0, got {distill_temperature} and {distill_weight}"
        )
    if seed is not None:
        torch.manual_seed(seed)
    if device is None:
        device = next(model.parameters()).device
    model.to(device)

    learning_params = {id(p) for module in learning for p in module.parameters()}
    trainable = [p for p in model.parameters() if id(p) in learning_params and p.requires_grad]
    if not trainable:
        raise ValueError(f"train={train!r} leaves no trainable parameter (all have requires_grad=False)")
    frozen = [p for p in model.parameters() if id(p) not in learning_params]
    saved_flags = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(trainable, lr=lr)

    steps_per_epoch = len(loader)
    distill_from = int(0.75 * epochs * steps_per_epoch)
    epoch_losses: list[float] = []
    bar = tqdm(total=epochs * steps_per_epoch, disable=not progress, desc="fit_exits", unit="batch")
    step = 0
    try:
        for epoch in range(epochs):
            model.eval()
            for module in learning:
                module.train()
            loss_sum, seen = 0.0, 0
            for x, y in loader:
                x, y = move_to(x, device), y.to(device, non_blocking=True)
                logits = model.all_exits(x)
                if len(logits) != len(heads):
                    raise ValueError(f"all_exits returned {len(logits)} exits, the model has {len(heads)} heads")
                loss = exit_loss(
                    logits,
                    y,
                    distill=distill_weight > 0 and step >= distill_from,
                    distill_temperature=distill_temperature,
                    distill_weight=distill_weight,
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.item() * y.shape[0]
                seen += y.shape[0]
                step += 1
                bar.update()
                bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{loss_sum / seen:.4f}")
            epoch_losses.append(loss_sum / seen)
    finally:
        bar.close()
        for p, flag in zip(frozen, saved_flags):
            p.requires_grad_(flag)
        model.eval()
    return epoch_losses
