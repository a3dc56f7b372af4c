"""The time model of a time budget: the ladder, the interpolated steps, the linearised costs, the timing."""

import copy
import math
from dataclasses import replace
import sys
import time

import pytest
import torch

from eenet_fast.errors import InputError
from eenet_fast.threads import torch_threads
from eenet_fast.timing import LatencyModel, clock, decision_times, ladder, measure_shares, time_exits
from eenet_fast.wrapping import wrap
from eenet_fast.zoo import MultiExitCNN
from eenet_fast import make_policy


def _model(exit_times, full_times, sizes=(1, 2, 4, 8)):
    exit_times = torch.tensor(exit_times, dtype=torch.float64)
    return LatencyModel(tuple(sizes), exit_times, torch.tensor(full_times, dtype=torch.float64), torch.zeros(len(exit_times) + 1, len(sizes)))


def test_the_ladder_doubles_up_to_the_serving_batch():
    assert ladder(1) == (1,) and ladder(8) == (1, 2, 4, 8) and ladder(10) == (1, 2, 4, 8, 10)
    with pytest.raises(InputError, match="positive"):
        ladder(0)


def test_costs_price_each_stage_at_the_rows_that_reach_it():
    # t_k(m) = a_k + b_k m: a policy with the reach priced at has its predicted time share as average cost
    a, b, sizes = [3.0, 2.0, 1.0], [1.0, 2.0, 4.0], (1, 2, 4, 8)
    exit_times = [[a[k] + b[k] * m for m in sizes] for k in range(3)]
    full = [10.0 + 6.0 * m for m in sizes]
    model = _model(exit_times, full)
    n = 8
    costs = model.costs([1.0, 0.5, 0.25], n)
    fixed = 3 + 1 * 8 + 2 + 1  # stage 0 on all 8 rows, and the fixed parts of stages 1 and 2
    assert costs == pytest.approx([(fixed + n * s) / (10 + 6 * n) for s in (0.0, 2.0, 6.0)])
    average = model.costs([1.0, 0.5, 0.25], n, marginal=False)  # each stage at its average over 8, 4, 2 rows
    per_sample = [(3 + 1 * 8) / 8, (2 + 2 * 4) / 4, (1 + 4 * 2) / 2]
    assert average == pytest.approx([n * sum(per_sample[: k + 1]) / (10 + 6 * n) for k in range(3)])
    assert average[0] == pytest.approx(model.smallest_budgets()[8])
    # a mix of exits whose reach is inside the linearised segments: mean cost = predicted time share
    exits = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    reach = [float((exits >= k).double().mean()) for k in range(3)]
    assert float(torch.tensor(costs)[exits].mean()) == pytest.approx(model.predicted_fraction(reach, n))
    assert float(torch.tensor(average)[exits].mean()) == pytest.approx(model.predicted_fraction(reach, n))


def test_batch_of_one_charges_each_stage_only_to_the_samples_that_reach_it():
    model = _model([[4.0], [3.0], [3.0]], [8.0], sizes=(1,))
    assert model.costs(n=1) == pytest.approx([0.5, 7 / 8, 10 / 8])  # whatever the reach linearised around
    assert model.costs([1.0, 0.9, 0.9], 1) == pytest.approx([0.5, 7 / 8, 10 / 8])
    assert model.smallest_budgets() == {1: 0.5}


def test_times_are_interpolated_non_decreasing_and_zero_for_no_rows():
    model = _model([[1.0, 3.0, 2.0, 6.0]], [1.0, 2.0, 4.0, 8.0])  # a noisy dip at 4 rows
    assert model.exit_time(0, 0) == 0.0
    assert model.exit_time(0, 0.5) == pytest.approx(0.5)
    assert model.exit_time(0, 3) == pytest.approx(3.0) and model.exit_time(0, 4) == pytest.approx(3.0)
    assert model.exit_time(0, 6) == pytest.approx(4.5)
    assert model.full_time(16) == pytest.approx(16.0)  # beyond the ladder: the last segment


