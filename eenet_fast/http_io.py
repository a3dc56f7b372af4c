"""JSON requests and answers of the HTTP server (:mod:`eenet_fast.serving`), without Ray.

A request is a JSON object ``{"inputs": X}`` where ``X`` is the batch, first dimension the batch:
nested lists of numbers for a tensor input, or an object of them for a dict input (a tokenizer's
``input_ids``, ``attention_mask``, ...). Numbers become the dtype of the server's example input
(float32 and int64 without one); an answer is ``{"predictions": [B], "exits": [B], "logits":
[B, C], "nonfinite": [B]}``. A bad request raises :class:`BadRequest` with its HTTP status.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from eenet_fast.runtime import ExitResult

__all__ = ["BadRequest", "parse_request", "answer_json", "input_dtypes"]


class BadRequest(ValueError):
    """A request the server refuses, with the HTTP ``status`` to answer and a message saying why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def input_dtypes(example: Any) -> Any:
    """The dtype of each tensor of an example input: a dtype, or a dict of them (``None``: infer)."""
    if example is None:
        return None
    if isinstance(example, torch.Tensor):
        return example.dtype
    if isinstance(example, Mapping):
        return {key: value.dtype for key, value in example.items() if isinstance(value, torch.Tensor)}
    raise TypeError(f"the server's example input must be a tensor or a dict of tensors, got {type(example).__name__}")


def parse_request(body: bytes, dtypes: Any, max_bytes: int) -> Any:
    """The input batch of a JSON request body.

    Args:
        body: the raw request body.
        dtypes: what :func:`input_dtypes` gave for the server's example (``None``: infer).
        max_bytes: the largest body accepted.

    Raises:
        BadRequest: 413 for a body over ``max_bytes``, 400 for malformed JSON, 422 for inputs that
            are missing, ragged, of the wrong kind of number, not finite, or not a batch.
    """
    if len(body) > max_bytes:
        raise BadRequest(413, f"the request body has {len(body)} bytes, more than the {max_bytes} this server accepts")
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadRequest(400, f"the request body is not valid JSON ({error}); send {{\"inputs\": [[...], ...]}}") from None
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise BadRequest(422, 'the request needs a JSON object with "inputs": the batch, batch first')
    inputs = payload["inputs"]
    if isinstance(inputs, dict):
        if isinstance(dtypes, torch.dtype):
            raise BadRequest(422, "this server takes one array as inputs, not an object")
        wanted = dtypes or {}
        if dtypes is not None and set(inputs) - set(wanted):
            raise BadRequest(422, f"unknown input keys {sorted(set(inputs) - set(wanted))}; this server takes {sorted(wanted)}")
        return {key: _tensor(value, wanted.get(key), f"inputs[{key!r}]") for key, value in inputs.items()}
    if isinstance(dtypes, dict):
        raise BadRequest(422, f"this server takes an object of arrays as inputs, with keys {sorted(dtypes)}")
    return _tensor(inputs, dtypes, "inputs")


def _tensor(value: Any, dtype: torch.dtype | None, name: str) -> torch.Tensor:
    if not isinstance(value, list):
        raise BadRequest(422, f"{name} must be an array with the batch first, got {type(value).__name__}")
    try:
        tensor = torch.tensor(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise BadRequest(422, f"{name} is not a rectangular array of numbers ({error})") from None
    if tensor.ndim == 0 or tensor.dtype not in (torch.float32, torch.int64, torch.bool):
        raise BadRequest(422, f"{name} must be an array of numbers with the batch first")
    if dtype is not None:
        if not dtype.is_floating_point and tensor.is_floating_point():
            raise BadRequest(422, f"{name} must hold integers ({str(dtype).removeprefix('torch.')}), got fractional numbers")
        tensor = tensor.to(dtype)
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise BadRequest(422, f"{name} holds NaN or Infinity; send finite numbers")
    return tensor


def answer_json(result: ExitResult) -> dict[str, Any]:
    """The JSON object of an answer (logits as float32 values written as JSON numbers)."""
    return {
        "predictions": result.predictions.tolist(),
        "exits": result.exits.tolist(),
        "logits": result.logits.float().tolist(),
        "nonfinite": result.nonfinite.tolist(),
    }
