"""The fused exit-decision kernel (``eenet_fast.kernels.exit_decision``) against its PyTorch
reference (``eenet_fast.decision.decide_reference``), and the reference against the policies."""

import math

import pytest
import torch

pytest.importorskip("triton")

from kernel_utils import DEVICE, DTYPES, gen  # noqa: E402

from eenet_fast import make_policy  # noqa: E402
from eenet_fast.decision import Decision, ScoreHeadParams, decide_reference  # noqa: E402
from eenet_fast.kernels.exit_decision import exit_decision, row_align  # noqa: E402
from eenet_fast.policies import ExitHistory  # noqa: E402
from eenet_fast.synthetic import make_synthetic_outputs  # noqa: E402

# Kernel and reference read the same logits and both work in float32, so the tolerance does not
# depend on the logits' dtype: only the order of the float32 sums differs.
TOL = {"rtol": 2e-5, "atol": 2e-5}


def random_head(num_classes: int, k: int, hidden: int, class_term: bool, seed: int = 0) -> ScoreHeadParams:
    g = gen(seed)
    n = k + 2
    return ScoreHeadParams(
        torch.randn(num_classes, generator=g) if class_term else None,
        torch.randn(n, generator=g),
        torch.randn(hidden, n, generator=g) if hidden else None,
        torch.randn(hidden, generator=g) if hidden else None,
        torch.randn(hidden, generator=g) if hidden else None,
    ).to(DEVICE)


def random_logits(batch: int, num_classes: int, dtype=torch.float32, seed: int = 0, strided: bool = True):
    """Logits whose row stride is not ``C`` (a slice of a wider tensor) when ``strided``."""
    g = gen(seed)
    scale = torch.rand(batch, 1, generator=g) * 8  # from near-uniform to peaked rows
    wide = torch.randn(batch, num_classes + 7, generator=g) * scale
    logits = wide.to(DEVICE, dtype)
    return logits[:, 3 : 3 + num_classes] if strided else logits[:, :num_classes].contiguous()


def poisoned(batch: int) -> Decision:
    """Outputs full of garbage: the kernel must overwrite every row."""
    return Decision(
        torch.full((batch,), math.nan, device=DEVICE),
        torch.full((batch,), -123, dtype=torch.long, device=DEVICE),
        torch.ones(batch, dtype=torch.bool, device=DEVICE),
        torch.ones(batch, dtype=torch.bool, device=DEVICE),
    )


def check_decision(got: Decision, ref: Decision, threshold: float, last: bool = False) -> None:
    """Equal flags, close scores; ``leave`` follows the kernel's own score (a reference score within
    rounding of the threshold may fall either way)."""
    assert torch.equal(got.nonfinite, ref.nonfinite)
    finite = ~ref.nonfinite
    torch.testing.assert_close(got.score[finite], ref.score[finite], **TOL)
    assert torch.equal(got.prediction[finite], ref.prediction[finite])
    assert ((got.prediction >= 0) & (got.prediction < 2**31)).all()
    if last:
        assert got.leave.all()
    else:
        assert torch.equal(got.leave, (got.score >= threshold) & finite)
        clear = (ref.score - threshold).abs() > 1e-4
        assert torch.equal(got.leave[clear], ref.leave[clear])


def middle_threshold(scores: torch.Tensor) -> float:
    return float(scores.median()) + 1e-3 if scores.numel() else 0.0


