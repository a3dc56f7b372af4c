"""Small image data sets for training and checking multi-exit models, with no download.

* Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (four gzip IDX files under
  ``/usr/share/datasets/fashion-mnist``), or from any folder holding the same four files.
* scikit-learn's bundled 8x8 digits (1,797 images), split train/val/test by seed.

Every loader returns tensors on the CPU: images float32 ``[N, 1, H, W]``, labels int64 ``[N]``.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "load_fashion_mnist",
    "load_digits_split",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

_IDX_UBYTE = 0x08  # IDX type code of unsigned bytes


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read one gzip IDX file of unsigned bytes.

    The header is two zero bytes, the type code (0x08 for uint8), the number of dimensions, then
    one big-endian int32 per dimension; the data follows in C order.

    Returns:
        uint8 array with ``ndim`` dimensions.
    """
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE or raw[3] != ndim:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes with {ndim} dimension(s)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(shape)):
        raise ValueError(f"{path}: header announces shape {shape} but holds {len(raw) - offset} bytes of data")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def load_fashion_mnist(root: str | Path | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Load Fashion-MNIST from its four gzip IDX files.

    Args:
        root: folder holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``; defaults to
            :data:`FASHION_MNIST_DIR`, where ``apt-get install dataset-fashion-mnist`` puts them.

    Returns:
        ``{"train": (x, y), "test": (x, y)}`` with ``x`` float32 ``[N, 1, 28, 28]`` (pixels scaled to
        ``[0, 1]``, then normalised with mean :data:`FASHION_MNIST_MEAN` and std
        :data:`FASHION_MNIST_STD`) and ``y`` int64 ``[N]`` in ``0..9``; ``N`` is 60,000 for train and
        10,000 for test.

    Raises:
        FileNotFoundError: a file is missing; the message says how to get them.
        ValueError: a file is not a well-formed IDX file, or images and labels disagree in number.
    """
    folder = FASHION_MNIST_DIR if root is None else Path(root)
    names = {
        split: (f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz")
        for split, prefix in (("train", "train"), ("test", "t10k"))
    }
    missing = [name for pair in names.values() for name in pair if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {folder} (missing {', '.join(missing)}): "
            "run `apt-get install -y dataset-fashion-mnist` or pass the folder holding the four IDX "
            "files (`--data DIR` on the command line)"
        )
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for split, (image_name, label_name) in names.items():
        images = _read_idx(folder / image_name, ndim=3)
        labels = _read_idx(folder / label_name, ndim=1)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{split}: {images.shape[0]} images but {labels.shape[0]} labels in {folder}")
        x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1)
        x = (x / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
        out[split] = (x, torch.from_numpy(labels.astype(np.int64)))
    return out


def load_digits_split(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Load scikit-learn's bundled 8x8 digits and split them 60/20/20 at random.

    Args:
        seed: seed of the permutation; the same seed gives the same split.

    Returns:
        ``{"train": (x, y), "val": (x, y), "test": (x, y)}`` with ``x`` float32 ``[N, 1, 8, 8]``
        scaled to ``[0, 1]`` and ``y`` int64 ``[N]`` in ``0..9``; the three splits are disjoint and
        hold 1,078, 359 and 360 of the 1,797 images.

    Raises:
        ImportError: scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(
            "load_digits_split needs scikit-learn: `pip install scikit-learn` (or the `test` extra)"
        ) from exc
    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    n = x.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train, n_val = int(0.6 * n), int(0.2 * n)
    parts = {
        "train": order[:n_train],
        "val": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }
    return {split: (x[idx], y[idx]) for split, idx in parts.items()}
