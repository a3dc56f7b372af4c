"""calibrate() and collect(): costs, the policy installed, the surprises a user met."""

import copy
import dataclasses
import math
import warnings

import pytest
import torch
from model_utils import C, D, mlp_model

from eenet_fast.errors import BudgetError
from eenet_fast.outputs import ExitOutputs
from eenet_fast.wrapping import wrap
from eenet_fast.zoo import MultiExitCNN


def test_oracle_cannot_be_installed():
    model = mlp_model()
    outputs = ExitOutputs(torch.stack(model.all_exits(torch.randn(20, D))), torch.randint(C, (20,)), [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="needs labels at inference"):
        model.calibrate(outputs, 2.0, policy="oracle")


def test_latency_calibration_fits_the_time_model_of_the_serving_batch():
    model = wrap(MultiExitCNN(widths=(4, 8, 8))).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 28, 28, generator=g)
    outputs = ExitOutputs(torch.stack(model.all_exits(x)), torch.randint(10, (64,), generator=g))
    with pytest.raises(ValueError, match="needs example="):
        model.calibrate(outputs, 0.5, "maxprob", costs="latency")
    with pytest.raises(ValueError, match="needs costs='latency'"):
        model.calibrate(outputs, 0.5, "maxprob", costs=[1.0, 2.0, 3.0], batch_size=8)
    with pytest.raises(BudgetError, match="cannot be met at batch size 16.*Smallest feasible budget by batch size \\(measured in whole forwards\\): 1: "):
        model.calibrate(outputs, 0.001, "maxprob", costs="latency", example=x[:8], batch_size=16, progress=False)
    # a tiny model's exits cost more than its stages: a budget of three full models is always feasible
    policy = model.calibrate(outputs, 3.0, "maxprob", costs="latency", example=x[:8], batch_size=16, progress=False)
    assert policy.latency is not None and policy.latency.batch_sizes == (1, 2, 4, 8, 16)
    costs = policy.costs.tolist()
    assert all(a <= b for a, b in zip(costs, costs[1:])) and policy.budget == 3.0
    assert model(x).exits.shape == (64,)


