"""Checks of the policies' constructor options (given in Python, or read from a policy file).

Each returns the value as the policy keeps it, or raises :class:`~eenet_fast.errors.PolicyError`
naming the policy, the option, the value and what is allowed.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from eenet_fast.errors import PolicyError

__all__ = ["SEED_MAX", "integer", "real", "flag", "seed"]

SEED_MAX = 2**64 - 1  # the largest seed torch.manual_seed takes


def integer(policy: str, name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    """An integer option in ``[minimum, maximum]`` (``bool`` is not an integer here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise PolicyError(f"{policy}: option {name} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise PolicyError(f"{policy}: option {name} must be an integer {allowed}, got {value}")
    return int(value)


def real(policy: str, name: str, value: Any, minimum: float = 0.0, *, positive: bool = False) -> float:
    """A finite number ``>= minimum`` (``> minimum`` when ``positive``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise PolicyError(f"{policy}: option {name} must be a finite number, got {value!r}")
    if value < minimum or (positive and value == minimum):
        raise PolicyError(f"{policy}: option {name} must be {'>' if positive else '>='} {minimum}, got {value}")
    return float(value)


def flag(policy: str, name: str, value: Any) -> bool:
    """A ``True``/``False`` option."""
    if not isinstance(value, bool):
        raise PolicyError(f"{policy}: option {name} must be True or False, got {value!r}")
    return value


def seed(policy: str, value: Any) -> int:
    """A seed: an integer in ``[0, 2**64 - 1]``."""
    return integer(policy, "seed", value, 0, SEED_MAX)