@pytest.mark.parametrize("batch", [0, 1, 7, 128, 1000])
@pytest.mark.parametrize("num_classes", [2, 10, 100, 1000])
def test_decision_matches_reference(batch, num_classes):
    logits = random_logits(batch, num_classes, seed=batch + num_classes)
    head = random_head(num_classes, 2, 16, True)
    prev = torch.rand(batch, 5, generator=gen(1)).to(DEVICE)[:, 1:3]  # row stride 5
    ref = decide_reference(logits, head, prev, 0.0)
    threshold = middle_threshold(ref.score)
    ref = decide_reference(logits, head, prev, threshold)
    got = exit_decision(logits, head, prev, threshold, out=poisoned(batch))
    check_decision(got, ref, threshold)
    assert 0 < got.leave.sum() < batch or batch < 7


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["row-strided", "transposed", "contiguous"])
def test_decision_dtypes_and_layouts(dtype, layout):
    batch, num_classes = 128, 100
    if layout == "transposed":  # column stride B, row stride 1
        logits = torch.randn(num_classes, batch, generator=gen(2)).mul(4).to(DEVICE, dtype).t()
    else:
        logits = random_logits(batch, num_classes, dtype, seed=2, strided=layout == "row-strided")
    head = random_head(num_classes, 2, 16, True, seed=3)
    prev = torch.rand(batch, 2, generator=gen(4)).to(DEVICE)
    threshold = middle_threshold(decide_reference(logits, head, prev, 0.0).score)
    got = exit_decision(logits, head, prev, threshold, out=poisoned(batch))
    check_decision(got, decide_reference(logits, head, prev, threshold), threshold)


def test_row_align_is_what_every_row_start_allows_for_16_byte_vectors():
    def rows(num_classes, dtype=torch.float32, offset=0):
        return torch.empty(8, num_classes + offset, dtype=dtype)[:, offset:]

    assert [row_align(rows(c)) for c in (100, 1000, 1024, 1001)] == [4, 8, 16, 1]
    assert row_align(rows(1000, offset=4)) == 4  # 16 bytes in: the address allows 4
    assert row_align(rows(1000, offset=1)) == 1  # one word in: no row starts 16-byte aligned
    assert row_align(rows(10)) == 1  # 8-byte vectors at most: no hint
    assert row_align(rows(1024, torch.bfloat16)) == 1  # 2-byte logits: no hint (Triton sees stride 1024)
    assert row_align(torch.empty(100, 8).t()) == 1  # row stride 1: a transposed tensor


@pytest.mark.parametrize("num_classes", [100, 1000, 1024])
@pytest.mark.parametrize("offset", [0, 4])
def test_decision_with_aligned_rows_matches_reference(num_classes, offset):
    """Rows whose starts are 16-byte aligned (the kernel's vector loads on a GPU), from the tensor's
    start or 16 bytes into it, over a batch that ends inside a tile."""
    batch = 77
    wide = torch.randn(batch, num_classes + offset, generator=gen(5)).mul(4).to(DEVICE)
    logits = wide[:, offset:]
    assert row_align(logits) >= 4
    head = random_head(num_classes, 2, 16, True, seed=6)
    prev = torch.rand(batch, 2, generator=gen(7)).to(DEVICE)
    threshold = middle_threshold(decide_reference(logits, head, prev, 0.0).score)
    got = exit_decision(logits, head, prev, threshold, out=poisoned(batch))
    check_decision(got, decide_reference(logits, head, prev, threshold), threshold)


@pytest.mark.parametrize("class_term", [False, True])
@pytest.mark.parametrize("hidden", [0, 16, 64])
@pytest.mark.parametrize("k", [0, 2])
def test_decision_score_heads(class_term, hidden, k):
    batch, num_classes = 128, 10
    logits = random_logits(batch, num_classes, seed=5)
    head = random_head(num_classes, k, hidden, class_term, seed=hidden + k)
    prev = torch.randn(batch, k, generator=gen(6)).to(DEVICE)
    threshold = middle_threshold(decide_reference(logits, head, prev, 0.0).score)
    got = exit_decision(logits, head, prev, threshold, out=poisoned(batch))
    check_decision(got, decide_reference(logits, head, prev, threshold), threshold)


