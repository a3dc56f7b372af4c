"""Serving benchmark: the full model and today's per-batch early exit behind a dynamic batcher,
against the stage-level engine (:class:`eenet_fast.engine.ExitEngine`), under open-loop Poisson load.

Run (one torch thread, about 10 minutes; writes ``bench/results/serving-<model>[-flops][-<parts>][-<body>]-<date>``
``.json`` and ``.md``, ``<parts>`` when not both, ``<body>`` when Ray runs)::

    python bench/bench_serving.py --model cnn      # the demo CNN (trains and caches it on first use)
    python bench/bench_serving.py --model resnet   # the ResNet of examples/resnet_fashion_mnist.py

EENet is calibrated at a budget of 0.5: by default a time budget (``costs="latency"``) at the batch
the servers run (``--max-batch``), timed on the one torch thread they run on; ``--costs flops`` for
half of the FLOPs, which on this CPU is far more than half of the time (the demo CNN's first stage
has an eighth of its FLOPs and takes a third of its time). Two parts, each first a saturation point (offered
load far above capacity, ``--rounds`` rounds with the systems interleaved, the median kept), then
offered loads given as fractions of the full model's saturation throughput of that run:

* **alone** (no Ray): single-image requests from a Poisson generator thread into (a) the full model
  and (b) per-batch early exit (``EarlyExitModel.forward``), each behind a batcher with
  ``@serve.batch``'s rule (whole requests up to ``--max-batch`` samples, run when full or after
  ``--batch-wait-ms``), and (c) the engine;
* **ray**: the same three as Ray Serve deployments with one replica each (the baselines
  under ``@serve.batch``, the engine through :func:`eenet_fast.serving.build_app`), over HTTP on
  127.0.0.1 with ``--ray-images`` images per request, sent as binary ``.npy`` bodies (``--body
  npy``, the default) or as JSON (``--body json``: parsing the JSON numbers of a 28x28 image takes
  longer than the demo CNN's forward, so every system is then bound by parsing).

Every point reports throughput, p50/p99 latency (overall and by exit), mean batch size per stage,
accuracy, measured cost against the budget, and the answers lost or different from the direct
answer (``model(x)``); the verdict holds the issue's bars (saturation ratios, first-exit p50 at
0.8 load against the full model's p50, loads where the engine serves 2 % less than the full model).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RUNS = REPO / "eenet_runs"
sys.path[:0] = [str(BENCH), str(REPO / "examples")]

from serving_load import Batcher, poisson_times, run_http, run_threaded, summarize  # noqa: E402

from eenet_fast.allocator import steady_allocator  # noqa: E402
from eenet_fast.engine import ExitEngine  # noqa: E402
from eenet_fast.runtime import EarlyExitModel, ExitResult  # noqa: E402
from eenet_fast.timing import full_pass  # noqa: E402
from eenet_fast.wrapping import wrap  # noqa: E402

EXAMPLE = torch.zeros(2, 1, 28, 28)
SYSTEMS = ("full", "per_batch", "engine")
FRACTIONS = (0.25, 0.5, 0.8, 1.0, 1.25, 1.5)


# ------------------------------------------------------------------ models (also built in Ray replicas)
def cnn_factory() -> tuple[EarlyExitModel, torch.Tensor]:
    """The demo CNN from its cache (``eenet_runs/demo``)."""
    from safetensors.torch import load_file

    from eenet_fast.zoo import MultiExitCNN

    net = MultiExitCNN()
    net.load_state_dict(load_file(str(RUNS / "demo" / "model.safetensors")))
    return wrap(net.eval(), backend="torch"), EXAMPLE


def _resnet_skeleton() -> EarlyExitModel:
    from torch import nn

    from eenet_fast.zoo import ResNet

    net = ResNet(10, widths=(32, 64, 128, 256), blocks=1, in_channels=1)
    net.maxpool = nn.Identity()
    return wrap(net.to(memory_format=torch.channels_last).eval(), backend="torch")


def resnet_factory() -> tuple[EarlyExitModel, torch.Tensor]:
    """The example's ResNet with its exit heads, from the cache this benchmark writes."""
    from safetensors.torch import load_file

    model = _resnet_skeleton()
    model.load_state_dict(load_file(str(RUNS / "bench_serving" / "resnet.safetensors")))
    return model.eval(), EXAMPLE


