"""The budget controller: holds the running cost on a drift stream, stays in its bounds, says when it
cannot, and runs inside EarlyExitModel.forward."""

import math
import warnings

import pytest
import torch
from torch import nn

from eenet_fast import make_policy
from eenet_fast.control import BudgetController, BudgetInfeasibleWarning
from eenet_fast.drift import drift_stream, replay, running_mean
from eenet_fast.outputs import ExitOutputs
from eenet_fast.policies.thresholds import assign_exits
from eenet_fast.runtime import EarlyExitModel
from eenet_fast.synthetic import make_synthetic_outputs


@pytest.fixture(scope="module")
def skewed():
    """Validation and test outputs whose last classes are harder, and maxprob fitted for 0.5."""
    val = make_synthetic_outputs(2000, seed=1, class_skew=1.5)
    test = make_synthetic_outputs(2000, seed=2, class_skew=1.5)
    return val, test, make_policy("maxprob").fit(val, 0.5)


@pytest.fixture(scope="module")
def stream(skewed):
    return drift_stream(skewed[1], 12_000, seed=0)


def worst_deviation(costs: torch.Tensor, target: float, warmup: int = 1000, window: int = 2000) -> float:
    return float((running_mean(costs[warmup:], window) / target - 1).abs().max())


def test_controller_holds_the_cost_where_the_fixed_policy_drifts(skewed, stream):
    val, test, policy = skewed
    fixed = replay(policy, test, stream.indices)
    controller = BudgetController(policy, val, step=0.02)
    controlled = replay(policy, test, stream.indices, controller=controller)
    assert controller.target == pytest.approx(0.5, abs=1e-3)  # maxprob spends its budget on validation
    assert worst_deviation(fixed.costs, controller.target) > 0.1
    assert worst_deviation(controlled.costs, controller.target) < 0.03
    assert not controller.infeasible and controller.seen == len(stream)
    assert min(a.log_tilt for a in controller.log) < -0.2  # it did move, towards cheaper exits
    assert torch.equal(policy.thresholds, make_policy("maxprob").fit(val, 0.5).thresholds)  # policy untouched


def test_adjustments_stay_within_bounds_and_are_logged(skewed, stream):
    val, test, policy = skewed
    controller = BudgetController(policy, val, max_tilt=0.1, step=0.02, log_size=50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BudgetInfeasibleWarning)
        replay(policy, test, stream.indices, controller=controller)
    assert 0 < len(controller.log) <= 50
    assert all(-0.1 - 1e-9 <= a.log_tilt <= 0.1 + 1e-9 for a in controller.log)
    assert all(a.seen <= len(stream) for a in controller.log)
    table = {tuple(t.tolist()) for t in controller.table}
    assert tuple(controller.thresholds().tolist()) in table


def test_infeasible_budget_is_reported(skewed):
    val, test, policy = skewed
    hard = torch.nonzero(test.labels >= 7).squeeze(1).repeat(3)  # only the hardest classes, for a while
    controller = BudgetController(policy, val, max_tilt=0.1, step=0.02)
    with pytest.warns(BudgetInfeasibleWarning, match="cannot be held"):
        replay(policy, test, hard, controller=controller)
    assert controller.infeasible and any(a.infeasible for a in controller.log)
    assert controller.log_tilt == pytest.approx(-0.1)
    # the inputs ease: no wind-up, the controller leaves the bound within a few batches
    easy = torch.nonzero(test.labels <= 2).squeeze(1)[:640]
    replay(policy, test, easy, controller=controller)
    assert not controller.infeasible and controller.log_tilt > -0.1


def test_without_drift_the_controller_stays_near_the_policy(skewed):
    val, test, policy = skewed
    controller = BudgetController(policy, val, step=0.02)
    assert torch.equal(controller.thresholds(), policy.thresholds)  # before any batch: the policy itself
    order = torch.randperm(test.num_samples, generator=torch.Generator().manual_seed(0)).repeat(3)
    served = replay(policy, test, order, controller=controller)
    assert abs(float(served.costs.mean()) - controller.target) < 0.005
    assert max(abs(a.log_tilt) for a in controller.log) < 0.5


def test_bad_arguments_are_explained(skewed):
    val, _, policy = skewed
    with pytest.raises(ValueError, match="0 < gain < window"):
        BudgetController(policy, val, window=10, gain=20)
    with pytest.raises(ValueError, match="fitted, deployable"):
        BudgetController(make_policy("maxprob"), val)
    controller = BudgetController(policy, val, step=0.05)
    with pytest.raises(ValueError, match="exits must lie in"):
        controller.observe(torch.tensor([0, 4]))
    controller.observe(torch.empty(0, dtype=torch.long))  # an empty batch changes nothing
    assert controller.seen == 0 and math.isnan(controller.window_cost())


def test_runtime_forward_uses_and_feeds_the_controller():
    torch.manual_seed(0)
    dim, classes = 8, 10
    stages = [nn.Sequential(nn.Linear(dim, dim), nn.Tanh()) for _ in range(4)]
    heads = [nn.Linear(dim, classes) for _ in range(4)]
    model = EarlyExitModel(stages, heads, backend="torch").eval()
    x = torch.randn(512, dim)
    outputs = ExitOutputs(torch.stack(model.all_exits(x)), torch.randint(classes, (512,)), [1.0, 2.0, 3.0, 4.0])
    model.calibrate(outputs, 2.0, policy="maxprob")
    model.controller = BudgetController(model.policy, outputs, step=0.05, window=100, gain=50)
    reference = BudgetController(model.policy, outputs, step=0.05, window=100, gain=50)
    scores = model.policy.exit_scores(outputs)
    hard = x[scores[0] < scores[0].median()]  # the samples the first exit is least sure of
    for batch in hard.split(64):
        thresholds = reference.thresholds()
        result = model(batch)
        expected = assign_exits(model.policy.exit_scores(ExitOutputs(torch.stack(model.all_exits(batch)))), thresholds)
        assert torch.equal(result.exits, expected)
        reference.observe(result.exits)
    assert model.controller.seen == hard.shape[0] and model.controller.log_tilt == reference.log_tilt < 0
    model.calibrate(outputs, 3.0, policy="maxprob")
    with pytest.raises(RuntimeError, match="built for another policy"):
        model(x[:4])
