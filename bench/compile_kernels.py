"""Compile every kernel variant the dispatchers launch for Hopper (sm_90) and Ampere (sm_80), no GPU needed.

Run: ``python bench/compile_kernels.py`` (the full grid, a table on stdout; ``--grid ci`` for the
few variants ``tests/test_kernels_compile.py`` checks, ``--json``/``--markdown`` to keep the
numbers). Exits with status 1 when a variant needs more than 255 registers or local memory.

A variant (``kernel_variants.py``) is a call of a dispatcher on CPU tensors of a given dtype and
shape. The call runs the real dispatch code (``_tiles``, the constexpr flags, ``num_warps``) up to
``kernel[grid](...)``; Triton's JIT then specialises the
arguments as it would on a GPU (pointer types, alignment, strides equal to 1), and its
``jit_cache_hook`` hands us that specialisation and cancels the launch. So the variants compiled
here are the ones the dispatchers would launch, and cannot drift from them. Each is compiled with
``triton.compile`` for ``GPUTarget("cuda", arch, 32)``; registers, spill stores and stack frame
come from the log of the ``ptxas`` bundled with Triton, shared memory from the compiled metadata
(what a launch requests). Nothing needs a driver or a GPU.
"""

from __future__ import annotations

import os

# The kernels must be defined as JIT functions that compile for a GPU. Under TRITON_INTERPRET=1
# (tests/conftest.py sets it on machines without CUDA) @triton.jit makes interpreter objects instead,
# and the dispatchers pick the interpreter's bigger tiles. So this runs in a process of its own with
# the variable removed before the kernels are imported; the test starts it as a subprocess.
os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import ExitStack, contextmanager, redirect_stdout  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from unittest import mock  # noqa: E402

import triton  # noqa: E402
from tabulate import tabulate  # noqa: E402
from tqdm import tqdm  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

from eenet_fast.kernels import compaction, exit_decision  # noqa: E402
from kernel_variants import Variant, variants  # noqa: E402  (beside this file)

TARGETS = (90, 80)
#: The compile options a launch sets (the rest keep the backend's defaults either way).
OPTIONS = ("num_warps", "num_ctas", "num_stages", "enable_fp_fusion")
MAX_REGISTERS = 255


@dataclass(frozen=True)
class Launch:
    """What the JIT would compile for one launch: the arguments as :class:`ASTSource` takes them."""

    fn: triton.runtime.JITFunction
    signature: dict
    constants: dict
    attrs: dict
    options: dict

    def source(self) -> ASTSource:
        return ASTSource(self.fn, self.signature, self.constants, self.attrs)

    def tile(self) -> str:
        """The ``BLOCK_*`` constexprs, e.g. ``BLOCK_B=8 BLOCK_C=1024``, and the warps."""
        names = {self.fn.arg_names[path[0]]: value for path, value in self.constants.items()}
        blocks = [f"{name}={value}" for name, value in names.items() if name.startswith("BLOCK")]
        return " ".join(blocks + [f"warps={self.options['num_warps']}"])


@dataclass(frozen=True)
class Result:
    """One variant compiled for one target; ``spill`` and ``stack`` are local-memory bytes per thread
    (spill stores, stack frame), ``shared`` bytes per program, ``seconds`` 0 where reused."""

    kernel: str
    variant: str
    target: str
    tile: str
    registers: int
    spill: int
    stack: int
    shared: int
    seconds: float

    @property
    def ok(self) -> bool:
        return self.registers <= MAX_REGISTERS and self.spill == 0 and self.stack == 0


class _Device:
    """Stands in for Triton's driver while a dispatcher runs: it names the target, so that the JIT
    specialises the arguments for it. Nothing reaches a device: the hook cancels every launch."""

    def __init__(self, target: GPUTarget) -> None:
        self.target = target

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return self.target.arch  # the JIT keeps a binder per device: one per target here

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


@contextmanager
def _recording(target: GPUTarget) -> Iterator[list[Launch]]:
    """Inside, kernel launches are recorded as :class:`Launch` es for ``target`` and not run."""
    launches: list[Launch] = []

    def hook(*, fn, compile, **_) -> bool:
        options = {name: compile[name] for name in OPTIONS}
        launches.append(Launch(fn.jit_function, compile["signature"], compile["constants"], compile["configs"][0], options))
        return True  # skip the compilation, and so the launch

    if not isinstance(exit_decision._exit_decision_kernel, triton.runtime.JITFunction):
        raise RuntimeError(
            "the kernels were defined under TRITON_INTERPRET=1: run this module in a fresh process "
            "(python bench/compile_kernels.py), which unsets it before importing them"
        )
    # `driver._active` is where Triton keeps the active driver (3.6 to 3.9); `reset_active()` would build
    # the default CUDA driver, which fails without a GPU. The dispatchers take CPU tensors only with
    # INTERPRET set: the tensors here carry dtype, shape, strides and alignment to the JIT, no data.
    previous_driver, previous_hook = driver._active, knobs.runtime.jit_cache_hook
    driver.set_active(_Device(target))
    knobs.runtime.jit_cache_hook = hook
    try:
        with ExitStack() as stack:
            for module in (exit_decision, compaction):
                stack.enter_context(mock.patch.object(module, "INTERPRET", True))
            yield launches
    finally:
        driver._active, knobs.runtime.jit_cache_hook = previous_driver, previous_hook


