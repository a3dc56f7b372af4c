import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from eenet_fast import ExitOutputs, FileFormatError
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


# ---------------------------------------------- bad input: one line, exit status 2, never a traceback


def _one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # no exception escaped to a traceback
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _empty_outputs(path):
    ExitOutputs(torch.zeros(4, 0, 10), torch.zeros(0, dtype=torch.long), [0.25, 0.5, 0.75, 1.0]).save(path)


@pytest.mark.parametrize(
    "make, fragments",
    [
        (lambda p: p.write_bytes(p.with_name("val.npz").read_bytes()[:300]), ["not a readable zip archive"]),
        (lambda p: p.write_text("0.1,0.2\n"), ["not a readable zip archive", "a valid exit-output file is"]),
        (lambda p: np.savez(open(p, "wb"), labels=np.arange(3)), ["'logits' or 'probs'"]),
        (lambda p: np.savez(open(p, "wb"), logits=np.full((4, 3, 10), 1e40)[:, :, :1]), ["2 classes"]),
        (_empty_outputs, ["the test outputs hold no samples"]),
    ],
)
def test_a_bad_test_file_is_one_line_and_exit_status_2(files, tmp_path, make, fragments):
    val, _ = files
    shutil.copy(val, tmp_path / "val.npz")
    bad = tmp_path / "test.npz"
    make(bad)
    result = run("--val", val, "--test", bad, "--budget", "0.5", "--policy", "maxprob")
    _one_line_error(result, *fragments, *([str(bad)] if "hold no samples" not in fragments[0] else []))


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--budget", "half"], ["cannot read budget 'half'"]),
        (["--budget", "nanx"], ["budget must be a finite number"]),
        (["--budget", "0.1"], ["smallest feasible budget is 0.25"]),
    ],
)
def test_a_bad_budget_is_one_line_and_exit_status_2(files, extra, fragments):
    val, test = files
    _one_line_error(run("--val", val, "--test", test, "--policy", "maxprob", *extra), *fragments)


def test_a_seed_out_of_range_is_a_usage_error(files):
    val, test = files
    result = run("--val", val, "--test", test, "--budget", "0.5", "--seed", str(2**70))
    assert result.exit_code == 2 and "is not in the range 0<=x<=4294967295" in result.output
    assert isinstance(result.exception, SystemExit)


def test_debug_shows_the_error_itself(tmp_path, files):
    val, _ = files
    (tmp_path / "test.npz").write_text("not an npz")
    args = ["compare", "--val", str(val), "--test", str(tmp_path / "test.npz"), "--budget", "0.5"]
    result = CliRunner().invoke(main, ["--debug", *args])
    assert isinstance(result.exception, FileFormatError)


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--out", "{file}/demo"], ["cannot write the demo's results into", "give --out a folder you can write to"]),
        (["--budget", "0.3,lots"], ["cannot read budget 'lots'"]),
        (["--speed-budget", "inf"], ["budget must be a finite number"]),
    ],
)
def test_the_demo_checks_its_folder_and_budgets_before_any_long_work(tmp_path, extra, fragments):
    (tmp_path / "a_file").write_text("")
    extra = [e.replace("{file}", str(tmp_path / "a_file")) for e in extra]
    out = [] if "--out" in extra else ["--out", str(tmp_path / "demo")]
    # an empty --data folder: had the demo started loading data or training, it would say the data is missing
    (tmp_path / "no_data").mkdir()
    result = run("--data", tmp_path / "no_data", *out, *extra, command="demo")
    _one_line_error(result, *fragments)
