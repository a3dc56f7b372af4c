import math

import pytest
import torch

from eenet_fast import (
    POLICIES,
    BudgetError,
    InputError,
    PolicyError,
    evaluate,
    make_policy,
)
from eenet_fast.policies.thresholds import (
    assign_exits,
    resolve_budget,
    thresholds_for_fractions,
)

FAST = {"eenet": {"epochs": 20, "progress": False}}


def fit(name, val, budget, **kw):
    return make_policy(name, **{**FAST.get(name, {}), **kw}).fit(val, budget)


@pytest.mark.parametrize("name", list(POLICIES))
@pytest.mark.parametrize("budget", [0.3, 0.55, 0.8, 1.5])
def test_every_policy_meets_its_budget_on_validation(name, budget, synthetic_val):
    policy = fit(name, synthetic_val, budget)
    result = evaluate(policy, synthetic_val)
    assert result.avg_cost <= budget + 1e-9
    assert sum(result.exit_fractions) == pytest.approx(1.0)
    assert 0.0 <= result.accuracy <= 1.0


@pytest.mark.parametrize("name", ["maxprob", "entropy"])
def test_budget_is_spent_not_wasted(name, synthetic_val):
    result = evaluate(fit(name, synthetic_val, 0.6), synthetic_val)
    assert result.avg_cost >= 0.6 - 0.01  # quantile walks can only under-spend by a few samples


def test_budget_below_the_first_exit_names_the_smallest_feasible_budget(synthetic_val):
    with pytest.raises(ValueError, match=r"smallest feasible budget is 0\.25"):
        fit("maxprob", synthetic_val, 0.2)


def test_budget_as_a_fraction_of_the_full_cost():
    costs = torch.tensor([2.0, 4.0, 8.0])
    assert resolve_budget("0.5x", costs) == 4.0
    assert resolve_budget("25%", costs) == 2.0
    assert resolve_budget(5, costs) == 5.0
    with pytest.raises(ValueError, match="fraction of the full"):
        resolve_budget("half", costs)


def test_budget_above_the_full_cost_is_allowed(synthetic_val):
    result = evaluate(fit("maxprob", synthetic_val, 10.0), synthetic_val)
    assert result.exit_fractions[-1] == pytest.approx(1.0)


def test_eenet_is_deterministic_under_a_seed(synthetic_val, synthetic_test):
    a = fit("eenet", synthetic_val, 0.5, seed=3)
    b = fit("eenet", synthetic_val, 0.5, seed=3)
    assert torch.equal(a.thresholds, b.thresholds)
    assert torch.equal(a.assign(synthetic_test), b.assign(synthetic_test))


def test_eenet_scores_follow_new_scheduler_weights(synthetic_val, synthetic_test):
    """score() reads the heads' weights through a cache (no module call at every exit): weights
    loaded into a scored policy, or changed in place, are the ones it scores with."""
    a, b = fit("eenet", synthetic_val, 0.5, seed=1), fit("eenet", synthetic_val, 0.5, seed=2)
    before = a.exit_scores(synthetic_test)
    assert not torch.equal(before, b.exit_scores(synthetic_test))
    a.load_state_tensors(b.state_tensors())
    assert torch.equal(a.exit_scores(synthetic_test), b.exit_scores(synthetic_test))
    with torch.no_grad():
        a.scheduler.score_heads[0].linear.add_(1.0)  # the score at exit 1 gains the max score and its entropy
    assert not torch.equal(a.exit_scores(synthetic_test)[0], b.exit_scores(synthetic_test)[0])


def test_eenet_beats_maxprob_when_confidence_is_miscalibrated_per_class(synthetic_val, synthetic_test):
    for budget in (0.5, 0.7):
        eenet = evaluate(fit("eenet", synthetic_val, budget), synthetic_test)
        maxprob = evaluate(fit("maxprob", synthetic_val, budget), synthetic_test)
        assert eenet.accuracy > maxprob.accuracy + 0.01, (budget, eenet.accuracy, maxprob.accuracy)
        assert eenet.avg_cost <= budget * 1.03


def test_oracle_bounds_every_policy(synthetic_val, synthetic_test):
    oracle = evaluate(fit("oracle", synthetic_val, 0.5), synthetic_test)
    for name in ("maxprob", "search", "patience"):
        assert evaluate(fit(name, synthetic_val, 0.5), synthetic_test).accuracy <= oracle.accuracy
    assert oracle.avg_cost <= 0.5 + 1e-9


@pytest.mark.parametrize("name", ["search", "eenet"])
def test_learned_policies_spend_less_when_a_later_exit_is_worse(name):
    from eenet_fast.synthetic import make_synthetic_outputs

    val = make_synthetic_outputs(3000, seed=5)
    worse_last = val.logits.clone()
    worse_last[-1] = worse_last[0]  # the last exit is no better than the first
    val = type(val)(worse_last, val.labels, val.costs)
    result = evaluate(fit(name, val, 0.9), val)
    assert result.avg_cost < 0.9 - 0.05  # half or three quarters of the slack beats spending it all


def test_search_is_at_least_as_good_as_maxprob_on_validation(synthetic_val):
    search = evaluate(fit("search", synthetic_val, 0.5), synthetic_val)
    maxprob = evaluate(fit("maxprob", synthetic_val, 0.5), synthetic_val)
    assert search.accuracy >= maxprob.accuracy


