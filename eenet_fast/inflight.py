"""Samples in flight inside an :class:`~eenet_fast.engine.ExitEngine`: the requests they belong to,
the rows waiting for a stage, and how the rows that leave become each request's answer."""

from __future__ import annotations

from collections.abc import Hashable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import torch

from eenet_fast.batch import map_batch
from eenet_fast.merging import signatures
from eenet_fast.policies import ExitHistory
from eenet_fast.runtime import ExitResult

__all__ = ["Request", "Rows", "settle", "hand_out"]


def settle(future: Future, result: Any = None, error: BaseException | None = None) -> None:
    """Resolve ``future`` unless it is done or cancelled already."""
    if future.done():
        return
    try:
        future.set_exception(error) if error is not None else future.set_result(result)
    except InvalidStateError:  # cancelled meanwhile
        pass


@dataclass(eq=False)
class Request:
    """One submitted batch of ``size`` samples, answered once all of them left."""

    future: Future
    size: int
    submitted: float
    remaining: int
    pieces: list = field(default_factory=list)  # (rows, logits, predictions, nonfinite, exits) of rows that left
    exits: list[int] = field(default_factory=list)  # the exits its rows left at so far (in no particular order)

    def fail(self, error: BaseException) -> None:
        settle(self.future, error=error)

    def answer(self) -> ExitResult:
        """The answer from the pieces its rows left in, in the request's row order."""
        pieces, self.pieces = self.pieces, []
        if len(pieces) == 1:
            rows, logits, predictions, nonfinite, exits = pieces[0]
        else:
            rows, logits, predictions, nonfinite, exits = (torch.cat(column) for column in zip(*pieces))
        if self.size > 1:
            order = rows.argsort()
            logits, predictions, nonfinite, exits = logits[order], predictions[order], nonfinite[order], exits[order]
        return ExitResult(logits, predictions, exits, nonfinite)


@dataclass(eq=False)
class Rows:
    """``size`` samples waiting for the same stage: their state (batch first), requests, rows in
    those requests (``[size]`` int64), earlier scores and predictions, whether they met NaN/Inf
    logits (``history`` and ``nonfinite`` are ``None`` at stage 0), when they joined the queue, and
    the merge signatures of their state (:mod:`eenet_fast.merging`)."""

    state: Any
    size: int
    owners: list[Request]
    rows: torch.Tensor
    history: ExitHistory | None
    nonfinite: torch.Tensor | None
    since: float
    key: Hashable
    exact: Hashable

    @classmethod
    def of(cls, state: Any, owners: list[Request], rows: torch.Tensor, history: ExitHistory | None,
           nonfinite: torch.Tensor | None, since: float) -> "Rows":
        return cls(state, len(owners), owners, rows, history, nonfinite, since, *signatures(state))

    def _take(self, index: slice | torch.Tensor, owners: list[Request]) -> "Rows":
        history = None if self.history is None else ExitHistory(self.history.scores[index], self.history.predictions[index])
        nonfinite = None if self.nonfinite is None else self.nonfinite[index]
        return Rows(map_batch(lambda t: t[index], self.state, self.size), len(owners), owners, self.rows[index], history,
                    nonfinite, self.since, self.key, self.exact)

    def split(self, n: int) -> tuple["Rows", "Rows"]:
        """The first ``n`` rows and the rest (views)."""
        return self._take(slice(0, n), self.owners[:n]), self._take(slice(n, None), self.owners[n:])

    def of_request(self, request: Request) -> "Rows | None":
        """The rows that belong to ``request`` (``None`` if none do)."""
        index = [i for i, o in enumerate(self.owners) if o is request]
        if not index:
            return None
        return self._take(torch.tensor(index, device=self.rows.device), [request] * len(index))


def hand_out(k: int, leaving: torch.Tensor, owners: list[Request], rows: torch.Tensor, logits: torch.Tensor,
             prediction: torch.Tensor, nonfinite: torch.Tensor) -> list[Request]:
    """Give each request its rows (positions ``leaving`` of a step's batch) that leave at exit ``k``.

    Returns:
        The requests that are now complete (every row left): ``answer()`` gives their result.
    """
    runs: list[list] = []  # [request, count] for each run of consecutive rows of one request
    for i in leaving.tolist():
        if runs and runs[-1][0] is owners[i]:
            runs[-1][1] += 1
        else:
            runs.append([owners[i], 1])
    exits = torch.full((leaving.numel(),), k, dtype=torch.long, device=rows.device)
    columns = (rows[leaving], logits[leaving], prediction[leaving], nonfinite[leaving], exits)
    done = []
    for (request, count), piece in zip(runs, zip(*(t.split([n for _, n in runs]) for t in columns))):
        request.pieces.append(piece)
        request.exits += [k] * count
        request.remaining -= count
        if request.remaining == 0:
            done.append(request)
    return done
