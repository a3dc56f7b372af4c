"""Requests and answers of the HTTP server (:mod:`eenet_fast.serving`), without Ray.

A request body is either

* JSON (``Content-Type: application/json``, the default): an object ``{"inputs": X}`` where ``X``
  is the batch, first dimension the batch: nested lists of numbers for a tensor input, or an object
  of them for a dict input (a tokenizer's ``input_ids``, ``attention_mask``, ...); or
* binary NumPy (``Content-Type: application/x-npy``): the batch as one ``.npy`` array, or for a
  dict input an ``.npz`` archive with one array per key (``application/x-npz``); :func:`encode_inputs`
  writes both. Parsing JSON numbers costs about 20 us per kilobyte of numbers (0.33 ms per 28x28
  image on this project's CPU, more than the demo CNN's forward); a binary body costs microseconds.
  Pickled (object) arrays are refused.

Numbers become the dtype of the server's example input (float32 and int64 without one); an answer
is JSON ``{"predictions": [B], "exits": [B], "logits": [B, C], "nonfinite": [B]}``. A bad request
raises :class:`BadRequest` with its HTTP status.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from eenet_fast.runtime import ExitResult

__all__ = ["BadRequest", "parse_request", "answer_json", "input_dtypes", "encode_inputs", "NPY", "NPZ"]

NPY, NPZ = "application/x-npy", "application/x-npz"  # the binary bodies' content types


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


def parse_request(body: bytes, dtypes: Any, max_bytes: int, content_type: str | None = None) -> Any:
    """The input batch of a request body.

    Args:
        body: the raw request body.
        dtypes: what :func:`input_dtypes` gave for the server's example (``None``: infer).
        max_bytes: the largest body accepted.
        content_type: the request's ``Content-Type`` header: :data:`NPY` or :data:`NPZ` for a binary
            body, anything else (or ``None``) for JSON.

    Raises:
        BadRequest: 413 for a body over ``max_bytes``, 400 for malformed JSON or NumPy, 422 for
            inputs that are missing, ragged, pickled, of the wrong kind of number, not finite, or not
            a batch.
    """
    if len(body) > max_bytes:
        raise BadRequest(413, f"the request body has {len(body)} bytes, more than the {max_bytes} this server accepts")
    media = (content_type or "").split(";")[0].strip().lower()
    if media in (NPY, NPZ):
        return _parse_numpy(body, dtypes, media, max_bytes)
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
        return _tensors(inputs, dtypes)
    if isinstance(dtypes, dict):
        raise BadRequest(422, f"this server takes an object of arrays as inputs, with keys {sorted(dtypes)}")
    return _tensor(inputs, dtypes, "inputs")


def _parse_numpy(body: bytes, dtypes: Any, media: str, max_bytes: int) -> Any:
    """The input batch of an ``.npy`` (one array) or ``.npz`` (one array per input key) body."""
    archive = body[:4] == b"PK\x03\x04"
    if archive != (media == NPZ):
        raise BadRequest(400, f"the body is {'an .npz archive' if archive else 'not an .npz archive'} but its "
                              f"Content-Type says {media}; send {NPY} for one array, {NPZ} for an archive of them")
    if not archive:
        if isinstance(dtypes, dict):
            raise BadRequest(422, f"this server takes an object of arrays as inputs, with keys {sorted(dtypes)}; "
                                  f"send them as an {NPZ} archive")
        return _tensor(_read_npy(body, "the request body"), dtypes, "inputs")
    if isinstance(dtypes, torch.dtype):
        raise BadRequest(422, f"this server takes one array as inputs, not an archive; send it as {NPY}")
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as archive_file:
            members = archive_file.infolist()
            size = sum(m.file_size for m in members)
            if size > max_bytes:  # a small compressed body can unpack to gigabytes
                raise BadRequest(413, f"the archive unpacks to {size} bytes, more than the {max_bytes} this server accepts")
            if not all(m.filename.endswith(".npy") for m in members):
                raise BadRequest(400, "an .npz archive holds only .npy members (one per input key)")
            arrays = {m.filename[:-4]: _read_npy(archive_file.read(m), f"member {m.filename!r}") for m in members}
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as error:
        raise BadRequest(400, f"the request body is not a valid {NPZ} archive ({error})") from None
    return _tensors(arrays, dtypes)


def _tensors(values: Mapping[str, Any], dtypes: dict[str, torch.dtype] | None) -> dict[str, torch.Tensor]:
    """A dict input, key by key (:func:`_tensor`), refusing keys the server does not take."""
    wanted = dtypes or {}
    if dtypes is not None and set(values) - set(wanted):
        raise BadRequest(422, f"unknown input keys {sorted(set(values) - set(wanted))}; this server takes {sorted(wanted)}")
    return {key: _tensor(value, wanted.get(key), f"inputs[{key!r}]") for key, value in values.items()}


def _read_npy(data: bytes, what: str) -> np.ndarray:
    """One ``.npy`` file, its header checked first: numpy allocates the array the header declares
    before reading it, so a forged shape must not get that far."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"version {version[0]}.{version[1]}, where 1.0 and 2.0 are read")
        shape, _, dtype = read_header(stream)
    except (ValueError, EOFError) as error:
        raise BadRequest(400, f"{what} is not a valid .npy file ({error}); write it with "
                              "eenet_fast.http_io.encode_inputs or numpy.save") from None
    if dtype.hasobject:
        raise BadRequest(422, f"{what} holds a pickled (object) array; send arrays of numbers")
    declared = math.prod(shape) * dtype.itemsize
    if declared != len(data) - stream.tell():
        raise BadRequest(400, f"{what} declares {shape} {dtype} ({declared} bytes) but carries {len(data) - stream.tell()} bytes")
    return np.load(io.BytesIO(data), allow_pickle=False)


