"""What a time budget buys at the batch size served: measured time / full-model time next to the budget.

Run: ``python bench/bench_budget.py --model cnn --markdown bench/results/budget-cnn.md`` (``--model
resnet`` for the ResNet example; ``--load`` adds a competing CPU load; ``--quick`` for a smoke run).
For each batch size (1, 8, 32, 256, 1024) and time budget (0.4, 0.5, 0.7) the policy (EENet by
default) is calibrated with ``costs="latency", batch_size=n`` on the validation outputs, then the
test images run in batches of ``n`` through the full model and the adaptive model in interleaved
rounds (at least ``--rounds``, and as many as fill ``--seconds``): the ratio is the median over the
rounds of adaptive / full time (with its interquartile range), next to the time the calibration
predicted and the test accuracy of both. A budget no policy can meet at a batch size is reported
with the smallest feasible budget there.

``--load`` starts a competing process (one thread of matrix products, bounded in time, stopped at the
end) and calibrates a second time while it runs: that policy's test accuracy, and its time share
served on the quiet machine on the threads it was timed with (one, when the calibration found the
machine busy), next to the quiet calibration's show what a busy machine does to the calibration
(more accuracy is no gain if it comes from spending more than the budget). When the loaded
calibration fell back to fewer threads, the quiet one is repeated on as many: the difference
between those two is what the load itself did, apart from the thread count.

``--repeat N`` calibrates each point N times, serves each policy twice, and adds a table of the
spread over the calibrations next to the measurement's own (the same policy measured twice): which
of the two decides a miss.

``--device cuda`` serves and calibrates on the GPU (the cached validation and test outputs stay those of
the CPU forward, TF32 is switched off so that the GPU's logits stay close to them, and a sample whose
exit differs from the offline one beyond rounding is reported in the row instead of stopping the run).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from tabulate import tabulate

from eenet_fast import evaluate, measure_speed, steady_allocator
from eenet_fast.evaluate import check_exits
from eenet_fast.errors import BudgetError
from eenet_fast.threads import torch_threads
from eenet_fast.timing import reach

ROOT = Path(__file__).resolve().parents[1]
BATCHES, BUDGETS = (1, 8, 32, 256, 1024), (0.4, 0.5, 0.7)
LOAD = """
import os, sys, time, torch
torch.set_num_threads(1)
a = torch.randn(384, 384)
deadline, parent = time.time() + float(sys.argv[1]), int(sys.argv[2])
while time.time() < deadline and os.getppid() == parent:  # stops by itself, and with the bench
    a = torch.tanh(a @ a)