def test_a_correction_scales_every_step_and_its_costs():
    model = _model([[1.0, 2.0], [1.5, 2.5]], [2.0, 3.0], sizes=(1, 2))
    slower = model.corrected(1.5)
    assert slower.exit_time(1, 1.5) == pytest.approx(1.5 * model.exit_time(1, 1.5))
    assert slower.costs() == pytest.approx([1.5 * c for c in model.costs()])
    assert slower.predicted_fraction([1.0, 0.5]) == pytest.approx(1.5 * model.predicted_fraction([1.0, 0.5]))
    assert slower.with_extra(torch.zeros(2, 2)).correction == 1.5
    assert LatencyModel.from_record(slower.record()).correction == 1.5
    with pytest.raises(ValueError, match="correction must be a positive number"):
        model.corrected(float("nan"))


def test_the_first_exit_can_have_its_own_correction():
    model = _model([[1.0, 2.0], [1.5, 2.5]], [2.0, 3.0], sizes=(1, 2))
    two = model.corrected(1.5, first=0.8)
    assert two.exit_time(0, 2) == pytest.approx(0.8 * model.exit_time(0, 2))
    assert two.exit_time(1, 1.5) == pytest.approx(1.5 * model.exit_time(1, 1.5))
    assert two.smallest_budgets()[2] == pytest.approx(0.8 * model.smallest_budgets()[2])
    assert two.predicted_fraction([1.0, 0.5]) == pytest.approx(
        (0.8 * model.exit_time(0, 2) + 1.5 * model.exit_time(1, 1.0)) / model.full_time(2))
    again = LatencyModel.from_record(two.record())
    assert (again.first_correction, again.correction) == (0.8, 1.5) and again.costs() == two.costs()
    one = model.corrected(1.5)  # one factor for every step, as policy files written before the split read
    assert one.first_factor == 1.5 and LatencyModel.from_record(one.record()).first_correction is None
    old = {k: v for k, v in one.record().items() if k != "first_correction"}
    assert LatencyModel.from_record(old).exit_time(0, 2) == pytest.approx(1.5 * model.exit_time(0, 2))
    with pytest.raises(ValueError, match="correction must be a positive number"):
        model.corrected(1.0, first=0.0)


def test_corrections_solve_the_first_exit_and_the_later_ones_from_two_measured_shares(monkeypatch):
    from eenet_fast import calibration

    latency = _model([[1.0, 2.0], [1.0, 2.0]], [2.0, 4.0], sizes=(1, 2))  # at 2 rows: exit 1 is 1/2, stage 2 at 1 row 1/4
    policy = make_policy("maxprob")
    policy.thresholds = torch.tensor([0.5, -math.inf])

    # rounds disturbed by +-0.3 of the full model's time, alike for both forwards of a round
    disturbance = [0.0, 0.3, -0.3, 0.3, 0.0]

    def measured(model, policies, example, batch_size, rounds, threads):
        assert [math.isinf(float(p.thresholds[0])) for p in policies] == [False, True]
        # with the policy half run on (1 row, 1/4 of the full time) at twice the ladder's time; every
        # sample at exit 1: the ladder priced it 25 % high
        return [[0.4 + 2.0 * 0.25 + d for d in disturbance], [0.4 + d for d in disturbance]], [[1.0, 0.5], [1.0, 0.0]]

    def leaving_first(model, example, policy):
        copied = copy.deepcopy(policy)
        copied.thresholds = torch.full_like(policy.thresholds, -math.inf)
        return copied

    monkeypatch.setattr(calibration, "leaving_first", leaving_first)
    monkeypatch.setattr(calibration, "measure_shares", measured)
    first, rest, error, share, noise = calibration._corrections(None, policy, None, latency)
    assert share == pytest.approx(0.9)  # the policy's measured share, median over the rounds
    assert noise > 0.05  # rounds +-0.3 apart: the median is uncertain
    assert first == pytest.approx(0.8) and rest == pytest.approx(2.0)
    assert error == pytest.approx(0.9 - latency.predicted_fraction([1.0, 0.5]))  # measured less predicted
    assert latency.corrected(rest, first).predicted_fraction([1.0, 0.5]) == pytest.approx(0.9)

    # the later steps' share is the median of the two forwards' difference in each round (0.3, the
    # ladder's 0.25 x 1.2), not the difference of their medians (0.7 - 0.25 = 0.45)
    monkeypatch.setattr(calibration, "measure_shares", lambda *a: (
        [[0.7, 0.7, 0.7, 0.55, 0.55], [0.4, 0.4, 0.25, 0.25, 0.25]], [[1.0, 0.5], [1.0, 0.0]]))
    assert calibration._corrections(None, policy, None, latency)[1] == pytest.approx(1.2)
    corrected = latency.corrected(1.2, 1.0)  # the error is against the model as it stands
    assert calibration._corrections(None, policy, None, corrected)[2] == pytest.approx(0.7 - corrected.predicted_fraction([1.0, 0.5]))

    monkeypatch.setattr(calibration, "measure_shares", lambda *a: ([[0.6] * 5, [0.5] * 5], [[1.0, 0.01], [1.0, 0.0]]))
    assert calibration._corrections(None, policy, None, latency)[:2] == pytest.approx((1.2, 1.2), rel=0.02)  # too few run on
    assert calibration._corrections(None, policy, None, latency)[4] == 0.0  # equal rounds: no noise


