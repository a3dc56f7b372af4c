"""The pytest plugin (``_eenet_fast_pytestplugin``, entry point ``pytest11``) and its fixture
``early_exit_benchmark`` (:mod:`eenet_fast.pytest_plugin`): a user's test file run by ``pytester``
in this process, its benchmark JSON read back; the argument checks; the registration. No timing
is asserted, only that the numbers exist and are consistent."""

import importlib.metadata
import json
import subprocess
import sys

import pytest
import torch

import eenet_fast
import eenet_fast.pytest_plugin  # imported here, so pytester's in-process runs find it loaded and keep it
from eenet_fast.errors import InputError, PolicyError
from eenet_fast.zoo import MultiExitCNN

pytest_plugins = ["pytester"]
pytest.importorskip("pytest_benchmark", reason="the fixture is built on pytest-benchmark: pip install -e '.[test]'")

USER_TESTS = """
import dataclasses
import json

import pytest
import torch

import eenet_fast
from eenet_fast.zoo import MultiExitCNN


@pytest.fixture(scope="module")
def calibrated():
    torch.manual_seed(0)
    net = MultiExitCNN(widths=(4, 8)).eval()
    model = eenet_fast.wrap(net, backend="torch").eval()
    x, y = torch.randn(48, 1, 8, 8), torch.randint(0, 10, (48,))
    model.calibrate([(x, y)], 0.6, policy="maxprob", progress=False)
    return net, model, list(x.split(16)), y


def keep(name, report):  # for the test that runs this file
    with open("reports.jsonl", "a") as f:
        f.write(json.dumps(dict(dataclasses.asdict(report), test=name)) + "\\n")


def test_given_full(early_exit_benchmark, calibrated):
    net, model, batches, y = calibrated
    keep("test_given_full", early_exit_benchmark(model, batches, full=net, labels=y, rounds=2))


def test_default_full(early_exit_benchmark, calibrated):
    _, model, batches, _ = calibrated
    keep("test_default_full", early_exit_benchmark(model, batches[:2] + [batches[2][:5]], rounds=2, warmup=0))
"""


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a busy shared CPU, two threads wait on each other for milliseconds per op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run_user_tests(pytester: pytest.Pytester, *args: str) -> tuple[pytest.RunResult, dict[str, dict]]:
    """Run :data:`USER_TESTS` in this process; the result and the reports the user tests returned, by test."""
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-q", *args)
    lines = (pytester.path / "reports.jsonl").read_text().splitlines() if (pytester.path / "reports.jsonl").exists() else []
    return result, {r.pop("test"): r for r in map(json.loads, lines)}


def test_fixture_records_both_models_in_benchmark_json(pytester):
    result, reports = _run_user_tests(pytester, "--benchmark-json=bench.json")
    result.assert_outcomes(passed=2)
    records = {b["name"]: b for b in json.loads((pytester.path / "bench.json").read_text())["benchmarks"]}
    assert set(records) == set(reports) == {"test_given_full", "test_default_full"}
    for name, record in records.items():
        info = record["extra_info"]
        assert info == reports[name]  # the returned report is what extra_info holds
        assert info["policy"] == "maxprob" and info["budget"] == pytest.approx(0.6)
        assert info["rounds"] == record["stats"]["rounds"] == 2  # the adaptive passes are the benchmark's stats
        assert info["adaptive_s"] > 0 and info["full_s"] > 0 and info["ratio"] > 0 and info["ratio_iqr"] >= 0
        assert len(info["exit_fractions"]) == 2 and sum(info["exit_fractions"]) == pytest.approx(1.0)
        assert all(0 <= f <= 1 for f in info["exit_fractions"])
    given, default = reports["test_given_full"], reports["test_default_full"]
    assert given["samples"] == 48 and given["batch_sizes"] == [16]
    assert 0 <= given["accuracy"] <= 1 and 0 <= given["full_accuracy"] <= 1
    assert default["samples"] == 37 and default["batch_sizes"] == [5, 16]
    assert default["accuracy"] is None and default["full_accuracy"] is None


def test_disabled_benchmarks_run_each_model_once(pytester):
    result, reports = _run_user_tests(pytester, "--benchmark-disable")
    result.assert_outcomes(passed=2)
    assert [r["rounds"] for r in reports.values()] == [1, 1]
    assert all(r["ratio_iqr"] == 0 and sum(r["exit_fractions"]) == pytest.approx(1.0) for r in reports.values())


def test_skips_with_the_reason_without_pytest_benchmark(pytester):
    result, reports = _run_user_tests(pytester, "-p", "no:benchmark", "-rs")
    result.assert_outcomes(skipped=2)
    assert not reports
    result.stdout.fnmatch_lines(["*early_exit_benchmark needs pytest-benchmark: pip install pytest-benchmark*"])


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = eenet_fast.wrap(MultiExitCNN(widths=(4, 8)), backend="torch").eval()
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    return model, x, y


@pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")
def test_errors_name_the_problem_and_the_fix(early_exit_benchmark, tiny):
    model, x, y = tiny
    with pytest.raises(PolicyError, match="no exit policy: call model.calibrate"):
        early_exit_benchmark(model, [x])
    model.calibrate([(x, y)], 0.6, policy="maxprob", progress=False)
    with pytest.raises(InputError, match="must be an EarlyExitModel"):
        early_exit_benchmark(model.stages[0], [x])
    with pytest.raises(InputError, match="non-empty list of input batches, got a tensor"):
        early_exit_benchmark(model, x)
    with pytest.raises(InputError, match=r"non-empty list of input batches, got \[\]"):
        early_exit_benchmark(model, [])
    with pytest.raises(InputError, match="N = 32 samples"):
        early_exit_benchmark(model, [x], labels=y[:5])
    with pytest.raises(InputError, match="rounds >= 1"):
        early_exit_benchmark(model, [x], rounds=0)
    full = MultiExitCNN(widths=(4, 8)).train()
    with pytest.raises(RuntimeError, match=r"full model is in training mode: call full.eval\(\)"):
        early_exit_benchmark(model, [x], full=full)
    model.train()
    try:
        with pytest.raises(RuntimeError, match=r"in training mode.*model.eval\(\)"):
            early_exit_benchmark(model, [x])
    finally:
        model.eval()


def test_the_full_models_output_must_hold_logits(early_exit_benchmark, tiny):
    model, x, y = tiny
    model.calibrate([(x, y)], 0.6, policy="maxprob", progress=False)
    with pytest.raises(InputError, match="must return logits"):
        early_exit_benchmark(model, [x], full=lambda b: {"scores": b}, labels=y, rounds=1, warmup=0)


def test_registered_through_the_entry_point(pytestconfig):
    points = [e for e in importlib.metadata.entry_points(group="pytest11") if e.name == "eenet_fast"]
    assert [e.value for e in points] == ["_eenet_fast_pytestplugin"], "reinstall: pip install --no-deps -e ."
    assert pytestconfig.pluginmanager.hasplugin("eenet_fast")


def test_loading_the_plugin_imports_no_torch():
    code = "import sys, _eenet_fast_pytestplugin; print(sorted({'torch', 'eenet_fast', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
