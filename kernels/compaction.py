"""Batch compaction after an exit in Triton: write the leaving rows' results, gather the kept rows.

* :func:`keep_positions`: the inclusive prefix sum of the keep flags (``torch.cumsum`` on the
  device) gives each kept row its new position; its last entry is the count, read to the host once
  (the next batch's size).
* :func:`gather_kept`: copies the kept rows of a ``[B, ...]`` tensor to their positions; a row is
  ``row_numel`` elements, moved as raw words of the element's size (any dtype), so one kernel
  serves activations, sample ids and scores alike. Rows must be dense blocks (contiguous or
  channels-last tensors, or row slices of them); the output keeps the input's layout.
* :func:`write_exited`: scatters the leaving rows' logits, predictions and exit index, and the
  nonfinite flags, to their samples' positions (given by ``ids``).

The references are :func:`eenet_fast.compaction.compact_reference` and
:func:`eenet_fast.compaction.write_exited_reference`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from eenet_fast.kernels.exit_decision import INTERPRET, warps_for

__all__ = ["keep_positions", "gather_kept", "compact", "write_exited"]

_WORDS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_MAX_TILE = 1 << 16 if INTERPRET else 4096
_MAX_BLOCK_N = 1 << 14 if INTERPRET else 2048
_MAX_BLOCK_B = 256 if INTERPRET else 64


@triton.jit
def _gather_kept_kernel(
    src_ptr, src_pitch, dst_ptr, keep_ptr, positions_ptr, B, N,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    kept = tl.load(keep_ptr + rows, mask=rows < B, other=0) != 0
    dst_rows = tl.load(positions_ptr + rows, mask=kept, other=1) - 1
    mask = kept[:, None] & (cols < N)[None, :]
    x = tl.load(src_ptr + rows.to(tl.int64)[:, None] * src_pitch + cols[None, :], mask=mask)
    tl.store(dst_ptr + dst_rows[:, None] * N + cols[None, :], x, mask=mask)


@triton.jit
def _write_exited_kernel(
    leave_ptr, nonfinite_ptr, ids_ptr, prediction_ptr, logits_ptr, stride_lb, stride_lc,
    out_logits_ptr, stride_ob, stride_oc, out_predictions_ptr, out_exits_ptr, out_nonfinite_ptr,
    exit_index, B, C,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    leave = tl.load(leave_ptr + rows, mask=row_ok, other=0) != 0
    nonfinite = tl.load(nonfinite_ptr + rows, mask=row_ok, other=0) != 0
    dst = tl.load(ids_ptr + rows, mask=row_ok, other=0)
    tl.store(out_nonfinite_ptr + dst, tl.full([BLOCK_B], 1, tl.uint8), mask=nonfinite)
    tl.store(out_predictions_ptr + dst, tl.load(prediction_ptr + rows, mask=leave), mask=leave)
    tl.store(out_exits_ptr + dst, exit_index + tl.zeros([BLOCK_B], tl.int64), mask=leave)
    src_start = logits_ptr + rows.to(tl.int64) * stride_lb
    dst_start = out_logits_ptr + dst * stride_ob
    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = leave[:, None] & (cols < C)[None, :]
        cols64 = cols.to(tl.int64)[None, :]
        z = tl.load(src_start[:, None] + cols64 * stride_lc, mask=mask)
        tl.store(dst_start[:, None] + cols64 * stride_oc, z, mask=mask)


def _tiles(batch: int, row_numel: int) -> tuple[int, int]:
    block_n = min(triton.next_power_of_2(row_numel), _MAX_BLOCK_N)
    block_b = max(1, min(_MAX_BLOCK_B, _MAX_TILE // block_n, triton.next_power_of_2(batch)))
    return block_b, block_n


def _check_device(*tensors: torch.Tensor) -> None:
    device = tensors[0].device
    for t in tensors:
        if t.device != device:
            raise ValueError(f"all tensors must be on one device, got {device} and {t.device}")
    if not (device.type == "cuda" or INTERPRET):
        raise ValueError(
            f"the compaction kernels need CUDA tensors, got {device} (set TRITON_INTERPRET=1 before importing "
            "eenet_fast.kernels to run them on CPU tensors in Triton's interpreter)"
        )


def _check_flags(name: str, flags: torch.Tensor) -> None:
    if flags.ndim != 1 or flags.dtype != torch.bool:
        raise ValueError(f"{name} must be a [B] bool tensor, got {flags.dtype} {tuple(flags.shape)}")


def _dense_rows(t: torch.Tensor) -> bool:
    """Each row ``t[i]`` is one dense block of memory (its own layout inside is free)."""
    dims = sorted((stride, size) for size, stride in zip(t.shape[1:], t.stride()[1:]) if size > 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def keep_positions(keep: torch.Tensor) -> tuple[torch.Tensor, int]:
    """New positions of the kept rows and their count.

    Args:
        keep: ``[B]`` bool.

    Returns:
        ``positions`` ``[B]`` int64, the inclusive prefix sum of ``keep`` (a kept row ``i`` goes to
        ``positions[i] - 1``), on ``keep``'s device; and ``count``, read from its last entry (the
        one host synchronisation; none when ``B = 0``).
    """
    _check_flags("keep", keep)
    positions = torch.cumsum(keep, 0)
    return positions, int(positions[-1]) if keep.numel() else 0


def gather_kept(t: torch.Tensor, keep: torch.Tensor, positions: torch.Tensor, count: int) -> torch.Tensor:
    """The kept rows of ``t``, in order (see :func:`keep_positions`).

    Args:
        t: ``[B, ...]`` any dtype of 1, 2, 4 or 8 bytes and trailing shape. Rows that are not dense
            blocks (a column slice, a transpose) are made contiguous first.
        keep, positions, count: from :func:`keep_positions`.

    Returns:
        ``[count, ...]`` of ``t``'s dtype, with ``t``'s layout (e.g. channels-last stays so).
    """
    _check_flags("keep", keep)
    _check_device(t, keep, positions)
    if t.ndim < 1 or t.shape[0] != keep.shape[0]:
        raise ValueError(f"expected a tensor with the batch ({keep.shape[0]}) first, got shape {tuple(t.shape)}")
    word = _WORDS.get(t.element_size())
    if word is None:
        raise TypeError(f"cannot compact {t.dtype}: elements of 1, 2, 4 or 8 bytes only")
    if not _dense_rows(t):
        t = t.contiguous()
    batch, row_numel = t.shape[0], math.prod(t.shape[1:])
    out = torch.empty_strided((count, *t.shape[1:]), (row_numel, *t.stride()[1:]), dtype=t.dtype, device=t.device)
    if count == 0 or row_numel == 0:
        return out
    block_b, block_n = _tiles(batch, row_numel)
    grid = (triton.cdiv(batch, block_b), triton.cdiv(row_numel, block_n))
    _gather_kept_kernel[grid](
        t.view(word), t.stride(0), out.view(word), keep.view(torch.uint8), positions, batch, row_numel,
        BLOCK_B=block_b, BLOCK_N=block_n, num_warps=warps_for(block_b * block_n),
    )  # fmt: skip
    return out


def compact(keep: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The kept rows of every tensor ``[B, ...]``, in order: one prefix sum, one host read, one
    launch per tensor (none, and the inputs themselves returned, when every row is kept). Same
    result as :func:`~eenet_fast.compaction.compact_reference`."""
    _check_device(keep, *tensors)
    positions, count = keep_positions(keep)
    if count == keep.numel():
        return tensors
    return tuple(gather_kept(t, keep, positions, count) for t in tensors)


