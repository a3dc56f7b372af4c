"""The policy file: round trip, and refusals that leave the model as it was."""

import pytest
import torch
from model_utils import C, D, K, mlp_model, random_policy
from torch import nn

from eenet_fast.runtime import EarlyExitModel


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


def test_a_refused_file_leaves_the_model_as_it_was(tmp_path):
    model = mlp_model()
    model.heads[0] = nn.Sequential(nn.Linear(D, C))
    model.new_heads = (0,)  # as if wrap had added head 0: its weights are saved with the policy
    random_policy(model, "maxprob", 1, 0.5)
    model.save_policy(tmp_path / "p.safetensors")
    policy = model.policy
    with torch.no_grad():
        model.heads[1].bias.add_(0.1)  # the model was changed after saving: the file must be refused
        model.heads[0][0].weight.mul_(2)
    heads_before = {k: v.clone() for k, v in model.heads.state_dict().items()}
    with pytest.raises(ValueError, match="exit heads with other weights"):
        model.load_policy(tmp_path / "p.safetensors")
    assert all(torch.equal(v, heads_before[k]) for k, v in model.heads.state_dict().items())
    assert model.policy is policy


def test_a_policy_file_loads_into_a_fresh_model_on_its_device_and_precision(tmp_path):
    model = mlp_model()
    random_policy(model, "eenet", 4, 0.6)
    model.save_policy(tmp_path / "p.safetensors")
    fresh = mlp_model()
    loaded = fresh.load_policy(tmp_path / "p.safetensors")
    assert loaded.thresholds.dtype == torch.float32 and not any(p.requires_grad for p in loaded.parameters())
    x = torch.randn(33, D)
    assert torch.equal(fresh(x).exits, model(x).exits)