def prepare(name: str, costs: str = "latency", batch: int = 64) -> tuple[EarlyExitModel, Path, torch.Tensor, torch.Tensor]:
    """Train or load the model, calibrate EENet at budget 0.5 of ``costs`` (a time budget holds at
    ``batch``) and save the policy.

    Returns:
        ``(model, policy_path, test_images, test_labels)``.
    """
    from eenet_fast.datasets import load_fashion_mnist
    from eenet_fast.demo import DemoConfig, prepare_demo

    out = RUNS / "bench_serving"
    timing = {"batch_size": batch} if costs == "latency" else {}  # a time budget holds at the batch served
    out.mkdir(parents=True, exist_ok=True)
    if name == "cnn":
        parts = prepare_demo(DemoConfig(out=RUNS / "demo", progress=False), log=print)
        model, _ = cnn_factory()
        images, labels = parts.x_test, parts.y_test
        model.calibrate(parts.val, 0.5, policy="eenet", costs=costs, seed=0, progress=False, example=images[:batch], **timing)
    else:
        from safetensors.torch import save_file

        data = load_fashion_mnist()
        cache = out / "resnet.safetensors"
        if not cache.exists():
            from resnet_fashion_mnist import trained_resnet

            _, trained, *_ = trained_resnet(data)
            save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(cache))
        model, _ = resnet_factory()
        x, y = data["train"]
        val = [(x[i : i + 500], y[i : i + 500]) for i in range(50_000, 55_000, 500)]
        model.calibrate(val, 0.5, policy="eenet", costs=costs, seed=0, progress=False, **timing)
        images, labels = data["test"]
    policy = out / f"{name}_policy.safetensors"
    model.save_policy(policy)
    return model, policy, images, labels


def full_forward(model: EarlyExitModel):
    """The full model as an ``ExitResult``: every stage, the last head."""
    last = model.num_exits - 1

    def run(x: torch.Tensor) -> ExitResult:
        with torch.no_grad():
            logits = full_pass(model, x)
        return ExitResult(logits, logits.argmax(1), torch.full((len(logits),), last), torch.zeros(len(logits), dtype=torch.bool))

    return run


# ------------------------------------------------------------------------------------- without Ray
def engine_batches(before: dict, after: dict) -> list[float | None]:
    """Mean batch per stage between two engine snapshots."""
    out = []
    for b, a in zip(before["stages"], after["stages"]):
        steps = a["steps"] - b["steps"]
        rows = a["steps"] * (a["mean_batch"] or 0) - b["steps"] * (b["mean_batch"] or 0)
        out.append(round(rows / steps, 1) if steps else None)
    return out


