"""The compaction kernels (``eenet_fast.kernels.compaction``) against their PyTorch references
(``eenet_fast.compaction``)."""

import math

import pytest
import torch

pytest.importorskip("triton")

from eenet_fast.kernels.compaction import (  # noqa: E402
    compact,
    gather_kept,
    keep_positions,
    write_exited,
)
from kernel_utils import DEVICE, DTYPES, gen, keep_flags  # noqa: E402

from eenet_fast.compaction import compact_reference, write_exited_reference  # noqa: E402


def per_sample_tensors(batch: int) -> list[torch.Tensor]:
    g = gen(batch)
    return [
        torch.randn(batch, 3, 5, 5, generator=g).half(),
        torch.randint(-(2**40), 2**40, (batch, 7), generator=g),
        torch.randn(batch, 4, 6, 6, generator=g).to(memory_format=torch.channels_last),
        torch.rand(batch, generator=g) > 0.5,
        torch.arange(batch),
        torch.randn(batch, 0),
        torch.randn(batch, 6, generator=g)[:, ::2],  # rows not dense: made contiguous
        torch.randn(2 * batch, 5, generator=g)[::2],  # dense rows 10 elements apart
        torch.randn(batch, 2, generator=g).bfloat16(),
    ]


@pytest.mark.parametrize("batch", [0, 1, 7, 128, 1000])
@pytest.mark.parametrize("mode", ["all", "none", "random"])
def test_compact_matches_index_select(batch, mode):
    keep = keep_flags(batch, mode).to(DEVICE)
    tensors = [t.to(DEVICE) for t in per_sample_tensors(batch)]
    got = compact(keep, *tensors)
    ref = compact_reference(keep, *tensors)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.dtype == r.dtype and g.shape == r.shape and torch.equal(g, r)
    assert got[2].is_contiguous(memory_format=torch.channels_last)
    positions, count = keep_positions(keep)
    assert count == int(keep.sum()) and positions.shape == (batch,)


def test_gather_reuses_positions_and_checks_its_inputs():
    keep = keep_flags(50, "random").to(DEVICE)
    x = torch.randn(50, 3, device=DEVICE)
    positions, count = keep_positions(keep)
    torch.testing.assert_close(gather_kept(x, keep, positions, count), x[keep], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\[B\] bool"):
        compact(keep.long(), x)
    with pytest.raises(ValueError, match="batch \\(50\\) first"):
        compact(keep, x[:49])
    with pytest.raises(TypeError, match="1, 2, 4 or 8 bytes"):
        compact(keep, torch.zeros(50, dtype=torch.complex128, device=DEVICE))


@pytest.mark.parametrize("batch", [0, 1, 7, 128, 1000])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["random", "all", "none"])  # the reference skips or takes every row in the last two
def test_write_exited_matches_reference(batch, dtype, mode):
    g = gen(batch)
    total, num_classes = batch + 13, 10
    ids = torch.randperm(total, generator=g)[:batch]
    logits = torch.randn(batch, num_classes + 4, generator=g).to(dtype)[:, 2 : 2 + num_classes]
    leave = torch.rand(batch, generator=g) > 0.5 if mode == "random" else keep_flags(batch, mode)
    nonfinite = torch.rand(batch, generator=g) > 0.8
    prediction = torch.randint(num_classes, (batch,), generator=g)
    outs = [
        torch.full((total, num_classes), math.nan, dtype=dtype),
        torch.full((total,), -7, dtype=torch.long),
        torch.full((total,), -7, dtype=torch.long),
        torch.rand(total, generator=g) > 0.7,
    ]
    inputs = [t.to(DEVICE) for t in (leave, ids, logits, prediction, nonfinite)]
    got = [t.to(DEVICE) for t in outs]
    ref = [t.to(DEVICE) for t in outs]
    write_exited(*inputs, 2, *got)
    write_exited_reference(*inputs, 2, *ref)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
