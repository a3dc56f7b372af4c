"""write_report and ``eenet-fast report`` (eenet_fast/report/write.py): the files, inputs refused
before any long work, and a report folder that is complete or absent."""

import dataclasses
import json
import os

import pytest
from click.testing import CliRunner

from eenet_fast.cli import main
from eenet_fast.report import write_report

REPORT = {"index.html", "report.json", "table.md", "accuracy_cost.png", "exit_mix.png", "per_class.png"}
QUICK = {"budgets": [0.5], "policies": ["maxprob"], "progress": False}  # a report in about a second


@pytest.fixture
def outputs(synthetic_val, synthetic_test):
    """Labelled validation and test outputs with costs 0.25, 0.5, 0.75, 1 (4,000 samples each)."""
    return synthetic_val, synthetic_test


@pytest.fixture
def no_calibration(monkeypatch):
    """Replace the calibration by a recorder that fails the test if it runs; yields its calls."""
    calls = []

    def recorder(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the calibration started")

    monkeypatch.setattr("eenet_fast.report.write.compare", recorder)
    return calls


def contents(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def run_cli(tmp_path, val, test, *args):
    val.save(tmp_path / "val.npz")
    test.save(tmp_path / "test.npz")
    files = ["--val", str(tmp_path / "val.npz"), "--test", str(tmp_path / "test.npz")]
    return CliRunner().invoke(main, ["report", *files, *args])


def test_cli_report(outputs, tmp_path):
    out = tmp_path / "r"
    result = run_cli(tmp_path, *outputs, "--policy", "maxprob", "--policy", "entropy",
                     "--budgets", "0.4,0.5x", "--budget", "0.7", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert str(out / "index.html") in result.output
    data = json.loads((out / "report.json").read_text())
    assert data["budgets"] == [0.4, 0.5, 0.7] and data["decision_maps"] is None
    assert data["per_class"]["policy"] == "maxprob"
    assert {p.name for p in out.iterdir()} == REPORT
    assert "no decision maps" in (out / "index.html").read_text()
    bad = run_cli(tmp_path, *outputs, "--policy", "maxprob", "--budgets", "0.1", "--out", str(out))
    assert bad.exit_code != 0 and "below the cost of the first exit" in bad.output


def test_outputs_without_costs_are_refused_with_the_fix(outputs, tmp_path, no_calibration):
    val, test = (dataclasses.replace(o, costs=None) for o in outputs)
    for budgets in (None, [0.5]):
        fix = r"have none: give them with --costs c1,\.\.\.,cK.*outputs\.with_costs\(\[c1, \.\.\., cK\]\)"
        with pytest.raises(ValueError, match=fix):
            write_report(val, test, tmp_path / "r", budgets=budgets, progress=False)
    result = run_cli(tmp_path, val, test, "--out", str(tmp_path / "r"))
    assert result.exit_code == 2 and "--costs c1,...,cK" in result.output and "NoneType" not in result.output
    assert no_calibration == [] and not (tmp_path / "r").exists()
    given = run_cli(tmp_path, val, test, "--costs", "1,2,3,4", "--budgets", "2.5", "--out", str(tmp_path / "r"))
    assert isinstance(given.exception, AssertionError) and len(no_calibration) == 1  # with costs, it calibrates


def test_a_new_report_replaces_the_earlier_one_whole(outputs, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "index.html").write_text("an earlier report")
    (out / "decision_maps.png").write_bytes(b"a figure this report does not draw")
    write_report(*outputs, out, **QUICK)
    assert set(contents(out)) == REPORT and "an earlier report" not in (out / "index.html").read_text()
    assert os.listdir(tmp_path) == ["r"]  # nothing left beside it


def test_a_report_through_a_symlink_replaces_its_target(outputs, tmp_path):
    target, link = tmp_path / "target", tmp_path / "link"
    target.mkdir()
    link.symlink_to(target)
    index = write_report(*outputs, link, **QUICK)
    assert index == link / "index.html" and link.is_symlink() and set(contents(target)) == REPORT


@pytest.mark.parametrize("failure", ["interrupt while writing", "error while drawing", "rename fails"])
def test_a_failed_report_leaves_the_earlier_one_untouched(outputs, tmp_path, monkeypatch, failure):
    val, test = outputs
    out = tmp_path / "r"
    write_report(val, test, out, **QUICK)
    before = contents(out)
    if failure == "interrupt while writing":  # the figures are written, the page is not
        def render_page(*args):
            raise KeyboardInterrupt

        monkeypatch.setattr("eenet_fast.report.write.render_page", render_page)
        expected = KeyboardInterrupt
    elif failure == "error while drawing":
        def draw_figures(data):
            raise RuntimeError("the disk is full")

        monkeypatch.setattr("eenet_fast.report.write.draw_figures", draw_figures)
        expected = RuntimeError
    else:  # the old report is renamed aside, the new one cannot take its place: the old one comes back
        rename, calls = os.rename, []

        def failing_rename(source, target):
            calls.append((source, target))
            if len(calls) == 2:
                raise OSError("rename refused")
            rename(source, target)

        monkeypatch.setattr(os, "rename", failing_rename)
        expected = OSError
    with pytest.raises(expected):
        write_report(val, test, out, budgets=[0.6, 0.7], policies=["maxprob", "entropy"], progress=False)
    assert contents(out) == before
    assert os.listdir(tmp_path) == ["r"]  # no partial folder, no old one aside


def test_unwritable_place_fails_before_calibrating(outputs, tmp_path, monkeypatch, no_calibration):
    val, test = outputs
    (tmp_path / "a-file").write_text("")
    with pytest.raises(NotADirectoryError, match="into .*a-file/r: .*a-file is a file, not a folder; give --out"):
        write_report(val, test, tmp_path / "a-file" / "r", **QUICK)
    mkdir = os.mkdir

    def read_only(path, *args, **kwargs):  # tests run as root, which chmod cannot stop
        if str(path).startswith(str(tmp_path / "read-only")):
            raise PermissionError(13, "Permission denied", str(path))
        mkdir(path, *args, **kwargs)

    (tmp_path / "read-only").mkdir()
    monkeypatch.setattr(os, "mkdir", read_only)
    with pytest.raises(PermissionError, match="cannot write the report into .*read-only/r: Permission denied"):
        write_report(val, test, tmp_path / "read-only" / "r", **QUICK)
    result = run_cli(tmp_path, val, test, "--budgets", "0.5", "--out", str(tmp_path / "read-only" / "r"))
    assert result.exit_code == 2 and "error: cannot write the report into" in result.output
    assert no_calibration == []
    assert sorted(os.listdir(tmp_path)) == ["a-file", "read-only", "test.npz", "val.npz"]
    assert os.listdir(tmp_path / "read-only") == []


def test_other_files_are_never_replaced(outputs, tmp_path, no_calibration):
    (tmp_path / "index.html").write_text("not ours")
    (tmp_path / "val.npz").write_bytes(b"outputs")
    with pytest.raises(FileExistsError, match=r"not part of a report \(val\.npz\).*new or empty folder"):
        write_report(*outputs, tmp_path, **QUICK)
    assert no_calibration == [] and contents(tmp_path) == {"index.html": b"not ours", "val.npz": b"outputs"}


def test_missing_parents_are_created_and_removed_again_on_failure(outputs, tmp_path, no_calibration):
    with pytest.raises(AssertionError, match="the calibration started"):
        write_report(*outputs, tmp_path / "new" / "deeper" / "r", **QUICK)
    assert len(no_calibration) == 1 and os.listdir(tmp_path) == []
