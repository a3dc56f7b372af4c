"""The kernel variants the dispatchers launch, as dispatcher calls (see ``compile_kernels.py``).

A :class:`Variant` calls :func:`~eenet_fast.kernels.exit_decision.exit_decision`,
:func:`~eenet_fast.kernels.compaction.gather_kept` or :func:`~eenet_fast.kernels.compaction.write_exited`
on CPU tensors of a given dtype and shape (``torch.empty``: no data is touched). The full grid:
logits of float32/float16/bfloat16 with ``C`` = 10, 1000, 32000, 128256 classes and a batch for
every tile ``_tiles`` picks for that ``C``; heads with and without the per-class term and the
hidden layer (16 units, 2 earlier scores), and the last exit; the write of the leaving rows'
logits; the gather of rows of 1, 1000 and 150528 words of 1, 2, 4 and 8 bytes (ids, scores,
activations).

Import it with ``TRITON_INTERPRET`` unset (``compile_kernels.py`` sees to it): the tiles the
dispatchers pick, and the kernels themselves, are fixed when ``eenet_fast.kernels`` is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from eenet_fast.decision import ScoreHeadParams
from eenet_fast.kernels import compaction, exit_decision


@dataclass(frozen=True)
class Variant:
    """One dispatcher call: ``kernel`` names the kernel it launches, ``call`` makes the call."""

    kernel: str
    name: str
    call: Callable[[], None]


def _decision_call(dtype: torch.dtype, batch: int, classes: int, head: str, last: bool = False) -> Callable[[], None]:
    """``exit_decision`` on ``[batch, classes]`` logits; ``head`` is ``plain`` (the max score),
    ``class``, ``hidden`` or ``class+hidden`` (EENet's head at exit 2: 2 earlier scores, 16 units)."""

    def call() -> None:
        n, hidden = 4, 16
        params = (
            ScoreHeadParams.select(0)
            if head == "plain"
            else ScoreHeadParams(
                torch.rand(classes) if "class" in head else None,
                torch.rand(n),
                *((torch.rand(hidden, n), torch.rand(hidden), torch.rand(hidden)) if "hidden" in head else ()),
            )
        )
        logits = torch.empty(batch, classes, dtype=dtype)
        exit_decision.exit_decision(logits, params, torch.rand(batch, 2), 0.5, last)

    return call


def _keep(batch: int) -> torch.Tensor:
    return torch.arange(batch) % 2 == 0


def _gather_call(dtype: torch.dtype, batch: int, row_numel: int) -> Callable[[], None]:
    """``gather_kept`` of a ``[batch]`` (``row_numel`` 1) or ``[batch, row_numel]`` tensor, half kept."""

    def call() -> None:
        keep = _keep(batch)
        positions, count = compaction.keep_positions(keep)
        shape = (batch,) if row_numel == 1 else (batch, row_numel)
        compaction.gather_kept(torch.empty(shape, dtype=dtype), keep, positions, count)

    return call


def _write_call(dtype: torch.dtype, batch: int, classes: int) -> Callable[[], None]:
    """``write_exited`` of ``[batch, classes]`` logits into outputs for ``batch`` samples, half leaving."""

    def call() -> None:
        logits, ids = torch.empty(batch, classes, dtype=dtype), torch.arange(batch)
        flags, outputs = _keep(batch), torch.zeros(batch, dtype=torch.long)
        compaction.write_exited(flags, ids, logits, ids, ~flags, 1, torch.empty_like(logits), outputs,
                                outputs.clone(), torch.zeros(batch, dtype=torch.bool))  # fmt: skip

    return call


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


#: Batches tried for each size; the full grid keeps one per tile ``_tiles`` picks. Not multiples of 16,
#: like most batches after compaction (1 is specialised by the JIT as a constant).
BATCHES = (200, 33, 17, 9, 5, 3, 2, 1)
CLASSES = (10, 1000, 32000, 128256)
HEADS = ("plain", "class", "hidden", "class+hidden")


def _batches(tiles: Callable[[int, int], tuple[int, int]], size: int) -> list[int]:
    """One batch per tile ``tiles(batch, size)`` picks among :data:`BATCHES` (the largest that gives it)."""
    chosen: dict[tuple[int, int], int] = {}
    for batch in BATCHES:
        chosen.setdefault(tiles(batch, size), batch)
    return sorted(chosen.values())


def variants(grid: str) -> list[Variant]:
    """The dispatcher calls of ``grid``: ``full`` (see the module docstring: every tile ``_tiles``
    picks) or ``ci`` (a small-C float32 decision, large-C decisions in bfloat16 with both head terms
    and in float32 for one row, the gather and the write of 2-byte rows of 1000)."""
    if grid == "ci":
        return [
            Variant("decision", "float32 B=200 C=10 plain", _decision_call(torch.float32, 200, 10, "plain")),
            Variant("decision", "bfloat16 B=200 C=128256 class+hidden",
                    _decision_call(torch.bfloat16, 200, 128256, "class+hidden")),  # fmt: skip
            Variant("decision", "float32 B=1 C=128256 class", _decision_call(torch.float32, 1, 128256, "class")),
            Variant("gather", "bfloat16 B=200 N=1000", _gather_call(torch.bfloat16, 200, 1000)),
            Variant("write", "bfloat16 B=200 C=1000", _write_call(torch.bfloat16, 200, 1000)),
        ]
    if grid != "full":
        raise ValueError(f"grid must be 'ci' or 'full', got {grid!r}")
    out = []
    for dtype in exit_decision.LOGIT_DTYPES:
        for classes in CLASSES:
            for batch in _batches(exit_decision._tiles, classes):
                where = f"{_short(dtype)} B={batch} C={classes}"
                for head in HEADS:
                    out.append(Variant("decision", f"{where} {head}", _decision_call(dtype, batch, classes, head)))
                out.append(Variant("decision", f"{where} class+hidden last",
                                   _decision_call(dtype, batch, classes, "class+hidden", last=True)))  # fmt: skip
            for batch in _batches(compaction._tiles, classes):
                out.append(Variant("write", f"{_short(dtype)} B={batch} C={classes}", _write_call(dtype, batch, classes)))
    for dtype in (torch.bool, torch.bfloat16, torch.float32, torch.int64):
        for row_numel in (1, 1000, 150528):
            for batch in _batches(compaction._tiles, row_numel):
                out.append(Variant("gather", f"{_short(dtype)} B={batch} N={row_numel}",
                                   _gather_call(dtype, batch, row_numel)))  # fmt: skip
    return out
