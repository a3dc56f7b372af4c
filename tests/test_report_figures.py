"""The report's figures (eenet_fast/report/figures.py): real PNGs of a useful size, and a clear error
without matplotlib."""

import re
import struct
import sys

import pytest
from click.testing import CliRunner

from eenet_fast.cli import main
from eenet_fast.report import INSTALL_HINT, write_report
from eenet_fast.report.figures import draw_figures

FIGURES = ("accuracy_cost", "exit_mix", "decision_maps", "per_class")


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_every_figure_is_a_png_of_a_useful_size(written_report):
    out = written_report.index.parent
    for name in FIGURES:
        width, height = png_size((out / f"{name}.png").read_bytes())
        assert width >= 600 and height >= 300


def test_without_eenet_there_is_no_decision_map(written_report):
    images = draw_figures({**written_report.data, "decision_maps": None})
    assert sorted(images) == sorted(set(FIGURES) - {"decision_maps"})
    for name, png in images.items():  # the same numbers draw the same figure
        assert png_size(png) == png_size((written_report.index.parent / f"{name}.png").read_bytes())


def test_without_matplotlib_says_how_to_install(synthetic_val, synthetic_test, tmp_path, monkeypatch):
    val, test = synthetic_val, synthetic_test
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ImportError, match=re.escape(INSTALL_HINT)):
        write_report(val, test, tmp_path, budgets=[0.5], policies=["maxprob"], progress=False)
    val.save(tmp_path / "val.npz")
    test.save(tmp_path / "test.npz")
    result = CliRunner().invoke(main, ["report", "--val", str(tmp_path / "val.npz"), "--test", str(tmp_path / "test.npz"),
                                       "--policy", "maxprob", "--budgets", "0.5", "--out", str(tmp_path / "r")])
    assert result.exit_code != 0 and INSTALL_HINT in result.output
    assert not (tmp_path / "r").exists()
