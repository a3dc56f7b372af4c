"""Save and load a calibrated policy: one safetensors file, no pickle, bound to its whole model.

The file holds the thresholds ``[K]``, the costs ``[K]``, the policy's learned tensors (EENet's
scheduler weights) and, under ``head.<k>.<name>``, the weights of the exit heads that
:func:`eenet_fast.wrap` added to a trained model (so ``wrap(net).load_policy(path)`` restores
everything but the backbone). Its metadata (JSON strings) holds the policy name, its options, the
budget, the number of classes, the certified guarantee and a time budget's cost model
(:class:`~eenet_fast.timing.LatencyModel`; JSON ``null`` without them) and four
digests:

* ``fingerprint``: the exits' structure (number of exits, every head's parameter names and shapes);
* ``heads_digest`` and ``stages_digest``: the values of every parameter and persistent buffer of
  the heads and of the stages (the backbone), so a policy is refused by a model whose exits
  compute something else than those it was calibrated on, and the error says which part differs;
* ``content_digest``: every tensor and metadata field of the file itself, so a corrupted or edited
  file is a :class:`~eenet_fast.errors.FileFormatError` (safetensors has no checksum of its own).

Every field is checked before anything is built: a refused file changes nothing. The file is
written whole or not at all. Files of the previous format (``eenet_fast.policy/2``, without the
stages' and the content's digests) still load, with a warning that the backbone is not checked;
saving the policy again binds it to the model it was loaded into.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from eenet_fast.errors import EENetError, FileFormatError, PolicyError
from eenet_fast.files import write_atomic
from eenet_fast.outputs import check_costs
from eenet_fast.policies import POLICIES, Policy, make_policy
from eenet_fast.guarantee import BudgetGuarantee
from eenet_fast.timing import LatencyModel

__all__ = ["exits_fingerprint", "weights_digest", "content_digest", "SavedPolicy", "save_policy", "load_policy"]

FORMAT = "eenet_fast.policy/3"
OLD_FORMAT = "eenet_fast.policy/2"  # no stages_digest, no content_digest; heads_digest of parameters only
HEAD_PREFIX = "head."
RESAVE = "calibrate the model and save the policy again (model.save_policy)"

COMPILED_PREFIX = "_orig_mod."  # what torch.compile puts before the names of a compiled module's tensors


def _plain_name(name: str) -> str:
    """A parameter or state-dict name without ``torch.compile``'s prefix."""
    return name.replace(COMPILED_PREFIX, "")