def _loader(model, n=96, batch=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    y = torch.randint(C, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def test_a_generator_is_read_once_and_progress_false_reaches_a_policy_without_a_bar():
    model = mlp_model()
    batches = _loader(model)
    policy = model.calibrate((b for b in batches), "0.6x", "maxprob", costs=[1.0, 2.0, 3.0], progress=False)
    assert policy.budget == pytest.approx(1.8)  # a fraction of the last exit's cost
    assert model.policy is policy
    assert model.calibrate(iter(batches), 2.0, "eenet", costs=[1.0, 2.0, 3.0], progress=False, epochs=1).budget == 2.0


def test_cached_outputs_keep_their_costs_unless_told_and_latency_needs_an_example():
    model = mlp_model()
    outputs = model.collect(_loader(model), progress=False, costs=[1.0, 2.0, 4.0])
    assert model.calibrate(outputs, 2.0, "maxprob").costs.tolist() == [1.0, 2.0, 4.0]
    assert model.calibrate(outputs, 2.0, "maxprob", costs=[1.0, 3.0, 5.0]).costs.tolist() == [1.0, 3.0, 5.0]
    with pytest.raises(ValueError, match="needs example="):
        model.calibrate(outputs, 0.5, "maxprob", costs="flops")
    with pytest.raises(ValueError, match="hold no costs"):
        model.calibrate(ExitOutputs(outputs.logits, outputs.labels), 0.5, "maxprob")


def test_an_unreachable_budget_names_the_smallest_reachable_one():
    model = mlp_model()
    with pytest.raises(ValueError, match="smallest feasible budget is 1"):
        model.calibrate(_loader(model), 0.5, "maxprob", costs=[1.0, 2.0, 3.0], progress=False)


@pytest.mark.parametrize(
    "budget, options, error",
    [("half", {}, "cannot read budget 'half'"), (0.5, {"epochs": -1}, "epochs must be an integer >= 0")],
)
def test_a_bad_budget_or_option_fails_before_the_loader_is_read(budget, options, error):
    model = mlp_model()

    def loader():
        raise AssertionError("the loader was read before the budget and the options were checked")
        yield

    with pytest.raises(ValueError, match=error):
        model.calibrate(loader(), budget, **options)


def test_calibrate_is_a_function_beside_fit_exits_and_the_method_is_its_alias():
    import eenet_fast

    model = mlp_model()
    outputs = model.collect(_loader(model), progress=False, costs=[1.0, 2.0, 3.0])
    by_function = eenet_fast.calibrate(model, outputs, 2.0, "maxprob")
    assert model.policy is by_function
    by_method = model.calibrate(outputs, 2.0, "maxprob")
    assert torch.equal(by_function.thresholds, by_method.thresholds)


def test_a_time_policy_starved_by_dear_measured_costs_is_not_installed_silently(monkeypatch):
    from eenet_fast import calibration, make_policy
    from eenet_fast.timing import LatencyModel

    labels = torch.tensor([0] * 50 + [1] * 50)
    first = torch.tensor([[5.0, 0.0]] * 50 + [[0.1, 0.0]] * 50)  # right and sure, or wrong and unsure
    outputs = ExitOutputs(torch.stack([first, 5.0 * torch.nn.functional.one_hot(labels, 2).float()]), labels, [0.9, 1.8])
    policy = make_policy("maxprob").fit(outputs, 1.0)
    latency = LatencyModel((1,), torch.tensor([[0.9], [0.9]], dtype=torch.float64), torch.ones(1, dtype=torch.float64), torch.zeros(3, 1))
    monkeypatch.setattr(calibration, "measure_costs", lambda model, spec, example: [0.1, 1.0])
    with pytest.warns(UserWarning, match=r"points less accurate than the full model.*FLOPs \[0\.1, 1\.0\].*was not busy"):
        calibration.warn_if_starved(policy, outputs, latency, None, None)
    busy = dataclasses.replace(latency, cpu_share=0.5)  # the timing thread ran half the time: the advice differs
    with pytest.warns(UserWarning, match=r"was busy while timing \(the timing thread ran 50 % .*calibrate again when it is quiet"):
        calibration.warn_if_starved(policy, outputs, busy, None, None)
    monkeypatch.setattr(calibration, "measure_costs", lambda model, spec, example: [0.9, 2.0])  # FLOPs agree: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibration.warn_if_starved(policy, outputs, latency, None, None)


def test_evaluate_and_the_table_show_what_a_time_budget_predicts():
    from eenet_fast import evaluate, make_policy
    from eenet_fast.evaluate import format_table
    from eenet_fast.synthetic import make_synthetic_outputs
    from eenet_fast.timing import LatencyModel

    outputs = make_synthetic_outputs(200, num_exits=2, seed=0)
    policy = make_policy("maxprob").fit(outputs.with_costs([0.4, 1.1]), 0.7)
    assert "time" not in evaluate(policy, outputs).record()
    exit_times = torch.tensor([[0.4, 0.8], [0.6, 1.2]], dtype=torch.float64)
    policy.latency = LatencyModel((1, 2), exit_times, torch.tensor([1.0, 2.0], dtype=torch.float64), torch.zeros(3, 2))
    result = evaluate(policy, outputs)
    reach = [1.0, float((result.exits >= 1).double().mean())]
    assert result.time == {"batch_size": 2, "predicted_time_share": pytest.approx(policy.latency.predicted_fraction(reach)),
                           "smallest_budget": pytest.approx(0.4), "correction": 1.0, "first_correction": 1.0,
                           "compact_after": None}
    table = format_table([result.record() | {"val_avg_cost": 0.7}])
    assert "predicted time share" in table and f"{result.time['predicted_time_share']:.3f}" in table


def test_a_time_budget_retimed_with_a_dearer_decision_never_aims_below_its_new_floor(monkeypatch):
    """Timed again with the fitted policy's own (dearer) decision, the first exit costs more: while
    the prediction overshoots, the lowered target stops at that new floor, not at the first timing's
    (below it no policy exists, and the fit raised a BudgetError)."""
    from eenet_fast import calibration
    from eenet_fast.timing import LatencyModel

    class Overshooting(LatencyModel):
        def predicted_fraction(self, reach, n=None, plan=None):  # whatever the policy: the target keeps being lowered
            return 0.95 if len(reach) > 1 else super().predicted_fraction(reach, n, plan)  # (the floor as timed)

    model = wrap(MultiExitCNN(widths=(4, 8))).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 28, 28, generator=g)
    outputs = ExitOutputs(torch.stack(model.all_exits(x)), torch.randint(10, (64,), generator=g))
    full, spread = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.zeros(3, 2)
    cheap = LatencyModel((1, 2), torch.tensor([[0.3, 0.6], [0.3, 0.6]], dtype=torch.float64), full, spread)  # floor 0.3
    dear = Overshooting((1, 2), torch.tensor([[0.45, 0.9], [0.6, 1.2]], dtype=torch.float64), full, spread)  # floor 0.45
    timings = iter([cheap, dear])
    monkeypatch.setattr(calibration, "time_exits", lambda *args, **kwargs: next(timings))
    monkeypatch.setattr(calibration, "decision_times", lambda model, policy, sizes, classes: torch.full(
        (2, len(sizes)), 0.0 if policy.name == "maxprob" else 1.0, dtype=torch.float64))
    monkeypatch.setattr(calibration, "measure_shares", lambda model, policies, example, n, rounds, threads: (
        [[0.45 if _leaves_first(p) else 0.95] * rounds for p in policies], [[1.0, 0.0] for _ in policies]))
    monkeypatch.setattr(calibration, "warn_if_starved", lambda *args: None)
    policy = model.calibrate(outputs, 0.5, "entropy", costs="latency", example=x[:2], batch_size=2, progress=False)
    assert torch.equal(policy.latency.exit_times, dear.exit_times)  # timed again with the dearer decision
    assert policy.budget == 0.5
    assert (policy.assign(outputs) == 0).all()  # the floor: every sample at the first exit


def _leaves_first(policy) -> bool:
    return bool(torch.isinf(policy.thresholds).all() and (policy.thresholds < 0).all())


def _time_budget_setup(monkeypatch, floor: float):
    """A small model and outputs whose calibration for a time budget runs on a fixed ladder
    (floor 0.3 at batch 2) and forwards measured at ``floor`` when every sample leaves first (at
    batch 1, by :func:`~eenet_fast.timing.measure_floors`: ``floor / 1``; patched apart so the two
    measurements can be told apart)."""
    from eenet_fast import calibration, timing
    from eenet_fast.timing import LatencyModel

    model = wrap(MultiExitCNN(widths=(4, 8))).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 28, 28, generator=g)
    outputs = ExitOutputs(torch.stack(model.all_exits(x)), torch.randint(10, (64,), generator=g))
    latency = LatencyModel((1, 2), torch.tensor([[0.3, 0.6], [0.6, 1.2]], dtype=torch.float64),
                           torch.tensor([1.0, 2.0], dtype=torch.float64), torch.zeros(3, 2))
    monkeypatch.setattr(calibration, "time_exits", lambda *args, **kwargs: latency)
    monkeypatch.setattr(calibration, "decision_times", lambda model, policy, sizes, classes: torch.zeros(2, len(sizes), dtype=torch.float64))
    measured = lambda model, policies, example, n, rounds, threads: (  # noqa: E731
        [[floor / n if _leaves_first(p) else 0.6] * rounds for p in policies], [[1.0, 0.5] for _ in policies])
    monkeypatch.setattr(calibration, "measure_shares", lambda model, policies, example, n, rounds, threads: (
        [[floor if _leaves_first(p) else 0.6] * rounds for p in policies], [[1.0, 0.5] for _ in policies]))
    monkeypatch.setattr(timing, "measure_shares", measured)  # the floors below the serving batch: floor / n
    monkeypatch.setattr(calibration, "warn_if_starved", lambda *args: None)
    return model, outputs, x[:2]


