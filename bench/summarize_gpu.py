"""Summarise a GPU run of bench_kernels.py and bench_end_to_end.py against the kernels issue's bars.

Usage: ``python bench/summarize_gpu.py bench.json`` (the ``--benchmark-json`` file); prints Markdown.
The memory floor is this run's own plain copy of the kept rows (``copy_kept`` at B = 8192), so
no card's datasheet bandwidth is assumed.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def load(path: str) -> tuple[dict, list[dict]]:
    data = json.load(open(path))
    rows = []
    for bench in data["benchmarks"]:
        info, params = bench.get("extra_info", {}), bench.get("params") or {}
        us = info.get("median_us_cuda_events", 1e6 * bench["stats"]["median"])
        rows.append({"name": bench["name"].split("[")[0], **params, **info, "us": us})
    return data.get("machine_info", {}), rows


def main(path: str) -> None:
    machine, rows = load(path)
    print(f"# GPU benchmark summary\n\nfile: `{path}`; machine: {machine.get('node', '?')}\n")
    decision = defaultdict(dict)
    for r in rows:
        if r["name"] == "test_decision":
            decision[(r["batch"], r["num_classes"])][r["impl"]] = r
    compaction = {(r["batch"], r["impl"]): r for r in rows if r["name"] == "test_compaction"}
    floor = compaction.get((8192, "copy_kept"), {}).get("gb_per_s")
    bars = []

    print("## Decision (µs, CUDA events; GB/s of the fused kernel)\n")
    print("| B | C | fused | eager | compile | eager / fused | compile / fused | fused GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for (batch, classes), impls in sorted(decision.items()):
        fused = impls.get("fused", {}).get("us")
        eager, comp = impls.get("eager", {}).get("us"), impls.get("compile", {}).get("us")
        ratio = lambda other: f"{other / fused:.1f}x" if other and fused else "-"  # noqa: E731
        print(f"| {batch} | {classes} | {fused or '-':.6} | {eager or '-':.6} | {comp or '-':.6} | {ratio(eager)} "
              f"| {ratio(comp)} | {impls.get('fused', {}).get('gb_per_s', 0):.0f} |")
        if batch == 16384 and classes <= 1000 and fused:
            bars.append((f"decision B=16384 C={classes}: >= 8x eager", eager and eager / fused >= 8, ratio(eager)))
            bars.append((f"decision B=16384 C={classes}: >= 3x compile", comp and comp / fused >= 3, ratio(comp)))
    big = decision.get((131072, 1000), {}).get("fused")
    if big and floor:
        bars.append(("decision B=131072 C=1000: within 1.5x of the copy floor", floor / big["gb_per_s"] <= 1.5,
                     f"{big['gb_per_s']:.0f} GB/s vs copy {floor:.0f} GB/s"))

    print("\n## Compaction (µs)\n")
    print("| B | triton | bool_index | index_select | copy_kept |")
    print("|---|---|---|---|---|")
    for batch in sorted({b for b, _ in compaction}):
        cells = [compaction.get((batch, i), {}).get("us") for i in ("triton", "bool_index", "index_select", "copy_kept")]
        print(f"| {batch} | " + " | ".join(f"{c:.1f}" if c else "-" for c in cells) + " |")
    t1, b1 = compaction.get((1024, "triton")), compaction.get((1024, "bool_index"))
    if t1 and b1:
        bars.append(("compaction B=1024: >= 3x boolean indexing", b1["us"] / t1["us"] >= 3, f"{b1['us'] / t1['us']:.2f}x"))
    t8, c8 = compaction.get((8192, "triton")), compaction.get((8192, "copy_kept"))
    if t8 and c8:
        bars.append(("compaction B=8192: within 1.3x of the kept-rows copy", t8["us"] / c8["us"] <= 1.3, f"{t8['us'] / c8['us']:.2f}x"))

    print("\n## End to end, anchor CNN (µs; speed-up over the full model, same run)\n")
    print("| B | provider | µs | speed-up | exit mix |")
    print("|---|---|---|---|---|")
    end_to_end = [r for r in rows if r["name"] == "test_end_to_end"]
    full = {r["batch"]: r["us"] for r in end_to_end if r["provider"] == "full"}
    for r in sorted(end_to_end, key=lambda r: (r["batch"], r["provider"])):
        speedup = full.get(r["batch"], float("nan")) / r["us"]  # from this file's times: a failed check records none
        print(f"| {r['batch']} | {r['provider']} | {r['us']:.0f} | {speedup:.2f}x | {r.get('exit_mix', '')} |")
        if r["provider"] == "eenet_triton":
            need = {2048: 1.30, 256: 1.10}.get(r["batch"], 1.0)
            bars.append((f"end to end B={r['batch']}: >= {need:.2f}x the full model", speedup >= need, f"{speedup:.2f}x"))

    print("\n## Bars of the kernels issue\n")
    for what, met, value in bars:
        print(f"- [{'x' if met else ' '}] {what}: {value}")


if __name__ == "__main__":
    main(sys.argv[1])