"""


def _demo_cnn() -> dict[str, Any]:
    from eenet_fast.demo import DemoConfig, prepare_demo

    parts = prepare_demo(DemoConfig(out=ROOT / "eenet_runs/demo", progress=False), log=lambda _: None)
    return {"name": "demo CNN", "model": parts.model, "full": parts.net, "val": parts.val, "test": parts.test,
            "x": parts.x_test, "y": parts.y_test}


def _resnet() -> dict[str, Any]:
    from eenet_fast.datasets import load_fashion_mnist

    sys.path.insert(0, str(ROOT / "examples"))  # the example imports its neighbour common.py
    spec = importlib.util.spec_from_file_location("resnet_example", ROOT / "examples/resnet_fashion_mnist.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    net, model, _, val, test = example.trained_resnet(load_fashion_mnist())
    x, y = torch.cat([b[0] for b in test]), torch.cat([b[1] for b in test])
    return {"name": "ResNet example", "model": model, "full": net, "val": model.collect(val, progress=False),
            "test": model.collect(test, progress=False), "x": x, "y": y}


@contextmanager
def background_load(seconds: float, on: bool) -> Iterator[None]:
    """A competing process for at most ``seconds`` while the block runs; it also stops when this
    process dies (killed benches leave no load behind)."""
    process = subprocess.Popen([sys.executable, "-c", LOAD, str(seconds), str(os.getpid())]) if on else None
    try:
        yield
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)


MEASURE_SECONDS = 10.0  # at least this long per measurement: small batches take many more rounds than 5


def measure(model: Any, full: Any, x: torch.Tensor, batch: int, rounds: int,
            seconds: float = MEASURE_SECONDS) -> tuple[float, float, torch.Tensor]:
    """Median and interquartile range of adaptive / full time over interleaved rounds, and the exits.

    ``rounds`` is the least number of rounds: there are as many more as fill about ``seconds`` (one
    full pass, untimed, sizes them). A round of a small batch lasts a fraction of a second and the
    machine's noise does not average out within it (demo CNN at batch 32, one policy measured every
    2.5 s over 4 minutes with 3 rounds: 0.61-0.96, the full pass 3.8-6.4 ms per batch)."""
    batches = list(x.split(batch))
    adaptive_pass, full_pass = (lambda: [model(b) for b in batches]), (lambda: [full(b) for b in batches])
    start = time.perf_counter()
    full_pass()
    if x.is_cuda:
        torch.cuda.synchronize()
    rounds = max(rounds, math.ceil(seconds / (1.7 * max(time.perf_counter() - start, 1e-9))))  # adaptive: about 0.7 of full
    speed, results = measure_speed(adaptive_pass, full_pass, rounds=rounds, device=x.device)
    return speed.share, speed.share_iqr, torch.cat([res.exits for res in results])


def run(setup: dict[str, Any], policy: str, batches: tuple[int, ...], budgets: tuple[float, ...], load: bool, rounds: int,
        repeat: int = 1, seconds: float = MEASURE_SECONDS) -> list[dict]:
    model, full, val, test, x = setup["model"], setup["full"], setup["val"], setup["test"], setup["x"]
    full_accuracy = float(test.correct[-1].double().mean())
    rows = []
    for n, budget, i in ((n, b, i) for n in batches for b in budgets for i in range(repeat)):
        samples = min(len(x), max(64 * n, 400))  # enough batches for a stable time, bounded at batch 1
        samples -= samples % n if samples >= n else 0  # whole batches only: a ragged last one is not the size served
        row: dict[str, Any] = {"model": setup["name"], "policy": policy, "batch": n, "budget": budget, "samples": samples,
                               "calibration": i}
        # real rows (calibrate's `example`): a whole batch on a GPU; on the CPU at least 256, which
        # small batches are timed on in distinct batches
        example = x[: n if x.is_cuda else max(n, 256)]
        options = {"seed": 0} if policy == "eenet" else {}
        try:
            fitted = model.calibrate(val, budget, policy, costs="latency", example=example, batch_size=n, progress=False, **options)
        except BudgetError as error:
            row.update(status=f"infeasible (smallest feasible {getattr(error, 'smallest_feasible', float('nan')):.3f})")
            rows.append(row)
            print(row, flush=True)
            continue
        expected = evaluate(fitted, test)
        ratio, spread, exits = measure(model, full, x[:samples], n, rounds, seconds)
        try:  # raises unless a score at its threshold
            check_exits(fitted, test.subset(torch.arange(samples)), exits)
        except RuntimeError as error:
            if not x.is_cuda:
                raise
            row["exits_check"] = str(error)[:300]  # GPU logits vs the CPU's cached outputs
        row.update(status="ok", time_ratio=ratio, ratio_iqr=spread, predicted=fitted.latency.predicted_fraction(reach(expected.exits, model.num_exits), n),
                   accuracy=expected.accuracy, full_accuracy=full_accuracy,
                   exit_mix=[round(f, 3) for f in expected.exit_fractions],
                   corrections=[round(fitted.latency.first_factor, 3), round(fitted.latency.correction, 3)])
        if repeat > 1:  # the same policy measured again: what the measurement itself scatters
            row["time_ratio_again"] = measure(model, full, x[:samples], n, rounds, seconds)[0]
        if load:
            with background_load(600, True):
                try:
                    loaded = model.calibrate(val, budget, policy, costs="latency", example=example, batch_size=n,
                                             progress=False, **options)
                    row["accuracy_loaded_calibration"] = evaluate(loaded, test).accuracy
                except BudgetError as error:
                    row["accuracy_loaded_calibration"] = f"infeasible ({getattr(error, 'smallest_feasible', float('nan')):.3f})"
                    loaded = None
            if loaded is not None:  # served quiet on the threads it was timed with: does the budget hold?
                threads, fewer = loaded.latency.threads, loaded.latency.threads < torch.get_num_threads()
                row["threads_loaded_calibration"] = threads
                with torch_threads(threads):
                    row["time_ratio_loaded_calibration"] = measure(model, full, x[:samples], n, rounds, seconds)[0]
                    if fewer:  # the quiet calibration on as many threads
                        same = model.calibrate(val, budget, policy, costs="latency", example=example, batch_size=n,
                                               progress=False, **options)
                        row["accuracy_quiet_same_threads"] = evaluate(same, test).accuracy
        model.policy = fitted
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    head = ["batch", "budget", "time / full (IQR)", "predicted", "within 7 %", "accuracy (full)", "exit mix",
            "loaded calibration: acc. (time / full, served quiet on its threads)", "quiet, same threads: acc."]
    body = []
    for r in rows:
        if r["status"] != "ok":
            body.append([r["batch"], r["budget"], r["status"], "", "", "", "", "", ""])
            continue
        within = abs(r["time_ratio"] - r["budget"]) <= 0.07 * r["budget"]
        loaded = r.get("accuracy_loaded_calibration", "")
        if isinstance(loaded, float):
            loaded = f"{100 * loaded:.2f} % ({r['time_ratio_loaded_calibration']:.3f}, {r['threads_loaded_calibration']} thr.)"
        same = r.get("accuracy_quiet_same_threads")
        same = f"{100 * same:.2f} %" if same is not None else ""
        body.append([r["batch"], r["budget"], f"{r['time_ratio']:.3f} ({r['ratio_iqr']:.3f})", f"{r['predicted']:.3f}",
                     "yes" if within else "no", f"{100 * r['accuracy']:.2f} % ({100 * r['full_accuracy']:.2f} %)",
                     "/".join(f"{100 * f:.0f}" for f in r["exit_mix"]), loaded, same])
    return tabulate(body, head, tablefmt="github")


def repeatability(rows: list[dict]) -> str:
    """Per batch and budget over the calibrations of ``--repeat``: the served shares and how many are
    within 7 % of the budget, the measurement's own scatter (the same policy measured twice) and the
    accuracies: a spread of the shares well beyond the measurement's is the calibration's."""
    head = ["batch", "budget", "calibrations", "time / full: min / median / max", "within 7 %",
            "same policy measured twice: median abs. difference", "accuracy: min / max"]
    body = []
    for n, budget in dict.fromkeys((r["batch"], r["budget"]) for r in rows):
        ok = [r for r in rows if (r["batch"], r["budget"]) == (n, budget) and r["status"] == "ok"]
        if not ok:
            continue
        shares, accuracies = sorted(r["time_ratio"] for r in ok), [r["accuracy"] for r in ok]
        within = sum(abs(v - budget) <= 0.07 * budget for v in shares)
        twice = statistics.median(abs(r["time_ratio_again"] - r["time_ratio"]) for r in ok)
        body.append([n, budget, len(ok), f"{shares[0]:.3f} / {statistics.median(shares):.3f} / {shares[-1]:.3f}",
                     f"{within} of {len(ok)}", f"{twice:.3f}", f"{100 * min(accuracies):.2f} % / {100 * max(accuracies):.2f} %"])
    return tabulate(body, head, tablefmt="github")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("cnn", "resnet"), default="cnn")
    parser.add_argument("--policy", default="eenet")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="at least this many rounds per measurement")
    parser.add_argument("--seconds", type=float, default=MEASURE_SECONDS,
                        help="and as many more rounds as fill about this many seconds (small batches)")
    parser.add_argument("--load", action="store_true", help="also calibrate under a competing CPU load")
    parser.add_argument("--quick", action="store_true", help="batch 8 and 256, budget 0.5, 2 rounds, no minimum time")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeat", type=int, default=1,
                        help="calibrate each point this many times, measure each policy twice, and summarise the spread")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("eenet_fast.calibration").setLevel(logging.INFO)  # each policy measured on the example, in the log
    steady_allocator()  # else time shares at large batches switch between two levels (eenet_fast.allocator)
    setup = _demo_cnn() if args.model == "cnn" else _resnet()
    if args.device != "cpu":
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        setup["model"].to(args.device)
        setup["full"].to(args.device)
        setup["x"] = setup["x"].to(args.device)
    batches, budgets, rounds, seconds = (((8, 256), (0.5,), 2, 0.0) if args.quick
                                         else (tuple(args.batches), tuple(args.budgets), args.rounds, args.seconds))
    rows = run(setup, args.policy, batches, budgets, args.load, rounds, max(1, args.repeat), seconds)
    where = f"{args.threads} threads" if args.device == "cpu" else torch.cuda.get_device_name()
    text = (f"# Time budgets at the batch size served: {setup['name']}, {args.policy}, {where}\n\n"
            f"`python bench/bench_budget.py {' '.join(sys.argv[1:])}` on {time.strftime('%Y-%m-%d')}\n\n{table(rows)}\n")
    if args.repeat > 1:
        text += f"\n## Over the {args.repeat} calibrations of each point\n\n{repeatability(rows)}\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
        args.markdown.with_suffix(".json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