def exits_fingerprint(heads: nn.ModuleList) -> str:
    """A short hash of the number of exits and every head's parameter names and shapes (classes
    included); the same for a head and its ``torch.compile``'d version."""
    parts = [f"exits={len(heads)}"]
    for k, head in enumerate(heads):
        parts += [f"{k}.{_plain_name(name)}:{tuple(p.shape)}" for name, p in head.named_parameters()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _raw(t: torch.Tensor) -> bytes:
    """The bytes of ``t``'s values (any dtype, on the CPU, contiguous)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def weights_digest(modules: Iterable[nn.Module]) -> str:
    """A short hash of the shape and value of every parameter and persistent buffer of ``modules``
    (floating ones as float32): modules that give other outputs for the same inputs get other
    digests; a module and its ``torch.compile``'d version the same one."""
    digest = hashlib.sha256()
    for module in modules:
        for t in module.state_dict(keep_vars=True).values():
            t = t.detach()
            digest.update(repr(tuple(t.shape)).encode())
            digest.update(_raw(t.float() if t.is_floating_point() else t))
    return digest.hexdigest()[:16]


def _old_heads_digest(heads: nn.ModuleList) -> str:
    """The heads' digest of the previous format: parameter values as float32, no shapes, no buffers."""
    digest = hashlib.sha256()
    for head in heads:
        for p in head.parameters():
            digest.update(_raw(p.float()))
    return digest.hexdigest()[:16]


def content_digest(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """A hash of a policy file's content: every tensor (name, dtype, shape, bytes) and every metadata
    field but ``content_digest`` itself."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        digest.update(_raw(t))
    digest.update(json.dumps(sorted((k, v) for k, v in metadata.items() if k != "content_digest")).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class SavedPolicy:
    """What :func:`load_policy` read and checked: the policy, and the heads the file restores (``{k:
    a copy of head k holding the saved weights}``, for the heads that :func:`eenet_fast.wrap` added)."""

    policy: Policy
    heads: dict[int, nn.Module]


def save_policy(
    policy: Policy, path: str | Path, heads: nn.ModuleList, new_heads: Sequence[int] = (), *, stages: Sequence[nn.Module]
) -> None:
    """Write a fitted, deployable policy to ``path`` (``.safetensors``), whole or not at all, with the
    exits' fingerprint, the digests of the heads' and the stages' weights, the weights of the heads
    ``new_heads`` (those :func:`eenet_fast.wrap` added, which a fresh ``wrap(model)`` would not have)
    and the digest of the file's content."""
    if policy.thresholds is None:
        raise PolicyError("the policy is not fitted; nothing to save: calibrate the model first")
    if not policy.deployable:
        raise PolicyError(f"policy {policy.name!r} needs labels at inference and cannot be saved for a model")
    tensors = {"thresholds": policy.thresholds.float().cpu(), "costs": policy.costs.double().cpu()}
    tensors.update({k: v.detach().cpu() for k, v in policy.state_tensors().items()})
    tensors.update(
        {f"{HEAD_PREFIX}{k}.{_plain_name(name)}": t.detach().cpu() for k in new_heads for name, t in heads[k].state_dict().items()}
    )
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    metadata = {
        "format": FORMAT,
        "policy": policy.name,
        "options": json.dumps(policy.options()),
        "budget": json.dumps(float(policy.budget)),
        "num_classes": json.dumps(int(policy.num_classes)),
        "fingerprint": exits_fingerprint(heads),
        "heads_digest": weights_digest(heads),
        "stages_digest": weights_digest(stages),
        "guarantee": json.dumps(None if policy.guarantee is None else policy.guarantee.record()),
        "latency": json.dumps(None if policy.latency is None else policy.latency.record()),
    }
    metadata["content_digest"] = content_digest(tensors, metadata)
    write_atomic(path, safetensors_bytes(tensors, metadata))


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and tensors of the safetensors file ``path``, read through one handle."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as error:  # safetensors raises its own error, OSError, or a JSON error for a broken header
        detail = (str(error).strip().splitlines() or ["no message"])[0]
        raise FileFormatError(
            f"{path} is not a readable policy file: it is truncated, corrupted or not a safetensors file "
            f"({type(error).__name__}: {detail}); {RESAVE}"
        ) from None
    return metadata, tensors


def _field(metadata: Mapping[str, str], key: str, path: Path) -> Any:
    """The JSON value of the metadata field ``key``."""
    if key not in metadata:
        raise FileFormatError(f"{path} lacks the metadata field {key!r}; {RESAVE}")
    try:
        return json.loads(metadata[key])
    except (TypeError, ValueError):
        raise FileFormatError(f"{path}: the metadata field {key!r} is not valid JSON ({metadata[key]!r}); {RESAVE}") from None


def _text(metadata: Mapping[str, str], key: str, path: Path) -> str:
    if not isinstance(metadata.get(key), str):
        raise FileFormatError(f"{path} lacks the metadata field {key!r}; {RESAVE}")
    return metadata[key]


def _check_fields(path: Path, metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor], num_exits: int) -> dict[str, Any]:
    """Every field of a policy file for a model with ``num_exits`` exits, checked: the policy name,
    its options, the budget, the number of classes, the thresholds, the costs, the guarantee and
    the latency model."""
    name = _text(metadata, "policy", path)
    if name not in POLICIES or not POLICIES[name].deployable:
        deployable = ", ".join(n for n, cls in POLICIES.items() if cls.deployable)
        raise FileFormatError(f"{path} names the policy {name!r}, which is none of {deployable}; {RESAVE}")
    options = _field(metadata, "options", path)
    if not isinstance(options, dict):
        raise FileFormatError(f"{path}: the options of the policy must be a JSON object, got {options!r}; {RESAVE}")
    budget = _field(metadata, "budget", path)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
        raise FileFormatError(f"{path}: the budget must be a finite number, got {metadata['budget']!r}; {RESAVE}")
    num_classes = _field(metadata, "num_classes", path)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise FileFormatError(f"{path}: num_classes must be an integer >= 2, got {metadata['num_classes']!r}; {RESAVE}")
    for key in ("thresholds", "costs"):
        if key not in tensors:
            raise FileFormatError(f"{path} lacks the tensor {key!r}; {RESAVE}")
    thresholds = tensors["thresholds"]
    if thresholds.shape != (num_exits,) or thresholds.dtype != torch.float32:
        raise FileFormatError(
            f"{path}: the thresholds must be float32 [{num_exits}] (one per exit), got {thresholds.dtype} "
            f"{list(thresholds.shape)}; {RESAVE}"
        )
    if thresholds.isnan().any() or thresholds[-1] != -math.inf:
        raise FileFormatError(
            f"{path}: the thresholds must be numbers or +-inf, the last -inf (the last exit takes every sample "
            f"left), got {thresholds.tolist()}; {RESAVE}"
        )
    try:
        costs = check_costs(tensors["costs"], num_exits)
    except EENetError as error:
        raise FileFormatError(f"{path}: {error}; {RESAVE}") from None
    if budget < float(costs[0]):
        raise FileFormatError(f"{path}: the budget {budget} is below the first exit's cost {float(costs[0])}; {RESAVE}")
    learned = [
        k for k, t in tensors.items()
        if k not in ("thresholds", "costs") and not k.startswith(HEAD_PREFIX) and t.is_floating_point() and not t.isfinite().all()
    ]
    if learned:
        raise FileFormatError(f"{path}: the tensor {learned[0]!r} holds NaN or Inf values; {RESAVE}")
    return {"name": name, "options": options, "budget": float(budget), "num_classes": num_classes, "costs": costs,
            "guarantee": _guarantee(path, metadata), "latency": _latency(path, metadata, num_exits)}


def _optional_record(path: Path, metadata: Mapping[str, str], key: str, what: str, build: Callable[[Any], Any]) -> Any:
    """``build(record)`` for the JSON record the file holds under ``key`` (``None`` for JSON
    ``null``, and in files from before the field); a record ``build`` refuses (``TypeError``,
    ``ValueError``, ``KeyError`` or ``RuntimeError``) is a :class:`FileFormatError` saying the field
    is not ``what``."""
    record = _field(metadata, key, path) if key in metadata else None
    if record is None:
        return None
    try:
        return build(record)
    except (TypeError, ValueError, KeyError, RuntimeError) as error:
        raise FileFormatError(f"{path}: the {key} field is not {what} ({error}); {RESAVE}") from None


def _guarantee(path: Path, metadata: Mapping[str, str]) -> BudgetGuarantee | None:
    """The certified guarantee the file records (``None`` without one, and in files from before it)."""

    def build(record: Any) -> BudgetGuarantee:
        guarantee = BudgetGuarantee.from_record(record)
        numbers = (guarantee.confidence, guarantee.holdout_cost, guarantee.upper_bound)
        if not (0 < guarantee.confidence < 1 and all(math.isfinite(x) for x in numbers)):
            raise ValueError(f"confidence {guarantee.confidence}, costs {numbers[1:]}")
        return guarantee

    return _optional_record(path, metadata, "guarantee", "a valid certified budget", build)


def _latency(path: Path, metadata: Mapping[str, str], num_exits: int) -> LatencyModel | None:
    """The time-budget cost model the file records (``None`` without one, and in files from before it)."""

    def build(record: Any) -> LatencyModel:
        latency = LatencyModel.from_record(record)
        if latency.num_exits != num_exits:
            raise ValueError(f"it times {latency.num_exits} exits, the file has {num_exits}")
        return latency

    return _optional_record(path, metadata, "latency", "a valid cost model", build)


def _restored_heads(
    path: Path, tensors: dict[str, torch.Tensor], heads: nn.ModuleList, new_heads: Sequence[int]
) -> tuple[nn.ModuleList, list[int]]:
    """A copy of ``heads`` with the saved weights of the added heads loaded (their tensors are
    removed from ``tensors``), and the indices of those heads."""
    saved: dict[int, dict[str, torch.Tensor]] = {}
    for key in [k for k in tensors if k.startswith(HEAD_PREFIX)]:
        index, _, name = key[len(HEAD_PREFIX) :].partition(".")
        if not (index.isascii() and index.isdigit()) or not name:
            raise FileFormatError(f"{path} holds a tensor {key!r}, not named head.<exit>.<weight>; {RESAVE}")
        saved.setdefault(int(index), {})[name] = tensors.pop(key)
    trial = copy.deepcopy(heads)
    for k, state in saved.items():
        if k not in new_heads:
            raise PolicyError(f"{path} holds weights for exit head {k}, which is not a head wrap added to this model")
        names = {_plain_name(name): name for name in trial[k].state_dict()}
        try:
            trial[k].load_state_dict({names.get(name, name): value for name, value in state.items()})
        except RuntimeError as error:
            raise PolicyError(f"{path}: the saved weights of exit head {k} do not fit this model's head {k}: {error}") from None
    return trial, sorted(saved)


def load_policy(
    path: str | Path, heads: nn.ModuleList, new_heads: Sequence[int] = (), *, stages: Sequence[nn.Module]
) -> SavedPolicy:
    """Read and check a file written by :func:`save_policy` for a model with these ``stages`` and ``heads``.

    Nothing is changed: the whole file is checked first, the saved head weights are tried on copies
    of the heads, and the file is refused unless it is intact (content digest), every field is
    valid, and it was saved for a model with the same exits and classes (fingerprint), the same
    head weights once the saved ones are in (heads digest) and the same backbone (stages digest).

    Raises:
        FileNotFoundError: no file at ``path``.
        FileFormatError: the file is truncated, corrupted, edited or of an unknown format, or a field is invalid.
        PolicyError: the file was saved for another model (the message says which part differs).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no policy file at {path}")
    metadata, tensors = _read(path)
    version = metadata.get("format")
    if version not in (FORMAT, OLD_FORMAT):
        raise FileFormatError(f"{path} is not an eenet_fast policy file of this version (format {version!r}, expected {FORMAT!r}); {RESAVE}")
    if version == FORMAT and metadata.get("content_digest") != content_digest(tensors, metadata):
        raise FileFormatError(f"{path} is corrupted or was edited: its content does not match its digest; {RESAVE}")
    fingerprint = exits_fingerprint(heads)
    if _text(metadata, "fingerprint", path) != fingerprint:
        raise PolicyError(
            f"{path} was calibrated for a model with other exits or classes (fingerprint "
            f"{metadata['fingerprint']}, this model's is {fingerprint}); calibrate this model instead"
        )
    fields = _check_fields(path, metadata, tensors, len(heads))
    trial, restored = _restored_heads(path, tensors, heads, new_heads)
    heads_digest = weights_digest(trial) if version == FORMAT else _old_heads_digest(trial)
    if _text(metadata, "heads_digest", path) != heads_digest:
        raise PolicyError(
            f"{path} was calibrated on exit heads with other weights than this model's (the model was "
            "trained again, converted to another dtype, or its heads were not saved with the policy); "
            "calibrate this model instead"
        )
    if version == OLD_FORMAT:
        warnings.warn(
            f"{path} is a policy file of the previous format, which does not record the backbone: it is "
            "loaded without checking that this model's stages are those it was calibrated on. Save it "
            "again (model.save_policy) to bind it to this model",
            stacklevel=3,
        )
    elif _text(metadata, "stages_digest", path) != weights_digest(stages):
        raise PolicyError(
            f"{path} was calibrated on a backbone with other weights: this model's stages differ from those "
            "of the model it was saved for (its exits and exit heads match); calibrate this model instead"
        )
    try:
        policy = make_policy(fields["name"], **fields["options"])
        policy.thresholds = tensors.pop("thresholds")
        policy.costs = fields["costs"]
        tensors.pop("costs")
        policy.budget = fields["budget"]
        policy.num_classes = fields["num_classes"]
        policy.guarantee = fields["guarantee"]
        policy.latency = fields["latency"]
        policy.load_state_tensors(tensors)
    except EENetError as error:
        raise FileFormatError(f"{path}: {error}; {RESAVE}") from None
    return SavedPolicy(policy, {k: trial[k] for k in restored})
