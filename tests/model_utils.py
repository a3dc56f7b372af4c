"""A tiny multi-exit MLP and helpers shared by the runtime, calibration and persistence tests."""

import torch
from torch import nn

from eenet_fast import make_policy
from eenet_fast.outputs import ExitOutputs
from eenet_fast.runtime import EarlyExitModel

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


def with_plan(policy, plan):
    """``policy`` with a time model whose compaction plan is ``plan`` (``None``: compact after every exit)."""
    from eenet_fast.timing import LatencyModel

    ones = torch.ones(K, 1, dtype=torch.float64)
    policy.latency = None if plan is None else LatencyModel((1,), ones, torch.ones(1, dtype=torch.float64), torch.zeros(K + 1, 1),
                                                            compact_after=tuple(plan))
    return policy
