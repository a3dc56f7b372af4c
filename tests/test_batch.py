"""The per-sample contract of batches and stage states: every tensor batch-first, shared ones declared."""

import pytest
import torch
from model_utils import C, D, K
from torch import nn

from eenet_fast import Shared, make_policy
from eenet_fast.batch import batch_size, describe, map_batch, move_to
from eenet_fast.errors import InputError
from eenet_fast.outputs import ExitOutputs
from eenet_fast.runtime import EarlyExitModel

ROWS = 16  # the shared table has as many rows as one of the batches below


class Embed(nn.Module):
    """Stage 0: the input and a table every sample reads (shared, or wrongly left bare)."""

    def __init__(self, shared: bool):
        super().__init__()
        self.table = nn.Parameter(torch.randn(ROWS, D))
        self.shared = shared

    def forward(self, x):
        return {"h": x, "table": Shared(self.table) if self.shared else self.table}


class Attend(nn.Module):
    """Later stages: each sample attends over the whole table."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, state):
        table = state["table"].value if isinstance(state["table"], Shared) else state["table"]
        h = torch.tanh(self.lin(state["h"]) + torch.softmax(state["h"] @ table.T, -1) @ table)
        return {"h": h, "table": state["table"]}


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, C)

    def forward(self, state):
        return self.lin(state["h"])


def table_model(shared: bool) -> EarlyExitModel:
    torch.manual_seed(0)
    stages = [nn.Sequential(Embed(shared), Attend())] + [Attend() for _ in range(K - 1)]
    model = EarlyExitModel(stages, [Head() for _ in range(K)], backend="torch").eval()
    x = torch.randn(200, D)
    outputs = ExitOutputs(torch.stack(model.all_exits(x)), torch.randint(C, (200,)), [1.0, 2.0, 3.0])
    model.policy = make_policy("maxprob").fit(outputs, 1.8)  # about half the samples leave at the first exit
    return model


def test_a_shared_table_with_as_many_rows_as_the_batch_is_not_cut():
    model = table_model(shared=True)
    x = torch.randn(17, D, generator=torch.Generator().manual_seed(1))
    results = {n: model(x[:n]) for n in (ROWS - 1, ROWS, ROWS + 1)}
    assert 0 < int((results[ROWS].exits == 0).sum()) < ROWS  # samples did leave early: the state was compacted
    for n, result in results.items():  # a sample's result does not depend on its batch
        torch.testing.assert_close(result.logits, results[ROWS + 1].logits[:n], rtol=1e-6, atol=1e-6)
        assert torch.equal(result.exits, results[ROWS + 1].exits[:n])
    for i in range(ROWS):
        alone = model(x[i : i + 1])
        torch.testing.assert_close(alone.logits[0], results[ROWS].logits[i], rtol=1e-6, atol=1e-6)


def test_a_bare_tensor_without_the_batch_first_is_an_error_naming_its_place():
    model = table_model(shared=False)
    with pytest.raises(InputError, match=r"the output of stage 0\['table'\] is a tensor of shape \(16, 12\).*Shared"):
        model(torch.randn(ROWS - 1, D))


def test_map_batch_maps_per_sample_tensors_at_any_depth_and_passes_the_rest():
    table = torch.randn(5, 2)
    state = {"a": torch.arange(4), "b": [torch.zeros(4, 3), (torch.tensor(2.0), None)], "t": Shared(table), "s": "text"}
    out = map_batch(lambda t: t[:2], state, 4)
    assert out["a"].tolist() == [0, 1] and out["b"][0].shape == (2, 3)
    assert out["b"][1][0].item() == 2.0 and out["b"][1][1] is None and out["s"] == "text"
    assert out["t"] is state["t"] and out["t"].value is table
    with pytest.raises(InputError, match=r"the state\['b'\]\[0\] is a tensor of shape \(3, 3\)"):
        map_batch(lambda t: t, {"a": torch.arange(4), "b": [torch.zeros(3, 3)]}, 4)


def test_batch_size_move_to_and_describe_know_shared_values():
    x = {"t": Shared(torch.zeros(7)), "x": torch.zeros(3, 2, dtype=torch.float64)}
    assert batch_size(x) == 3
    moved = move_to(x, "cpu")
    assert isinstance(moved["t"], Shared) and moved["t"].value.shape == (7,)
    assert describe(x) == "a dict {'t': Shared(float32 [7] on cpu), 'x': float64 [3, 2] on cpu}"
    with pytest.raises(InputError, match="cannot find the batch"):
        batch_size("not a batch")
