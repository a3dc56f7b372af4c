"""The certified budget: the betting p-values, the fixed-sequence selection, coverage, and the
unchanged behaviour without a confidence."""

import json
import math

import pytest
import torch
from click.testing import CliRunner
from model_utils import C, D, mlp_model

from eenet_fast.cli import main
from eenet_fast.evaluate import evaluate, format_table
from eenet_fast.guarantee import (
    REFIT_METHOD,
    BudgetGuarantee,
    betting_pvalues,
    betting_upper_bound,
    fixed_sequence,
    refit_family,
    split_outputs,
    tilt_family,
)
from eenet_fast.outputs import ExitOutputs
from eenet_fast.policies import make_policy
from eenet_fast.policies.thresholds import assign_exits
from eenet_fast.synthetic import make_synthetic_outputs


@pytest.fixture
def one_thread():
    """Run on one CPU thread: small tensor ops slow down many times over when cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def capital_by_loop(x: list[float], level: float, delta: float, cap: float = 0.75) -> float:
    """The gambler's largest capital, one bet at a time (the brute-force reference)."""
    n, capital, best, total, squares = len(x), 1.0, 1.0, 0.0, 0.0
    var = 0.25
    for t, xi in enumerate(x, 1):
        bet = min(math.sqrt(2 * math.log(1 / delta) / (n * var)), cap / (1 - level))
        capital *= 1 + bet * (level - xi)
        best = max(best, capital)
        total += xi
        mean = (0.5 + total) / (t + 1)
        squares += (xi - mean) ** 2
        var = (0.25 + squares) / (t + 1)
    return best


def test_pvalues_match_the_bet_by_bet_capital():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 300, generator=g, dtype=torch.float64) ** 2
    for level in (0.2, 0.35, 0.6):
        p = betting_pvalues(x, level, 0.05)
        expected = [min(1.0, 1 / capital_by_loop(row.tolist(), level, 0.05)) for row in x]
        assert p.tolist() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("values, probs", [((0.0, 1.0), (0.7, 0.3)), ((0.0, 0.25, 0.6, 1.0), (0.4, 0.3, 0.2, 0.1))])
def test_pvalues_are_valid_at_the_null_boundary(values, probs):
    """With the mean exactly at the level (the hardest null), P(p <= delta) <= delta."""
    g = torch.Generator().manual_seed(1)
    values, probs = torch.tensor(values, dtype=torch.float64), torch.tensor(probs, dtype=torch.float64)
    level = float((values * probs).sum())
    x = values[torch.multinomial(probs, 4000 * 200, replacement=True, generator=g)].view(4000, 200)
    for delta in (0.05, 0.2):
        rate = float((betting_pvalues(x, level, delta) <= delta).double().mean())
        assert rate <= delta + 3 * math.sqrt(delta * (1 - delta) / 4000)


def test_pvalues_reject_a_mean_well_below_the_level():
    x = (torch.rand(1, 2000, generator=torch.Generator().manual_seed(2), dtype=torch.float64) < 0.3).double()
    assert float(betting_pvalues(x, 0.36, 0.05)[0]) < 0.01
    assert float(betting_pvalues(x, 0.29, 0.05)[0]) > 0.5  # a mean above the level is not certified


def test_upper_bound_is_where_the_pvalue_crosses_delta():
    x = (torch.rand(2000, generator=torch.Generator().manual_seed(3), dtype=torch.float64) < 0.3).double()
    bound = betting_upper_bound(x, 0.05)
    assert float(x.mean()) < bound < float(x.mean()) + 0.04
    assert float(betting_pvalues(x[None], bound, 0.05)[0]) <= 0.05 < float(betting_pvalues(x[None], bound - 1e-6, 0.05)[0])


