"""Save and load a calibrated policy: one safetensors file, no pickle.

The file holds the thresholds ``[K]``, the costs ``[K]``, the policy's learned tensors (EENet's
scheduler weights) and, under ``head.<k>.<name>``, the weights of the exit heads that
:func:`eenet_fast.wrap` added to a trained model (so ``wrap(net).load_policy(path)`` restores
everything but the backbone). Its metadata (JSON strings) holds the policy name, its options, the
budget, the number of classes, the certified guarantee (if any), a fingerprint of the exits'
structure and a digest of every head's weights: loading into a model with other exits or classes,
or whose heads compute something else than those the policy was calibrated on, fails with a clear
error.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from eenet_fast.guarantee import BudgetGuarantee
from eenet_fast.policies import Policy, make_policy

__all__ = ["exits_fingerprint", "heads_digest", "SavedPolicy", "save_policy", "load_policy"]

FORMAT = "eenet_fast.policy/2"
HEAD_PREFIX = "head."


def exits_fingerprint(heads: nn.ModuleList) -> str:
    """A short hash of the number of exits and every head's parameter names and shapes (classes included)."""
    parts = [f"exits={len(heads)}"]
    for k, head in enumerate(heads):
        parts += [f"{k}.{name}:{tuple(p.shape)}" for name, p in head.named_parameters()]
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
    """What :func:`load_policy` read: the policy, the saved weights of the added heads
    (``{"<k>.<name>": tensor}``, empty when none were saved) and the heads' digest at saving time."""

    policy: Policy
    head_weights: dict[str, torch.Tensor]
    heads_digest: str


def save_policy(
    policy: Policy,
    path: str | Path,
    fingerprint: str,
    digest: str,
    head_weights: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a fitted, deployable policy to ``path`` (``.safetensors``), with the exits' structure
    ``fingerprint``, the heads' weights ``digest`` and the weights of the added heads."""
    if policy.thresholds is None:
        raise RuntimeError("the policy is not fitted; nothing to save")
    if not policy.deployable:
        raise ValueError(f"policy {policy.name!r} needs labels at inference and cannot be saved for a model")
    tensors = {"thresholds": policy.thresholds.float(), "costs": policy.costs.double()}
    tensors.update({k: v.detach().contiguous() for k, v in policy.state_tensors().items()})
    tensors.update({HEAD_PREFIX + k: v.detach().cpu().contiguous() for k, v in (head_weights or {}).items()})
    metadata = {
        "format": FORMAT,
        "policy": policy.name,
        "options": json.dumps(policy.options()),
        "budget": json.dumps(policy.budget),
        "num_classes": json.dumps(policy.num_classes),
        "fingerprint": fingerprint,
        "heads_digest": digest,
        "guarantee": json.dumps(None if policy.guarantee is None else policy.guarantee.record()),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)


def load_policy(path: str | Path, fingerprint: str | None = None) -> SavedPolicy:
    """Read a file written by :func:`save_policy`; with ``fingerprint``, refuse one saved for other exits."""
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
    if fingerprint is not None and metadata["fingerprint"] != fingerprint:
        raise ValueError(
            f"{path} was calibrated for a model with other exits or classes (fingerprint "
            f"{metadata['fingerprint']}, this model's is {fingerprint}); calibrate this model instead"
        )
    tensors = load_file(str(path))
    heads = {k[len(HEAD_PREFIX) :]: tensors.pop(k) for k in list(tensors) if k.startswith(HEAD_PREFIX)}
    policy = make_policy(metadata["policy"], **json.loads(metadata["options"]))
    policy.thresholds = tensors.pop("thresholds")
    policy.costs = tensors.pop("costs")
    policy.budget = json.loads(metadata["budget"])
    policy.num_classes = json.loads(metadata["num_classes"])
    guarantee = json.loads(metadata.get("guarantee", "null"))
    policy.guarantee = None if guarantee is None else BudgetGuarantee.from_record(guarantee)
    policy.load_state_tensors(tensors)
    return SavedPolicy(policy, heads, metadata["heads_digest"])