@pytest.mark.parametrize("threshold", [math.inf, -math.inf, 0.5])
@pytest.mark.parametrize("last", [False, True])
def test_decision_thresholds_and_the_last_exit(threshold, last):
    logits = random_logits(64, 10, seed=7)
    head = ScoreHeadParams.select(0).to(DEVICE)
    prev = torch.empty(64, 0, device=DEVICE)
    got = exit_decision(logits, head, prev, threshold, last, out=poisoned(64))
    check_decision(got, decide_reference(logits, head, prev, threshold, last), threshold, last)
    if not last and math.isinf(threshold):
        assert got.leave.all() if threshold < 0 else not got.leave.any()


@pytest.mark.parametrize(
    "batch, num_classes, block_b, block_c", [(7, 100, 4, 32), (128, 1000, 16, 128), (1000, 10, 64, 4)]
)
def test_decision_over_many_chunks(batch, num_classes, block_b, block_c):
    """Several class chunks (the last one partial), the running max moving between chunks, ties."""
    logits = random_logits(batch, num_classes, seed=8)
    logits[0] = 0.0  # uniform row: m = 1/C, e = 0, prediction 0
    if batch > 1:  # the max appears in two chunks: the first index wins
        logits[1] = -1.0
        logits[1, [num_classes - 1, block_c - 1]] = 5.0
    head = random_head(num_classes, 1, 16, True, seed=9)
    prev = torch.randn(batch, 1, generator=gen(10)).to(DEVICE)
    ref = decide_reference(logits, head, prev, 0.0)
    got = exit_decision(logits, head, prev, 0.0, out=poisoned(batch), block_b=block_b, block_c=block_c)
    check_decision(got, ref, 0.0)
    assert got.prediction[0] == 0
    if batch > 1:
        assert got.prediction[1] == block_c - 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decision_large_vocabulary(dtype):
    batch, num_classes = 2, 131072
    logits = random_logits(batch, num_classes, dtype, seed=11)
    logits[0] += torch.linspace(0, 4, num_classes, device=DEVICE, dtype=dtype)  # the running max grows chunk by chunk
    logits[1, num_classes - 3] = 30.0  # peaked row, max in the last chunk
    head = random_head(num_classes, 2, 64, True, seed=12)
    prev = torch.rand(batch, 2, generator=gen(13)).to(DEVICE)
    got = exit_decision(logits, head, prev, 0.0, out=poisoned(batch))
    check_decision(got, decide_reference(logits, head, prev, 0.0), 0.0)
    assert got.prediction[1] == num_classes - 3


@pytest.mark.parametrize("last", [False, True])
def test_nonfinite_rows_never_leave_early_and_are_reported(last):
    logits = random_logits(12, 100, seed=14)
    logits[0, 5] = math.nan
    logits[1, 99] = math.inf
    logits[2, 0] = -math.inf
    logits[3] = -math.inf
    logits[4] = math.nan
    logits[5, 50] = -math.inf
    logits[5, 51] = math.inf
    head = random_head(100, 2, 16, True, seed=15)
    prev = torch.rand(12, 2, generator=gen(16)).to(DEVICE)
    got = exit_decision(logits, head, prev, -math.inf, last, out=poisoned(12))
    ref = decide_reference(logits, head, prev, -math.inf, last)
    assert got.nonfinite.tolist() == [True] * 6 + [False] * 6
    assert got.leave.tolist() == ([True] * 12 if last else [False] * 6 + [True] * 6)
    check_decision(got, ref, -math.inf, last)


def test_decision_writes_into_a_score_column():
    batch, k = 33, 2
    logits = random_logits(batch, 10, seed=17)
    head = random_head(10, k, 16, True, seed=18)
    state = torch.full((batch, 4), math.nan, device=DEVICE)
    state[:, :k] = torch.rand(batch, k, generator=gen(19)).to(DEVICE)
    out = poisoned(batch)
    out = Decision(state[:, k], out.prediction, out.leave, out.nonfinite)
    got = exit_decision(logits, head, state[:, :k], 0.3, out=out)
    assert got.score.data_ptr() == state[:, k].data_ptr()
    check_decision(got, decide_reference(logits, head, state[:, :k], 0.3), 0.3)
    assert state[:, k + 1].isnan().all()


