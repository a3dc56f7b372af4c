"""Save and load a calibrated policy: one safetensors file, no pickle.

The file holds the thresholds ``[K]``, the costs ``[K]`` and the policy's learned tensors (EENet's
scheduler weights); its metadata (JSON strings) holds the policy name, its options, the budget,
the number of classes and a fingerprint of the model's exits, so that loading a policy into a model
with other exits or classes fails with a clear error.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from safetensors import safe_open
from torch import nn

from eenet_fast.policies import Policy, make_policy

__all__ = ["exits_fingerprint", "save_policy", "load_policy"]

FORMAT = "eenet_fast.policy/1"


def exits_fingerprint(heads: nn.ModuleList) -> str:
    """A short hash of the number of exits and every head's parameter names and shapes (classes included)."""
    parts = [f"exits={len(heads)}"]
    for k, head in enumerate(heads):
        parts += [f"{k}.{name}:{tuple(p.shape)}" for name, p in head.named_parameters()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def save_policy(policy: Policy, path: str | Path, fingerprint: str) -> None:
    """Write a fitted, deployable policy to ``path`` (``.safetensors``)."""
    if policy.thresholds is None:
        raise RuntimeError("the policy is not fitted; nothing to save")
    if not policy.deployable:
        raise ValueError(f"policy {policy.name!r} needs labels at inference and cannot be saved for a model")
    tensors = {"thresholds": policy.thresholds.float(), "costs": policy.costs.double()}
    tensors.update({k: v.detach().contiguous() for k, v in policy.state_tensors().items()})
    metadata = {
        "format": FORMAT,
        "policy": policy.name,
        "options": json.dumps(policy.options()),
        "budget": json.dumps(policy.budget),
        "num_classes": json.dumps(policy.num_classes),
        "fingerprint": fingerprint,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)


def load_policy(path: str | Path, fingerprint: str | None = None) -> Policy:
    """Read a policy written by :func:`save_policy`; with ``fingerprint``, refuse one saved for other exits."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no policy file at {path}")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not an eenet_fast policy file (format {metadata.get('format')!r}, expected {FORMAT!r})")
    if fingerprint is not None and metadata["fingerprint"] != fingerprint:
        raise ValueError(
            f"{path} was calibrated for a model with other exits or classes (fingerprint "
            f"{metadata['fingerprint']}, this model's is {fingerprint}); calibrate this model instead"
        )
    tensors = load_file(str(path))
    policy = make_policy(metadata["policy"], **json.loads(metadata["options"]))
    policy.thresholds = tensors.pop("thresholds")
    policy.costs = tensors.pop("costs")
    policy.budget = json.loads(metadata["budget"])
    policy.num_classes = json.loads(metadata["num_classes"])
    policy.load_state_tensors(tensors)
    return policy