def test_whether_a_time_budget_can_be_met_is_decided_on_the_measured_floor(monkeypatch):
    """The ladder puts every-sample-at-exit-1 at 0.3 of the full model's time; measured end to end
    it takes 0.45: a budget of 0.4 is refused with 0.45 as the smallest feasible, and a feasible
    fit prices the first exit at the measured floor."""
    from eenet_fast.errors import BudgetError

    model, outputs, example = _time_budget_setup(monkeypatch, floor=0.45)
    with pytest.raises(BudgetError, match="takes 0.450 of the full model's time") as refused:
        model.calibrate(outputs, 0.4, "maxprob", costs="latency", example=example, batch_size=2, progress=False)
    assert refused.value.smallest_feasible == pytest.approx(0.45)
    # the error's table: batch 1's floor measured in whole forwards too, not the ladder's 0.3 corrected
    assert "by batch size (measured in whole forwards): 1: 0.450, 2: 0.450" in str(refused.value)
    policy = model.calibrate(outputs, 0.6, "maxprob", costs="latency", example=example, batch_size=2, progress=False)
    assert policy.latency.smallest_budgets()[2] == pytest.approx(0.45, rel=0.03)


@pytest.mark.parametrize("second_error, calls_expected", [(0.01, [1.0, 1.5]), (-0.1, [1.0, 1.5, 1.2])])
def test_the_refit_policy_is_measured_again_and_corrected_once_more_if_it_missed(monkeypatch, second_error, calls_expected):
    """The first measurement corrects the model (factors 1.0 / 1.5) and the policy is refit; the
    refit policy is measured once more: within 3 % of the budget of the prediction it stays (the
    first factors kept), else the second measurement's factors (0.9 / 1.2) replace them, the fits
    are repeated, and that policy is measured a third time (only measured: no further correction)."""
    from eenet_fast import calibration

    model, outputs, example = _time_budget_setup(monkeypatch, floor=0.3)
    measured = iter([(1.0, 1.5, 0.2, 0.6, 0.0), (0.9, 1.2, second_error, 0.6, 0.0), (0.8, 1.1, 0.1, 0.6, 0.0)])
    calls = []

    def corrections(model, policy, example, latency):
        calls.append(latency.correction)
        return next(measured)

    monkeypatch.setattr(calibration, "_corrections", corrections)
    policy = model.calibrate(outputs, 0.6, "maxprob", costs="latency", example=example, batch_size=2, progress=False)
    assert calls == calls_expected
    kept = abs(second_error) <= 0.03 * 0.6
    assert (policy.latency.first_factor, policy.latency.correction) == ((1.0, 1.5) if kept else (0.9, 1.2))


