"""Adaptive inference against the offline simulation of the same policy."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_utils import C, D, K, mlp_model, random_policy, simulate, with_plan
from torch import nn

from eenet_fast import InputError, make_policy
from eenet_fast.backends import TorchBackend
from eenet_fast.outputs import ExitOutputs
from eenet_fast.runtime import EarlyExitModel

MODEL = mlp_model()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(["eenet", "maxprob", "entropy", "patience", "search"]),
    seed=st.integers(0, 10_000),
    budget_frac=st.floats(0.0, 1.0),
    batch=st.sampled_from([0, 1, 2, 7, 33, 256]),
    plan=st.sampled_from([None, (True, True), (False, True), (True, False), (False, False)]),
)
def test_forward_equals_offline_simulation_and_each_sample_alone(name, seed, budget_frac, batch, plan):
    """Whether the leaving rows are gathered out after an exit or ride on (the time model's
    compaction plan), every sample gets the offline simulation's exit and logits."""
    with_plan(random_policy(MODEL, name, seed, budget_frac), plan)
    x = torch.randn(batch, D, generator=torch.Generator().manual_seed(seed + 1))
    result = MODEL(x)
    exits, logits = simulate(MODEL, x) if batch else (torch.empty(0, dtype=torch.long), torch.empty(0, C))
    assert result.exits.shape == (batch,) and result.logits.shape == (batch, C)
    assert torch.equal(result.exits, exits)  # nothing dropped, duplicated or reordered
    torch.testing.assert_close(result.logits, logits, rtol=1e-5, atol=1e-6)
    assert torch.equal(result.predictions, logits.argmax(1))
    assert not result.nonfinite.any()
    for i in range(min(batch, 5)):  # the same sample alone gets the same exit
        alone = MODEL(x[i : i + 1])
        assert alone.exits.item() == result.exits[i].item()


