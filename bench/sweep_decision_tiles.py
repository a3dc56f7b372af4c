"""The fused decision's time over its tiles, on a CUDA device: which ``(BLOCK_B, BLOCK_C)`` and row
alignment hint the dispatcher should pick.

Run: ``python bench/sweep_decision_tiles.py [--json out.json]``. For float32 logits of ``C`` = 10, 100,
1000 and 1024 classes and bfloat16 ones of 32000 (B = 16384 and 131072), EENet's head at exit 2 (per-class
term, 16 hidden units, 2 earlier scores), every tile of at most 8192 elements with ``BLOCK_C`` the whole
row (or chunks of 1024-4096 classes for large ``C``), with and without the alignment hint; times are
medians of CUDA events with L2 flushed (``bench_kernels.cuda_time_us``). The table marks the tile the
dispatcher picks today and gives each one's GB/s (logits read once).
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
from tabulate import tabulate

from bench_kernels import cuda_time_us, eenet_head  # beside this file
from eenet_fast.kernels.exit_decision import _tiles, exit_decision, row_align

SHAPES = [(100, torch.float32), (1000, torch.float32), (32000, torch.bfloat16), (10, torch.float32), (1024, torch.float32)]
BATCHES = (16384, 131072)
MAX_TILE = 8192  # the dispatcher's largest (bigger tiles spill: bench/compile_kernels.py)


def tiles(num_classes: int) -> list[tuple[int, int]]:
    whole = triton.next_power_of_2(num_classes)
    widths = [whole] if whole <= 4096 else [1024, 2048, 4096]
    return [(b, c) for c in widths for b in (1, 2, 4, 8, 16, 32, 64, 128) if b * c <= MAX_TILE]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    for num_classes, dtype in SHAPES:
        params = eenet_head(num_classes)
        for batch in BATCHES:
            logits = torch.randn(batch, num_classes, device="cuda", dtype=dtype) * 3
            prev = torch.rand(batch, 2, device="cuda")
            nbytes = logits.numel() * logits.element_size()
            default = _tiles(batch, num_classes)
            aligns = sorted({1, row_align(logits)})
            for block_b, block_c in tiles(num_classes):
                for align in aligns:
                    us = cuda_time_us(lambda: exit_decision(logits, params, prev, 0.5, block_b=block_b, block_c=block_c, align=align),
                                      repeats=30)
                    rows.append({"C": num_classes, "dtype": str(dtype).removeprefix("torch."), "B": batch, "BLOCK_B": block_b,
                                 "BLOCK_C": block_c, "align": align, "us": us, "gb_per_s": nbytes / us / 1e3,
                                 "default": (block_b, block_c) == default and align == max(aligns)})
                    print(rows[-1], flush=True)  # a run stopped at its time limit keeps what it measured
            best = min((r for r in rows if r["C"] == num_classes and r["B"] == batch), key=lambda r: r["us"])
            print(f"C={num_classes} B={batch}: best {best['BLOCK_B']}x{best['BLOCK_C']} align {best['align']} "
                  f"{best['us']:.1f} us ({best['gb_per_s']:.0f} GB/s)", flush=True)
    print(tabulate([[r["C"], r["dtype"], r["B"], r["BLOCK_B"], r["BLOCK_C"], r["align"], f"{r['us']:.1f}", f"{r['gb_per_s']:.0f}",
                     "<- today" if r["default"] else ""] for r in rows],
                   ["C", "dtype", "B", "BLOCK_B", "BLOCK_C", "align", "us", "GB/s", ""], tablefmt="github"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
