"""Rows of different requests in one batch: which states can be merged, merging them, splitting them.

A state is what a stage reads (see :mod:`eenet_fast.batch`): a tensor, or a tuple/list/dict of
tensors with the batch first. States whose tensors agree in structure, dtype, device and trailing
shape merge by one ``torch.cat`` per tensor.

**Text** states of different sequence lengths merge too: a dict holding the tokenizer's
``attention_mask`` ``[B, T]`` (a tokenizer batch, or the states of a wrapped BERT-style model, see
:mod:`eenet_fast.families`) is padded on the right to the longest ``T`` of the merge:

* every tensor whose dim 1 is ``T`` (``input_ids``, ``token_type_ids``, ``hidden`` ``[B, T, H]``,
  ``attention_mask`` itself) gets zeros, so the new positions are masked out;
* the layers' mask under ``"mask"`` (``[B, h, T or 1, T]``, bool with true = attend, or additive
  float) gets "masked" columns (false, or the dtype's lowest value) and copies of its last row;
  rows whose ``"mask"`` is ``None`` (no padding in their request) get an all-attend mask in the
  format of the others. When no state of the merge has a mask to copy the format from, only states
  of equal length merge (:func:`mergeable` says so).

The real tokens attend to the same tokens as before, so each sample's answer is unchanged (up to
float rounding).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from eenet_fast.batch import batch_size
from eenet_fast.batch import describe as describe_batch

__all__ = ["signature", "exact_signature", "signatures", "mergeable", "merge", "describe"]

_ANY = -1  # a padded sequence length in a signature


def _sequence_length(state: Any) -> int | None:
    """``T`` of a text state that can be padded (a dict with ``attention_mask`` ``[B, T]``), else ``None``."""
    if not isinstance(state, Mapping):
        return None
    mask = state.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
        return None
    return mask.shape[1]


def _is_layer_mask(value: Any) -> bool:
    return value is None or isinstance(value, torch.Tensor) and value.ndim == 4


def _leaf(t: Any, length: int | None) -> Hashable:
    if not isinstance(t, torch.Tensor):
        return ("value", repr(t)) if t is None or isinstance(t, (bool, int, float, str)) else ("object", type(t).__name__)
    shape = list(t.shape[1:])
    if length is not None and shape and shape[0] == length:
        shape[0] = _ANY
    return ("tensor", t.dtype, t.device.type, t.device.index, tuple(shape))


def _signature(state: Any, loose: bool) -> Hashable:
    length = _sequence_length(state) if loose else None
    if isinstance(state, Mapping):
        items = []
        for key in sorted(state, key=str):
            value = state[key]
            if length is not None and key == "mask" and _is_layer_mask(value):
                items.append((key, "layer mask or None"))  # rebuilt by padding (see _pad_mask)
            elif isinstance(value, torch.Tensor):
                items.append((key, _leaf(value, length)))
            else:
                items.append((key, _signature(value, loose)))
        return (type(state).__name__, tuple(items))
    if isinstance(state, (tuple, list)):
        return (type(state).__name__, tuple(_signature(v, loose) for v in state))
    return _leaf(state, None)


def signature(state: Any) -> Hashable:
    """What states must share to merge: structure, and per tensor its dtype, device and trailing
    shape, with the sequence length of text states (and whether their ``"mask"`` is ``None``) left out."""
    return _leaf(state, None) if type(state) is torch.Tensor else _signature(state, loose=True)


def exact_signature(state: Any) -> Hashable:
    """:func:`signature` with sequence lengths and ``None`` masks included: states that merge without padding."""
    return _leaf(state, None) if type(state) is torch.Tensor else _signature(state, loose=False)


def signatures(state: Any) -> tuple[Hashable, Hashable]:
    """``(signature(state), exact_signature(state))`` in one go (the same object when no padding applies)."""
    loose = signature(state)
    return loose, loose if _sequence_length(state) is None else exact_signature(state)


def mergeable(states: Sequence[Any]) -> bool:
    """Whether states of one :func:`signature` merge: they need no padding, or they are tokenizer
    batches (no layer mask), or one of them holds a layer ``"mask"`` tensor whose format the others copy."""
    if len({exact_signature(s) for s in states}) <= 1:
        return True
    masks = [s.get("mask") for s in states if "mask" in s]
    return not masks or any(isinstance(m, torch.Tensor) for m in masks) and all(_is_layer_mask(m) for m in masks)


def merge(states: Sequence[Any]) -> Any:
    """One batch of the rows of ``states`` (same :func:`signature`, :func:`mergeable`), in order.

    Returns:
        A state of ``sum(batch_size(s))`` rows; a single state is returned as it is.
    """
    if len(states) == 1:
        return states[0]
    if len({exact_signature(s) for s in states}) > 1:  # text of other lengths, or without a layer mask
        states = _pad_text(states, max(_sequence_length(s) for s in states))
    return _cat(states, [batch_size(s) for s in states])


def _cat(states: Sequence[Any], sizes: Sequence[int]) -> Any:
    """One ``torch.cat`` per tensor with the batch first; anything else is taken from the first state."""
    first = states[0]
    if isinstance(first, torch.Tensor):
        per_sample = all(isinstance(t, torch.Tensor) and t.ndim and t.shape[0] == n for t, n in zip(states, sizes))
        return torch.cat(list(states)) if per_sample else first
    if isinstance(first, Mapping):
        return type(first)({key: _cat([s[key] for s in states], sizes) for key in first})
    if isinstance(first, (tuple, list)):
        return type(first)(_cat([s[i] for s in states], sizes) for i in range(len(first)))
    return first


def _pad_text(states: Sequence[Mapping[str, Any]], length: int) -> list[dict[str, Any]]:
    """Each text state padded on the right to ``length`` tokens (see the module docstring)."""
    exemplar = next((s["mask"] for s in states if isinstance(s.get("mask"), torch.Tensor)), None)
    if exemplar is not None and not all(_is_layer_mask(s.get("mask")) for s in states):
        raise ValueError("cannot pad a layer mask that is not a [B, h, T or 1, T] tensor; merge states of one length only")
    if exemplar is None and any("mask" in s for s in states):
        raise ValueError("text states of different lengths and no layer mask to copy cannot merge; check mergeable() first")
    return [_pad_one(s, length, exemplar) for s in states]


def _pad_one(state: Mapping[str, Any], length: int, exemplar: torch.Tensor | None) -> dict[str, Any]:
    old = _sequence_length(state)
    rows, extra = state["attention_mask"].shape[0], length - old
    out = {}
    for key, value in state.items():
        if key == "mask":
            out[key] = _pad_mask(value, rows, old, extra, exemplar)
        elif isinstance(value, torch.Tensor) and value.ndim >= 2 and value.shape[:2] == (rows, old) and extra:
            pad = [0, 0] * (value.ndim - 2) + [0, extra]
            out[key] = F.pad(value, pad)
        else:
            out[key] = value
    return type(state)(out)


def _pad_mask(mask: torch.Tensor | None, rows: int, old: int, extra: int, exemplar: torch.Tensor) -> torch.Tensor:
    """A layer mask ``[B, h, T or 1, T]`` padded by ``extra`` masked key columns and copied last query rows."""
    if mask is None:  # the request had no padding: everyone attends to every token
        queries = old if exemplar.shape[2] != 1 else 1
        fill = True if exemplar.dtype == torch.bool else 0.0
        mask = torch.full((rows, exemplar.shape[1], queries, old), fill, dtype=exemplar.dtype, device=exemplar.device)
    if not extra:
        return mask
    masked = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
    mask = torch.cat([mask, mask.new_full((*mask.shape[:3], extra), masked)], 3)
    if mask.shape[2] != 1:
        mask = torch.cat([mask, mask[:, :, -1:].expand(-1, -1, extra, -1)], 2)
    return mask


def describe(state: Any) -> str:
    """A batch's signature for error messages: dtypes and shapes, ``B`` for the batch dimension."""
    return describe_batch(state, batch_size(state))
