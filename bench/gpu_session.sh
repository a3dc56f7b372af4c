#!/usr/bin/env bash
# One GPU session's checks, prepared so that they fit a short device lease (about 8 minutes):
# install offline, run the kernel and family tests with the kernels compiled for CUDA (and the real
# torchvision/timm models the GPU image has), then the GPU benchmarks, and summarise them against
# the bars of the kernels issue. Everything lands in $OUT (the device tool's folder) or
# bench/results/<date>/; copy env.txt, summary.md and bench.json into bench/results/ afterwards.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out=${OUT:-bench/results/$(date +%Y%m%d-%H%M)}
mkdir -p "$out"
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$out/install.log" 2>&1 || { tail "$out/install.log"; exit 1; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
  git rev-parse --short HEAD 2>/dev/null
} >"$out/env.txt" 2>&1
cat "$out/env.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels_exit_decision.py tests/test_kernels_compaction.py tests/test_backends.py tests/test_families.py 2>&1 | tee "$out/tests.txt" | tail -8
timeout 420 python3 -m pytest -q -p no:cacheprovider bench/bench_kernels.py bench/bench_end_to_end.py \
  --benchmark-json="$out/bench.json" --benchmark-columns=median,rounds >"$out/bench.txt" 2>&1
tail -3 "$out/bench.txt"
python3 bench/summarize_gpu.py "$out/bench.json" | tee "$out/summary.md"