def test_pvalue_edge_levels():
    x = torch.full((2, 10), 0.5, dtype=torch.float64)
    assert betting_pvalues(x, 1.0, 0.05).tolist() == [0.0, 0.0]  # no mean exceeds the largest cost
    assert betting_pvalues(x, 0.0, 0.05).tolist() == [1.0, 1.0]


def test_fixed_sequence_stops_at_the_first_acceptance():
    p = torch.tensor([1.0, 0.01, 0.04, 0.3, 0.0])
    assert fixed_sequence(p, 0.05) == 2  # the first hypothesis counts as rejected whatever its p-value
    assert fixed_sequence(torch.tensor([1.0, 0.0, 0.0]), 0.05) == 2
    assert fixed_sequence(torch.tensor([1.0, 0.5]), 0.05) == 0


def test_family_runs_from_exit_one_to_the_fitted_thresholds(synthetic_val):
    val = synthetic_val.subset(torch.arange(1000))
    policy = make_policy("maxprob").fit(val, 0.5)
    scores = policy.exit_scores(val)
    members, tilts = tilt_family(scores, policy.thresholds)
    costs = torch.stack([val.costs[assign_exits(scores, t)].mean() for t in members])
    assert tilts[0] == -math.inf and tilts[-1] == 0.0 and tilts == sorted(tilts)
    assert float(costs[0]) == pytest.approx(0.25) and torch.equal(members[-1], policy.thresholds)
    assert bool((costs[1:] >= costs[:-1] - 1e-3).all())  # cheapest first (up to rounding of the counts)


def test_search_is_certified_over_its_own_fits_at_lower_budgets(synthetic_val, synthetic_test, tmp_path):
    val = synthetic_val.subset(torch.arange(1200))
    fitted = make_policy("search", rounds=1, samples=2).fit(val, 0.5)
    members, budgets = refit_family(fitted, val)
    scores = fitted.exit_scores(val)
    costs = torch.stack([val.costs[assign_exits(scores, t)].mean() for t in members])
    assert budgets[0] == pytest.approx(0.25) and budgets[-1] == 0.5 and budgets == sorted(budgets)
    assert bool((costs <= torch.tensor(budgets, dtype=costs.dtype) + 1e-9).all())  # each fit meets its budget
    assert float(costs[0]) == pytest.approx(0.25) and torch.equal(members[-1], fitted.thresholds)

    policy = make_policy("search", rounds=1, samples=2).fit(synthetic_val, 0.5, confidence=0.95, seed=4)
    g = policy.guarantee
    assert g.method == REFIT_METHOD and g.log_tilt is None and 0.25 <= g.fitted_budget <= 0.5
    assert g.holdout_cost <= g.upper_bound <= 0.5
    assert BudgetGuarantee.from_record(json.loads(json.dumps(g.record()))) == g
    model = mlp_model()
    model.calibrate(model.collect([(torch.randn(300, D), torch.randint(C, (300,)))], progress=False, costs=[1, 2, 3]), 2,
                    policy="search", confidence=0.95, rounds=1, samples=2, progress=False)
    model.save_policy(tmp_path / "p.safetensors")
    assert model.load_policy(tmp_path / "p.safetensors").guarantee == model.policy.guarantee


def test_certification_covers_the_population_mean(one_thread):
    """The probability the guarantee is about: over holdout draws, for a policy fitted on one part.
    The 'population' is 20,000 samples; the fitted policy spends about the budget on it. The family is
    cut to its first member and every third of the 120 nearest the fit (any fixed, ordered family is
    valid)."""
    population = make_synthetic_outputs(20_000, seed=11)
    fit_part = make_synthetic_outputs(2000, seed=12)
    policy = make_policy("maxprob").fit(fit_part, 0.5)
    members, _ = tilt_family(policy.exit_scores(fit_part), policy.thresholds)
    members = members[:1] + members[-120::3]
    scores = policy.exit_scores(population)
    spent = torch.stack([population.costs[assign_exits(scores, t)] for t in members])  # [J, 20000]
    true_cost = spent.mean(1)
    g = torch.Generator().manual_seed(13)
    chosen_costs = []
    for _ in range(200):
        holdout = torch.randint(population.num_samples, (1000,), generator=g)
        p = betting_pvalues((spent[:, holdout] - 0.25) / 0.75, (0.5 - 0.25) / 0.75, 0.05)
        chosen_costs.append(float(true_cost[fixed_sequence(p, 0.05)]))
    chosen = torch.tensor(chosen_costs)
    assert float(true_cost[-1]) > 0.49  # without certification the budget would be at risk
    assert float((chosen <= 0.5).double().mean()) >= 0.95
    assert float(chosen.mean()) > 0.46  # and the certified thresholds still spend most of it


