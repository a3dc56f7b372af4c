"""The plain-PyTorch compaction: the kept rows, in order, in the input's memory layout."""

import pytest
import torch

from eenet_fast.compaction import compact_reference

g = torch.Generator().manual_seed(0)
LAYOUTS = {
    "contiguous": torch.randn(9, 3, 4, 5, generator=g),
    "channels-last": torch.randn(9, 3, 4, 5, generator=g).to(memory_format=torch.channels_last),
    "half, channels-last": torch.randn(9, 6, 1, 1, generator=g).half().to(memory_format=torch.channels_last),
    "sliced columns": torch.randn(9, 8, generator=g)[:, 1::3],
    "batch not outermost": torch.randn(7, 9, generator=g).t(),
    "one-dimensional int64": torch.randint(100, (9,), generator=g),
    "bool": torch.rand(9, 2, generator=g) > 0.5,
    "size-1 dims": torch.randn(9, 1, 3, generator=g),
}


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("kept", [[0, 2, 3, 8], [4], []])
def test_compaction_keeps_the_rows_asked_in_the_input_layout(name, kept):
    t = LAYOUTS[name]
    keep = torch.zeros(t.shape[0], dtype=torch.bool)
    keep[kept] = True
    (got,) = compact_reference(keep, t)
    want = t[torch.tensor(kept, dtype=torch.long)]
    assert got.dtype == t.dtype and got.shape == (len(kept), *t.shape[1:]) and torch.equal(got, want)
    if name.endswith("channels-last") and len(kept) > 1:  # the next stage gets the layout it was built for
        assert got.is_contiguous(memory_format=torch.channels_last)


def test_compact_reference_keeps_rows_in_order_and_copies_nothing_when_all_stay():
    t = LAYOUTS["channels-last"]
    keep = torch.tensor([True, False, True, True, False, False, True, False, True])
    ids, rows = compact_reference(keep, torch.arange(9), t)
    assert ids.tolist() == [0, 2, 3, 6, 8] and torch.equal(rows, t[ids])
    every = torch.ones(9, dtype=torch.bool)
    assert compact_reference(every, t)[0] is t
    with pytest.raises(ValueError, match="batch"):
        compact_reference(keep, torch.zeros(4, 2))
