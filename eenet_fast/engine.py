"""A stage-level serving engine over an :class:`~eenet_fast.runtime.EarlyExitModel`.

Per-batch early exit runs a batch through the stages and lets it shrink as samples leave, so later
stages run on small batches and every sample waits for the slowest of its batch. The engine keeps
one queue per stage of the samples in flight (their state rows, earlier scores and predictions,
and the request they belong to). A *step* runs one stage on a batch gathered from its queue: the
stage, its head and the exit decision, exactly as :meth:`EarlyExitModel.forward` takes them (same
stages, heads, policy and backend); the samples that leave are answered at once, the others join
the next stage's queue. New requests enter stage 0 while others are deeper in the network, so the
slots that exits free are refilled and every stage runs on full batches under load.

**Scheduling rule.** A stage is *ready* when its queue holds a full batch (its limit, ``max_batch``
or ``stage_batch[k]``) or the oldest rows in it have waited ``max_wait_ms`` there. The deepest ready
stage runs next: it finishes work in flight before taking new work, which keeps deep queues short.
When no stage is ready the stage holding the oldest rows runs (the worker never idles while rows
wait), so at light load a sample goes through without waiting for company, and under load every
stage waits for a full batch unless its rows become overdue. Nothing starves: a deeper stage can
only stay ready while the stages before it feed it, so rows wait at most ``max_wait_ms`` plus the
steps already queued ahead of them. Measured on the demo CNN (one thread, shared 2-core CPU):
``max_wait_ms`` from 1 to 100 changed neither the saturation throughput nor the latency at 0.5x
load beyond the run-to-run noise, because the worker is work-conserving; 5 ms is the default.

A sample's answer (exit, prediction, logits) is what ``model(x)`` gives it, whatever it was batched
with: rows of different requests merge by one ``torch.cat`` per tensor, text of different lengths
is padded with the padding masked (:mod:`eenet_fast.merging`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any

import torch

from eenet_fast.batch import batch_size, move_to
from eenet_fast.engine_stats import EngineStats
from eenet_fast.inflight import Request, Rows, hand_out, settle
from eenet_fast.merging import describe, merge, mergeable, signature, signatures
from eenet_fast.policies import ExitHistory
from eenet_fast.backends import select_backend
from eenet_fast.runtime import EarlyExitModel, ExitResult

__all__ = ["ExitEngine", "EngineClosed", "EngineOverloaded"]


class EngineClosed(RuntimeError):
    """The engine was closed: it takes no new request, or closed before this one was answered."""


class EngineOverloaded(RuntimeError):
    """More samples wait at stage 0 than ``max_pending`` allows: try again later."""


class ExitEngine:
    """Serve an :class:`EarlyExitModel` sample by sample, stage by stage (see the module docstring).

    Args:
        model: a model in eval mode with a policy installed (``calibrate`` or ``load_policy``).
        max_batch: the most samples a step runs (every stage, unless ``stage_batch`` says otherwise).
        max_wait_ms: how long rows may wait in a queue for a full batch before their stage is ready.
        stage_batch: ``K`` per-stage batch limits (``None`` entries take ``max_batch``).
        max_pending: the most samples that may wait at stage 0; beyond, :meth:`submit` raises
            :class:`EngineOverloaded` (``None``: no limit).
        example: a batch like those the engine will serve; requests whose structure, dtypes or
            shapes differ (the batch and text lengths aside) are refused at :meth:`submit`.

    The model's ``controller`` (a :class:`~eenet_fast.control.BudgetController`), when it has one,
    gives the thresholds of every step and observes every sample as it leaves, so the engine holds
    the budget online as :meth:`EarlyExitModel.forward` does.
    """

    def __init__(
        self,
        model: EarlyExitModel,
        *,
        max_batch: int = 64,
        max_wait_ms: float = 5.0,
        stage_batch: Sequence[int | None] | None = None,
        max_pending: int | None = None,
        example: Any = None,
    ) -> None:
        model.require_eval("serve a model")
        if model.policy is None:
            raise RuntimeError("the model has no exit policy: call calibrate(val, budget) or load_policy(path) first")
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"need max_batch >= 1 and max_wait_ms >= 0, got {max_batch} and {max_wait_ms}")
        limits = list(stage_batch) if stage_batch is not None else [None] * model.num_exits
        if len(limits) != model.num_exits or any(b is not None and b < 1 for b in limits):
            raise ValueError(f"stage_batch needs {model.num_exits} limits >= 1 (or None), got {stage_batch}")
        self.model, self.policy, self.controller = model, model.policy, model.controller
        if self.controller is not None and self.controller.policy is not self.policy:
            raise RuntimeError("the model's controller was built for another policy: set "
                               "model.controller = BudgetController(model.policy, val)")
        self.limits = [max_batch if b is None else int(b) for b in limits]
        self.max_wait = max_wait_ms / 1000
        self.max_pending = max_pending
        self.device = model.device
        self.backend = select_backend(model.backend, self.device)
        self.example = None if example is None else (signature(move_to(example, self.device)), describe(example))
        self.stats = EngineStats(self.policy.costs.tolist(), self.policy.budget)
        self._aranges: dict[int, torch.Tensor] = {}
        self._queues: list[deque[Rows]] = [deque() for _ in range(model.num_exits)]
        self._counts = [0] * model.num_exits
        self._cond = threading.Condition()
        self._closing = self._abort = False
        self._worker = threading.Thread(target=self._run, name="eenet-engine", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------- requests
    def submit(self, x: Any) -> Future:
        """Queue a batch ``x`` (a tensor, or a tuple/dict of tensors with the batch first) of ``B``
        samples; thread-safe.

        Returns:
            A future of the :class:`ExitResult` of the ``B`` samples, in input order.

        Raises:
            TypeError, ValueError: ``x`` is not a batch, or does not match the ``example``.
            EngineClosed: the engine is closed. EngineOverloaded: ``max_pending`` is reached.
        """
        if type(x) is torch.Tensor and x.ndim and x.device == self.device:  # the common case, quickly
            size = x.shape[0]
        else:
            size = batch_size(x)
            x = move_to(x, self.device)
        key, exact = signatures(x)
        if self.example is not None and key != self.example[0]:
            raise ValueError(f"the request is {describe(x)} but this engine serves {self.example[1]}: "
                             "send inputs of the same structure, dtypes and shapes")
        future: Future = Future()
        now = time.perf_counter()
        request = Request(future, size, now, size)
        with self._cond:
            if self._closing:
                self.stats.request("rejected")
                raise EngineClosed("the engine is closed and takes no new requests")
            if self.max_pending is not None and self._counts[0] + size > self.max_pending:
                self.stats.request("rejected")
                raise EngineOverloaded(f"{self._counts[0]} samples already wait (max_pending={self.max_pending}); retry later")
            self.stats.request("accepted")
            if size == 0:
                self._answer_empty(request)
                return future
            rows = Rows(x, size, [request] * size, self._arange(size), None, None, now, key, exact)
            self._queues[0].append(rows)
            self._counts[0] += size
            self._cond.notify()
        return future

    def _answer_empty(self, request: Request) -> None:
        empty = torch.empty(0, dtype=torch.long, device=self.device)
        logits = torch.empty(0, self.policy.num_classes, device=self.device)
        self.stats.answered([[]], [0.0])
        settle(request.future, ExitResult(logits, empty, empty.clone(), torch.empty(0, dtype=torch.bool, device=self.device)))

    def _arange(self, size: int) -> torch.Tensor:
        """``arange(size)`` on the device, shared by the requests of that size (never written to)."""
        rows = self._aranges.get(size)
        if rows is None:
            rows = torch.arange(size, device=self.device)
            if size <= 256:
                self._aranges[size] = rows
        return rows

    async def infer(self, x: Any) -> ExitResult:
        """:meth:`submit` for asyncio: ``await engine.infer(x)``."""
        return await asyncio.wrap_future(self.submit(x))

    def __call__(self, x: Any) -> ExitResult:
        """Submit ``x`` and wait for its answer."""
        return self.submit(x).result()

    def map(self, inputs: Iterable[Any], *, window: int = 16) -> Iterator[ExitResult]:
        """Answers to ``inputs`` in order, with at most ``window`` requests in flight (offline throughput)."""
        pending: deque[Future] = deque()
        for x in inputs:
            pending.append(self.submit(x))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def snapshot(self) -> dict[str, Any]:
        """Live statistics (see :meth:`EngineStats.snapshot`): per-stage batch sizes and queue
        lengths, exit mix, running average cost against the budget, latency percentiles."""
        with self._cond:
            queues = list(self._counts)
        return self.stats.snapshot(queues)

    @property
    def alive(self) -> bool:
        """Whether the worker runs (false after :meth:`close`, or if it died)."""
        return self._worker.is_alive()

    def close(self, timeout: float | None = None) -> None:
        """Take no new request and answer every accepted one, then stop the worker. Requests still
        unanswered after ``timeout`` seconds get :class:`EngineClosed`."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._worker.join(timeout)
        if self._worker.is_alive():
            with self._cond:
                self._abort = True
                self._fail_queued(EngineClosed(f"the engine closed after {timeout} s with this request unanswered"))
                self._cond.notify()
            self._worker.join()

    def __enter__(self) -> "ExitEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --------------------------------------------------------------- worker
    def _run(self) -> None:
        try:
            with torch.no_grad():
                while True:
                    with self._cond:
                        while True:
                            if self._abort:
                                return
                            stage = self._next_stage()
                            if stage is not None:
                                break
                            if self._closing:
                                return
                            self._cond.wait()
                        chunks = self._gather(stage)
                    if chunks:
                        self._step(stage, chunks)
        except BaseException as error:  # a bug in the engine: nobody may wait forever
            with self._cond:
                self._abort = True
                self._fail_queued(RuntimeError(f"the engine's worker failed: {error!r}"))
            raise

    def _next_stage(self) -> int | None:
        """The deepest ready stage (a full batch, or rows that waited ``max_wait``); when none is
        ready, the stage with the oldest rows (the worker never idles while rows wait)."""
        now = time.perf_counter()
        oldest, since = None, now
        for k in reversed(range(len(self._queues))):
            queue = self._queues[k]
            if not queue:
                continue
            if self._closing or self._counts[k] >= self.limits[k] or now - queue[0].since >= self.max_wait:
                return k
            if queue[0].since <= since:
                oldest, since = k, queue[0].since
        return oldest

    def _gather(self, k: int) -> list[Rows]:
        """Take up to ``limits[k]`` rows from queue ``k`` that merge with its first rows, oldest first."""
        queue, limit = self._queues[k], self.limits[k]
        taken: list[Rows] = []
        skipped: list[Rows] = []
        count = 0
        while queue and count < limit:
            rows = queue.popleft()
            if rows.owners[0].future.done() and all(o.future.done() for o in rows.owners):  # failed or cancelled
                self._counts[k] -= rows.size
                continue
            if taken and (rows.key != taken[0].key or rows.exact != taken[0].exact and not mergeable(
                    [taken[0].state, rows.state])):  # mergeable with the first: then with all of them
                skipped.append(rows)
                continue
            if count + rows.size > limit:
                rows, rest = rows.split(limit - count)
                queue.appendleft(rest)
            taken.append(rows)
            count += rows.size
        queue.extendleft(reversed(skipped))
        self._counts[k] -= count
        return taken

    def _step(self, k: int, chunks: list[Rows]) -> None:
        """Run stage ``k`` on the merged rows: decide, answer the leaving rows, queue the rest."""
        owners = [o for c in chunks for o in c.owners]
        rows = torch.cat([c.rows for c in chunks])
        if k == 0:  # no history, no NaN seen yet
            size = len(owners)
            scores = torch.empty(size, 0, device=self.device)
            predictions = torch.empty(size, 0, dtype=torch.long, device=self.device)
            seen = torch.zeros(size, dtype=torch.bool, device=self.device)
        else:
            scores = torch.cat([c.history.scores for c in chunks])
            predictions = torch.cat([c.history.predictions for c in chunks])
            seen = torch.cat([c.nonfinite for c in chunks])
        last = k == len(self._queues) - 1
        # read to the host before the stage is queued (the decision takes floats: no read at the exit)
        thresholds = (self.policy.thresholds if self.controller is None else self.controller.thresholds()).tolist()
        try:
            state = self.model.stages[k](merge([c.state for c in chunks]))
            logits = self.model.heads[k](state)
            q, prediction, leave, nonfinite = self.backend.decide(
                self.policy, k, logits, ExitHistory(scores, predictions), last, thresholds[k]
            )
        except Exception as error:  # noqa: BLE001 - the error goes to the requests it concerns
            self._isolate(k, chunks, owners, error)
            return
        self.stats.step(k, len(owners))
        seen = seen | nonfinite
        history = ExitHistory(scores, predictions).extend(q, prediction)
        leaving = leave.nonzero().squeeze(1)
        if leaving.numel():
            if self.controller is not None:
                self.controller.observe(torch.full((leaving.numel(),), k, dtype=torch.long))
            self._answer(k, leaving, owners, rows, logits, prediction, seen)
        if leaving.numel() < len(owners):
            keep = ~leave
            state, rows, scores, predictions, seen = self.backend.compact(keep, state, rows, history.scores,
                                                                         history.predictions, seen)
            kept = [owners[i] for i in keep.nonzero().squeeze(1).tolist()]
            survivors = Rows.of(state, kept, rows, ExitHistory(scores, predictions), seen, time.perf_counter())
            with self._cond:
                self._queues[k + 1].append(survivors)
                self._counts[k + 1] += survivors.size

    def _answer(self, k: int, leaving: torch.Tensor, owners: list[Request], rows: torch.Tensor,
                logits: torch.Tensor, prediction: torch.Tensor, seen: torch.Tensor) -> None:
        """Answer the requests whose last rows leave at exit ``k`` now."""
        done = hand_out(k, leaving, owners, rows, logits, prediction, seen)
        if done:
            results = [request.answer() for request in done]
            now = time.perf_counter()
            self.stats.answered([r.exits for r in done], [now - r.submitted for r in done])
            for request, result in zip(done, results):
                settle(request.future, result)

    def _isolate(self, k: int, chunks: list[Rows], owners: list[Request], error: Exception) -> None:
        """A step failed: rerun each request's rows alone, so only the requests that fail get the error."""
        unique = list(dict.fromkeys(owners))
        if len(unique) == 1:
            self.stats.request("failed")
            failure = RuntimeError(f"stage {k} of the model failed on this request: {error!r}")
            failure.__cause__ = error
            unique[0].fail(failure)
            return
        for request in unique:
            self._step(k, [part for c in chunks if (part := c.of_request(request)) is not None])

    def _fail_queued(self, error: BaseException) -> None:
        """Fail every request with rows in a queue (under the lock)."""
        for k, queue in enumerate(self._queues):
            requests = {o for rows in queue for o in rows.owners if not o.future.done()}
            for request in requests:
                request.fail(error)
            self.stats.request("failed", len(requests))
            queue.clear()
            self._counts[k] = 0
