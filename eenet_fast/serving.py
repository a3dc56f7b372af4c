"""Serve an early-exit model with Ray Serve (``pip install 'eenet-fast[serve]'``).

Each replica builds the model from a factory, installs a saved policy and runs one
:class:`~eenet_fast.engine.ExitEngine`. It answers HTTP (JSON or NumPy bodies, see :mod:`eenet_fast.http_io`) and
deployment handles::

    from ray import serve
    from eenet_fast.serving import build_app

    app = build_app("mypkg.models:make_model", "exits.safetensors", replicas=2)
    serve.run(app, route_prefix="/")
    # POST / {"inputs": [[...]]} -> {"predictions", "exits", "logits", "nonfinite"}
    # GET /health, GET /stats (the engine's live statistics)
    # serve.get_app_handle("default").infer.remote(x).result() -> ExitResult

The factory (``"package.module:function"``, importable on every node, or a picklable callable)
returns an :class:`~eenet_fast.runtime.EarlyExitModel` (or a model :func:`~eenet_fast.wrap` takes),
or a pair ``(model, example)`` where ``example`` is one batch like those the server gets: requests
whose structure, dtypes or shapes differ are then answered 422. The policy file is read once by
:func:`build_app` and shipped to the replicas, so the nodes need no shared file system.

Shutting down drains: Ray stops routing to the replica and waits for its requests, then the
engine answers every request it accepted (``drain_s`` at most; any left get a clear error).
Metrics (Ray's Prometheus export): ``eenet_requests`` by outcome, ``eenet_samples`` by exit,
``eenet_avg_cost`` and ``eenet_cost_over_budget``.
"""

from __future__ import annotations

import asyncio
import importlib
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import torch

from eenet_fast.allocator import steady_allocator
from eenet_fast.engine import EngineClosed, EngineOverloaded, ExitEngine
from eenet_fast.http_io import BadRequest, answer_json, input_dtypes, parse_request
from eenet_fast.runtime import EarlyExitModel, ExitResult
from eenet_fast.wrapping import wrap

__all__ = ["EarlyExitServer", "build_app", "load_model", "resolve_factory", "run_server"]

Factory = Callable[[], Any]


def resolve_factory(factory: str | Factory) -> Factory:
    """The factory function named ``"package.module:function"`` (a callable is returned as it is)."""
    if not isinstance(factory, str):
        return factory
    module_name, _, attr = factory.partition(":")
    if not attr:
        raise ValueError(f"the model factory must be written 'package.module:function', got {factory!r}")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot load the model factory {factory!r}: {error}") from None


def load_model(factory: str | Factory, policy: bytes | str | Path) -> tuple[EarlyExitModel, Any]:
    """Build the model with ``factory`` and install the saved ``policy`` (a path, or the file's bytes).

    Returns:
        ``(model, example)``: the model in eval mode, and the factory's example batch (or ``None``).
    """
    built = resolve_factory(factory)()
    model, example = built if isinstance(built, tuple) else (built, None)
    if not isinstance(model, EarlyExitModel):
        model = wrap(model)
    model.eval()
    if isinstance(policy, bytes):
        with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
            f.write(policy)
            f.flush()
            model.load_policy(f.name)
    else:
        model.load_policy(policy)
    return model, example


