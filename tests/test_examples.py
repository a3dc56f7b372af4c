"""Every example in examples/ runs to the end on this CPU (each about 20-40 s) and prints its table
and a real adaptive run whose exits equal the offline simulation."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.slow
@pytest.mark.parametrize(
    "script",
    [
        "resnet_fashion_mnist.py",
        pytest.param("vit_digits.py", marks=pytest.mark.transformers),
        pytest.param("bert_minilm.py", marks=[pytest.mark.transformers, pytest.mark.minilm]),
    ],
)
def test_example_runs(script):
    done = subprocess.run([sys.executable, str(EXAMPLES / script)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| eenet" in done.stdout
    assert "exits identical to the offline simulation" in done.stdout
