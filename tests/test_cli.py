import json

import pytest
from click.testing import CliRunner

from eenet_fast.cli import main
from eenet_fast.synthetic import make_synthetic_outputs


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("outputs")
    make_synthetic_outputs(1500, seed=1).save(d / "val.npz")
    make_synthetic_outputs(1500, seed=2).save(d / "test.npz")
    return d / "val.npz", d / "test.npz"


def run(*args, command="compare"):
    return CliRunner().invoke(main, [command, *map(str, args)])


def test_json_records(files):
    val, test = files
    result = run("--val", val, "--test", test, "--budget", "0.5", "--budget", "0.8x",
                 "--policy", "maxprob", "--policy", "patience", "--json")
    assert result.exit_code == 0, result.output
    records = json.loads(result.output)
    assert [(r["policy"], r["budget"]) for r in records] == [
        ("maxprob", 0.5), ("maxprob", 0.8), ("patience", 0.5), ("patience", 0.8)]
    for r in records:
        assert {"policy", "budget", "accuracy", "avg_cost", "exit_fractions", "per_exit_accuracy", "val_avg_cost",
                "val_accuracy", "val_exit_fractions", "val_per_exit_accuracy"} <= set(r)
        assert 0 <= r["accuracy"] <= 1 and r["val_avg_cost"] <= r["budget"] + 1e-9
        assert len(r["exit_fractions"]) == 4


def test_table_lists_every_policy(files):
    val, test = files
    result = run("--val", val, "--test", test, "--budget", "2.5", "--policy", "all", "--costs", "1,2,3,4")
    assert result.exit_code == 0, result.output
    for name in ("eenet", "maxprob", "entropy", "patience", "search", "oracle"):
        assert f"| {name}" in result.output
    assert "costs 1, 2, 3, 4" in result.output


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--budget", "0.1"], "smallest feasible budget is 0.25"),
        (["--budget", "0.5", "--policy", "nope"], "unknown policy nope"),
        (["--budget", "0.5", "--costs", "1,2"], "4 numbers"),
        (["--budget", "0.5", "--costs", "a,b"], "comma-separated numbers"),
    ],
)
def test_bad_input_is_explained(files, extra, message):
    val, test = files
    result = run("--val", val, "--test", test, *extra)
    assert result.exit_code != 0
    assert message in result.output


def test_one_budget_syntax_and_the_old_command_name(files):
    val, test = files
    repeated = run("--val", val, "--test", test, "--budget", "0.5", "--budget", "80%", "--policy", "maxprob", "--json")
    commas = run("--val", val, "--test", test, "--budget", "0.5, 0.8x", "--policy", "maxprob", "--json",
                 command="evaluate")
    assert repeated.exit_code == 0 and commas.exit_code == 0, repeated.output + commas.output
    assert json.loads(repeated.output) == json.loads(commas.output)
    assert [r["budget"] for r in json.loads(commas.output)] == [0.5, 0.8]
