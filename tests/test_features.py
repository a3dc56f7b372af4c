import math

import pytest
import torch

from eenet_fast.features import exit_features


def test_features_match_hand_computed_values():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, 0.0, 0.0]])
    f = exit_features(logits)
    # row 0 uniform: max 1/4, entropy log 4 -> confidence 0
    # row 1: p = [1/2, 1/6, 1/6, 1/6]
    torch.testing.assert_close(f.probs[1], torch.tensor([0.5, 1 / 6, 1 / 6, 1 / 6]))
    h1 = -(0.5 * math.log(0.5) + 3 * (1 / 6) * math.log(1 / 6))
    torch.testing.assert_close(f.max_score, torch.tensor([0.25, 0.5]))
    torch.testing.assert_close(f.entropy_conf, torch.tensor([0.0, 1 - h1 / math.log(4)]), atol=1e-6, rtol=0)
    assert f.prediction.tolist() == [0, 0]
    assert f.probs.dtype == torch.float32 and f.prediction.dtype == torch.int64


def test_one_hot_probabilities_give_full_confidence():
    probs = torch.tensor([[0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    f = exit_features(torch.log(probs.clamp_min(torch.finfo(torch.float32).tiny)))  # as ExitOutputs.from_probs keeps them
    torch.testing.assert_close(f.entropy_conf[0], torch.tensor(1.0))
    assert f.prediction.tolist() == [1, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_and_non_contiguous_inputs_match_fp32(dtype):
    x = torch.randn(37, 2 * 11)[:, ::2].to(dtype)  # non-contiguous rows
    f = exit_features(x)
    ref = exit_features(x.float().contiguous())
    torch.testing.assert_close(f.max_score, ref.max_score)
    torch.testing.assert_close(f.entropy_conf, ref.entropy_conf)


def test_features_reject_bad_shapes():
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        exit_features(torch.randn(3))
    with pytest.raises(ValueError, match="2 classes"):
        exit_features(torch.randn(3, 1))


@pytest.mark.parametrize(
    "logits",
    [
        torch.tensor([[1e40, -1e40, 0.0], [-1e40, 1e40, 1e39]], dtype=torch.float64),  # beyond float32
        torch.tensor([[3e38, -3e38, 0.0], [-3e38, -3e38, 3e38]]),  # float32, spread beyond its range
        torch.tensor([[1e308, -1e308, 0.0]], dtype=torch.float64),  # spread beyond float64's range
    ],
)
def test_extreme_finite_logits_give_finite_features(logits):
    f = exit_features(logits)
    for name in ("probs", "max_score", "entropy_conf"):
        assert torch.isfinite(getattr(f, name)).all(), name
    assert f.prediction.tolist() == logits.argmax(1).tolist()
    torch.testing.assert_close(f.max_score, torch.ones(len(logits)))  # one class takes all the mass
    torch.testing.assert_close(f.entropy_conf, torch.ones(len(logits)))