def test_a_refit_policy_measured_over_the_budget_gives_way_to_a_measured_one_within_it(monkeypatch):
    """Measured on the example, the first policy spends 0.55 of the full model's time (budget 0.6);
    the corrections move the refit policies to 0.66 and then 0.70: the first one is installed, with
    the time model it was fitted on (factors 1.0 / 1.0), and the budget asked."""
    from eenet_fast import calibration

    model, outputs, example = _time_budget_setup(monkeypatch, floor=0.3)
    measured = iter([(1.0, 1.5, -0.05, 0.55, 0.0), (0.9, 1.2, 0.06, 0.66, 0.0), (0.9, 1.2, 0.1, 0.70, 0.01)])
    installed = []
    monkeypatch.setattr(calibration, "_corrections", lambda model, policy, example, latency: (installed.append(policy), next(measured))[1])
    policy = model.calibrate(outputs, 0.6, "maxprob", costs="latency", example=example, batch_size=2, progress=False)
    assert len(installed) == 3 and policy is installed[0]
    assert (policy.latency.first_factor, policy.latency.correction) == (1.0, 1.0) and policy.budget == 0.6


def test_the_most_accurate_measured_policy_within_the_budget_is_installed_and_none_within_warns():
    from eenet_fast import calibration, make_policy
    from eenet_fast.timing import LatencyModel

    labels = torch.zeros(100, dtype=torch.long)
    first = torch.tensor([[5.0, 0.0]] * 50 + [[0.0, 0.1]] * 50)  # wrong and unsure on half
    outputs = ExitOutputs(torch.stack([first, torch.tensor([[5.0, 0.0]] * 100)]), labels, [0.3, 1.0])
    at_first, at_last = (make_policy("maxprob").fit(outputs, 0.3) for _ in range(2))
    at_last.thresholds = torch.tensor([math.inf, -math.inf])  # nobody leaves at exit 0
    assert (at_first.assign(outputs) == 0).all() and (at_last.assign(outputs) == 1).all()
    latency = LatencyModel((1, 2), torch.tensor([[0.3, 0.6], [0.6, 1.2]], dtype=torch.float64),
                           torch.tensor([1.0, 2.0], dtype=torch.float64), torch.zeros(3, 2))
    final = copy.deepcopy(at_first)
    measured = [(0.50, 0.0, at_first, latency), (0.62, 0.0, at_last, latency.corrected(1.1)), (0.90, 0.01, final, latency.corrected(0.8))]
    policy, chosen = calibration._within_measured(measured, outputs, 0.6)  # 0.62 is within 5 % of 0.6
    assert policy is at_last and chosen.correction == 1.1
    assert calibration._within_measured(measured[:1] + measured[2:], outputs, 0.6)[0] is at_first
    assert calibration._within_measured(measured[2:], outputs, 1.0)[0] is final  # the last one within: it stays
    with pytest.warns(UserWarning, match="cheapest took 0.620"):
        assert calibration._within_measured(measured[1:], outputs, 0.5)[0] is at_last
    # a reading over the budget by less than twice the noise of its median does not count
    noisy = [(0.50, 0.0, at_first, latency), (0.90, 0.15, final, latency)]  # 0.90 - 2 x 0.15 <= 1.05 x 0.6
    assert calibration._within_measured(noisy, outputs, 0.6)[0] is final