def write_exited(
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
    """Scatter the results of the rows leaving at exit ``exit_index`` to their samples' positions,
    in one launch and without a host synchronisation.

    Args:
        leave, nonfinite: ``[B]`` bool, the row leaves now / holds NaN or Inf.
        ids: ``[B]`` int64 distinct sample indices into the outputs.
        logits: ``[B, C]`` any floating dtype and strides; prediction: ``[B]`` int64.
        out_logits: ``[N, C]`` any strides (logits are cast to its dtype); out_predictions,
            out_exits: ``[N]`` int64 and out_nonfinite: ``[N]`` bool, contiguous. Only the leaving
            samples' rows are written, and ``out_nonfinite`` of every nonfinite row.
    """
    _check_flags("leave", leave)
    _check_flags("nonfinite", nonfinite)
    batch, total = leave.shape[0], out_logits.shape[0]
    if logits.ndim != 2 or logits.shape[0] != batch or out_logits.ndim != 2 or out_logits.shape[1] != logits.shape[1]:
        raise ValueError(
            f"expected logits [B={batch}, C] and out_logits [N, C], "
            f"got {tuple(logits.shape)} and {tuple(out_logits.shape)}"
        )
    vectors = (
        ("ids", ids, batch, torch.int64),
        ("prediction", prediction, batch, torch.int64),
        ("out_predictions", out_predictions, total, torch.int64),
        ("out_exits", out_exits, total, torch.int64),
        ("out_nonfinite", out_nonfinite, total, torch.bool),
    )
    for name, t, size, dtype in vectors:
        if t.shape != (size,) or t.dtype != dtype or (name.startswith("out") and not t.is_contiguous()):
            raise ValueError(f"{name} must be {dtype} [{size}] (outputs contiguous), got {t.dtype} {tuple(t.shape)}")
    _check_device(leave, ids, logits, prediction, nonfinite, out_logits, out_predictions, out_exits, out_nonfinite)
    if batch == 0:
        return
    block_b, block_c = _tiles(batch, logits.shape[1])
    _write_exited_kernel[(triton.cdiv(batch, block_b),)](
        leave.contiguous().view(torch.uint8), nonfinite.contiguous().view(torch.uint8), ids.contiguous(),
        prediction.contiguous(), logits, logits.stride(0), logits.stride(1),
        out_logits, out_logits.stride(0), out_logits.stride(1), out_predictions, out_exits,
        out_nonfinite.view(torch.uint8), exit_index, batch, logits.shape[1],
        BLOCK_B=block_b, BLOCK_C=block_c, num_warps=warps_for(block_b * block_c),
    )  # fmt: skip