def test_record_round_trip_and_bad_records():
    model = _model([[1.0, 2.0], [1.5, 2.5]], [2.0, 3.0], sizes=(1, 2))
    again = LatencyModel.from_record(model.record())
    assert again.batch_sizes == model.batch_sizes and torch.equal(again.exit_times, model.exit_times)
    assert again.costs() == model.costs()
    busy = LatencyModel.from_record({**model.record(), "threads": 2, "cpu_share": 0.5}).corrected(1.5)
    assert (busy.threads, busy.cpu_share, busy.correction) == (2, 0.5, 1.5)
    old = {k: v for k, v in model.record().items() if k != "cpu_share"}  # written before cpu_share was recorded
    assert LatencyModel.from_record(old).cpu_share == 1.0
    with pytest.raises(ValueError, match="increasing"):
        _model([[1.0, 2.0]], [2.0, 3.0], sizes=(2, 1))
    with pytest.raises(ValueError, match="full model's > 0"):
        _model([[1.0, 2.0]], [0.0, 3.0], sizes=(1, 2))
    with pytest.raises(ValueError, match="exit_times"):
        _model([[1.0, 2.0, 3.0]], [2.0, 3.0], sizes=(1, 2))
    with pytest.raises(InputError, match="one share per exit"):
        model.costs([1.0])
    with pytest.raises(ValueError, match="floors must pair timed batch sizes"):
        replace(model, floors=((4, 0.5),))
    with pytest.raises(ValueError, match="floors must pair timed batch sizes"):
        replace(model, floors=((1, math.nan),))


def test_time_exits_times_every_step_at_every_size():
    model = wrap(MultiExitCNN(widths=(4, 8, 8))).eval()
    latency = time_exits(model, torch.randn(3, 1, 28, 28), 6, rounds=2, progress=False)  # rows repeated up to 6
    assert latency.batch_sizes == (1, 2, 4, 6) and latency.exit_times.shape == (3, 4)
    # a later step is a difference of two timed forwards: on a busy machine a tiny one can read as 0
    assert (latency.exit_times[0] > 0).all() and (latency.exit_times >= 0).all()
    assert (latency.full_times > 0).all() and (latency.spread >= 0).all()
    compactions = latency.compact_times  # part of the steps, timed apart; none after the last exit
    assert compactions.shape == (3, 4) and (compactions >= 0).all() and (compactions[-1] == 0).all()
    assert (compactions <= latency.exit_times + 1e-12).all() and latency.compact_after is None
    costs = latency.costs()
    assert len(costs) == 3 and all(math.isfinite(c) and c > 0 for c in costs)
    assert all(a <= b for a, b in zip(costs, costs[1:]))
    with pytest.raises(RuntimeError, match="model.eval"):
        time_exits(model.train(), torch.randn(3, 1, 28, 28), progress=False)


def _with_gathers(gather_after_first: float) -> LatencyModel:
    """Three steps linear in their rows (1.0, 0.1 and 1.0 s per row, the first plus its gather),
    the full model 3 s per row; the gather after exit 1 costs ``gather_after_first`` s per row."""
    sizes = (1, 2, 4, 8)
    per_row = lambda rates: torch.tensor([[r * m for m in sizes] for r in rates], dtype=torch.float64)  # noqa: E731
    base = _model(per_row([1.0 + gather_after_first, 0.1, 1.0]).tolist(), [3.0 * m for m in sizes], sizes)
    return replace(base, compact_times=per_row([gather_after_first, 0.0, 0.0]))


