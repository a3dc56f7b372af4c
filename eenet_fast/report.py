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

Only the scatter plots are subsampled (at most :data:`MAX_POINTS` points per panel); every statistic
uses all samples. Figures are drawn with matplotlib's Agg canvas, without pyplot (no global state).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from eenet_fast.evaluate import Calibration, calibrate, format_table
from eenet_fast.features import ExitFeatures
from eenet_fast.outputs import ExitOutputs
from eenet_fast.policies import POLICIES, ExitHistory, resolve_budget

__all__ = [
    "INSTALL_HINT",
    "MAX_POINTS",
    "default_budgets",
    "report_data",
    "write_report",
]

INSTALL_HINT = "pip install 'eenet-fast[report]'"
MAX_POINTS = 3000  # scatter points per panel
GRID_SIZE = 101  # (max score, entropy confidence) grid of the decision maps, per axis
DEFAULT_NUM_BUDGETS = 8
FIGURES = {
    "accuracy_cost": "Accuracy against average cost",
    "exit_mix": "Exit mix",
    "decision_maps": "EENet's decision maps",
    "per_class": "Which classes leave early",
}
_RIGHT, _WRONG = "#1f77b4", "#d62728"  # validation samples the exit gets right / wrong
_DPI = 100


def default_budgets(costs: torch.Tensor, count: int = DEFAULT_NUM_BUDGETS) -> list[float]:
    """``count`` budgets evenly spaced strictly between the first and the last exit's cost (``costs [K]``)."""
    return np.linspace(float(costs[0]), float(costs[-1]), count + 2)[1:-1].tolist()


# ------------------------------------------------------------------------------------------ numbers
def _finite_or_text(x: float) -> float | str:
    """JSON has no infinity: ``inf``/``-inf`` become the strings ``"inf"``/``"-inf"``."""
    return float(x) if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def _rounded(values: torch.Tensor | np.ndarray, digits: int = 5) -> list:
    """A JSON-ready (nested) list of floats rounded to ``digits`` decimals."""
    return np.round(np.asarray(values, dtype=np.float64), digits).tolist()