def test_decision_errors():
    logits = random_logits(4, 10, seed=20)
    head = random_head(10, 0, 0, True)
    prev = torch.empty(4, 0, device=DEVICE)
    with pytest.raises(ValueError, match=r"shape \[B, C\]"):
        exit_decision(logits[None], head, prev, 0.0)
    with pytest.raises(TypeError, match="floating point"):
        exit_decision(logits.long(), head, prev, 0.0)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        exit_decision(logits.double(), head, prev, 0.0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        exit_decision(logits[:, :1], ScoreHeadParams.select(0).to(DEVICE), prev, 0.0)
    with pytest.raises(ValueError, match="class_weight has 10 classes, the logits 9"):
        exit_decision(logits[:, :9], head, prev, 0.0)
    with pytest.raises(ValueError, match="reads 2 earlier scores"):
        exit_decision(logits, random_head(10, 2, 0, False), prev, 0.0)
    with pytest.raises(ValueError, match=r"out.score must be"):
        exit_decision(logits, head, prev, 0.0, out=poisoned(3))
    with pytest.raises(ValueError, match="given together"):
        ScoreHeadParams(None, torch.zeros(2), torch.zeros(4, 2))
    with pytest.raises(TypeError, match="float32"):
        ScoreHeadParams(None, torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"mlp_weight must have shape \[H, 3\]"):
        ScoreHeadParams(None, torch.zeros(3), torch.zeros(4, 2), torch.zeros(4), torch.zeros(4))


# -------------------------------------------------------------- the reference and the policies


@pytest.mark.parametrize(
    "name, options",
    [
        ("maxprob", {}),
        ("entropy", {}),
        ("search", {"rounds": 1, "samples": 4}),
        ("eenet", {"hidden": 0, "epochs": 4, "progress": False}),
        ("eenet", {"hidden": 16, "epochs": 4, "progress": False}),
    ],
)
def test_reference_gives_exactly_the_policy_score(name, options):
    policy = make_policy(name, **options).fit(make_synthetic_outputs(600, num_exits=3, seed=3), 0.6)
    test = make_synthetic_outputs(300, num_exits=3, seed=4)
    history = ExitHistory.empty(test.num_samples)
    for k, feats in enumerate(test.features):
        q = policy.score(k, feats, history).float()
        ref = decide_reference(test.logits[k], policy.score_head(k), history.scores, policy.thresholds[k], k == 2)
        assert torch.equal(ref.score, q)
        assert torch.equal(ref.prediction, feats.prediction)
        if k < 2:
            assert torch.equal(ref.leave, q >= policy.thresholds[k])
        history = history.extend(q, feats.prediction)


def test_policies_without_a_score_head():
    val = make_synthetic_outputs(200, num_exits=3, seed=5)
    assert make_policy("patience").fit(val, 0.6).score_head(1) is None
    assert make_policy("oracle").fit(val, 0.6).score_head(1) is None
    with pytest.raises(RuntimeError, match="not fitted"):
        make_policy("eenet").score_head(0)


def test_score_heads_on_a_device_are_built_once_and_again_after_a_refit():
    val = make_synthetic_outputs(300, num_exits=3, seed=6)
    policy = make_policy("eenet", epochs=2, progress=False).fit(val, 0.6)
    cpu = torch.device("cpu")
    head = policy.score_head_on(1, cpu)
    assert policy.score_head_on(1, cpu) is head
    assert torch.equal(head.class_weight, policy.score_head(1).class_weight)
    policy.fit(val, 0.8)
    assert policy.score_head_on(1, cpu) is not head
    assert torch.equal(policy.score_head_on(1, cpu).class_weight, policy.score_head(1).class_weight)