def sweep(run: Callable[[str, float, int], dict], saturation_rate: float, args: argparse.Namespace, tag: str) -> dict:
    """Saturation first (``--rounds`` rounds, the systems interleaved; the median round is kept), then
    each offered load, a fraction of the full model's saturation throughput, the systems interleaved.

    Args:
        run: ``run(system, images_per_s, max_requests)`` -> the point's summary.
    """
    rounds: dict[str, list[dict]] = {s: [] for s in SYSTEMS}
    for _ in range(args.rounds):
        for system in SYSTEMS:
            rounds[system].append(run(system, saturation_rate, args.max_requests))
            print(f"{tag} {system:9s} saturation {json.dumps(rounds[system][-1])}", flush=True)
    points = []
    for system in SYSTEMS:
        ordered = sorted(rounds[system], key=lambda p: p["throughput_per_s"])
        median = ordered[len(ordered) // 2]
        points.append({"system": system, "load": "saturation", **median,
                       "rounds": [p["throughput_per_s"] for p in rounds[system]]})
    base = points[0]["throughput_per_s"]
    for fraction in FRACTIONS:
        for system in SYSTEMS:
            point = run(system, fraction * base, args.max_requests)
            points.append({"system": system, "load": fraction, **point})
            print(f"{tag} {system:9s} x{fraction:<4} {json.dumps(point)}", flush=True)
    return {"full_saturation_per_s": base, "points": points}


def sweep_alone(model, pool, labels, expected, args) -> dict[str, Any]:
    full = full_forward(model)
    batches = list(pool[:4096].split(args.max_batch))
    start = time.perf_counter()
    for b in batches:
        full(b)
    capacity = 4096 / (time.perf_counter() - start)  # offline, at --max-batch: only to set the saturation load
    costs = model.policy.costs.tolist()
    wait = args.batch_wait_ms / 1000
    systems = {
        "full": Batcher(full, args.max_batch, wait),
        "per_batch": Batcher(model, args.max_batch, wait),
        "engine": ExitEngine(model, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms),
    }

    def run(name: str, rate: float, count: int) -> dict:
        system = systems[name]
        arrivals = poisson_times(rate, args.seconds, min(count, int(rate * args.seconds) + 1), seed=int(rate))
        before = system.snapshot() if name == "engine" else len(system.batches)
        records = run_threaded(system.submit, pool, arrivals, 1, drain_s=60)
        exits, predictions = expected["full" if name == "full" else "adaptive"]
        point = summarize(records, labels, exits, predictions, [1.0] * len(costs) if name == "full" else costs, rate)
        if name == "engine":
            point["mean_batch"] = engine_batches(before, system.snapshot())
        else:
            sizes = system.batches[before:]
            point["mean_batch"] = [round(sum(sizes) / max(1, len(sizes)), 1)]
        time.sleep(0.2)
        return point

    try:
        return sweep(run, 3 * capacity, args, "alone")
    finally:
        for system in systems.values():
            system.close()


# ---------------------------------------------------------------------------------------- with Ray
def baseline_deployment(mode: str):
    """A Ray Serve deployment running the full model or per-batch early exit under ``@serve.batch``."""
    from ray import serve

    from eenet_fast.http_io import BadRequest, answer_json, input_dtypes, parse_request
    from eenet_fast.serving import load_model

    class Baseline:
        def __init__(self, factory: str, policy: bytes, max_batch: int, wait_s: float) -> None:
            torch.set_num_threads(1)
            model, example = load_model(factory, policy)
            self.run = full_forward(model) if mode == "full" else model
            self.dtypes = input_dtypes(example)
            self.batched.set_max_batch_size(max_batch)
            self.batched.set_batch_wait_timeout_s(wait_s)

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=lambda xs: sum(len(x) for x in xs))
        async def batched(self, xs: list[torch.Tensor]) -> list[dict]:
            result, start, out = self.run(torch.cat(xs)), 0, []
            for x in xs:
                part = slice(start, start + len(x))
                start += len(x)
                out.append(answer_json(ExitResult(*(t[part] for t in (result.logits, result.predictions, result.exits,
                                                                      result.nonfinite)))))
            return out

        async def __call__(self, request: Any) -> Any:
            from starlette.responses import JSONResponse

            try:
                x = parse_request(await request.body(), self.dtypes, 16 << 20, request.headers.get("content-type"))
            except BadRequest as error:
                return JSONResponse({"error": str(error)}, status_code=error.status)
            return JSONResponse(await self.batched(x))

    return serve.deployment(Baseline, name=mode, max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0.5})


