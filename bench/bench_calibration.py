"""Calibration time on a 4-exit, 15,000-sample, 10-class file (synthetic, miscalibrated classes).

Run: ``python -m pytest bench/bench_calibration.py``. The eenet row is the one the foundation issue
sizes (one budget, under 60 s on a 2-core CPU); maxprob and search are there for scale.
"""

import pytest

from eenet_fast import make_policy
from eenet_fast.synthetic import make_synthetic_outputs


@pytest.fixture(scope="module")
def val():
    outputs = make_synthetic_outputs(15_000, num_exits=4, num_classes=10, seed=1)
    outputs.features  # computed once, as in a real calibration of several budgets
    return outputs


@pytest.mark.parametrize("name", ["eenet", "maxprob", "search"])
def test_calibrate_one_budget(benchmark, val, name):
    benchmark.group = "calibration 4 x 15000 x 10"
    options = {"progress": False} if name == "eenet" else {}
    policy = benchmark.pedantic(lambda: make_policy(name, **options).fit(val, 0.5), rounds=3, iterations=1)
    assert policy.budget == 0.5