def _subsample(n: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of at most :data:`MAX_POINTS` of ``n`` items, without replacement."""
    if n <= MAX_POINTS:
        return np.arange(n)
    return np.sort(rng.choice(n, MAX_POINTS, replace=False))


def _recommendations(records: list[dict[str, Any]], budgets: Sequence[float]) -> list[dict[str, Any]]:
    """Per budget, the deployable policy with the best validation accuracy (ties: lower validation cost)."""
    out = []
    for budget in budgets:
        rows = [r for r in records if r["budget"] == budget and POLICIES[r["policy"]].deployable]
        if not rows:
            continue
        best = max(rows, key=lambda r: (r["val_accuracy"], -r["val_avg_cost"]))
        out.append({key: best[key] for key in ("budget", "policy", "val_accuracy", "accuracy", "val_avg_cost", "avg_cost")})
    return out


def _axis(values: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``GRID_SIZE`` points over the range of ``values [n]``, padded by 5 %, at least a tenth of
    ``[low, high]`` wide and clipped to it (all of ``[low, high]`` when ``values`` is empty)."""
    if values.numel() == 0:
        return torch.linspace(low, high, GRID_SIZE)
    lo, hi = float(values.min()), float(values.max())
    half = max(0.55 * (hi - lo), 0.05 * (high - low))
    mid = (lo + hi) / 2
    return torch.linspace(max(low, mid - half), min(high, mid + half), GRID_SIZE)


def _decision_maps(calibration: Calibration, val: ExitOutputs, rng: np.random.Generator) -> dict[str, Any]:
    """The numbers of the decision-map figure for a fitted EENet policy.

    For each exit ``k < K`` (0-based): the score head on a ``GRID_SIZE x GRID_SIZE`` grid (rows: entropy
    confidence ``e``, columns: max score ``m``, both over the range of the validation samples reaching
    exit ``k``), with ``p`` and ``q_<k`` at their mean over those samples (over all validation samples
    when none reaches it), the threshold ``T_k``, and up to :data:`MAX_POINTS` of the samples reaching
    exit ``k`` with their own ``m, e, q_k``, whether exit ``k`` is right and whether they leave there.
    """
    policy = calibration.policy
    scores = policy.exit_scores(val)  # [K, N]
    exits = calibration.val.exits
    correct = val.correct
    g = GRID_SIZE * GRID_SIZE
    maps = []
    for k, feats in enumerate(val.features[:-1]):
        reach = exits >= k
        pool = reach if bool(reach.any()) else torch.ones_like(reach)
        mean_probs = feats.probs[pool].mean(0)  # [C]
        mean_earlier = scores[:k, pool].mean(1)  # [k]
        m_axis = _axis(feats.max_score[reach], 1.0 / val.num_classes, 1.0)
        e_axis = _axis(feats.entropy_conf[reach], 0.0, 1.0)
        grid_e, grid_m = torch.meshgrid(e_axis, m_axis, indexing="ij")  # [G, G]
        grid_features = ExitFeatures(
            probs=mean_probs.expand(g, -1),
            max_score=grid_m.reshape(-1),
            entropy_conf=grid_e.reshape(-1),
            prediction=torch.zeros(g, dtype=torch.long),
        )
        history = ExitHistory(mean_earlier.expand(g, -1), torch.zeros(g, k, dtype=torch.long))
        grid_scores = policy.score(k, grid_features, history).reshape(GRID_SIZE, GRID_SIZE)
        reaching = reach.nonzero().squeeze(1)
        shown = reaching[torch.from_numpy(_subsample(reaching.numel(), rng))]
        maps.append({
            "exit": k,
            "threshold": _finite_or_text(float(policy.thresholds[k])),
            "val_reaching": int(reach.sum()),
            "val_leaving": int((exits == k).sum()),
            "mean_over": "samples reaching this exit" if bool(reach.any()) else "all samples (none reaches this exit)",
            "mean_probs": _rounded(mean_probs, 6),
            "mean_earlier_scores": _rounded(mean_earlier, 6),
            "max_score_axis": _rounded(m_axis, 6),
            "entropy_conf_axis": _rounded(e_axis, 6),
            "score_grid": _rounded(grid_scores),
            "points": {
                "max_score": _rounded(feats.max_score[shown]),
                "entropy_conf": _rounded(feats.entropy_conf[shown]),
                "score": _rounded(scores[k, shown]),
                "correct": correct[k, shown].tolist(),
                "leaves": (exits[shown] == k).tolist(),
            },
        })
    return {"policy": policy.name, "budget": policy.budget, "exits": maps}


def _per_class(calibration: Calibration, test: ExitOutputs) -> dict[str, Any]:
    """Exit fractions ``[C][K]``, sample counts, accuracy and mean exit (1-based) of every true class on test."""
    num_exits, num_classes = test.num_exits, test.num_classes
    labels, exits = test.labels, calibration.test.exits
    counts = torch.bincount(labels, minlength=num_classes).double()
    by_class = torch.bincount(labels * num_exits + exits, minlength=num_classes * num_exits)
    fractions = by_class.reshape(num_classes, num_exits).double() / counts.clamp_min(1)[:, None]
    right = test.correct.gather(0, exits[None])[0].double()
    accuracy = torch.bincount(labels, weights=right, minlength=num_classes) / counts.clamp_min(1)
    mean_exit = (fractions * torch.arange(1, num_exits + 1, dtype=torch.float64)).sum(1)
    present = counts > 0
    return {
        "policy": calibration.policy.name,
        "budget": calibration.policy.budget,
        "split": "test",
        "counts": counts.long().tolist(),
        "exit_fractions": _rounded(fractions, 6),
        "accuracy": [round(float(a), 6) if p else None for a, p in zip(accuracy, present)],
        "mean_exit": [round(float(m), 6) if p else None for m, p in zip(mean_exit, present)],
    }


def report_data(
    calibrations: Sequence[Calibration],
    val: ExitOutputs,
    test: ExitOutputs,
    budgets: Sequence[float],
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """The JSON-ready numbers behind every figure of the report (the content of ``report.json``).

    Keys: ``inputs``, ``budgets``, ``middle_budget`` (``budgets[len // 2]``), ``single_exits`` (cost and
    validation/test accuracy of each exit alone), ``records`` (see :meth:`Calibration.record`),
    ``recommendations``, ``per_class`` (EENet at the middle budget, else the first policy) and
    ``decision_maps`` (``None`` without EENet). Exit indices are 0-based here, 1-based in the figures;
    infinite thresholds are written ``"inf"``/``"-inf"``.
    """
    middle = budgets[len(budgets) // 2]
    at_middle = {c.policy.name: c for c in calibrations if c.policy.budget == middle}
    per_class_from = at_middle.get("eenet", next(iter(at_middle.values())))
    records = [c.record() for c in calibrations]
    rng = np.random.default_rng(seed)
    return {
        "inputs": {
            "num_exits": val.num_exits,
            "num_classes": val.num_classes,
            "val_samples": val.num_samples,
            "test_samples": test.num_samples,
            "costs": val.costs.tolist(),
        },
        "budgets": list(budgets),
        "middle_budget": middle,
        "single_exits": {
            "cost": val.costs.tolist(),
            "val_accuracy": val.correct.double().mean(1).tolist(),
            "test_accuracy": test.correct.double().mean(1).tolist(),
        },
        "records": records,
        "recommendations": _recommendations(records, budgets),
        "per_class": _per_class(per_class_from, test),
        "decision_maps": _decision_maps(at_middle["eenet"], val, rng) if "eenet" in at_middle else None,
    }


# ------------------------------------------------------------------------------------------ figures
def _require_matplotlib() -> None:
    """Raise ``ImportError`` saying how to install matplotlib when it is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError(f"the report draws its figures with matplotlib, which is not installed: {INSTALL_HINT}") from None


def _figure(width: float, height: float) -> Any:
    """A matplotlib ``Figure`` on an Agg canvas (no pyplot, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _policy_colors(names: Sequence[str]) -> dict[str, Any]:
    """A fixed ``tab10`` colour per policy (by its place in :data:`POLICIES`, so reports agree)."""
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    return {name: palette[i % len(palette)] for i, name in enumerate(POLICIES) if name in names}


def _fmt(budget: float) -> str:
    """A budget for labels: three significant digits."""
    return f"{budget:.3g}"


def _plot_accuracy_cost(data: dict[str, Any]) -> bytes:
    """Two panels (validation, test): accuracy (%) against average cost per policy, single exits marked."""
    records, exits = data["records"], data["single_exits"]
    names = list(dict.fromkeys(r["policy"] for r in records))
    colors = _policy_colors(names)
    fig = _figure(12, 4.8)
    axes = fig.subplots(1, 2, sharey=True)
    panels = (("validation", "val_accuracy", "val_avg_cost", "val_accuracy"), ("test", "accuracy", "avg_cost", "test_accuracy"))
    for ax, (split, acc_key, cost_key, exit_key) in zip(axes, panels):
        for name in names:
            rows = sorted((r for r in records if r["policy"] == name), key=lambda r: r[cost_key])
            ax.plot([r[cost_key] for r in rows], [100 * r[acc_key] for r in rows],
                    marker="o", markersize=4, color=colors[name], label=name,
                    linestyle="--" if not POLICIES[name].deployable else "-")
        accuracy = [100 * a for a in exits[exit_key]]
        ax.scatter(exits["cost"][:-1], accuracy[:-1], color="black", marker="s", zorder=5, label="single exits")
        ax.scatter(exits["cost"][-1:], accuracy[-1:], color="black", marker="*", s=160, zorder=5, label="full model")
        for k, (cost, acc) in enumerate(zip(exits["cost"], accuracy)):
            ax.annotate(f"exit {k + 1}", (cost, acc), textcoords="offset points", xytext=(6, -12), fontsize=8)
        ax.set_title(f"{split}: accuracy under a cost budget")
        ax.set_xlabel("average cost per sample")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[1].legend(fontsize=8, loc="lower right")
    return _png(fig)


def _plot_exit_mix(data: dict[str, Any]) -> bytes:
    """One panel per policy: stacked bars of the test exit fractions at each budget."""
    from matplotlib import colormaps

    records, budgets = data["records"], data["budgets"]
    names = list(dict.fromkeys(r["policy"] for r in records))
    num_exits = data["inputs"]["num_exits"]
    exit_colors = colormaps["viridis"](np.linspace(0.1, 0.9, num_exits))
    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig = _figure(4.2 * ncols, 3.2 * nrows + 0.5)
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
    x = np.arange(len(budgets))
    for ax, name in zip(axes, names):
        by_budget = {r["budget"]: r["exit_fractions"] for r in records if r["policy"] == name}
        fractions = np.array([by_budget[b] for b in budgets]) * 100  # [B, K]
        bottom = np.zeros(len(budgets))
        for k in range(num_exits):
            ax.bar(x, fractions[:, k], bottom=bottom, color=exit_colors[k], label=f"exit {k + 1}", width=0.8)
            bottom += fractions[:, k]
        ax.set_title(name)
        ax.set_xticks(x, [_fmt(b) for b in budgets], rotation=45 if len(budgets) > 6 else 0, fontsize=9)
        ax.set_xlabel("budget")
        ax.set_ylim(0, 100)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    for ax in axes[::ncols]:
        ax.set_ylabel("test samples leaving (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=num_exits, fontsize=9)
    return _png(fig)


def _scatter_samples(ax: Any, x: np.ndarray, y: np.ndarray, correct: np.ndarray, leaves: np.ndarray) -> None:
    """Right/wrong by colour; filled markers leave at this exit, hollow ones go on."""
    for right, color, word in ((True, _RIGHT, "right"), (False, _WRONG, "wrong")):
        for leave in (True, False):
            sel = (correct == right) & (leaves == leave)
            ax.scatter(x[sel], y[sel], s=9, linewidths=0.7, alpha=0.6, edgecolors=color,
                       facecolors=color if leave else "none",
                       label=f"{word}, {'leaves here' if leave else 'goes on'}")


def _plot_decision_maps(data: dict[str, Any]) -> bytes:
    """One row per exit ``k < K``: the score map with its threshold, and the actual scores against ``m``."""
    rows = data["decision_maps"]["exits"]
    fig = _figure(12, 4.4 * len(rows) + 0.3)
    axes = fig.subplots(len(rows), 2, squeeze=False)
    for (ax_map, ax_score), row in zip(axes, rows):
        k, threshold = row["exit"], row["threshold"]
        m_axis, e_axis = np.array(row["max_score_axis"]), np.array(row["entropy_conf_axis"])
        grid = np.array(row["score_grid"])
        pts = {key: np.array(v) for key, v in row["points"].items()}
        mesh = ax_map.pcolormesh(m_axis, e_axis, grid, cmap="Greys", shading="auto", alpha=0.7)
        fig.colorbar(mesh, ax=ax_map, label=f"score q{k + 1} on the grid")
        finite = not isinstance(threshold, str)
        if finite and grid.min() < threshold < grid.max():
            ax_map.contour(m_axis, e_axis, grid, levels=[threshold], colors="darkorange", linewidths=2.5)
        _scatter_samples(ax_map, pts["max_score"], pts["entropy_conf"], pts["correct"], pts["leaves"])
        t_text = f"T{k + 1} = {threshold:.3g}" if finite else f"T{k + 1} = {threshold} ({'no sample leaves' if threshold == 'inf' else 'every sample leaves'})"
        ax_map.set_title(f"exit {k + 1}: score map, threshold {t_text} (orange)", fontsize=10)
        ax_map.set_xlabel(f"max score m{k + 1}")
        ax_map.set_ylabel(f"entropy confidence e{k + 1}")
        ax_map.set_xlim(m_axis[0], m_axis[-1])
        ax_map.set_ylim(e_axis[0], e_axis[-1])

        _scatter_samples(ax_score, pts["max_score"], pts["score"], pts["correct"], pts["leaves"])
        if finite:
            ax_score.axhline(threshold, color="darkorange", linewidth=2, label=f"threshold {t_text}")
        ax_score.set_title(f"exit {k + 1}: real scores ({row['val_reaching']} samples reach it, "
                           f"{row['val_leaving']} leave)", fontsize=10)
        ax_score.set_xlabel(f"max score m{k + 1}")
        ax_score.set_ylabel(f"score q{k + 1}")
        ax_score.grid(alpha=0.3)
        ax_score.legend(fontsize=7, loc="best", markerscale=1.5)
    return _png(fig)


def _plot_per_class(data: dict[str, Any]) -> bytes:
    """Heatmap true class x exit of test exit fractions (classes sorted by mean exit) and class accuracy."""
    per_class = data["per_class"]
    fractions = np.array(per_class["exit_fractions"]) * 100  # [C, K]
    num_classes, num_exits = fractions.shape
    present = np.array([m is not None for m in per_class["mean_exit"]])
    mean_exit = np.array([m if m is not None else np.inf for m in per_class["mean_exit"]])
    order = np.argsort(mean_exit, kind="stable")
    accuracy = np.array([100 * a if a is not None else np.nan for a in per_class["accuracy"]])[order]
    fig = _figure(9, min(max(3.5, 0.32 * num_classes + 1.5), 14))
    ax_heat, ax_acc = fig.subplots(1, 2, sharey=True, width_ratios=[3, 1])
    image = ax_heat.imshow(fractions[order], aspect="auto", cmap="viridis", vmin=0, vmax=100, interpolation="nearest")
    fig.colorbar(image, ax=ax_heat, label="share of the class's test samples (%)")
    ax_heat.set_xticks(range(num_exits), [f"exit {k + 1}" for k in range(num_exits)])
    few = num_classes <= 40
    if few:
        ax_heat.set_yticks(range(num_classes), [str(c) for c in order])
        for row, values in enumerate(fractions[order]):
            for k, value in enumerate(values):
                ax_heat.text(k, row, f"{value:.0f}", ha="center", va="center", fontsize=7,
                             color="black" if value > 60 else "white")
        ax_heat.set_ylabel("true class (earliest leavers at the top)")
    else:  # too many rows to name: the class ids are in report.json
        ax_heat.set_yticks([])
        ax_heat.set_ylabel(f"{num_classes} true classes, earliest leavers at the top")
    ax_heat.set_title(f"{per_class['policy']} at budget {_fmt(per_class['budget'])}: where each class leaves", fontsize=10)
    if few:
        ax_acc.barh(np.arange(num_classes), accuracy, color="grey")
    else:
        ax_acc.plot(accuracy, np.arange(num_classes), color="grey", linewidth=0.6)
    ax_acc.set_xlim(0, 100)
    ax_acc.set_xlabel("test accuracy (%)")
    ax_acc.set_title("class accuracy", fontsize=10)
    ax_acc.grid(axis="x", alpha=0.3)
    if not present.all():
        ax_acc.text(50, num_classes - 1, f"{int((~present).sum())} classes absent from test", ha="center", fontsize=8)
    return _png(fig)


# --------------------------------------------------------------------------------------------- page
def _captions(data: dict[str, Any]) -> dict[str, str]:
    budgets, middle = data["budgets"], data["middle_budget"]
    where = f"the middle budget of the grid, {_fmt(middle)} (budget {budgets.index(middle) + 1} of {len(budgets)})"
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
        [r["policy"], _fmt(r["budget"]), f"{100 * r['val_accuracy']:.2f}", f"{100 * r['accuracy']:.2f}",
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


def _promise(records: list[dict[str, Any]]) -> str:
    """What the certified budgets promise and assume (empty when none is certified)."""
    g = next((r["guarantee"] for r in records if "guarantee" in r), None)
    if g is None:
        return ""
    return html.escape(
        f" Budgets certified at {100 * g['confidence']:.4g}% confidence ({g['method']}): the mean cost on new data "
        f"stays within the budget with that probability. Assumes: {g['assumptions']}."
    )


def _html(data: dict[str, Any], images: dict[str, bytes]) -> str:
    """The self-contained report page: every figure as a base64 PNG data URI, with its caption."""
    inputs = data["inputs"]
    captions = _captions(data)
    recommendation = "".join(
        f"<li>budget {_fmt(r['budget'])}: <b>{html.escape(r['policy'])}</b>, "
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
Budgets: {', '.join(_fmt(b) for b in data['budgets'])}.</p>
<div class="recommend">Recommendation: per budget, the deployable policy with the best validation accuracy
(its test accuracy in brackets).<ul>{recommendation}</ul></div>
{chr(10).join(sections)}
<h2>Table</h2>
{_html_table(data['records'])}
<p class="caption">The numbers behind every figure are in report.json; this table is also in table.md.{_promise(data['records'])}</p>
</body>
</html>
"""


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
    """Calibrate every policy over a grid of budgets and write the report into ``out_dir``.

    Args:
        val: labelled validation outputs with costs; every policy is fitted there.
        test: labelled test outputs of the same model (same exits, classes and, if given, costs).
        out_dir: the folder to write into (created if needed; existing report files are replaced).
        budgets: average costs (numbers, or ``"0.5x"``/``"50%"`` of the last exit's cost); default
            :func:`default_budgets`. They are sorted and deduplicated.
        policies: policy names; default all of :data:`eenet_fast.policies.POLICIES`.
        seed: seed of EENet's training and of the scatter subsampling.
        progress: show a progress bar while calibrating.
        policy_options: extra constructor options per policy name, e.g. ``{"eenet": {"epochs": 10}}``.
        confidence: certify every budget at this level (see :func:`eenet_fast.evaluate.calibrate`).

    Returns:
        The path of ``index.html``.

    Raises:
        ImportError: matplotlib is missing (the message says ``pip install 'eenet-fast[report]'``).
        ValueError: the inputs do not fit together, a budget is infeasible or a policy unknown.
    """
    _require_matplotlib()
    policies = list(dict.fromkeys(policies)) if policies else list(POLICIES)
    costs = val.costs
    grid = sorted({resolve_budget(b, costs) for b in budgets}) if budgets else default_budgets(costs)
    calibrations = calibrate(
        val, test, grid, policies, seed=seed, policy_options=policy_options, progress=progress, confidence=confidence
    )
    data = report_data(calibrations, val, test, grid, seed=seed)

    images = {
        "accuracy_cost": _plot_accuracy_cost(data),
        "exit_mix": _plot_exit_mix(data),
        "per_class": _plot_per_class(data),
    }
    if data["decision_maps"] is not None:
        images["decision_maps"] = _plot_decision_maps(data)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in FIGURES:
        path = out / f"{name}.png"
        if name in images:
            path.write_bytes(images[name])
        else:
            path.unlink(missing_ok=True)  # a stale figure of an earlier report
    (out / "report.json").write_text(json.dumps(data, indent=1))
    (out / "table.md").write_text(format_table(data["records"]) + "\n")
    index = out / "index.html"
    index.write_text(_html(data, images), encoding="utf-8")
    return index
