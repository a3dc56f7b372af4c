"""The kernels compile for Hopper (sm_90) and Ampere (sm_80), within the registers and without
spilling, on a machine without a GPU.

``bench/compile_kernels.py`` does the work in a process of its own: it must define the kernels
without ``TRITON_INTERPRET``, which conftest sets in this one. Here it compiles its ``ci`` grid (a
small-C float32 decision, a large-C bfloat16 decision with the per-class term and the hidden layer,
a gather, a write: seconds); ``python bench/compile_kernels.py`` compiles the full grid
(``bench/results/kernels_compile.md``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

SCRIPT = Path(__file__).parents[1] / "bench" / "compile_kernels.py"


def _nvidia_tools_missing() -> str | None:
    """Why Triton cannot compile for NVIDIA targets here, or ``None`` when it can."""
    from triton.backends import backends

    if "nvidia" not in backends:
        return f"triton {triton.__version__} has no nvidia backend"
    try:
        from triton import knobs

        if not Path(knobs.nvidia.ptxas.path).is_file():
            return f"triton's ptxas ({knobs.nvidia.ptxas.path}) is missing"
    except Exception as e:  # noqa: BLE001 - any failure to locate it means it cannot be used
        return f"triton's ptxas cannot be located ({type(e).__name__}: {e})"
    return None


_MISSING = _nvidia_tools_missing()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=str(_MISSING))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("compile") / "ci.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--grid", "ci", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.exists(), f"bench/compile_kernels.py failed ({done.returncode}):\n{done.stderr[-3000:]}"
    return json.loads(out.read_text())["results"]


def test_each_kernel_compiles_for_hopper_and_ampere(compiled):
    covered = {(r["kernel"], r["target"]) for r in compiled}
    assert covered == {(k, t) for k in ("decision", "gather", "write") for t in ("sm_90", "sm_80")}
    tiles = {r["tile"] for r in compiled if r["kernel"] == "decision"}
    assert any("BLOCK_C=16 " in t for t in tiles) and any("BLOCK_C=1024 " in t for t in tiles)


def test_no_variant_spills_or_exceeds_the_registers(compiled):
    for r in compiled:
        where = f"{r['target']} {r['kernel']} {r['variant']} ({r['tile']})"
        assert 0 < r["registers"] <= 255, where
        assert r["spill"] == 0, f"{where} spills {r['spill']} bytes"
        assert r["stack"] == 0, f"{where} uses {r['stack']} bytes of stack (local memory)"