class _Metrics:
    """The replica's Ray metrics: requests by outcome, samples by exit, running cost."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self.requests = metrics.Counter("eenet_requests", description="requests by outcome", tag_keys=("outcome",))
        self.samples = metrics.Counter("eenet_samples", description="samples answered, by exit", tag_keys=("exit",))
        self.cost = metrics.Gauge("eenet_avg_cost", description="running average cost per sample")
        self.over_budget = metrics.Gauge("eenet_cost_over_budget", description="running average cost / budget")

    def record(self, outcome: str, engine: ExitEngine, result: ExitResult | None = None) -> None:
        self.requests.inc(tags={"outcome": outcome})
        if result is None:
            return
        for k, count in enumerate(torch.bincount(result.exits.cpu()).tolist()):
            if count:
                self.samples.inc(count, tags={"exit": str(k)})
        cost, ratio = engine.stats.running_cost()
        if cost is not None:
            self.cost.set(cost)
        if ratio is not None:
            self.over_budget.set(ratio)


class EarlyExitServer:
    """One replica: the model with its policy, an :class:`ExitEngine`, HTTP and handle entries.

    Args:
        factory, policy: see :func:`load_model`.
        engine: keyword options of :class:`ExitEngine` (``max_batch``, ``max_wait_ms``, ...).
        threads: torch CPU threads of the replica (``None``: torch's choice).
        max_body_bytes: the largest HTTP request body accepted (413 beyond).
        drain_s: how long shutting down waits for the engine to answer what it accepted.
    """

    def __init__(self, factory: str | Factory, policy: bytes | str | Path, engine: dict[str, Any] | None = None,
                 threads: int | None = 1, max_body_bytes: int = 16 << 20, drain_s: float = 30.0) -> None:
        if threads:
            torch.set_num_threads(threads)
        steady_allocator()  # steady time per stage, as the policy's time model was calibrated (eenet_fast.allocator)
        self.model, example = load_model(factory, policy)
        self.engine = ExitEngine(self.model, example=example, **(engine or {}))
        self.dtypes = input_dtypes(example)
        self.max_body_bytes, self.drain_s = max_body_bytes, drain_s
        self.metrics = _Metrics()

    async def infer(self, x: Any) -> ExitResult:
        """The deployment-handle entry: a batch in (tensor or dict of tensors), its :class:`ExitResult` out."""
        try:
            result = await self.engine.infer(x)
        except Exception:
            self.metrics.record("failed", self.engine)
            raise
        self.metrics.record("answered", self.engine, result)
        return result

    async def __call__(self, request: Any) -> Any:
        """HTTP: ``POST`` a batch (JSON, or ``.npy``/``.npz``: :mod:`eenet_fast.http_io`); ``GET .../health``;
        ``GET .../stats``."""
        from starlette.responses import JSONResponse

        if request.method == "GET" and request.url.path.rstrip("/").endswith("/health"):
            healthy = self.engine.alive
            return JSONResponse({"status": "ok" if healthy else "engine stopped"}, status_code=200 if healthy else 503)
        if request.method == "GET" and request.url.path.rstrip("/").endswith("/stats"):
            return JSONResponse(self.engine.snapshot())
        if request.method != "POST":
            return JSONResponse({"error": "POST a batch (JSON {\"inputs\": ...} or an application/x-npy body); GET /health or /stats"}, status_code=405)
        try:
            x = parse_request(await self._body(request), self.dtypes, self.max_body_bytes,
                              request.headers.get("content-type"))
            future = self.engine.submit(x)
        except BadRequest as error:
            return self._refuse(error.status, str(error))
        except (ValueError, TypeError) as error:
            return self._refuse(422, str(error))
        except (EngineOverloaded, EngineClosed) as error:
            return self._refuse(503, str(error))
        try:
            result = await asyncio.wrap_future(future)
        except Exception as error:  # noqa: BLE001 - the request failed in the model (or the engine closed)
            self.metrics.record("failed", self.engine)
            return JSONResponse({"error": str(error)}, status_code=503 if isinstance(error, EngineClosed) else 500)
        self.metrics.record("answered", self.engine, result)
        return JSONResponse(answer_json(result))

    def _refuse(self, status: int, message: str) -> Any:
        from starlette.responses import JSONResponse

        self.metrics.record("rejected", self.engine)
        return JSONResponse({"error": message}, status_code=status)

    async def _body(self, request: Any) -> bytes:
        """The body, read no further than ``max_body_bytes`` (413 beyond, declared or sent)."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise BadRequest(413, f"the request body has {declared} bytes, more than the {self.max_body_bytes} this server accepts")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise BadRequest(413, f"the request body is over the {self.max_body_bytes} bytes this server accepts")
            chunks.append(chunk)
        return b"".join(chunks)

    def check_health(self) -> None:
        """Ray's health check: the replica is unhealthy once its engine stopped."""
        if not self.engine.alive:
            raise RuntimeError("the engine's worker is not running")

    def __del__(self) -> None:
        """Ray's shutdown hook: answer every accepted request (``drain_s`` at most), then stop."""
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close(timeout=self.drain_s)


def build_app(
    model: str | Factory,
    policy: str | Path,
    *,
    name: str = "eenet",
    replicas: int = 1,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    threads: int | None = 1,
    max_batch: int = 64,
    max_wait_ms: float = 5.0,
    stage_batch: Sequence[int | None] | None = None,
    max_pending: int | None = 4096,
    max_ongoing_requests: int = 1024,
    max_body_bytes: int = 16 << 20,
    drain_s: float = 30.0,
) -> Any:
    """A Ray Serve application serving ``model`` with ``policy`` (see the module docstring).

    Args:
        model: the model factory, ``"package.module:function"`` or a picklable callable.
        policy: a policy file saved by :meth:`EarlyExitModel.save_policy`.
        name: the deployment's name. replicas: how many replicas (one engine each).
        num_cpus, num_gpus: Ray resources of each replica. threads: its torch CPU threads.
        max_batch, max_wait_ms, stage_batch, max_pending: the engine's knobs (:class:`ExitEngine`).
        max_ongoing_requests: requests Ray lets into one replica at once (the engine batches them).
        max_body_bytes: the largest HTTP body accepted. drain_s: how long a shutdown waits for answers.
    """
    try:
        from ray import serve
    except ImportError:
        raise ImportError("serving needs Ray Serve: pip install 'eenet-fast[serve]'") from None
    resolve_factory(model)  # a wrong name fails here, not in every replica
    engine = {"max_batch": max_batch, "max_wait_ms": max_wait_ms, "stage_batch": stage_batch, "max_pending": max_pending}
    deployment = serve.deployment(
        EarlyExitServer,
        name=name,
        num_replicas=replicas,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        max_ongoing_requests=max_ongoing_requests,
        graceful_shutdown_timeout_s=drain_s + 5,
        health_check_period_s=5,
    )
    return deployment.bind(model, Path(policy).read_bytes(), engine, threads, max_body_bytes, drain_s)


def run_server(app: Any, *, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
               name: str = "default", route_prefix: str = "/", blocking: bool = True) -> Any:
    """Start Ray (or join the cluster at ``address``, e.g. ``"auto"``), serve HTTP on ``host:port``
    and run ``app`` as application ``name`` under ``route_prefix``; with ``blocking``, until
    interrupted, then shut down (draining). Returns the application's handle."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=address)
    serve.start(http_options={"host": host, "port": port})
    return serve.run(app, name=name, route_prefix=route_prefix, blocking=blocking)