def test_the_compaction_plan_lets_few_leaving_rows_ride_on_where_the_gather_costs_more():
    dear = _with_gathers(0.5)  # at batch 8: the gather after exit 1 costs 1 s per row kept, stage 2 0.1 s per row
    # 10 % leave at exit 1: gathering the other 90 % (7.2 s) costs more than running 10 % more rows in stage 2
    assert dear.plan([1.0, 0.9, 0.9]) == (False, True)
    assert dear.predicted_fraction([1.0, 0.9, 0.9]) == pytest.approx((8.0 + 0.8 + 7.2) / 24)
    assert dear.predicted_fraction([1.0, 0.9, 0.9], plan=(True, True)) == pytest.approx((8.0 + 7.2 + 0.72 + 7.2) / 24)
    assert dear.step_time(0, 8, 4) == pytest.approx(12.0)  # as timed: half of the rows gathered
    assert dear.smallest_budgets()[8] == pytest.approx(8.0 / 24)  # every sample leaving first: nothing to gather
    assert dear.costs()[0] == pytest.approx(8.0 / 24)  # and the first exit's cost in a fit is that floor
    cheap = _with_gathers(0.05)
    assert cheap.plan([1.0, 0.1, 0.1]) == (True, True)  # 90 % leave: gather the 10 %
    assert cheap.plan([1.0, 0.9, 0.9]) == (False, True)
    assert _model([[1.0] * 4] * 3, [3.0] * 4).plan([1.0, 0.9, 0.9]) == (True, True)  # gathers not timed apart
    planned = dear.planned([1.0, 0.9, 0.9])  # the runtime's plan, and the one predictions use
    assert planned.compact_after == (False, True)
    assert planned.predicted_fraction([1.0, 0.1, 0.1]) == pytest.approx(dear.predicted_fraction([1.0, 0.1, 0.1], plan=(False, True)))
    again = LatencyModel.from_record(planned.record())
    assert again.compact_after == (False, True) and torch.equal(again.compact_times, planned.compact_times)
    with pytest.raises(ValueError, match="compact_times"):
        replace(dear, compact_times=dear.compact_times[:2])
    with pytest.raises(ValueError, match="one compaction flag per exit"):
        replace(dear, compact_after=(True,))


def test_decision_times_cover_every_exit_and_size():
    model = wrap(MultiExitCNN(widths=(4, 8))).eval()
    times = decision_times(model, make_policy("maxprob"), (1, 4), 10, repeats=3)
    assert times.shape == (2, 2) and (times > 0).all()


def test_measure_shares_times_whole_forwards_in_paired_rounds_and_leaves_the_model_as_it_was():
    model = wrap(MultiExitCNN(widths=(4, 8))).eval()
    x = torch.randn(6, 1, 28, 28)
    outputs = model.collect([(x, torch.randint(10, (6,)))], progress=False)
    installed = make_policy("maxprob").fit(outputs.with_costs([0.5, 1.0]), 0.75)
    model.policy = installed
    every_at_first = make_policy("maxprob").fit(outputs.with_costs([0.5, 1.0]), 0.5)
    every_at_last = make_policy("maxprob").fit(outputs.with_costs([0.5, 1.0]), 1.0)
    every_at_last.thresholds[0] = math.inf
    shares, reaches = measure_shares(model, [every_at_first, every_at_last], x, 4, rounds=3)
    assert [len(s) for s in shares] == [3, 3] and all(v > 0 for s in shares for v in s)
    assert reaches == [[1.0, 0.0], [1.0, 1.0]]
    assert model.policy is installed and model.controller is None