@pytest.mark.slow
def test_certified_fits_keep_the_test_cost_within_the_budget():
    """End to end: random validation/test splits of the tests' synthetic outputs; the uncertified
    fit overspends on about half of them."""
    val, test = make_synthetic_outputs(4000, seed=1), make_synthetic_outputs(4000, seed=2)
    scores = torch.cat([val.logits, test.logits], 1)
    pool = type(val)(scores, torch.cat([val.labels, test.labels]), val.costs)
    within, plain_within = [], []
    for split in range(40):
        perm = torch.randperm(8000, generator=torch.Generator().manual_seed(split))
        v, t = pool.subset(perm[:4000]), pool.subset(perm[4000:])
        within.append(evaluate(make_policy("maxprob").fit(v, 0.5, confidence=0.95, seed=split), t).avg_cost <= 0.5)
        plain_within.append(evaluate(make_policy("maxprob").fit(v, 0.5), t).avg_cost <= 0.5)
    assert sum(within) >= 37 and sum(plain_within) <= 30


def test_guarantee_fields(synthetic_val, synthetic_test):
    policy = make_policy("maxprob").fit(synthetic_val, "0.5x", confidence=0.9, holdout=0.4, seed=3)
    g = policy.guarantee
    assert (g.confidence, g.n_fit, g.n_holdout) == (0.9, 2400, 1600)
    assert g.holdout_cost <= g.upper_bound <= policy.budget
    assert -1 < g.log_tilt < 0 and "exchangeable" in g.assumptions
    assert BudgetGuarantee.from_record(json.loads(json.dumps(g.record()))) == g
    again = make_policy("maxprob").fit(synthetic_val, "0.5x", confidence=0.9, holdout=0.4, seed=3)
    assert torch.equal(again.thresholds, policy.thresholds)  # the split is seeded
    record = evaluate(policy, synthetic_test).record()
    assert record["guarantee"] == g.record()
    table = format_table([{**record, "val_avg_cost": 0.5}])
    assert "confidence %" in table and " 90 |" in table


def test_without_confidence_nothing_changes(synthetic_val, synthetic_test):
    plain = make_policy("entropy").fit(synthetic_val, 0.6)
    explicit = make_policy("entropy").fit(synthetic_val, 0.6, confidence=None, holdout=0.3, seed=9)
    assert torch.equal(plain.thresholds, explicit.thresholds) and explicit.guarantee is None
    record = evaluate(explicit, synthetic_test).record()
    assert "guarantee" not in record
    assert "confidence" not in format_table([{**record, "val_avg_cost": 0.5}])


def test_a_tiny_holdout_certifies_only_the_first_exit(synthetic_val):
    small = synthetic_val.subset(torch.arange(8))  # 4 samples cannot make a bettor's capital grow 20-fold
    policy = make_policy("maxprob").fit(small, 0.6, confidence=0.95)
    assert policy.guarantee.log_tilt == -math.inf and policy.guarantee.upper_bound == pytest.approx(0.25)
    assert policy.guarantee.record()["log_tilt"] == "-inf"
    assert bool((assign_exits(policy.exit_scores(small), policy.thresholds) == 0).all())


