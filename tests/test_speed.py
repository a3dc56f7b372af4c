"""measure_speed: the full model and adaptive inference in interleaved rounds, the median share."""

import statistics

import pytest

from eenet_fast import InputError, measure_speed
from eenet_fast import speed as speed_module
from eenet_fast.speed import median_iqr


class FakeClock:
    """perf_counter for the module under test: each call of a timed function advances it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_rounds_interleave_the_full_model_and_adaptive_and_the_share_is_the_median_ratio(monkeypatch):
    clock, calls = FakeClock(), []
    monkeypatch.setattr(speed_module.time, "perf_counter", clock)
    # one warm-up round (the slow 9 s / 9 s), then five; round 2 is a slow spell that slows both sides
    full_s = iter([9.0, 1.0, 2.0, 1.0, 1.0, 1.0])
    adaptive_s = iter([9.0, 0.5, 1.2, 0.4, 0.5, 0.6])

    def full():
        calls.append("full")
        clock.now += next(full_s)

    def adaptive():
        calls.append("adaptive")
        clock.now += next(adaptive_s)
        return len(calls)

    measured, last = measure_speed(adaptive, full, rounds=5, warmup=1)
    assert calls == ["full", "adaptive"] * 6 and last == 12
    shares = [0.5, 0.6, 0.4, 0.5, 0.6]
    q1, median, q3 = statistics.quantiles(shares, n=4)
    assert measured.share == pytest.approx(0.5) == pytest.approx(median)
    assert measured.share_iqr == pytest.approx(q3 - q1) and measured.share_iqr > 0
    assert measured.full_s == pytest.approx(1.0) and measured.adaptive_s == pytest.approx(0.5)
    assert measured.speedup == pytest.approx(2.0) and measured.rounds == 5


def test_one_round_and_no_warmup(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(speed_module.time, "perf_counter", clock)

    def step(seconds):
        def run():
            clock.now += seconds
        return run

    measured, last = measure_speed(step(3.0), step(2.0), rounds=1, warmup=0)
    assert measured.share == pytest.approx(1.5) and measured.share_iqr == 0.0 and last is None


@pytest.mark.parametrize("rounds, warmup", [(0, 1), (3, -1)])
def test_bad_rounds_are_refused(rounds, warmup):
    with pytest.raises(InputError, match="rounds >= 1 and warmup >= 0"):
        measure_speed(lambda: None, lambda: None, rounds=rounds, warmup=warmup)


def test_median_iqr_by_hand():
    # statistics.quantiles' default ("exclusive") quartiles of 1..7 are 2 and 6
    assert median_iqr([7.0, 1.0, 4.0, 2.0, 6.0, 3.0, 5.0]) == (4.0, 4.0)
    assert median_iqr([0.8]) == (0.8, 0.0)
    assert median_iqr([1.0, 3.0]) == (2.0, 3.0)  # two rounds: the quartiles extrapolate to 0.5 and 3.5
