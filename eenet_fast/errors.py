"""The errors eenet_fast raises on bad input: one base class and four kinds.

Every message names the problem and the fix. Each kind is also a ``ValueError``, so code written
against the earlier ``ValueError``s keeps working; catch :class:`EENetError` to catch them all
(the ``eenet-fast`` command prints them as one line ``error: ...`` and exits with status 2).

* :class:`InputError`: data or arguments the library cannot use (exit outputs, a batch or a state
  that breaks the per-sample contract, an input the model's first stage refuses, costs).
* :class:`FileFormatError`: a file that is not what it should be (truncated, corrupted, of another
  format, holding other objects than the format's).
* :class:`PolicyError`: a policy that cannot be built or used as asked (unknown name, bad options,
  unfitted, a policy file calibrated for another model).
* :class:`BudgetError`: a budget that cannot be read or met.
"""

from __future__ import annotations

__all__ = ["EENetError", "InputError", "FileFormatError", "PolicyError", "BudgetError"]


class EENetError(Exception):
    """Base of the errors eenet_fast raises on bad input (never on its own bugs)."""


class InputError(EENetError, ValueError):
    """Data or arguments eenet_fast cannot use."""


class FileFormatError(EENetError, ValueError):
    """A file that is truncated, corrupted or not of the expected format."""


class PolicyError(EENetError, ValueError):
    """A policy that cannot be built or used as asked, or a policy file made for another model."""


class BudgetError(EENetError, ValueError):
    """A budget that cannot be read or that no policy can meet."""
