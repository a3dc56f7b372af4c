"""The calibration report: what every policy decides, as figures, numbers and one HTML page.

:func:`write_report` fits every policy at every budget of a grid on validation outputs, evaluates it on
validation and test outputs (:func:`eenet_fast.evaluate.evaluate`) and writes into a folder:

* ``accuracy_cost.png``: accuracy against average cost for every policy, on validation and on test,
  with the single exits and the full model (the last exit) marked;
* ``exit_mix.png``: the share of test samples leaving at each exit, per policy and budget;
* ``decision_maps.png``: EENet's score heads as functions of (max score, entropy confidence) with the
  calibrated thresholds, and the validation samples' real scores and decisions (when EENet is fitted);
* ``per_class.png``: for one policy at the middle budget, where the test samples of each true class leave;
* ``report.json``: the numbers behind every figure; ``table.md``: the policy x budget table;
* ``index.html``: one self-contained page (images embedded as data URIs) with all of it.

One module per job: :mod:`.data` (the numbers, :func:`report_data`), :mod:`.figures` (matplotlib:
numbers to PNG bytes), :mod:`.page` (the HTML page), :mod:`.write` (the whole folder, put in place
at the end so that a report is complete or absent).
"""

from eenet_fast.report.data import MAX_POINTS, default_budgets, report_data
from eenet_fast.report.figures import INSTALL_HINT
from eenet_fast.report.write import write_report

__all__ = ["INSTALL_HINT", "MAX_POINTS", "default_budgets", "report_data", "write_report"]