def test_every_policy_can_be_certified(synthetic_val):
    small = synthetic_val.subset(torch.arange(600))
    for name, options in [("patience", {}), ("search", {"rounds": 1, "samples": 2}),
                          ("eenet", {"epochs": 1, "restarts": 0, "progress": False})]:
        policy = make_policy(name, **options).fit(small, 0.6, confidence=0.95)
        assert policy.guarantee.n_holdout == 300 and policy.guarantee.upper_bound <= 0.6
    oracle = make_policy("oracle").fit(small, 0.6, confidence=0.95)
    assert oracle.guarantee.method == "by construction" and oracle.guarantee.n_holdout == 0


@pytest.mark.parametrize("kwargs, message", [
    ({"confidence": 1.0}, "strictly between 0 and 1"),
    ({"confidence": 0.9, "holdout": 0.0}, "holdout must be a fraction"),
])
def test_bad_settings_are_explained(synthetic_val, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_policy("maxprob").fit(synthetic_val, 0.5, **kwargs)
    with pytest.raises(ValueError, match="both need samples"):
        split_outputs(synthetic_val.subset(torch.arange(1)), 0.5, 0)


def test_saved_policy_keeps_its_guarantee(tmp_path):
    model = mlp_model()
    g = torch.Generator().manual_seed(0)
    outputs = ExitOutputs(torch.stack(model.all_exits(torch.randn(400, D, generator=g))),
                          torch.randint(C, (400,), generator=g), [1.0, 2.0, 3.0])
    policy = model.calibrate(outputs, 2.0, "maxprob", confidence=0.9)
    assert policy.guarantee is not None and policy.guarantee.upper_bound <= 2.0
    model.save_policy(tmp_path / "p.safetensors")
    assert mlp_model().load_policy(tmp_path / "p.safetensors").guarantee == policy.guarantee
    model.calibrate(outputs, 2.0, "maxprob")
    model.save_policy(tmp_path / "q.safetensors")
    assert mlp_model().load_policy(tmp_path / "q.safetensors").guarantee is None


def test_cli_prints_the_promise(tmp_path):
    make_synthetic_outputs(1500, seed=1).save(tmp_path / "val.npz")
    make_synthetic_outputs(1500, seed=2).save(tmp_path / "test.npz")
    args = ["evaluate", "--val", str(tmp_path / "val.npz"), "--test", str(tmp_path / "test.npz"),
            "--budget", "0.5", "--policy", "maxprob", "--confidence", "0.95"]
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    (record,) = json.loads(result.output)
    assert record["guarantee"]["confidence"] == 0.95 and record["guarantee"]["upper_bound"] <= 0.5
    table = CliRunner().invoke(main, args)
    assert "certified at 95% confidence" in table.output and "exchangeable" in table.output
    bad = CliRunner().invoke(main, [*args[:-1], "1.5"])
    assert bad.exit_code != 0 and "1.5" in bad.output


def test_report_states_the_promise(tmp_path):
    pytest.importorskip("matplotlib", reason="the report needs pip install 'eenet-fast[report]'")
    make_synthetic_outputs(1500, seed=1).save(tmp_path / "val.npz")
    make_synthetic_outputs(1500, seed=2).save(tmp_path / "test.npz")
    result = CliRunner().invoke(main, ["report", "--val", str(tmp_path / "val.npz"), "--test", str(tmp_path / "test.npz"),
                                       "--out", str(tmp_path / "r"), "--budget", "0.5", "--policy", "maxprob",
                                       "--confidence", "0.9"])
    assert result.exit_code == 0, result.output
    assert "confidence %" in (tmp_path / "r" / "table.md").read_text()
    page = (tmp_path / "r" / "index.html").read_text()
    assert "certified at 90% confidence" in page and "exchangeable" in page
    (record,) = json.loads((tmp_path / "r" / "report.json").read_text())["records"]
    assert record["guarantee"]["confidence"] == 0.9
