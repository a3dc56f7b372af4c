"""Save and load a calibrated policy: one safetensors file, no pickle.

The file holds the thresholds ``[K]``, the costs ``[K]``, the policy's learned tensors (EENet's
scheduler weights) and, under ``head.<k>.<name>``, the weights of the exit heads that
:func:`eenet_fast.wrap` added to a trained model (so ``wrap(net).load_policy(path)`` restores
everything but the backbone). Its metadata (JSON strings) holds the policy name, its options, the
budget, the number of classes, a fingerprint of the exits' structure and a digest of every head's
weights: loading into a model with other exits or classes, or whose heads compute something else
than those the policy was calibrated on, fails with a clear error.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from eenet_fast.policies import Policy, make_policy

__all__ = ["exits_fingerprint", "heads_digest", "SavedPolicy", "save_policy", "load_policy"]

FORMAT = "eenet_fast.policy/2"
HEAD_PREFIX = "head."


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


def heads_digest(heads: nn.ModuleList) -> str:
    """A short hash of every head's parameter values (as float32): two models whose heads give other
    logits for the same stage outputs get different digests."""
    digest = hashlib.sha256()
    for head in heads:
        for p in head.parameters():
            digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class SavedPolicy:
    """What :func:`load_policy` read and checked: the policy, and the saved weights of the added heads
    by head index (``{k: head k's state dict}``, keys as the model's heads name them)."""

    policy: Policy
    head_weights: dict[int, dict[str, torch.Tensor]]


def save_policy(policy: Policy, path: str | Path, heads: nn.ModuleList, new_heads: Sequence[int] = ()) -> None:
    """Write a fitted, deployable policy to ``path`` (``.safetensors``), with the exits' structure
    fingerprint, the digest of every head's weights and the weights of the heads ``new_heads``
    (those :func:`eenet_fast.wrap` added, which a fresh ``wrap(model)`` would not have)."""
    head_weights = {
        f"{k}.{_plain_name(name)}": t for k in new_heads for name, t in heads[k].state_dict().items()
    }
    if policy.thresholds is None:
        raise RuntimeError("the policy is not fitted; nothing to save")
    if not policy.deployable:
        raise ValueError(f"policy {policy.name!r} needs labels at inference and cannot be saved for a model")
    tensors = {"thresholds": policy.thresholds.float(), "costs": policy.costs.double()}
    tensors.update({k: v.detach().contiguous() for k, v in policy.state_tensors().items()})
    tensors.update({HEAD_PREFIX + k: v.detach().cpu().contiguous() for k, v in head_weights.items()})
    metadata = {
        "format": FORMAT,
        "policy": policy.name,
        "options": json.dumps(policy.options()),
        "budget": json.dumps(policy.budget),
        "num_classes": json.dumps(policy.num_classes),
        "fingerprint": exits_fingerprint(heads),
        "heads_digest": heads_digest(heads),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)


def load_policy(path: str | Path, heads: nn.ModuleList, new_heads: Sequence[int] = ()) -> SavedPolicy:
    """Read and check a file written by :func:`save_policy` for a model with these ``heads``.

    Nothing is changed: the saved head weights are tried on copies of the heads, and the file is
    refused unless it was saved for the same exits and classes (fingerprint), holds weights only
    for heads in ``new_heads``, and, with those weights, the heads are those it was calibrated on
    (digest).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no policy file at {path}")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not an eenet_fast policy file of this version (format {metadata.get('format')!r}, "
            f"expected {FORMAT!r}); calibrate and save it again"
        )
    fingerprint = exits_fingerprint(heads)
    if metadata["fingerprint"] != fingerprint:
        raise ValueError(
            f"{path} was calibrated for a model with other exits or classes (fingerprint "
            f"{metadata['fingerprint']}, this model's is {fingerprint}); calibrate this model instead"
        )
    tensors = load_file(str(path))
    head_weights: dict[int, dict[str, torch.Tensor]] = {}
    for key in [k for k in tensors if k.startswith(HEAD_PREFIX)]:
        k, name = key[len(HEAD_PREFIX) :].split(".", 1)
        head_weights.setdefault(int(k), {})[name] = tensors.pop(key)
    trial = copy.deepcopy(heads)
    for k, state in head_weights.items():
        if k not in new_heads:
            raise ValueError(f"{path} holds weights for exit head {k}, which is not a head wrap added to this model")
        head_weights[k] = _named_as(trial[k], state)
        trial[k].load_state_dict(head_weights[k])
    if heads_digest(trial) != metadata["heads_digest"]:
        raise ValueError(
            f"{path} was calibrated on exit heads with other weights than this model's (the model was "
            "trained again, converted to another dtype, or its heads were not saved with the policy); "
            "calibrate this model instead"
        )
    policy = make_policy(metadata["policy"], **json.loads(metadata["options"]))
    policy.thresholds = tensors.pop("thresholds")
    policy.costs = tensors.pop("costs")
    policy.budget = json.loads(metadata["budget"])
    policy.num_classes = json.loads(metadata["num_classes"])
    policy.load_state_tensors(tensors)
    return SavedPolicy(policy, head_weights)


def _named_as(head: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (plain names) keyed as ``head``'s own state dict names them (with ``torch.compile``'s prefix if it has one)."""
    names = {_plain_name(name): name for name in head.state_dict()}
    return {names.get(name, name): value for name, value in state.items()}
