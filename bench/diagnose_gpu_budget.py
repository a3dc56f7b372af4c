"""Why the ResNet example at batch 4096 over-spends its time budget on the GPU (#14): the time
share the calibration measured on its example against the one served on test rows, for the same
installed policy, with the 256 example rows repeated to 4096 and with 4096 distinct rows.

Run on a CUDA machine: ``python bench/diagnose_gpu_budget.py [--shapes]`` (``--shapes``: time each
stage at batch sizes on and off the powers of two first) (needs the Fashion-MNIST files).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_budget  # noqa: E402

from eenet_fast import evaluate  # noqa: E402
from eenet_fast.timing import _stage_outputs, full_pass, measure_shares, reach  # noqa: E402


@torch.no_grad()
def cuda_ms(fn, repeats: int = 15) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(8)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    print("cudnn.benchmark", torch.backends.cudnn.benchmark, flush=True)
    setup = bench_budget._resnet()
    model, full, val, test = setup["model"].to("cuda"), setup["full"].to("cuda"), setup["val"], setup["test"]
    x = setup["x"].to("cuda")
    n, rows = 4096, x[:4096]
    print(f"model.backend={model.backend}", flush=True)

    if "--shapes" in sys.argv:
        shapes(model, full, rows)
    calibrations(model, full, val, test, x, rows, n)


def shapes(model, full, rows) -> None:
    # 1. the denominators: the bench's full model (the ResNet itself) against the stages + last head
    print(f"full net(x) {cuda_ms(lambda: full(rows)):.3f} ms; full_pass(model, x) {cuda_ms(lambda: full_pass(model, rows)):.3f} ms", flush=True)

    # 2. each later stage at batch sizes off and on the powers of two (cuDNN picks kernels by shape)
    with torch.no_grad():
        states = _stage_outputs(model, rows)
    for k in range(1, model.num_exits):
        inp = states[k - 1]
        line = []
        for m in (1024, 1023, 1040, 1365, 2048, 2047, 2032, 2731, 3000, 4096):
            part = inp[:m]
            line.append(f"{m}:{cuda_ms(lambda: (model.heads[k](model.stages[k](part)))):.3f}")
        print(f"stage {k} + head (ms): " + " ".join(line), flush=True)


def calibrations(model, full, val, test, x, rows, n) -> None:
    # 3. calibrate with each example, then time the installed policy on the example and on test rows
    for name, example in (("4096 distinct rows", rows), ("256 rows repeated", x[:256])):
        for budget in (0.5, 0.7):
            start = time.perf_counter()
            fitted = model.calibrate(val, budget, "eenet", costs="latency", example=example, batch_size=n, progress=False, seed=0)
            took = time.perf_counter() - start
            expected = evaluate(fitted, test)
            predicted = fitted.latency.predicted_fraction(reach(expected.exits, model.num_exits), n)
            model.policy = fitted
            knots = fitted.latency.batch_sizes
            print(f"  ladder {knots}\n  last stage's step (ms): "
                  + " ".join(f"{m}:{1e3 * t:.2f}" for m, t in zip(knots, fitted.latency.exit_times[-1].tolist()) if m >= 512), flush=True)
            served, iqr, exits = bench_budget.measure(model, full, rows, n, 7, 3.0)
            served_reach = reach(exits.cpu(), model.num_exits)
            (on_example,), (example_reach,) = measure_shares(model, [fitted], example, n, 9)
            (on_test,), (test_reach,) = measure_shares(model, [fitted], rows, n, 9)
            print(f"[{name}] budget {budget}: calibrated in {took:.0f} s, corrections first {fitted.latency.first_factor:.3f} "
                  f"later {fitted.latency.correction:.3f}\n"
                  f"  predicted {predicted:.3f} at cached-test reach {[round(r, 3) for r in reach(expected.exits, model.num_exits)]}\n"
                  f"  served (bench, vs net) {served:.3f} (IQR {iqr:.3f}) at reach {[round(r, 3) for r in served_reach]}\n"
                  f"  measure_shares on example {statistics.median(on_example):.3f} (model predicts "
                  f"{fitted.latency.predicted_fraction(example_reach, n):.3f}) at reach {[round(r, 3) for r in example_reach]}\n"
                  f"  measure_shares on test rows {statistics.median(on_test):.3f} (model predicts "
                  f"{fitted.latency.predicted_fraction(test_reach, n):.3f}) at reach {[round(r, 3) for r in test_reach]}",
                  flush=True)


if __name__ == "__main__":
    main()
