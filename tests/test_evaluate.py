"""Checking the exits adaptive inference took against the offline simulation."""

import pytest

from eenet_fast import make_policy
from eenet_fast.evaluate import ROUNDING, check_exits


def test_exits_may_differ_only_where_a_score_sits_at_its_threshold(synthetic_val, synthetic_test):
    policy = make_policy("maxprob").fit(synthetic_val, 0.5)
    exits = policy.assign(synthetic_test)
    assert check_exits(policy, synthetic_test, exits) == 0
    scores = policy.exit_scores(synthetic_test)
    # put exit 1's threshold a rounding error above the lowest score that left there: offline it now stays
    i = int(scores[0].masked_fill(exits != 0, float("inf")).argmin())
    policy.thresholds[0] = scores[0, i] + ROUNDING / 10
    offline = policy.assign(synthetic_test)
    assert int(offline[i]) > 0 and int((offline != exits).sum()) >= 1
    assert check_exits(policy, synthetic_test, exits) == int((offline != exits).sum())
    # a sample far from every threshold at another exit: an error naming it
    far = int(((scores[0] - policy.thresholds[0]).abs() > 0.1).nonzero()[0])
    moved = offline.clone()
    moved[far] = 1 - min(int(moved[far]), 1)
    with pytest.raises(RuntimeError, match=f"sample {far} left at exit {int(moved[far]) + 1} instead of {int(offline[far]) + 1}"):
        check_exits(policy, synthetic_test, moved)
    with pytest.raises(Exception, match="one exit per sample"):
        check_exits(policy, synthetic_test, offline[:3])
