"""Batch compaction after an exit, in plain PyTorch: the reference of ``eenet_fast.kernels.compaction``.

After the decision at exit ``k`` on the ``B`` rows still running (sample ids ``ids [B]``):

* the leaving rows' results go to their samples' positions in the outputs (:func:`write_exited_reference`);
* the kept rows of every per-sample tensor are gathered, in order, into new tensors with
  ``count = keep.sum()`` rows (:func:`compact_reference`).
"""

from __future__ import annotations

import torch

__all__ = ["compact_reference", "write_exited_reference"]


def compact_reference(keep: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The rows of each tensor where ``keep`` is true, in order.

    Args:
        keep: ``[B]`` bool.
        tensors: tensors ``[B, ...]`` of any dtype and trailing shape.

    Returns:
        One ``[count, ...]`` tensor per input (advanced indexing, which keeps channels-last
        strides; one host sync to count the rows). When every row is kept, the inputs themselves
        (no copy); when none is, empty views of them.
    """
    if keep.ndim != 1 or keep.dtype != torch.bool:
        raise ValueError(f"keep must be a [B] bool tensor, got {keep.dtype} {tuple(keep.shape)}")
    for t in tensors:
        if t.ndim < 1 or t.shape[0] != keep.shape[0]:
            raise ValueError(f"every tensor needs the batch ({keep.shape[0]}) first, got shape {tuple(t.shape)}")
    index = keep.nonzero().squeeze(1)
    if index.numel() == keep.numel():
        return tensors
    if index.numel() == 0:  # every row left: empty views, not a gather per tensor
        return tuple(t[:0] for t in tensors)
    return tuple(t[index] for t in tensors)


def write_exited_reference(
    leave: torch.Tensor,
    ids: torch.Tensor,
    logits: torch.Tensor,
    prediction: torch.Tensor,
    nonfinite: torch.Tensor,
    exit_index: int,
    out_logits: torch.Tensor,
    out_predictions: torch.Tensor,
    out_exits: torch.Tensor,
    out_nonfinite: torch.Tensor,
) -> None:
    """Write the results of the rows that leave at exit ``exit_index`` to their samples' positions.

    Args:
        leave, nonfinite: ``[B]`` bool, the row leaves now / holds NaN or Inf.
        ids: ``[B]`` int64 sample index of each row in the outputs.
        logits: ``[B, C]``; prediction: ``[B]`` int64.
        out_logits: ``[N, C]``; out_predictions, out_exits: ``[N]`` int64; out_nonfinite: ``[N]`` bool.
            Rows of leaving samples are overwritten (logits cast to ``out_logits``' dtype);
            ``out_nonfinite`` is set for every nonfinite row, leaving or not.

    On the CPU, only the leaving rows (and the flags of the nonfinite ones) are indexed. Under
    ``torch.compile`` and on other devices every row in ``ids`` is rewritten instead (the staying
    ones with their own values): no shape in the graph depends on the data, and no host read
    waits for the device. Both give the same outputs.
    """
    if torch.compiler.is_compiling() or leave.device.type != "cpu":
        stay = ~leave
        out_nonfinite.index_copy_(0, ids, out_nonfinite[ids] | nonfinite)
        out_logits.index_copy_(0, ids, torch.where(stay[:, None], out_logits[ids], logits.to(out_logits.dtype)))
        out_exits.index_copy_(0, ids, out_exits[ids].masked_fill(leave, exit_index))
        out_predictions.index_copy_(0, ids, torch.where(stay, out_predictions[ids], prediction))
        return
    if nonfinite.any():  # a read on the CPU costs less than an OR over every row
        out_nonfinite[ids[nonfinite]] = True
    index = leave.nonzero().squeeze(1)
    if index.numel() == 0:
        return
    if index.numel() < leave.numel():
        ids, logits, prediction = ids[index], logits[index], prediction[index]
    out_logits.index_copy_(0, ids, logits.to(out_logits.dtype))
    out_exits.index_fill_(0, ids, exit_index)
    out_predictions.index_copy_(0, ids, prediction)
