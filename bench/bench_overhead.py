"""Per-exit overhead of adaptive inference, in microseconds, by batch size.

Run: ``python bench/bench_overhead.py [--policy eenet] [--threads 2] [--device cuda]``. On the demo
CNN (random weights: the time does not depend on them), every sample is kept to the last exit, so the
adaptive forward runs every stage and head like the plain pass below plus, at each exit, the decision
(features, score, flags), the writes and the compaction bookkeeping. Overhead per exit = (adaptive
forward - plain pass over every stage and head) / K, medians of interleaved rounds. On CUDA both
backends are timed (torch and the Triton kernels), each time ending with a synchronisation.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from tabulate import tabulate

from eenet_fast import wrap
from eenet_fast.calibration import calibrate
from eenet_fast.timing import synchronizer
from eenet_fast.zoo import MultiExitCNN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="eenet")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (on CUDA the torch and triton backends are both timed)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = wrap(MultiExitCNN().eval(), backend="torch").eval()
    val = model.collect([(torch.randn(512, 1, 28, 28), torch.randint(10, (512,)))], progress=False)
    options = {"epochs": 1} if args.policy == "eenet" else {}
    policy = calibrate(model, val, 0.6, args.policy, costs=[0.3, 0.6, 1.0], progress=False, **options)
    policy.thresholds[:-1] = math.inf  # nobody leaves early: every stage runs, as in the plain pass
    model.to(device)
    sync = synchronizer(device)
    backends = ("torch", "triton") if device.type == "cuda" else ("torch",)
    rows = []
    for n in (1, 8, 32, 256):
        x = torch.randn(n, 1, 28, 28, device=device)

        def plain() -> None:
            with torch.no_grad():
                state = x
                for stage, head in zip(model.stages, model.heads):
                    state = stage(state)
                    head(state)

        def adaptive(backend: str) -> None:
            model.backend = backend
            model(x)

        providers = [("plain", plain)] + [(b, lambda b=b: adaptive(b)) for b in backends]
        inner = max(1, 256 // n)
        times: dict[str, list[float]] = {name: [] for name, _ in providers}
        for _ in range(args.rounds + 1):
            for name, fn in providers:
                sync()
                start = time.perf_counter()
                for _ in range(inner):
                    fn()
                sync()
                times[name].append((time.perf_counter() - start) / inner)
        p = statistics.median(times["plain"][1:])
        for b in backends:
            a = statistics.median(times[b][1:])
            rows.append([n, b, f"{1e6 * p:.0f}", f"{1e6 * a:.0f}", f"{1e6 * (a - p) / model.num_exits:.0f}"])
    print(f"{args.policy} on {device.type}" + (f", {args.threads} threads" if device.type == "cpu" else f" ({torch.cuda.get_device_name()})"))
    print(tabulate(rows, ["batch", "backend", "stages + heads (us)", "adaptive, nobody leaving (us)", "overhead per exit (us)"], tablefmt="github"))


if __name__ == "__main__":
    main()