def capture(variant: Variant, target: GPUTarget) -> Launch:
    """The one launch ``variant`` makes, specialised for ``target``."""
    with _recording(target) as launches:
        variant.call()
    if len(launches) != 1:
        raise RuntimeError(f"{variant.kernel} {variant.name} made {len(launches)} launches, expected 1")
    return launches[0]


_USED = re.compile(r"Used (\d+) registers")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores")


def compile_launch(launch: Launch, target: GPUTarget) -> tuple[int, int, int, int, float]:
    """``(registers, spill bytes, stack bytes, shared bytes, seconds)`` of ``launch`` compiled for
    ``target``: registers, spill stores and stack frame per thread from the ``ptxas -v`` log that
    Triton prints with ``dump_ptxas_log`` (so the cache must not already hold the kernel), shared
    memory from the metadata (what a launch requests)."""
    log, dump = io.StringIO(), knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    try:
        with redirect_stdout(log):
            start = time.perf_counter()
            kernel = triton.compile(launch.source(), target=target, options=launch.options)
            seconds = time.perf_counter() - start
    finally:
        knobs.nvidia.dump_ptxas_log = dump
    used, frame = _USED.findall(log.getvalue()), _FRAME.findall(log.getvalue())
    if len(used) != 1 or len(frame) != 1:
        raise RuntimeError(f"expected the ptxas log of one kernel (was it cached?), got:\n{log.getvalue()}")
    stack, spill = map(int, frame[0])
    return int(used[0]), spill, stack, kernel.metadata.shared, seconds


def run(grid: str, archs: tuple[int, ...] = TARGETS) -> list[Result]:
    """Compile every variant of ``grid`` for every ``sm_<arch>``; a variant that specialises like an
    earlier one (the same source, constexprs, attributes and options) reuses its compilation. The
    compilations go to an empty cache of their own: each runs ptxas, and the user's cache is left alone."""
    done: dict[tuple, tuple[int, int, int, int, float]] = {}
    results = []
    jobs = [(variant, arch) for arch in archs for variant in variants(grid)]
    with tempfile.TemporaryDirectory() as cache, mock.patch.dict(os.environ, {"TRITON_CACHE_DIR": cache}):
        for variant, arch in tqdm(jobs, desc="compiling", unit="variant", file=sys.stderr):
            results.append(_compile_variant(variant, arch, done))
    return results


def _compile_variant(variant: Variant, arch: int, done: dict) -> Result:
    """``variant`` for ``sm_<arch>``, compiled unless ``done`` (by specialisation key) has it already."""
    target = GPUTarget("cuda", arch, 32)
    launch = capture(variant, target)
    key = (arch, launch.source().hash(), tuple(launch.options.items()))
    fresh = key not in done
    if fresh:
        done[key] = compile_launch(launch, target)
    registers, spill, stack, shared, seconds = done[key]
    return Result(variant.kernel, variant.name, f"sm_{arch}", launch.tile(), registers, spill, stack, shared,
                  round(seconds, 2) if fresh else 0.0)  # fmt: skip


def markdown(results: list[Result], grid: str) -> str:
    """The results as a markdown section: Triton's version, the command, a row per variant with
    registers / spill stores / stack frame (bytes per thread) per target, shared memory (bytes) and
    the compile time (seconds, summed over the targets; 0 where a variant reuses an identical one)."""
    targets = list(dict.fromkeys(r.target for r in results))
    rows: dict[tuple[str, str], dict] = {}
    for r in results:
        row = rows.setdefault((r.kernel, r.variant), {"kernel": r.kernel, "variant": r.variant, "tile": r.tile})
        row[f"{r.target} regs/spill/stack"] = f"{r.registers} / {r.spill} / {r.stack}"
        row["shared"] = max(row.pop("shared", 0), r.shared)  # (re)inserted last, after the targets
        row["compile s"] = round(row.pop("compile s", 0.0) + r.seconds, 2)
    bad = sum(not r.ok for r in results)
    return (
        f"## triton {triton.__version__}\n\n"
        f"`python bench/compile_kernels.py --grid {grid}`: {len(rows)} variants for {', '.join(targets)}, "
        f"{bad} compilations over {MAX_REGISTERS} registers or with local memory.\n\n"
        f"{tabulate(list(rows.values()), headers='keys', tablefmt='github')}\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", choices=("ci", "full"), default="full")
    parser.add_argument("--arch", type=int, nargs="+", default=list(TARGETS), help="compute capabilities, e.g. 90 80")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    args = parser.parse_args(argv)
    results = run(args.grid, tuple(args.arch))
    page = markdown(results, args.grid)
    print(page)
    if args.json:
        args.json.write_text(json.dumps({"triton": triton.__version__, "results": [asdict(r) for r in results]}, indent=1))
    if args.markdown:
        args.markdown.write_text(page)
    bad = [r for r in results if not r.ok]
    for r in bad:
        print(f"{r.target} {r.kernel} {r.variant} ({r.tile}): {r.registers} registers, {r.spill} bytes of spill "
              f"stores, {r.stack} bytes of stack", file=sys.stderr)  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