def test_measure_floors_measures_the_floor_below_the_serving_batch_in_whole_forwards(monkeypatch):
    """Every size of the ladder below the serving one gets the median share of forwards in which
    every sample leaves at the first exit, on the model's threads and the policy's decision; the
    serving size keeps the corrected model's floor; the floors travel with the record."""
    from eenet_fast import timing

    model = wrap(MultiExitCNN(widths=(4, 8))).eval()
    x = torch.randn(16, 1, 28, 28)
    latency = replace(_model([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], [1.0, 2.0, 4.0], sizes=(1, 2, 4)), threads=2)
    calls = []

    def measured(model_, policies, example, n, rounds, threads):
        calls.append((n, rounds, threads, [float(t) for t in policies[0].thresholds], policies[0].name))
        return [[0.9 / n, 5.0, 0.8 / n][:rounds]], [[1.0, 0.0]]

    monkeypatch.setattr(timing, "measure_shares", measured)
    floors = timing.measure_floors(model, x, latency, make_policy("entropy"), rounds=3)
    assert [c[:3] for c in calls] == [(1, 3, 2), (2, 3, 2)]
    assert all(c[3] == [-math.inf, -math.inf] and c[4] == "entropy" for c in calls)
    assert floors.floors == ((1, 0.9), (2, 0.45))  # the medians
    assert floors.smallest_budgets() == {1: 0.9, 2: 0.45, 4: latency.smallest_budgets()[4]}
    assert latency.smallest_budgets()[1] == pytest.approx(1.0)  # the ladder's prediction, before
    assert LatencyModel.from_record(floors.record()).floors == floors.floors
    assert floors.corrected(1.5).floors == floors.floors
    # the real measurement on a tiny model: positive shares at every size below the serving one
    monkeypatch.undo()
    real = timing.measure_floors(model, x, replace(latency, threads=1), rounds=1)
    assert [n for n, _ in real.floors] == [1, 2] and all(share > 0 for _, share in real.floors)


def test_measure_shares_runs_an_example_larger_than_the_batch_in_distinct_batches():
    """At batch 8 an example of 40 rows is timed as 5 batches of its own rows: the reach is the
    policy's over all 40, not that of the first 8 repeated."""
    from eenet_fast import timing

    torch.manual_seed(0)
    model = wrap(MultiExitCNN(widths=(4, 8))).eval()
    x = torch.randn(40, 1, 28, 28)
    outputs = model.collect([(x, torch.randint(10, (40,)))], progress=False).with_costs([0.5, 1.0])
    policy = make_policy("maxprob").fit(outputs, 0.75)
    policy.thresholds[0] = outputs.features[0].max_score.median()  # about half the rows leave at exit 1
    model.policy = policy
    every = timing.reach(model(x).exits, 2)
    assert every != timing.reach(model(x[:8]).exits, 2)  # the first batch alone would give another reach
    _, reaches = measure_shares(model, [policy], x, 8, rounds=1)
    assert reaches == [every]
    assert len(timing._batches(x, 8)) == 5 and len(timing._batches(x, 64)) == 1  # fewer rows than the batch: repeated
    assert len(timing._batches(torch.randn(1000, 3), 1)) == timing.MEASURED_BATCHES


def test_a_timing_follows_untimed_calls_for_the_warmup(monkeypatch):
    """Adaptive forwards run slow for several calls after other work: the ladder's forwards and
    full passes and both sides of each measure_shares round are timed after WARMUP_SECONDS of the
    same calls; the compactions and the call count's probe are not warmed."""
    from types import SimpleNamespace

    from eenet_fast import timing

    wall, calls = [0.0], []

    def call():  # every call takes 3 ms on the fake clock
        calls.append(wall[0])
        wall[0] += 0.003

    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: wall[0]))
    seconds = timing._timed(call, 2, lambda: None, lambda: wall[0], warmup=0.02)
    assert len(calls) == 7 + 2 and seconds == pytest.approx(0.003)  # untimed from 0 to 18 ms, then two timed
    calls.clear()
    timing._timed(call, 2, lambda: None, lambda: wall[0])
    assert len(calls) == 1 + 2  # no warm-up asked: one untimed call

    monkeypatch.undo()
    warmups, timed = [], timing._timed
    monkeypatch.setattr(timing, "_timed", lambda *a, **k: warmups.append(a[4] if len(a) > 4 else 0.0) or timed(*a, **k))
    model = wrap(MultiExitCNN(widths=(4, 8))).eval()
    x = torch.randn(4, 1, 28, 28)
    model.policy = make_policy("maxprob").fit(model.collect([(x, torch.randint(10, (4,)))], progress=False).with_costs([0.5, 1.0]), 0.75)
    measure_shares(model, [model.policy], x, 4, rounds=2)
    warm = timing.WARMUP_SECONDS
    assert warm > 0 and warmups == [0.0] + [warm] * 4  # the call count's probe, then both sides of each round
    warmups.clear()
    with torch_threads(1):  # one thread: no second ladder when the machine is busy
        time_exits(model, x, 4, rounds=1, progress=False)
    per_size = [warm, warm, warm, 0.0]  # the forwards to exits 1 and 2, the full pass, the compaction
    assert warmups == per_size * (2 * len(ladder(4)))  # the warm-up round and one timed round, each size