class DictStage(nn.Module):
    """Reads {"h", "mask"}, returns the same keys; the per-sample mask changes the result."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, state):
        h = torch.tanh(self.lin(state["h"])) * state["mask"][:, None]
        return {"h": h, "mask": state["mask"], "scale": state["scale"]}


class DictHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, C)

    def forward(self, state):
        return self.lin(state["h"]) * state["scale"]


@pytest.mark.parametrize("plan", [None, (False, True)])
@pytest.mark.parametrize("batch", [1, 9, 64])
def test_dict_stage_outputs_are_compacted_together(batch, plan):
    torch.manual_seed(0)
    model = EarlyExitModel([DictStage() for _ in range(K)], [DictHead() for _ in range(K)]).eval()
    random_policy_inputs = {"h": torch.randn(64, D), "mask": torch.rand(64), "scale": torch.tensor(2.0)}
    outputs = ExitOutputs(torch.stack(model.all_exits(random_policy_inputs)), torch.randint(C, (64,)), [1.0, 2.0, 3.0])
    model.policy = with_plan(make_policy("maxprob").fit(outputs, 2.0), plan)
    g = torch.Generator().manual_seed(batch)
    x = {"h": torch.randn(batch, D, generator=g), "mask": torch.rand(batch, generator=g), "scale": torch.tensor(2.0)}
    result = model(x)
    sim = model.policy.assign(ExitOutputs(torch.stack(model.all_exits(x))))
    assert torch.equal(result.exits, sim)
    for i in range(batch):
        alone = {"h": x["h"][i : i + 1], "mask": x["mask"][i : i + 1], "scale": x["scale"]}
        torch.testing.assert_close(model(alone).logits[0], result.logits[i])


@pytest.mark.parametrize("plan", [(False, False), None])
def test_the_forward_stops_once_every_sample_has_left(plan, monkeypatch):
    """Once every row has left, no later stage runs and nothing is compacted, and the outputs hold
    the batch's rows only: with no compaction planned (the leaving rows ride on) and with one planned
    (on the CPU, where reading the flags costs nothing, the forward stops before the compaction)."""
    model = mlp_model()
    calls, compactions = [], []
    model.stages[1].register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    compact = TorchBackend.compact
    monkeypatch.setattr(TorchBackend, "compact", staticmethod(lambda keep, *a, **kw: compactions.append(keep) or compact(keep, *a, **kw)))
    policy = with_plan(random_policy(model, "maxprob", 0, 0.5), plan)
    x = torch.randn(9, D)
    calls.clear()  # (fitting the policy ran every stage)
    policy.thresholds = torch.tensor([-float("inf"), 0.0, 0.0])  # every sample leaves at exit 1
    result = model(x)
    assert calls == [] and compactions == []
    assert (result.exits == 0).all() and result.logits.shape == (9, C) and result.predictions.shape == (9,)
    policy.thresholds = torch.tensor([float("inf"), -float("inf"), 0.0])  # none leaves at exit 1: all run stage 2
    assert (model(x).exits == 1).all() and calls == [9]


def test_nan_rows_never_leave_early_and_are_reported():
    model = mlp_model()
    random_policy(model, "maxprob", 0, 0.0)  # budget at the first exit: everything leaves there
    x = torch.randn(6, D)
    x[2] = float("nan")
    result = model(x)
    assert result.nonfinite.tolist() == [False, False, True, False, False, False]
    assert result.exits[2] == K - 1
    assert (result.exits[[0, 1, 3, 4, 5]] == 0).all()


def test_training_mode_and_missing_policy_are_refused():
    model = mlp_model()
    with pytest.raises(RuntimeError, match="no exit policy"):
        model(torch.randn(2, D))
    random_policy(model, "maxprob", 0, 0.5)
    model.train()
    with pytest.raises(RuntimeError, match=r"model\.eval\(\)"):
        model(torch.randn(2, D))


# ------------------------------------------------------------------ the policy as a submodule


def test_the_policy_is_a_submodule_that_moves_but_keeps_its_precision():
    model = mlp_model()
    policy = random_policy(model, "eenet", 1, 0.5)
    names = set(model.state_dict())
    assert {"policy.thresholds", "policy.costs"} <= names
    assert any(name.startswith("policy.scheduler.score_heads.0.") for name in names)
    assert not any(p.requires_grad for p in policy.parameters())  # no gradients at inference
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    model.half()  # the network runs in half precision; the decision keeps its own
    assert policy.thresholds.dtype == torch.float32 and policy.costs.dtype == torch.float64
    assert all(p.dtype == torch.float32 for p in policy.parameters())
    assert all(torch.equal(v, before[k]) for k, v in policy.state_dict().items())
    with pytest.raises(TypeError, match="not called like a layer"):
        policy(torch.randn(2, D))


def test_one_policy_decides_a_whole_batch_even_if_it_is_swapped_mid_forward():
    model = mlp_model()
    first = random_policy(model, "maxprob", 0, 0.3)
    x = torch.randn(64, D)
    expected = model(x)
    second = make_policy("maxprob").fit(
        ExitOutputs(torch.stack(model.all_exits(torch.randn(64, D))), torch.randint(C, (64,)), [1.0, 2.0, 3.0]), 2.9
    )

    class Swap(nn.Module):  # another thread installs a new policy while stage 1 runs
        def forward(self, h):
            model.policy = second
            return h

    model.stages[1] = nn.Sequential(model.stages[1], Swap())
    model.policy = first
    got = model(x)
    assert torch.equal(got.exits, expected.exits) and torch.equal(got.logits, expected.logits)
    assert model.policy is second


# ------------------------------------------------------- the checks a peer library makes


def test_a_budget_at_the_full_cost_gives_the_models_own_output_exactly():
    model = mlp_model()
    g = torch.Generator().manual_seed(5)
    val = ExitOutputs(torch.stack(model.all_exits(torch.randn(80, D, generator=g))), torch.randint(C, (80,), generator=g),
                      [1.0, 2.0, 3.0])
    model.calibrate(val, 3.0, "maxprob")
    x = torch.randn(30, D, generator=g)
    result = model(x)
    if (result.exits < K - 1).any():  # the most accurate mix at the full budget may still exit early
        model.policy.thresholds[: K - 1] = float("inf")  # a policy that spends the whole budget
        result = model(x)
    assert (result.exits == K - 1).all()
    with torch.no_grad():
        assert torch.equal(result.logits, model.all_exits(x)[-1])


def test_outputs_carry_no_autograd_graph_outside_no_grad():
    model = mlp_model()
    random_policy(model, "eenet", 2, 0.5)
    x = torch.randn(12, D, requires_grad=True)
    result = model(x)
    for t in (result.logits, result.predictions, result.exits, result.nonfinite):
        assert not t.requires_grad and t.grad_fn is None


def test_a_saturated_head_corrupts_nothing():
    """Max softmax exactly 1.0 (entropy exactly 0) at every exit: finite scores, everyone leaves at once."""
    torch.manual_seed(0)
    heads = [nn.Linear(D, C) for _ in range(K)]
    for head in heads:
        with torch.no_grad():
            head.weight.zero_()
            head.bias.copy_(torch.tensor([1e4, 0.0, 0.0, 0.0, 0.0]))
    model = EarlyExitModel([nn.Identity()] * K, heads, backend="torch").eval()
    val = ExitOutputs(torch.stack(model.all_exits(torch.randn(40, D))), torch.zeros(40, dtype=torch.long), [1.0, 2.0, 3.0])
    for name in ("maxprob", "entropy", "eenet"):
        options = {"epochs": 2, "progress": False} if name == "eenet" else {}
        model.calibrate(val, 1.5, name, **options)
        result = model(torch.randn(9, D))
        assert not result.nonfinite.any() and (result.predictions == 0).all()
        assert result.exits.tolist() == [0] * 9


# ------------------------------------------------------------------ inputs the model cannot take


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.randn(4, D, dtype=torch.float64), r"float64 \[4, 12\] on cpu.*float32 parameters on cpu"),
        (torch.randn(4, D + 1), r"float32 \[4, 13\] on cpu.*RuntimeError"),
        (torch.randint(0, 5, (4, D)), r"int64 \[4, 12\]"),
        ("a sentence", "cannot find the batch"),
        (torch.tensor(1.0), "0-d tensor is not a batch"),
        ((torch.randn(4, D), torch.randn(3, D)), r"the input\[1\] is a tensor of shape \(3, 12\)"),
    ],
)
def test_an_input_the_model_cannot_take_is_an_input_error_saying_what_it_got(x, match):
    model = mlp_model()
    random_policy(model, "maxprob", 0, 0.5)
    with pytest.raises(InputError, match=match):
        model(x)


def test_a_policy_swap_is_atomic_for_a_forward_running_meanwhile(tmp_path):
    model = mlp_model()
    model.new_heads = (0, 1)  # as if wrap had added them: a policy file restores their weights
    random_policy(model, "eenet", 0, 0.4)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for k in other.new_heads:
            other.heads[k].weight.mul_(-1.5)  # retrained heads, another calibration
    random_policy(other, "maxprob", 1, 0.6)
    other.save_policy(tmp_path / "new.safetensors")
    x = torch.randn(64, D)
    before, after = model(x), other(x)
    assert not torch.equal(before.logits, after.logits)
    swaps = []

    def swap(module, args, output):  # another thread loads the new policy while stage 1 runs
        if not swaps:
            swaps.append(model.load_policy(tmp_path / "new.safetensors"))

    handle = model.stages[1].register_forward_hook(swap)
    got = model(x)
    handle.remove()
    assert swaps, "the swap did not happen"
    assert torch.equal(got.exits, before.exits) and torch.equal(got.logits, before.logits)  # the old model, whole
    now = model(x)
    assert torch.equal(now.exits, after.exits) and torch.equal(now.logits, after.logits)  # the new one, whole
