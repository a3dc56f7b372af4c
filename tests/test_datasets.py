import pytest
import torch

from eenet_fast.datasets import load_digits_split, load_fashion_mnist


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def test_digits_split_shapes():
    data = load_digits_split(seed=0)
    x, y = data["train"]
    assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8) and y.dtype == torch.int64
    assert sum(len(data[s][1]) for s in ("train", "val", "test")) == 1797