def test_measure_shares_picks_its_clock_on_the_threads_it_times(monkeypatch):
    """On one thread of a busy machine the shares are timed on that thread's CPU time: the clock is
    chosen inside the thread setting, not on the caller's threads."""
    from eenet_fast import timing

    model = wrap(MultiExitCNN(widths=(4, 8))).eval()
    x = torch.randn(4, 1, 28, 28)
    model.policy = make_policy("maxprob").fit(model.collect([(x, torch.randint(10, (4,)))], progress=False).with_costs([0.5, 1.0]), 0.75)
    seen = []
    monkeypatch.setattr(timing, "clock", lambda device: seen.append(torch.get_num_threads()) or time.perf_counter)
    with torch_threads(2):
        measure_shares(model, [model.policy], x, 4, rounds=1, threads=1)
    assert seen == [1]


def test_a_superlinear_segment_is_priced_at_its_average_so_costs_stay_positive():
    # stage 1 jumps from 1 to 10 between 1 and 2 rows: its segment there has a negative fixed part
    model = _model([[10.0, 10.0], [1.0, 10.0]], [11.0, 12.0], sizes=(1, 2))
    costs = model.costs([1.0, 0.75], 2)
    assert costs[0] == pytest.approx(10 / 12) and costs[1] == pytest.approx((10 + 2 * model.exit_time(1, 1.5) / 1.5) / 12)


def test_a_busy_machine_is_timed_again_on_one_thread_with_a_warning(monkeypatch):
    from eenet_fast import timing

    calls = []

    def ladder_of(model, example, batch_size, rounds, policy, progress):
        calls.append(torch.get_num_threads())
        times = torch.tensor([[1.0]], dtype=torch.float64)
        share = 0.5 if len(calls) == 1 else 1.0  # the timing thread ran half the time, then all of it
        return LatencyModel((1,), times, torch.ones(1, dtype=torch.float64), torch.zeros(2, 1),
                            threads=torch.get_num_threads(), cpu_share=share)

    monkeypatch.setattr(timing, "_time_ladder", ladder_of)
    with torch_threads(2):
        with pytest.warns(UserWarning, match="the machine is busy: the timing thread ran 50 % of the time.*timing again with one thread"):
            latency = time_exits(None, None)
        assert calls == [2, 1] and latency.threads == 1 and torch.get_num_threads() == 2
        calls.clear()
        latency = time_exits(None, None, threads=1)  # asked for one thread (a re-timing): no fallback to look for
        assert calls == [1] and latency.threads == 1 and torch.get_num_threads() == 2


@pytest.mark.skipif(sys.platform == "win32", reason="Windows' thread clock is too coarse: timed on the wall clock there")
def test_one_cpu_thread_is_timed_on_its_own_cpu_time():
    cpu = torch.device("cpu")
    with torch_threads(1):
        now = clock(cpu)
        start = now()
        time.sleep(0.05)  # the thread waits: time the system gives to other processes is not counted
        assert now() - start < 0.025
    with torch_threads(2):
        assert clock(cpu) is time.perf_counter  # other threads do part of the work: the wall clock
    assert clock(torch.device("meta")) is time.perf_counter


def test_time_exits_records_the_cpu_share_it_got():
    model = wrap(MultiExitCNN(widths=(4, 8, 8))).eval()
    with torch_threads(1):
        latency = time_exits(model, torch.randn(2, 1, 28, 28), 2, rounds=1, progress=False)
    assert latency.threads == 1 and 0.0 < latency.cpu_share <= 1.0
