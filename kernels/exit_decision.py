"""The exit decision fused into one Triton kernel: one launch per exit, the logits read once.

For every row of logits ``z`` (``[B, C]``, float32/float16/bfloat16, any strides) the kernel makes
one pass over the classes in ``BLOCK_C`` chunks, keeping in float32 per row::

    M = running max of z        S = sum_c e^{z_c - M}        T = sum_c e^{z_c - M} (z_c - M)
    W = sum_c w_c e^{z_c - M}   argmax (first index on ties) and whether any z_c is NaN/Inf

rescaling ``S, T, W`` when ``M`` grows (``T`` also shifts: ``T' = a (T + (M - M') S)``,
``a = e^{M - M'}``). Then ``m = 1 / S``, ``H = log S - T / S``, ``e = 1 - H / log C``,
``w . p = W / S``, the head's linear term and ReLU layer on ``g = [m, e, q_0, ...]`` (a
``[BLOCK_B, H]`` tile), ``q`` and ``leave = q >= T_k`` on finite rows. A program handles
``BLOCK_B`` rows; the grid is ``cdiv(B, BLOCK_B)``.

The reference is :func:`eenet_fast.decision.decide_reference`.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from eenet_fast.decision import Decision, ScoreHeadParams, check_decision_inputs

__all__ = ["exit_decision", "row_align", "INTERPRET"]

#: The kernels were defined under Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import): they
#: then take CPU tensors, and big tiles keep the number of (slow, ~10 ms) interpreted programs small.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# On an H200 (bench/results/gpu-h200-2026-11-27.md, python bench/sweep_decision_tiles.py) tiles of
# 2048 elements on 4 warps beat those of 8192 on 8 at every C: 2 x 1024 read C = 1000 rows at 1581 GB/s
# against 706 for 8 x 1024, and bf16 C = 32000 ones at 1180 against 1006 for 2 x 4096.
_MAX_TILE = 1 << 16 if INTERPRET else 2048  # elements of the [BLOCK_B, BLOCK_C] tile
_MAX_BLOCK_C = 32768 if INTERPRET else 1024
_MAX_BLOCK_B = 256 if INTERPRET else 64


@triton.jit
def _exit_decision_kernel(
    logits_ptr, stride_lb, stride_lc,
    prev_ptr, stride_pb, stride_pk,
    class_weight_ptr, linear_ptr, hidden_weight_ptr, hidden_bias_ptr, out_weight_ptr,
    score_ptr, stride_score, prediction_ptr, stride_prediction,
    leave_ptr, stride_leave, nonfinite_ptr, stride_nonfinite,
    B, C, log_c, threshold, hidden,
    NUM_INPUTS: tl.constexpr, HAS_CLASS: tl.constexpr, HAS_HIDDEN: tl.constexpr, BLOCK_H: tl.constexpr,
    LAST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, ROW_ALIGN: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    # every row starts ROW_ALIGN-aligned (the wrapper checked): with unit column stride, vector loads
    row_start = logits_ptr + tl.multiple_of(rows64 * stride_lb, ROW_ALIGN)
    chunk = tl.arange(0, BLOCK_C)

    run_max = tl.full([BLOCK_B], float("-inf"), tl.float32)
    run_arg = tl.zeros([BLOCK_B], tl.int32)
    sum_exp = tl.zeros([BLOCK_B], tl.float32)  # S
    sum_exp_shift = tl.zeros([BLOCK_B], tl.float32)  # T
    sum_exp_weight = tl.zeros([BLOCK_B], tl.float32)  # W
    bad = tl.zeros([BLOCK_B], tl.int32)
    for start in range(0, C, BLOCK_C):
        cols = tl.max_contiguous(tl.multiple_of(start + chunk, BLOCK_C), BLOCK_C)
        col_ok = cols < C
        z = tl.load(
            row_start[:, None] + cols.to(tl.int64)[None, :] * stride_lc,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        bad = tl.maximum(bad, tl.max((~(tl.abs(z) < float("inf"))).to(tl.int32), 1))  # NaN or +-Inf
        z = tl.where(col_ok[None, :], z, float("-inf"))

        chunk_max = tl.max(z, 1)
        chunk_arg = tl.min(tl.where(z == chunk_max[:, None], cols[None, :], C), 1)
        run_arg = tl.where(chunk_max > run_max, chunk_arg, run_arg)  # strict: ties keep the earlier index
        new_max = tl.maximum(run_max, chunk_max)
        shift = tl.where(sum_exp > 0, run_max - new_max, 0.0)  # M - M' (0 before any term: S = T = W = 0)
        rescale = tl.exp(run_max - new_max)
        sum_exp_shift = rescale * (sum_exp_shift + shift * sum_exp)
        sum_exp = rescale * sum_exp
        sum_exp_weight = rescale * sum_exp_weight
        run_max = new_max

        d = tl.where(col_ok[None, :], z - new_max[:, None], 0.0)
        p = tl.where(col_ok[None, :], tl.exp(d), 0.0)
        sum_exp += tl.sum(p, 1)
        sum_exp_shift += tl.sum(p * d, 1)
        if HAS_CLASS:
            w = tl.load(class_weight_ptr + cols, mask=col_ok, other=0.0)
            sum_exp_weight += tl.sum(p * w[None, :], 1)

    max_score = 1.0 / sum_exp
    entropy = tl.log(sum_exp) - sum_exp_shift / sum_exp
    entropy_conf = 1.0 - entropy / log_c

    # score head on g = [m, e, q_0, ..., q_{n-3}]
    q = tl.load(linear_ptr) * max_score + tl.load(linear_ptr + 1) * entropy_conf
    if HAS_HIDDEN:
        units = tl.arange(0, BLOCK_H)
        unit_ok = units < hidden
        column = hidden_weight_ptr + units * NUM_INPUTS
        pre = (
            tl.load(hidden_bias_ptr + units, mask=unit_ok, other=0.0)[None, :]
            + max_score[:, None] * tl.load(column, mask=unit_ok, other=0.0)[None, :]
            + entropy_conf[:, None] * tl.load(column + 1, mask=unit_ok, other=0.0)[None, :]
        )
    for i in tl.static_range(2, NUM_INPUTS):
        earlier = tl.load(prev_ptr + rows64 * stride_pb + (i - 2) * stride_pk, mask=row_ok, other=0.0)
        q += tl.load(linear_ptr + i) * earlier
        if HAS_HIDDEN:
            pre += earlier[:, None] * tl.load(column + i, mask=unit_ok, other=0.0)[None, :]
    if HAS_HIDDEN:
        out_weight = tl.load(out_weight_ptr + units, mask=unit_ok, other=0.0)
        q += tl.sum(tl.maximum(pre, 0.0) * out_weight[None, :], 1)
    if HAS_CLASS:
        q += sum_exp_weight / sum_exp

    finite = bad == 0
    if LAST:
        leave = row_ok
    else:
        leave = (q >= threshold) & finite
    tl.store(score_ptr + rows64 * stride_score, q, mask=row_ok)
    tl.store(prediction_ptr + rows64 * stride_prediction, run_arg.to(tl.int64), mask=row_ok)
    tl.store(leave_ptr + rows64 * stride_leave, leave.to(tl.uint8), mask=row_ok)
    tl.store(nonfinite_ptr + rows64 * stride_nonfinite, (~finite).to(tl.uint8), mask=row_ok)


def _tiles(batch: int, num_classes: int) -> tuple[int, int]:
    """``(BLOCK_B, BLOCK_C)``: chunks of up to ``_MAX_BLOCK_C`` classes, rows to fill a tile."""
    block_c = min(triton.next_power_of_2(num_classes), _MAX_BLOCK_C)
    block_b = max(1, min(_MAX_BLOCK_B, _MAX_TILE // block_c, triton.next_power_of_2(batch)))
    return block_b, block_c


def row_align(t: torch.Tensor, most: int = 16) -> int:
    """The largest power of 2, up to ``most``, that divides the element offset of every row's start
    in float32 ``t`` (``[B, C]``): its row stride and its address in elements; 1 when that allows no
    16-byte vector, and for 2-byte logits. Triton only learns this by itself for strides divisible
    by 16 (rows of C = 1000 or C = 100 classes would be read a word at a time). The narrower or
    2-byte hints are not given: on sm_90 8-byte hints made the C = 10 decision use stack, and on
    sm_80 16-byte ones made the float16/bfloat16 C = 1000 decision spill (``bench/compile_kernels.py``)."""
    if t.element_size() != 4:
        return 1
    align, address = most, t.data_ptr()
    while align > 1 and (t.stride(0) % align or address % (align * t.element_size())):
        align //= 2
    return align if align * t.element_size() >= 16 else 1


def warps_for(tile: int) -> int:
    """Warps for a program over ``tile`` elements: 4 up to 2048, 8 above. On 4 warps, tiles of 4096
    (32 elements a thread) spilled on sm_90 (``python bench/compile_kernels.py``)."""
    return 4 if tile <= 2048 else 8


def _check_out(out: Decision, batch: int, device: torch.device) -> None:
    expected = {"score": torch.float32, "prediction": torch.int64, "leave": torch.bool, "nonfinite": torch.bool}
    for name, dtype in expected.items():
        t = getattr(out, name)
        if t.shape != (batch,) or t.dtype != dtype or t.device != device:
            raise ValueError(
                f"out.{name} must be {dtype} [{batch}] on {device}, got {t.dtype} {tuple(t.shape)} on {t.device}"
            )


def exit_decision(
    logits: torch.Tensor,
    head: ScoreHeadParams,
    prev_scores: torch.Tensor,
    threshold: float | torch.Tensor,
    last: bool = False,
    *,
    out: Decision | None = None,
    block_b: int | None = None,
    block_c: int | None = None,
    align: int | None = None,
) -> Decision:
    """The exit decision of :func:`~eenet_fast.decision.decide_reference` in one kernel launch.

    Args:
        logits: ``[B, C]`` float32, float16 or bfloat16, any strides; CUDA (CPU under the interpreter).
        head: the score head, float32 on ``logits``' device.
        prev_scores: ``[B, k]`` float32 earlier scores, any strides; the head reads the first ``n - 2``.
        threshold: ``T_k`` (a float32 value, ``+-inf`` allowed); ignored when ``last``.
        last: the last exit: every row leaves.
        out: tensors to write into (any 1-D strides), e.g. ``score`` a column of a ``[B, K]`` score
            state; fresh tensors when ``None``.
        block_b, block_c: rows per program and classes per chunk (powers of 2); chosen from ``B, C``
            when ``None``.
        align: the alignment (elements, a power of 2) the kernel assumes for each row's start, for
            vector loads; :func:`row_align` of ``logits`` when ``None`` (1 assumes nothing).

    Returns:
        :class:`~eenet_fast.decision.Decision` (``out`` when given). Nothing is launched when ``B = 0``.
    """
    check_decision_inputs(logits, head, prev_scores)
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"the fused decision reads float32, float16 or bfloat16 logits, got {logits.dtype}")
    if not (logits.is_cuda or INTERPRET):
        raise ValueError(
            f"the fused decision needs CUDA tensors, got {logits.device} (set TRITON_INTERPRET=1 before importing "
            "eenet_fast.kernels to run it on CPU tensors in Triton's interpreter)"
        )
    batch, num_classes = logits.shape
    if out is None:
        out = Decision(
            logits.new_empty(batch, dtype=torch.float32),
            logits.new_empty(batch, dtype=torch.int64),
            logits.new_empty(batch, dtype=torch.bool),
            logits.new_empty(batch, dtype=torch.bool),
        )
    else:
        _check_out(out, batch, logits.device)
    if batch == 0:
        return out
    default_b, default_c = _tiles(batch, num_classes)
    block_b, block_c = block_b or default_b, block_c or default_c
    leave, nonfinite = out.leave.view(torch.uint8), out.nonfinite.view(torch.uint8)
    linear = head.linear.contiguous()
    # absent parameters are never read (their HAS_* flag is off); pass `linear` in their place
    class_weight = linear if head.class_weight is None else head.class_weight.contiguous()
    hidden_weight = linear if head.mlp_weight is None else head.mlp_weight.contiguous()
    hidden_bias = linear if head.mlp_bias is None else head.mlp_bias.contiguous()
    out_weight = linear if head.mlp_out is None else head.mlp_out.contiguous()
    _exit_decision_kernel[(triton.cdiv(batch, block_b),)](
        logits, logits.stride(0), logits.stride(1),
        prev_scores, prev_scores.stride(0), prev_scores.stride(1),
        class_weight, linear, hidden_weight, hidden_bias, out_weight,
        out.score, out.score.stride(0), out.prediction, out.prediction.stride(0),
        leave, leave.stride(0), nonfinite, nonfinite.stride(0),
        batch, num_classes, math.log(num_classes), float(threshold), head.mlp_width,
        NUM_INPUTS=head.num_inputs, HAS_CLASS=head.class_weight is not None, HAS_HIDDEN=head.mlp_width > 0,
        BLOCK_H=max(16, triton.next_power_of_2(head.mlp_width)), LAST=bool(last),
        BLOCK_B=block_b, BLOCK_C=block_c, ROW_ALIGN=row_align(logits) if align is None else align,
        num_warps=warps_for(block_b * block_c),
    )  # fmt: skip
    return out
