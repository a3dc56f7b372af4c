"""The report's figures, drawn with matplotlib from the numbers of :func:`~eenet_fast.report.data.report_data`.

Every figure is a function of the JSON-ready data dict alone and comes back as PNG bytes. Figures use
matplotlib's Agg canvas without pyplot (no global state, no backend change).
"""

from __future__ import annotations

import io
import math
from typing import Any, Sequence

import numpy as np

from eenet_fast.policies import POLICIES
from eenet_fast.report.data import budget_label

__all__ = ["INSTALL_HINT", "draw_figures", "require_matplotlib"]

INSTALL_HINT = "pip install 'eenet-fast[report]'"
_RIGHT, _WRONG = "#1f77b4", "#d62728"  # validation samples the exit gets right / wrong
_DPI = 100


def require_matplotlib() -> None:
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
        ax.set_xticks(x, [budget_label(b) for b in budgets], rotation=45 if len(budgets) > 6 else 0, fontsize=9)
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
    ax_heat.set_title(f"{per_class['policy']} at budget {budget_label(per_class['budget'])}: where each class leaves", fontsize=10)
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


def draw_figures(data: dict[str, Any]) -> dict[str, bytes]:
    """Every figure of the report as PNG bytes, by name: ``accuracy_cost``, ``exit_mix``, ``per_class``
    and, when ``data["decision_maps"]`` is not ``None`` (EENet was fitted), ``decision_maps``."""
    require_matplotlib()
    images = {
        "accuracy_cost": _plot_accuracy_cost(data),
        "exit_mix": _plot_exit_mix(data),
        "per_class": _plot_per_class(data),
    }
    if data["decision_maps"] is not None:
        images["decision_maps"] = _plot_decision_maps(data)
    return images