def _tensor(value: Any, dtype: torch.dtype | None, name: str) -> torch.Tensor:
    """``value`` (nested lists from JSON, or a NumPy array) checked and cast to ``dtype``."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf" or value.dtype.kind == "u" and value.dtype != np.uint8:
            raise BadRequest(422, f"{name} must be an array of numbers (bool, int, uint8 or float), got {value.dtype}")
        if not value.dtype.isnative:
            value = value.astype(value.dtype.newbyteorder("="))
        tensor = torch.from_numpy(np.require(value, requirements=["C", "W"]))  # torch wants it writable
    elif isinstance(value, list):
        try:
            tensor = torch.tensor(value)
        except (TypeError, ValueError, RuntimeError) as error:
            raise BadRequest(422, f"{name} is not a rectangular array of numbers ({error})") from None
        if tensor.dtype not in (torch.float32, torch.int64, torch.bool):
            raise BadRequest(422, f"{name} must be an array of numbers with the batch first")
    else:
        raise BadRequest(422, f"{name} must be an array with the batch first, got {type(value).__name__}")
    if tensor.ndim == 0:
        raise BadRequest(422, f"{name} must be an array of numbers with the batch first")
    if dtype is not None:
        if not dtype.is_floating_point and tensor.is_floating_point():
            raise BadRequest(422, f"{name} must hold integers ({str(dtype).removeprefix('torch.')}), got fractional numbers")
        tensor = tensor.to(dtype)
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise BadRequest(422, f"{name} holds NaN or Infinity; send finite numbers")
    return tensor


def encode_inputs(x: torch.Tensor | Mapping[str, torch.Tensor]) -> tuple[bytes, str]:
    """A binary request body for the batch ``x`` and its content type: a tensor as :data:`NPY`,
    a dict of tensors as :data:`NPZ` (uncompressed). Tensors are copied to the host."""
    buffer = io.BytesIO()
    if isinstance(x, torch.Tensor):
        np.save(buffer, x.detach().cpu().numpy(), allow_pickle=False)
        return buffer.getvalue(), NPY
    np.savez(buffer, **{key: value.detach().cpu().numpy() for key, value in x.items()})
    return buffer.getvalue(), NPZ


def answer_json(result: ExitResult) -> dict[str, Any]:
    """The JSON object of an answer (logits as float32 values written as JSON numbers)."""
    return {
        "predictions": result.predictions.tolist(),
        "exits": result.exits.tolist(),
        "logits": result.logits.float().tolist(),
        "nonfinite": result.nonfinite.tolist(),
    }
