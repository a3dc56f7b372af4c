"""The pytest plugin of eenet-fast (entry point ``pytest11``, name ``eenet_fast``): the fixture
``early_exit_benchmark``, adaptive early exit against the full model in a pytest-benchmark test.

pytest loads this module in every session of anyone who installed eenet-fast, so it imports only
pytest: it lives outside the ``eenet_fast`` package because importing any module of the package
imports torch (seconds). The work is in :mod:`eenet_fast.pytest_plugin`, imported when a test
asks for the fixture. Disable the plugin with ``-p no:eenet_fast``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest


@pytest.fixture
def early_exit_benchmark(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """``early_exit_benchmark(model, batches, full=None, *, labels=None, rounds=7, warmup=1)``: time
    the calibrated ``model`` against the full model on ``batches`` in interleaved rounds; returns an
    :class:`eenet_fast.pytest_plugin.EarlyExitReport` (times in seconds, the adaptive/full ratio and
    its spread, the exit mix, accuracies with ``labels``), also written to ``benchmark.extra_info``.
    See :func:`eenet_fast.pytest_plugin.measure_early_exit`. Skips when pytest-benchmark is absent."""
    if not request.config.pluginmanager.hasplugin("benchmark"):
        pytest.skip("early_exit_benchmark needs pytest-benchmark: pip install pytest-benchmark (or 'eenet-fast[test]')")
    from eenet_fast.pytest_plugin import measure_early_exit

    return functools.partial(measure_early_exit, request.getfixturevalue("benchmark"))
