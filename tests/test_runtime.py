"""Adaptive inference against the offline simulation of the same policy."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from eenet_fast import make_policy
from eenet_fast.outputs import ExitOutputs
from eenet_fast.heads import pooled_linear_head
from eenet_fast.runtime import EarlyExitModel
from eenet_fast.wrapping import wrap
from eenet_fast.zoo import MultiExitCNN

K, C, D = 3, 5, 12


def mlp_model(seed=0) -> EarlyExitModel:
    torch.manual_seed(seed)
    stages = [nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(K)]
    heads = [nn.Linear(D, C) for _ in range(K)]
    return EarlyExitModel(stages, heads, backend="torch").eval()


def random_policy(model, name, seed, budget_frac):
    """A policy fitted on the model's own outputs for random labels: random but valid thresholds."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, D, generator=g)
    outputs = ExitOutputs(torch.stack(model.all_exits(x)), torch.randint(C, (64,), generator=g), [1.0, 2.0, 3.0])
    options = {"epochs": 2, "progress": False, "seed": seed} if name == "eenet" else {}
    model.policy = make_policy(name, **options).fit(outputs, 1.0 + 2.0 * budget_frac)
    return model.policy


def simulate(model, x):
    outputs = ExitOutputs(torch.stack(model.all_exits(x)))
    exits = model.policy.assign(outputs)
    logits = outputs.logits.gather(0, exits[None, :, None].expand(1, -1, C))[0]
    return exits, logits


MODEL = mlp_model()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(["eenet", "maxprob", "entropy", "patience", "search"]),
    seed=st.integers(0, 10_000),
    budget_frac=st.floats(0.0, 1.0),
    batch=st.sampled_from([0, 1, 2, 7, 33, 256]),
)
def test_forward_equals_offline_simulation_and_each_sample_alone(name, seed, budget_frac, batch):
    random_policy(MODEL, name, seed, budget_frac)
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


@pytest.mark.parametrize("batch", [1, 9, 64])
def test_dict_stage_outputs_are_compacted_together(batch):
    torch.manual_seed(0)
    model = EarlyExitModel([DictStage() for _ in range(K)], [DictHead() for _ in range(K)]).eval()
    random_policy_inputs = {"h": torch.randn(64, D), "mask": torch.rand(64), "scale": torch.tensor(2.0)}
    outputs = ExitOutputs(torch.stack(model.all_exits(random_policy_inputs)), torch.randint(C, (64,)), [1.0, 2.0, 3.0])
    model.policy = make_policy("maxprob").fit(outputs, 2.0)
    g = torch.Generator().manual_seed(batch)
    x = {"h": torch.randn(batch, D, generator=g), "mask": torch.rand(batch, generator=g), "scale": torch.tensor(2.0)}
    result = model(x)
    sim = model.policy.assign(ExitOutputs(torch.stack(model.all_exits(x))))
    assert torch.equal(result.exits, sim)
    for i in range(batch):
        alone = {"h": x["h"][i : i + 1], "mask": x["mask"][i : i + 1], "scale": x["scale"]}
        torch.testing.assert_close(model(alone).logits[0], result.logits[i])


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


def test_policy_save_load_round_trip_and_mismatch(tmp_path):
    model = mlp_model()
    random_policy(model, "eenet", 3, 0.4)
    x = torch.randn(50, D)
    before = model(x)
    model.save_policy(tmp_path / "policy.safetensors")
    model.policy = None
    model.load_policy(tmp_path / "policy.safetensors")
    after = model(x)
    assert torch.equal(before.exits, after.exits) and torch.equal(before.logits, after.logits)
    other = EarlyExitModel([nn.Identity()] * K, [nn.Linear(D, C + 1) for _ in range(K)]).eval()
    with pytest.raises(ValueError, match="other exits or classes"):
        other.load_policy(tmp_path / "policy.safetensors")
    with torch.no_grad():
        model.heads[1].bias.add_(0.1)  # same structure, other weights: the policy would be silently off
    with pytest.raises(ValueError, match="exit heads with other weights"):
        model.load_policy(tmp_path / "policy.safetensors")


def test_oracle_cannot_be_installed():
    model = mlp_model()
    outputs = ExitOutputs(torch.stack(model.all_exits(torch.randn(20, D))), torch.randint(C, (20,)), [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="needs labels at inference"):
        model.calibrate(outputs, 2.0, policy="oracle")


def test_wrap_a_sequential_with_a_head_factory():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU())
    x = torch.randn(10, 1, 8, 8)
    model = wrap(seq, exits_after=[1, 3], heads=pooled_linear_head(C), example_input=x).eval()
    assert model.num_exits == 2
    logits = model.all_exits(x)
    assert [z.shape for z in logits] == [(10, C), (10, C)]
    torch.testing.assert_close(model.stages[1](model.stages[0](x)), seq(x))
    with pytest.raises(ValueError, match="ending at the last module"):
        wrap(seq, exits_after=[1, 2], heads=pooled_linear_head(C), example_input=x)
    with pytest.raises(TypeError, match="stages` and `heads`"):
        wrap(nn.Linear(2, 2))


def test_wrap_uses_stages_and_heads_and_costs_are_normalised():
    net = MultiExitCNN(widths=(4, 8, 8)).eval()
    model = wrap(net)
    costs = model.measure_costs("flops", torch.randn(2, 1, 28, 28))
    assert costs[-1] == 1.0 and all(a < b for a, b in zip(costs, costs[1:]))
    latency = model.measure_costs("latency", torch.randn(8, 1, 28, 28))
    assert len(latency) == 3 and latency[0] > 0 and all(a < b for a, b in zip(latency, latency[1:]))
    with pytest.raises(ValueError, match="one fraction per exit"):
        model.measure_costs("latency", torch.randn(8, 1, 28, 28), reach=[1.0, 0.5])
    assert model.measure_costs([1, 2, 3], None) == [1.0, 2.0, 3.0]
    with torch.no_grad():
        last, expected = model.all_exits(torch.zeros(1, 1, 28, 28))[-1], net(torch.zeros(1, 1, 28, 28))
    assert torch.equal(last, expected)


def test_latency_calibration_times_the_stages_at_the_batch_sizes_they_see():
    model = wrap(MultiExitCNN(widths=(4, 8, 8))).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 28, 28, generator=g)
    outputs = ExitOutputs(torch.stack(model.all_exits(x)), torch.randint(10, (64,), generator=g))
    with pytest.raises(ValueError, match="needs example="):
        model.calibrate(outputs, "0.97x", "maxprob", costs="latency")
    policy = model.calibrate(outputs, "0.97x", "maxprob", costs="latency", example=x[:32])
    costs = policy.costs.tolist()
    assert all(a < b for a, b in zip(costs, costs[1:]))
    assert model(x).exits.shape == (64,)
