"""Drift streams: seeded, drawn from the right classes on the right schedule; running means; replay."""

import pytest
import torch

from eenet_fast import make_policy
from eenet_fast.drift import class_difficulty, drift_stream, hardest_classes, replay, running_mean
from eenet_fast.synthetic import make_synthetic_outputs


@pytest.fixture(scope="module")
def skewed():
    return make_synthetic_outputs(3000, seed=3, class_skew=1.5)


def test_hardest_classes_are_the_ones_the_early_exits_miss(skewed):
    difficulty = class_difficulty(skewed)
    assert difficulty.shape == (10,) and bool((difficulty[1:] > difficulty[:-1] - 0.05).all())
    assert set(hardest_classes(skewed, 3).tolist()) == {7, 8, 9}
    with pytest.raises(ValueError, match="some classes must stay easy"):
        hardest_classes(skewed, 10)


def test_stream_follows_its_schedule(skewed):
    stream = drift_stream(skewed, 20_000, seed=4)
    assert len(stream) == 20_000 and stream.indices.dtype == torch.long
    assert 0 <= int(stream.indices.min()) and int(stream.indices.max()) < skewed.num_samples
    hard = torch.isin(skewed.labels[stream.indices], stream.hard_classes).double()
    natural = float(torch.isin(skewed.labels, stream.hard_classes).double().mean())
    assert float(stream.hard_share[0]) == pytest.approx(natural) == float(stream.hard_share[-1])
    assert float(stream.hard_share.max()) == pytest.approx(0.8)
    calm, plateau = slice(0, 4000), slice(7000, 13000)  # phases 0-20 % and inside 30-70 %
    assert float(hard[calm].mean()) == pytest.approx(natural, abs=0.03)
    assert float(hard[plateau].mean()) == pytest.approx(0.8, abs=0.03)
    assert torch.equal(drift_stream(skewed, 20_000, seed=4).indices, stream.indices)
    assert not torch.equal(drift_stream(skewed, 20_000, seed=5).indices, stream.indices)


def test_stream_errors(skewed):
    with pytest.raises(ValueError, match="peak is a share"):
        drift_stream(skewed, 100, peak=1.5)
    only_hard = skewed.subset(torch.nonzero(skewed.labels == 9).squeeze(1))
    with pytest.raises(ValueError, match="need samples of both"):
        drift_stream(only_hard, 100, hard_classes=torch.tensor([9]))


def test_running_mean_matches_a_loop():
    values = torch.rand(50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = torch.stack([values[i : i + 7].mean() for i in range(44)])
    torch.testing.assert_close(running_mean(values, 7), expected)
    with pytest.raises(ValueError, match="window must lie"):
        running_mean(values, 51)


def test_replay_without_controller_is_the_offline_evaluation(skewed):
    policy = make_policy("maxprob").fit(skewed, 0.5)
    order = torch.randperm(skewed.num_samples, generator=torch.Generator().manual_seed(1))
    served = replay(policy, skewed, order, batch_size=37)
    exits = policy.assign(skewed)[order]
    assert torch.equal(served.exits, exits)
    assert torch.equal(served.costs, skewed.costs[exits])
    assert torch.equal(served.correct, skewed.correct[exits, order])
