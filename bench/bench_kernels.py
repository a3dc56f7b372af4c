"""The Triton kernels against plain PyTorch on a CUDA device (skipped without one).

Run: ``python -m pytest bench/bench_kernels.py`` (add ``--benchmark-json=out.json`` to keep the
numbers). Each case is timed with CUDA events (median of ``REPEATS`` calls, L2 flushed before each
call, see :func:`cuda_time_us`), reported in ``extra_info`` with the achieved bandwidth; the
pytest-benchmark table shows wall-clock times of call plus synchronisation for the same calls.
Compare ratios within one run on one card, as in ``shared/reference/gpu-anchors.md``.

* decision: the fused kernel vs the eager reference (``decide_reference``) vs
  ``torch.compile`` of it; EENet-style head (per-class term, ``4 -> 16 -> 1`` MLP, 2 earlier
  scores); float32 logits, bfloat16 for ``C = 32000`` (LLM-style heads). GB/s counts the bytes a
  single pass must move (logits, earlier scores, outputs).
* compaction of ``[B, 64, 16, 16]`` fp16 activations with half of the rows kept: the Triton
  compaction (prefix sum, count read, gather) vs boolean indexing vs ``index_select`` with known
  indices vs a plain copy of as many rows (the floor). GB/s counts the kept rows read and written.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

pytest.importorskip("triton")

from eenet_fast.decision import ScoreHeadParams, decide_reference  # noqa: E402
from eenet_fast.kernels.compaction import compact  # noqa: E402
from eenet_fast.kernels.exit_decision import exit_decision  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel benchmarks need a CUDA device")

REPEATS = 50
ROUNDS = 20


def cuda_time_us(fn: Callable[[], object], *, warmup: int = 5, repeats: int = REPEATS, flush_l2: bool = True) -> float:
    """Median device time of ``fn()`` in microseconds, from CUDA events around each call.

    Host work inside ``fn`` (a synchronisation, a count read) is included, since the end event is
    recorded after ``fn`` returns. With ``flush_l2`` a 256 MiB buffer is zeroed before each call
    (outside the events), so that inputs are read from memory rather than from L2.
    """
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda") if flush_l2 else None
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for start, end in zip(starts, ends):
        if flush is not None:
            flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in zip(starts, ends))
    return 1000.0 * times[len(times) // 2]


def record(benchmark, fn: Callable[[], object], nbytes: int, **info: object) -> None:
    """Time ``fn`` with CUDA events into ``extra_info`` and with pytest-benchmark (call + sync)."""
    micros = cuda_time_us(fn)
    benchmark.extra_info.update(info, median_us_cuda_events=micros, gb_per_s=nbytes / micros / 1e3)

    def call_and_sync() -> None:
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(call_and_sync, rounds=ROUNDS, warmup_rounds=2)


def eenet_head(num_classes: int) -> ScoreHeadParams:
    """EENet's score head at exit 2 on CUDA: per-class term, 16 hidden units, 2 earlier scores (seeded)."""
    g = torch.Generator().manual_seed(0)
    hidden, k = 16, 2
    return ScoreHeadParams(
        torch.randn(num_classes, generator=g) * 0.1,
        torch.randn(k + 2, generator=g),
        torch.randn(hidden, k + 2, generator=g),
        torch.randn(hidden, generator=g),
        torch.randn(hidden, generator=g),
    ).to("cuda")


def require_free_memory(nbytes: int) -> None:
    free, _ = torch.cuda.mem_get_info()
    if nbytes > 0.8 * free:
        pytest.skip(f"needs about {nbytes / 2**30:.1f} GiB of GPU memory, {free / 2**30:.1f} GiB free")


# ------------------------------------------------------------------------------ the decision


@pytest.mark.parametrize("impl", ["fused", "eager", "compile"])
@pytest.mark.parametrize("num_classes", [10, 100, 1000, 32000])
@pytest.mark.parametrize("batch", [1024, 16384, 131072])
def test_decision(benchmark, impl, batch, num_classes):
    if impl == "compile" and (batch != 16384 or num_classes > 1000):
        pytest.skip("torch.compile is timed where the bar is set (B = 16384, C <= 1000): each shape compiles for tens of seconds")
    dtype = torch.bfloat16 if num_classes >= 32000 else torch.float32
    logit_bytes = batch * num_classes * dtype.itemsize
    # eager keeps float32 copies of the logits, log-probabilities, probabilities and p log p
    require_free_memory(logit_bytes + (0 if impl == "fused" else 4 * batch * num_classes * 4))
    head = eenet_head(num_classes)
    logits = torch.randn(batch, num_classes, device="cuda", dtype=dtype) * 3
    prev = torch.rand(batch, 2, device="cuda")  # the head's 2 earlier scores
    threshold = 0.5
    if impl == "fused":
        fn = lambda: exit_decision(logits, head, prev, threshold)  # noqa: E731
    elif impl == "eager":
        fn = lambda: decide_reference(logits, head, prev, threshold)  # noqa: E731
    else:
        torch._dynamo.reset()  # a fresh cache per shape: the recompile limit would silently fall back to eager

        @torch.compile
        def compiled(z: torch.Tensor) -> tuple[torch.Tensor, ...]:
            decision = decide_reference(z, head, prev, threshold)
            return decision.score, decision.prediction, decision.leave, decision.nonfinite

        fn = lambda: compiled(logits)  # noqa: E731
    nbytes = logit_bytes + prev.numel() * 4 + batch * (4 + 8 + 1 + 1)
    benchmark.group = f"decision B={batch} C={num_classes} {str(dtype).removeprefix('torch.')}"
    record(benchmark, fn, nbytes, impl=impl, batch=batch, num_classes=num_classes, dtype=str(dtype))


# ------------------------------------------------------------------------------ compaction


@pytest.mark.parametrize("impl", ["triton", "bool_index", "index_select", "copy_kept"])
@pytest.mark.parametrize("batch", [1024, 8192])
def test_compaction(benchmark, impl, batch):
    x = torch.randn(batch, 64, 16, 16, device="cuda", dtype=torch.float16)
    keep = torch.zeros(batch, dtype=torch.bool, device="cuda")
    keep[torch.randperm(batch, device="cuda")[: batch // 2]] = True
    index = keep.nonzero().squeeze(1)
    out = torch.empty_like(x[: batch // 2])
    fns = {
        "triton": lambda: compact(keep, x),
        "bool_index": lambda: x[keep],
        "index_select": lambda: x.index_select(0, index),
        "copy_kept": lambda: out.copy_(x[: batch // 2]),
    }
    nbytes = 2 * out.numel() * out.element_size()
    benchmark.group = f"compaction [{batch}, 64, 16, 16] fp16, half kept"
    record(benchmark, fns[impl], nbytes, impl=impl, batch=batch)
