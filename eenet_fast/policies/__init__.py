"""Exit policies: one interface (:class:`Policy`), fitted on validation outputs for a budget."""

from __future__ import annotations

from typing import Any

from eenet_fast.policies.base import ExitHistory, Policy, assign_exits, resolve_budget
from eenet_fast.policies.baselines import (
    EntropyPolicy,
    MaxProbPolicy,
    OraclePolicy,
    PatiencePolicy,
    SearchPolicy,
)
from eenet_fast.policies.eenet import EENetPolicy

__all__ = [
    "POLICIES",
    "make_policy",
    "Policy",
    "ExitHistory",
    "assign_exits",
    "resolve_budget",
    "EENetPolicy",
    "MaxProbPolicy",
    "EntropyPolicy",
    "PatiencePolicy",
    "SearchPolicy",
    "OraclePolicy",
]

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (EENetPolicy, MaxProbPolicy, EntropyPolicy, PatiencePolicy, SearchPolicy, OraclePolicy)
}


def make_policy(name: str, **options: Any) -> Policy:
    """A new, unfitted policy by name (``eenet``, ``maxprob``, ``entropy``, ``patience``, ``search``, ``oracle``)."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}") from None
    return cls(**options)
