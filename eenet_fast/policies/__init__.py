"""Exit policies: one interface (:class:`Policy`), fitted on validation outputs for a budget."""

from __future__ import annotations

import inspect
from typing import Any

from eenet_fast.errors import PolicyError
from eenet_fast.policies.base import ExitHistory, Policy
from eenet_fast.policies.baselines import (
    EntropyPolicy,
    MaxProbPolicy,
    OraclePolicy,
    PatiencePolicy,
    SearchPolicy,
)
from eenet_fast.policies.eenet import EENetPolicy
from eenet_fast.policies.thresholds import assign_exits, parse_budget, resolve_budget

__all__ = [
    "POLICIES",
    "make_policy",
    "Policy",
    "ExitHistory",
    "assign_exits",
    "resolve_budget",
    "parse_budget",
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
    """A new, unfitted policy by name (``eenet``, ``maxprob``, ``entropy``, ``patience``, ``search``, ``oracle``).

    Raises:
        PolicyError: an unknown name, an option the policy does not take, or a bad option value.
    """
    if not isinstance(name, str) or name not in POLICIES:
        raise PolicyError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")
    cls = POLICIES[name]
    accepted = list(inspect.signature(cls).parameters)
    unknown = [key for key in options if key not in accepted]
    if unknown:
        takes = f"its options are {', '.join(accepted)}" if accepted else "it takes none"
        raise PolicyError(f"policy {name!r} takes no option {', '.join(map(repr, unknown))}: {takes}")
    return cls(**options)