def test_the_exit_mix_of_a_time_budget_is_chosen_on_the_time_model_not_one_reach_price():
    """A stage with a large fixed time per call looks dear per sample to a policy that sends it few
    samples; judged at each candidate mix's own reach, the mix that spends the budget on the unsure
    samples wins (here: every unsure sample to the last exit, every answer right)."""
    from eenet_fast import calibration, make_policy
    from eenet_fast.timing import LatencyModel

    labels = torch.tensor([0] * 50 + [1] * 50)
    first = torch.tensor([[5.0, 0.0]] * 50 + [[0.1, 0.0]] * 50)  # right and sure, or wrong and unsure
    outputs = ExitOutputs(torch.stack([first, 5.0 * torch.nn.functional.one_hot(labels, 2).float()]), labels, [0.3, 1.0])
    starved = make_policy("maxprob").fit(outputs, 0.3)  # every sample at the first exit: half of them wrong
    assert (starved.assign(outputs) == 0).all()
    sizes = (1, 2, 4, 8, 16)
    steps = torch.tensor([[0.3 * m for m in sizes], [4.0 + 0.5 * m for m in sizes]], dtype=torch.float64)  # stage 1: 4 per call
    latency = LatencyModel(sizes, steps, torch.tensor([float(m) for m in sizes], dtype=torch.float64), torch.zeros(3, 5))
    assert latency.predicted_fraction([1.0, 1.0]) > 0.8 >= latency.predicted_fraction([1.0, 0.5])  # half may go on
    reach = calibration._most_accurate_in_time(starved, outputs, latency, 0.8)
    exits = starved.assign(outputs)
    assert reach == [1.0, 0.5] and (exits == torch.tensor([0] * 50 + [1] * 50)).all()
    average = float(starved.costs.double()[exits].mean())  # the new costs price the time model at this reach
    assert average == pytest.approx(latency.predicted_fraction(reach)) and average <= 0.8 * 1.01


def test_the_exit_mix_of_a_time_budget_spends_the_budget_among_mixes_as_accurate_within_noise():
    """The first exit is right on all 100 samples, 20 of them unsure. With the last exit wrong on 1
    of those 20, sending them on is as accurate within the noise of a paired comparison: the mix
    that spends the budget is chosen. Wrong on 10 of them, the cheaper mix wins."""
    from eenet_fast import calibration, make_policy
    from eenet_fast.timing import LatencyModel

    sizes = (1, 2, 4)
    steps = torch.tensor([[0.3 * m for m in sizes], [0.7 * m for m in sizes]], dtype=torch.float64)
    latency = LatencyModel(sizes, steps, torch.tensor([float(m) for m in sizes], dtype=torch.float64), torch.zeros(3, 3))
    first = torch.tensor([[5.0, 0.0]] * 80 + [[0.1, 0.0]] * 20)  # every sample right, the last 20 unsure
    for wrong_later, runs_on in ((1, True), (10, False)):
        last = torch.tensor([[5.0, 0.0]] * (100 - wrong_later) + [[0.0, 5.0]] * wrong_later)
        outputs = ExitOutputs(torch.stack([first, last]), torch.zeros(100, dtype=torch.long), [0.3, 1.0])
        policy = make_policy("maxprob").fit(outputs, 0.3)
        assert (policy.assign(outputs) == 0).all()
        reach = calibration._most_accurate_in_time(policy, outputs, latency, 1.0)
        assert (reach[1] >= 0.2) is runs_on, (wrong_later, reach)


def test_tied_is_a_paired_comparison_within_one_standard_deviation():
    from eenet_fast.calibration import _tied

    best = torch.tensor([1.0] * 10 + [0.0] * 90)
    assert _tied(best, best)
    one_less = best.clone(); one_less[0] = 0.0  # disagree on 1, one fewer right: 1 <= sqrt(1)
    assert _tied(best, one_less)
    two_less = best.clone(); two_less[:2] = 0.0  # 2 > sqrt(2)
    assert not _tied(best, two_less)
    swapped = best.clone(); swapped[:6] = 0.0; swapped[10:13] = 1.0  # disagree on 9, 3 fewer right: 3 <= sqrt(9)
    assert _tied(best, swapped)
