"""Per-exit overhead of adaptive inference, in microseconds, by batch size.

Run: ``python bench/bench_overhead.py [--policy eenet] [--threads 2]``. On the demo CNN (random
weights: the time does not depend on them), every sample is kept to the last exit, so the adaptive
forward runs every stage and head like the plain pass below plus, at each exit, the decision
(features, score, flags), the writes and the compaction bookkeeping. Overhead per exit = (adaptive
forward - plain pass over every stage and head) / K, medians of interleaved rounds.
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
from eenet_fast.zoo import MultiExitCNN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="eenet")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = wrap(MultiExitCNN().eval(), backend="torch").eval()
    val = model.collect([(torch.randn(512, 1, 28, 28), torch.randint(10, (512,)))], progress=False)
    options = {"epochs": 1} if args.policy == "eenet" else {}
    policy = calibrate(model, val, 0.6, args.policy, costs=[0.3, 0.6, 1.0], progress=False, **options)
    policy.thresholds[:-1] = math.inf  # nobody leaves early: every stage runs, as in the plain pass
    rows = []
    for n in (1, 8, 32, 256):
        x = torch.randn(n, 1, 28, 28)

        def plain() -> None:
            with torch.no_grad():
                state = x
                for stage, head in zip(model.stages, model.heads):
                    state = stage(state)
                    head(state)

        inner = max(1, 256 // n)
        plain_times, adaptive_times = [], []
        for _ in range(args.rounds + 1):
            for fn, times in ((plain, plain_times), (lambda: model(x), adaptive_times)):
                start = time.perf_counter()
                for _ in range(inner):
                    fn()
                times.append((time.perf_counter() - start) / inner)
        p, a = statistics.median(plain_times[1:]), statistics.median(adaptive_times[1:])
        rows.append([n, f"{1e6 * p:.0f}", f"{1e6 * a:.0f}", f"{1e6 * (a - p) / model.num_exits:.0f}"])
    print(f"{args.policy}, {args.threads} threads")
    print(tabulate(rows, ["batch", "stages + heads (us)", "adaptive, nobody leaving (us)", "overhead per exit (us)"], tablefmt="github"))


if __name__ == "__main__":
    main()
