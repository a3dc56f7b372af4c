"""The report's page: ``index.html``, one self-contained HTML file with every figure, its caption,
the recommendation and the policy x budget table (``table.md`` is :func:`eenet_fast.evaluate.format_table`)."""

from __future__ import annotations

import base64
import html
from typing import Any

from eenet_fast.report.data import MAX_POINTS, budget_label

__all__ = ["FIGURES", "render_page"]

FIGURES = {
    "accuracy_cost": "Accuracy against average cost",
    "exit_mix": "Exit mix",
    "decision_maps": "EENet's decision maps",
    "per_class": "Which classes leave early",
}  # every figure the page can show, by name (``<name>.png``), in page order, with its title


def _captions(data: dict[str, Any]) -> dict[str, str]:
    """The caption under each figure, by name."""
    budgets, middle = data["budgets"], data["middle_budget"]
    where = f"the middle budget of the grid, {budget_label(middle)} (budget {budgets.index(middle) + 1} of {len(budgets)})"
    per_class = data["per_class"]
    return {
        "accuracy_cost": (
            "Each line is one policy fitted on validation at every budget of the grid; a point is placed at the "
            "average cost the policy really spent per sample (x) and its accuracy (y), on validation (left, where "
            "the budget is enforced) and on test (right). Black squares: each exit alone; black star: the full "
            "model (last exit). Higher and further left is better. A dashed line (oracle) decides from the labels: "
            "an upper bound, not a deployable policy."
        ),
        "exit_mix": (
            "One panel per policy: at each budget (x), the share of test samples leaving at each exit, stacked "
            "from the first exit (bottom) to the last (top). Larger budgets move samples up to later exits."
        ),
        "decision_maps": (
            f"EENet fitted at {where}. One row per exit k that can let samples go (the last takes every sample "
            "left). Left: the grey background is EENet's score head q_k on a grid of (max score m, entropy "
            "confidence e) spanning the samples that reach exit k; the head also takes the class probabilities p and the earlier scores q_1..q_(k-1), "
            "which are set to their mean over the validation samples that reach exit k. The orange line is the "
            "calibrated threshold T_k: samples scoring at or above it leave. Points: validation samples that reach "
            f"exit k (at most {MAX_POINTS} shown), at their own (m, e); blue = exit k predicts them right, red = "
            "wrong; filled = they really leave at exit k (their own score reaches T_k), hollow = they go on. A "
            "filled point below the line (or a hollow one above it) is a sample whose own p or earlier scores "
            "moved its score away from the map's. Right: the same samples' actual scores q_k against m, with T_k as "
            "a horizontal line: red filled points are the mistakes this exit lets out."
        ),
        "per_class": (
            f"{per_class['policy']} at {where}, on test: each row is a true class (sorted by the average exit "
            "its samples take, earliest at the top), each column an exit; a cell is the share of that class's "
            "samples leaving at that exit. Bright cells on the left: classes the policy lets out early; on the "
            "right: classes it runs to the end. The bars give each class's test accuracy under the policy."
        ),
    }


def _html_table(records: list[dict[str, Any]]) -> str:
    """The policy x budget table as HTML (validation and test accuracy and cost, test exit mix)."""
    headers = ["policy", "budget", "val acc %", "test acc %", "val cost", "test cost", "test exit mix % (exit 1 / ... / K)"]
    rows = [
        [r["policy"], budget_label(r["budget"]), f"{100 * r['val_accuracy']:.2f}", f"{100 * r['accuracy']:.2f}",
         f"{r['val_avg_cost']:.4g}", f"{r['avg_cost']:.4g}", " / ".join(f"{100 * f:.1f}" for f in r["exit_fractions"])]
        for r in records
    ]
    if any("guarantee" in r for r in records):  # certified budgets: the promise and how it went on test
        headers += ["confidence %", "upper bound", "test cost <= budget"]
        for row, r in zip(rows, records):
            g = r.get("guarantee")
            row += ["-"] * 3 if g is None else [f"{100 * g['confidence']:.4g}", f"{g['upper_bound']:.4g}",
                                                "yes" if r["avg_cost"] <= r["budget"] else "no"]
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _promise(records: list[dict[str, Any]]) -> str:
    """What the certified budgets promise and assume (empty when none is certified)."""
    g = next((r["guarantee"] for r in records if "guarantee" in r), None)
    if g is None:
        return ""
    return html.escape(
        f" Budgets certified at {100 * g['confidence']:.4g}% confidence ({g['method']}): the mean cost on new data "
        f"stays within the budget with that probability. Assumes: {g['assumptions']}."
    )


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1240px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
p.caption { color: #444; font-size: 0.92em; line-height: 1.4; }
table { border-collapse: collapse; font-size: 0.88em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.recommend { background: #eef5ff; border-left: 4px solid #1f77b4; padding: 0.6em 1em; }
.recommend ul { margin: 0.3em 0; columns: 2; }
"""


def render_page(data: dict[str, Any], images: dict[str, bytes]) -> str:
    """The self-contained report page: every figure of ``images`` (PNG bytes by name, see
    :data:`FIGURES`) as a base64 data URI with its caption; a missing ``decision_maps`` is explained."""
    inputs = data["inputs"]
    captions = _captions(data)
    recommendation = "".join(
        f"<li>budget {budget_label(r['budget'])}: <b>{html.escape(r['policy'])}</b>, "
        f"{100 * r['val_accuracy']:.2f}% on validation ({100 * r['accuracy']:.2f}% on test)</li>"
        for r in data["recommendations"]
    )
    sections = []
    for key, title in FIGURES.items():
        if key in images:
            uri = "data:image/png;base64," + base64.b64encode(images[key]).decode("ascii")
            body = f'<img src="{uri}" alt="{html.escape(title)}">'
        else:
            body = "<p>EENet is not among the reported policies: no decision maps.</p>"
        sections.append(f"<h2>{html.escape(title)}</h2>\n{body}\n<p class=\"caption\">{html.escape(captions[key])}</p>")
    costs = ", ".join(f"{c:.4g}" for c in inputs["costs"])
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>eenet-fast calibration report</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>eenet-fast calibration report</h1>
<p>{inputs['num_exits']} exits, {inputs['num_classes']} classes, exit costs {costs};
{inputs['val_samples']} validation samples (policies are fitted there) and {inputs['test_samples']} test samples.
Budgets: {', '.join(budget_label(b) for b in data['budgets'])}.</p>
<div class="recommend">Recommendation: per budget, the deployable policy with the best validation accuracy
(its test accuracy in brackets).<ul>{recommendation}</ul></div>
{chr(10).join(sections)}
<h2>Table</h2>
{_html_table(data['records'])}
<p class="caption">The numbers behind every figure are in report.json; this table is also in table.md.{_promise(data['records'])}</p>
</body>
</html>
"""
