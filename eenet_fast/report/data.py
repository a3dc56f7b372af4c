"""The report's numbers: everything ``report.json`` holds, computed from fitted policies, JSON-ready.

Only the scatter points of the decision maps are subsampled (at most :data:`MAX_POINTS` per exit);
every statistic uses all samples.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from eenet_fast.evaluate import Comparison
from eenet_fast.features import ExitFeatures
from eenet_fast.outputs import ExitOutputs
from eenet_fast.policies import POLICIES, ExitHistory

__all__ = ["DEFAULT_NUM_BUDGETS", "GRID_SIZE", "MAX_POINTS", "budget_label", "default_budgets", "report_data"]

MAX_POINTS = 3000  # scatter points per panel
GRID_SIZE = 101  # (max score, entropy confidence) grid of the decision maps, per axis
DEFAULT_NUM_BUDGETS = 8


def default_budgets(costs: torch.Tensor, count: int = DEFAULT_NUM_BUDGETS) -> list[float]:
    """``count`` budgets evenly spaced strictly between the first and the last exit's cost (``costs [K]``)."""
    return np.linspace(float(costs[0]), float(costs[-1]), count + 2)[1:-1].tolist()


def budget_label(budget: float) -> str:
    """A budget as the figures and the page write it: three significant digits."""
    return f"{budget:.3g}"


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


def _decision_maps(calibration: Comparison, val: ExitOutputs, rng: np.random.Generator) -> dict[str, Any]:
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


def _per_class(calibration: Comparison, test: ExitOutputs) -> dict[str, Any]:
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
    calibrations: Sequence[Comparison],
    val: ExitOutputs,
    test: ExitOutputs,
    budgets: Sequence[float],
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """The JSON-ready numbers behind every figure of the report (the content of ``report.json``).

    Keys: ``inputs``, ``budgets``, ``middle_budget`` (``budgets[len // 2]``), ``single_exits`` (cost and
    validation/test accuracy of each exit alone), ``records`` (see :meth:`Comparison.record`),
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