def test_patience_leaves_after_p_agreeing_exits(synthetic_val):
    policy = fit("patience", synthetic_val, 0.8)
    scores = policy.exit_scores(synthetic_val)
    preds = torch.stack([f.prediction for f in synthetic_val.features])
    # score at exit k = number of consecutive earlier exits agreeing with exit k
    expected = torch.zeros_like(scores)
    for k in range(1, preds.shape[0]):
        expected[k] = torch.where(preds[k] == preds[k - 1], expected[k - 1] + 1, 0)
    assert torch.equal(scores, expected)


def test_quantile_walk_sends_the_asked_fractions():
    scores = torch.rand(3, 1000, generator=torch.Generator().manual_seed(0))
    thresholds = thresholds_for_fractions(scores, torch.tensor([0.3, 0.25, 0.45]))
    exits = assign_exits(scores, thresholds)
    assert torch.bincount(exits, minlength=3).tolist() == [300, 250, 450]
    assert thresholds[-1] == -math.inf


def test_thresholds_sit_strictly_between_leaving_and_staying_scores():
    scores = torch.rand(2, 500, generator=torch.Generator().manual_seed(1))
    t = thresholds_for_fractions(scores, torch.tensor([0.4, 0.6]))[0]
    leave = scores[0] >= t
    assert scores[0][leave].min() > t or scores[0][leave].min() == t
    assert (scores[0][~leave] < t).all()
    gap = scores[0][leave].min() - scores[0][~leave].max()
    assert (scores[0][leave].min() - t) >= gap / 2 - 1e-7  # halfway, not on a score


def test_unfitted_and_mismatched_policies_are_refused(synthetic_val):
    from eenet_fast.synthetic import make_synthetic_outputs

    with pytest.raises(RuntimeError, match="not fitted"):
        make_policy("maxprob").assign(synthetic_val)
    policy = fit("maxprob", synthetic_val, 0.5)
    with pytest.raises(ValueError, match="fitted for 4 exits and 10 classes"):
        policy.assign(make_synthetic_outputs(10, num_exits=3))
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        make_policy("nope")


def test_fitting_needs_labels_and_costs(synthetic_val):
    from eenet_fast.outputs import ExitOutputs

    with pytest.raises(ValueError, match="no labels"):
        make_policy("maxprob").fit(ExitOutputs(synthetic_val.logits, costs=synthetic_val.costs), 0.5)
    with pytest.raises(ValueError, match="no exit costs"):
        make_policy("maxprob").fit(ExitOutputs(synthetic_val.logits, synthetic_val.labels), 0.5)


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("eenet", {"batch_size": 0}, "batch_size must be an integer >= 1"),
        ("eenet", {"phase_epochs": 0}, "phase_epochs must be an integer >= 1"),
        ("eenet", {"hidden": 2.5}, "hidden must be an integer"),
        ("eenet", {"epochs": True}, "epochs must be an integer"),
        ("eenet", {"lr": float("nan")}, "lr must be a finite number"),
        ("eenet", {"lr": 0.0}, "lr must be > 0.0"),
        ("eenet", {"weight_decay": -1.0}, "weight_decay must be >= 0.0"),
        ("eenet", {"seed": 2**70}, r"seed must be an integer in \[0, 18446744073709551615\]"),
        ("eenet", {"seed": -1}, r"seed must be an integer in \[0, "),
        ("eenet", {"progress": "yes"}, "progress must be True or False"),
        ("eenet", {"hiden": 16}, "takes no option 'hiden': its options are hidden, epochs"),
        ("search", {"samples": 0}, "samples must be an integer >= 1"),
        ("maxprob", {"seed": 0}, "takes no option 'seed': it takes none"),
        (None, {}, "unknown policy None"),
    ],
)
def test_bad_policy_options_are_policy_errors_naming_the_option(name, options, match):
    with pytest.raises(PolicyError, match=match):
        make_policy(name, **options)


@pytest.mark.parametrize(
    "budget, match",
    [
        ("half", "cannot read budget 'half'"),
        (None, "cannot read budget None"),
        (True, "cannot read budget True"),
        (torch.tensor([0.5, 0.6]), "cannot read budget"),
        (float("nan"), "budget must be a finite number"),
        ("infx", "budget must be a finite number"),
        ("1e400", "budget must be a finite number"),
        (-1, "below the cost of the first exit"),
    ],
)
def test_bad_budgets_are_budget_errors(budget, match):
    with pytest.raises(BudgetError, match=match):
        resolve_budget(budget, torch.tensor([0.25, 1.0], dtype=torch.float64))


def test_an_empty_set_is_refused_not_scored(synthetic_val):
    from eenet_fast import compare

    empty = synthetic_val.subset(torch.zeros(synthetic_val.num_samples, dtype=torch.bool))
    policy = fit("maxprob", synthetic_val, 0.5)
    with pytest.raises(InputError, match="hold no samples"):
        evaluate(policy, empty)
    with pytest.raises(InputError, match="the test outputs hold no samples"):
        compare(synthetic_val, empty, [0.5], ["maxprob"], progress=False)
    with pytest.raises(InputError, match="empty validation set"):
        make_policy("maxprob").fit(empty, 0.5)
