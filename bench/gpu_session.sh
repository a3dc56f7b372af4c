#!/usr/bin/env bash
# One GPU session's checks, prepared so that they fit a short device lease (at most about 8 minutes,
# each part under its own time limit): install offline, run the kernel, backend and family tests with
# the kernels compiled for CUDA (and the real torchvision/timm models the GPU image has), then the GPU
# benchmarks (per-exit overhead, time budgets on the demo CNN and the ResNet example). With
# KERNELS=1 it also runs the kernel benchmarks (anchor CNN end to end, the decision's tiles) and a
# summary against the bars of the kernels issue. Everything lands in $OUT (the device tool's folder)
# or bench/results/<date>/; copy what matters into bench/results/ afterwards.
# The budgets calibrate on a whole batch of real rows (46-66 s per calibration of the ResNet at 4096
# on an H200: 4096 first, so that a timeout cuts 1024; each row is printed to the log as it ends), and
# the log has each policy measured on the example (the fallback of _within_measured).
# The time-budget part needs the Fashion-MNIST files and the cached demo model: carry them as
# .gpu_data/fashion-mnist and eenet_runs/demo (it is skipped without them).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out=${OUT:-bench/results/$(date +%Y%m%d-%H%M)}
mkdir -p "$out"
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/tmp/install.log 2>&1 || { tail /tmp/install.log; exit 1; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
  git rev-parse --short HEAD 2>/dev/null; git status --short 2>/dev/null | head -5
} 2>&1 | tee "$out/tests.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels_exit_decision.py tests/test_kernels_compaction.py \
  tests/test_backends.py tests/test_decision.py tests/test_kernels_compile.py tests/test_families.py 2>&1 | tee -a "$out/tests.txt" | tail -8
if [ "${KERNELS:-0}" = 1 ]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider bench/bench_kernels.py bench/bench_end_to_end.py \
    --benchmark-json="$out/bench.json" --benchmark-columns=median,rounds >"$out/bench.txt" 2>&1
  tail -3 "$out/bench.txt"
  python3 bench/summarize_gpu.py "$out/bench.json" | tee "$out/summary.md"
  timeout 120 python3 bench/sweep_decision_tiles.py --json "$out/sweep.json" >"$out/sweep.txt" 2>&1; grep "best\|Error" "$out/sweep.txt"
fi
timeout 80 python3 bench/bench_overhead.py --device cuda --rounds 9 2>&1 | tee "$out/overhead.txt"
if [ -d .gpu_data/fashion-mnist ] && [ -d eenet_runs/demo ]; then
  mkdir -p /usr/share/datasets && cp -r .gpu_data/fashion-mnist /usr/share/datasets/
  timeout 90 python3 bench/bench_budget.py --model cnn --device cuda --threads 8 --batches 1024 4096 \
    --budgets 0.5 0.7 --rounds 5 --seconds 3 --markdown "$out/budget-cnn.md" >"$out/budget-cnn.log" 2>&1
  tail -14 "$out/budget-cnn.log"
  timeout 240 python3 bench/bench_budget.py --model resnet --device cuda --threads 8 --batches 4096 1024 \
    --budgets 0.5 0.7 --rounds 5 --seconds 3 --markdown "$out/budget-resnet.md" >"$out/budget-resnet.log" 2>&1
  tail -12 "$out/budget-resnet.log"
fi
