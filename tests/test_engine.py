"""The stage-level engine: each sample's answer is what the model's forward gives it, whatever it was
batched with and in whatever order requests arrived; nothing is lost, duplicated or swapped."""

import asyncio
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_families import calibrate_randomly, padded_tokens, tiny_text_classifier
from test_runtime import C, D, K, DictHead, DictStage, mlp_model, random_policy
from torch import nn

from eenet_fast import make_policy
from eenet_fast.engine import EngineClosed, EngineOverloaded, ExitEngine
from eenet_fast.merging import merge, mergeable
from eenet_fast.outputs import ExitOutputs
from eenet_fast.errors import InputError
from eenet_fast.runtime import EarlyExitModel
from eenet_fast.wrapping import wrap


def assert_same(result, expected, atol=1e-5):
    assert torch.equal(result.exits, expected.exits)
    assert torch.equal(result.predictions, expected.predictions)
    assert torch.equal(result.nonfinite, expected.nonfinite)
    torch.testing.assert_close(result.logits, expected.logits, rtol=1e-4, atol=atol, equal_nan=True)


def requests_of(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, D, generator=g) for n in sizes]


MODEL = mlp_model()
FITTED: dict = {}


def install_policy(name):
    """One fitted policy per name for the property test (EENet takes seconds to fit)."""
    if name not in FITTED:
        FITTED[name] = random_policy(MODEL, name, 7, 0.4)
    MODEL.policy = FITTED[name]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(["eenet", "maxprob", "patience"]),
    seed=st.integers(0, 10_000),
    sizes=st.lists(st.integers(0, 9), min_size=1, max_size=24),
    max_batch=st.integers(1, 16),
    stage_batch=st.lists(st.one_of(st.none(), st.integers(1, 12)), min_size=K, max_size=K),
    max_wait_ms=st.sampled_from([0.0, 0.5, 5.0]),
    order=st.randoms(use_true_random=False),
)
def test_engine_answers_equal_forward_whatever_the_arrival_order_and_batch_limits(
    name, seed, sizes, max_batch, stage_batch, max_wait_ms, order
):
    install_policy(name)
    requests = requests_of(sizes, seed)
    arrival = list(range(len(requests)))
    order.shuffle(arrival)
    with ExitEngine(MODEL, max_batch=max_batch, stage_batch=stage_batch, max_wait_ms=max_wait_ms) as engine:
        futures = {i: engine.submit(requests[i]) for i in arrival}
        for i, x in enumerate(requests):
            assert_same(futures[i].result(timeout=30), MODEL(x))
        stats = engine.snapshot()
    assert stats["requests"]["answered"] == len(requests) and stats["samples"] == sum(sizes)
    assert sum(stats["exit_counts"]) == sum(sizes)
    assert all(s["queue"] == 0 for s in stats["stages"])


