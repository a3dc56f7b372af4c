""":func:`write_report`: calibrate, compute the numbers, draw, render, and put the folder in place whole.

The report is written into a temporary sibling of its folder (``.<name>.partial-<random>``) created
before the calibration starts (so an unwritable place fails at once), and renamed into place at the
end. An earlier report in that folder is renamed aside first and deleted once the new one is in; if
anything fails or is interrupted, the earlier report stays as it was and no partial folder is left.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from contextlib import suppress
from pathlib import Path
from typing import Any, Mapping, Sequence

from eenet_fast.errors import InputError
from eenet_fast.evaluate import compare, format_table
from eenet_fast.outputs import ExitOutputs
from eenet_fast.policies import POLICIES, resolve_budget
from eenet_fast.report.data import default_budgets, report_data
from eenet_fast.report.figures import draw_figures, require_matplotlib
from eenet_fast.report.page import FIGURES, render_page

__all__ = ["REPORT_FILES", "write_report"]

REPORT_FILES = frozenset({"index.html", "report.json", "table.md", *(f"{name}.png" for name in FIGURES)})


def _sibling(out: Path, kind: str) -> Path:
    """A fresh hidden name next to ``out``: ``.<name>.<kind>-<random>``."""
    return out.with_name(f".{out.name}.{kind}-{secrets.token_hex(4)}")


def _start_folder(out: Path) -> tuple[Path, list[Path]]:
    """Check that a report can take the place of ``out`` (absolute) and create the empty staging folder.

    Returns:
        The staging folder, and the missing ancestors of ``out`` created for it (deepest first).

    Raises:
        FileExistsError: ``out`` is a file, or a folder holding files that are not a report's.
        OSError: the staging folder cannot be created next to ``out`` (the message says where and why).
    """
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"the report's folder {out} is a file: give --out a folder (new, empty or an earlier report)")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in REPORT_FILES)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise FileExistsError(
                f"{out} holds files that are not part of a report ({shown}); the report replaces its folder "
                "as a whole, so give --out a new or empty folder, or one holding only an earlier report"
            )
    fix = "give --out a folder in a place you can write to (the report is written next to it, then moved in)"
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    existing = out.parent.parents[len(created) - 1] if created else out.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"cannot write the report into {out}: {existing} is a file, not a folder; {fix}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = _sibling(out, "partial")
        staging.mkdir()
    except OSError as err:
        _remove_folders(created)
        reason = f"{err.strerror or err} ({err.filename or out.parent})"
        raise type(err)(f"cannot write the report into {out}: {reason}; {fix}") from err
    return staging, created


def _remove_folders(folders: Sequence[Path]) -> None:
    """Remove the given empty folders, deepest first; those that are gone or not empty stay as they are."""
    for folder in folders:
        with suppress(OSError):
            folder.rmdir()


def _write_files(folder: Path, data: dict[str, Any], images: dict[str, bytes]) -> None:
    """Every file of the report into ``folder``: the figures, ``report.json``, ``table.md`` and ``index.html``."""
    for name, png in images.items():
        (folder / f"{name}.png").write_bytes(png)
    (folder / "report.json").write_text(json.dumps(data, indent=1), encoding="utf-8")
    (folder / "table.md").write_text(format_table(data["records"]) + "\n", encoding="utf-8")
    (folder / "index.html").write_text(render_page(data, images), encoding="utf-8")


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename ``staging`` to ``out``. An existing ``out`` is renamed aside first, put back if the new
    folder cannot take its place, and deleted once it has."""
    if not out.exists():
        os.rename(staging, out)
        return
    aside = _sibling(out, "old")
    os.rename(out, aside)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def write_report(
    val: ExitOutputs,
    test: ExitOutputs,
    out_dir: str | Path,
    budgets: Sequence[float | str] | None = None,
    policies: Sequence[str] | None = None,
    seed: int = 0,
    progress: bool = True,
    policy_options: Mapping[str, Mapping[str, Any]] | None = None,
    confidence: float | None = None,
) -> Path:
    """Calibrate every policy over a grid of budgets and write the report into the folder ``out_dir``.

    The folder is replaced as a whole, at the end: it must be new, empty or hold an earlier report.

    Args:
        val: labelled validation outputs with costs; every policy is fitted there.
        test: labelled test outputs of the same model (same exits, classes and, if given, costs).
        out_dir: the report's folder (created with its parents if needed).
        budgets: average costs (numbers, or ``"0.5x"``/``"50%"`` of the last exit's cost); default
            :func:`default_budgets`. They are sorted and deduplicated.
        policies: policy names; default all of :data:`eenet_fast.policies.POLICIES`.
        seed: seed of EENet's training and of the scatter subsampling.
        progress: show a progress bar while calibrating.
        policy_options: extra constructor options per policy name, e.g. ``{"eenet": {"epochs": 10}}``.
        confidence: certify every budget at this level (see :func:`eenet_fast.evaluate.compare`).

    Returns:
        The path of ``index.html`` (under ``out_dir`` as given).

    Raises:
        ImportError: matplotlib is missing (the message says ``pip install 'eenet-fast[report]'``).
        InputError, BudgetError, PolicyError: the validation outputs have no costs, the inputs do not
            fit together, a budget is infeasible or a policy unknown.
        OSError: ``out_dir`` cannot be written (raised before the calibration starts), or is a file or a
            folder holding other files (``FileExistsError``).
    """
    require_matplotlib()
    if val.costs is None:
        raise InputError(
            "the report needs the cost of each exit and the validation outputs have none: give them "
            "with --costs c1,...,cK on the command line, or outputs.with_costs([c1, ..., cK]) in Python"
        )
    policies = list(dict.fromkeys(policies)) if policies else list(POLICIES)
    grid = sorted({resolve_budget(b, val.costs) for b in budgets}) if budgets else default_budgets(val.costs)
    out = Path(os.path.realpath(out_dir))
    staging, created = _start_folder(out)
    try:
        calibrations = compare(val, test, grid, policies, seed=seed, policy_options=policy_options, progress=progress,
                               confidence=confidence)
        data = report_data(calibrations, val, test, grid, seed=seed)
        _write_files(staging, data, draw_figures(data))
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_folders(created)
        raise
    return Path(out_dir) / "index.html"
