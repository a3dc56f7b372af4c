"""What the kernel and backend tests share: the device they run on, the dtypes, seeded generators
and keep flags. Without CUDA the kernels run in Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1 before anything defines a kernel); every test uses small grids there."""

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def keep_flags(batch: int, mode: str) -> torch.Tensor:
    if mode == "all":
        return torch.ones(batch, dtype=torch.bool)
    if mode == "none":
        return torch.zeros(batch, dtype=torch.bool)
    return torch.rand(batch, generator=gen(batch + 1)) > 0.5
