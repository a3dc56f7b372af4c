"""The exit decision's plain-PyTorch pieces: the finiteness test, and the torch backend's decision
against the reference (scores bit for bit, nothing scored at the last exit)."""

import math

import pytest
import torch

from eenet_fast import make_policy
from eenet_fast.backends import TorchBackend
from eenet_fast.decision import decide_reference, nonfinite_rows
from eenet_fast.features import exit_features, top_class
from eenet_fast.policies import ExitHistory
from eenet_fast.synthetic import make_synthetic_outputs

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, num_classes", [(0, 3), (1, 2), (37, 10), (130, 1000)])
def test_nonfinite_rows_flag_exactly_the_rows_with_nan_or_inf(dtype, batch, num_classes):
    g = torch.Generator().manual_seed(batch + num_classes)
    wide = (torch.randn(batch, num_classes + 1, generator=g) * 5).to(dtype)
    bad = torch.rand(batch, num_classes + 1, generator=g) < 0.02
    values = torch.tensor([math.nan, math.inf, -math.inf], dtype=dtype)
    wide[bad] = values[torch.randint(3, (int(bad.sum()),), generator=g)]
    if batch > 1:  # one row with +inf and -inf (its sum is NaN), one of the dtype's largest values
        wide[0, 1:3] = torch.tensor([math.inf, -math.inf], dtype=dtype)
        wide[1] = torch.finfo(dtype).max
    logits = wide[:, 1:]  # non-contiguous rows
    got = nonfinite_rows(logits)
    assert got.dtype == torch.bool and torch.equal(got, ~torch.isfinite(logits).all(1))


def test_rows_of_finite_float32_extremes_are_finite():
    logits = torch.full((2, 1000), torch.finfo(torch.float32).max)
    logits[1] = torch.finfo(torch.float32).min  # sums far beyond float32, never beyond float64
    assert not nonfinite_rows(logits).any()
    assert nonfinite_rows(torch.tensor([[1e308, 1e308]], dtype=torch.float64)).tolist() == [False]  # the exact test


@pytest.mark.parametrize("dtype", DTYPES)
def test_top_class_is_exit_features_max_score_and_prediction(dtype):
    logits = (torch.randn(65, 2 * 7) * 4)[:, ::2].to(dtype)  # non-contiguous
    max_score, prediction = top_class(logits)
    feats = exit_features(logits)
    assert torch.equal(max_score, feats.max_score) and torch.equal(prediction, feats.prediction)


@pytest.mark.parametrize("name", ["eenet", "maxprob", "patience"])
def test_torch_backend_decision_is_the_reference_and_scores_nothing_at_the_last_exit(name):
    options = {"epochs": 2, "progress": False} if name == "eenet" else {}
    policy = make_policy(name, **options).fit(make_synthetic_outputs(400, num_exits=3, seed=1), 0.6)
    test = make_synthetic_outputs(90, num_exits=3, seed=2)
    logits = [test.logits[k].clone() for k in range(3)]
    for z in logits:
        z[5, 1] = math.nan
    history = ExitHistory.empty(90)
    for k in range(3):
        last = k == 2
        q, prediction, leave, nonfinite = TorchBackend.decide(policy, k, logits[k], history, last, float(policy.thresholds[k]))
        assert nonfinite.tolist() == [i == 5 for i in range(90)]
        assert torch.equal(prediction[~nonfinite], exit_features(logits[k]).prediction[~nonfinite])
        if last:
            assert leave.all()
            break
        head = policy.score_head(k)
        if head is not None:
            ref = decide_reference(logits[k], head, history.scores, float(policy.thresholds[k]))
            assert torch.equal(q[~nonfinite], ref.score[~nonfinite]) and torch.equal(leave, ref.leave)
        assert not leave[5]
        assert torch.equal(leave, (q >= policy.thresholds[k]) & ~nonfinite)
        history = history.extend(q, prediction)
