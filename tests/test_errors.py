"""The library's own errors: one base, four kinds, each also a ValueError (code catching those keeps working)."""

import pytest

import eenet_fast
from eenet_fast.errors import BudgetError, EENetError, FileFormatError, InputError, PolicyError


@pytest.mark.parametrize("kind", [InputError, FileFormatError, PolicyError, BudgetError])
def test_every_kind_is_an_eenet_error_and_a_value_error(kind):
    assert issubclass(kind, EENetError) and issubclass(kind, ValueError)
    assert getattr(eenet_fast, kind.__name__) is kind
    with pytest.raises(EENetError, match="named problem; the fix"):
        raise kind("named problem; the fix")
