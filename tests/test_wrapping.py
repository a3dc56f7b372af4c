"""wrap() of an nn.Sequential and of a module with stages and heads (the recognised families are in
test_families.py)."""

import pytest
import torch
from torch import nn

from eenet_fast.heads import pooled_linear_head
from eenet_fast.wrapping import wrap

C = 5


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


def test_a_bfloat16_sequential_gets_bfloat16_heads_and_runs():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8)).to(torch.bfloat16)
    x = torch.randn(7, 6, dtype=torch.bfloat16)
    model = wrap(seq, exits_after=[1, 2], heads=pooled_linear_head(C), example_input=x).eval()
    assert all(p.dtype == torch.bfloat16 for p in model.heads.parameters())
    assert [z.dtype for z in model.all_exits(x)] == [torch.bfloat16, torch.bfloat16]


@pytest.mark.parametrize("exits_after", [[3, 1], [1, 1, 3], [-1, 3], [1, 4]])
def test_exits_out_of_order_reused_or_out_of_range_are_refused(exits_after):
    seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ValueError, match="increasing module indices"):
        wrap(seq, exits_after=exits_after, heads=pooled_linear_head(C), example_input=torch.randn(2, 4))
