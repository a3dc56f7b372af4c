"""The report's numbers (eenet_fast/report/data.py) against evaluate() and the fitted policies."""

import pytest
import torch

from eenet_fast.evaluate import evaluate
from eenet_fast.features import ExitFeatures
from eenet_fast.policies import POLICIES, ExitHistory, make_policy
from eenet_fast.report import MAX_POINTS, default_budgets


def fitted(report, name: str, budget: float):
    """The policy ``name`` fitted on the report's validation outputs as write_report fits it."""
    options = {"seed": report.seed, "progress": False, **report.policy_options.get(name, {})} if name == "eenet" else {}
    return make_policy(name, **options).fit(report.val, budget)


def test_numbers_match_evaluate(written_report):
    data, val, test = written_report.data, written_report.val, written_report.test
    assert data["budgets"] == [0.4, 0.6, 0.8] and data["middle_budget"] == 0.6
    assert [(r["policy"], r["budget"]) for r in data["records"]] == [(p, b) for p in POLICIES for b in data["budgets"]]
    for name in ("eenet", "maxprob", "oracle"):
        policy = fitted(written_report, name, 0.6)
        record = next(r for r in data["records"] if r["policy"] == name and r["budget"] == 0.6)
        on_test, on_val = evaluate(policy, test), evaluate(policy, val)
        assert record["accuracy"] == on_test.accuracy and record["avg_cost"] == on_test.avg_cost
        assert record["exit_fractions"] == on_test.exit_fractions
        assert record["val_accuracy"] == on_val.accuracy and record["val_avg_cost"] == on_val.avg_cost
        assert record["val_exit_fractions"] == on_val.exit_fractions
        assert record["val_avg_cost"] <= 0.6 + 1e-9
    exits = data["single_exits"]
    assert exits["cost"] == val.costs.tolist()
    assert exits["test_accuracy"] == pytest.approx(test.correct.double().mean(1).tolist())
    assert exits["val_accuracy"] == pytest.approx(val.correct.double().mean(1).tolist())


def test_recommendation_is_best_deployable_on_validation(written_report):
    data = written_report.data
    assert [r["budget"] for r in data["recommendations"]] == data["budgets"]
    for rec in data["recommendations"]:
        rows = [r for r in data["records"] if r["budget"] == rec["budget"] and r["policy"] != "oracle"]
        assert rec["policy"] != "oracle"
        assert rec["val_accuracy"] == max(r["val_accuracy"] for r in rows)
        chosen = next(r for r in rows if r["policy"] == rec["policy"])
        assert rec["accuracy"] == chosen["accuracy"]


def test_decision_maps_follow_the_fitted_policy(written_report):
    data, val = written_report.data, written_report.val
    maps = data["decision_maps"]
    assert maps["policy"] == "eenet" and maps["budget"] == data["middle_budget"]
    policy = fitted(written_report, "eenet", 0.6)
    scores = policy.exit_scores(val)
    exits = policy.assign(val)
    assert [m["exit"] for m in maps["exits"]] == list(range(val.num_exits - 1))
    for row in maps["exits"]:
        k = row["exit"]
        grid_size = len(row["max_score_axis"])
        reach = exits >= k
        m_axis, e_axis = torch.tensor(row["max_score_axis"]), torch.tensor(row["entropy_conf_axis"])
        m, e = val.features[k].max_score[reach], val.features[k].entropy_conf[reach]
        tol = 1e-6  # the axes are rounded to 6 decimals
        assert 1 / val.num_classes - tol <= m_axis[0] <= m.min() + tol and m.max() - tol <= m_axis[-1] <= 1 + tol
        assert -tol <= e_axis[0] <= e.min() + tol and e.max() - tol <= e_axis[-1] <= 1 + tol
        threshold = float(row["threshold"])
        assert threshold == pytest.approx(float(policy.thresholds[k]))
        assert row["val_reaching"] == int((exits >= k).sum()) and row["val_leaving"] == int((exits == k).sum())
        mean_probs = val.features[k].probs[reach].mean(0)
        mean_earlier = scores[:k, reach].mean(1)
        assert row["mean_probs"] == pytest.approx(mean_probs.tolist(), abs=1e-5)
        assert row["mean_earlier_scores"] == pytest.approx(mean_earlier.tolist(), abs=1e-5)
        grid = torch.tensor(row["score_grid"])  # rows: entropy confidence, columns: max score
        assert grid.shape == (grid_size, grid_size)
        for i, j in [(0, 0), (grid_size // 2, grid_size - 1), (grid_size - 1, grid_size // 3)]:
            m, e = row["max_score_axis"][j], row["entropy_conf_axis"][i]
            feats = ExitFeatures(mean_probs[None], torch.tensor([m]), torch.tensor([e]), torch.zeros(1, dtype=torch.long))
            q = policy.score(k, feats, ExitHistory(mean_earlier[None], torch.zeros(1, k, dtype=torch.long)))
            assert float(grid[i, j]) == pytest.approx(float(q), abs=1e-4)
        pts = row["points"]
        assert len(pts["score"]) == min(row["val_reaching"], MAX_POINTS)
        for score, leaves in zip(pts["score"], pts["leaves"]):  # the real decision is the actual score vs T_k
            assert leaves == (score >= threshold) or abs(score - threshold) < 1e-4


def test_per_class_view_adds_up(written_report):
    data, test = written_report.data, written_report.test
    per_class = data["per_class"]
    assert per_class["policy"] == "eenet" and per_class["budget"] == data["middle_budget"]
    fractions = torch.tensor(per_class["exit_fractions"], dtype=torch.float64)  # [C, K]
    counts = torch.tensor(per_class["counts"], dtype=torch.float64)
    assert counts.sum() == test.num_samples
    assert torch.allclose(fractions.sum(1), torch.ones(test.num_classes, dtype=torch.float64), atol=1e-5)
    record = next(r for r in data["records"] if r["policy"] == "eenet" and r["budget"] == data["middle_budget"])
    overall = (fractions * counts[:, None]).sum(0) / counts.sum()
    assert overall.tolist() == pytest.approx(record["exit_fractions"], abs=1e-5)
    accuracy = sum(a * n for a, n in zip(per_class["accuracy"], per_class["counts"])) / counts.sum()
    assert float(accuracy) == pytest.approx(record["accuracy"], abs=1e-5)


def test_default_budgets_lie_between_first_and_last_exit():
    costs = torch.tensor([0.1, 0.4, 1.0], dtype=torch.float64)
    budgets = default_budgets(costs)
    assert len(budgets) == 8 and budgets == sorted(budgets)
    assert 0.1 < budgets[0] and budgets[-1] < 1.0
