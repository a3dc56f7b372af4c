"""Open-loop load for ``bench_serving.py``: Poisson arrivals (bounded in count and time) into an
in-process server or an HTTP server on 127.0.0.1, the dynamic batcher the baselines run behind
without Ray (what ``@serve.batch`` does), and the summary of a run."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from eenet_fast.engine_stats import percentile
from eenet_fast.runtime import ExitResult


@dataclass
class Record:
    """One request: the pool rows it carried, when it was sent and answered, and the answer."""

    rows: range
    sent: float
    done: float | None = None
    exits: list[int] = field(default_factory=list)
    predictions: list[int] = field(default_factory=list)
    error: str | None = None


def poisson_times(rate: float, seconds: float, max_requests: int, seed: int) -> np.ndarray:
    """Arrival offsets (s) of a Poisson process of ``rate`` per second, cut at ``seconds`` and ``max_requests``."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=max_requests)
    times = np.cumsum(gaps)
    return times[times < seconds]


class Batcher:
    """The baselines' server without Ray: batches of whole requests of up to ``max_batch`` samples,
    run when full or when the first one waited ``timeout_s`` (``@serve.batch``'s rule), by
    ``fn(x) -> ExitResult`` on a worker thread."""

    def __init__(self, fn: Callable[[torch.Tensor], ExitResult], max_batch: int, timeout_s: float) -> None:
        self.fn, self.max_batch, self.timeout_s = fn, max_batch, timeout_s
        self.queue: deque[tuple[torch.Tensor, Future, float]] = deque()
        self.queued = 0  # samples in the queue (kept, not summed: the queue holds thousands at saturation)
        self.cond = threading.Condition()
        self.closed = False
        self.batches: list[int] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def submit(self, x: torch.Tensor) -> Future:
        future: Future = Future()
        with self.cond:
            self.queue.append((x, future, time.perf_counter()))
            self.queued += len(x)
            self.cond.notify()
        return future

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join()

    def _run(self) -> None:
        with torch.no_grad():
            while True:
                with self.cond:
                    while not self.queue and not self.closed:
                        self.cond.wait()
                    if not self.queue:
                        return
                    while self.queued < self.max_batch and not self.closed:
                        left = self.queue[0][2] + self.timeout_s - time.perf_counter()
                        if left <= 0:
                            break
                        self.cond.wait(left)
                    taken, size = [], 0
                    while self.queue and size + len(self.queue[0][0]) <= max(self.max_batch, len(self.queue[0][0])):
                        taken.append(self.queue.popleft())
                        size += len(taken[-1][0])
                        self.queued -= len(taken[-1][0])
                        if size >= self.max_batch:
                            break
                self.batches.append(size)
                result = self.fn(torch.cat([x for x, _, _ in taken]))
                start = 0
                for x, future, _ in taken:
                    part = slice(start, start + len(x))
                    start += len(x)
                    future.set_result(ExitResult(result.logits[part], result.predictions[part], result.exits[part],
                                                 result.nonfinite[part]))


def run_threaded(submit: Callable[[torch.Tensor], Future], pool: torch.Tensor, times: np.ndarray, size: int,
                 drain_s: float) -> list[Record]:
    """Send ``pool[i*size:(i+1)*size]`` (cycling) at ``times``; wait ``drain_s`` at most for the answers."""
    records: list[Record] = []
    start = time.perf_counter()
    for i, offset in enumerate(times):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        first = (i * size) % (len(pool) - size + 1)
        record = Record(range(first, first + size), time.perf_counter())
        records.append(record)
        future = submit(pool[first : first + size])
        future.add_done_callback(lambda f, r=record: _finish(r, f))
    deadline = time.perf_counter() + drain_s
    while any(r.done is None and r.error is None for r in records) and time.perf_counter() < deadline:
        time.sleep(0.01)
    return records


def _finish(record: Record, future: Future) -> None:
    now = time.perf_counter()
    if future.exception() is not None:
        record.error = repr(future.exception())
        return
    result = future.result()
    record.exits, record.predictions = result.exits.tolist(), result.predictions.tolist()
    record.done = now


async def run_http(url: str, payloads: list[bytes], sizes: int, times: np.ndarray, drain_s: float,
                   content_type: str = "application/json") -> list[Record]:
    """POST ``payloads[i % len(payloads)]`` (each ``sizes`` pool rows, in order, of ``content_type``)
    at ``times`` to ``url``."""
    import aiohttp

    records: list[Record] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=drain_s + 60)) as session:
        async def one(record: Record, payload: bytes) -> None:
            try:
                async with session.post(url, data=payload, headers={"content-type": content_type}) as response:
                    body = await response.json()
                    if response.status != 200:
                        record.error = f"{response.status}: {body}"
                        return
            except Exception as error:  # noqa: BLE001 - counted as lost
                record.error = repr(error)
                return
            record.done = time.perf_counter()
            record.exits, record.predictions = body["exits"], body["predictions"]

        tasks = []
        start = time.perf_counter()
        for i, offset in enumerate(times):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            j = i % len(payloads)
            record = Record(range(j * sizes, (j + 1) * sizes), time.perf_counter())
            records.append(record)
            tasks.append(asyncio.create_task(one(record, payloads[j])))
        await asyncio.wait(tasks, timeout=drain_s)
    return records


def summarize(records: list[Record], labels: torch.Tensor, expected_exits: torch.Tensor,
              expected_predictions: torch.Tensor, costs: list[float], offered: float) -> dict[str, Any]:
    """Throughput, latency (overall and by exit), accuracy, cost and the answers that were lost or wrong."""
    done = [r for r in records if r.done is not None]
    wrong = sum(
        r.exits != expected_exits[r.rows.start : r.rows.stop].tolist()
        or r.predictions != expected_predictions[r.rows.start : r.rows.stop].tolist()
        for r in done
    )
    samples = sum(len(r.rows) for r in done)
    span = max((r.done for r in done), default=0) - min((r.sent for r in records), default=0)
    latency = [(k, r.done - r.sent) for r in done for k in r.exits]
    by_exit = [[t for e, t in latency if e == k] for k in range(len(costs))]
    exits = [k for r in done for k in r.exits]
    correct = [p == int(labels[i]) for r in done for i, p in zip(r.rows, r.predictions)]

    def ms(values: list[float], q: float) -> float | None:
        return round(1000 * percentile(values, q), 2) if values else None

    return {
        "offered_per_s": round(offered, 1),
        "requests": len(records),
        "answered": len(done),
        "refused": sum(r.error is not None for r in records),  # an error answer (a 503 under overload, ...)
        "lost": sum(r.done is None and r.error is None for r in records),  # no answer at all
        "errors": sorted({r.error for r in records if r.error})[:3],
        "wrong": wrong,
        "throughput_per_s": round(samples / span, 1) if span > 0 else math.nan,
        "p50_ms": ms([t for _, t in latency], 50),
        "p99_ms": ms([t for _, t in latency], 99),
        "p50_ms_by_exit": [ms(v, 50) for v in by_exit],
        "p99_ms_by_exit": [ms(v, 99) for v in by_exit],
        "exit_mix": [round(len(v) / max(1, len(exits)), 3) for v in by_exit],
        "accuracy": round(sum(correct) / max(1, len(correct)), 4),
        "avg_cost": round(sum(costs[k] for k in exits) / max(1, len(exits)), 4),
    }