def sweep_ray(name, policy, pool, labels, expected, costs, args) -> dict[str, Any]:
    import ray
    from ray import serve

    from eenet_fast.http_io import NPY, encode_inputs
    from eenet_fast.serving import build_app

    factory = f"bench_serving:{name}_factory"
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")  # a busy machine starts the proxy slowly
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(BENCH), str(REPO / "examples")]),
                                       "OMP_NUM_THREADS": "1"}})
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        policy_bytes = policy.read_bytes()
        wait = args.batch_wait_ms / 1000
        for mode in ("full", "per_batch"):
            serve.run(baseline_deployment(mode).bind(factory, policy_bytes, args.max_batch, wait), name=mode,
                      route_prefix=f"/{mode}")
        serve.run(build_app(factory, policy, name="engine", num_cpus=0.5, max_batch=args.max_batch,
                            max_wait_ms=args.max_wait_ms, max_pending=None),  # queue like the baselines do
                  name="engine", route_prefix="/engine")
        n = args.ray_images
        batches = [pool[j * n : (j + 1) * n] for j in range(min(400, len(pool) // n))]
        if args.body == "npy":
            payloads, content_type = [encode_inputs(b)[0] for b in batches], NPY
        else:
            payloads, content_type = [json.dumps({"inputs": b.tolist()}).encode() for b in batches], "application/json"
        url = f"http://127.0.0.1:{port}"

        def stats() -> dict:
            import requests

            return requests.get(f"{url}/engine/stats", timeout=30).json()

        def load(system: str, rate: float, count: int = args.max_requests) -> list:
            arrivals = poisson_times(rate, args.seconds, min(count, int(rate * args.seconds) + 1), seed=int(rate))
            return asyncio.run(run_http(f"{url}/{system}", payloads, n, arrivals, drain_s=60, content_type=content_type))

        probe = summarize(load("full", 1000.0, 3000 // n), labels, *expected["full"], [1.0] * len(costs), 1000.0)

        def run(system: str, rate: float, count: int) -> dict:
            exits, predictions = expected["full" if system == "full" else "adaptive"]
            before = stats()
            point = summarize(load(system, rate / n, count), labels, exits, predictions,
                              [1.0] * len(costs) if system == "full" else costs, rate)
            point["mean_batch"] = engine_batches(before, stats()) if system == "engine" else None
            return point

        return {"images_per_request": n, "body": args.body, **sweep(run, 3 * probe["throughput_per_s"], args, "ray  ")}
    finally:
        serve.shutdown()
        ray.shutdown()


# ---------------------------------------------------------------------------------------- the report
def verdict(part: dict[str, Any], unit: str = "latency") -> dict[str, Any]:
    """The issue's bars on one sweep: saturation ratios, first-exit p50 at 0.8 load, never below full;
    and the engine's limit (``limit_over_full``: every stage at full batches, no overhead, so the full
    model's throughput over the policy's time share; ``None`` for a FLOPs budget, whose share is not
    one of time) beside what ">= 1.3x per-batch" needs."""
    at = {(p["system"], p["load"]): p for p in part["points"]}
    sat = {s: at[(s, "saturation")]["throughput_per_s"] for s in SYSTEMS}
    first, full_p50 = at[("engine", 0.8)]["p50_ms_by_exit"][0], at[("full", 0.8)]["p50_ms"]
    loads = ["saturation", *FRACTIONS]
    share = at[("engine", "saturation")]["avg_cost"]  # the policy's time share at --max-batch
    return {
        "engine_over_full_at_saturation": round(sat["engine"] / sat["full"], 3),
        "engine_over_per_batch_at_saturation": round(sat["engine"] / sat["per_batch"], 3),
        "per_batch_over_full_at_saturation": round(sat["per_batch"] / sat["full"], 3),
        # every stage at full batches with no overhead: full / share; the ">= 1.3x per-batch" needs
        # 1.3 x per_batch_over_full, above this limit when per-batch early exit is already near it
        "limit_over_full": round(1 / share, 3) if unit == "latency" else None,
        "needed_for_1.3x_per_batch_over_full": round(1.3 * sat["per_batch"] / sat["full"], 3),
        "first_exit_p50_over_full_p50_at_0.8": round(first / full_p50, 3) if first and full_p50 else None,
        "loads_where_engine_is_2pct_below_full": [
            f for f in loads if at[("engine", f)]["throughput_per_s"] < 0.98 * at[("full", f)]["throughput_per_s"]],
        "lost_or_wrong": sum(p["lost"] + p["wrong"] for p in part["points"]),
    }


def table(part: dict[str, Any]) -> str:
    rows = ["| system | load | offered/s | throughput/s | p50 ms | p99 ms | p50 ms by exit | mean batch per stage | accuracy | "
            "cost | refused | lost+wrong |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in part["points"]:
        throughput = f"{p['throughput_per_s']} (rounds {p['rounds']})" if "rounds" in p else p["throughput_per_s"]
        rows.append(f"| {p['system']} | {p['load']} | {p['offered_per_s']} | {throughput} | {p['p50_ms']} | "
                    f"{p['p99_ms']} | {p['p50_ms_by_exit']} | {p['mean_batch']} | {p['accuracy']} | {p['avg_cost']} | "
                    f"{p.get('refused', 0)} | {p['lost'] + p['wrong']} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("cnn", "resnet"), default="cnn")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--costs", choices=("latency", "flops"), default="latency",
                        help="the budget's unit: time at --max-batch on one thread, or FLOPs")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="the baselines' batch wait")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="the engine's max_wait_ms")
    parser.add_argument("--seconds", type=float, default=6.0, help="arrivals per point (bounded by count too)")
    parser.add_argument("--max-requests", type=int, default=8000, help="the most requests one point sends")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the saturation point (median kept)")
    parser.add_argument("--parts", default="alone,ray", help="which sweeps: alone (no Ray), ray, or both")
    parser.add_argument("--ray-images", type=int, default=16, help="images per HTTP request")
    parser.add_argument("--body", choices=("npy", "json"), default="npy", help="the HTTP requests' body format")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    steady_allocator()  # as the servers run (eenet_fast.allocator)
    model, policy, images, labels = prepare(args.model, args.costs, args.max_batch)
    pool = images[:8192].contiguous()
    with torch.no_grad():
        adaptive = [model(b) for b in pool.split(256)]
        full = [full_forward(model)(b) for b in pool.split(256)]
    expected = {
        "adaptive": (torch.cat([r.exits for r in adaptive]), torch.cat([r.predictions for r in adaptive])),
        "full": (torch.cat([r.exits for r in full]), torch.cat([r.predictions for r in full])),
    }
    report: dict[str, Any] = {
        "model": args.model, "budget": 0.5, "unit": args.costs, "costs": model.policy.costs.tolist(), "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "args": vars(args) | {"out": str(args.out)},
        "load_average": os.getloadavg(),
    }
    if "alone" in args.parts:
        report["alone"] = sweep_alone(model, pool, labels[:8192], expected, args)
        report["alone"]["verdict"] = verdict(report["alone"], args.costs)
    if "ray" in args.parts:
        report["ray"] = sweep_ray(args.model, policy, pool, labels[:8192], expected, model.policy.costs.tolist(), args)
        report["ray"]["verdict"] = verdict(report["ray"], args.costs)
    args.out.mkdir(parents=True, exist_ok=True)
    parts = "" if sorted(args.parts.split(",")) == ["alone", "ray"] else "-" + args.parts.replace(",", "-")
    body = f"-{args.body}" if "ray" in args.parts else ""
    stem = args.out / f"serving-{args.model}{'-flops' if args.costs == 'flops' else ''}{parts}{body}-{datetime.date.today().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    unit = "time budget 0.5 at batch " + str(args.max_batch) if args.costs == "latency" else "FLOPs budget 0.5"
    lines = [f"# Serving, {args.model}, EENet at {unit} ({report['date']}, {report['cpus']} CPUs, 1 torch thread)"]
    for part in ("alone", "ray"):
        if part in report:
            how = f" ({report[part]['images_per_request']} images per request, {report[part]['body']} bodies)" if part == "ray" else ""
            lines += ["", f"## {part}{how}: the full model saturates at {report[part]['full_saturation_per_s']} images/s", "",
                      table(report[part]), "", "verdict: " + json.dumps(report[part]["verdict"])]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
