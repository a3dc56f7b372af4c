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