def test_concurrent_submitters_get_their_own_answers():
    model = mlp_model(1)
    random_policy(model, "patience", 3, 0.5)
    requests = requests_of([1, 3, 8, 1, 2, 5] * 20, seed=1)
    results = [None] * len(requests)
    with ExitEngine(model, max_batch=16, max_wait_ms=1.0) as engine:
        def client(first):
            for i in range(first, len(requests), 4):
                results[i] = engine.submit(requests[i]).result(timeout=30)

        threads = [threading.Thread(target=client, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for x, result in zip(requests, results):
        assert_same(result, model(x))


def test_map_keeps_the_order_and_infer_works_under_asyncio():
    random_policy(MODEL, "maxprob", 1, 0.5)
    requests = requests_of([4, 1, 7, 2, 9, 3], seed=2)
    with ExitEngine(MODEL, max_batch=8) as engine:
        for x, result in zip(requests, engine.map(requests, window=3)):
            assert_same(result, MODEL(x))

        async def both():
            return await asyncio.gather(*(engine.infer(x) for x in requests))

        for x, result in zip(requests, asyncio.run(both())):
            assert_same(result, MODEL(x))
        empty = engine(torch.empty(0, D))
        assert empty.logits.shape == (0, C) and empty.exits.shape == (0,)


def test_dict_states_merge_across_requests():
    torch.manual_seed(0)
    model = EarlyExitModel([DictStage() for _ in range(K)], [DictHead() for _ in range(K)]).eval()
    x = {"h": torch.randn(64, D), "mask": torch.rand(64), "scale": torch.tensor(2.0)}
    outputs = ExitOutputs(torch.stack(model.all_exits(x)), torch.randint(C, (64,)), [1.0, 2.0, 3.0])
    model.policy = make_policy("maxprob").fit(outputs, 2.0)
    requests = [{"h": x["h"][i : i + n], "mask": x["mask"][i : i + n], "scale": x["scale"]} for i, n in
                [(0, 3), (3, 1), (4, 9), (13, 5), (18, 20)]]
    with ExitEngine(model, max_batch=6) as engine:
        futures = [engine.submit(r) for r in requests]
        for r, f in zip(requests, futures):
            assert_same(f.result(timeout=30), model(r))


def test_nan_samples_are_reported_as_forward_reports_them():
    random_policy(MODEL, "maxprob", 0, 0.0)
    x = torch.randn(6, D)
    x[2] = float("nan")
    with ExitEngine(MODEL, max_batch=4) as engine:
        result = engine(x)
        clean = engine(torch.randn(3, D))
    assert_same(result, MODEL(x))
    assert result.nonfinite.tolist() == [False, False, True, False, False, False]
    assert not clean.nonfinite.any()


class Fragile(nn.Module):
    """A stage that fails on rows holding a huge value, and may sleep to keep requests in flight."""

    def __init__(self, stage, delay=0.0):
        super().__init__()
        self.stage, self.delay = stage, delay

    def forward(self, x):
        if (x.abs() > 1e6).any():
            raise ValueError("poisoned row")
        time.sleep(self.delay)
        return self.stage(x)


def fragile_model(delay=0.0):
    model = mlp_model(2)
    random_policy(model, "maxprob", 5, 0.5)
    fragile = EarlyExitModel([Fragile(s, delay) for s in model.stages], model.heads, backend="torch").eval()
    fragile.policy = model.policy
    return model, fragile


def test_a_failing_request_does_not_disturb_the_others_in_its_batch():
    model, fragile = fragile_model()
    requests = requests_of([2, 3, 1, 4], seed=3)
    bad = torch.randn(2, D)
    bad[1, 0] = 1e9
    with ExitEngine(fragile, max_batch=64, max_wait_ms=50) as engine:
        futures = [engine.submit(x) for x in requests[:2]] + [engine.submit(bad)] + [engine.submit(x) for x in requests[2:]]
        with pytest.raises(RuntimeError, match="stage 0 of the model failed on this request.*poisoned row"):
            futures[2].result(timeout=30)
        for x, f in zip(requests, futures[:2] + futures[3:]):
            assert_same(f.result(timeout=30), model(x))
        assert engine.snapshot()["requests"]["failed"] == 1


def test_close_answers_every_accepted_request_then_refuses_new_ones():
    model, slow = fragile_model(delay=0.002)
    requests = requests_of([3, 1, 5, 2] * 10, seed=4)
    engine = ExitEngine(slow, max_batch=8)
    futures = [engine.submit(x) for x in requests]
    engine.close()
    assert not engine.alive
    for x, f in zip(requests, futures):
        assert_same(f.result(timeout=0), model(x))
    with pytest.raises(EngineClosed, match="closed"):
        engine.submit(requests[0])


def test_close_with_a_timeout_fails_what_is_left_with_a_clear_error():
    _, slow = fragile_model(delay=0.05)
    engine = ExitEngine(slow, max_batch=2)
    futures = [engine.submit(x) for x in requests_of([2] * 20, seed=5)]
    engine.close(timeout=0.1)
    outcomes = {"answered": 0, "closed": 0}
    for f in futures:
        assert f.done()
        if f.exception() is None:
            outcomes["answered"] += 1
        else:
            assert isinstance(f.exception(), EngineClosed) and "unanswered" in str(f.exception())
            outcomes["closed"] += 1
    assert outcomes["closed"] > 0 and sum(outcomes.values()) == 20


def test_bad_inputs_are_refused_at_submit():
    random_policy(MODEL, "maxprob", 0, 0.5)
    with ExitEngine(MODEL, example=torch.randn(2, D), max_pending=10) as engine:
        with pytest.raises(ValueError, match=r"the request is float32\[B, 7\] but this engine serves float32\[B, 12\]"):
            engine.submit(torch.randn(2, 7))
        with pytest.raises(ValueError, match=r"float64\[B, 12\]"):
            engine.submit(torch.randn(2, D, dtype=torch.float64))
        with pytest.raises(InputError, match="0-d tensor is not a batch"):
            engine.submit(torch.tensor(1.0))
        with pytest.raises(EngineOverloaded, match="max_pending=10"):
            for _ in range(100):
                engine.submit(torch.randn(4, D))
    with pytest.raises(ValueError, match="stage_batch needs 3 limits"):
        ExitEngine(MODEL, stage_batch=[4, 4])
    MODEL.train()
    try:
        with pytest.raises(RuntimeError, match=r"model\.eval\(\)"):
            ExitEngine(MODEL)
    finally:
        MODEL.eval()


def test_statistics_count_batches_exits_cost_and_latency():
    random_policy(MODEL, "maxprob", 2, 0.5)
    requests = requests_of([1] * 40, seed=6)
    with ExitEngine(MODEL, max_batch=8, max_wait_ms=1000) as engine:
        results = list(engine.map(requests, window=40))
        stats = engine.snapshot()
    exits = torch.cat([r.exits for r in results])
    assert stats["exit_counts"] == torch.bincount(exits, minlength=K).tolist()
    assert stats["avg_cost"] == pytest.approx(float(MODEL.policy.costs[exits].mean()))
    assert stats["budget"] == MODEL.policy.budget
    assert stats["stages"][0]["steps"] >= 5 and stats["stages"][0]["mean_batch"] <= 8
    assert stats["latency_ms"]["p50"] <= stats["latency_ms"]["p99"]
    assert [e["p50"] is not None for e in stats["latency_ms"]["by_exit"]] == [c > 0 for c in stats["exit_counts"]]


def test_merging_pads_text_with_the_padding_masked():
    a = {"hidden": torch.ones(2, 3, 4), "mask": None, "attention_mask": torch.ones(2, 3, dtype=torch.long)}
    bool_mask = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    bool_mask[..., 4] = False
    b = {"hidden": torch.ones(1, 5, 4), "mask": bool_mask, "attention_mask": torch.tensor([[1, 1, 1, 1, 0]])}
    assert not mergeable([a, dict(a, attention_mask=torch.ones(2, 4, dtype=torch.long), hidden=torch.ones(2, 4, 4))])
    assert mergeable([a, b])
    merged = merge([a, b])
    assert merged["hidden"].shape == (3, 5, 4) and merged["hidden"][:2, 3:].abs().sum() == 0
    assert merged["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]
    assert merged["mask"].shape == (3, 1, 5, 5)
    assert merged["mask"][0, 0].tolist() == [[True] * 3 + [False] * 2] * 5
    assert torch.equal(merged["mask"][2], bool_mask[0])


@pytest.mark.transformers
def test_text_requests_of_different_lengths_get_the_answers_forward_gives_them():
    model = wrap(tiny_text_classifier(), exits_after=[0, 1, 3])
    calibrate_randomly(model, padded_tokens(48, seed=1), "maxprob", seed=0, budget=0.4)
    requests = []
    for i, (n, length) in enumerate([(1, 5), (2, 9), (1, 13), (3, 4), (1, 7), (2, 13), (1, 3)] * 3):
        tokens = padded_tokens(n, length=length, seed=i)
        if i % 3 == 0:  # no padding in the request: the layers get no mask
            tokens["attention_mask"] = torch.ones_like(tokens["attention_mask"])
        requests.append(tokens)
    with ExitEngine(model, max_batch=6, max_wait_ms=20) as engine:
        futures = [engine.submit(r) for r in requests]
        for r, f in zip(requests, futures):
            assert_same(f.result(timeout=60), model(r))
        assert engine.snapshot()["stages"][1]["mean_batch"] > 1  # rows of different lengths did merge


def test_the_models_controller_sets_the_thresholds_and_sees_every_sample():
    from eenet_fast.control import BudgetController

    model = mlp_model()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, D, generator=g)
    outputs = ExitOutputs(torch.stack(model.all_exits(x)), torch.randint(C, (512,), generator=g), [1.0, 2.0, 3.0])
    model.calibrate(outputs, 2.0, policy="maxprob")
    model.controller = BudgetController(model.policy, outputs, step=0.05, window=100, gain=50)
    scores = model.policy.exit_scores(outputs)
    hard = x[scores[0] < scores[0].quantile(0.3)]  # the samples the first exit is least sure of: they cost more
    try:
        with ExitEngine(model, max_batch=16) as engine:
            results = list(engine.map(hard.split(8)))
        assert sum(r.exits.numel() for r in results) == hard.shape[0] == model.controller.seen
        assert model.controller.log_tilt < 0  # it moved towards cheaper exits
        model.calibrate(outputs, 2.5, policy="maxprob")
        with pytest.raises(RuntimeError, match="built for another policy"):
            ExitEngine(model)
    finally:
        model.controller = None
